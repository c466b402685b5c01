"""What a screening job found, in the shape the DICOM builders need."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AlgorithmInfo", "ResultSummary", "MODEL_FAMILIES"]

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


@dataclass(frozen=True)
class ResultSummary:
    """The outcome of one job. ``None`` for a number means the value is absent and
    the SR says so explicitly; it never means zero or normal."""

    eligible: bool
    modality: str
    algorithm: AlgorithmInfo
    ineligible_reason: str | None = None
    anomaly_score: float | None = None
    percentile: float | None = None
    screen_positive: bool | None = None
    threshold: float | None = None
    predicted_age: float | None = None
    chronological_age: float | None = None
    age_gap: float | None = None
    qc_reasons: list[str] = field(default_factory=list)
    qc_metrics: dict[str, Any] = field(default_factory=dict)
    selected_series_uid: str | None = None

    def __post_init__(self) -> None:
        if not self.modality:
            raise ValueError("ResultSummary: argument 'modality' must not be empty")
        if not self.eligible and not self.ineligible_reason:
            raise ValueError("ResultSummary: argument 'ineligible_reason' is required when eligible is False")
        if self.percentile is not None and math.isfinite(self.percentile) and not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"ResultSummary: argument 'percentile' must lie in [0, 100], got {self.percentile}")


def finite_or_none(value: float | None) -> float | None:
    """NaN/inf (a broken model output) is reported as absent, never as a number."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)
