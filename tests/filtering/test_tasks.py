"""How the local task pool starts its workers (filtering/tasks.py, ``start_method``)."""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
import types

import pytest

from filtering.tasks import start_method, task_pool


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)


def _square(x: int) -> int:
    return x * x


def test_a_metadata_only_driver_forks(no_torch):
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    if threading.active_count() > 1:
        pytest.skip("a thread of the test session is running")
    assert start_method() == "fork"


def test_a_driver_that_imported_torch_spawns(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    assert start_method() == "spawn"


def test_a_driver_running_another_thread_spawns(no_torch):
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert start_method() == "spawn"
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_both_start_methods_run_tasks(monkeypatch, method):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    import filtering.tasks as tasks

    monkeypatch.setattr(tasks, "start_method", lambda: method)
    with task_pool(None, 2) as pool:
        assert list(pool.map(_square, range(5))) == [0, 1, 4, 9, 16]
