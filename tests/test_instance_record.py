"""The receiver's row of an instance (daemon/instance_record.py): values in their plainest
form are converted from their bytes, everything else by pydicom. Both ways must give the
same row, the same values left out or cut, the same refusal: each case here is built once
and read both ways, in implicit and in explicit VR."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bad_input import MUTATIONS, RANDOM_BYTES_IN, set_raw
from headscreen.daemon import instance_record
from headscreen.daemon.dataset_check import parse_header
from headscreen.daemon.instance_record import build_record
from headscreen.daemon.storage import InstanceStore, InvalidUid
from receiver_helpers import write_ct_series

TEXT = [b"CT", b" CT ", b"MR  ", b"A\\B", b"A \\B ", b"    ", b"x" * 100, b"caf\xe9", b"Ward\x01 3", b"CT\x00",
        b"~`{}|", b"\xff\xfe", b"ISO_IR 100"]
INTEGERS = [b"5", b"5 ", b" 5", b"+12", b"-3", b"0012", b"1.0", b"1e3", b"abc", b"99999999999", b"3000000000",
            b"-2147483649 ", b"1\\2", b"12345678901", b"123456789012", b"-0", b"+ 1"]
DATES = [b"20240102", b"20241301", b"20240230", b"2024-01-02", b"20240102\\20240103", b"00000000", b" 2024010",
         b"2024010 ", b"19480312"]
AGES = [b"064Y", b"064y", b"64Y ", b"0064Y ", b"064X", b"999D", b"000W"]
DECIMALS = [b"1.5\\-2\\3", b"1\\0\\0\\0\\1\\0", b" 1.5 \\2\\3 ", b"1e3\\.5\\5.", b"nan\\1\\2", b"1,5\\2\\3",
            b"1.5\\2", b"12345678901234567\\1\\2", b"1\\0\\0\\0\\0\\0", b"+1\\-0\\0", b"inf\\0\\0", b"1E+02\\-1e-2\\0",
            b"1\\2\\3\\4", b"\\1\\2", b"1.5\\-2\\3\\"]
UIDS = [b"1.2.3", b"1.2.3\x00", b"1.2.3 ", b"01.2", b"1..2", b"1.2.a", b"1" * 70, b"1.2.840.10008.5.1.4.1.1.2"]

CASES: list[tuple[str, bytes, str | None]] = (
    [(keyword, value, None) for keyword in ("Modality", "SeriesDescription", "StationName", "InstitutionName",
                                            "AccessionNumber", "PatientID") for value in TEXT]
    + [(keyword, value, None) for keyword in ("SeriesNumber", "InstanceNumber", "ImagesInAcquisition",
                                              "NumberOfFrames") for value in INTEGERS]
    + [(keyword, value, None) for keyword in ("StudyDate", "PatientBirthDate") for value in DATES]
    + [("PatientAge", value, None) for value in AGES]
    + [(keyword, value, None) for keyword in ("ImagePositionPatient", "ImageOrientationPatient")
       for value in DECIMALS]
    + [(keyword, value, None) for keyword in ("StudyInstanceUID", "SeriesInstanceUID") for value in UIDS]
    + [(keyword, b"", None) for keyword in ("Modality", "SeriesNumber", "StudyDate", "PatientAge",
                                            "ImagePositionPatient", "StudyInstanceUID")]
    # Another VR than the dictionary's (explicit VR only): pydicom reads it under that VR.
    + [("InstanceNumber", b"12", "LO"), ("StudyDate", b"20240102", "LO"), ("Modality", b"CT", "LO"),
       ("ImagePositionPatient", b"1\\2\\3", "LO"), ("PatientAge", b"064Y", "CS"), ("StationName", b"ST1", "UN")]
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    path = write_ct_series(tmp_path_factory.mktemp("ct"), 1, seed=21)[0]
    ds = pydicom.dcmread(path)
    ds.PixelData = b"\x00\x00"  # the header is what is read
    ds.PatientAge, ds.InstitutionName, ds.StationName, ds.AccessionNumber = "064Y", "HOSP", "ST1", "A1"
    ds.NumberOfFrames = 1
    return ds


def _header(ds: Dataset, implicit: bool) -> tuple[Dataset, str]:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    ds._read_charset = ds._character_set  # raw bytes stay as set (see bad_input.rewrite)
    write_dataset(buffer, ds)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return parse_header(buffer.getvalue(), syntax), syntax


def _read(ds: Dataset, implicit: bool, tmp_path: Path, *, plain: bool) -> Any:
    """(row, dropped, truncated) as build_record makes them, or the InvalidUid it raises."""
    header, syntax = _header(ds, implicit)
    event = SimpleNamespace(request=SimpleNamespace(AffectedSOPInstanceUID=ds.SOPInstanceUID,
                                                    AffectedSOPClassUID=ds.SOPClassUID),
                            context=SimpleNamespace(transfer_syntax=syntax))
    noted: list[tuple[list[str], list[str]]] = []
    stats = SimpleNamespace(add_sanitised=lambda dropped, truncated: noted.append((list(dropped), list(truncated))))
    with pytest.MonkeyPatch.context() as patch:
        if not plain:
            patch.setattr(instance_record._OptionalValues, "_plain", lambda *_: instance_record._NOT_PLAIN)
        try:
            record = build_record(header, event, "SCU", InstanceStore(tmp_path), size_bytes=1,  # type: ignore[arg-type]
                                  stats=stats)  # type: ignore[arg-type]
        except InvalidUid as exc:
            return f"InvalidUid: {exc}"
    return record, noted


def _same_both_ways(ds: Dataset, implicit: bool, tmp_path: Path) -> Any:
    plain = _read(ds, implicit, tmp_path, plain=True)
    assert plain == _read(ds, implicit, tmp_path, plain=False)
    return plain


# Implicit VR carries no VR: a case with its own VR is read in explicit VR only.
ENCODED_CASES = [(*case, implicit) for case in CASES for implicit in (True, False) if not (implicit and case[2])]


@pytest.mark.parametrize(("keyword", "value", "vr", "implicit"), ENCODED_CASES,
                         ids=[f"{k}={v!r}/{vr or ('implicit' if i else 'explicit')}" for k, v, vr, i in ENCODED_CASES])
def test_a_value_reads_the_same_from_its_bytes_as_through_pydicom(template: Dataset, tmp_path: Path, keyword: str,
                                                                  value: bytes, vr: str | None, implicit: bool) -> None:
    ds = copy.deepcopy(template)
    set_raw(ds, keyword, value, vr)
    _same_both_ways(ds, implicit, tmp_path)


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_the_bad_input_catalogue_and_random_bytes_read_the_same_both_ways(template: Dataset, tmp_path: Path,
                                                                          implicit: bool) -> None:
    rng = random.Random(2212)
    changes = [m.change for m in MUTATIONS if m.change is not None and "pixels" not in m.name]
    compared = 0
    for change in changes:
        ds = copy.deepcopy(template)
        change(ds, rng)
        try:
            _header(ds, implicit)
        except NotImplementedError:  # an unknown VR has no implicit VR encoding
            assert implicit
            continue
        _same_both_ways(ds, implicit, tmp_path)
        compared += 1
    assert compared == len(changes) if not implicit else compared >= len(changes) // 2
    for _ in range(200):
        ds = copy.deepcopy(template)
        keyword = rng.choice(RANDOM_BYTES_IN + ("Modality", "SeriesNumber", "InstanceNumber", "StudyDate",
                                                "ImagePositionPatient", "ImageOrientationPatient"))
        set_raw(ds, keyword, bytes(rng.choice(b"0123456789.+-\\ eEY\x00") for _ in range(rng.randint(1, 20))))
        _same_both_ways(ds, implicit, tmp_path)


def test_plain_values_are_read_from_their_bytes(template: Dataset, tmp_path: Path) -> None:
    # The cases above would pass with no plain path at all; this one shows it is taken.
    converted: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        read = instance_record._OptionalValues._read
        patch.setattr(instance_record._OptionalValues, "_read",
                      lambda self, keyword: converted.append(keyword) or read(self, keyword))
        record, noted = _read(copy.deepcopy(template), False, tmp_path, plain=True)
    assert converted == []
    assert (record.modality, record.patient_age, record.institution, record.number_of_frames) == ("CT", "064Y",
                                                                                                  "HOSP", 1)
    assert record.slice_position is not None
    assert noted == []
