"""Execute the notebooks in local mode, and compare their outputs with the saved ones.

    .venv/bin/python -m tests.notebooks.execute notebooks/01_quickstart_local.ipynb          # check
    .venv/bin/python -m tests.notebooks.execute --write notebooks/01_quickstart_local.ipynb  # refresh

`--write` saves the outputs of a real local run into the notebook, which is how the outputs a reader
sees on GitHub are made. Two runs differ only in what `normalise` replaces: ids, timestamps, ports,
timings, temporary paths, the git sha and digests of the image.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 900  # seconds: the longest cell builds (cached) and pushes the image

# (pattern, replacement), applied in order to every text output.
VOLATILE = [
    (re.compile(r"\b(chatcmpl|cmpl)-[0-9a-f]{16,}"), r"\1-<id>"),
    (re.compile(r'"created": \d+'), '"created": <time>'),
    (re.compile(r"'created': \d+"), "'created': <time>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<uuid>"),
    (re.compile(r"sha256:[0-9a-f]{64}"), "sha256:<digest>"),
    (re.compile(r"\b(\d+\.\d+\.\d+)-[0-9a-f]{12}(-dirty)?\b"), r"\1-<gitsha>"),
    (re.compile(r"\d{8}-\d{6}-\d{3}\b"), "<timestamp>"),
    (re.compile(r"(127\.0\.0\.1|localhost):\d+"), r"\1:<port>"),
    (re.compile(r"/tmp/[^\s'\"]+"), "/tmp/<path>"),
    (re.compile(r"\[\s*\d+\.\d+s\]"), "[<elapsed>]"),
    (re.compile(r"\b\d+(\.\d+)? (s|ms|MB)\b"), r"<n> \2"),
    (re.compile(r"\b\d+/\d+ MB sent\b"), "<n>/<n> MB sent"),
]
# Progress lines repeat every few seconds while a step runs: how many depends on the machine's speed.
PROGRESS = re.compile(r"^\[<elapsed>\] ([^:]+):")


def normalise(text: str) -> str:
    """The text with everything that differs between two honest runs replaced by a placeholder."""
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    lines: list[str] = []
    for line in text.splitlines():
        match = PROGRESS.match(line)
        if match and lines and (prev := PROGRESS.match(lines[-1])) and prev.group(1) == match.group(1):
            lines[-1] = line  # keep the last line of a run of progress lines of one step
        else:
            lines.append(line)
    return "\n".join(lines)


def output_texts(outputs: Iterable[dict]) -> str:
    """What a reader sees of one cell's outputs, as text (streams merged per stream name)."""
    parts: list[str] = []
    streams: dict[str, str] = {}
    for out in outputs:
        if out["output_type"] == "stream":
            streams[out["name"]] = streams.get(out["name"], "") + out["text"]
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append(f"{out['ename']}: {out['evalue']}")
    return "\n".join([f"[{name}]\n{text}" for name, text in sorted(streams.items())] + parts)


def cell_outputs(nb: nbformat.NotebookNode) -> list[str]:
    """The normalised outputs of every code cell, in order."""
    return [normalise(output_texts(cell.get("outputs", []))) for cell in nb.cells if cell.cell_type == "code"]


def execute(path: Path, env: dict[str, str] | None = None) -> tuple[nbformat.NotebookNode, float]:
    """Run a copy of the notebook top to bottom in local mode; (executed notebook, seconds taken).

    Raises nbclient's CellExecutionError at the first failing cell.
    """
    nb = nbformat.read(path, as_version=4)
    # DTYPE=float32 for the servers the notebook starts, on every machine: the saved outputs (greedy
    # text) were recorded in float32, and a CPU with native bf16 would otherwise pick bfloat16.
    env = {"NOTEBOOK_MODE": "local", "DTYPE": "float32", **(env or {})}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel, and the servers it starts, inherit this environment
    started = time.monotonic()
    try:
        # The notebook's own kernel: 02 runs on the SageMaker SDK v3's environment (`sagemaker-sdk3`,
        # registered by `make setup`), the others on this one's.
        kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
        client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel, startup_timeout=120,
                                resources={"metadata": {"path": str(path.parent)}})
        client.km = client.create_kernel_manager()
        # A kernel that does not exit within shutdown_wait_time is killed, and a killed kernel cannot
        # stop the servers it started: give its exit handlers the time a draining server may take.
        client.km.shutdown_wait_time = 60
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    """Execute notebooks; with --write save their fresh outputs, else report which ones are stale."""
    parser = argparse.ArgumentParser(prog="python -m tests.notebooks.execute", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    parser.add_argument("--write", action="store_true", help="save the executed outputs into the notebooks")
    args = parser.parse_args(argv)
    stale = 0
    for path in args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb")):
        saved = cell_outputs(nbformat.read(path, as_version=4))
        nb, seconds = execute(path.resolve())
        current = cell_outputs(nb) == saved
        stale += not current
        print(f"{path.name}: executed in {seconds:.0f} s; saved outputs {'current' if current else 'STALE'}")
        if args.write:
            nbformat.write(nb, path)
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
