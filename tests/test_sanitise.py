"""Bad input, unit by unit: the sanitised copies results are built from (export.sanitise),
instances left out of their series (imaging.selection), and which errors are input
errors (headscreen.errors.is_input_error)."""

from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.valuerep import DA

from bad_input import (
    BAD_BIRTH_DATES,
    BIRTH_DATE,
    BY_NAME,
    PATIENT,
    PATIENT_ID,
    PATIENT_NAME,
    damage,
    leaks,
    rewrite,
    set_raw,
)
from headscreen.errors import InputRejected, TransientError, is_input_error
from headscreen.export.sanitise import (
    COPIED,
    NOTE_PREFIX,
    REFERENCE_KEYWORDS,
    TYPE2,
    clean_header,
    reference_copies,
    sanitise_sources,
)
from headscreen.imaging.phantoms import make_head, write_dicom_series
from headscreen.imaging.selection import (
    EXCLUDED_GEOMETRY,
    EXCLUDED_PIXEL_HEADER,
    EXCLUDED_PIXELS,
    EXCLUDED_UNREADABLE,
    SelectionRules,
    SeriesCandidate,
    exclusion_note,
    select_series,
    usable_files,
    usable_instances,
)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    """A small, valid CT series with distinctive patient values (written once; copy to damage)."""
    phantom = make_head("CT", age=60.0, seed=3, spacing=(4.0, 4.0, 4.0))
    return write_dicom_series(phantom, tmp_path_factory.mktemp("series"), rows=32, cols=32, slices=24,
                              slice_thickness=5.0, patient_id=PATIENT_ID, extra=dict(PATIENT))


