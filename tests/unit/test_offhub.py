"""The off-hub pool: tokenizing and template rendering on OS threads while the gevent hub serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serve.offhub import OffHub
from serve.protocol import errors

ROOT = Path(__file__).resolve().parents[2]


def test_greenlets_wait_for_the_pool_without_freezing_the_hub_and_errors_come_back_as_raised():
    out = subprocess.run([sys.executable, "-m", "tests.unit.offhub_probe"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert len(set(got["threads"])) == 2 and got["hub_thread"] not in got["threads"], got  # two OS threads
    assert 0.9 < got["seconds"] < 5, got  # 4 x 0.5 s on 2 threads: two rounds
    assert got["ticks"] >= 50, got  # the hub ticked every 10 ms meanwhile
    assert got["error"] == {"status": 422, "type": "validation", "param": "inputs",
                            "message": "Input validation error: `inputs` must have less than 10 tokens"}, got


def test_without_gevent_the_work_runs_in_the_caller():
    pool = OffHub(2)
    assert pool.run(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(errors.ApiError, match="too long"):
        pool.run(lambda: (_ for _ in ()).throw(errors.validation("too long", "inputs")))
