"""Bad header values written the way a broken modality writes them: raw bytes under a
chosen VR, so pydicom meets them only when it reads the file back (as the pipeline does).

Each mutation in `MUTATIONS` damages stored files of one series: the patient/study values
the issue names (a PatientBirthDate of 1970-01-01 or 00000000, a bad SpecificCharacterSet,
an unknown VR), random bytes in selected elements, wrong VRs, truncated values, and one
slice with broken pixel data. The patient values written by `PATIENT` are distinctive, so
a test can search every text the system keeps for them (`leaks`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

# Distinctive patient values (none a UID or a number of ours could hold).
PATIENT_NAME = "Qwyxtrel^Brunhilde"
PATIENT_ID = "PID-FZ-77310"
BIRTH_DATE = "19480312"
ACCESSION = "ACC-FZ-5521"
BAD_BIRTH_DATES = ("1970-01-01", "00000000")
SECRETS = (PATIENT_NAME, "Qwyxtrel", "Brunhilde", PATIENT_ID, "FZ-77310", BIRTH_DATE, ACCESSION, "FZ-5521",
           *BAD_BIRTH_DATES, "1970-01")
# Written with patient_id=PATIENT_ID.
PATIENT = {"PatientName": PATIENT_NAME, "AccessionNumber": ACCESSION, "PatientBirthDate": BIRTH_DATE}


def leaks(text: str) -> list[str]:
    return [value for value in SECRETS if value in text]


def set_raw(ds: Dataset, keyword: str, value: bytes, vr: str | None = None) -> None:
    """Put `value` into `ds` as the file's bytes, under `vr` (default the dictionary's)."""
    tag = Tag(tag_for_keyword(keyword))
    vr = vr or dictionary_VR(tag)
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def rewrite(path: Path, change: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    # Raw bytes stay raw: pydicom would decode every element (and fail on an unknown VR)
    # to re-encode it when it sees the character set changed.
    ds._read_charset = ds._character_set
    ds.save_as(path, enforce_file_format=False)


@dataclass(frozen=True)
class Mutation:
    """`change` applied to `where` of a series' files: "all", "one" (a middle slice)."""

    name: str
    where: str
    change: Callable[[Dataset, random.Random], None] | None  # None: the file is cut short instead
    # What the study may end as: "eligible" when only values the results copy are bad
    # (or one slice), "either" when the damage may leave nothing to screen.
    expect: str = "eligible"


def _const(keyword: str, value: bytes, vr: str | None = None) -> Callable[[Dataset, random.Random], None]:
    return lambda ds, _rng: set_raw(ds, keyword, value, vr)


def _random_bytes(keywords: Sequence[str]) -> Callable[[Dataset, random.Random], None]:
    def change(ds: Dataset, rng: random.Random) -> None:
        keyword = rng.choice(list(keywords))
        set_raw(ds, keyword, bytes(rng.randrange(256) for _ in range(rng.randint(1, 70))))
    return change


def _broken_pixels(ds: Dataset, rng: random.Random) -> None:
    set_raw(ds, "PixelData", bytes(ds.PixelData[: rng.randrange(2, 200, 2)]), "OW")


def _no_pixels(ds: Dataset, _rng: random.Random) -> None:
    del ds.PixelData


RANDOM_BYTES_IN = ("PatientName", "PatientID", "StudyDescription", "StationName", "Manufacturer",
                   "ReferringPhysicianName", "StudyID", "AccessionNumber", "InstitutionName", "BodyPartExamined",
                   "PatientSex", "PatientAge", "StudyTime", "SeriesDescription")

