"""Durable, atomic storage of received DICOM instances.

Layout: ``<storage_dir>/<study_uid>/<series_uid>/<sop_uid>.dcm`` (the database
file may sit in ``storage_dir`` too; UIDs are digits and dots, so they never
collide with it). The path recorded in the database is relative to
``storage_dir``, so ``storage_dir / record.path`` is always the file.

A file is written to a temporary name in its final directory, flushed, fsynced,
renamed over the final name and the directory is fsynced, so after ``write``
returns the instance survives a power cut and a reader never sees half a file.
Concurrent writers into one directory share a directory fsync: one that starts
after a writer's rename covers that rename too (see ``DirectorySync``).
Writing the same SOP Instance UID again replaces the file atomically, which makes
a re-send idempotent. One process writes a storage tree (the SCP); a temporary
file left by a crash is replaced when its instance is sent again, and goes with
its study at retention.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from daemon.errors import InputRejected, TransientError

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
# Digits and dots only, no empty component: nothing in a UID can climb out of the tree.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX_LEN = 64
_KNOWN_DIRS_MAX = 4096
_SOP_LOCK_STRIPES = 64


class InvalidUid(InputRejected):
    """A UID is missing or has characters other than digits and dots."""


class StorageFull(TransientError):
    """Free disk space is below the configured watermark; nothing was written."""


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance landed: the absolute path and the path recorded in the DB."""

    path: Path
    relative_path: str
    size_bytes: int


def check_uid(name: str, value: object) -> str:
    """Return ``value`` as a UID string fit for a file name, or raise ``InvalidUid``."""
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    if not text:
        raise InvalidUid(f"{name} is missing")
    if len(text) > _UID_MAX_LEN or not _UID_PATTERN.match(text):
        raise InvalidUid(f"{name} is not a valid UID (digits and dots, at most 64)")
    return text


def study_directory(storage_dir: Path, study_uid: str) -> Path:
    """Where a study's instances live (what a retention purge removes)."""
    return Path(storage_dir) / check_uid("StudyInstanceUID", study_uid)


class InstanceStore:
    """Writes instances below ``root`` atomically, refusing when the disk is low."""

    def __init__(self, root: Path, min_free_mb: int = 0, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.min_free_bytes = int(min_free_mb) * _MIB
        # durable=False skips fsync; only for throw-away test stores.
        self.durable = durable
        self._known_dirs: OrderedDict[Path, None] = OrderedDict()
        self._dirs_lock = threading.Lock()
        # Two associations may deliver the same SOP instance at once; they share its
        # temporary name, so writes of one SOP are serialised (striped locks).
        self._sop_locks = [threading.Lock() for _ in range(_SOP_LOCK_STRIPES)]
        self._dir_syncs: OrderedDict[Path, DirectorySync] = OrderedDict()
        self._dir_syncs_lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> PurePosixPath:
        """The DB path of an instance (relative to ``root``); validates the UIDs."""
        return PurePosixPath(
            check_uid("StudyInstanceUID", study_uid),
            check_uid("SeriesInstanceUID", series_uid),
            check_uid("SOPInstanceUID", sop_uid) + ".dcm",
        )

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming_bytes: int) -> None:
        """Raise ``StorageFull`` if writing ``incoming_bytes`` would cross the watermark."""
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise StorageFull(
                f"free disk {free // _MIB} MiB minus {incoming_bytes} bytes is below "
                f"the watermark of {self.min_free_bytes // _MIB} MiB"
            )

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredInstance:
        """Store ``data`` (a whole Part 10 file) atomically and durably.

        Raises ``InvalidUid`` for a UID that cannot be a file name, ``StorageFull``
        before touching the disk when space is short, ``OSError`` on write failure
        (the temporary file is removed).
        """
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        self.check_space(len(data))
        final = self.root.joinpath(*relative.parts)
        # One temporary name per SOP instance: a re-send after a crash reuses (and so
        # removes) the temporary file the crash left behind.
        tmp = final.parent / f".{final.name}.tmp"
        with self._sop_locks[hash(final.name) % len(self._sop_locks)]:
            self._ensure_dir(final.parent)
            try:
                try:
                    self._write_file(tmp, data)
                except FileNotFoundError:
                    # The directory was removed (retention clean-up) since we cached it.
                    self._forget_dir(final.parent)
                    self._ensure_dir(final.parent)
                    self._write_file(tmp, data)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        if self.durable:
            # Outside the SOP lock: writers of other SOPs into this directory share the fsync.
            self._dir_sync(final.parent).sync()
        return StoredInstance(path=final, relative_path=relative.as_posix(), size_bytes=len(data))

    def _write_file(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, directory: Path) -> None:
        """Create the study/series directories once and make their entries durable."""
        if directory in self._known_dirs:
            return
        with self._dirs_lock:
            if directory in self._known_dirs:
                return
            missing = []
            current = directory
            while not current.exists() and current != self.root:
                missing.append(current)
                current = current.parent
            directory.mkdir(parents=True, exist_ok=True)
            if self.durable:
                # A new directory entry is durable only once its parent is fsynced.
                for created in missing:
                    _fsync_dir(created.parent)
            self._known_dirs[directory] = None
            if len(self._known_dirs) > _KNOWN_DIRS_MAX:
                self._known_dirs.popitem(last=False)

    def _dir_sync(self, directory: Path) -> DirectorySync:
        with self._dir_syncs_lock:
            sync = self._dir_syncs.get(directory)
            if sync is None:
                # Evicting one in use is harmless: each only vouches for fsyncs it ran itself.
                sync = self._dir_syncs[directory] = DirectorySync(directory)
                if len(self._dir_syncs) > _KNOWN_DIRS_MAX:
                    self._dir_syncs.popitem(last=False)
            else:
                self._dir_syncs.move_to_end(directory)
            return sync

    def _forget_dir(self, directory: Path) -> None:
        with self._dirs_lock:
            self._known_dirs.pop(directory, None)


class DirectorySync:
    """fsync of one directory, shared by the writers that renamed into it meanwhile.

    A writer calls ``sync()`` after its rename and takes a ticket. A directory fsync
    that *starts* after the ticket was taken makes that rename durable; so when an
    fsync is already running, the writer waits for it to end and then lets one
    writer run the next fsync for everyone queued behind it (group commit). A lone
    writer runs its own fsync at once; it never waits for a timer.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cond = threading.Condition()
        self._tickets = 0
        self._covered = 0  # every ticket up to this one is durable
        self._running = False
        self.fsyncs = 0  # how many fsyncs ran (for tests and benchmarks)

    def sync(self) -> None:
        with self._cond:
            self._tickets += 1
            ticket = self._tickets
            while self._covered < ticket and self._running:
                self._cond.wait()
            if self._covered >= ticket:
                return
            self._running = True
            # Every rename that took a ticket so far happened before this fsync starts.
            covers = self._tickets
        try:
            _fsync_dir(self.directory)
        except BaseException:
            with self._cond:
                self._running = False
                self._cond.notify_all()  # a waiter runs its own fsync and meets the error itself
            raise
        with self._cond:
            self._covered = max(self._covered, covers)
            self._running = False
            self.fsyncs += 1
            self._cond.notify_all()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
