"""A DICOM series as one 3D volume with its geometry, and the loader that builds it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from daemon.errors import InputRejected

logger = logging.getLogger(__name__)

# Tolerances for slice geometry (fractions of the median slice spacing unless noted).
SPACING_TOLERANCE = 0.10
MISSING_SLICE_RATIO = 1.5
ORIENTATION_TOLERANCE = 1e-3
TILT_TOLERANCE_DEG = 0.5


class SeriesRejected(InputRejected):
    """The series cannot be made into one volume (mixed sizes, orientations, no pixels...)."""


@dataclass
class Volume:
    """A series on its native slice grid (LPS, float32; axis 2 of `image` is the slice axis).

    `slice_positions` holds each slice's ImagePositionPatient when it is known; it lets
    results go back onto slices whose grid is not regular (gaps, gantry tilt).
    """

    image: sitk.Image
    series_uid: str
    slice_sop_uids: list[str]
    modality: str
    qc_reasons: list[str] = field(default_factory=list)
    qc_metrics: dict[str, float] = field(default_factory=dict)
    patient_age_years: float | None = None
    slice_positions: np.ndarray | None = None
    frame_numbers: list[int] | None = None  # 1-based frame per slice for multi-frame objects

    @classmethod
    def from_image(cls, image: sitk.Image, modality: str, series_uid: str = "synthetic",
                   slice_sop_uids: list[str] | None = None, patient_age_years: float | None = None) -> "Volume":
        """Wrap an in-memory image (phantoms, training) as a Volume."""
        if image.GetDimension() != 3:
            raise ValueError(f"image: expected 3D, got {image.GetDimension()}D")
        n_slices = image.GetSize()[2]
        if slice_sop_uids is None:
            slice_sop_uids = [f"{series_uid}.{k + 1}" for k in range(n_slices)]
        if len(slice_sop_uids) != n_slices:
            raise ValueError(f"slice_sop_uids: expected {n_slices} entries, got {len(slice_sop_uids)}")
        return cls(image=sitk.Cast(image, sitk.sitkFloat32), series_uid=series_uid,
                   slice_sop_uids=list(slice_sop_uids), modality=modality,
                   patient_age_years=patient_age_years)

    @property
    def is_regular(self) -> bool:
        """True when every slice lies exactly on the image grid (no gaps, no tilt)."""
        if self.slice_positions is None:
            return True
        grid = np.array([self.image.TransformIndexToPhysicalPoint((0, 0, k))
                         for k in range(self.image.GetSize()[2])])
        return bool(np.allclose(grid, self.slice_positions, atol=1e-2))
