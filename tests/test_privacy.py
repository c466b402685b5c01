"""No patient or study value reaches a log line, a stored error, or the console's error
views: distinctive values are sent through every failure path the worker has, and every
output is searched for them."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db_factories import BUNDLES, CT_IMAGE_STORAGE
from headscreen.daemon.config import Settings
from headscreen.daemon.logs import JsonFormatter, TextFormatter
from headscreen.daemon.web import create_app
from headscreen.db import api
from headscreen.db.models import AuditEvent, Delivery, Job
from headscreen.db.states import JobState
from headscreen.errors import InputRejected, TransientError
from headscreen.privacy import failure_reason, scrub, withhold_values_in_logs
from web_helpers import ADMIN, VIEWER, add_users, seed
from worker_helpers import make_worker, queued_ct_study, worker_settings

PATIENT_NAME = "Zzyzx^Quorra"
PATIENT_ID = "PID-8472-QQ"
BIRTH_DATES = ("19010203", "1970-01-01")  # a valid DA, and a malformed one
# Also the parts a message might quote on their own (none that a random UID could hold).
SECRETS = (PATIENT_NAME, "Zzyzx", "Quorra", PATIENT_ID, "8472-QQ", *BIRTH_DATES, "1970-01")


def _leaks(text: str) -> list[str]:
    return [value for value in SECRETS if value in text]


def _write_instance(path: Path, birth_date: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the malformed date is the point
        ds.PatientBirthDate = birth_date
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _read_first_instance(study) -> Dataset:  # type: ignore[no-untyped-def]
    first = next(iter(study.series.values()))[0]
    return pydicom.dcmread(first)


# What goes wrong inside run_job, each as it would on these values: the libraries'
# own errors (which quote the value), ours, and a transient one.
def _pydicom_decodes_the_birth_date(ds: Dataset) -> None:
    DA(ds.PatientBirthDate)  # ValueError "Unable to convert '1970-01-01' to 'DA' object" when malformed
    float(ds.PatientBirthDate[:4] + "x")  # the valid date fails here, quoting it


def _number_parsed_from_the_patient_id(ds: Dataset) -> None:
    float(ds.PatientID)


def _lookup_by_the_name(ds: Dataset) -> None:
    {}[str(ds.PatientName)]


def _a_bug_that_formats_everything(ds: Dataset) -> None:
    raise RuntimeError(f"cannot handle {ds.PatientName} {ds.PatientID} born {ds.PatientBirthDate}")


def _our_error_naming_the_values(ds: Dataset) -> None:
    raise InputRejected(f"PatientName={ds.PatientName} PatientID={ds.PatientID!r} "
                        f"PatientBirthDate={ds.PatientBirthDate} is not usable")


def _transient_error_quoting_the_values(ds: Dataset) -> None:
    raise TransientError(f"database busy while storing {str(ds.PatientName)!r}, {ds.PatientID!r}, "
                         f"{ds.PatientBirthDate!r}")


FAILURES: dict[str, Callable[[Dataset], None]] = {
    "pydicom_value_error": _pydicom_decodes_the_birth_date,
    "float_of_patient_id": _number_parsed_from_the_patient_id,
    "key_error_on_name": _lookup_by_the_name,
    "bug_formatting_values": _a_bug_that_formats_everything,
    "input_rejected_naming_values": _our_error_naming_the_values,
    "transient_error_quoting_values": _transient_error_quoting_the_values,
}


class RawRecords(logging.Filter):
    """Our own loggers' records as emitted, before any handler's filter touches them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.lines.append(JsonFormatter().format(record))
        return True


@pytest.fixture
def raw_records() -> Iterator[RawRecords]:
    raw = RawRecords()
    loggers = [logging.getLogger(f"headscreen.{name}") for name in ("daemon.worker", "db.jobs", "daemon.delivery")]
    for logger in loggers:
        logger.addFilter(raw)
    yield raw
    for logger in loggers:
        logger.removeFilter(raw)


