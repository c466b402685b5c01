"""Crash debris in the storage tree: temporary files and files no row points at
(daemon.storage.sweep_debris, daemon.scheduler.sweep_storage), on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db_factories import record, uid
from headscreen.daemon import storage
from headscreen.daemon.scheduler import sweep_storage
from headscreen.daemon.storage import ORPHAN_GRACE_S, TEMP_GRACE_S, InstanceStore, sweep_debris
from headscreen.db import api
from headscreen.db.models import Instance


def settings_for(storage_dir: Path) -> Any:
    """sweep_storage reads only storage_dir and storage_backend from the settings."""
    return SimpleNamespace(storage_dir=storage_dir, storage_backend="filesystem")


def age(path: Path, seconds: float) -> Path:
    """Make `path` look `seconds` old."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def write(store: InstanceStore, study: str, series: str, sop: str | None = None, data: bytes = b"DICM") -> Path:
    return store.write(study, series, sop or uid(), data).path


def relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


class Recorded:
    """A stand-in for the database: the paths that have a row."""

    def __init__(self, paths: set[str] | None = None) -> None:
        self.paths = paths or set()
        self.asked: list[str] = []

    def __call__(self, paths: list[str]) -> set[str]:
        self.asked += paths
        return self.paths & set(paths)


def test_old_debris_goes_young_and_recorded_files_stay(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = InstanceStore(tmp_path, durable=False)
    study, series = uid(), uid()
    kept_recorded = age(write(store, study, series), 2 * ORPHAN_GRACE_S)
    old_orphan = age(write(store, study, series), 2 * ORPHAN_GRACE_S)
    young_orphan = write(store, study, series)  # may be waiting for its row
    old_temp = tmp_path / study / series / f".{uid()}.dcm.tmp"
    old_temp.write_bytes(b"half")
    age(old_temp, 2 * TEMP_GRACE_S)
    young_temp = tmp_path / study / series / f".{uid()}.dcm.tmp"
    young_temp.write_bytes(b"half")
    recorded = Recorded({relative(tmp_path, kept_recorded)})
    with caplog.at_level(logging.INFO, logger="headscreen.daemon.storage"):
        count = sweep_debris(tmp_path, recorded)
    assert (count.temp_removed, count.orphans_removed, count.young_kept, count.errors) == (1, 1, 1, 0)
    assert kept_recorded.exists() and young_orphan.exists() and young_temp.exists()
    assert not old_orphan.exists() and not old_temp.exists()
    # Young files are not even looked up.
    assert relative(tmp_path, young_orphan) not in recorded.asked
    [line] = [r for r in caplog.records if r.getMessage() == "storage debris swept"]
    assert (line.orphans_removed, line.temp_removed) == (1, 1)  # type: ignore[attr-defined]
    # Counts only: no UID (so no path) in the log line.
    assert study not in str(line.__dict__) and series not in str(line.__dict__)


def test_other_files_in_the_storage_tree_are_left_alone(tmp_path: Path) -> None:
    odd = [tmp_path / "headscreen.db", tmp_path / "results" / "1.2" / "3.4" / "5.6.dcm",
           tmp_path / "1.2" / "3.4" / "notes.txt", tmp_path / "1.2" / "3.4.dcm", tmp_path / "1.2" / "3.4" / "x.dcm"]
    for path in odd:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        age(path, 10 * ORPHAN_GRACE_S)
    count = sweep_debris(tmp_path, Recorded())
    assert all(path.exists() for path in odd)
    assert (count.orphans_removed, count.temp_removed) == (0, 0)


@pytest.mark.parametrize("durable", [False, True])
def test_emptied_idle_directories_go(tmp_path: Path, durable: bool) -> None:
    store = InstanceStore(tmp_path, durable=durable)
    study, series = uid(), uid()
    orphan = age(write(store, study, series), 2 * ORPHAN_GRACE_S)
    age(orphan.parent, 2 * ORPHAN_GRACE_S)
    age(orphan.parent.parent, 2 * ORPHAN_GRACE_S)
    busy = write(store, uid(), uid())  # a fresh directory is in use: it stays
    count = sweep_debris(tmp_path, Recorded({relative(tmp_path, busy)}))
    assert (count.orphans_removed, count.dirs_removed) == (1, 2)
    assert not (tmp_path / study).exists() and busy.exists()
    # The store writes there again (it had the directories cached).
    assert write(store, study, series).exists()


def test_a_copy_renamed_in_during_the_check_stays(tmp_path: Path) -> None:
    # The receiver renames a new copy over an orphan and records its row while the sweep
    # asks the database about the old one: the new copy must not be deleted.
    store = InstanceStore(tmp_path, durable=False)
    study, series, sop = uid(), uid(), uid()
    orphan = age(write(store, study, series, sop, b"old"), 2 * ORPHAN_GRACE_S)

    def recorded(paths: list[str]) -> set[str]:
        write(store, study, series, sop, b"new")  # the re-send lands; its row is not committed yet
        return set()

    count = sweep_debris(tmp_path, recorded)
    assert count.orphans_removed == 0
    assert orphan.read_bytes() == b"new"
    assert not list(orphan.parent.glob(".*"))


def test_a_file_held_by_an_interrupted_sweep_is_put_back_when_recorded(tmp_path: Path) -> None:
    study, series = uid(), uid()
    directory = tmp_path / study / series
    directory.mkdir(parents=True)
    recorded_sop = uid()
    held_recorded = directory / f".{recorded_sop}.dcm.sweep"
    held_orphan = directory / f".{uid()}.dcm.sweep"
    for held in (held_recorded, held_orphan):
        held.write_bytes(b"DICM")
    # A rename sets ctime, which says how long the file has been held; wait out a tiny grace.
    time.sleep(0.05)
    count = sweep_debris(tmp_path, Recorded({f"{study}/{series}/{recorded_sop}.dcm"}), temp_grace_s=0.01)
    assert (count.restored, count.orphans_removed) == (1, 1)
    assert (directory / f"{recorded_sop}.dcm").read_bytes() == b"DICM"
    assert sorted(p.name for p in directory.iterdir()) == [f"{recorded_sop}.dcm"]


def test_no_answer_from_the_database_removes_no_instance_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, durable=False)
    orphan = age(write(store, uid(), uid()), 2 * ORPHAN_GRACE_S)

    def unavailable(paths: list[str]) -> set[str]:
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError):
        sweep_debris(tmp_path, unavailable)
    assert orphan.exists()


