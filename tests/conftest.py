"""Session-scoped real servers, one per dispatch configuration, shared by every suite.

Each fixture starts `container/serve` (gunicorn + one gevent worker + SmolLM2) once per test session,
the first time a test asks for it, and SIGTERMs it at the end. Reuse them instead of starting your
own: every server costs a model load (10-60 s on this machine).

- `auto_server`: OAI_ENABLED unset (dispatch on the body), default limits, MAX_TOTAL_TOKENS=1024, and
  DTYPE=float32 on every machine: the README's examples (greedy text and logprobs) were printed in
  float32, and a CPU with native bf16 would otherwise compute in bfloat16, whose greedy text can part
  from float32's after a few tokens. The other servers take the machine's default dtype.
- `openai_server`: OAI_ENABLED=true, MAX_CONCURRENT_REQUESTS=6 (a test checks the 429 there), MAX_BEST_OF=3
  (tests ask for `n: 3`).
- `generate_server`: OAI_ENABLED=false, MAX_INPUT_TOKENS=48, MAX_TOTAL_TOKENS=64, PAYLOAD_LIMIT=65536
  (small limits so that the length and size errors are cheap to reach).
"""

from __future__ import annotations

import pytest

from tests.server import Server, running_server

AUTO_ENV = {"MAX_INPUT_TOKENS": "1000", "MAX_TOTAL_TOKENS": "1024", "DTYPE": "float32"}
OPENAI_ENV = {"OAI_ENABLED": "true", "MAX_CONCURRENT_REQUESTS": "6", "MAX_BEST_OF": "3"}
GENERATE_ENV = {"OAI_ENABLED": "false", "MAX_INPUT_TOKENS": "48", "MAX_TOTAL_TOKENS": "64", "PAYLOAD_LIMIT": "65536"}


@pytest.fixture(scope="session")
def auto_server() -> Server:
    with running_server(AUTO_ENV) as srv:
        yield srv


@pytest.fixture(scope="session")
def openai_server() -> Server:
    with running_server(OPENAI_ENV) as srv:
        yield srv


@pytest.fixture(scope="session")
def generate_server() -> Server:
    with running_server(GENERATE_ENV) as srv:
        yield srv
