"""Synthetic heads (CT in HU, MR T1) with age, pose and lesions, and their DICOM series.

The head comes from `imaging.templates` (ICBM152 tissue maps + Colin27 outline),
aged by widening CSF spaces, moved by a pose into the "scanner" frame, and given
noise. No patient data is involved anywhere.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from daemon.errors import ConfigError
from imaging import templates

logger = logging.getLogger(__name__)

LesionKind = Literal["hemorrhage", "infarct", "tumour"]
# Intensity ranges per lesion kind: CT in HU, MR in the T1 units of templates.MR_T1.
LESION_VALUES: dict[str, dict[str, tuple[float, float]]] = {
    "CT": {"hemorrhage": (60.0, 80.0), "infarct": (10.0, 18.0), "tumour": (28.0, 34.0)},
    "MR": {"hemorrhage": (700.0, 800.0), "infarct": (150.0, 220.0), "tumour": (200.0, 280.0)},
}
DEFAULT_NOISE = {"CT": 4.0, "MR": 12.0}
# Atrophy in mm of parenchymal erosion per year past YOUNG_AGE (roughly: ventricles and sulci
# widen and brain volume falls ~0.3 %/year in later life).
YOUNG_AGE = 20.0
ATROPHY_MM_PER_YEAR = 3.0 / 70.0
NATIVE_MARGIN_MM = 8.0


@dataclass(frozen=True)
class Pose:
    """Rigid placement of the MNI head in the scanner frame (LPS axes, about the head centre)."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Lesion:
    """A blob inside the brain. `center_mni_mm` uses the usual MNI (RAS) convention."""

    kind: LesionKind
    center_mni_mm: tuple[float, float, float] = (30.0, -10.0, 20.0)
    volume_ml: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ("hemorrhage", "infarct", "tumour"):
            raise ValueError(f"kind: expected hemorrhage, infarct or tumour, got {self.kind!r}")
        if not self.volume_ml > 0:
            raise ValueError(f"volume_ml: must be positive, got {self.volume_ml}")

    @property
    def center_lps_mm(self) -> tuple[float, float, float]:
        x, y, z = self.center_mni_mm
        return (-x, -y, z)


@dataclass
class Phantom:
    """A synthetic head in the scanner frame with its ground truth."""

    image: sitk.Image            # float32, HU for CT
    brain_mask: sitk.Image       # uint8, same grid
    lesion_mask: sitk.Image      # uint8, same grid (all zero without a lesion)
    age: float
    modality: str
    pose: Pose
    scale: float
    mni_to_native: sitk.AffineTransform  # maps MNI (LPS) points to scanner points
    lesion: Lesion | None = None
    metadata: dict[str, float] = field(default_factory=dict)


def make_head(modality: str = "CT", age: float = 60.0, seed: int = 0, pose: Pose = Pose(),
              lesion: Lesion | None = None, scale: float = 1.0, noise: float | None = None,
              spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Phantom:
    """Synthesize one head. Deterministic for a given seed.

    `noise` is the Gaussian noise sigma (HU for CT); `spacing` the native grid spacing.
    """
    values = templates.intensity_table(modality)
    if not 0.0 <= age <= 120.0:
        raise ValueError(f"age: expected 0-120 years, got {age}")
    if not 0.7 <= scale <= 1.3:
        raise ValueError(f"scale: expected 0.7-1.3, got {scale}")
    rng = np.random.default_rng(seed)
    maps = templates.tissue_maps()

    gm, wm = _aged_tissue(maps, age, rng)
    gm, wm = _jitter_contrast(gm, wm, rng)
    mni = templates.compose_intensity(gm, wm, maps.brain, maps.skull_depth, maps.head, values)
    lesion_mask = np.zeros(maps.brain.shape, dtype=np.float32)
    if lesion is not None:
        lesion_mask = _lesion_fraction(lesion, maps, rng)
        low, high = LESION_VALUES[modality][lesion.kind]
        mni = mni * (1.0 - lesion_mask) + float(rng.uniform(low, high)) * lesion_mask

    transform = pose_transform(pose, scale)
    ref = _native_grid(transform, np.asarray(spacing, dtype=float), maps)
    inverse = transform.GetInverse()

    image = _resample(_on_base(mni), ref, inverse, values["air"])
    sigma = DEFAULT_NOISE[modality] if noise is None else float(noise)
    if sigma > 0:
        array = sitk.GetArrayViewFromImage(image) + rng.normal(0.0, sigma, size=image.GetSize()[::-1]).astype(np.float32)
        noisy = sitk.GetImageFromArray(array.astype(np.float32))
        noisy.CopyInformation(image)
        image = noisy
    brain = _resample(_on_base(maps.brain.astype(np.float32)), ref, inverse, 0.0) > 0.5
    lesion_native = _resample(_on_base(lesion_mask), ref, inverse, 0.0) > 0.5
    logger.debug("phantom made", extra={"action": "phantom_made", "modality": modality, "age": age, "seed": seed})
    return Phantom(image=image, brain_mask=sitk.Cast(brain, sitk.sitkUInt8),
                   lesion_mask=sitk.Cast(lesion_native, sitk.sitkUInt8), age=float(age), modality=modality,
                   pose=pose, scale=scale, mni_to_native=transform, lesion=lesion,
                   metadata={"noise_sigma": sigma})


def head_center_lps() -> tuple[float, float, float]:
    """Centre of the template brain's bounding box, the pivot of every pose."""
    lo, hi = templates.brain_bbox_lps()
    return tuple((a + b) / 2.0 for a, b in zip(lo, hi))


def pose_transform(pose: Pose, scale: float = 1.0) -> sitk.AffineTransform:
    """MNI -> scanner: scale and rotate about the head centre, then translate."""
    rx, ry, rz = (math.radians(a) for a in pose.rotation_deg)
    euler = sitk.Euler3DTransform()
    euler.SetRotation(rx, ry, rz)
    matrix = np.asarray(euler.GetMatrix()).reshape(3, 3) * scale
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(matrix.ravel()))
    affine.SetCenter(head_center_lps())
    affine.SetTranslation(tuple(float(t) for t in pose.translation_mm))
    return affine


