"""The storage probe (daemon/storage_probe.py): a worker whose storage_dir is not the
receiver's storage takes no job; and a worker rides out a database outage."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db_factories import complete_study
from headscreen.daemon import worker as worker_module
from headscreen.daemon.serve import WorkerPool
from headscreen.daemon.storage_probe import (
    EXIT_STORAGE_MISMATCH,
    MARKER_NAME,
    StorageMismatch,
    check_storage,
    claim_storage,
    probe_applies,
)
from headscreen.db import api
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import Job
from serve_harness import REPO


def test_serve_writes_the_marker_once_and_records_it(tmp_path, db_sessions) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    first = claim_storage(storage, db_sessions)
    assert str(uuid.UUID(first)) == first
    assert (storage / MARKER_NAME).read_text().strip() == first
    assert claim_storage(storage, db_sessions) == first  # a restart keeps it
    with db_sessions() as session:
        assert api.recorded_storage_id(session) == first


def test_worker_on_the_receivers_storage_passes(tmp_path, db_sessions) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    recorded = claim_storage(storage, db_sessions)
    assert check_storage(storage, db_sessions) == recorded


def test_local_folder_without_marker_is_refused(tmp_path, db_sessions) -> None:
    claim_storage(tmp_path / "mount", db_sessions)
    local = tmp_path / "local"
    local.mkdir()
    with pytest.raises(StorageMismatch, match=f"has no {MARKER_NAME}") as refused:
        check_storage(local, db_sessions)
    assert "takes no jobs" in str(refused.value)


def test_another_storages_marker_is_refused(tmp_path, db_sessions) -> None:
    ours = claim_storage(tmp_path / "ours", db_sessions)
    other = tmp_path / "other"
    other.mkdir()
    theirs = str(uuid.uuid4())
    (other / MARKER_NAME).write_text(theirs + "\n")
    with pytest.raises(StorageMismatch, match="another headscreen storage") as refused:
        check_storage(other, db_sessions)
    assert theirs in str(refused.value) and ours in str(refused.value)
    # serve too refuses a storage that is not the one the database records
    with pytest.raises(StorageMismatch):
        claim_storage(other, db_sessions)


def test_serve_refuses_a_fresh_folder_once_the_database_records_a_storage(tmp_path, db_sessions) -> None:
    claim_storage(tmp_path / "first", db_sessions)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(StorageMismatch, match="not the storage of the receiver"):
        claim_storage(fresh, db_sessions)
    assert not (fresh / MARKER_NAME).exists()  # nothing written: the next start refuses too


def test_a_marker_that_is_not_a_uuid_is_refused(tmp_path, db_sessions) -> None:
    claim_storage(tmp_path / "ours", db_sessions)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / MARKER_NAME).write_text("not a uuid\n")
    with pytest.raises(StorageMismatch, match="does not hold a UUID"):
        check_storage(odd, db_sessions)


def test_worker_waits_for_a_receiver_that_never_recorded(tmp_path, db_sessions) -> None:
    with pytest.raises(StorageMismatch, match="records no storage identity"):
        check_storage(tmp_path, db_sessions, wait_s=0.3, poll_s=0.1)


def test_probe_applies_to_the_filesystem_backend_only() -> None:
    class Filesystem:
        storage_backend = "filesystem"

    class Database:
        storage_backend = "postgresql"

    assert probe_applies(Filesystem()) and probe_applies(object())  # the default is the filesystem
    assert not probe_applies(Database())


@pytest.fixture
def sqlite_db(tmp_path) -> Iterator[tuple[str, sessionmaker[Session]]]:
    """The command-line cases on SQLite only (the probe's queries run on both databases above)."""
    url = f"sqlite:///{tmp_path / 'db' / 'headscreen.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    yield url, session_factory(engine)
    engine.dispose()


def test_headscreen_worker_on_a_local_folder_exits_3_and_claims_nothing(tmp_path, sqlite_db) -> None:
    """The command a second machine runs: its storage_dir is a local folder, not the mount."""
    db_url, db_sessions = sqlite_db
    claim_storage(tmp_path / "mount", db_sessions)
    with db_sessions() as session:
        complete_study(session)
    local = tmp_path / "local"
    local.mkdir()
    config = tmp_path / "worker.toml"
    config.write_text(f'environment = "development"\nstorage_dir = "{local}"\ndatabase_url = "{db_url}"\n'
                      "workers = 1\nallow_any_caller = true\n")
    done = subprocess.run([sys.executable, "-m", "headscreen", "-c", str(config), "worker"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_STORAGE_MISMATCH == 3
    said = done.stdout + done.stderr
    assert f"has no {MARKER_NAME}" in said and "takes no jobs" in said
    with db_sessions() as session:
        jobs = list(session.query(Job))
    assert jobs and all(j.state == "queued" and j.attempts == 0 for j in jobs)
    assert "3    storage mismatch" in subprocess.run([sys.executable, "-m", "headscreen", "--help"], cwd=REPO,
                                                    capture_output=True, text=True, timeout=60).stdout


def test_headscreen_serve_on_another_folder_exits_3_before_listening(tmp_path, sqlite_db) -> None:
    """A second receiver started on a fresh folder against a database that records a storage."""
    db_url, db_sessions = sqlite_db
    recorded = claim_storage(tmp_path / "mount", db_sessions)
    fresh = tmp_path / "fresh"
    config = tmp_path / "serve.toml"
    config.write_text(f'environment = "development"\nstorage_dir = "{fresh}"\ndatabase_url = "{db_url}"\n'
                      "allow_any_caller = true\nworkers = 0\nport = 0\n[web]\nenabled = false\n")
    done = subprocess.run([sys.executable, "-m", "headscreen", "-c", str(config), "serve"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_STORAGE_MISMATCH
    said = done.stdout + done.stderr
    assert f"has no {MARKER_NAME}" in said and recorded in said and "serve does not start" in said
    assert not (fresh / MARKER_NAME).exists()


def test_serve_stops_when_a_worker_refuses_the_storage(tmp_path) -> None:
    """serve's pool does not restart a worker that refused the storage (it would refuse again)."""

    class Refused:
        exitcode = EXIT_STORAGE_MISMATCH

        def is_alive(self) -> bool:
            return False

    pool = WorkerPool.__new__(WorkerPool)
    pool.count, pool.processes = 1, {0: Refused()}  # type: ignore[dict-item]
    with pytest.raises(StorageMismatch):
        pool.ensure()


def test_worker_waits_out_a_database_outage_and_claims_again(monkeypatch) -> None:
    """run_forever: a claim that fails because the database is unreachable is tried again
    (the process stays up) instead of ending the worker."""
    worker = worker_module.Worker.__new__(worker_module.Worker)
    worker.worker_id, worker.stopping, worker.runners = "test:1:w0", threading.Event(), {}
    calls = []

    def run_one() -> bool:
        calls.append(len(calls))
        if len(calls) <= 2:
            raise OperationalError("SELECT 1", {}, Exception("connection timeout expired"))
        worker.stopping.set()
        return True

    monkeypatch.setattr(worker, "run_one", run_one)
    monkeypatch.setattr(worker_module, "DB_RETRY_MAX_S", 0.2)
    worker.run_forever(poll_s=0.01)
    assert len(calls) == 3


def test_marker_name_is_not_a_uid() -> None:
    """The debris sweep walks UID-named folders only; the marker must never look like one."""
    from headscreen.daemon.storage import _is_uid

    assert not _is_uid(MARKER_NAME)
