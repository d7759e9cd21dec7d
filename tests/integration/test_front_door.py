"""The front door under abuse (issue 12), against the real server: /ping stays fast while clients
send near-limit bodies (their tokenizing and template rendering run off the gevent hub), and slow
clients (a body trickled or stalled, chunked or not) get a 408 and lose their connection."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import pytest
import requests

from tests.server import running_server

BIG_TEXT = ("The quick brown fox jumps over the lazy dog. " * 140_000)[:6_000_000]  # ~1.3 M tokens, < PAYLOAD_LIMIT
MANY_MESSAGES = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello there " * 40} for i in range(1024)]
SMALL_CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
BODY_READ_TIMEOUT = 3
HEAD = (b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.fixture(scope="module")
def server():
    env = {"MAX_INPUT_TOKENS": "4000", "MAX_TOTAL_TOKENS": "4096", "BODY_READ_TIMEOUT": str(BODY_READ_TIMEOUT)}
    with running_server(env) as srv:
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


# -- slow clients ------------------------------------------------------------------------------------
def connect(server, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends within `timeout`, and whether it then closed the connection."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
        return got, True
    except TimeoutError:
        return got, False
    except ConnectionResetError:
        return got, True


def assert_408(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    error = json.loads(body)  # the server's default API shape (TGI's here: OAI_ENABLED unset)
    assert error["error_type"] == "request_timeout", error
    assert f"BODY_READ_TIMEOUT ({BODY_READ_TIMEOUT} s)" in error["error"], error


@pytest.mark.parametrize("kind", ["stalled", "chunked", "trickled"])
def test_a_body_not_received_in_time_is_a_408_and_the_connection_closes(server, kind):
    started = time.monotonic()
    if kind == "stalled":  # headers and part of the body, then nothing
        sock = connect(server, HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"inputs": "')
    elif kind == "chunked":  # one chunk, then nothing
        sock = connect(server, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b'c\r\n{"inputs": "\r\n')
    else:  # a byte every 0.2 s: the deadline is on the whole body, not between reads
        sock = connect(server, HEAD + b"Content-Length: 1000\r\n\r\n")
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.2):
                try:
                    sock.send(b"a")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
    try:
        answer, closed = read_until_closed(sock, BODY_READ_TIMEOUT + 15)
    finally:
        if kind == "trickled":
            stop.set()
        sock.close()
    elapsed = time.monotonic() - started
    assert_408(answer)
    assert closed, "the connection stayed open after the 408"
    assert BODY_READ_TIMEOUT - 0.5 < elapsed < BODY_READ_TIMEOUT + 10, elapsed


def test_200_slowloris_connections_stop_neither_ping_nor_a_normal_request(server):
    """100 connections stall in their headers, 100 in their body; meanwhile /ping and a request."""
    stalled_heads = [connect(server, HEAD + b"X-Slow: ") for _ in range(100)]
    stalled_bodies = [connect(server, HEAD + b"Content-Length: 500\r\n\r\n{") for _ in range(100)]
    try:
        pings = []
        with requests.Session() as s:
            deadline = time.monotonic() + BODY_READ_TIMEOUT + 2  # across the moment the 100 bodies time out
            while time.monotonic() < deadline:
                started = time.monotonic()
                assert s.get(f"{server.url}/ping", timeout=10).status_code == 200
                pings.append(time.monotonic() - started)
                time.sleep(0.05)
            r = s.post(server.invocations, json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, timeout=60)
        assert r.status_code == 200 and "generated_text" in r.json()[0], r.text
        print(f"\n200 slowloris connections: {len(pings)} pings, p50 {statistics.median(pings) * 1e3:.0f} ms, "
              f"p99 {percentile(pings, 0.99) * 1e3:.0f} ms, max {max(pings) * 1e3:.0f} ms")
        assert max(pings) < 1.0, max(pings)
        for sock in stalled_bodies:  # past the deadline: each got its 408 and lost its connection
            answer, closed = read_until_closed(sock, 10)
            assert_408(answer)
            assert closed
    finally:
        for sock in stalled_heads + stalled_bodies:
            sock.close()
