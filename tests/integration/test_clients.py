"""Clients people already use, pointed at /invocations: TGI's own and huggingface_hub's."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


def test_text_generation_client_generate_with_details(auto_server):
    from text_generation import Client

    client = Client(auto_server.invocations, timeout=120)
    out = client.generate(PROMPT, max_new_tokens=8, decoder_input_details=True, top_n_tokens=2)
    assert "Paris" in out.generated_text
    d = out.details
    assert d.generated_tokens == len(d.tokens) and d.finish_reason.value in ("length", "eos_token")
    assert [t.text for t in d.prefill][1:] == [" capital", " of", " France", " is"]
    assert len(d.top_tokens) == len(d.tokens) and len(d.top_tokens[0]) == 2
    # TGI's client sends return_full_text unset, which on /invocations means true (as TGI does).
    assert out.generated_text.startswith(PROMPT) or "".join(t.text for t in d.tokens) == out.generated_text


def test_text_generation_client_stream_matches_generate(auto_server):
    from text_generation import Client

    client = Client(auto_server.invocations, timeout=120)
    full = client.generate(PROMPT, max_new_tokens=8)
    events = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert all(e.details is None for e in events[:-1])
    last = events[-1]
    assert last.details is not None and last.details.generated_tokens == len(events)
    assert last.generated_text == full.generated_text
    assert full.generated_text.endswith("".join(e.token.text for e in events if not e.token.special))


def test_text_generation_client_sees_validation_errors(auto_server):
    from text_generation import Client
    from text_generation.errors import ValidationError

    client = Client(auto_server.invocations, timeout=120)
    with pytest.raises(ValidationError, match="must have less than 1000 tokens"):
        client.generate("word " * 1200, max_new_tokens=2)


def test_inference_client_text_generation(auto_server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=auto_server.invocations, timeout=120)
    text = client.text_generation(PROMPT, max_new_tokens=8, return_full_text=False)
    assert "Paris" in text
    out = client.text_generation(PROMPT, max_new_tokens=8, details=True, return_full_text=False)
    assert out.generated_text == text and out.details.generated_tokens == len(out.details.tokens)
    streamed = "".join(client.text_generation(PROMPT, max_new_tokens=8, stream=True, return_full_text=False))
    assert streamed == text


def test_plain_requests_and_curl_style_bodies(auto_server):
    """A body sent with no Content-Type at all (some SageMaker SDK paths) is read as JSON."""
    r = requests.post(auto_server.invocations, data=b'{"inputs": "Hello", "parameters": {"max_new_tokens": 2}}',
                      timeout=120)
    assert r.status_code == 200 and r.json()[0]["generated_text"].startswith("Hello")
