"""Durable, atomic storage of received DICOM instances.

Layout: ``<storage_dir>/<study_uid>/<series_uid>/<sop_uid>.dcm`` (the database
file may sit in ``storage_dir`` too; UIDs are digits and dots, so they never
collide with it). The path recorded in the database is relative to
``storage_dir``, so ``storage_dir / record.path`` is always the file.

A file is written to a temporary name in its final directory, flushed, fsynced,
renamed over the final name and the directory is fsynced, so after ``write``
returns the instance survives a power cut and a reader never sees half a file.
Concurrent writers into one directory share a directory fsync: one that starts
after a writer's rename covers that rename too (see ``DirectorySync``). The
receiver writes with ``sync=False`` instead: its ingest journal already holds the
instance durably, and a journal checkpoint makes many files and their directories
durable at once (``sync_files``; daemon/ingest_journal.py).
Writing the same SOP Instance UID again replaces the file atomically, which makes
a re-send idempotent. One process writes a storage tree (the SCP); a temporary
file left by a crash is replaced when its instance is sent again, and goes with
its study at retention.

Crash debris is swept (``sweep_debris``, at start and hourly): temporary files
older than TEMP_GRACE_S, and instance files that no database row points at once
they are older than ORPHAN_GRACE_S (a crash between the write and the row, an
instance moved to another study, a purge that could not remove everything).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import cast

from headscreen.durable import fsync_directory, write_synced
from headscreen.errors import InputRejected, TransientError

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

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes, *,
              sync: bool | None = None, space_checked: bool = False) -> StoredInstance:
        """Store ``data`` (a whole Part 10 file) atomically and, with ``sync`` (default:
        the store's ``durable``), durably: the file and its directory are fsynced.
        ``sync=False`` is for a caller that holds a durable copy elsewhere (the ingest
        journal) and makes the file durable later (``sync_files``).

        Raises ``InvalidUid`` for a UID that cannot be a file name, ``StorageFull``
        before touching the disk when space is short (unless the caller has just
        checked), ``OSError`` on write failure (the temporary file is removed).
        """
        sync = self.durable if sync is None else sync
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        if not space_checked:
            self.check_space(len(data))
        final = self.root.joinpath(*relative.parts)
        # One temporary name per SOP instance: a re-send after a crash reuses (and so
        # removes) the temporary file the crash left behind.
        tmp = final.parent / f".{final.name}.tmp"
        with self._sop_locks[hash(final.name) % len(self._sop_locks)]:
            self._ensure_dir(final.parent)
            try:
                try:
                    write_synced(tmp, data, sync)
                except FileNotFoundError:
                    # The directory was removed (retention clean-up) since we cached it.
                    self._forget_dir(final.parent)
                    self._ensure_dir(final.parent)
                    write_synced(tmp, data, sync)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        if sync:
            # Outside the SOP lock: writers of other SOPs into this directory share the fsync.
            self._dir_sync(final.parent).sync()
        return StoredInstance(path=final, relative_path=relative.as_posix(), size_bytes=len(data))

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
            if self.durable and missing:
                # A new directory entry is durable only once its parent is fsynced. Every
                # level up to the root: the debris sweep may have removed an idle parent
                # after we looked, and mkdir(parents=True) then made it again.
                current = directory
                while current != self.root:
                    current = current.parent
                    fsync_directory(current)
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
            fsync_directory(self.directory)
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


def sync_files(root: Path, files: Iterable[Path]) -> None:
    """Make files written without ``sync`` durable, with their directory entries.

    On Linux one syncfs(2) of the filesystem flushes them all at once (and whatever
    else is dirty there); elsewhere each file is fsynced. A file gone meanwhile (a
    re-send renamed a new copy over it, a purge) is skipped: its replacement is
    covered by its own writer.
    """
    files = list(files)
    if not files:
        return
    if not _syncfs(root):
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in sorted({path.parent for path in files}):
        try:
            fsync_directory(directory)
        except FileNotFoundError:
            continue


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return cast(Callable[[int], int], function)


_SYNCFS = _load_syncfs()


def _syncfs(root: Path) -> bool:
    """syncfs(2) of the filesystem holding ``root``; False where there is none."""
    if _SYNCFS is None:
        return False
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), str(root))
    finally:
        os.close(fd)
    return True


# --- crash debris -----------------------------------------------------------------------------

# A temporary file exists only while its write runs (seconds); one older than this
# was left by a crash or a failed write.
TEMP_GRACE_S = 15 * 60.0
# The receiver writes, fsyncs, records the row and only then acknowledges, and the
# row follows the write within seconds; an instance file this old with no row was
# never acknowledged, or lost its row to a move or a purge.
ORPHAN_GRACE_S = 60 * 60.0
_TEMP_SUFFIX = ".dcm.tmp"
# Where the sweep holds a file while it checks that no writer replaced it.
_HOLD_SUFFIX = ".dcm.sweep"
# Files checked against the database per query.
_SWEEP_CHUNK = 500


@dataclass
class DebrisCount:
    """What one sweep did (counts only: paths hold UIDs)."""

    temp_removed: int = 0
    orphans_removed: int = 0
    restored: int = 0  # files an interrupted sweep was holding, put back
    dirs_removed: int = 0
    young_kept: int = 0  # temporary files within their grace period
    errors: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.temp_removed or self.orphans_removed or self.restored or self.dirs_removed or self.errors)


@dataclass
class _Sweep:
    root: Path
    recorded: Callable[[list[str]], set[str]]
    now: float
    temp_grace_s: float
    orphan_grace_s: float
    count: DebrisCount = field(default_factory=DebrisCount)
    # Old instance files to check against the database: relative path -> (file, stat).
    pending: dict[str, tuple[Path, os.stat_result]] = field(default_factory=dict)
    # Directories idle for the orphan grace period before the sweep: emptied, they go.
    idle_dirs: list[Path] = field(default_factory=list)


def sweep_debris(
    root: Path,
    recorded: Callable[[list[str]], set[str]],
    *,
    now: float | None = None,
    temp_grace_s: float = TEMP_GRACE_S,
    orphan_grace_s: float = ORPHAN_GRACE_S,
) -> DebrisCount:
    """Remove what crashes leave below ``root``; safe while the receiver writes.

    Only the instance layout is touched (``<uid>/<uid>/<uid>.dcm`` and its dot files);
    the database file, results and anything else stay. ``recorded(paths)`` returns
    those relative paths that a database row points at; when it raises, the sweep
    stops and nothing more is removed. An orphan is removed only if it is still the
    file seen before that check (moved aside, compared, then deleted), so a copy a
    writer renamed over it meanwhile, whose row is about to be committed, stays.
    """
    sweep = _Sweep(Path(root), recorded, time.time() if now is None else now, temp_grace_s, orphan_grace_s)
    for study_dir, study_stat in _uid_dirs(sweep.root):
        for series_dir, series_stat in _uid_dirs(study_dir):
            if sweep.now - series_stat.st_mtime >= orphan_grace_s:
                sweep.idle_dirs.append(series_dir)
            _sweep_series(sweep, series_dir)
        if sweep.now - study_stat.st_mtime >= orphan_grace_s:
            sweep.idle_dirs.append(study_dir)
    _check_pending(sweep)
    for directory in sweep.idle_dirs:  # series before their study
        try:
            directory.rmdir()
            sweep.count.dirs_removed += 1
        except OSError:
            pass  # not empty (or gone): in use, or still holding recorded files
    fields = {"action": "storage_sweep", **asdict(sweep.count)}
    if sweep.count.changed:
        logger.info("storage debris swept", extra=fields)
    else:
        logger.debug("storage debris swept", extra=fields)
    return sweep.count


def _uid_dirs(parent: Path) -> Iterator[tuple[Path, os.stat_result]]:
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if _is_uid(entry.name) and entry.is_dir(follow_symlinks=False):
            try:
                yield Path(entry.path), entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue


def _is_uid(text: str) -> bool:
    return len(text) <= _UID_MAX_LEN and _UID_PATTERN.match(text) is not None


def _sweep_series(sweep: _Sweep, series_dir: Path) -> None:
    try:
        entries = sorted(os.scandir(series_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        name = entry.name
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            seen = entry.stat(follow_symlinks=False)
            if name.startswith(".") and name.endswith(_TEMP_SUFFIX) and _is_uid(name[1:-len(_TEMP_SUFFIX)]):
                _sweep_temp(sweep, Path(entry.path), seen)
            elif name.startswith(".") and name.endswith(_HOLD_SUFFIX) and _is_uid(name[1:-len(_HOLD_SUFFIX)]):
                _sweep_held(sweep, Path(entry.path), seen)
            elif name.endswith(".dcm") and _is_uid(name[:-len(".dcm")]):
                if sweep.now - seen.st_mtime >= sweep.orphan_grace_s:
                    relative = Path(entry.path).relative_to(sweep.root).as_posix()
                    sweep.pending[relative] = (Path(entry.path), seen)
                    if len(sweep.pending) >= _SWEEP_CHUNK:
                        _check_pending(sweep)
        except FileNotFoundError:
            continue  # removed meanwhile (a retention purge)
        except OSError:
            sweep.count.errors += 1
            logger.warning("storage sweep could not handle a file", exc_info=True,
                           extra={"action": "storage_sweep_error"})


def _sweep_temp(sweep: _Sweep, path: Path, seen: os.stat_result) -> None:
    if sweep.now - seen.st_mtime < sweep.temp_grace_s:
        sweep.count.young_kept += 1
        return
    # A re-send of this SOP could reopen the name in the instant before the unlink;
    # that write then fails and is answered as failed (the PACS sends again), so no
    # acknowledged instance can be lost here.
    path.unlink()
    sweep.count.temp_removed += 1


def _sweep_held(sweep: _Sweep, hold: Path, seen: os.stat_result) -> None:
    """A file an interrupted sweep moved aside: put back if its row points at it."""
    # A rename sets ctime, not mtime: ctime says when the hold began.
    if sweep.now - seen.st_ctime < sweep.temp_grace_s:
        sweep.count.young_kept += 1
        return
    final = hold.with_name(hold.name[1:-len(_HOLD_SUFFIX)] + ".dcm")
    relative = final.relative_to(sweep.root).as_posix()
    if not final.exists() and sweep.recorded([relative]):
        _put_back(hold, final)
        sweep.count.restored += 1
        return
    hold.unlink()
    sweep.count.orphans_removed += 1


def _check_pending(sweep: _Sweep) -> None:
    pending, sweep.pending = sweep.pending, {}
    if not pending:
        return
    recorded = sweep.recorded(list(pending))
    for relative, (path, seen) in pending.items():
        if relative in recorded:
            continue
        try:
            if _remove_unless_replaced(path, seen):
                sweep.count.orphans_removed += 1
        except FileNotFoundError:
            continue
        except OSError:
            sweep.count.errors += 1
            logger.warning("storage sweep could not remove a file", exc_info=True,
                           extra={"action": "storage_sweep_error"})


def _remove_unless_replaced(path: Path, seen: os.stat_result) -> bool:
    """Delete ``path`` if it is still the file ``seen``; True when deleted.

    Moved aside first (rename is atomic), so a writer renaming a new copy in lands
    beside it; a copy that arrived between the look and the move is put back.
    """
    hold = path.with_name(f".{path.name[:-len('.dcm')]}{_HOLD_SUFFIX}")
    try:
        os.rename(path, hold)
    except FileNotFoundError:
        return False
    held = os.stat(hold)
    if (held.st_dev, held.st_ino, held.st_mtime_ns) == (seen.st_dev, seen.st_ino, seen.st_mtime_ns):
        hold.unlink()
        return True
    _put_back(hold, path)
    return False


def _put_back(hold: Path, path: Path) -> None:
    try:
        os.link(hold, path)  # never over a newer copy that landed meanwhile
    except FileExistsError:
        pass
    else:
        fsync_directory(path.parent)
    hold.unlink()
