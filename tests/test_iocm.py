"""IHE IOCM rejection notes: a result superseded by a newer one is rejected at the PACS by a
Key Object Selection document ("Rejected for Quality Reasons") that lists exactly its
instances, sent after the new result, once, to each destination that wants it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from alembic import command
from pydicom.dataset import Dataset
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db_factories import BUNDLES, outcome, record
from headscreen.daemon.config import Settings
from headscreen.daemon.pipeline import _build_results
from headscreen.daemon.worker import Worker
from headscreen.db import api
from headscreen.db.engine import make_engine
from headscreen.db.migrate import alembic_config, current_revision, head_revision, upgrade
from headscreen.db.models import AuditEvent, Delivery, Result, ResultObject, Study
from headscreen.db.states import DeliveryState, ObjectKind
from headscreen.export.kos import (
    KOS_SERIES_NUMBER,
    KOS_STORAGE,
    REJECTED_FOR_QUALITY_REASONS,
    build_rejection_note,
    rejected_instances,
)
from headscreen.export.sc import choose_slices
from headscreen.export.sr import build_report
from serve_harness import RecordingSCP, dciodvfy_errors
from test_export import NOT_ELIGIBLE, ct_summary, make_ct_series
from worker_helpers import make_worker, queued_ct_study, reporting_runner, worker_settings

SEG_SCALE = 2.0  # make_ct_series' error map times this crosses the SEG threshold on the lesion


@pytest.fixture(scope="module")
def series() -> tuple[list[Dataset], object]:
    datasets, error = make_ct_series(seed=5)
    return datasets, error * SEG_SCALE


def _result_files(series, folder: Path) -> list[Path]:
    """One eligible result as the pipeline writes it: SC overlays, a SEG and the SR."""
    datasets, error = series
    objects = _build_results(datasets, error, ct_summary(), choose_slices(error, 2), folder, 1.0)
    assert sorted({o.kind for o in objects}) == ["sc", "seg", "sr"]
    return [Path(o.path) for o in objects]


def _headers(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


# --------------------------------------------------------------------------- the note itself


def test_the_rejection_note_lists_every_instance_of_the_result_and_passes_dciodvfy(tmp_path, series):
    files = _result_files(series, tmp_path / "old")
    rejected = _headers(files)
    note = build_rejection_note(rejected, ct_summary().algorithm)
    path = tmp_path / "kos.dcm"
    note.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001", "DCM", "Rejected for Quality Reasons")
    assert REJECTED_FOR_QUALITY_REASONS.value == "113001"
    assert (back.SOPClassUID, back.Modality, back.SeriesNumber) == (KOS_STORAGE, "KO", KOS_SERIES_NUMBER)
    # Exactly the old instances, each with its SOP class and series, in the same study.
    expected = {str(ds.SOPInstanceUID): (str(ds.SOPClassUID), str(ds.SeriesInstanceUID)) for ds in rejected}
    assert rejected_instances(pydicom.dcmread(path)) == expected
    assert {back.resolve_reference(uid)[0] for uid in expected} == {rejected[0].StudyInstanceUID}
    assert back.StudyInstanceUID == rejected[0].StudyInstanceUID
    # Its own series: none of the rejected ones.
    assert back.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in rejected}
    assert (back.PatientID, str(back.PatientName)) == (rejected[0].PatientID, str(rejected[0].PatientName))
    [evidence] = back.CurrentRequestedProcedureEvidenceSequence
    listed = {item.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence
              for item in s.ReferencedSOPSequence}
    assert listed == set(expected)


def test_a_not_eligible_result_with_only_a_report_is_rejected_too(tmp_path, series):
    datasets, _ = series
    sr = build_report(datasets, NOT_ELIGIBLE, [])
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    note = build_rejection_note(_headers([path]))
    out = tmp_path / "kos.dcm"
    note.save_as(out, enforce_file_format=True)
    assert dciodvfy_errors(out) == []
    assert rejected_instances(pydicom.dcmread(out)) == {
        str(sr.SOPInstanceUID): (str(sr.SOPClassUID), str(sr.SeriesInstanceUID))}


def test_what_cannot_be_a_rejection_note_is_refused(tmp_path, series):
    rejected = _headers(_result_files(series, tmp_path / "old"))
    with pytest.raises(ValueError, match="empty"):
        build_rejection_note([])
    with pytest.raises(ValueError, match="twice"):
        build_rejection_note([rejected[0], rejected[0]])
    other = Dataset()
    other.update(rejected[-1])
    other.StudyInstanceUID = hd.UID()
    with pytest.raises(ValueError, match="more than one study"):
        build_rejection_note([rejected[0], other])
    note = build_rejection_note(rejected)
    with pytest.raises(ValueError, match="never itself rejected"):
        build_rejection_note([note])


# --------------------------------------------------------------------------- migration 0005


def test_migration_admits_rejection_notes_and_keeps_existing_rows(empty_db_url: str) -> None:
    upgrade(empty_db_url, "0004")
    engine = make_engine(empty_db_url)
    try:
        with Session(engine) as session:
            row_id = _insert_object(session, "sr")
        upgrade(empty_db_url)
        assert current_revision(empty_db_url) == head_revision()
        with Session(engine) as session:
            assert session.get(ResultObject, row_id).kind == ObjectKind.SR
            _insert_object(session, "kos")
            with pytest.raises(IntegrityError):
                _insert_object(session, "bogus")  # the constraint is still there, only wider
            session.rollback()
        command.downgrade(alembic_config(empty_db_url), "0004")
        with Session(engine) as session:
            kinds = session.execute(text("SELECT kind FROM result_objects")).scalars().all()
            assert kinds == ["sr"]  # rejection notes cannot exist before 0005
            with pytest.raises(IntegrityError):
                _insert_object(session, "kos")
            session.rollback()
    finally:
        engine.dispose()


def _insert_object(session: Session, kind: str) -> int:
    """A result object row of `kind` (and the rows it needs), by plain SQL: the models are at head."""
    if session.execute(text("SELECT count(*) FROM results")).scalar_one() == 0:
        session.execute(text(
            "INSERT INTO studies (id, study_instance_uid, state, generation, first_received_at, last_received_at, "
            "flagged, reviewed, confirmed_normal) VALUES (1, '2.25.1', 'complete', 1, :t, :t, false, false, false)"),
            {"t": "2026-01-05 08:00:00+00:00"})
        session.execute(text(
            "INSERT INTO jobs (id, study_id, bundle_name, bundle_version, generation, state, attempts, max_attempts, "
            "created_at, available_at) VALUES (1, 1, 'b', '1', 1, 'done', 1, 3, :t, :t)"),
            {"t": "2026-01-05 08:00:00+00:00"})
        session.execute(text(
            "INSERT INTO results (id, job_id, study_id, bundle_name, bundle_version, eligible, qc_failed, qc_reasons, "
            "qc_metrics, series_verdicts, timings, created_at, superseded) "
            "VALUES (1, 1, 1, 'b', '1', true, false, '[]', '{}', '[]', '{}', :t, false)"),
            {"t": "2026-01-05 08:00:00+00:00"})
    sop = hd.UID()
    session.execute(text(
        "INSERT INTO result_objects (result_id, sop_instance_uid, sop_class_uid, kind, path) "
        "VALUES (1, :sop, '1.2', :kind, 'results/x.dcm')"), {"sop": sop, "kind": kind})
    session.commit()
    return session.execute(text("SELECT id FROM result_objects WHERE sop_instance_uid = :sop"),
                           {"sop": sop}).scalar_one()


# --------------------------------------------------------------------------- a worker and a PACS


class OrderedSCP(RecordingSCP):
    """A pynetdicom Storage SCP (the PACS side) that also keeps the order of arrival."""

    def __init__(self, folder: Path, ae_title: str) -> None:
        self.order: list[str] = []
        super().__init__(folder, ae_title)

    def _store(self, event) -> int:
        status = super()._store(event)
        with self.lock:
            self.order.append(str(event.request.AffectedSOPInstanceUID))
        return status


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[OrderedSCP, OrderedSCP]]:
    """Two destinations: one that wants rejection notes (the default), one that does not."""
    wants, refuses = OrderedSCP(tmp_path / "pacs", "PACS"), OrderedSCP(tmp_path / "archive", "ARCHIVE")
    try:
        yield wants, refuses
    finally:
        wants.stop()
        refuses.stop()


def _destinations(wants: OrderedSCP, refuses: OrderedSCP) -> list[dict]:
    return [
        {"name": "pacs", "ae_title": wants.ae_title, "host": "127.0.0.1", "port": wants.port},
        {"name": "archive", "ae_title": refuses.ae_title, "host": "127.0.0.1", "port": refuses.port,
         "iocm_rejection": False},
    ]


def _writing_job(series):
    """A stand-in pipeline that writes a real SC/SEG/SR result into the job's folder."""
    datasets, error = series
    jobs = []

    def run_job(ticket, _study, _runner, output_dir: Path, *_args, **_kwargs):  # type: ignore[no-untyped-def]
        objects = _build_results(datasets, error, ct_summary(), choose_slices(error, 2), output_dir, 1.0)
        jobs.append(ticket.job_id)
        return outcome(objects=objects)

    return run_job


