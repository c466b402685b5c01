"""The worker's lease: kept alive while the job runs, never reported lost because the
job ended, reported lost when the job was really taken away. And how a job that raised
ends: an input error is never retried, and the study gets its not-eligible report."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import headscreen.daemon.worker
from bad_input import BAD_BIRTH_DATES, PATIENT_ID, PATIENT_NAME, leaks, set_raw
from db_factories import CT_IMAGE_STORAGE, claimed_job, outcome
from headscreen.daemon.logs import JsonFormatter
from headscreen.db import api
from headscreen.db.models import Job, Result, ResultObject
from headscreen.db.states import JobState
from serve_harness import dciodvfy_errors
from worker_helpers import make_worker, queued_ct_study, record_stored_files, reporting_runner, worker_settings

HEARTBEATS_WORTH_S = 0.2  # ten heartbeats at heartbeat_s = 0.02
HEARTBEAT_WAIT_S = 30.0  # the most a job waits for its heartbeat thread on a loaded machine


def _wait_for(predicate, what: str) -> None:
    """Poll until `predicate()` holds: ten heartbeats' time is not always ten heartbeats
    on a busy machine (two xdist workers, training), so the job waits for the thread."""
    deadline = time.monotonic() + HEARTBEAT_WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {HEARTBEAT_WAIT_S:.0f} s"
        time.sleep(0.01)


def _renewed(job: Job) -> bool:
    return job.heartbeat_at is not None and job.started_at is not None and job.heartbeat_at > job.started_at


def _lease_lost_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "lease lost" in r.getMessage()]


def _job(sessions: sessionmaker[Session], study_id: int) -> Job:
    with sessions() as session:
        return session.execute(select(Job).where(Job.study_id == study_id)).scalar_one()


def test_a_normal_job_with_a_slow_delivery_logs_no_lease_lost(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with db_sessions() as session:
        _, study_id = queued_ct_study(session)

    def slow_job(*_args: object, **_kwargs: object):
        time.sleep(HEARTBEATS_WORTH_S)  # heartbeats happen while the job runs
        _wait_for(lambda: _renewed(_job(db_sessions, study_id)), "heartbeat")
        return outcome(objects=[])

    delivered: list[int] = []

    def slow_pacs(_sessions: object, _settings: object, result_id: int) -> None:
        time.sleep(HEARTBEATS_WORTH_S)  # a delivery as long as the job: the old heartbeat was still beating here
        delivered.append(result_id)

    monkeypatch.setattr(headscreen.daemon.worker, "deliver_due", slow_pacs)
    worker = make_worker(monkeypatch, worker_settings(tmp_path, db_url), db_sessions, slow_job)
    caplog.set_level(logging.DEBUG)

    assert worker.run_one()

    job = _job(db_sessions, study_id)
    assert job.state == JobState.DONE
    assert job.heartbeat_at is not None and job.started_at is not None and job.heartbeat_at > job.started_at
    assert len(delivered) == 1
    assert _lease_lost_records(caplog) == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_failed_job_logs_no_lease_lost(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with db_sessions() as session:
        _, study_id = queued_ct_study(session)

    def broken_job(*_args: object, **_kwargs: object):
        time.sleep(HEARTBEATS_WORTH_S)
        raise RuntimeError("a bug")

    worker = make_worker(monkeypatch, worker_settings(tmp_path, db_url), db_sessions, broken_job)
    caplog.set_level(logging.DEBUG)
    assert worker.run_one()
    time.sleep(HEARTBEATS_WORTH_S)  # a heartbeat thread left running would renew (and be refused) now

    assert _job(db_sessions, study_id).state == JobState.QUEUED  # retried later
    assert _lease_lost_records(caplog) == []


def test_a_lease_taken_back_mid_job_still_warns_and_discards_the_result(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with db_sessions() as session:
        _, study_id = queued_ct_study(session)

    def job_outlived_by_its_lease(*_args: object, **_kwargs: object):
        # As if this worker had stalled past its lease: the sweep takes the job back, another worker claims it.
        later = api.utcnow() + timedelta(hours=1)
        with db_sessions() as session:
            assert api.requeue_expired(session, later) == 1
            assert api.claim_job(session, "other-worker", 30, later) is not None
        time.sleep(HEARTBEATS_WORTH_S)
        _wait_for(lambda: _lease_lost_records(caplog), "refused heartbeat")  # the next renewal is refused
        return outcome(objects=[])

    worker = make_worker(monkeypatch, worker_settings(tmp_path, db_url), db_sessions, job_outlived_by_its_lease)
    caplog.set_level(logging.INFO)
    assert worker.run_one()

    lost = _lease_lost_records(caplog)
    assert lost and all(r.levelno == logging.WARNING for r in lost)
    assert any("result discarded" in r.getMessage() for r in caplog.records)
    job = _job(db_sessions, study_id)
    assert (job.state, job.lease_owner) == (JobState.RUNNING, "other-worker")
    with db_sessions() as session:
        assert session.execute(select(Result).where(Result.study_id == study_id)).first() is None


def test_heartbeat_after_its_own_finish_is_refused_quietly(
    db_session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    ticket = claimed_job(db_session, worker="w1")
    assert api.finish_job(db_session, ticket.job_id, "w1", outcome(objects=[]), []) is not None
    caplog.set_level(logging.INFO)
    assert not api.heartbeat(db_session, ticket.job_id, "w1", 60)
    assert _lease_lost_records(caplog) == []
    assert not api.heartbeat(db_session, ticket.job_id, "intruder", 60)  # never held it: a real loss
    assert len(_lease_lost_records(caplog)) == 1


# --------------------------------------------------------------------------- input errors

def _stored_instances(storage: Path, count: int = 3) -> list[Path]:
    """CT instances of one series (headers only) whose PatientBirthDate does not decode."""
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, number
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PatientName, ds.PatientID, ds.PatientSex = PATIENT_NAME, PATIENT_ID, "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = (
            "20260105", "090000", "", "1", "")
        set_raw(ds, "PatientBirthDate", BAD_BIRTH_DATES[0].encode())
        path = storage / study / series / f"{number}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _decodes_the_birth_date(_ticket: object, study, *_args: object, **_kwargs: object):  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(next(iter(study.series.values()))[0])
    DA(ds.PatientBirthDate)  # pydicom refuses it, quoting the value
    raise AssertionError("the birth date decoded")


def _our_log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [JsonFormatter().format(r) for r in caplog.records if r.name.startswith("headscreen.")]


def test_an_input_error_is_never_retried_and_the_study_gets_its_not_eligible_report(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = worker_settings(tmp_path, db_url)  # three attempts allowed: none is used
    with db_sessions() as session:
        _, study_id = record_stored_files(session, settings.storage_dir, _stored_instances(settings.storage_dir))
    worker = make_worker(monkeypatch, settings, db_sessions, _decodes_the_birth_date, runner=reporting_runner())
    caplog.set_level(logging.INFO)
    assert worker.run_one()

    job = _job(db_sessions, study_id)
    assert (job.state, job.attempts, job.last_error) == (JobState.DONE, 1, None)
    with db_sessions() as session:
        [result] = session.execute(select(Result).where(Result.study_id == study_id)).scalars().all()
        objects = session.execute(select(ResultObject).where(ResultObject.result_id == result.id)).scalars().all()
    assert not result.eligible
    assert result.ineligible_reason == ("input_undecodable: a value of the stored instances does not decode "
                                        "or is not valid (ValueError)")
    # The undecodable value is left out of the report, and the report says so by keyword.
    assert any(r.startswith("header_values_dropped: PatientBirthDate ") for r in result.qc_reasons)
    assert sorted(o.kind for o in objects) == ["sc", "sr"]
    for obj in objects:
        assert dciodvfy_errors(settings.storage_dir / obj.path) == [], obj.path
    sr = pydicom.dcmread(settings.storage_dir / next(o.path for o in objects if o.kind == "sr"))
    assert (sr.PatientID, str(sr.PatientName), sr.PatientBirthDate) == (PATIENT_ID, PATIENT_NAME, "")
    texts = [str(result.ineligible_reason), *map(str, result.qc_reasons), *_our_log_lines(caplog)]
    assert [t for t in texts if leaks(t) or PATIENT_NAME in t] == []
    assert not any("retried on less" in r.getMessage() for r in caplog.records)  # the full report went out


def test_an_input_error_whose_report_fails_too_fails_the_job_at_once(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = worker_settings(tmp_path, db_url)
    with db_sessions() as session:
        _, study_id = record_stored_files(session, settings.storage_dir, _stored_instances(settings.storage_dir))

    def no_report(*_args: object, **_kwargs: object):
        DA(BAD_BIRTH_DATES[1])

    monkeypatch.setattr(headscreen.daemon.worker, "not_screened_after_error", no_report)
    worker = make_worker(monkeypatch, settings, db_sessions, _decodes_the_birth_date, runner=reporting_runner())
    caplog.set_level(logging.INFO)
    assert worker.run_one()
    job = _job(db_sessions, study_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)  # not retried: it would fail the same way
    assert job.last_error.startswith("ValueError (message withheld)") and not leaks(job.last_error)
    assert [line for line in _our_log_lines(caplog) if leaks(line)] == []


def test_storage_trouble_while_reporting_an_input_error_is_retried(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = worker_settings(tmp_path, db_url)
    files = _stored_instances(settings.storage_dir)
    with db_sessions() as session:
        _, study_id = record_stored_files(session, settings.storage_dir, files)

    def decodes_then_loses_a_file(ticket, study, *args, **kwargs):  # type: ignore[no-untyped-def]
        files[-1].unlink()  # as if the share went away between the two reads
        _decodes_the_birth_date(ticket, study, *args, **kwargs)

    worker = make_worker(monkeypatch, settings, db_sessions, decodes_then_loses_a_file, runner=reporting_runner())
    assert worker.run_one()
    job = _job(db_sessions, study_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    assert job.last_error.startswith("TransientError")


@pytest.mark.parametrize(("admin_setting", "huge_pages_after"), [(None, "False"), ("1", "True")])
def test_a_worker_asks_numpy_for_small_pages_unless_an_admin_chose(admin_setting: str | None,
                                                                   huge_pages_after: str) -> None:
    """numpy's switch returns its previous value: what the worker left it at."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if admin_setting is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = admin_setting
    code = ("from headscreen.daemon.worker import numpy_hugepage_switch, use_small_pages\n"
            "numpy_hugepage_switch()(True)  # as numpy starts on a THP kernel\n"
            "use_small_pages()\n"
            "print(numpy_hugepage_switch()(True))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == huge_pages_after