def test_a_missing_storage_root_is_nothing_to_sweep(tmp_path: Path) -> None:
    assert not sweep_debris(tmp_path / "absent", Recorded()).changed


# ---------------------------------------------------------------- with the database


def test_sweep_storage_keeps_recorded_files_and_removes_unrecorded_ones(
    tmp_path: Path, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(tmp_path)
    store = InstanceStore(tmp_path, durable=False)
    study, series = uid(), uid()
    kept = [age(write(store, study, series), 2 * ORPHAN_GRACE_S) for _ in range(3)]
    with db_sessions() as session:
        for n, path in enumerate(kept, 1):
            api.record_instance(session, record(study, series, n, sop=path.stem, path=relative(tmp_path, path)))
    orphans = [age(write(store, study, series), 2 * ORPHAN_GRACE_S) for _ in range(2)]
    monkeypatch.setattr(storage, "_SWEEP_CHUNK", 2)  # several database look-ups
    count = sweep_storage(settings, db_sessions)
    assert (count.orphans_removed, count.errors) == (2, 0)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in orphans)


def test_a_moved_instance_leaves_database_and_files_consistent(
    tmp_path: Path, db_sessions: sessionmaker[Session],
) -> None:
    # Issue 12 (4): SOP X in study A, then in study B. The row follows B's file; A's
    # file, which no row points at any more, goes with the next sweep.
    settings = settings_for(tmp_path)
    store = InstanceStore(tmp_path, durable=False)
    study_a, series_a, study_b, series_b, x = uid(), uid(), uid(), uid(), uid()
    other = age(write(store, study_a, series_a), 2 * ORPHAN_GRACE_S)
    in_a = age(write(store, study_a, series_a, x, b"in A"), 2 * ORPHAN_GRACE_S)
    with db_sessions() as session:
        api.record_instance(session, record(study_a, series_a, 1, sop=other.stem, path=relative(tmp_path, other)))
        api.record_instance(session, record(study_a, series_a, 2, sop=x, path=relative(tmp_path, in_a)))
    in_b = write(store, study_b, series_b, x, b"in B")
    with db_sessions() as session:
        api.record_instance(session, record(study_b, series_b, 1, sop=x, path=relative(tmp_path, in_b)))
    sweep_storage(settings, db_sessions)
    assert not in_a.exists() and in_b.read_bytes() == b"in B" and other.exists()
    with db_sessions() as session:
        paths = session.execute(select(Instance.path)).scalars().all()
    # Every row has its file, and every instance file has its row.
    assert sorted(paths) == sorted(relative(tmp_path, p) for p in tmp_path.glob("*/*/*.dcm"))