def _first_result_made(tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session],
                       monkeypatch: pytest.MonkeyPatch, series, destinations: list[dict],
                       **settings_overrides: object) -> tuple[Settings, Worker, int]:
    """Settings and a worker that has run the first job of a queued CT study:
    (settings, worker, study id)."""
    settings = worker_settings(tmp_path, db_url, destinations=destinations, **settings_overrides)
    worker = make_worker(monkeypatch, settings, db_sessions, _writing_job(series), runner=reporting_runner())
    with db_sessions() as session:
        _, study_id = queued_ct_study(session)
    assert worker.run_one()
    return settings, worker, study_id


def _reopen(sessions: sessionmaker[Session], study_id: int) -> None:
    """A late instance of the study arrives and the study completes again: a new job."""
    with sessions() as session:
        study = session.get(Study, study_id)
        series_uid = study.series[0].series_instance_uid
        late = api.utcnow() - timedelta(minutes=30)
        stored = api.record_instance(session, record(study.study_instance_uid, series_uid, 5, 25.0), now=late)
        assert stored.study_reopened
        assert api.sweep_completeness(session, api.utcnow() - timedelta(seconds=1), 60, 10, BUNDLES) == [study_id]


def _objects(sessions: sessionmaker[Session], result_id: int) -> list[ResultObject]:
    with sessions() as session:
        return list(session.execute(select(ResultObject).where(ResultObject.result_id == result_id)
                                    .order_by(ResultObject.id)).scalars())


