"""Where instance and result bytes live: files below storage_dir, or rows of PostgreSQL.

Every reader and writer of instance and result bytes goes through a BlobStore chosen by
the `storage_backend` setting. Each stored object has a key: the path its database row
records, relative to the storage root (`<study>/<series>/<sop>.dcm` for an instance,
`results/<study>/job-<id>-attempt-<n>/<name>.dcm` for a result object; result rows
written before these keys hold absolute paths, which both backends still read).

- `filesystem`: the key is a file below storage_dir (daemon/storage.py writes received
  instances; the pipeline writes result files in place). Nothing is copied: a reader gets
  the path itself, as before. A worker on another machine needs storage_dir on a shared
  mount.
- `postgresql`: the key is a row of `stored_blobs` (db/blobs.py). The receiver commits an
  instance's bytes in the transaction of its row, a worker its result objects' bytes in
  the transaction of its result (db.jobs.finish_job), so no machine needs a shared
  filesystem. Readers that want files (the pipeline reads headers first and pixels
  later; delivery sends files) get a local copy in a scratch folder below their own
  storage_dir, removed when they are done (`Scratch`). A key whose bytes are not in the
  database is read from its file when one is there (storage switched from `filesystem`).

A key with no bytes anywhere is storage trouble, never "no images": `local_paths` and
`read_bytes` raise TransientError (the job is retried, then fails loudly).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.config import Settings
from headscreen.daemon.storage import ORPHAN_GRACE_S
from headscreen.db import api
from headscreen.db import blobs as db_blobs
from headscreen.db.types import JobOutcome, OutputObject
from headscreen.errors import TransientError

logger = logging.getLogger(__name__)

# Below storage_dir; never a UID, so the debris sweep leaves it alone.
SCRATCH_DIR = ".scratch"
# A scratch folder untouched this long was left by a crash (a job or a delivery takes minutes).
SCRATCH_GRACE_S = 6 * 3600.0


def result_prefix(study_uid: str, job_id: int, attempt: int) -> str:
    """The key prefix (folder) of one job attempt's result objects."""
    return f"results/{study_uid}/job-{job_id}-attempt-{attempt}"


class Scratch:
    """A private folder below `<root>/.scratch`, made on first use and removed on close."""

    def __init__(self, root: Path, tag: str) -> None:
        self._parent = Path(root) / SCRATCH_DIR
        self._tag = tag
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._parent.mkdir(parents=True, exist_ok=True)
            self._path = Path(tempfile.mkdtemp(prefix=f"{self._tag}-", dir=self._parent))
        return self._path

    def close(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def sweep_scratch(root: Path, older_than_s: float = SCRATCH_GRACE_S, now: float | None = None) -> int:
    """Remove scratch folders a crash left (untouched for `older_than_s`); how many."""
    parent = Path(root) / SCRATCH_DIR
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False) and now - entry.stat().st_mtime >= older_than_s:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


class BlobStore(ABC):
    """The bytes of instances and result objects, by key (see the module docstring)."""

    name: str
    #: The receiver commits instance bytes with their rows (else it writes files).
    in_database: bool

    def __init__(self, root: Path, sessions: sessionmaker[Session]) -> None:
        self.root = Path(root)
        self.sessions = sessions

    #: Where the bytes are, for messages.
    where: str

    @abstractmethod
    def available(self, keys: Sequence[str], scratch: Scratch) -> dict[str, Path]:
        """A readable local file for each of `keys` whose bytes are there; the others are left out."""

    def local_paths(self, keys: Sequence[str], scratch: Scratch) -> list[Path]:
        """A readable local file for each key, in order; TransientError when any is missing."""
        found = self.available(keys, scratch)
        lost = len({key for key in keys if key not in found})
        if lost:
            # Counts only: keys hold UIDs.
            raise TransientError(f"{lost} of {len(set(keys))} stored objects missing from {self.where}; "
                                 "storage not reachable?")
        return [found[key] for key in keys]

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """One object's bytes (TransientError when missing)."""

    @abstractmethod
    def result_folder(self, prefix: str, scratch: Scratch) -> Path:
        """Where a job writes the result files of `prefix` (result_prefix)."""

    @abstractmethod
    def keep_results(self, outcome: JobOutcome, prefix: str,
                     extra: Sequence[OutputObject] = ()) -> tuple[JobOutcome, list[OutputObject],
                                                                  list[tuple[str, bytes]]]:
        """What finish_job records: the outcome and the `extra` objects (a rejection note)
        with the paths to record, and the bytes to store with them."""

    @abstractmethod
    def purge_study(self, study_id: int, study_uid: str) -> None:
        """Retention: delete a study's received instances (rows and bytes)."""

    @abstractmethod
    def sweep(self) -> int:
        """Remove what crashes and moved instances leave beside the instance files (those
        are daemon.storage.sweep_debris's): old scratch folders, orphaned bytes; how many
        stored objects went."""


