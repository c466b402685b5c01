"""The PostgreSQL storage backend (daemon/blobstore.py, db/blobs.py): instance and result
bytes in the database, so a worker on another machine needs no shared filesystem.

The receiver is real (pynetdicom over TCP), the worker is the real
Worker with the model and pipeline stood in for by a `run_job` that reads every instance
it is given and writes a result object, the destination is a real pynetdicom SCP. Each
"machine" has its own storage_dir; nothing but PostgreSQL is shared."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from db_factories import BUNDLES
from headscreen.daemon import receiver as receiver_module
from headscreen.daemon.config import Settings
from headscreen.daemon.delivery import deliver_due
from headscreen.daemon.ingest_journal import IngestJournal
from headscreen.daemon.scheduler import sweep_retention, sweep_storage
from headscreen.daemon.web.context import WebContext
from headscreen.daemon.web.preview import render_png
from headscreen.db import api
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.models import Delivery, Instance, Job, Result, ResultObject, StoredBlob, Study
from headscreen.db.states import DeliveryState, JobState, StudyState
from headscreen.errors import ConfigError
from receiver_helpers import SCP_AE, SCU_AE, start_harness, write_ct_series
from serve_harness import RecordingSCP
from worker_helpers import ReadsEverything, make_worker, worker_settings

pytestmark = pytest.mark.postgres

SLICES = 6


@pytest.fixture
def pg_url(pg_migrated_template: str) -> Iterator[str]:
    from conftest import create_pg_database, drop_pg_database

    name, url = create_pg_database(template=pg_migrated_template)
    try:
        yield url
    finally:
        drop_pg_database(name)


@pytest.fixture
def sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield session_factory(engine)
    engine.dispose()


def _send(files: list[Path], port: int) -> None:
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        for path in files:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    finally:
        assoc.release()


def _blobs(sessions: sessionmaker[Session], kind: str | None = None) -> dict[str, bytes]:
    with sessions() as session:
        query = select(StoredBlob.key, StoredBlob.data)
        if kind is not None:
            query = query.where(StoredBlob.kind == kind)
        return {key: bytes(data) for key, data in session.execute(query)}


def _dcm_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm")) if folder.exists() else []


def _receive(tmp_path: Path, sessions: sessionmaker[Session], files: list[Path]) -> Path:
    """The receiving machine: a real receiver with the bytes going into PostgreSQL; its storage_dir."""
    harness = start_harness(tmp_path / "receiver", sessions, blobs_in_database=True)
    try:
        _send(files, harness.port)
    finally:
        harness.receiver.shutdown()
    return harness.storage_dir


def _complete(sessions: sessionmaker[Session]) -> int:
    """The receiver's completeness sweep, as if the quiet period had passed; the study id."""
    with sessions() as session:
        done = api.sweep_completeness(session, api.utcnow() + timedelta(hours=1), 60, 10, list(BUNDLES))
        # Swept "an hour from now": its jobs are claimable now.
        session.execute(update(Job).values(available_at=api.utcnow() - timedelta(seconds=1)))
        session.commit()
    assert len(done) == 1
    return done[0]


def _machine(tmp_path: Path, name: str, pg_url: str, **overrides: object) -> Settings:
    return worker_settings(tmp_path / name, pg_url, storage_backend="postgresql", job_max_attempts=2, **overrides)


def test_received_instances_are_committed_with_their_rows_and_no_file_is_written(
        tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    files = write_ct_series(tmp_path / "in", SLICES)
    storage = _receive(tmp_path, sessions, files)

    assert _dcm_files(storage) == []
    assert not list(storage.rglob("*.journal"))  # nor an ingest journal: the commit is the durable copy
    stored = _blobs(sessions, "instance")
    with sessions() as session:
        paths = set(session.execute(select(Instance.path)).scalars())
    assert set(stored) == paths and len(paths) == SLICES
    sent = {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, files)}
    for data in stored.values():
        dataset = pydicom.dcmread(io.BytesIO(data))
        assert dataset.PixelData == sent[str(dataset.SOPInstanceUID)]


