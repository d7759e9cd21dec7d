"""Fault injection for tests of the real server; nothing under serve/ knows about it.

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one. Only
the fault tests put this folder on the server's PYTHONPATH (tests/integration/test_faults.py), and only
they set SERVE_TEST_FAULTS to a folder of their own; a production process never sees either.

Once `serve.engine.engine` is imported, this wraps, for the test to arm by writing a file into that
folder:
- `forward`: the model's forward. The file holds `<kind> <error>`: kind `decode` (forwards in
  which a row adds one token) or `any`; error `cuda` (a CUDA illegal memory access, once), `oom` (an allocation
  failure, once) or `sticky` (a RuntimeError on every such forward of this process, from then on);
- `stall`: the next engine step sleeps that many seconds first;
- and the detokenizer stream: a request whose prompt ends with `[detok-fault]` gets tokenizers'
  real "Invalid prefix encountered" error on its first generated token.

A worker claims a file by renaming it with its pid, so the fresh worker that replaces a failed one
starts clean.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time

FOLDER = os.environ.get("SERVE_TEST_FAULTS")
DETOK_MARKER = "[detok-fault]"


def _claim(name: str) -> str | None:
    """The armed spec in file `name`, claimed by this process (or already claimed by it), else None."""
    mine = os.path.join(FOLDER, f"{name}.{os.getpid()}")
    try:
        os.rename(os.path.join(FOLDER, name), mine)
    except FileNotFoundError:
        pass
    try:
        with open(mine, encoding="utf-8") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


def _fired(name: str) -> None:
    os.replace(os.path.join(FOLDER, f"{name}.{os.getpid()}"), os.path.join(FOLDER, f"{name}.{os.getpid()}.fired"))


def _raise_for(spec: str) -> None:
    import torch

    error = spec.split()[1]
    if error == "cuda":
        _fired("forward")
        raise RuntimeError("CUDA error: an illegal memory access was encountered\n"
                           "CUDA kernel errors might be asynchronously reported at some other API call")
    if error == "oom":
        _fired("forward")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by a test)")
    raise RuntimeError("injected sticky failure: this forward fails, as every one after it")


def _wrap_forward(engine) -> None:
    real = engine.forward_model

    def forward(inputs, keep):
        spec = _claim("forward")
        if spec is not None and (spec.startswith("any") or 1 in inputs["paged_kv"].new):
            _raise_for(spec)
        return real(inputs, keep)

    engine.forward_model = forward


class _Stream:
    """tokenizers' DecodeStream, raising its own error for a prompt that ends with the marker."""

    def __init__(self, real_class, ids=None, skip_special_tokens=False):
        self._real = real_class(ids=ids, skip_special_tokens=skip_special_tokens)
        self._context = list(ids or [])
        self._armed: bool | None = None

    def step(self, tokenizer, token_id):
        if self._armed is None:
            self._armed = tokenizer.decode(self._context).rstrip().endswith(DETOK_MARKER)
        if self._armed:
            raise Exception("Invalid prefix encountered")  # what tokenizers raises, type included
        return self._real.step(tokenizer, token_id)


def _patch_engine(module) -> None:
    engine_class = module.Engine
    real_init, real_step = engine_class.__init__, engine_class.step

    def __init__(self, model, *args, **kwargs):
        real_init(self, model, *args, **kwargs)
        _wrap_forward(self)

    def step(self):
        spec = _claim("stall")
        if spec is not None:
            _fired("stall")
            time.sleep(float(spec))
        return real_step(self)

    engine_class.__init__, engine_class.step = __init__, step


def _patch_detokenize(module) -> None:
    real_class = module.DecodeStream
    module.DecodeStream = lambda ids=None, skip_special_tokens=False: _Stream(real_class, ids, skip_special_tokens)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch right after a module is first executed."""

    PATCHES = {"serve.engine.engine": _patch_engine, "serve.engine.detokenize": _patch_detokenize}

    def find_spec(self, name, path, target=None):
        patch = self.PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if FOLDER:
    sys.meta_path.insert(0, _AfterImport())
