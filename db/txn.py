"""Helpers shared by the state-changing modules: clock, transactions, locks, audit rows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Executable, Select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from headscreen.db.engine import is_postgres
from headscreen.db.models import AuditEvent
from headscreen.db.states import DeliveryState, JobState

logger = logging.getLogger(__name__)


DEFAULT_JOB_MAX_ATTEMPTS = 3
SYSTEM_ACTOR = "system"
ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)
OPEN_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.IN_FLIGHT)
IMAGE_MODALITIES = frozenset({"CT", "MR"})


def utcnow() -> datetime:
    return datetime.now(UTC)


def clock(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    if not isinstance(now, datetime):
        raise TypeError(f"now: expected a datetime, got {type(now).__name__}")
    if now.tzinfo is None:
        raise ValueError("now: must be timezone-aware (UTC)")
    return now


def end_read(session: Session) -> None:
    # Release the read snapshot (SQLite WAL readers otherwise pin old pages).
    session.commit()


def insert_ignore(session: Session, model: type, values: dict[str, Any], conflict: Sequence[str]) -> int | None:
    """INSERT ... ON CONFLICT DO NOTHING; returns the new id, or None when the row existed."""
    table = model.__table__  # type: ignore[attr-defined]
    dialect_insert = postgresql.insert if is_postgres(session) else sqlite.insert
    # Values go in as parameters so the compiled statement is cached across calls.
    stmt = dialect_insert(table).on_conflict_do_nothing(index_elements=list(conflict)).returning(table.c.id)
    return session.execute(stmt, values).scalar_one_or_none()


RowT = TypeVar("RowT", bound=tuple[Any, ...])


def locked(stmt: Select[RowT], skip_locked: bool = False, of: Any = None) -> Select[RowT]:
    """Row-lock for update and refresh the identity map.

    PostgreSQL: FOR NO KEY UPDATE, which does not block the KEY SHARE locks that
    foreign-key inserts take (audit events, results), so those cannot deadlock with
    it. Lock order everywhere: study, then its jobs, then results and deliveries.
    SQLite ignores it; its BEGIN IMMEDIATE already serialises writers.
    """
    return stmt.with_for_update(skip_locked=skip_locked, of=of, key_share=True).execution_options(
        populate_existing=True
    )


def add_audit(
    session: Session,
    actor: str,
    action: str,
    now: datetime,
    study_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    event = AuditEvent(at=now, actor=actor, action=action, study_id=study_id, detail=detail or {})
    session.add(event)
    return event


def execute_counted(session: Session, stmt: Executable) -> int:
    """Execute an UPDATE or DELETE and return how many rows it matched."""
    return cast(CursorResult[Any], session.execute(stmt)).rowcount
