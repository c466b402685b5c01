"""Bad header values through the real receiver (issue 12 item 1): one bad value never
costs an instance its Success status or its row, on SQLite and on PostgreSQL.

Each mutation of tests/bad_input.py, and a few more that the database columns invite
(text longer than its column, NUL and control characters, numbers out of an integer
column's range, a position that is not finite), damages the files of its own study.
The files are sent byte for byte over one association per study, as a PACS forwards
them. Every instance whose identity and data set are intact is answered 0x0000 and has
its row; each recorded value is valid for its column or left out (None), text is cut
to its column's length; and no patient value is in a log line of ours, a status comment
or the rejection table. An identifying UID that does not decode still refuses its
instance (0xC210), and only that instance.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bad_input import BIRTH_DATE, MUTATIONS, PATIENT, PATIENT_ID, Mutation, damage, leaks, set_raw
from headscreen.daemon.logs import JsonFormatter
from headscreen.daemon.receiver import StoreStatus
from headscreen.db.models import Instance, Series, Study
from receiver_helpers import SCP_AE, SCU_AE, Harness, start_harness, write_ct_series

SEED = 1201
SLICES = 3


def _const(keyword: str, value: bytes, vr: str | None = None) -> Callable[[Dataset, random.Random], None]:
    return lambda ds, _rng: set_raw(ds, keyword, value, vr)


# What the columns invite beyond the catalogue: each value would overflow or corrupt its column.
COLUMN_MUTATIONS = [
    Mutation("station_name_long", "all", _const("StationName", b"S" * 90, "LO")),
    Mutation("institution_long", "all", _const("InstitutionName", b"I" * 100, "UT")),
    Mutation("series_description_long", "all", _const("SeriesDescription", b"D" * 100, "UT")),
    Mutation("station_name_nul", "all", _const("StationName", b"CT\x0001")),
    Mutation("institution_controls", "all", _const("InstitutionName", b"Ward\x01\x02 3\x7f")),
    Mutation("modality_long", "all", _const("Modality", b"CTCTCTCTCTCTCTCTCTCT")),
    Mutation("modality_unknown_vr", "all", _const("Modality", b"CT", "ZZ")),
    Mutation("age_too_long", "all", _const("PatientAge", b"0064Y ")),
    Mutation("age_unknown_vr", "all", _const("PatientAge", b"064Y", "ZZ")),
    Mutation("study_date_two_values", "all", _const("StudyDate", b"20240101\\20240102")),
    Mutation("study_date_unknown_vr", "all", _const("StudyDate", b"20240102", "ZZ")),
    Mutation("birth_date_nul", "all", _const("PatientBirthDate", b"1948\x000312")),
    Mutation("series_number_huge", "all", _const("SeriesNumber", b"99999999999")),
    Mutation("series_number_unknown_vr", "all", _const("SeriesNumber", b"2 ", "ZZ")),
    Mutation("instance_number_huge_one", "one", _const("InstanceNumber", b"-99999999999")),
    Mutation("images_in_acquisition_huge", "all", _const("ImagesInAcquisition", b"4294967296")),
    Mutation("series_description_unknown_vr", "all", _const("SeriesDescription", b"HEAD", "ZZ")),
    Mutation("position_not_finite_one", "one", _const("ImagePositionPatient", b"nan\\0\\1e999")),
    Mutation("orientation_unknown_vr_one", "one", _const("ImageOrientationPatient", b"1\\0\\0\\0\\1\\0", "ZZ")),
]
ALL_MUTATIONS = [*MUTATIONS, *COLUMN_MUTATIONS]
# The one mutation that breaks the data set itself (its slice is cut short): that slice
# is refused as undecodable, the others of its study are stored.
CUT_SHORT = "file_cut_short_one"

# The study, series and (for "one" mutations: the damaged) instance's values when untouched.
UNTOUCHED: dict[str, object] = {
    "study_date": "20240102", "patient_age": "064Y", "patient_birth_date": BIRTH_DATE, "station_name": "CT01",
    "institution": "Synthetic Hospital", "modality": "CT", "series_number": 2, "series_description": "HEAD 2.5mm",
}
# What a deterministic mutation leaves in the rows (other values as UNTOUCHED).
EXPECTED: dict[str, dict[str, object]] = {
    "birth_date_iso": {"patient_birth_date": None},
    "birth_date_zeros": {"patient_birth_date": None},
    "birth_date_wrong_vr": {"patient_birth_date": None},
    "birth_date_nul": {"patient_birth_date": None},
    "study_date_wrong_vr": {"study_date": None},
    "study_date_bad": {"study_date": None},
    "study_date_two_values": {"study_date": None},
    "study_date_unknown_vr": {"study_date": None},
    "study_time_bad": {},
    "charset_unknown": {},
    "charset_bytes": {},
    "name_unknown_vr": {},
    "institution_unknown_vr": {"institution": None},
    "institution_long": {"institution": "I" * 64},
    "institution_controls": {"institution": "Ward 3"},
    "station_name_long": {"station_name": "S" * 64},
    "station_name_nul": {"station_name": "CT01"},
    "series_description_long": {"series_description": "D" * 64},
    "series_description_unknown_vr": {"series_description": None},
    # The SOP class (CT Image Storage) stands in: bundles are matched by modality.
    "modality_long": {"modality": "CT"},
    "modality_unknown_vr": {"modality": "CT"},
    "age_bad": {"patient_age": None},
    "age_too_long": {"patient_age": None},
    "age_unknown_vr": {"patient_age": None},
    "series_number_huge": {"series_number": None},
    "series_number_unknown_vr": {"series_number": None},
    "name_too_many_parts": {},
    "name_bad_bytes": {},
    "patient_id_too_long": {},
    "sex_bad": {},
    "frame_of_reference_bad": {},
    "slice_thickness_bad": {},
}

_INT32 = range(-(2 ** 31), 2 ** 31)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd]")


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # The files' bytes after their meta group go over the wire as they are (pynetdicom
    # would otherwise decode and re-encode each element, and fail on an unknown VR).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def any_db_harness(tmp_path: Path, db_sessions: sessionmaker[Session]) -> Iterator[Harness]:
    """The receiver on each database backend (SQLite file and PostgreSQL, from conftest)."""
    h = start_harness(tmp_path, db_sessions)
    yield h
    h.receiver.shutdown()


def _send(port: int, paths: list[Path]) -> list[pydicom.Dataset]:
    ae = AE(ae_title=SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(path) for path in paths]
    finally:
        assoc.release()


def _is_da(value: str) -> bool:
    if not re.fullmatch(r"\d{8}", value):
        return False
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return False
    return True


def _column_problems(study: Study, series: Series, instances: list[Instance]) -> list[str]:
    """Values a row should never hold: what PostgreSQL refuses and SQLite would keep."""
    found = []
    for name in ("study_date", "patient_birth_date"):
        value = getattr(study, name)
        if value is not None and not _is_da(value):
            found.append(f"{name} is not a DA")
    if study.patient_age is not None and not re.fullmatch(r"\d{3}[DWMY]", study.patient_age):
        found.append("patient_age is not an AS")
    for row, name, limit in [(study, "station_name", 64), (study, "institution", 64), (study, "modality", 16),
                             (series, "series_description", 64), (series, "modality", 16)]:
        value = getattr(row, name)
        if value is not None and (len(value) > limit or _CONTROL.search(value) or value != value.strip()
                                  or not value):
            found.append(f"{type(row).__name__}.{name} is not clean text of at most {limit}")
    numbers = [("series_number", series.series_number)]
    for instance in instances:
        numbers += [("instance_number", instance.instance_number),
                    ("images_in_acquisition", instance.images_in_acquisition),
                    ("number_of_frames", instance.number_of_frames)]
        if instance.slice_position is not None and not math.isfinite(instance.slice_position):
            found.append("slice_position is not finite")
    found += [f"{name} outside the integer column" for name, value in numbers
              if value is not None and value not in _INT32]
    return found


def _our_log_text(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Our loggers' records as emitted and as objects (extras, exception and all)."""
    return [f"{JsonFormatter().format(r)} {r.__dict__}" for r in caplog.records
            if r.name.startswith("headscreen.")]


