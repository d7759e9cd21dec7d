"""Where the worker's threads run on a machine without GPUs (container/gunicorn.conf.py): the engine's
OpenMP team one thread per core, everything else (the gevent hub first) on any core; and
OMP_PROC_BIND=false leaves every thread free."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import requests

from bench.load import worker_pid
from tests.server import NO_EOS, running_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to place"),
              pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="pinning is for machines without GPUs")]
CHAT = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32, "temperature": 0,
        "logit_bias": NO_EOS}


def threads(pid: int) -> dict[int, tuple[set[int], float]]:
    """Each thread of `pid`: (the CPUs it may run on, its CPU seconds so far)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        cpus: set[int] = set()
        for part in status["Cpus_allowed_list"].strip().split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = (cpus, (int(stat[11]) + int(stat[12])) / tick)
    return out


def busiest_during_a_generation(server) -> tuple[int, dict[int, tuple[set[int], float]]]:
    """(the worker's pid, its threads after a 32-token generation, CPU seconds counting that generation only)."""
    pid = worker_pid(server)
    before = threads(pid)
    r = requests.post(server.invocations, json=CHAT, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32, r.text
    after = threads(pid)
    return pid, {tid: (cpus, used - before.get(tid, (cpus, 0.0))[1]) for tid, (cpus, used) in after.items()}


def test_engine_team_is_pinned_one_thread_per_core_and_the_hub_is_not(openai_server):
    everywhere = os.sched_getaffinity(0)
    pid, after = busiest_during_a_generation(openai_server)
    assert after[pid][0] == everywhere  # the gevent hub runs on any core
    busiest = sorted(after.values(), key=lambda t: -t[1])[:2]  # the engine thread and its OpenMP worker
    assert all(len(cpus) == 1 for cpus, _ in busiest), after
    assert busiest[0][0] != busiest[1][0], after  # on two different cores


def test_omp_proc_bind_false_leaves_every_thread_free():
    everywhere = os.sched_getaffinity(0)
    with running_server({"OAI_ENABLED": "true", "OMP_PROC_BIND": "false"}) as server:
        _, after = busiest_during_a_generation(server)
    assert all(cpus == everywhere for cpus, _ in after.values()), after
