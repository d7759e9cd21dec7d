"""The fuzz tests' model: the unit tests' tiny random Llama with the real SmolLM2 tokenizer, saved in HF
layout so that the real server (`container/serve`) loads it from SM_MODEL_DIR in a second or two."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.conftest import model, tokenizer  # noqa: F401  (the unit tests' fixtures, reused)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, model, tokenizer) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
