"""Independent imaging steps side by side, the same to the bit as one after another.

Each step runs on one ITK thread (preprocess) whichever Python thread runs it, and
SimpleITK, scipy.ndimage and numpy release the GIL in their heavy loops, so two steps
that share no mutable state give the same result in either order: registration's
hypotheses, contenders and finishes, QC beside the model input. One worker alone on a
2-core machine then finishes a study sooner; a worker that shares the cores with others
is told to run its steps one after another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

_R = TypeVar("_R")
_A = TypeVar("_A")
_B = TypeVar("_B")

_threads = max(1, min(2, os.cpu_count() or 1))


def set_threads(threads: int) -> None:
    """How many steps may run at once in this process (1: one after another)."""
    global _threads
    _threads = max(1, int(threads))


def threads() -> int:
    """How many steps may run at once in this process."""
    return _threads


def side_by_side(tasks: list[Callable[[], _R]], at_once: int | None = None) -> list[_R]:
    """Each task's result, in task order; up to `at_once` (default `threads()`) at a time."""
    at_once = _threads if at_once is None else at_once
    if at_once <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=min(at_once, len(tasks))) as pool:
        return list(pool.map(lambda task: task(), tasks))


def both(first: Callable[[], _A], second: Callable[[], _B], at_once: int | None = None) -> tuple[_A, _B]:
    """`side_by_side` of two tasks that return different types."""
    tasks: list[Callable[[], Any]] = [first, second]
    one, other = side_by_side(tasks, at_once)
    return cast(_A, one), cast(_B, other)
