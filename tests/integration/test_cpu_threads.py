"""Where the worker's threads run on a machine without GPUs (container/gunicorn.conf.py): the engine's
OpenMP team one thread per core, everything else (the gevent hub first) on any core; and
OMP_PROC_BIND=false leaves every thread free."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import requests

from bench.http_bench import thread_cpu
from bench.load import worker_pid
from tests.server import NO_EOS, running_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to place"),
              pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="pinning is for machines without GPUs")]
CHAT = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32, "temperature": 0,
        "logit_bias": NO_EOS}


def affinities(pid: int) -> dict[int, set[int]]:
    """The CPUs each thread of `pid` may run on, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        status = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        cpus: set[int] = set()
        for part in status["Cpus_allowed_list"].strip().split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        out[int(task.name)] = cpus
    return out


def busiest_during_a_generation(server) -> tuple[int, dict[int, tuple[set[int], float]]]:
    """(the worker's pid, each of its threads' CPUs and CPU seconds spent on one 32-token generation)."""
    pid = worker_pid(server)
    before = thread_cpu(pid)
    r = requests.post(server.invocations, json=CHAT, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32, r.text
    used = {tid: cpu - before.get(tid, 0.0) for tid, cpu in thread_cpu(pid).items()}
    return pid, {tid: (cpus, used.get(tid, 0.0)) for tid, cpus in affinities(pid).items()}


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