def test_a_superseded_result_ends_rejected_at_the_pacs_by_a_note_listing_exactly_its_instances(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    pacs: tuple[OrderedSCP, OrderedSCP], series,
) -> None:
    wants, refuses = pacs
    _, worker, study_id = _first_result_made(tmp_path, db_url, db_sessions, monkeypatch, series,
                                             _destinations(wants, refuses))
    with db_sessions() as session:
        [first] = session.execute(select(Result.id)).scalars().all()
    old = {o.sop_instance_uid: o for o in _objects(db_sessions, first)}
    assert set(wants.received) == set(refuses.received) == set(old)  # nothing to reject yet

    _reopen(db_sessions, study_id)
    assert worker.run_one()
    with db_sessions() as session:
        new_result = session.execute(select(Result).where(Result.supersedes_result_id == first)).scalar_one()
        deliveries = session.execute(select(Delivery, ResultObject)
                                     .join(ResultObject, ResultObject.id == Delivery.result_object_id)).all()
    new_objects = _objects(db_sessions, new_result.id)
    [kos] = [o for o in new_objects if o.kind == ObjectKind.KOS]
    new = {o.sop_instance_uid for o in new_objects if o.kind != ObjectKind.KOS}

    # Everything delivered, each object once, recorded like any delivery.
    assert all(d.state == DeliveryState.DELIVERED for d, _ in deliveries)
    assert [d.destination for d, o in deliveries if o.kind == ObjectKind.KOS] == ["pacs"]
    assert all(n == 1 for n in wants.received.values()) and all(n == 1 for n in refuses.received.values())
    # The PACS that wants it holds the note, received after the whole new result.
    assert set(wants.received) == set(old) | new | {kos.sop_instance_uid}
    assert wants.order[-1] == kos.sop_instance_uid
    assert set(wants.order[len(old):-1]) == new
    # The one that does not want it has both results and no note.
    assert set(refuses.received) == set(old) | new

    received = wants.folder / f"{kos.sop_instance_uid}.dcm"
    assert dciodvfy_errors(received) == []
    note = pydicom.dcmread(received)
    listed = rejected_instances(note)
    assert set(listed) == set(old)
    for uid, (sop_class, series_uid) in listed.items():
        stored = pydicom.dcmread(wants.folder / f"{uid}.dcm", stop_before_pixels=True)
        assert (sop_class, series_uid) == (old[uid].sop_class_uid, str(stored.SeriesInstanceUID))
    assert note.StudyInstanceUID == pydicom.dcmread(received.with_name(f"{next(iter(old))}.dcm")).StudyInstanceUID

    with db_sessions() as session:
        event = session.execute(select(AuditEvent).where(AuditEvent.action == "result_recorded")
                                .order_by(AuditEvent.id.desc())).scalars().first()
    assert event.detail["rejection_note"] == kos.sop_instance_uid and event.detail["rejects_result_ids"] == [first]

    # Superseded once more: the next note rejects the second result only, never the first note.
    _reopen(db_sessions, study_id)
    assert worker.run_one()
    with db_sessions() as session:
        third = session.execute(select(Result).where(Result.supersedes_result_id == new_result.id)).scalar_one()
    [second_kos] = [o for o in _objects(db_sessions, third.id) if o.kind == ObjectKind.KOS]
    assert set(rejected_instances(pydicom.dcmread(wants.folder / f"{second_kos.sop_instance_uid}.dcm"))) == new
    assert all(n == 1 for n in wants.received.values())