def _aged_tissue(maps: templates.TissueMaps, age: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Erode parenchyma by an age-dependent depth; the lost fraction becomes CSF."""
    depth = max(0.0, (age - YOUNG_AGE) * ATROPHY_MM_PER_YEAR + rng.normal(0.0, 0.2))
    depth = min(depth, len(maps.parenchyma_levels) - 1.001)
    lower = int(depth)
    frac = depth - lower
    levels = maps.parenchyma_levels
    parenchyma = (1.0 - frac) * levels[lower] + frac * levels[lower + 1]
    original = levels[0]
    ratio = np.divide(parenchyma, original, out=np.zeros_like(original), where=original > 1e-6)
    return maps.gm * ratio, maps.wm * ratio


def _jitter_contrast(gm: np.ndarray, wm: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Small per-subject variation of the GM/WM balance (±5 %)."""
    shift = float(rng.uniform(-0.05, 0.05))
    moved = np.clip(shift * gm, -wm, wm)  # trade part of WM for GM or back
    return gm + moved, wm - moved


def _lesion_fraction(lesion: Lesion, maps: templates.TissueMaps, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob of the requested volume at the MNI centre, clipped to the brain."""
    ref = maps.reference
    radius = (3.0 * lesion.volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    center_index = np.array(ref.TransformPhysicalPointToContinuousIndex(lesion.center_lps_mm))[::-1]
    half = int(math.ceil(radius * 1.5)) + 2
    lo = np.maximum(np.floor(center_index).astype(int) - half, 0)
    hi = np.minimum(np.floor(center_index).astype(int) + half + 1, maps.brain.shape)
    zz, yy, xx = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    distance = np.sqrt((zz - center_index[0]) ** 2 + (yy - center_index[1]) ** 2 + (xx - center_index[2]) ** 2)
    bumps = ndimage.gaussian_filter(rng.normal(0.0, 1.0, size=distance.shape), sigma=max(radius / 2.0, 1.0))
    bumps *= 0.15 * radius / (bumps.std() + 1e-6)
    fraction = np.zeros(maps.brain.shape, dtype=np.float32)
    fraction[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = np.clip(radius + bumps - distance + 0.5, 0.0, 1.0)
    return fraction * maps.brain


def _native_grid(transform: sitk.AffineTransform, spacing: np.ndarray, maps: templates.TissueMaps) -> sitk.Image:
    """Axis-aligned scanner grid covering the posed head."""
    idx = np.argwhere(maps.head)
    lo, hi = idx.min(axis=0)[::-1], idx.max(axis=0)[::-1]
    corners = [maps.reference.TransformIndexToPhysicalPoint([int(c) for c in (x, y, z)])
               for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    moved = np.array([transform.TransformPoint(c) for c in corners])
    low = moved.min(axis=0) - NATIVE_MARGIN_MM
    size = np.ceil((moved.max(axis=0) + NATIVE_MARGIN_MM - low) / spacing).astype(int) + 1
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(s) for s in spacing))
    ref.SetOrigin(tuple(float(v) for v in low))
    return ref


def _on_base(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    image.CopyInformation(templates.tissue_maps().reference)
    return image


def _resample(image: sitk.Image, ref: sitk.Image, transform: sitk.Transform, default: float) -> sitk.Image:
    return sitk.Resample(image, ref, transform, sitk.sitkLinear, float(default), sitk.sitkFloat32)


def validate_modality(modality: str) -> None:
    if modality not in ("CT", "MR"):
        raise ConfigError(f"modality: expected 'CT' or 'MR', got {modality!r}")
