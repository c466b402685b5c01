"""Is this storage_dir the receiver's storage? The probe a worker runs before its first job.

With the filesystem storage backend a worker reads the instances the receiver wrote, so
on another machine its storage_dir must be the receiver's storage_dir mounted there
(NFS, SMB, CephFS). A worker that opened a local folder instead would find no files and
fail every job it claimed. So the storage root carries an identity: `serve` writes a
UUID to `<storage_dir>/.headscreen-storage-id` once and records the same UUID in the
database (table storage_identity). A worker compares the two at start and refuses to
take jobs when they differ: no marker (a local folder where the mount should be, or the
mount not mounted) or another UUID (another deployment's storage). It exits with status
EXIT_STORAGE_MISMATCH (3) and one log line that says which.

A storage backend that keeps the bytes in the database needs no shared folder, and no probe.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headscreen.errors import HeadscreenError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MARKER_NAME = ".headscreen-storage-id"
# `headscreen worker` (and serve) exit with this status when the storage is not the receiver's.
EXIT_STORAGE_MISMATCH = 3
# How long a worker waits for a receiver that has not yet recorded its storage (a worker
# started before `serve` ever ran, or before the database is up).
RECORD_WAIT_S = 120.0


class StorageMismatch(HeadscreenError):
    """storage_dir is not the storage the database's instances are in; nothing is processed."""


def probe_applies(settings: Any) -> bool:
    """Only the filesystem backend reads instances from storage_dir (the default)."""
    return str(getattr(settings, "storage_backend", "filesystem")) == "filesystem"


def read_marker(storage_dir: Path) -> str | None:
    """The storage root's UUID, or None when it has no marker."""
    path = storage_dir / MARKER_NAME
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageMismatch(f"storage marker {path} cannot be read ({type(exc).__name__})") from None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise StorageMismatch(f"storage marker {path} does not hold a UUID; it was not written by "
                              "headscreen serve") from None


def claim_storage(storage_dir: Path, sessions: sessionmaker[Session]) -> str:
    """For the receiver (`serve`) at start: the storage root's UUID, written to storage_dir
    and recorded in the database the first time. Refuses (StorageMismatch) a storage_dir
    without the marker once the database records one: the instances the database lists
    are elsewhere."""
    from headscreen.db import api
    from headscreen.durable import atomic_write

    marker = read_marker(storage_dir)
    with sessions() as session:
        recorded = api.recorded_storage_id(session)
    if recorded is None:
        if marker is None:
            marker = str(uuid.uuid4())
            atomic_write(storage_dir / MARKER_NAME, f"{marker}\n".encode("ascii"))
            log.info("storage identity written", extra={"action": "storage_id_written", "storage_id": marker})
        with sessions() as session:
            recorded = api.record_storage_id(session, marker)
    _compare(storage_dir, marker, recorded, "serve does not start")
    return recorded


def check_storage(storage_dir: Path, sessions: sessionmaker[Session], wait_s: float = RECORD_WAIT_S,
                  poll_s: float = 2.0) -> str:
    """For a worker at start: the UUID both sides agree on, or StorageMismatch. While the
    database is unreachable or records no storage yet (the receiver has not started), it
    waits up to `wait_s`."""
    recorded = _wait_recorded(sessions, wait_s, poll_s)
    _compare(storage_dir, read_marker(storage_dir), recorded, "this worker takes no jobs")
    return recorded


def _wait_recorded(sessions: sessionmaker[Session], wait_s: float, poll_s: float) -> str:
    # Imported here: the CLI imports this module for its exit code only.
    from sqlalchemy.exc import DBAPIError

    from headscreen.db import api
    from headscreen.privacy import redact_secrets

    deadline = time.monotonic() + wait_s
    reason = "no storage recorded yet"
    while True:
        try:
            with sessions() as session:
                recorded = api.recorded_storage_id(session)
        except DBAPIError as exc:  # unreachable, or not migrated yet (serve migrates)
            first = str(exc.orig or type(exc).__name__).strip().splitlines()[:1]
            reason = redact_secrets(first[0]) if first else type(exc).__name__
            recorded = None
        if recorded is not None:
            return recorded
        if time.monotonic() >= deadline:
            raise StorageMismatch(f"the database records no storage identity after {wait_s:.0f} s ({reason}): "
                                  "start `headscreen serve` (the receiver) against this database first; "
                                  "this worker takes no jobs")
        log.warning("waiting for the receiver to record its storage identity",
                    extra={"action": "storage_id_wait", "reason": reason})
        time.sleep(poll_s)


def _compare(storage_dir: Path, marker: str | None, recorded: str, refusal: str) -> None:
    # No apostrophes: the log filter withholds text between quotes (headscreen.privacy).
    if marker == recorded:
        return
    if marker is None:
        raise StorageMismatch(
            f"storage_dir {storage_dir} is not the storage of the receiver: it has no {MARKER_NAME} (a local "
            f"folder where the shared mount should be, or the mount is not mounted); the instances in the database "
            f"are in storage {recorded}. Mount the storage_dir of the receiver there (or set storage_dir to the "
            f"mount); {refusal} until then")
    raise StorageMismatch(
        f"storage_dir {storage_dir} is another headscreen storage ({marker}); the instances in the database are "
        f"in storage {recorded}. Point storage_dir at the storage of the receiver (or database_url at the "
        f"database of this storage); {refusal} until then")