MUTATIONS: list[Mutation] = [
    Mutation("birth_date_iso", "all", _const("PatientBirthDate", b"1970-01-01")),
    Mutation("birth_date_zeros", "all", _const("PatientBirthDate", b"00000000")),
    Mutation("birth_date_wrong_vr", "all", _const("PatientBirthDate", b"\x00\x00\x80\x3f", "FL")),
    Mutation("study_date_wrong_vr", "all", _const("StudyDate", b"\x01\x02", "US")),
    Mutation("study_time_bad", "all", _const("StudyTime", b"99:99:99")),
    Mutation("study_date_bad", "all", _const("StudyDate", b"2025-13-45")),
    Mutation("charset_unknown", "all", _const("SpecificCharacterSet", b"ISO_IR 999")),
    Mutation("charset_bytes", "all", _const("SpecificCharacterSet", b"\xff\xfeAB")),
    Mutation("name_unknown_vr", "all", _const("PatientName", b"DOE^JOHN", "QQ")),
    Mutation("institution_unknown_vr", "all", _const("InstitutionName", b"ACME", "ZZ")),
    Mutation("name_too_many_parts", "all", _const("PatientName", b"A^B^C^D^E^F^G=H=I=J")),
    Mutation("name_bad_bytes", "all", _const("PatientName", b"\xff\xfe\x80DOE")),
    Mutation("patient_id_too_long", "all", _const("PatientID", b"X" * 80)),
    Mutation("sex_bad", "all", _const("PatientSex", b"\xffQ")),
    Mutation("age_bad", "all", _const("PatientAge", b"5Y0X")),
    Mutation("frame_of_reference_bad", "all", _const("FrameOfReferenceUID", b"abc.def")),
    Mutation("slice_thickness_bad", "all", _const("SliceThickness", b"8mm")),
    Mutation("random_bytes_all", "all", _random_bytes(RANDOM_BYTES_IN)),
    Mutation("random_bytes_one", "one", _random_bytes(RANDOM_BYTES_IN)),
    Mutation("position_garbage_one", "one", _const("ImagePositionPatient", b"abc\\d\\ef")),
    Mutation("position_truncated_one", "one", _const("ImagePositionPatient", b"-12.5\\3")),
    Mutation("orientation_truncated_one", "one", _const("ImageOrientationPatient", b"1\\0\\0\\0\\1")),
    Mutation("spacing_one_value_one", "one", _const("PixelSpacing", b"0.9")),
    Mutation("slope_bad_one", "one", _const("RescaleSlope", b"one")),
    Mutation("rows_wrong_one", "one", _const("Rows", b"\x05\x00", "US")),
    Mutation("pixels_truncated_one", "one", _broken_pixels),
    Mutation("pixels_missing_one", "one", _no_pixels),
    Mutation("file_cut_short_one", "one", None),
    Mutation("position_garbage_all", "all", _const("ImagePositionPatient", b"x\\y\\z"), expect="either"),
    Mutation("slope_bad_all", "all", _const("RescaleSlope", b"one"), expect="either"),
]
BY_NAME = {m.name: m for m in MUTATIONS}


def damage(files: Sequence[Path], mutation: Mutation, rng: random.Random) -> list[Path]:
    """Apply `mutation` to its files of the series; returns the files it touched."""
    targets = list(files) if mutation.where == "all" else [files[len(files) // 2]]
    change = mutation.change
    for path in targets:
        if change is None:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) - max(2, len(data) // 3)])
        else:
            rewrite(path, lambda ds: change(ds, rng))
    return targets


def deal_mutations(studies: int, seed: int) -> list[list[Mutation]]:
    """The mutations of each of `studies` studies: the catalogue dealt out in a seeded order
    (so each is used when there are studies enough), and a seeded draw of up to one more
    per study. The same seed gives the same corpus on every run."""
    rng = random.Random(seed)
    dealt = rng.sample(MUTATIONS, len(MUTATIONS))
    plans: list[list[Mutation]] = [[] for _ in range(studies)]
    for k, mutation in enumerate(dealt):
        plans[k % studies].append(mutation)
    for plan in plans:
        extra = rng.choice(MUTATIONS)
        if rng.random() < 0.5 and extra not in plan:
            plan.append(extra)
    return plans
