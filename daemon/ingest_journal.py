"""The ingest journal: an instance is durable after one fdatasync instead of three fsyncs.

An instance may be acknowledged only once its bytes are durable and it is recorded.
Done directly that costs three syncs in a row per instance (the file, its directory,
the database commit), 43 % of the receiver's wall time. Here the receiver appends the
instance, its bytes and its row, to a journal segment and waits for one fdatasync of
that segment; a sync thread runs them, so associations that append meanwhile share one
(group commit). Once an instance is in the journal, its file is written (temporary
name, rename) and its row committed without waiting for the disk (db.engine
RELAXED_COMMIT), and only then is it acknowledged. So before any acknowledgement:
the journal holds it durably, its file is whole under its recorded path, and its row
is committed. The row's commit starts only after the journal entry is durable, so a
row that survives a crash always has its journal entry.

A checkpoint, off the acknowledgement path, later makes a whole segment's files,
their directories and the database durable at once (one syncfs where the OS has it,
one database flush), then deletes the segment; it runs when a segment is full or
the journal has been idle for a moment, so at rest the journal is empty.

After a crash, `recover` (run by start_receiver before the receiver listens, and so
before serve starts the scheduler and the workers) replays every segment left, in
order: each entry's file is written and fsynced again and its row recorded durably
(idempotent: an instance already recorded is a duplicate), then the segment goes. A
row whose file a power cut lost or truncated therefore gets its bytes back before
anything reads it. An entry torn by the crash was never acknowledged (its fdatasync
had not returned) and ends the replay of its segment.

Entry format: header (magic, record length, data length, CRC-32 of both), the
record as JSON (db.types.InstanceRecord), the Part 10 bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from isal.isal_zlib import crc32  # zlib.crc32's values (journals stay readable both ways), faster

from headscreen.db.types import InstanceRecord
from headscreen.durable import fsync_directory

logger = logging.getLogger(__name__)

_MAGIC = b"HSJ1"
_HEADER = struct.Struct("<4sIQI")  # magic, record length, data length, crc32(record + data)
_RECORD_FIELDS = tuple(f.name for f in fields(InstanceRecord))
_SEGMENT_NAME = re.compile(r"^(\d{12})\.journal$")
SEGMENT_BYTES = 128 * 1024 * 1024
# A segment with no append for this long is checkpointed, so an idle receiver keeps no journal.
IDLE_CHECKPOINT_S = 0.5
_CHECKPOINT_POLL_S = 0.1


class JournalError(OSError):
    """The journal could not make an entry durable (its fdatasync failed)."""


@dataclass(eq=False)
class _Segment:
    seq: int
    path: Path
    fd: int
    size: int = 0
    last_ticket: int = 0
    unsettled: int = 0  # entries appended whose file and row are not settled yet
    files: list[Path] = field(default_factory=list)
    sealed: bool = False
    last_append: float = 0.0


@dataclass(frozen=True, eq=False)
class JournalEntry:
    """One appended instance; the receiver waits on it, then settles it."""

    ticket: int
    segment: _Segment


class IngestJournal:
    """Segments under ``directory``; `append` -> `wait_durable` -> (file, row) -> `settle`.

    ``sync_files(paths)`` makes the files of settled entries durable with their
    directories, ``sync_records()`` every committed row; a checkpoint calls both before
    it deletes a segment.
    """

    def __init__(self, directory: Path, *, sync_files: Callable[[list[Path]], None],
                 sync_records: Callable[[], None], segment_bytes: int = SEGMENT_BYTES,
                 idle_checkpoint_s: float = IDLE_CHECKPOINT_S) -> None:
        self.directory = Path(directory)
        self._sync_files = sync_files
        self._sync_records = sync_records
        self._segment_bytes = segment_bytes
        self._idle_checkpoint_s = idle_checkpoint_s
        self._cond = threading.Condition()
        self._append_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._segments: list[_Segment] = []  # oldest first; the last may be current
        self._current: _Segment | None = None
        self._next_seq = _next_sequence(self.directory)
        self._appended = 0  # tickets handed out
        self._covered = 0  # every ticket up to this one is durable
        self._failed: list[tuple[int, int, OSError]] = []  # (after, up to, error) of failed syncs
        self._stopping = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.syncs = 0  # fdatasyncs run (for tests and benchmarks)
        self.checkpoints = 0

    # --- the receiver's side -------------------------------------------------------------

    def append(self, record: InstanceRecord, data: bytes) -> JournalEntry:
        """Write one entry (not yet durable) and wake the sync thread."""
        # Its fields are plain values: a shallow dict is what asdict makes, at a third of the cost.
        meta = json.dumps({name: getattr(record, name) for name in _RECORD_FIELDS}, separators=(",", ":")).encode()
        header = _HEADER.pack(_MAGIC, len(meta), len(data), crc32(data, crc32(meta)))
        with self._append_lock:
            segment = self._writable_segment()
            try:
                _write_all(segment.fd, [header, meta, data])
            except BaseException:
                # A torn entry would end the replay of this segment early: cut it off and
                # let the next append start a new segment.
                try:
                    os.ftruncate(segment.fd, segment.size)
                finally:
                    with self._cond:
                        segment.sealed = True
                raise
            segment.size += _HEADER.size + len(meta) + len(data)
            with self._cond:
                self._appended += 1
                ticket = self._appended
                segment.last_ticket = ticket
                segment.unsettled += 1
                segment.last_append = time.monotonic()
                self._cond.notify_all()
        return JournalEntry(ticket, segment)

    def wait_durable(self, entry: JournalEntry) -> None:
        """Block until the entry is on disk; JournalError if its fdatasync failed."""
        with self._cond:
            while self._covered < entry.ticket:
                self._cond.wait()
            for after, up_to, error in self._failed:
                if after < entry.ticket <= up_to:
                    raise JournalError(error.errno, f"journal sync failed: {error.strerror}")

    def settle(self, entry: JournalEntry, written: Path | None) -> None:
        """The entry's file was written (or not) and its row committed (or refused)."""
        with self._cond:
            if written is not None:
                entry.segment.files.append(written)
            entry.segment.unsettled -= 1

    # --- threads ---------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("IngestJournalSync", self._sync_loop),
                             ("IngestJournalCheckpoint", self._checkpoint_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads and checkpoint what is settled (the rest waits for `recover`)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        with self._append_lock, self._cond:
            if self._current is not None:
                self._current.sealed = True
        try:
            self.checkpoint(idle_s=0.0)
        except OSError:
            logger.exception("final journal checkpoint failed; the next start replays it",
                             extra={"action": "journal_checkpoint_failed"})
        with self._cond:
            for segment in self._segments:
                os.close(segment.fd)
            self._segments.clear()
            self._current = None

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while self._covered == self._appended and not self._stopping:
                    self._cond.wait()
                if self._covered == self._appended:
                    return
                covers = self._appended
                segments = [s for s in self._segments if s.last_ticket > self._covered]
            error: OSError | None = None
            for segment in segments:
                try:
                    os.fdatasync(segment.fd)
                except OSError as exc:
                    error = exc
            with self._cond:
                if error is not None:
                    logger.error("journal fdatasync failed", extra={"action": "journal_sync_failed",
                                                                     "error": str(error)})
                    self._failed.append((self._covered, covers, error))
                    for segment in segments:
                        segment.sealed = True  # never trust that file again
                self._covered = covers
                self.syncs += 1
                self._cond.notify_all()

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(_CHECKPOINT_POLL_S):
            try:
                self.checkpoint()
            except Exception:
                logger.exception("journal checkpoint failed; retried", extra={"action": "journal_checkpoint_failed"})

    def checkpoint(self, idle_s: float | None = None) -> int:
        """Make settled segments' files and rows durable, then delete the segments; oldest
        first, stopping at the first that is not settled. Returns segments deleted."""
        idle_s = self._idle_checkpoint_s if idle_s is None else idle_s
        with self._checkpoint_lock:
            # The append lock: no entry is being written into a segment this may seal.
            with self._append_lock, self._cond:
                current = self._current
                if (current is not None and not current.sealed and current.last_ticket > 0
                        and time.monotonic() - current.last_append >= idle_s):
                    current.sealed = True
                done: list[_Segment] = []
                for segment in self._segments:
                    if not (segment.sealed and segment.unsettled == 0 and segment.last_ticket <= self._covered):
                        break
                    done.append(segment)
                files = [path for segment in done for path in segment.files]
            if not done:
                return 0
            self._sync_files(files)
            self._sync_records()
            for segment in done:
                os.unlink(segment.path)  # not fsynced: a segment that comes back is replayed, harmlessly
            with self._cond:
                for segment in done:
                    os.close(segment.fd)
                    self._segments.remove(segment)
                    if self._current is segment:
                        self._current = None
                self.checkpoints += 1
            return len(done)

    def pending_segments(self) -> int:
        with self._cond:
            return len(self._segments)

    def _writable_segment(self) -> _Segment:
        """The segment to append to (called under the append lock)."""
        with self._cond:
            current = self._current
            if current is not None and not current.sealed and current.size < self._segment_bytes:
                return current
            if current is not None:
                current.sealed = True
            seq = self._next_seq
            self._next_seq += 1
        _make_directory(self.directory)  # on first use: a receiver that stores nothing writes nothing
        path = self.directory / f"{seq:012d}.journal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            fsync_directory(self.directory)  # the segment's name is durable before any entry relies on it
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        segment = _Segment(seq, path, fd, last_append=time.monotonic())
        with self._cond:
            self._segments.append(segment)
            self._current = segment
        return segment


# --- recovery ------------------------------------------------------------------------------------


@dataclass
class RecoveryCount:
    """What `recover` found (counts only)."""

    segments: int = 0
    entries: int = 0
    torn: int = 0  # segments whose last entry was cut short by the crash (never acknowledged)


def recover(directory: Path, apply: Callable[[list[tuple[InstanceRecord, bytes]]], None],
            chunk: int = 32) -> RecoveryCount:
    """Replay every segment left under ``directory`` in order, ``chunk`` entries per call of
    ``apply`` (which must write each file durably and record each row durably, idempotently),
    then delete the segments. If ``apply`` raises, the segments stay for the next start."""
    directory = Path(directory)
    count = RecoveryCount()
    segments = _segment_paths(directory)
    for path in segments:
        count.segments += 1
        batch: list[tuple[InstanceRecord, bytes]] = []
        for entry in _read_segment(path, count):
            batch.append(entry)
            count.entries += 1
            if len(batch) >= chunk:
                apply(batch)
                batch = []
        if batch:
            apply(batch)
    for path in segments:
        path.unlink()
    if segments:
        fsync_directory(directory)
        logger.warning("ingest journal replayed after an unclean stop",
                       extra={"action": "journal_recovered", "journal": directory.name, **asdict(count)})
    return count


def _read_segment(path: Path, count: RecoveryCount) -> Iterator[tuple[InstanceRecord, bytes]]:
    with open(path, "rb") as stream:
        while True:
            header = stream.read(_HEADER.size)
            if not header:
                return
            if len(header) < _HEADER.size:
                count.torn += 1
                return
            magic, meta_len, data_len, crc = _HEADER.unpack(header)
            if magic != _MAGIC:
                count.torn += 1
                return
            meta = stream.read(meta_len)
            data = stream.read(data_len)
            if len(meta) < meta_len or len(data) < data_len or crc32(data, crc32(meta)) != crc:
                count.torn += 1
                return
            yield InstanceRecord(**json.loads(meta)), data


def _segment_paths(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SEGMENT_NAME.match(p.name))


def _next_sequence(directory: Path) -> int:
    existing = _segment_paths(directory)
    return int(_SEGMENT_NAME.match(existing[-1].name).group(1)) + 1 if existing else 1  # type: ignore[union-attr]


def _make_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True)
    fsync_directory(directory.parent)


def _write_all(fd: int, parts: list[bytes]) -> None:
    views = [memoryview(part) for part in parts if part]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
