"""SIGTERM keeps its promise, on servers of their own (SmolLM2, OpenAI mode, GRACEFUL_TIMEOUT=20).

With 16 requests in flight, the 12 short ones finish normally; the 4 that cannot finish in time (EOS
banned through `logit_bias`, 3,000 tokens asked) end cleanly before the deadline: the two streams
with an error event and `[DONE]`, the two plain answers with a JSON 503; the worker exits 0 before
GRACEFUL_TIMEOUT. A SIGTERM while the model loads ends the process within a few seconds.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import requests

from tests.server import NO_EOS, running_server

pytestmark = pytest.mark.slow
GRACEFUL = 20
T = 120


def chat(server, i: int, stream: bool, max_tokens: int, results: list, started: threading.Event) -> None:
    """One chat request; records (status, body or SSE payloads) or the exception."""
    body = {"messages": [{"role": "user", "content": f"Tell story number {i} about a lighthouse."}],
            "max_tokens": max_tokens, "stream": stream, "logit_bias": NO_EOS if max_tokens > 100 else {}}
    if not stream:
        started.set()  # about to be sent; its answer comes at the end
    try:
        with requests.post(server.invocations, json=body, timeout=T, stream=stream) as r:
            if not stream:
                results[i] = (r.status_code, r.json())
                return
            payloads = []
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    payloads.append(line[6:])
                    started.set()
            results[i] = (r.status_code, payloads)
    except Exception as exc:  # recorded, asserted by the test
        results[i] = exc


def test_sigterm_finishes_what_it_can_and_ends_the_rest_before_the_deadline():
    env = {"OAI_ENABLED": "true", "GRACEFUL_TIMEOUT": str(GRACEFUL)}
    with running_server(env) as server:
        # 0-11 short streams, 12-13 long streams, 14-15 long plain answers. Short means 16 tokens: done
        # well inside the 18 s drain even at the 1.2 s per token of a machine running three test suites
        # at once (24 tokens were cut short there: the cut was clean, the test's premise was not met).
        plan = [(True, 16)] * 12 + [(True, 3000)] * 2 + [(False, 3000)] * 2
        results: list = [None] * len(plan)
        started = [threading.Event() for _ in plan]
        threads = [threading.Thread(target=chat, args=(server, i, s, m, results, started[i]))
                   for i, (s, m) in enumerate(plan)]
        for t in threads:
            t.start()
        assert all(e.wait(T) for e in started), "requests did not start"
        time.sleep(1.0)  # the plain answers' requests reach the engine
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(GRACEFUL + 5)
        exited = time.monotonic() - t0
        for t in threads:
            t.join(T)
        logs = server.logs()
    assert code == 0, logs[-3000:]
    assert exited < GRACEFUL, f"exited {exited:.1f}s after SIGTERM\n{logs[-3000:]}"
    for i, res in enumerate(results):
        assert isinstance(res, tuple), f"request {i}: {res}\n{logs[-3000:]}"
    for status, payloads in results[:12]:  # finished normally, whole
        assert status == 200 and payloads[-1] == "[DONE]"
        last = json.loads(payloads[-2])
        assert "choices" in last, (payloads[-3:], logs[-2000:])
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
    for status, payloads in results[12:14]:  # cut short: text so far, then an error event, then the end
        assert status == 200 and payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == 503 and error["type"] == "unhealthy" and "shutting down" in error["message"]
        assert any(json.loads(p).get("choices") for p in payloads[:-2])
    for status, body in results[14:]:
        assert status == 503 and body["error"]["type"] == "unhealthy" and "shutting down" in body["error"]["message"]
    assert "(0 still in flight, 4 cut short); exiting" in logs, logs[-3000:]
    print(f"SIGTERM with 16 in flight: 12 finished, 4 cut short, exit {exited:.1f}s after SIGTERM")


def test_sigterm_while_loading_exits_at_once():
    with running_server({}, wait=False) as server:
        server.wait_listening(timeout=60)
        assert server.ping() == 503  # still loading
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(15)
        exited = time.monotonic() - t0
        logs = server.logs()
    assert "SIGTERM while the model loads: exiting now" in logs, logs[-3000:]
    assert code == 0 and exited < 5, f"exit {code} after {exited:.1f}s\n{logs[-3000:]}"
    print(f"SIGTERM while loading: exit {exited:.1f}s after it")
