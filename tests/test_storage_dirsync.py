"""DirectorySync: concurrent writers into one directory share a directory fsync."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from headscreen import durable
from headscreen.daemon import storage
from headscreen.daemon.storage import DirectorySync, InstanceStore


class GatedFsync:
    """The real directory fsync, held at a gate on its first call so others queue up."""

    def __init__(self, fail_first: bool = False) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.fail_first = fail_first
        self._real = storage.fsync_directory

    def __call__(self, directory: Path) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(timeout=30)
            if self.fail_first:
                raise OSError(5, "injected I/O error")
        self._real(directory)


def queue_behind_first(sync: DirectorySync, gate: GatedFsync, waiters: int) -> tuple[list[threading.Thread], dict]:
    outcomes: dict[int, str] = {}

    def call(n: int) -> None:
        try:
            sync.sync()
            outcomes[n] = "ok"
        except OSError as exc:
            outcomes[n] = exc.strerror or "error"

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert gate.entered.wait(timeout=30)
    others = [threading.Thread(target=call, args=(n,)) for n in range(1, waiters + 1)]
    for thread in others:
        thread.start()
    # They block on a condition with no event to await; watch the tickets (bounded).
    deadline = time.monotonic() + 30
    while sync._tickets < waiters + 1 and time.monotonic() < deadline:  # noqa: SLF001
        threading.Event().wait(0.001)
    gate.release.set()
    for thread in [first, *others]:
        thread.join(timeout=30)
    return [first, *others], outcomes


def test_writers_queued_behind_an_fsync_share_the_next_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = GatedFsync()
    monkeypatch.setattr(storage, "fsync_directory", gate)
    sync = DirectorySync(tmp_path)
    threads, outcomes = queue_behind_first(sync, gate, waiters=5)
    assert not any(t.is_alive() for t in threads)
    assert outcomes == dict.fromkeys(range(6), "ok")
    # The first fsync started before the others' renames, so they need one more: exactly one.
    assert gate.calls == sync.fsyncs == 2


def test_a_failed_fsync_fails_its_caller_and_the_waiters_retry(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    gate = GatedFsync(fail_first=True)
    monkeypatch.setattr(storage, "fsync_directory", gate)
    sync = DirectorySync(tmp_path)
    _, outcomes = queue_behind_first(sync, gate, waiters=3)
    assert outcomes == {0: "injected I/O error", 1: "ok", 2: "ok", 3: "ok"}
    assert gate.calls == 2 and sync.fsyncs == 1


def test_a_lone_writer_runs_its_own_fsync_each_time(tmp_path: Path) -> None:
    sync = DirectorySync(tmp_path)
    for _ in range(3):
        sync.sync()
    assert sync.fsyncs == 3


def test_concurrent_store_writes_are_all_on_disk_with_fewer_directory_fsyncs(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, durable=True)
    payloads = {f"1.2.3.{n}": os.urandom(2048) for n in range(40)}
    barrier = threading.Barrier(4)

    def writer(sops: list[str]) -> None:
        barrier.wait()
        for sop in sops:
            store.write("1.2", "1.2.3", sop, payloads[sop])

    sops = sorted(payloads)
    threads = [threading.Thread(target=writer, args=(sops[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for sop, data in payloads.items():
        assert (tmp_path / "1.2" / "1.2.3" / f"{sop}.dcm").read_bytes() == data
    assert 1 <= store._dir_sync(tmp_path / "1.2" / "1.2.3").fsyncs <= len(payloads)  # noqa: SLF001


def test_atomic_write_syncs_the_file_then_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A result file (daemon.pipeline) is durable like a received instance: its rename is
    followed by an fsync of the directory, and no temporary file stays behind."""
    order: list[str] = []
    real_fdatasync, real_replace = os.fdatasync, os.replace
    monkeypatch.setattr(os, "fdatasync", lambda fd: (order.append("fdatasync"), real_fdatasync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    monkeypatch.setattr(durable, "fsync_directory", lambda d: order.append(f"dir:{Path(d).name}"))
    target = tmp_path / "job-7" / "sr.dcm"
    durable.atomic_write(target, b"DICM" * 100)
    assert target.read_bytes() == b"DICM" * 100
    assert order == ["fdatasync", "replace", "dir:job-7"]
    assert [p.name for p in target.parent.iterdir()] == ["sr.dcm"]


def test_atomic_write_that_fails_leaves_the_old_file_and_no_debris(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sr.dcm"
    target.write_bytes(b"old")

    def full_disk(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        durable.atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["sr.dcm"]


def test_a_training_checkpoint_is_written_as_durably_as_a_result(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One atomic write for every layer: a checkpoint a resumed run reads is synced, renamed
    and its directory synced, like a result file."""
    from headscreen.model_training.runtime import load_checkpoint, save_checkpoint

    order: list[str] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (order.append("fdatasync"), real_fdatasync(fd))[1])
    monkeypatch.setattr(durable, "fsync_directory", lambda d: order.append(f"dir:{Path(d).name}"))
    target = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(target, {"epoch": 3})
    assert order == ["fdatasync", "dir:run"]
    assert load_checkpoint(target) == {"epoch": 3}
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint.pt"]
