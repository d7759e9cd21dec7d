"""Gone clients stop costing anything, on a server of its own (SmolLM2, OpenAI mode, MAX_CONCURRENT_REQUESTS=4).

Four non-streaming clients ask for 3,000 tokens (EOS banned) and hang up: the engine is full until
then (a fifth request gets 429), and right after, four fresh requests are all answered, so every slot
and row of the gone clients was freed (before, they generated to the end: minutes on this CPU). A
jsonlines batch runs one line at a time (JSONLINES_CONCURRENCY defaults to a quarter of 4), leaves
room for real-time requests meanwhile, and stops when its client hangs up.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.server import NO_EOS, running_server

pytestmark = pytest.mark.slow
SLOTS = 4
LONG = {"messages": [{"role": "user", "content": "Tell a very long story about a lighthouse."}],
        "max_tokens": 3000, "logit_bias": NO_EOS}
SHORT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
FREED_WITHIN = 30.0  # generous on a busy 2-core machine; generating 3,000 tokens takes minutes here


def hang_up_later(port: int, body: bytes, content_type: str = "application/json") -> socket.socket:
    """Send one request on a raw socket and never read the answer (the caller closes it)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    s.sendall(head + body)
    return s


def post(server, body: dict) -> int:
    return requests.post(server.invocations, json=body, timeout=120).status_code


def first_answer_after(server, deadline: float) -> int:
    """Send SHORT until it is not refused (429); its status (or 429 when the deadline passed)."""
    status = 429
    while status == 429 and time.monotonic() < deadline:
        status = post(server, SHORT)
        if status == 429:
            time.sleep(0.25)
    return status


def all_at_once(server, n: int) -> list[int]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: post(server, SHORT), range(n)))


def test_gone_clients_free_their_rows():
    env = {"OAI_ENABLED": "true", "MAX_CONCURRENT_REQUESTS": str(SLOTS)}
    with running_server(env) as server:
        t0 = time.monotonic()
        assert post(server, SHORT) == 200
        alone = time.monotonic() - t0
        gone = [hang_up_later(server.port, json.dumps(LONG).encode()) for _ in range(SLOTS)]
        time.sleep(1.0)
        assert post(server, SHORT) == 429, "the four long requests should fill the engine"
        for s in gone:
            s.close()
        t0 = time.monotonic()
        status = first_answer_after(server, t0 + FREED_WITHIN)
        waited = time.monotonic() - t0
        assert status == 200, server.logs()[-3000:]
        assert all_at_once(server, SLOTS) == [200] * SLOTS  # every slot is free: no gone request left
        print(f"\nafter 4 plain clients hung up, a fresh request was answered {waited:.1f}s later "
              f"(the same request on the idle server: {alone:.1f}s)")

        lines = "\n".join(json.dumps(LONG) for _ in range(3)).encode()
        batch = hang_up_later(server.port, lines, "application/jsonlines")
        time.sleep(1.0)
        # One line at a time: real-time requests still get in beside the batch.
        assert all_at_once(server, SLOTS - 1) == [200] * (SLOTS - 1)
        batch.close()
        t0 = time.monotonic()
        while time.monotonic() - t0 < FREED_WITHIN and all_at_once(server, SLOTS) != [200] * SLOTS:
            time.sleep(0.25)
        assert all_at_once(server, SLOTS) == [200] * SLOTS, server.logs()[-3000:]
        print(f"after a jsonlines client hung up, the engine was free {time.monotonic() - t0:.1f}s later")
        logs = server.logs()
    assert logs.count("client went away: cancelled") >= SLOTS + 1, logs[-3000:]
