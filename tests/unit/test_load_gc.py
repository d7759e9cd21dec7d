"""The model loads with Python's cyclic garbage collector paused, and what it built ends up frozen
(serve/service.py, `collector_paused`): a full collection over a loading model's millions of objects
holds the GIL for 300-350 ms, a stall of the gevent hub and so of /ping."""

from __future__ import annotations

import gc

import pytest

from serve.config import Settings
from serve.service import ModelService, collector_paused


@pytest.fixture
def collections():
    runs: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            runs.append(info["generation"])

    gc.callbacks.append(record)
    try:
        yield runs
    finally:
        gc.callbacks.remove(record)
        gc.unfreeze()  # the other tests' objects back in the collector's generations


def test_no_collection_runs_during_the_load_and_what_it_built_is_frozen(collections):
    frozen = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
        built = [[i] for i in range(300_000)]  # tracked containers, far past every generation's threshold
    assert collections == [] and gc.isenabled()
    assert gc.get_freeze_count() >= frozen + len(built)
    more = [[i] for i in range(300_000)]  # the collector runs again afterwards
    assert collections and more


def test_a_failed_load_turns_the_collector_back_on(collections):
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("no model")
    assert gc.isenabled()


def test_the_service_loads_with_the_collector_paused(monkeypatch, collections):
    seen: list[bool] = []
    monkeypatch.setattr(ModelService, "load", lambda self: seen.append(gc.isenabled()))
    ModelService(Settings.from_env({}))._load_safely()
    assert seen == [False] and gc.isenabled()
