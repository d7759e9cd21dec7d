"""The engine's own forward (serve/engine/decoder.py) computes what the model's transformers forward does."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from serve.engine.decoder import Decoder
from serve.engine.request import GenerationRequest, SamplingParams
from serve.quantize import quantize_int8
from tests.unit.conftest import decode_all, generate_alone, running_engine, tiny_llama

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.5, bos_token_id=1,
             eos_token_id=2, pad_token_id=2)
WINDOW = 12  # shorter than the prompts below, so the window really cuts keys out


def tiny(family: str, vocab: int):
    torch.manual_seed(11)
    if family == "llama":
        return tiny_llama(vocab, seed=11)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(vocab_size=vocab, sliding_window=WINDOW, **SHAPE)).eval()
    # Qwen2: biased q/k/v, and a window on the second layer only (layer_types mixes both kinds)
    config = Qwen2Config(vocab_size=vocab, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                         **SHAPE)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    return Qwen2ForCausalLM(config).eval()


def both_paths(engine):
    """Run every forward through the decoder and through transformers' forward; record how far apart they are."""
    real, decoder, gaps = engine.forward_model, engine.decoder, []

    def forward(inputs, keep):
        engine.decoder = None
        theirs = real(inputs, keep)  # writes the same keys and values to the same slots
        engine.decoder = decoder
        ours = real(inputs, keep)
        gaps.append(((ours - theirs).abs().max() / theirs.abs().max()).item())
        return ours

    engine.forward_model = forward
    return gaps


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_the_decoder_matches_transformers_forward(family, tokenizer):
    model = tiny(family, len(tokenizer))
    prompts = [tokenizer.encode("the engine's own forward " * (1 + 2 * i) + f"row {i}") for i in range(3)]
    assert all(len(p) > WINDOW for p in prompts[1:])
    # References first: the engine swaps the model's attention for its own, and transformers then
    # builds no (sliding-window) mask for a plain call of the model
    want = [generate_alone(model, p, 16) for p in prompts]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompts[2]])).logits[0, :-1], dim=-1)
    want_logprobs = ref.gather(1, torch.tensor(prompts[2][1:])[:, None])[:, 0].tolist()
    with running_engine(model, tokenizer, max_batch_total_tokens=20_000) as engine:
        assert isinstance(engine.decoder, Decoder)
        gaps = both_paths(engine)
        outs = decode_all(engine, prompts, 16)  # prefills, then decode steps of three rows
        late = engine.submit(GenerationRequest(prompts[2], SamplingParams(max_new_tokens=4, prefill_logprobs=True)))
        prefill = next(iter(late))
        list(late)
    # The same operations in the same order, but for q/k/v and gate/up in one matmul each: in fp32
    # MKL may then sum a product in another order (tests/unit/test_fuse.py), a few ulps at most
    assert len(gaps) >= 16 and max(gaps) < 1e-6, gaps
    assert outs == want  # transformers' generate, with its own masks and cache
    assert [t.logprob for t in prefill.tokens[1:]] == pytest.approx(want_logprobs, abs=1e-4)


def test_the_decoder_runs_quantized_linears(tokenizer):
    model = tiny_llama(len(tokenizer), seed=12).to(torch.bfloat16)
    quantize_int8(model)
    prompts = [tokenizer.encode("int8 weights through the engine's forward " * (1 + i)) for i in range(2)]
    with running_engine(model, tokenizer, max_batch_total_tokens=20_000) as engine:
        assert engine.decoder is not None
        gaps = both_paths(engine)
        decode_all(engine, prompts, 8)
    assert gaps and max(gaps) == 0, gaps  # int8's kernel computes each output channel alike fused or not


def test_other_models_keep_their_own_forward(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4)).eval()
    assert Decoder.of(gpt2) is None  # not a Llama-shaped family
    llama = tiny_llama(len(tokenizer), seed=13)
    assert Decoder.of(llama) is not None
    llama.model.layers[1].mlp.down_proj._hf_hook = object()  # what accelerate leaves on a dispatched module
    assert Decoder.of(llama) is None
    del llama.model.layers[1].mlp.down_proj._hf_hook
    del llama.model.layers[0].post_attention_layernorm  # a layer with other parts than the loop runs
    assert Decoder.of(llama) is None
    prompt = tokenizer.encode("a model the decoder does not know")
    want = generate_alone(gpt2, prompt, 6)
    with running_engine(gpt2, tokenizer, max_batch_total_tokens=20_000) as engine:
        assert engine.decoder is None
        assert decode_all(engine, [prompt], 6) == [want]
