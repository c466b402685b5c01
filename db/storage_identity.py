"""The storage root's identity as the database records it (daemon/storage_probe.py)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from headscreen.db.engine import write_transaction
from headscreen.db.models import StorageIdentity
from headscreen.db.txn import clock, end_read, insert_ignore

_ROW_ID = 1  # one storage root per database


def recorded_storage_id(session: Session) -> str | None:
    """The UUID recorded for the storage root, or None before `serve` first ran (read-only)."""
    value = session.scalar(select(StorageIdentity.storage_id).where(StorageIdentity.id == _ROW_ID))
    end_read(session)
    return value


def record_storage_id(session: Session, storage_id: str, now: datetime | None = None) -> str:
    """Record `storage_id` unless one is recorded already; returns the one recorded (the
    first writer wins when two receivers start at once)."""
    now = clock(now)
    with write_transaction(session):
        insert_ignore(session, StorageIdentity, {"id": _ROW_ID, "storage_id": storage_id, "created_at": now},
                      conflict=["id"])
        recorded = session.scalar(select(StorageIdentity.storage_id).where(StorageIdentity.id == _ROW_ID))
    assert recorded is not None  # inserted, or there before
    return recorded
