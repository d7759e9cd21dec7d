"""Fixtures for engine tests: a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.engine.request import GenerationRequest, SamplingParams
from serve.model_loading import EMBEDDED_GGUF, embedded_model_dir


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (byte-level BPE, 49152 tokens)."""
    return AutoTokenizer.from_pretrained(embedded_model_dir(), gguf_file=EMBEDDED_GGUF)


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64) -> LlamaForCausalLM:
    """A random Llama whose logits are spread out (large init), so greedy choices are not near-ties."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.5,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def model(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture
def engine(model, tokenizer):
    """A running engine; shut down after the test."""
    eng = Engine(model, tokenizer, EngineConfig.from_model(model, max_batch_total_tokens=200_000))
    eng.start()
    yield eng
    eng.shutdown()


@contextlib.contextmanager
def running_engine(model, tokenizer, **config) -> Iterator[Engine]:
    """An engine on `model` (EngineConfig.from_model(model, **config)), shut down on exit."""
    eng = Engine(model, tokenizer, EngineConfig.from_model(model, **config))
    eng.start()
    try:
        yield eng
    finally:
        eng.shutdown()


def decode_all(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Submit every prompt at once (greedy, EOS ignored) and return each one's generated token ids."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    handles = [engine.submit(GenerationRequest(p, params)) for p in prompts]
    return [[ev.token.id for ev in h] for h in handles]


def generate_alone(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Reference: transformers' own generate on one unpadded prompt, greedy, EOS ignored."""
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2,
    )
    return out[0, len(prompt):].tolist()


def forced(tokens: list[int]):
    """A logits processor that makes the model emit exactly `tokens`, one per step."""
    start: list[int] = []

    def proc(history, row):
        if not start:
            start.append(len(history))
        i = len(history) - start[0]
        row = torch.full_like(row, -1e9)
        row[tokens[min(i, len(tokens) - 1)]] = 0.0
        return row

    return proc
