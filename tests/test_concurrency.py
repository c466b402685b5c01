"""imaging.concurrency: independent steps side by side, results in task order."""

from __future__ import annotations

import threading

import pytest

from headscreen.imaging import concurrency


def test_side_by_side_runs_the_tasks_at_once_and_keeps_their_order():
    # Each task waits for the other: one after another, the barrier would time out.
    barrier = threading.Barrier(2, timeout=60)

    def task(value: str):
        return lambda: (barrier.wait(), value)[1]

    assert concurrency.side_by_side([task("first"), task("second")], 2) == ["first", "second"]


def test_one_at_a_time_runs_in_order_on_the_calling_thread():
    seen: list[tuple[int, str]] = []

    def task(value: str):
        return lambda: seen.append((threading.get_ident(), value)) or value

    assert concurrency.side_by_side([task("a"), task("b"), task("c")], 1) == ["a", "b", "c"]
    assert seen == [(threading.get_ident(), "a"), (threading.get_ident(), "b"), (threading.get_ident(), "c")]


def test_a_failing_task_raises_to_the_caller():
    def fails() -> str:
        raise ValueError("no head found")

    with pytest.raises(ValueError, match="no head found"):
        concurrency.side_by_side([lambda: "fine", fails], 2)


def test_both_returns_each_result_and_set_threads_is_at_least_one():
    before = concurrency.threads()
    try:
        concurrency.set_threads(0)
        assert concurrency.threads() == 1
        assert concurrency.both(lambda: 1, lambda: "one") == (1, "one")
    finally:
        concurrency.set_threads(before)


def test_a_worker_runs_steps_side_by_side_only_on_cores_no_other_worker_needs(monkeypatch):
    from headscreen.daemon.config import Settings
    from headscreen.daemon.worker import cores_per_worker

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert cores_per_worker(Settings(allow_any_caller=True, workers=1)) == 2
    assert cores_per_worker(Settings(allow_any_caller=True, workers=2)) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert cores_per_worker(Settings(allow_any_caller=True, workers=3)) == 5


def test_a_worker_caps_malloc_arenas_on_glibc():
    import platform

    from headscreen.daemon.worker import limit_malloc_arenas

    assert limit_malloc_arenas(8) is (platform.libc_ver()[0] == "glibc")
