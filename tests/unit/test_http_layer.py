"""The HTTP layer without a model: stream holdback, the exact bytes of response models, /ping's
reason, the compute-type header, the 413 of a chunked body."""

from __future__ import annotations

import io
import json
import logging
import random
from types import SimpleNamespace

import pytest
import torch

from serve.app import create_app
from serve.config import Settings
from serve.handlers.common import timing_headers
from serve.handlers.holdback import Holdback
from serve.protocol import generate as gen
from serve.protocol import openai as oai
from serve.protocol.errors import Api, ApiError
from serve.protocol.fields import sse
from serve.service import ModelService, Status


def could_grow(text: str, stops: list[str]) -> int:
    """The definition: the longest tail of `text` that is a proper prefix of some stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@pytest.mark.parametrize("pieces, stops, sent", [
    (["Hello", " wor", "ld"], ["world!"], ["Hello", " ", ""]),
    (["a ", "#", "#", "b"], ["###"], ["a ", "", "", "##b"]),
    (["x", "y"], [], ["x", "y"]),
    (["ab", "ab", "c"], ["abac"], ["", "ab", "abc"]),  # a failed match may restart inside itself
])
def test_holdback_table(pieces, stops, sent):
    hold = Holdback(stops)
    assert [hold.push(p) for p in pieces] == sent


def test_holdback_sends_all_but_what_may_become_a_stop_string():
    rng = random.Random(7)
    for _ in range(3000):
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        hold, text, sent = Holdback(stops), "", ""
        for _ in range(rng.randint(1, 12)):
            text += (piece := "".join(rng.choices("abc", k=rng.randint(0, 3))))
            hit = min((text.find(s) for s in stops if s in text), default=-1)
            if hit >= 0:  # the engine ends the sequence here and the answer stops before the match
                sent += hold.finish(text[:hit])
                assert sent == text[:hit]
                break
            sent += hold.push(piece)
            assert sent == text[: len(text) - could_grow(text, stops)], (stops, text)


def test_response_models_write_the_bytes_clients_know():
    token = gen.Token(id=5, text="é", logprob=-0.5, special=False)
    event = gen.StreamEvent(index=0, token=token)
    assert sse(event, space=False) == ('data:{"index": 0, "token": {"id": 5, "text": "é", "logprob": -0.5, '
                                       '"special": false}, "generated_text": null, "details": null}\n\n')
    assert gen.GeneratedText(generated_text="x").dumps() == '{"generated_text": "x"}'
    assert gen.PrefillToken(id=1, text="a", logprob=float("nan")).dumps() == '{"id": 1, "text": "a", "logprob": null}'
    head = {"id": "chatcmpl-1", "created": 2, "model": "m", "system_fingerprint": "f"}
    chunk = oai.ChatCompletionChunk(**head, choices=[oai.ChunkChoice(index=0, delta=oai.Delta(content="hi"))])
    plain = ('{"id": "chatcmpl-1", "created": 2, "model": "m", "system_fingerprint": "f", "object": '
             '"chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": null, '
             '"finish_reason": null}]')
    assert chunk.dumps(exclude={"usage"}) == plain + "}"  # no include_usage: no key
    assert chunk.dumps() == plain + ', "usage": null}'
    err = ApiError(422, "validation", "bad ü", "n")
    assert err.sse(Api.OPENAI) == ('data: {"error": {"message": "bad ü", "type": "validation", "param": "n", '
                                   '"code": 422}}\n\ndata: [DONE]\n\n')


def failed_service(error: str | None, engine_error: str | None) -> ModelService:
    svc = ModelService(Settings())
    svc.status, svc.error = Status.FAILED if error else Status.READY, error
    if engine_error:
        svc.engine = SimpleNamespace(healthy=False, error=engine_error)
    return svc


@pytest.mark.parametrize("error, engine_error, reason", [
    ("OSError: no weights in /opt/ml/model", None, "OSError: no weights in /opt/ml/model"),
    (None, "engine failure: RuntimeError('CUDA error')", "engine failure: RuntimeError('CUDA error')"),
])
def test_ping_says_why_the_worker_failed_and_logs_it_once(error, engine_error, reason, caplog):
    client = create_app(service=failed_service(error, engine_error)).test_client()
    logging.getLogger("serve").addHandler(caplog.handler)  # the app's logger does not propagate
    try:
        bodies = [client.get("/ping") for _ in range(3)]
    finally:
        logging.getLogger("serve").removeHandler(caplog.handler)
    assert all(r.status_code == 503 for r in bodies)
    assert bodies[0].get_json() == {"error": "unhealthy", "error_type": "healthcheck", "reason": reason}
    assert [r.getMessage() for r in caplog.records if "/ping" in r.getMessage()] == [f"/ping answers 503: {reason}"]


def test_compute_type_comes_from_the_engine_device():
    timings = SimpleNamespace(queued=1.0, prefill_start=1.5, finished=3.0)
    for device, kind in ((torch.device("cpu"), "cpu+engine"), (torch.device("cuda", 0), "cuda+engine")):
        svc = SimpleNamespace(engine=SimpleNamespace(device=device))
        headers = timing_headers(svc, SimpleNamespace(timings=timings), 3, 4)  # type: ignore[arg-type]
        assert headers["x-compute-type"] == kind and headers["x-inference-time"] == "1500"


def test_a_chunked_body_over_the_limit_is_413_without_reading_it_all():
    client = create_app(service=ModelService(Settings(payload_limit=100))).test_client()
    stream = io.BytesIO(json.dumps({"inputs": "x" * 1000}).encode())
    r = client.post("/invocations", input_stream=stream, content_type="application/json",
                    headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 413 and r.get_json() == {
        "error": "Payload is larger than PAYLOAD_LIMIT (100 bytes)", "error_type": "payload_too_large"}
    assert stream.tell() == 101  # one byte past the limit, not the whole body
    at_limit = io.BytesIO(json.dumps({"inputs": "x" * 84}).encode())  # exactly 100 bytes: read and answered
    r = client.post("/invocations", input_stream=at_limit, content_type="application/json",
                    headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 503  # past the body checks; this worker has no model