class FilesystemStore(BlobStore):
    """Files below storage_dir (today's layout; daemon/storage.py)."""

    name = "filesystem"
    in_database = False
    where = "storage_dir"

    def available(self, keys: Sequence[str], scratch: Scratch) -> dict[str, Path]:
        paths = {key: self.root / key for key in keys}
        return {key: path for key, path in paths.items() if path.is_file()}

    def local_paths(self, keys: Sequence[str], scratch: Scratch) -> list[Path]:
        # The files themselves, unchecked: a worker's reads turn a missing or unreadable file
        # into a TransientError (daemon.pipeline), and a stat each would only cost on a share.
        return [self.root / key for key in keys]

    def read_bytes(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except OSError as exc:
            raise TransientError(f"stored object unreadable ({type(exc).__name__}); storage not reachable?") \
                from None

    def result_folder(self, prefix: str, scratch: Scratch) -> Path:
        return self.root / prefix

    def keep_results(self, outcome: JobOutcome, prefix: str,
                     extra: Sequence[OutputObject] = ()) -> tuple[JobOutcome, list[OutputObject],
                                                                  list[tuple[str, bytes]]]:
        # Written in place and durable already (daemon.pipeline); recorded by key, so a machine
        # that mounts the storage elsewhere finds them too.
        objects = [_keyed(obj, prefix) for obj in outcome.objects]
        return dataclasses.replace(outcome, objects=objects), [_keyed(obj, prefix) for obj in extra], []

    def purge_study(self, study_id: int, study_uid: str) -> None:
        shutil.rmtree(self.root / study_uid, ignore_errors=True)
        with self.sessions() as session:
            api.mark_purged(session, study_id)

    def sweep(self) -> int:
        sweep_scratch(self.root)
        return 0


class PostgresStore(BlobStore):
    """Rows of `stored_blobs` (db/blobs.py); local copies in scratch folders."""

    name = "postgresql"
    in_database = True
    where = "the database"

    def available(self, keys: Sequence[str], scratch: Scratch) -> dict[str, Path]:
        wanted = list(dict.fromkeys(keys))
        paths: dict[str, Path] = {}
        with self.sessions() as session:
            for key, data in db_blobs.read(session, wanted):
                path = scratch.path / _relative(key)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "wb") as stream:
                        stream.write(data)
                except OSError as exc:  # this machine's disk (full?): retried, maybe elsewhere
                    why = exc.strerror or type(exc).__name__
                    raise TransientError(f"local copy below storage_dir failed ({why})") from None
                paths[key] = path
        for key in wanted:
            legacy = self.root / key  # written before the switch from the filesystem backend
            if key not in paths and legacy.is_file():
                paths[key] = legacy
        return paths

    def read_bytes(self, key: str) -> bytes:
        with self.sessions() as session:
            found = dict(db_blobs.read(session, [key]))
        if key in found:
            return found[key]
        try:
            return (self.root / key).read_bytes()
        except OSError:
            raise TransientError("stored object missing from the database; storage not reachable?") from None

    def result_folder(self, prefix: str, scratch: Scratch) -> Path:
        return scratch.path / prefix

    def keep_results(self, outcome: JobOutcome, prefix: str,
                     extra: Sequence[OutputObject] = ()) -> tuple[JobOutcome, list[OutputObject],
                                                                  list[tuple[str, bytes]]]:
        stored: list[tuple[str, bytes]] = []

        def keyed(obj: OutputObject) -> OutputObject:
            try:
                data = Path(obj.path).read_bytes()
            except OSError as exc:
                raise TransientError(f"result file unreadable in scratch ({type(exc).__name__})") from None
            kept = _keyed(obj, prefix)
            stored.append((kept.path, data))
            return kept

        objects = [keyed(obj) for obj in outcome.objects]
        others = [keyed(obj) for obj in extra]
        return dataclasses.replace(outcome, objects=objects), others, stored

    def purge_study(self, study_id: int, study_uid: str) -> None:
        with self.sessions() as session:
            api.mark_purged(session, study_id, with_blobs=True)
        shutil.rmtree(self.root / study_uid, ignore_errors=True)  # files from before a switch of backend

    def sweep(self) -> int:
        cutoff = datetime.now(UTC) - timedelta(seconds=ORPHAN_GRACE_S)
        with self.sessions() as session:
            removed = db_blobs.sweep_orphans(session, cutoff)
        if removed:
            logger.info("orphaned stored objects removed", extra={"action": "blob_sweep", "removed": removed})
        sweep_scratch(self.root)
        return removed


def _keyed(obj: OutputObject, prefix: str) -> OutputObject:
    """A result object as recorded: its key instead of the file the pipeline wrote."""
    return dataclasses.replace(obj, path=f"{prefix}/{Path(obj.path).name}")


def _relative(key: str) -> PurePosixPath:
    """A key as a path below a scratch folder; one that could climb out is refused."""
    path = PurePosixPath(key.lstrip("/"))
    if ".." in path.parts or not path.parts:
        raise TransientError("a stored object's key is not a relative path")
    return path


def open_store(settings: Settings, sessions: sessionmaker[Session]) -> BlobStore:
    """The configured backend on this machine's storage_dir."""
    if settings.storage_backend == "postgresql":
        return PostgresStore(settings.storage_dir, sessions)
    return FilesystemStore(settings.storage_dir, sessions)
