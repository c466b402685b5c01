"""Group commit for rows arriving on concurrent threads (the receiver's associations):
one transaction, so one fsync of the database journal, per batch. An item is whatever
the commit callbacks take: an InstanceRecord, or a record with its bytes (the
PostgreSQL storage backend)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from headscreen.db.types import RecordOutcome

logger = logging.getLogger(__name__)


Item = TypeVar("Item")


class _Pending(Generic[Item]):
    __slots__ = ("record", "wake", "outcome", "error", "lead")

    def __init__(self, record: Item) -> None:
        self.record = record
        self.wake = threading.Event()  # set when the row is settled or this waiter must lead
        self.outcome: RecordOutcome | None = None
        self.error: BaseException | None = None
        self.lead = False

    def result(self) -> RecordOutcome:
        if self.error is not None:
            raise self.error
        if self.outcome is None:
            raise RuntimeError("group commit finished without an outcome")
        return self.outcome


class GroupCommit(Generic[Item]):
    """Group commit for instance rows arriving on concurrent associations.

    Each handler submits its row and blocks until that row is committed. The first
    handler to find no commit running leads: it commits everything queued so far
    in one go and hands the lead to the oldest waiter if more arrived meanwhile.
    A lone association is never delayed; concurrent ones share one commit (and one
    fsync of the database journal) when the database offers a batch call. A failed
    batch is retried row by row, so one bad row fails only its own C-STORE.
    """

    def __init__(self, commit: Callable[[list[Item]], list[RecordOutcome]],
                 commit_one: Callable[[Item], RecordOutcome], max_batch: int = 32) -> None:
        self._commit = commit
        self._commit_one = commit_one
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Pending[Item]] = []
        self._leading = False

    def submit(self, record: Item) -> RecordOutcome:
        pending = _Pending(record)
        with self._lock:
            self._queue.append(pending)
            if not self._leading:
                self._leading = True
                pending.lead = True
        if not pending.lead:
            pending.wake.wait()
        if pending.lead:
            # A leader is always the oldest queued row, so its own row is in its batch.
            self._lead_one_batch()
        return pending.result()

    def _lead_one_batch(self) -> None:
        with self._lock:
            batch = self._queue[:self._max_batch]
            del self._queue[:self._max_batch]
        try:
            self._settle(batch)
        finally:
            with self._lock:
                if self._queue:
                    successor = self._queue[0]
                    successor.lead = True
                    successor.wake.set()
                else:
                    self._leading = False

    def _settle(self, batch: list[_Pending[Item]]) -> None:
        try:
            outcomes = self._commit([p.record for p in batch])
        except Exception:
            if len(batch) == 1:
                self._settle_one(batch[0])
                return
            logger.warning("batch commit failed; committing rows one by one",
                           extra={"action": "group_commit_fallback", "rows": len(batch)}, exc_info=True)
            for pending in batch:
                self._settle_one(pending)
            return
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.outcome = outcome
            pending.wake.set()

    def _settle_one(self, pending: _Pending[Item]) -> None:
        try:
            pending.outcome = self._commit_one(pending.record)
        except BaseException as exc:  # handed to the submitting handler, which answers 0xA701
            pending.error = exc
        pending.wake.set()