def _copy(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    out = []
    for path in files:
        target = folder / path.name
        target.write_bytes(path.read_bytes())
        out.append(target)
    return out


def _headers(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in files]


# --------------------------------------------------------------------------- sanitiser

def test_a_valid_header_is_copied_whole(series):
    source = pydicom.dcmread(series[0])
    clean, dropped = clean_header(source)
    assert dropped == []
    public = [e.tag for e in source if not e.tag.is_private]
    assert [e.tag for e in clean] == public
    for tag in public:
        assert clean[tag].value == source[tag].value, tag
    assert clean.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert np.array_equal(clean.pixel_array, source.pixel_array)
    assert sanitise_sources(_headers(series)).note is None


def test_reference_copies_hold_the_reference_attributes_and_the_first_ones_shared_values(series):
    """A copy made ahead for an instance that is only referenced holds its own reference
    attributes and the first instance's patient, study and series values, as the copy
    sanitise_sources makes in place; a copied sequence is a pydicom Sequence of clean items."""
    headers = _headers(series[:4])
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = headers[0].SOPClassUID
    item.ReferencedSOPInstanceUID = hd.UID()
    for header in headers:
        header.ReferencedImageSequence = pydicom.Sequence([item])
    made_ahead = sanitise_sources(headers, {0}, reference_copies(headers))
    in_place = sanitise_sources(headers, {0})
    assert [list(ds.keys()) for ds in made_ahead.datasets] == [list(ds.keys()) for ds in in_place.datasets]
    first = made_ahead.datasets[0]
    assert isinstance(first.ReferencedImageSequence, pydicom.Sequence)
    assert first.ReferencedImageSequence[0].ReferencedSOPInstanceUID == item.ReferencedSOPInstanceUID
    for index, copy_ in enumerate(made_ahead.datasets[1:], start=1):
        assert copy_ == in_place.datasets[index]
        assert "ReferencedImageSequence" not in copy_  # not a reference attribute
        assert copy_.SOPInstanceUID == headers[index].SOPInstanceUID
        assert copy_.ImagePositionPatient == headers[index].ImagePositionPatient
        assert (copy_.PatientID, copy_.StudyInstanceUID) == (PATIENT_ID, headers[0].StudyInstanceUID)
        kept = {keyword_for_tag(tag) for tag in copy_.keys()}
        assert kept <= REFERENCE_KEYWORDS | COPIED | {"SpecificCharacterSet"}


@pytest.mark.parametrize("mutation, keyword", [
    ("birth_date_iso", "PatientBirthDate"), ("birth_date_zeros", "PatientBirthDate"),
    ("birth_date_wrong_vr", "PatientBirthDate"), ("study_date_wrong_vr", "StudyDate"),
    ("study_time_bad", "StudyTime"), ("study_date_bad", "StudyDate"), ("name_unknown_vr", "PatientName"),
    ("name_too_many_parts", "PatientName"), ("name_bad_bytes", "PatientName"),
    ("patient_id_too_long", "PatientID"), ("sex_bad", "PatientSex"), ("age_bad", "PatientAge"),
    ("institution_unknown_vr", "InstitutionName"), ("frame_of_reference_bad", "FrameOfReferenceUID"),
    ("slice_thickness_bad", "SliceThickness"), ("charset_unknown", "SpecificCharacterSet"),
])
def test_an_undecodable_value_is_left_out_and_named(tmp_path, series, mutation, keyword):
    files = _copy(series[:3], tmp_path / "s")
    damage(files, BY_NAME[mutation], random.Random(0))
    clean = sanitise_sources(_headers(files))
    assert clean.dropped == (keyword,)
    assert clean.note.startswith(f"{NOTE_PREFIX}: {keyword} ") and leaks(clean.note) == []
    for ds in clean.datasets:
        if keyword in TYPE2:
            assert keyword in ds and ds[keyword].is_empty  # Type 2: present, empty
        elif keyword != "SpecificCharacterSet":
            assert keyword not in ds
        # What highdicom refused before now builds.
        hd.sc.SCImage.from_ref_dataset(ds, np.zeros((16, 16), np.uint8), "MONOCHROME2", 8,
                                       hd.CoordinateSystemNames.PATIENT, hd.UID(), 1, hd.UID(), 1, "test",
                                       patient_orientation=("L", "P"))
    kept = clean.datasets[0]
    if keyword != "PatientID":
        assert kept.PatientID == PATIENT_ID
    if keyword != "PatientBirthDate":
        assert kept.PatientBirthDate != ""


def test_identifying_uids_of_the_wild_are_kept(tmp_path, series):
    files = _copy(series[:1], tmp_path / "s")
    # A leading zero in a component breaks the standard's form, and nothing downstream.
    uid = "1.2.840.0113619.2.055.3"
    rewrite(files[0], lambda ds: set_raw(ds, "SOPInstanceUID", uid.encode()))
    clean = sanitise_sources(_headers(files))
    assert clean.dropped == () and clean.datasets[0].SOPInstanceUID == uid


def test_without_a_usable_character_set_only_ascii_text_stays(tmp_path, series):
    files = _copy(series[:2], tmp_path / "s")

    def latin1(ds):
        set_raw(ds, "SpecificCharacterSet", b"ISO_IR 999")
        set_raw(ds, "StudyDescription", "Schädel nativ".encode("latin-1"))

    for path in files:
        rewrite(path, latin1)
    clean = sanitise_sources(_headers(files))
    assert set(clean.dropped) == {"SpecificCharacterSet", "StudyDescription"}
    assert "SpecificCharacterSet" not in clean.datasets[0] and str(clean.datasets[0].PatientName) == PATIENT_NAME


def test_every_copy_carries_the_first_ones_patient_values(tmp_path, series):
    files = _copy(series[:3], tmp_path / "s")
    damage(files[1:2], BY_NAME["birth_date_iso"], random.Random(0))
    other = pydicom.dcmread(files[2])
    other.PatientID = "SOMEONE-ELSE"
    other.save_as(files[2])
    clean = sanitise_sources(_headers(files))
    assert clean.dropped == ()  # only the first one's patient values are read
    assert {(ds.PatientID, ds.PatientBirthDate) for ds in clean.datasets} == {(PATIENT_ID, BIRTH_DATE)}


def test_the_sanitiser_never_raises_on_random_bytes(tmp_path, series):
    rng = random.Random(1234)
    files = _copy(series[:1], tmp_path / "s")
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    keywords = [e.keyword for e in header if e.keyword and e.VR not in ("SQ",)]
    for _ in range(60):
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        for keyword in rng.sample(keywords, 4):
            vr = rng.choice(["DA", "TM", "PN", "CS", "UI", "DS", "US", "LO", "QQ", "UN", "SQ"])
            set_raw(ds, keyword, bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))), vr)
        clean = sanitise_sources([ds])
        assert all(keyword in clean.datasets[0] for keyword in TYPE2)
        assert leaks(" ".join(clean.dropped)) == []


