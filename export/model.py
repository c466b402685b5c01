"""What a screening job found, in the shape the DICOM builders need."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.valuerep import DA, TM

from headscreen.figures import ResultFigures

__all__ = ["AlgorithmInfo", "ResultSummary", "MODEL_FAMILIES", "reference_header"]

logger = logging.getLogger(__name__)

#: Canonical family names (any other non-empty text is accepted and coded
#: generically, see export.codes.algorithm_family_code).
MODEL_FAMILIES = ("f-AnoGAN 3D", "VAE 3D brain age")


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identity of the model bundle that produced a result.

    ``sha256`` is either one hex digest (the bundle's combined hash) or a mapping
    file name -> hex digest; both end up verbatim in the SR.
    """

    name: str
    version: str
    family: str
    sha256: str | dict[str, str]
    manufacturer: str = "headscreen"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("AlgorithmInfo: argument 'name' must not be empty")
        if not self.version:
            raise ValueError("AlgorithmInfo: argument 'version' must not be empty")
        if not self.family:
            raise ValueError("AlgorithmInfo: argument 'family' must not be empty")
        if not self.sha256:
            raise ValueError("AlgorithmInfo: argument 'sha256' must not be empty")

    def sha256_lines(self) -> list[str]:
        """The hashes as 'sha256:<hex>' or '<file> sha256:<hex>' lines, sorted for stable output."""
        if isinstance(self.sha256, str):
            return [f"sha256:{self.sha256}"]
        return [f"{name} sha256:{digest}" for name, digest in sorted(self.sha256.items())]


# What the models produce; none of it may accompany a not-eligible result.
_SCREEN_OUTPUTS = ("anomaly_score", "percentile", "screen_positive", "threshold", "predicted_age", "age_gap")


@dataclass(frozen=True)
class ResultSummary(ResultFigures):
    """The outcome of one job, as the SR, SC and SEG builders read it: its figures
    (`headscreen.figures.ResultFigures`, where ``None`` for a number means the value is
    absent and the SR says so explicitly) plus the modality and the algorithm.

    ``ineligible_reasons`` are the reasons (usually blocking QC reasons) that made
    the study not eligible; ``qc_reasons`` may hold them too, plus advisory ones.
    When empty for a not-eligible study, ``ineligible_reason`` is the one reason.
    """

    modality: str
    algorithm: AlgorithmInfo
    ineligible_reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.eligible is None:
            raise ValueError("ResultSummary: argument 'eligible' is required")
        if not self.modality:
            raise ValueError("ResultSummary: argument 'modality' must not be empty")
        if not self.eligible and not self.ineligible_reason:
            raise ValueError("ResultSummary: argument 'ineligible_reason' is required when eligible is False")
        if not self.eligible:
            # A result that cannot be trusted must not leak a number a reader could act on.
            leaked = [name for name in _SCREEN_OUTPUTS if getattr(self, name) is not None]
            if leaked:
                raise ValueError(f"ResultSummary: a not-eligible result must not carry {', '.join(leaked)}")
        if self.percentile is not None and math.isfinite(self.percentile) and not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"ResultSummary: argument 'percentile' must lie in [0, 100], got {self.percentile}")

    def reasons_not_eligible(self) -> list[str]:
        """Why the study got no screening result (empty when it is eligible)."""
        if self.eligible:
            return []
        return list(dict.fromkeys(self.ineligible_reasons)) or [str(self.ineligible_reason)]

    def advisory_reasons(self) -> list[str]:
        """QC reasons that are not among the reasons for ineligibility, in order."""
        blocking = set(self.reasons_not_eligible())
        return [r for r in dict.fromkeys(self.qc_reasons) if r not in blocking]


def finite_or_none(value: float | None) -> float | None:
    """NaN/inf (a broken model output) is reported as absent, never as a number."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


# Type 2 patient/study attributes highdicom reads from the reference dataset.
_TYPE2_DEFAULTS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)
_PATIENT_SEX = ("M", "F", "O")


def reference_header(first: Dataset) -> Dataset:
    """A pixel-free copy of a source header that highdicom can always build from.

    Type 2 patient/study attributes are present (possibly empty), and a value
    highdicom would refuse (a sex other than M/F/O, a date or time not in DICOM
    format) is left empty: an odd header must never cost the study its report.
    """
    header = Dataset()
    for element in first:
        if element.tag.group != 0x7FE0:
            header.add(copy.deepcopy(element))
    if hasattr(first, "file_meta"):
        header.file_meta = copy.deepcopy(first.file_meta)
    for keyword in _TYPE2_DEFAULTS:
        if keyword not in header:
            setattr(header, keyword, None)
    blanked = []
    sex = str(header.get("PatientSex") or "").strip().upper()
    if sex and sex not in _PATIENT_SEX:
        blanked.append("PatientSex")
    header.PatientSex = sex if sex in _PATIENT_SEX else None
    for keyword, kind in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = header.get(keyword)
        if value in (None, ""):
            continue
        try:
            kind(str(value))
        except (ValueError, TypeError):
            blanked.append(keyword)
            setattr(header, keyword, None)
    # PatientIdentityRemoved YES requires a de-identification method (Type 1C); a source
    # that states neither would make every derived object fail validation.
    if (str(header.get("PatientIdentityRemoved", "")).upper() == "YES" and not header.get("DeidentificationMethod")
            and not header.get("DeidentificationMethodCodeSequence")):
        header.DeidentificationMethod = "Not stated by the source"
    if blanked:
        # Names only: the values are patient data.
        logger.warning("non-conformant header values left empty", extra={"attributes": blanked})
    return header