def test_each_instance_is_acknowledged_after_a_synchronous_commit_of_its_row_and_bytes(
        tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    """No journal holds a durable copy, so no commit may be relaxed."""
    asked: list[bool] = []
    for name in ("record_instance", "record_instances"):
        original = getattr(api, name)

        def spy(*args: object, _original=original, **kwargs: object) -> object:
            asked.append(bool(kwargs.get("durable", True)))
            return _original(*args, **kwargs)
        monkeypatch.setattr(api, name, spy)
    files = write_ct_series(tmp_path / "in", SLICES)
    _receive(tmp_path, sessions, files)

    assert asked and all(asked)
    assert len(_blobs(sessions, "instance")) == SLICES


def test_below_the_disk_watermark_an_instance_is_refused_out_of_resources_and_not_recorded(
        tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    """Nothing is written to storage_dir on this backend, but its watermark still refuses
    cleanly (0xA700) where a full disk would otherwise fail the database's commit."""
    files = write_ct_series(tmp_path / "in", 1)
    harness = start_harness(tmp_path / "receiver", sessions, blobs_in_database=True, disk_min_free_mb=1 << 40)
    try:
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", harness.port, ae_title=SCP_AE)
        assert assoc.is_established
        try:
            assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0xA700
        finally:
            assoc.release()
    finally:
        harness.receiver.shutdown()
    assert harness.instances() == [] and _blobs(sessions) == {}


def test_an_earlier_versions_journal_is_replayed_into_the_database(
        tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    """Versions before this one journalled the bytes on this backend too and committed
    relaxed: a power cut after Success could take the row and its bytes. The next start
    still replays such a journal through the backend, before the receiver listens."""
    monkeypatch.setattr(receiver_module, "uses_ingest_journal", lambda config: config.durable)  # the earlier way
    monkeypatch.setattr(IngestJournal, "checkpoint", lambda self, idle_s=None: 0)  # the crash came first
    files = write_ct_series(tmp_path / "in", 3)
    storage = _receive(tmp_path, sessions, files)
    with sessions() as session:
        lost = session.execute(select(Instance.sop_instance_uid, Instance.path)).first()
        assert lost is not None
        session.execute(delete(Instance).where(Instance.sop_instance_uid == lost.sop_instance_uid))
        session.execute(delete(StoredBlob).where(StoredBlob.key == lost.path))
        session.commit()
    assert list((storage / ".journal").glob("*.journal"))
    monkeypatch.undo()

    restarted = start_harness(tmp_path / "receiver", sessions, blobs_in_database=True)
    restarted.receiver.shutdown()
    assert len(restarted.instances()) == 3
    assert pydicom.dcmread(io.BytesIO(_blobs(sessions)[lost.path])).SOPInstanceUID == lost.sop_instance_uid
    assert _dcm_files(storage) == []


def test_a_worker_with_its_own_empty_storage_screens_the_study_and_serve_delivers_and_previews_its_result(
        tmp_path: Path, pg_url: str, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_ct_series(tmp_path / "in", SLICES)
    _receive(tmp_path, sessions, files)
    study_id = _complete(sessions)

    destination = RecordingSCP(tmp_path / "pacs")
    try:
        destinations = [{"name": "pacs", "ae_title": destination.ae_title, "host": "127.0.0.1",
                         "port": destination.port}]
        other = _machine(tmp_path, "worker-host", pg_url, destinations=destinations)
        other.storage_dir.mkdir(parents=True)
        pipeline = ReadsEverything()
        worker = make_worker(monkeypatch, other, sessions, pipeline)
        monkeypatch.setattr("headscreen.daemon.worker.deliver_due", lambda *args, **kwargs: None)  # serve delivers
        assert worker.run_one()

        # Every instance was read, from copies below the worker's own storage_dir, now removed.
        sent = {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, files)}
        assert pipeline.read == sent
        assert all(p.is_relative_to(other.storage_dir / ".scratch") for p in pipeline.paths)
        assert _dcm_files(other.storage_dir) == []
        with sessions() as session:
            job = session.execute(select(Job).where(Job.study_id == study_id)).scalar_one()
            [obj] = session.execute(select(ResultObject)).scalars().all()
        assert (job.state, job.last_error) == (JobState.DONE, None)
        assert obj.path == f"results/{_study_uid(sessions)}/job-{job.id}-attempt-1/sc-0001.dcm"
        assert obj.path in _blobs(sessions, "result")

        # `serve` on the receiving machine delivers the result the other machine produced.
        serve = _machine(tmp_path, "receiver", pg_url, destinations=destinations)
        stats = deliver_due(sessions, serve)
        assert (stats.delivered, stats.failed) == (1, 0)
        assert destination.received == {obj.sop_instance_uid: 1}
        assert _dcm_files(serve.storage_dir) == []  # its delivery copy is gone too
        # The console on the receiving machine previews it from the database.
        with sessions() as session:
            detail = api.get_study(session, _study_uid(sessions))
        assert detail is not None
        png = render_png(WebContext(serve, sessions, []), detail, obj.sop_instance_uid)
        assert png.startswith(b"\x89PNG")
    finally:
        destination.stop()


def _study_uid(sessions: sessionmaker[Session]) -> str:
    with sessions() as session:
        return session.execute(select(Study.study_instance_uid)).scalar_one()


def test_a_missing_instance_is_retried_then_fails_loudly_never_not_eligible(
        tmp_path: Path, pg_url: str, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_ct_series(tmp_path / "in", SLICES)
    _receive(tmp_path, sessions, files)
    study_id = _complete(sessions)
    with sessions() as session:
        gone = session.execute(select(Instance.path).limit(1)).scalar_one()
        session.execute(delete(StoredBlob).where(StoredBlob.key == gone))
        session.commit()

    pipeline = ReadsEverything()
    worker = make_worker(monkeypatch, _machine(tmp_path, "worker-host", pg_url), sessions, pipeline)
    for attempt in (1, 2):
        with sessions() as session:  # the retry's backoff, passed
            session.execute(update(Job).values(available_at=api.utcnow() - timedelta(seconds=1)))
            session.commit()
        assert worker.run_one()
        with sessions() as session:
            job = session.execute(select(Job).where(Job.study_id == study_id)).scalar_one()
        assert job.attempts == attempt
        assert job.last_error.startswith("TransientError") and "missing from the database" in job.last_error
    assert job.state == JobState.FAILED  # job_max_attempts = 2
    assert pipeline.read == {}  # the pipeline never ran on a partial study
    with sessions() as session:
        assert session.execute(select(Result)).first() is None  # no "not eligible: no images"


def test_retention_deletes_the_instance_bytes_and_keeps_the_results(
        tmp_path: Path, pg_url: str, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_ct_series(tmp_path / "in", SLICES)
    _receive(tmp_path, sessions, files)
    study_id = _complete(sessions)
    worker = make_worker(monkeypatch, _machine(tmp_path, "worker-host", pg_url), sessions, ReadsEverything())
    assert worker.run_one()
    results = _blobs(sessions, "result")
    assert len(_blobs(sessions, "instance")) == SLICES and len(results) == 1

    serve = _machine(tmp_path, "receiver", pg_url, retention_days=1)
    with sessions() as session:
        session.execute(update(Study).values(completed_at=api.utcnow() - timedelta(days=2)))
        session.execute(update(Delivery).values(state=DeliveryState.DELIVERED))
        session.commit()
    assert sweep_retention(serve, sessions) == 1
    assert _blobs(sessions, "instance") == {}
    assert _blobs(sessions, "result") == results
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None and study.purged_at is not None and study.state == StudyState.COMPLETE
        assert session.execute(select(Instance)).first() is None


def test_the_storage_sweep_removes_bytes_no_row_points_at(
        tmp_path: Path, pg_url: str, sessions: sessionmaker[Session]) -> None:
    files = write_ct_series(tmp_path / "in", 2)
    _receive(tmp_path, sessions, files)
    old = api.utcnow() - timedelta(days=1)
    with sessions() as session:
        # An instance re-sent under another series leaves its old key behind, as a file would.
        session.add(StoredBlob(key="1.2.3/1.2.3.4/1.2.3.4.5.dcm", kind="instance", study_instance_uid="1.2.3",
                               size_bytes=1, stored_at=old, data=b"x"))
        session.execute(update(StoredBlob).values(stored_at=old))
        session.commit()
    sweep_storage(_machine(tmp_path, "receiver", pg_url), sessions)
    with sessions() as session:
        paths = set(session.execute(select(Instance.path)).scalars())
    assert set(_blobs(sessions)) == paths and len(paths) == 2


def test_the_postgresql_backend_needs_a_postgresql_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set database_url to a PostgreSQL URL"):
        worker_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", storage_backend="postgresql")


def test_a_result_whose_bytes_are_missing_is_a_failed_delivery_attempt_retried_later(
        tmp_path: Path, pg_url: str, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    _receive(tmp_path, sessions, write_ct_series(tmp_path / "in", 2))
    _complete(sessions)
    destination = RecordingSCP(tmp_path / "pacs")
    try:
        destinations = [{"name": "pacs", "ae_title": destination.ae_title, "host": "127.0.0.1",
                         "port": destination.port}]
        monkeypatch.setattr("headscreen.daemon.worker.deliver_due", lambda *args, **kwargs: None)  # serve delivers
        worker = make_worker(monkeypatch, _machine(tmp_path, "worker-host", pg_url, destinations=destinations),
                             sessions, ReadsEverything())
        assert worker.run_one()
        with sessions() as session:
            session.execute(delete(StoredBlob).where(StoredBlob.kind == "result"))
            session.commit()
        stats = deliver_due(sessions, _machine(tmp_path, "receiver", pg_url, destinations=destinations))
        assert (stats.delivered, stats.failed) == (0, 1)
        assert destination.received == {}
        with sessions() as session:
            [delivery] = session.execute(select(Delivery)).scalars().all()
        assert delivery.state == DeliveryState.PENDING and delivery.attempts == 1
        assert delivery.last_error == "result object missing from the database; storage not reachable?"
    finally:
        destination.stop()
