"""A/B of the fused projections (serve/engine/fuse.py): the engine's forward before them against today's.

One engine on the embedded model, loaded as the server loads it ("bfloat16", "float32",
"bfloat16+int4", ...). The forward from before fusion is the decoder of commit 171bb81 (read with
`git show`, so this needs the repository's history), run on the same weights: it calls q/k/v and
gate/up one by one (oneDNN-packed layers get back the packed copies they gave the fused layers).
B chat prompts decode 32 tokens each (EOS ignored), alternately through the two forwards, in pairs
whose order flips each time, so a slow spell of the machine hits both alike. Prints each run's time
per output token and the median of the per-pair ratios (unfused / fused: above 1, fusing is faster).
Usage: `python -m bench.fuse_ab bfloat16+int4 1 [pairs]`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.engine_bench import prompts, repack
from bench.forward_ab import alternate, engine_for, report

BEFORE = "171bb81"  # the last commit whose decoder ran the seven projections one by one
ROOT = Path(__file__).resolve().parent.parent


def unfused_decoder_class() -> type:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:serve/engine/decoder.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "unfused_decoder.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("unfused_decoder", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["unfused_decoder"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Decoder


def main() -> None:
    variant, batch = sys.argv[1], int(sys.argv[2])
    pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    engine, tok = engine_for(variant)
    fused = engine.decoder
    unfused = unfused_decoder_class()(engine.model)
    repack(engine.model)
    tpot = alternate(engine, prompts(tok, batch), {"unfused": unfused, "fused": fused}, pairs)
    report(f"{variant} B={batch}", tpot)


if __name__ == "__main__":
    main()