@pytest.fixture
def production_log_filter(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """caplog's handler filtered as `headscreen serve` filters its handlers."""
    withhold_values_in_logs([caplog.handler])
    yield
    logging.captureWarnings(False)
    caplog.handler.filters.clear()


def _console_texts(settings: Settings, sessions: sessionmaker[Session], study_uid: str) -> dict[str, str]:
    """Every view that shows error text, as a viewer and as an admin."""
    texts = {}
    for who in (VIEWER, ADMIN):
        client = TestClient(create_app(settings, sessions, BUNDLES), follow_redirects=False)
        assert client.post("/api/v1/login", json={"username": who[0], "password": who[1]}).status_code == 200
        for path in ("/api/v1/failures", f"/api/v1/studies/{study_uid}", f"/api/v1/studies/{study_uid}/audit",
                     "/api/v1/audit", "/failures", f"/studies/{study_uid}"):
            response = client.get(path)
            assert response.status_code == 200, (who[0], path, response.status_code)
            texts[f"{who[0]} {path}"] = response.text
    return texts


def _stored_error_text(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        jobs = [json.dumps({c.name: getattr(j, c.name) for c in Job.__table__.columns}, default=str)
                for j in session.execute(select(Job)).scalars()]
        audit = [json.dumps(e.detail, default=str) for e in session.execute(select(AuditEvent)).scalars()]
        deliveries = [str(d.last_error) for d in session.execute(select(Delivery)).scalars()]
    return jobs + audit + deliveries


@pytest.mark.parametrize("birth_date", BIRTH_DATES)
@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failing_job_leaks_no_patient_value(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, raw_records: RawRecords, production_log_filter: None,
    failure: str, birth_date: str,
) -> None:
    settings = worker_settings(tmp_path, db_url, job_max_attempts=1)  # the first failure is final
    with db_sessions() as session:
        study_uid, study_id = queued_ct_study(session)
        for items in api.study_instances(session, study_id).values():
            for path, _ in items:
                _write_instance(settings.storage_dir / path, birth_date)
        add_users(session)

    def run_job(ticket, study, *_args: object, **_kwargs: object):  # type: ignore[no-untyped-def]
        ds = _read_first_instance(study)
        assert str(ds.PatientName) == PATIENT_NAME  # the values really are in play
        FAILURES[failure](ds)
        raise AssertionError("the failure did not happen")

    worker = make_worker(monkeypatch, settings, db_sessions, run_job)
    caplog.set_level(logging.DEBUG)
    assert worker.run_one()

    with db_sessions() as session:
        job = session.execute(select(Job).where(Job.study_id == study_id)).scalar_one()
    assert job.state == JobState.FAILED
    assert job.last_error and job.last_error.split(":")[0].split(" ")[0] in (
        "ValueError", "KeyError", "RuntimeError", "InputRejected", "TransientError")

    assert any("job" in line for line in raw_records.lines)
    assert {line: _leaks(line) for line in raw_records.lines if _leaks(line)} == {}
    emitted = [caplog.text] + [f(r) for r in caplog.records for f in (JsonFormatter().format, TextFormatter().format)]
    assert {line: _leaks(line) for line in emitted if _leaks(line)} == {}
    assert {row: _leaks(row) for row in _stored_error_text(db_sessions) if _leaks(row)} == {}
    views = _console_texts(settings, db_sessions, study_uid)
    assert {view: _leaks(text) for view, text in views.items() if _leaks(text)} == {}
    # The sanitised reason is still there to read.
    assert job.last_error.split(" ")[0].rstrip(":") in views[f"{VIEWER[0]} /api/v1/failures"]


def test_error_text_stored_before_sanitising_is_scrubbed_in_every_view(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session]
) -> None:
    """Rows written by earlier versions kept str(exc); views scrub on the way out."""
    settings = worker_settings(tmp_path, db_url)
    with db_sessions() as session:
        seeded = seed(session, settings.storage_dir, api.utcnow())
        add_users(session)
        raw = (f"ValueError: Unable to convert '{BIRTH_DATES[1]}' to 'DA' object; patient {PATIENT_NAME} "
               f"PatientID {PATIENT_ID} born {BIRTH_DATES[0]}")
        session.execute(update(Job).where(Job.state == JobState.FAILED).values(last_error=raw))
        session.execute(update(Delivery).where(Delivery.last_error.is_not(None)).values(last_error=raw))
        for event in session.execute(select(AuditEvent).where(AuditEvent.action == "job_failed")).scalars():
            event.detail = {**event.detail, "reason": raw}
        session.commit()
    for study_uid in (seeded.failed_job, seeded.dead_delivery):
        views = _console_texts(settings, db_sessions, study_uid)
        assert {view: _leaks(text) for view, text in views.items() if _leaks(text)} == {}
        assert "ValueError" in views[f"{VIEWER[0]} /api/v1/failures"]


def test_log_filter_withholds_exception_messages_and_library_warnings(caplog: pytest.LogCaptureFixture) -> None:
    withhold_values_in_logs([caplog.handler])
    try:
        caplog.set_level(logging.DEBUG)
        try:
            DA(BIRTH_DATES[1])
        except ValueError:
            logging.getLogger("headscreen.daemon.receiver").exception("C-STORE data set does not decode")
        logging.getLogger("pydicom").warning(f"Invalid value for VR DA: '{BIRTH_DATES[1]}'")
        logging.getLogger("headscreen.daemon.pipeline").warning("unreadable stored instance",
                                                     extra={"error": f"bad name {PATIENT_NAME}"})
        logging.getLogger("headscreen.export").warning("association %s", f"refused for {PATIENT_ID!r}")
        warnings.warn_explicit(f"Invalid value for VR PN: {PATIENT_NAME!r}", UserWarning, "x.py", 1)
    finally:
        logging.captureWarnings(False)
        caplog.handler.filters.clear()
    assert len(caplog.records) >= 4
    emitted = caplog.text + "".join(JsonFormatter().format(r) for r in caplog.records)
    assert _leaks(emitted) == []
    decode = next(r for r in caplog.records if r.getMessage() == "C-STORE data set does not decode")
    assert "valuerep.py" in decode.error_trace and "ValueError" in decode.error_trace  # where, not what


def test_scrub_and_failure_reason_keep_our_words() -> None:
    assert scrub("PACS busy") == "PACS busy"
    assert scrub("lease expired (worker host:123:w0, attempt 3)") == "lease expired (worker host:123:w0, attempt 3)"
    assert scrub("study 1.2.840.113619.2.55.3.20260105123456 has no series") == \
        "study 1.2.840.113619.2.55.3.20260105123456 has no series"
    text = scrub(f"{PATIENT_NAME} {BIRTH_DATES[0]} {BIRTH_DATES[1]} PatientID: {PATIENT_ID} 'quoted'")
    assert _leaks(text) == [] and "quoted" not in text
    try:
        DA(BIRTH_DATES[1])
    except ValueError as exc:
        reason = failure_reason(exc)
    assert reason.startswith("ValueError") and "pydicom/valuerep.py" in reason and _leaks(reason) == []
    assert failure_reason(InputRejected("insufficient_coverage: 80 mm < 120 mm")) == \
        "InputRejected: insufficient_coverage: 80 mm < 120 mm"


@pytest.mark.parametrize("token", [
    "b2fa8975-9259-43b3-a1c4-0d2e5f6a7b8c",  # digit runs 8975-9259 read like a date
    "20261202-1a2b-4c3d-8e9f-0a1b2c3d4e5f",
    "deadbeef-2026-1202-8e9f-000000000000",
    "b2fa8975-1234-4567-8e9f-0a1b2c3d4e5f",  # 1234-4567 between dashes
])
def test_scrub_keeps_a_storage_id_whose_digits_look_like_a_date(token: str) -> None:
    message = f"storage folder has no .headscreen-storage-id matching {token}"
    assert scrub(message) == message
    # A date standing alone beside it is still withheld.
    assert scrub(f"{token} seen 2026-12-02") == f"{token} seen <withheld>"
