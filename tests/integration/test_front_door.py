"""The front door under abuse (issue 12), against the real server: /ping stays fast while clients
send near-limit bodies (their tokenizing and template rendering run off the gevent hub)."""

from __future__ import annotations

import statistics
import threading
import time

import pytest
import requests

from tests.server import running_server

BIG_TEXT = ("The quick brown fox jumps over the lazy dog. " * 140_000)[:6_000_000]  # ~1.3 M tokens, < PAYLOAD_LIMIT
MANY_MESSAGES = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello there " * 40} for i in range(1024)]
SMALL_CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.fixture(scope="module")
def server():
    with running_server({"MAX_INPUT_TOKENS": "4000", "MAX_TOTAL_TOKENS": "4096"}) as srv:
        yield srv


def test_ping_stays_fast_while_clients_send_near_limit_bodies(server):
    """Three clients each send a 6 MB `inputs` (422 once tokenized: over MAX_INPUT_TOKENS), a
    1024-message chat (422, same reason) and a small chat (200), while another thread pings."""
    pings: list[float] = []
    answers: list[tuple[str, int, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def pinger() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    code = s.get(f"{server.url}/ping", timeout=30).status_code
                except requests.RequestException as exc:
                    failures.append(f"ping: {exc!r}")
                    continue
                pings.append(time.monotonic() - started)
                if code != 200:
                    failures.append(f"ping answered {code}")
                time.sleep(0.05)

    def client() -> None:
        bodies = [("generate", {"inputs": BIG_TEXT, "parameters": {"max_new_tokens": 2}}),
                  ("chat", {"messages": MANY_MESSAGES, "max_tokens": 2}),
                  ("small", SMALL_CHAT)]
        with requests.Session() as s:
            for name, body in bodies:
                try:
                    r = s.post(server.invocations, json=body, timeout=300)
                    answers.append((name, r.status_code, r.text[:300]))
                except requests.RequestException as exc:
                    failures.append(f"{name}: {exc!r}")

    ping_thread = threading.Thread(target=pinger)
    ping_thread.start()
    time.sleep(0.5)
    clients = [threading.Thread(target=client) for _ in range(3)]
    started = time.monotonic()
    for t in clients:
        t.start()
    for t in clients:
        t.join(600)
    elapsed = time.monotonic() - started
    stop.set()
    ping_thread.join(60)

    print(f"\n{len(pings)} pings during {elapsed:.1f} s of 3 clients x (6 MB inputs, 1024 messages, small chat): "
          f"p50 {statistics.median(pings) * 1e3:.0f} ms, p99 {percentile(pings, 0.99) * 1e3:.0f} ms, "
          f"max {max(pings) * 1e3:.0f} ms")
    assert not failures, failures
    by_name = {name: [(code, text) for n, code, text in answers if n == name] for name in ("generate", "chat", "small")}
    assert all(len(v) == 3 for v in by_name.values()), answers
    for code, text in by_name["generate"]:
        assert code == 422 and "`inputs` must have less than 4000 tokens" in text, text
    for code, text in by_name["chat"]:
        assert code == 422 and "`messages` must have less than 4000 tokens" in text, text
    for code, text in by_name["small"]:
        assert code == 200 and '"chat.completion"' in text, text
    assert len(pings) >= 10
    assert max(pings) < 1.0, f"slowest ping {max(pings):.2f} s"