def test_no_note_where_no_destination_wants_one(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    pacs: tuple[OrderedSCP, OrderedSCP], series,
) -> None:
    _, refuses = pacs
    destinations = [d for d in _destinations(*pacs) if d["name"] == "archive"]
    settings, worker, study_id = _first_result_made(tmp_path, db_url, db_sessions, monkeypatch, series, destinations)
    _reopen(db_sessions, study_id)
    assert worker.run_one()
    with db_sessions() as session:
        kinds = session.execute(select(ResultObject.kind)).scalars().all()
    assert ObjectKind.KOS not in kinds
    assert not list((settings.results_dir).rglob("kos.dcm"))  # not even built
    assert len(refuses.received) == len(kinds)


def test_a_note_that_cannot_be_built_never_costs_the_new_result(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    pacs: tuple[OrderedSCP, OrderedSCP], series, caplog: pytest.LogCaptureFixture,
) -> None:
    wants, _ = pacs
    settings, worker, study_id = _first_result_made(tmp_path, db_url, db_sessions, monkeypatch, series,
                                                    _destinations(*pacs)[:1])
    with db_sessions() as session:
        [first] = session.execute(select(Result.id)).scalars().all()
    for obj in _objects(db_sessions, first):
        (settings.storage_dir / obj.path).unlink()  # the old result's files are gone (removed by hand)
    _reopen(db_sessions, study_id)
    caplog.set_level(logging.INFO)
    assert worker.run_one()
    with db_sessions() as session:
        results = session.execute(select(Result).order_by(Result.id)).scalars().all()
        kinds = session.execute(select(ResultObject.kind)).scalars().all()
        states = set(session.execute(select(Delivery.state)).scalars())
    assert [r.superseded for r in results] == [True, False]
    assert ObjectKind.KOS not in kinds and states == {DeliveryState.DELIVERED}
    assert any("rejection note not built" in r.getMessage() for r in caplog.records)


def test_the_delivery_round_sends_a_note_right_after_its_result(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    pacs: tuple[OrderedSCP, OrderedSCP], series,
) -> None:
    """A PACS down while the new result was made: the scheduler's next round (all results)
    sends the new result, then its note, in that one call."""
    from headscreen.daemon.delivery import deliver_due

    wants, _ = pacs
    settings, worker, study_id = _first_result_made(
        tmp_path, db_url, db_sessions, monkeypatch, series, _destinations(*pacs)[:1],
        delivery={"base_delay_s": 0.01, "max_delay_s": 0.01, "timeout_s": 5})
    wants.stop()
    _reopen(db_sessions, study_id)
    assert worker.run_one()  # its delivery fails: the PACS is down
    with db_sessions() as session:
        assert DeliveryState.PENDING in set(session.execute(select(Delivery.state)).scalars())
    wants.start()
    time.sleep(0.1)  # past the 0.01 s backoff: on a fast machine the round could otherwise come too early
    stats = deliver_due(db_sessions, settings)
    with db_sessions() as session:
        newest = session.execute(select(Result.id).where(Result.superseded.is_(False))).scalar_one()
        states = set(session.execute(select(Delivery.state)).scalars())
    assert states == {DeliveryState.DELIVERED}
    assert stats.delivered == len(_objects(db_sessions, newest))  # the new result and its note
    assert pydicom.dcmread(wants.folder / f"{wants.order[-1]}.dcm").SOPClassUID == KOS_STORAGE


def test_result_files_are_written_on_the_writer_thread_and_all_durable_before_the_build_returns(series, tmp_path,
                                                                                                 monkeypatch):
    """The build hands each encoded object to a writer thread (write and fdatasync release
    the GIL, so the next object is built meanwhile); it returns only once every file is
    written and synced, renamed into place."""
    import threading

    import headscreen.daemon.pipeline as pipeline

    real_write = pipeline.write_synced
    threads: list[str] = []

    def write(path, data, sync=True):
        threads.append(threading.current_thread().name)
        real_write(path, data, sync)

    monkeypatch.setattr(pipeline, "write_synced", write)
    paths = _result_files(series, tmp_path / "out")
    assert len(threads) == len(paths) and all(name.startswith("result-writer") for name in threads)
    assert all(path.stat().st_size > 0 for path in paths)
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_a_result_file_that_cannot_be_written_fails_the_build_and_leaves_no_file(series, tmp_path, monkeypatch):
    import headscreen.daemon.pipeline as pipeline

    real_write = pipeline.write_synced
    calls = []

    def write(path, data, sync=True):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, data, sync)

    monkeypatch.setattr(pipeline, "write_synced", write)
    datasets, error = series
    with pytest.raises(OSError, match="No space left"):
        _build_results(datasets, error, ct_summary(), choose_slices(error, 2), tmp_path / "out", 1.0)
    assert list((tmp_path / "out").iterdir()) == []
