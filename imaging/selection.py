"""Rule-based choice of the series to screen in a study, with a reason for every series.

Rules are declarative data (`SelectionRules`, pydantic, JSON-serialisable): hard
requirements reject a series; weighted preferences rank the eligible ones.

An instance whose geometry or pixel description does not decode (garbage in
ImagePositionPatient, a PixelSpacing of one value) is left out of its series with a
counted reason (`usable_instances`), and so is one whose pixel data does not decode
(`usable_files`, which reads the pixels): one bad slice costs that slice, not the study.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pydicom
from pydantic import BaseModel, Field

from headscreen.errors import InputRejected
from headscreen.imaging.volume import slice_normal

logger = logging.getLogger(__name__)

T = TypeVar("T")

Orientation = Literal["axial", "coronal", "sagittal", "oblique", "mixed", "unknown"]
# A slice plane counts as axial/coronal/sagittal when its normal is within ~35 degrees
# of the axis (gantry-tilted CT stays "axial").
PLANE_COSINE = 0.82
# Rank of a rejected series: finite so verdicts serialise to strict JSON (PostgreSQL).
REJECTED_RANK = -1000.0

# Why an instance is left out of its series (counted per series, never the values).
EXCLUDED_UNREADABLE = "file unreadable"
EXCLUDED_GEOMETRY = "geometry undecodable"
EXCLUDED_PIXEL_HEADER = "pixel description undecodable"
EXCLUDED_PIXELS = "pixel data missing or undecodable"
EXCLUSION_NOTE = "instances_excluded"


@dataclass(frozen=True)
class SeriesCandidate:
    """What selection needs to know about one series, taken from its headers."""

    series_uid: str
    modality: str
    sop_class_uid: str
    description: str
    image_type: tuple[str, ...]
    slice_thickness: float | None
    n_instances: int
    n_slices: int
    convolution_kernel: str
    orientation: Orientation
    coverage_mm: float
    contrast_agent: bool
    mr_acquisition_type: str = ""
    protocol_name: str = ""
    sequence_name: str = ""
    excluded: tuple[tuple[str, int], ...] = ()  # (reason, count) of instances left out

    @property
    def n_excluded(self) -> int:
        return sum(count for _, count in self.excluded)

    @classmethod
    def from_datasets(cls, headers: Sequence[pydicom.Dataset],
                      usable: tuple[list[pydicom.Dataset], dict[str, int]] | None = None) -> SeriesCandidate:
        """Summarise one series from its headers (read with stop_before_pixels=True); an
        instance whose geometry does not decode is left out and counted (`usable_instances`,
        or `usable`: what it returned for these headers, when the caller has it already)."""
        if not headers:
            raise InputRejected("empty_series: no headers to summarise")
        kept, excluded = usable if usable is not None else usable_instances(headers)
        first = kept[0] if kept else headers[0]
        normals, positions = _geometry(kept)
        orientation = _orientation(normals)
        thickness = _float(_get(first, "SliceThickness"))
        coverage = _coverage(positions, normals, thickness)
        return cls(
            series_uid=_text(first, "SeriesInstanceUID"),
            modality=_text(first, "Modality"),
            sop_class_uid=_text(first, "SOPClassUID"),
            description=_text(first, "SeriesDescription"),
            image_type=tuple(str(v).upper() for v in _as_list(_get(first, "ImageType"))),
            slice_thickness=thickness,
            n_instances=len(kept),
            n_slices=max(len(positions), len(kept)),
            convolution_kernel="\\".join(str(v) for v in _as_list(_get(first, "ConvolutionKernel"))),
            orientation=orientation,
            coverage_mm=coverage,
            contrast_agent=any(_text(h, "ContrastBolusAgent").strip() for h in kept[:5]),
            mr_acquisition_type=_text(first, "MRAcquisitionType").upper(),
            protocol_name=_text(first, "ProtocolName"),
            sequence_name=_text(first, "SequenceName") or _text(first, "PulseSequenceName"),
            excluded=tuple(excluded.items()),
        )


class Preference(BaseModel):
    """A weighted regular expression on one text field of the candidate."""

    field: Literal["description", "convolution_kernel", "protocol_name", "sequence_name", "mr_acquisition_type"]
    pattern: str
    weight: float
    label: str


class SelectionRules(BaseModel):
    """Declarative selection rules. Hard requirements first, then weighted preferences."""

    modality: str
    required_image_type: list[str] = Field(default_factory=list)
    excluded_image_type: list[str] = Field(default_factory=list)
    excluded_description: list[str] = Field(default_factory=list)  # regexes, case-insensitive
    allowed_orientations: list[str] = Field(default_factory=lambda: ["axial", "coronal", "sagittal"])
    min_slices: int = 20
    slice_thickness_mm: tuple[float, float] = (0.4, 5.0)
    min_coverage_mm: float = 80.0
    contrast: Literal["allow", "avoid", "reject"] = "avoid"
    contrast_penalty: float = 3.0
    preferences: list[Preference] = Field(default_factory=list)

    @classmethod
    def default_for(cls, modality: str) -> SelectionRules:
        if modality == "CT":
            return cls(
                modality="CT",
                required_image_type=["ORIGINAL", "PRIMARY"],
                excluded_image_type=["LOCALIZER", "DERIVED", "SECONDARY", "REFORMATTED", "MPR", "MIP"],
                excluded_description=[r"scout", r"locali[sz]er", r"topogram", r"surview", r"dose", r"\bmip\b",
                                      r"\bcta\b|angio"],
                allowed_orientations=["axial"],
                min_slices=20, slice_thickness_mm=(0.4, 5.0), min_coverage_mm=80.0,
                contrast="avoid",
                preferences=[
                    Preference(field="description", pattern=r"brain|soft|standard|\bstd\b|routine|head",
                               weight=2.0, label="soft-tissue description"),
                    Preference(field="convolution_kernel", pattern=r"^(H[1-4]\d|J[1-4]\d|Hr[1-4]\d|Qr[1-4]\d|"
                               r"FC[0-2]\d|UB|STANDARD|SOFT|BRAIN|STND)",
                               weight=3.0, label="soft-tissue kernel"),
                    Preference(field="description", pattern=r"bone|sharp|lung|\bbony\b|osteo",
                               weight=-4.0, label="bone/sharp description"),
                    Preference(field="convolution_kernel", pattern=r"^(H[6-9]\d|J[6-9]\d|Hr[5-9]\d|Br[6-9]\d|"
                               r"BONE|SHARP|LUNG|EDGE|FC[3-9]\d)",
                               weight=-5.0, label="bone/sharp kernel"),
                ],
            )
        if modality == "MR":
            return cls(
                modality="MR",
                required_image_type=["ORIGINAL"],
                excluded_image_type=["LOCALIZER", "DERIVED", "SECONDARY", "ADC", "TRACE", "DIFFUSION",
                                     "MPR", "MIP", "PROJECTION IMAGE"],
                excluded_description=[r"locali[sz]er", r"scout", r"survey", r"\bloc\b", r"3.?plane",
                                      r"dwi|\bdiff|\badc\b|trace|dti|tensor", r"perf|\bdsc\b|\bswi\b|\bsws\b"],
                allowed_orientations=["axial", "coronal", "sagittal"],
                min_slices=20, slice_thickness_mm=(0.4, 6.0), min_coverage_mm=80.0,
                contrast="avoid",
                preferences=[
                    Preference(field="mr_acquisition_type", pattern=r"^3D$", weight=3.0, label="3D acquisition"),
                    Preference(field="description", pattern=r"t1|mprage|mp-rage|spgr|bravo|tfl|tfe|fspgr|mp2rage",
                               weight=4.0, label="T1-weighted description"),
                    Preference(field="sequence_name", pattern=r"tfl|spgr|bravo|tfe", weight=1.0,
                               label="T1 gradient-echo sequence"),
                    Preference(field="description", pattern=r"flair|t2|pd\b|\bswi|gre|star",
                               weight=-3.0, label="not T1 description"),
                ],
            )
        raise InputRejected(f"modality: no default selection rules for {modality!r}")


@dataclass(frozen=True)
class Verdict:
    series_uid: str
    accepted: bool
    reason: str
    rank: float


@dataclass(frozen=True)
class Selection:
    chosen: str | None
    verdicts: list[Verdict]


def select_series(candidates: Sequence[SeriesCandidate], rules: SelectionRules) -> Selection:
    """Reject what breaks a rule, rank the rest, choose the best; every series gets a reason."""
    judged: list[tuple[SeriesCandidate, str | None, float, list[str]]] = []
    for candidate in candidates:
        problem = _first_problem(candidate, rules)
        rank, notes = _rank(candidate, rules) if problem is None else (REJECTED_RANK, [])
        judged.append((candidate, problem, rank, notes))
    eligible = [item for item in judged if item[1] is None]
    eligible.sort(key=lambda item: (-item[2], -item[0].n_slices, item[0].series_uid))
    chosen = eligible[0][0].series_uid if eligible else None
    verdicts = []
    for candidate, problem, rank, notes in judged:
        if problem is not None:
            verdicts.append(Verdict(candidate.series_uid, False, f"rejected: {problem}", REJECTED_RANK))
            continue
        summary = _summary(candidate) + (f"; {', '.join(notes)}" if notes else "")
        if candidate.series_uid == chosen:
            reason = f"chosen (rank {rank:g}): {summary}"
        else:
            reason = f"eligible but ranked below the chosen series (rank {rank:g}): {summary}"
        verdicts.append(Verdict(candidate.series_uid, True, reason, rank))
    logger.info("series selected", extra={"action": "series_selected", "chosen": chosen,
                                          "n_candidates": len(candidates), "n_eligible": len(eligible)})
    return Selection(chosen=chosen, verdicts=verdicts)


def _first_problem(c: SeriesCandidate, rules: SelectionRules) -> str | None:
    if c.n_instances == 0:
        return f"no usable instance: {excluded_counts(dict(c.excluded))}"
    if c.modality != rules.modality:
        return f"modality {c.modality or '?'} is not {rules.modality}"
    missing = [t for t in rules.required_image_type if t not in c.image_type]
    if missing:
        return f"ImageType {'/'.join(c.image_type) or '(none)'} lacks {'/'.join(missing)}"
    excluded = [t for t in rules.excluded_image_type if t in c.image_type]
    if excluded:
        return f"ImageType contains {'/'.join(excluded)} (localizer, derived or reformatted image)"
    for pattern in rules.excluded_description:
        if re.search(pattern, c.description, re.IGNORECASE) or re.search(pattern, c.protocol_name, re.IGNORECASE):
            return f"description {c.description!r} matches excluded pattern {pattern!r}"
    if c.orientation not in rules.allowed_orientations:
        return f"orientation {c.orientation} not in {rules.allowed_orientations}"
    if c.n_slices < rules.min_slices:
        return f"{c.n_slices} slices < {rules.min_slices}"
    low, high = rules.slice_thickness_mm
    if c.slice_thickness is not None and not low <= c.slice_thickness <= high:
        return f"slice thickness {c.slice_thickness:g} mm outside [{low:g}, {high:g}]"
    if c.coverage_mm < rules.min_coverage_mm:
        return f"coverage {c.coverage_mm:.0f} mm < {rules.min_coverage_mm:g} mm"
    if c.contrast_agent and rules.contrast == "reject":
        return "contrast agent given (ContrastBolusAgent present)"
    return None


def _rank(c: SeriesCandidate, rules: SelectionRules) -> tuple[float, list[str]]:
    rank = 0.0
    notes = []
    for preference in rules.preferences:
        text = getattr(c, preference.field)
        if text and re.search(preference.pattern, text, re.IGNORECASE):
            rank += preference.weight
            notes.append(f"{preference.label} ({preference.weight:+g})")
    if c.contrast_agent and rules.contrast == "avoid":
        rank -= rules.contrast_penalty
        notes.append(f"contrast agent given ({-rules.contrast_penalty:+g})")
    return rank, notes


def _summary(c: SeriesCandidate) -> str:
    thickness = f"{c.slice_thickness:g} mm" if c.slice_thickness is not None else "? mm"
    kernel = f", kernel {c.convolution_kernel!r}" if c.convolution_kernel else ""
    excluded = f", {excluded_counts(dict(c.excluded))}" if c.excluded else ""
    return (f"{c.modality} {c.orientation} {c.description!r}, {c.n_slices} slices of {thickness}, "
            f"coverage {c.coverage_mm:.0f} mm{kernel}{excluded}")


def usable_instances(headers: Sequence[pydicom.Dataset]) -> tuple[list[pydicom.Dataset], dict[str, int]]:
    """The instances whose geometry and pixel description decode, in order, and how many
    were left out for which reason. Absent geometry is not a decode failure (the rules and
    the loader judge that)."""
    return _leave_out(headers, instance_problem, "instances left out of their series", "instances_excluded")


def usable_files(paths: Sequence[Path | str]) -> tuple[list[Path], dict[str, int]]:
    """The files whose header and pixel data decode (each read in full), and how many were
    left out for which reason. A file that cannot be opened at all raises OSError: that is
    storage trouble, not bad input."""
    return _leave_out([Path(p) for p in paths], file_problem, "files left out of their series", "files_excluded")


def _leave_out(items: Sequence[T], problem_of: Callable[[T], str | None], message: str,
               action: str) -> tuple[list[T], dict[str, int]]:
    """The items `problem_of` finds nothing wrong with, in order, and how many it left out
    for which reason (logged as a warning when any)."""
    kept: list[T] = []
    excluded: dict[str, int] = {}
    for item in items:
        problem = problem_of(item)
        if problem is None:
            kept.append(item)
        else:
            excluded[problem] = excluded.get(problem, 0) + 1
    if excluded:
        logger.warning(message, extra={"action": action, "excluded": excluded, "kept": len(kept)})
    return kept, excluded


def instance_problem(ds: pydicom.Dataset) -> str | None:
    """Why one instance cannot be part of a volume (an EXCLUDED_* reason), or None."""
    try:
        if _get(ds, "PerFrameFunctionalGroupsSequence"):
            normals, positions = _geometry([ds])
            if not all(np.isfinite(v).all() for v in [*normals, *positions]):
                return EXCLUDED_GEOMETRY
        else:
            if _present(ds, "ImagePositionPatient"):
                _numbers(ds.ImagePositionPatient, 3)
            if _present(ds, "ImageOrientationPatient"):
                _check_orientation(_numbers(ds.ImageOrientationPatient, 6))
            if _present(ds, "PixelSpacing"):
                if min(_numbers(ds.PixelSpacing, 2)) <= 0:
                    return EXCLUDED_GEOMETRY
    except Exception:  # pydicom and float() raise many types on a bad value
        return EXCLUDED_GEOMETRY
    try:
        for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames"):
            if _present(ds, keyword) and int(ds.get(keyword)) < 1:
                return EXCLUDED_PIXEL_HEADER
        if _present(ds, "PixelRepresentation"):
            int(ds.PixelRepresentation)
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if _present(ds, keyword):
                _numbers([ds.get(keyword)], 1)
    except Exception:
        return EXCLUDED_PIXEL_HEADER
    return None


def file_problem(path: Path) -> str | None:
    """Why one stored file cannot be part of a volume (an EXCLUDED_* reason), or None."""
    try:
        ds = pydicom.dcmread(path)
    except OSError:
        raise
    except Exception:  # not DICOM, truncated inside the header
        return EXCLUDED_UNREADABLE
    problem = instance_problem(ds)
    if problem is not None:
        return problem
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return EXCLUDED_PIXELS
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        shape = (int(ds.Rows), int(ds.Columns))
        array = ds.pixel_array
        if array.shape != (shape if frames == 1 else (frames, *shape)):
            return EXCLUDED_PIXELS  # colour, or pixel data that does not match Rows/Columns
    except Exception:  # pydicom's decoders raise many types
        return EXCLUDED_PIXELS
    return None


def excluded_counts(excluded: dict[str, int]) -> str:
    """'2 instance(s) left out: geometry undecodable 1, file unreadable 1'."""
    total = sum(excluded.values())
    parts = ", ".join(f"{reason} {count}" for reason, count in excluded.items())
    return f"{total} instance(s) left out: {parts}"


def exclusion_note(excluded: dict[str, int], total: int) -> str | None:
    """The advisory QC reason of a series some of whose instances were left out, or None."""
    if not excluded:
        return None
    parts = ", ".join(f"{reason} {count}" for reason, count in excluded.items())
    return f"{EXCLUSION_NOTE}: {sum(excluded.values())} of {total} instances of the series left out ({parts})"


def _present(ds: pydicom.Dataset, keyword: str) -> bool:
    """In the dataset with a value (looked up without decoding it)."""
    if keyword not in ds:
        return False
    element = ds.get_item(keyword)
    return element is not None and element.value not in (None, b"", "")


def _numbers(value, count: int) -> list[float]:
    values = [float(v) for v in _as_list(value)]
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ValueError("not the expected count of finite numbers")
    return values


def _check_orientation(iop: list[float]) -> None:
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    # Unit vectors at right angles, within what scanners round to; no plane otherwise.
    if not (0.5 < np.linalg.norm(row) < 1.5 and 0.5 < np.linalg.norm(col) < 1.5 and abs(row @ col) < 0.5):
        raise ValueError("not an orientation")


def _get(ds: pydicom.Dataset, keyword: str):
    """The value, or None when it is absent or does not decode."""
    try:
        return ds.get(keyword)
    except Exception:  # unknown VR, bytes that do not decode
        return None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = _get(ds, keyword)
    return "" if value is None else str(value)


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [value]


def _float(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _geometry(headers: Sequence[pydicom.Dataset]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Slice normals and positions, from plain slices or per-frame functional groups."""
    normals, positions = [], []
    for ds in headers:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame:
            shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
            for item in per_frame:
                orientation = _item(item, shared, "PlaneOrientationSequence")
                position = _item(item, shared, "PlanePositionSequence")
                if orientation is not None and "ImageOrientationPatient" in orientation:
                    normals.append(slice_normal(orientation.ImageOrientationPatient))
                if position is not None and "ImagePositionPatient" in position:
                    positions.append(np.asarray([float(v) for v in position.ImagePositionPatient]))
            continue
        if "ImageOrientationPatient" in ds:
            normals.append(slice_normal(ds.ImageOrientationPatient))
        if "ImagePositionPatient" in ds:
            positions.append(np.asarray([float(v) for v in ds.ImagePositionPatient]))
    return normals, positions


def _item(item: pydicom.Dataset, shared: pydicom.Dataset | None, keyword: str) -> pydicom.Dataset | None:
    for source in (item, shared):
        values = source.get(keyword) if source is not None else None
        if values:
            return values[0]
    return None


def _orientation(normals: list[np.ndarray]) -> Orientation:
    if not normals:
        return "unknown"
    if any(abs(float(n @ normals[0])) < 0.999 for n in normals[1:]):
        return "mixed"
    n = np.abs(normals[0])
    axis = int(np.argmax(n))
    if n[axis] < PLANE_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _coverage(positions: list[np.ndarray], normals: list[np.ndarray], thickness: float | None) -> float:
    if not positions or not normals:
        return 0.0
    distances = np.array([p @ normals[0] for p in positions])
    return float(distances.max() - distances.min() + (thickness or 0.0))
