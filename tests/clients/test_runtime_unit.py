"""The event stream encoder, the SSE iterator and the local runtime against a stub container (fast).

Decoding is always botocore's own (EventStreamBuffer, and the sagemaker-runtime client's parser).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import requests
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from botocore.exceptions import EventStreamError

from deploy import eventstream
from deploy.local_endpoint import EndpointConfig, LocalRuntime, RuntimeConfig
from deploy.streaming import iter_lines, iter_sse_events, iter_sse_json
from tests.clients.conftest import runtime_client
from tests.clients.stub_container import StubContainer
from tests.server import ROOT, free_port

pytestmark = pytest.mark.timeout(60, func_only=True)


def decode(raw: bytes) -> list:
    buf = EventStreamBuffer()
    buf.add_data(raw)
    return list(buf)


def test_payload_part_decodes_with_botocore():
    data = "données ✓ ".encode() * 40
    (msg,) = decode(eventstream.payload_part(data))
    assert msg.payload == data
    assert msg.headers == {":event-type": "PayloadPart", ":content-type": "application/octet-stream",
                           ":message-type": "event"}


def test_model_stream_error_frame_decodes_with_botocore():
    (msg,) = decode(eventstream.model_stream_error("it broke", "StreamBroken"))
    assert msg.headers[":message-type"] == "exception" and msg.headers[":exception-type"] == "ModelStreamError"
    assert json.loads(msg.payload) == {"Message": "it broke", "ErrorCode": "StreamBroken"}


def test_frames_split_anywhere_still_decode_and_crcs_are_checked():
    raw = b"".join(eventstream.payload_part(bytes([i]) * i) for i in range(1, 30))
    buf, payloads = EventStreamBuffer(), []
    for i in range(0, len(raw), 5):  # feed 5 bytes at a time: frames arrive in pieces
        buf.add_data(raw[i:i + 5])
        payloads += [m.payload for m in buf]
    assert payloads == [bytes([i]) * i for i in range(1, 30)]
    tampered = bytearray(eventstream.payload_part(b"hello"))
    tampered[-6] ^= 0xFF  # flip a payload byte: the message CRC no longer matches
    with pytest.raises(ChecksumMismatch):
        decode(bytes(tampered))


def test_split_and_regroup_keep_every_byte():
    chunks = [b"data: one\n\n", b"data: two\n\n", b"data: three-three\n\n"]
    tiny = list(eventstream.split_parts(chunks, 7))
    assert b"".join(tiny) == b"".join(chunks) and max(map(len, tiny)) <= 7
    assert b"data: o" in tiny  # a part never spans two container writes
    grouped = list(eventstream.regroup_parts(chunks, 16))
    assert b"".join(grouped) == b"".join(chunks)
    assert [len(p) for p in grouped] == [16, 16, 9] and grouped[0] == b"data: one\n\ndata:"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_sse_iterator_is_boundary_proof(size):
    text = 'data: {"t": "é€😀"}\r\n\r\n: comment\n\nevent: x\nid: 7\ndata: a\ndata: b\n\ndata: [DONE]\n\n'
    raw = text.encode()
    parts = [{"PayloadPart": {"Bytes": raw[i:i + size]}} for i in range(0, len(raw), size)]
    events = list(iter_sse_events(parts))
    assert [e.data for e in events] == ['{"t": "é€😀"}', "a\nb", "[DONE]"]
    assert (events[1].event, events[1].id) == ("x", "7")
    json_only = 'data: {"t": "é€😀"}\n\ndata: [DONE]\n\ndata: {"after": "done"}\n\n'.encode()
    parts = [json_only[i:i + size] for i in range(0, len(json_only), size)]
    assert list(iter_sse_json(parts)) == [{"t": "é€😀"}]  # nothing after OpenAI's [DONE]
    assert list(iter_lines([b"no newline at end"])) == ["no newline at end"]


@pytest.fixture(scope="module")
def stub_runtime():
    with StubContainer() as stub:
        cfg = RuntimeConfig(endpoints={
            "stub": EndpointConfig(target=stub.url, variant="blue"),
            "stub-7": EndpointConfig(target=stub.url, part_size=7),
            "stub-fast": EndpointConfig(target=stub.url, invocation_timeout=1.0, stream_timeout=1.0),
            "dead": EndpointConfig(target=f"http://127.0.0.1:{free_port()}"),
        })
        with LocalRuntime(cfg) as rt:
            yield rt


def test_headers_passed_and_stripped(stub_runtime):
    client = runtime_client(stub_runtime.url)
    out = client.invoke_endpoint(EndpointName="stub", Body=b'{"mode": "echo"}', ContentType="application/json",
                                 Accept="application/json", CustomAttributes="trace=1", InferenceId="abc",
                                 TargetVariant="blue", InferenceComponentName="ic-1")
    seen = json.loads(out["Body"].read())["headers"]
    assert seen["Content-Type"] == "application/json" and seen["Accept"] == "application/json"
    assert seen["X-Amzn-Sagemaker-Custom-Attributes"] == "trace=1" and seen["X-Amzn-Sagemaker-Inference-Id"] == "abc"
    lowered = {k.lower() for k in seen}
    assert not lowered & {"authorization", "x-amz-date", "x-amzn-sagemaker-target-variant",
                          "x-amzn-sagemaker-inference-component"}
    assert out["InvokedProductionVariant"] == "blue" and out["CustomAttributes"] == "from-container"
    assert "x-internal-secret" not in out["ResponseMetadata"]["HTTPHeaders"]


def test_payload_cap_is_six_megabytes(stub_runtime):
    client = runtime_client(stub_runtime.url)
    limit = 6 * 1024 * 1024
    body = b'{"mode": "echo", "pad": "' + b"x" * (limit - 27) + b'"}'
    assert len(body) == limit
    assert json.loads(client.invoke_endpoint(EndpointName="stub", Body=body)["Body"].read())["length"] == limit
    with pytest.raises(client.exceptions.ValidationError, match="6291456"):
        client.invoke_endpoint(EndpointName="stub", Body=body + b" ")


def test_container_errors_and_timeouts_are_model_errors(stub_runtime):
    client = runtime_client(stub_runtime.url)
    with pytest.raises(client.exceptions.ModelError) as err:
        client.invoke_endpoint(EndpointName="stub", Body=json.dumps({"mode": "status", "status": 503,
                                                                     "body": '{"error": "warming up"}'}))
    r = err.value.response
    assert r["OriginalStatusCode"] == 503 and r["OriginalMessage"] == '{"error": "warming up"}'
    assert r["Error"]["Message"].startswith("Received server error (503) from primary with message")
    assert r["LogStreamArn"].endswith(":log-group:/aws/sagemaker/Endpoints/stub")
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 424
    start = time.monotonic()
    with pytest.raises(client.exceptions.ModelError, match="timed out") as err:
        client.invoke_endpoint(EndpointName="stub-fast", Body=b'{"mode": "sleep", "seconds": 3}')
    assert err.value.response["OriginalStatusCode"] == 0 and time.monotonic() - start < 2.5
    with pytest.raises(client.exceptions.ModelError):
        client.invoke_endpoint(EndpointName="dead", Body=b"{}")
    with pytest.raises(client.exceptions.ValidationError, match="Endpoint nope of account 123456789012 not found"):
        client.invoke_endpoint(EndpointName="nope", Body=b"{}")


def test_stream_parts_and_headers(stub_runtime):
    client = runtime_client(stub_runtime.url)
    for name, max_part in (("stub", 10_000), ("stub-7", 7)):
        out = client.invoke_endpoint_with_response_stream(EndpointName=name, Body=b'{"mode": "sse", "n": 6}',
                                                          ContentType="application/json", Accept="text/event-stream")
        assert out["ContentType"].startswith("text/event-stream") and out["CustomAttributes"] == "from-container"
        parts = [e["PayloadPart"]["Bytes"] for e in out["Body"]]
        assert max(map(len, parts)) <= max_part
        assert [e["index"] for e in iter_sse_json(parts)] == list(range(6))
    assert len(parts) > 6 * 3


def test_broken_and_overlong_streams_raise_event_stream_error(stub_runtime):
    client = runtime_client(stub_runtime.url)
    out = client.invoke_endpoint_with_response_stream(EndpointName="stub", Body=b'{"mode": "break"}')
    received = []
    with pytest.raises(EventStreamError) as err:
        for event in out["Body"]:
            received.append(event["PayloadPart"]["Bytes"])
    assert err.value.response["Error"]["Code"] == "ModelStreamError"
    # botocore keeps only Code and Message of an exception frame (ErrorCode is in the frame's JSON).
    assert "stream from primary broke" in err.value.response["Error"]["Message"]
    assert [e["index"] for e in iter_sse_json(received)] == [0, 1]
    out = client.invoke_endpoint_with_response_stream(EndpointName="stub-fast",
                                                      Body=b'{"mode": "sleep", "seconds": 0.2}')
    assert b"".join(e["PayloadPart"]["Bytes"] for e in out["Body"])  # within the limit: fine
    with pytest.raises(client.exceptions.ModelError, match="timed out"):  # no first byte in time
        client.invoke_endpoint_with_response_stream(EndpointName="stub-fast", Body=b'{"mode": "sleep", "seconds": 3}')
    out = client.invoke_endpoint_with_response_stream(EndpointName="stub-fast", Body=b'{"mode": "drip", "n": 20}')
    received = []
    with pytest.raises(EventStreamError, match="did not complete sending the inference response in the allotted"):
        for event in out["Body"]:
            received.append(event["PayloadPart"]["Bytes"])
    assert 0 < len(list(iter_sse_json(received))) < 20  # what arrived in time was delivered


def test_cli_serves_the_runtime():
    port = free_port()
    with StubContainer() as stub:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.local_endpoint", "--endpoint", f"cli={stub.url}",
                                 "--port", str(port), "--part-size", "7"], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    requests.post(f"http://127.0.0.1:{port}/endpoints/x/invocations", timeout=1)
                    break
                except requests.ConnectionError:
                    assert time.monotonic() < deadline and proc.poll() is None, "CLI did not start"
                    time.sleep(0.1)
            client = runtime_client(f"http://127.0.0.1:{port}")
            out = client.invoke_endpoint_with_response_stream(EndpointName="cli", Body=b'{"mode": "sse", "n": 3}')
            parts = [e["PayloadPart"]["Bytes"] for e in out["Body"]]
            assert max(map(len, parts)) <= 7 and len(list(iter_sse_events(parts))) == 3
        finally:
            proc.terminate()
            proc.wait(10)
