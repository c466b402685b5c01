"""The filesystem storage backend (daemon/blobstore.py) with a storage shared between machines:
result objects are recorded by their key (relative to the storage root), so a machine that
mounts the storage at another path delivers a result another machine produced. SQLite and
PostgreSQL. (A missing instance file is retried, never "no images": tests/test_worker.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.delivery import deliver_due
from headscreen.db.models import Job, ResultObject
from headscreen.db.states import JobState
from receiver_helpers import write_ct_series
from serve_harness import RecordingSCP
from worker_helpers import ReadsEverything, make_worker, record_stored_files, worker_settings


def test_a_result_is_recorded_by_key_and_delivered_from_another_mount_point(
        tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    destination = RecordingSCP(tmp_path / "pacs")
    try:
        destinations = [{"name": "pacs", "ae_title": destination.ae_title, "host": "127.0.0.1",
                         "port": destination.port}]
        worker_host = worker_settings(tmp_path / "worker-host", db_url, destinations=destinations)
        files = write_ct_series(worker_host.storage_dir / "in", 4)
        with db_sessions() as session:
            record_stored_files(session, worker_host.storage_dir, files)
        monkeypatch.setattr("headscreen.daemon.worker.deliver_due", lambda *args, **kwargs: None)  # serve delivers
        assert make_worker(monkeypatch, worker_host, db_sessions, ReadsEverything()).run_one()
        with db_sessions() as session:
            [obj] = session.execute(select(ResultObject)).scalars().all()
            [job] = session.execute(select(Job)).scalars().all()
            study_uid = job.study.study_instance_uid
        assert job.state == JobState.DONE
        assert obj.path == f"results/{study_uid}/job-{job.id}-attempt-1/sc-0001.dcm"
        assert pydicom.dcmread(worker_host.storage_dir / obj.path).SOPInstanceUID == obj.sop_instance_uid

        # The receiving machine mounts the same storage at another path.
        serve = worker_settings(tmp_path / "receiver-host", db_url, destinations=destinations)
        shutil.move(worker_host.storage_dir, serve.storage_dir)
        stats = deliver_due(db_sessions, serve)
        assert (stats.delivered, stats.failed) == (1, 0)
        assert destination.received == {obj.sop_instance_uid: 1}
    finally:
        destination.stop()