# --------------------------------------------------------------------------- selection

@pytest.mark.parametrize("mutation, reason", [
    ("position_garbage_one", EXCLUDED_GEOMETRY), ("position_truncated_one", EXCLUDED_GEOMETRY),
    ("orientation_truncated_one", EXCLUDED_GEOMETRY), ("spacing_one_value_one", EXCLUDED_GEOMETRY),
    ("slope_bad_one", EXCLUDED_PIXEL_HEADER),
])
def test_an_instance_whose_geometry_does_not_decode_is_left_out_and_counted(tmp_path, series, mutation, reason):
    files = _copy(series, tmp_path / "s")
    [bad] = damage(files, BY_NAME[mutation], random.Random(0))
    headers = _headers(files)
    kept, excluded = usable_instances(headers)
    assert excluded == {reason: 1} and len(kept) == len(files) - 1
    left_out = str(pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID)
    assert left_out not in {str(d.SOPInstanceUID) for d in kept}
    candidate = SeriesCandidate.from_datasets(headers)
    assert candidate.n_instances == len(files) - 1 and candidate.excluded == ((reason, 1),)
    rules = SelectionRules.default_for("CT")
    selection = select_series([candidate], rules)
    assert selection.chosen == candidate.series_uid
    assert f"1 instance(s) left out: {reason} 1" in selection.verdicts[0].reason
    assert exclusion_note(excluded, len(files)) == (
        f"instances_excluded: 1 of {len(files)} instances of the series left out ({reason} 1)")


def test_a_series_with_no_decodable_instance_is_rejected_with_its_count(tmp_path, series):
    files = _copy(series, tmp_path / "s")
    damage(files, BY_NAME["position_garbage_all"], random.Random(0))
    candidate = SeriesCandidate.from_datasets(_headers(files))
    selection = select_series([candidate], SelectionRules.default_for("CT"))
    assert selection.chosen is None
    assert selection.verdicts[0].reason == (
        f"rejected: no usable instance: {len(files)} instance(s) left out: {EXCLUDED_GEOMETRY} {len(files)}")


@pytest.mark.parametrize("mutation, reason", [
    ("pixels_truncated_one", EXCLUDED_PIXELS), ("pixels_missing_one", EXCLUDED_PIXELS),
    ("rows_wrong_one", EXCLUDED_PIXELS), ("file_cut_short_one", EXCLUDED_PIXELS),
])
def test_a_file_whose_pixels_do_not_decode_is_left_out_and_counted(tmp_path, series, mutation, reason):
    files = _copy(series, tmp_path / "s")
    [bad] = damage(files, BY_NAME[mutation], random.Random(0))
    kept, excluded = usable_files(files)
    assert excluded == {reason: 1} and bad not in kept and len(kept) == len(files) - 1


def test_a_file_that_is_not_dicom_is_left_out_as_unreadable(tmp_path, series):
    files = _copy(series[:3], tmp_path / "s")
    files[1].write_bytes(b"not a DICOM file at all")
    assert usable_files(files) == ([files[0], files[2]], {EXCLUDED_UNREADABLE: 1})


# --------------------------------------------------------------------------- input errors

def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the exception is the subject
        return exc
    raise AssertionError("nothing raised")


def test_decode_errors_of_pydicom_and_highdicom_are_input_errors():
    assert is_input_error(_raised(lambda: DA(BAD_BIRTH_DATES[0])))
    assert is_input_error(_raised(lambda: hd.sc.SCImage(
        pixel_array=np.zeros((4, 4), np.uint8), photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=hd.UID(), series_instance_uid=hd.UID(), series_number=1,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="x", patient_birth_date=BAD_BIRTH_DATES[1],
        patient_orientation=("L", "P"))))
    assert is_input_error(InputRejected("no_brain: nothing found"))
    # Ours, or a system's, or a plain bug: not the input's.
    assert not is_input_error(_raised(lambda: float("x")))
    assert not is_input_error(TransientError("database busy"))
    assert not is_input_error(_raised(lambda: [][1]))
    assert not is_input_error(MemoryError())