def test_every_instance_with_its_identity_intact_is_stored_and_recorded(
        any_db_harness: Harness, tmp_path: Path, chunked_send: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="headscreen")
    problems: dict[str, list[str]] = {}
    comments: list[str] = []
    damaged_slice: dict[str, str] = {}
    studies: dict[str, str] = {}
    for k, mutation in enumerate(ALL_MUTATIONS):
        files = write_ct_series(tmp_path / mutation.name, SLICES, rows=16, cols=16, seed=SEED + k,
                                extra={**PATIENT, "PatientID": PATIENT_ID})
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        studies[mutation.name] = headers[0].StudyInstanceUID
        (touched, *_) = damage(files, mutation, random.Random(SEED * 100 + k))
        damaged_slice[mutation.name] = headers[files.index(touched)].SOPInstanceUID
        statuses = _send(any_db_harness.port, files)
        comments += [str(s.get("ErrorComment", "")) for s in statuses]
        expected = [StoreStatus.SUCCESS] * SLICES
        if mutation.name == CUT_SHORT:
            expected[files.index(touched)] = StoreStatus.CANNOT_UNDERSTAND
        got = [int(s.Status) for s in statuses]
        if got != expected:
            problems[mutation.name] = [f"statuses {[f'0x{s:04X}' for s in got]}: "
                                       f"{[str(s.get('ErrorComment', '')) for s in statuses]}"]

    with any_db_harness.sessions() as session:
        for mutation in ALL_MUTATIONS:
            found = problems.setdefault(mutation.name, [])
            study = session.scalars(select(Study).where(Study.study_instance_uid == studies[mutation.name])).first()
            if study is None:
                found.append("no study row")
                continue
            (series,) = session.scalars(select(Series).where(Series.study_id == study.id)).all()
            instances = list(session.scalars(select(Instance).where(Instance.series_id == series.id)))
            stored = SLICES - (mutation.name == CUT_SHORT)
            if len(instances) != stored:
                found.append(f"{len(instances)} instance rows, not {stored}")
            found += _column_problems(study, series, instances)
            if mutation.name in EXPECTED:
                want = {**UNTOUCHED, **EXPECTED[mutation.name]}
                have = {name: getattr(series if name in ("series_number", "series_description") else study, name)
                        for name in want}
                found += [f"{name} = {have[name]!r}, not {want[name]!r}" for name in want if have[name] != want[name]]
            damaged = [i for i in instances if i.sop_instance_uid == damaged_slice[mutation.name]]
            if mutation.name in ("position_not_finite_one", "orientation_unknown_vr_one", "position_garbage_one"):
                if [i.slice_position for i in damaged] != [None]:
                    found.append("the damaged slice has a position")
                if any(i.slice_position is None for i in instances if i not in damaged):
                    found.append("an intact slice lost its position")
            if mutation.name == "instance_number_huge_one" and [i.instance_number for i in damaged] != [None]:
                found.append("the damaged slice kept an instance number")
    problems = {name: found for name, found in problems.items() if found}
    assert problems == {}, "\n".join(f"{name}: {found}" for name, found in problems.items())

    # Said so, by keyword: a debug line per instance, and a count per keyword.
    dropped = [r for r in caplog.records if getattr(r, "action", None) == "header_values_dropped"]
    assert {k for r in dropped for k in r.dropped} >= {"PatientBirthDate", "StudyDate", "InstitutionName",
                                                       "PatientAge", "Modality", "SeriesNumber"}
    assert {k for r in dropped for k in r.truncated} == {"StationName", "InstitutionName", "SeriesDescription"}
    counts = any_db_harness.receiver.stats.snapshot()["values_dropped"]
    assert counts["PatientBirthDate"] >= 4 * SLICES and counts["InstitutionName"] >= SLICES

    # No patient value in our logs, the status comments or the rejection table.
    rejections = any_db_harness.rejections()
    assert len(rejections) == 1 and rejections[0].sop_instance_uid == damaged_slice[CUT_SHORT]
    assert [c for c in comments if leaks(c)] == []
    assert [str(vars(r)) for r in rejections if leaks(str(vars(r)))] == []
    assert [line for line in _our_log_text(caplog) if leaks(line)] == []


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_an_identifying_uid_that_does_not_decode_still_refuses_the_instance(
        any_db_harness: Harness, tmp_path: Path, chunked_send: None, keyword: str) -> None:
    files = write_ct_series(tmp_path / "ct", 2, rows=16, cols=16, seed=SEED,
                            extra={**PATIENT, "PatientID": PATIENT_ID})
    damage(files[:1], Mutation(f"{keyword}_unknown_vr", "all", _const(keyword, b"1.2.3.4", "ZZ")),
           random.Random(SEED))
    statuses = _send(any_db_harness.port, files)
    assert [int(s.Status) for s in statuses] == [StoreStatus.CANNOT_UNDERSTAND, StoreStatus.SUCCESS]
    assert len(any_db_harness.instances()) == 1
    (rejection,) = any_db_harness.rejections()
    assert rejection.status == StoreStatus.CANNOT_UNDERSTAND and not leaks(str(vars(rejection)))
