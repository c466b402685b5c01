"""Synthetic heads (CT in HU, MR T1) with age, pose and lesions, and their DICOM series.

The head comes from `imaging.templates` (ICBM152 tissue maps + Colin27 outline),
aged by widening CSF spaces, moved by a pose into the "scanner" frame, and given
noise. No patient data is involved anywhere.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from headscreen.imaging import synthesis, templates

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
# Healthy people's brains look older or younger than their years; one SD of that
# "brain-age gap" drives all atrophy of a head. Real cohorts show ~4-5 years; 2.5 keeps
# the synthetic age signal learnable to the 4-year MAE target (best possible ~2 years).
BRAIN_AGE_SD_YEARS = 2.5
NATIVE_MARGIN_MM = 8.0
RANDOMISED_MARGIN_MM = 20.0


@dataclass(frozen=True)
class Pose:
    """Rigid placement of the MNI head in the scanner frame (LPS axes, about the head centre)."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Lesion:
    """A blob inside the brain. `center_mm` is in MNI space, usual (RAS) convention."""

    kind: LesionKind
    center_mm: tuple[float, float, float] = (30.0, -10.0, 20.0)
    volume_ml: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ("hemorrhage", "infarct", "tumour"):
            raise ValueError(f"kind: expected hemorrhage, infarct or tumour, got {self.kind!r}")
        if not self.volume_ml > 0:
            raise ValueError(f"volume_ml: must be positive, got {self.volume_ml}")

    @property
    def center_lps_mm(self) -> tuple[float, float, float]:
        x, y, z = self.center_mm
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
    metadata: dict[str, Any] = field(default_factory=dict)

    def brain_mask_volume_ml(self) -> float:
        spacing = self.brain_mask.GetSpacing()
        return float(sitk.GetArrayViewFromImage(self.brain_mask).sum()) * float(np.prod(spacing)) / 1000.0


def make_head(modality: str = "CT", age: float = 60.0, seed: int = 0, pose: Pose = Pose(),
              lesion: Lesion | None = None, scale: float = 1.0, noise: float | None = None,
              spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), randomise: bool = False) -> Phantom:
    """Synthesize one head. Deterministic for a given seed.

    `noise` is the Gaussian noise sigma (HU for CT); `spacing` the native grid spacing.
    `randomise` draws the head's anatomy, tissue intensities and acquisition from
    `imaging.synthesis` (domain randomisation; `noise` and `spacing` are then drawn too).
    """
    if randomise:
        return _make_randomised_head(modality, age, seed, pose, lesion, scale)
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality: expected 'CT' or 'MR', got {modality!r}")
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
        noise = rng.normal(0.0, sigma, size=image.GetSize()[::-1]).astype(np.float32)
        array = sitk.GetArrayViewFromImage(image) + noise
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


def _make_randomised_head(modality: str, age: float, seed: int, pose: Pose, lesion: Lesion | None,
                          scale: float) -> Phantom:
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality: expected 'CT' or 'MR', got {modality!r}")
    rng = np.random.default_rng([seed, 7])
    look = synthesis.draw(modality, rng)
    maps = templates.tissue_maps()
    gm, wm = _aged_tissue(maps, age, rng)
    gm, wm = _jitter_contrast(gm, wm, rng)
    fat_inner = float(rng.uniform(*synthesis.FAT_DEPTH_MM))
    mni = synthesis.compose(gm, wm, look, (1.0, fat_inner))
    lesion_mask = np.zeros(maps.brain.shape, dtype=np.float32)
    if lesion is not None:
        lesion_mask = _lesion_fraction(lesion, maps, rng)
        low, high = LESION_VALUES[modality][lesion.kind]
        value = float(rng.uniform(low, high))
        if modality == "MR":  # T1 has no absolute unit: keep the lesion's ratio to white matter
            value *= look.tissue["wm"] / templates.MR_T1["wm"]
        mni = mni * (1.0 - lesion_mask) + value * lesion_mask

    shape = synthesis.shape_transform(look, head_center_lps())
    posed = pose_transform(pose, scale)
    mni_to_native = sitk.AffineTransform(3)
    matrix = np.asarray(posed.GetMatrix()).reshape(3, 3) @ np.asarray(shape.GetMatrix()).reshape(3, 3)
    mni_to_native.SetMatrix(tuple(matrix.ravel()))
    mni_to_native.SetCenter(head_center_lps())
    mni_to_native.SetTranslation(posed.GetTranslation())
    # Native point -> MNI point (inverse pose and shape) -> deformed template point.
    sample = sitk.CompositeTransform(3)
    sample.AddTransform(synthesis.deformation(look, rng))
    sample.AddTransform(mni_to_native.GetInverse())

    # A wider margin than the plain phantom's: the head holder lies up to 16 mm behind the head.
    final = _native_grid(mni_to_native, np.asarray(look.spacing_mm), maps, RANDOMISED_MARGIN_MM)
    fine = _native_grid(mni_to_native, np.array([look.spacing_mm[0], look.spacing_mm[1], min(1.0, look.spacing_mm[2])]),
                        maps, RANDOMISED_MARGIN_MM)
    brain = _resample(_on_base(maps.brain.astype(np.float32)), final, sample, 0.0) > 0.5
    rows = np.flatnonzero(sitk.GetArrayViewFromImage(brain).any(axis=(1, 2)))
    image = _resample(_on_base(mni), fine, sample, look.tissue["air"])
    image = synthesis.acquire_and_sample(image, final, look, rng, (int(rows[0]), int(rows[-1])) if rows.size else None)
    lesion_native = _resample(_on_base(lesion_mask), final, sample, 0.0) > 0.5
    return Phantom(image=image, brain_mask=sitk.Cast(brain, sitk.sitkUInt8),
                   lesion_mask=sitk.Cast(lesion_native, sitk.sitkUInt8), age=float(age), modality=modality,
                   pose=pose, scale=scale, mni_to_native=mni_to_native, lesion=lesion,
                   metadata={"noise_sigma": look.noise, "appearance": look.as_dict()})


def head_center_lps() -> tuple[float, float, float]:
    """Centre of the template brain's bounding box, the pivot of every pose."""
    lo, hi = templates.brain_bbox_lps()
    return ((lo[0] + hi[0]) / 2.0, (lo[1] + hi[1]) / 2.0, (lo[2] + hi[2]) / 2.0)


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
    """Erode parenchyma by a depth that grows with the brain's own age (chronological age
    plus a per-subject gap); the lost fraction becomes CSF, widening sulci and ventricles."""
    brain_age = age + rng.normal(0.0, BRAIN_AGE_SD_YEARS)
    depth = max(0.0, (brain_age - YOUNG_AGE) * ATROPHY_MM_PER_YEAR)
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


def _native_grid(transform: sitk.AffineTransform, spacing: np.ndarray, maps: templates.TissueMaps,
                 margin_mm: float = NATIVE_MARGIN_MM) -> sitk.Image:
    """Axis-aligned scanner grid covering the posed head."""
    idx = np.argwhere(maps.head)
    lo, hi = idx.min(axis=0)[::-1], idx.max(axis=0)[::-1]
    corners = [maps.reference.TransformIndexToPhysicalPoint([int(c) for c in (x, y, z)])
               for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    moved = np.array([transform.TransformPoint(c) for c in corners])
    low = moved.min(axis=0) - margin_mm
    size = np.ceil((moved.max(axis=0) + margin_mm - low) / spacing).astype(int) + 1
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



# ---------------------------------------------------------------- DICOM series writer

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_RESCALE_INTERCEPT = -1024.0
DICOM_MARGIN_MM = 10.0


def write_dicom_series(phantom: Phantom, out_dir: Path | str, study_uid: str | None = None,
                       series_uid: str | None = None, rows: int = 512, cols: int = 512,
                       slices: int | None = None, pixel_spacing: float | None = None,
                       slice_thickness: float | None = None, patient_age: float | None = None,
                       transfer_syntax: str = ExplicitVRLittleEndian, series_description: str | None = None,
                       extra: dict[str, Any] | None = None, study_date: date | None = None,
                       series_number: int = 1, frame_of_reference_uid: str | None = None,
                       patient_id: str | None = None, gantry_tilt_deg: float = 0.0) -> list[Path]:
    """Write the phantom as an axial CT Image / MR Image series, one file per slice.

    Slices are `slice_thickness` apart (default 1 mm) and cover the head; `slices`
    fixes the count instead (centred on the head; spread over it when no thickness is given). `extra` sets any further
    attributes by keyword (e.g. ConvolutionKernel, ContrastBolusAgent, ImageType).
    Instance numbers run from the feet upwards. Returns the written paths in slice order.
    `gantry_tilt_deg` tilts the slice planes about the left-right axis while the table
    still steps along z, as on a tilted CT gantry (the stack is then sheared).
    """
    if rows < 16 or cols < 16:
        raise ValueError(f"rows/cols: expected >= 16, got {rows}x{cols}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = _axial_grid(phantom, rows, cols, slices, pixel_spacing, slice_thickness)
    air = float(templates.intensity_table(phantom.modality)["air"])
    tilt = math.radians(gantry_tilt_deg)
    if tilt:
        positions, values = _tilted_slices(phantom.image, grid, tilt, air)
    else:
        resampled = sitk.Resample(phantom.image, grid, sitk.Transform(), sitk.sitkLinear, air, sitk.sitkFloat32)
        values = sitk.GetArrayViewFromImage(resampled)
        positions = [grid.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(grid.GetSize()[2])]
    signed = phantom.modality == "CT"

    base = _base_dataset(phantom, grid, study_uid, series_uid, patient_age, series_description,
                         study_date, series_number, frame_of_reference_uid, patient_id, signed)
    if tilt:
        base.ImageOrientationPatient = [_ds(v) for v in (1, 0, 0, 0, math.cos(tilt), math.sin(tilt))]
        base.SliceThickness = base.SpacingBetweenSlices = _ds(grid.GetSpacing()[2] * math.cos(tilt))
        if phantom.modality == "CT":
            base.GantryDetectorTilt = _ds(gantry_tilt_deg)
    for keyword, value in (extra or {}).items():
        setattr(base, keyword, value)
    base.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    paths = []
    for k in range(values.shape[0]):
        paths.append(_write_slice(base, positions[k], _to_stored(values[k], phantom.modality), k, out,
                                  transfer_syntax))
    logger.info("phantom series written", extra={"action": "phantom_series_written",
                                                  "series_uid": base.SeriesInstanceUID, "slices": len(paths)})
    return paths


def _axial_grid(phantom: Phantom, rows: int, cols: int, slices: int | None, pixel_spacing: float | None,
                slice_thickness: float | None) -> sitk.Image:
    head = sitk.GetArrayViewFromImage(phantom.brain_mask)  # fallback if no head found
    values = sitk.GetArrayViewFromImage(phantom.image)
    threshold = -500.0 if phantom.modality == "CT" else 0.1 * float(values.max())
    idx = np.argwhere(values > threshold)
    if idx.size == 0:
        idx = np.argwhere(head > 0)
    lo = np.array(phantom.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx.min(axis=0)[::-1]]))
    hi = np.array(phantom.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx.max(axis=0)[::-1]]))
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    center = (lo + hi) / 2.0
    if pixel_spacing is None:
        fov = max(hi[0] - lo[0], hi[1] - lo[1]) + 2.0 * DICOM_MARGIN_MM
        pixel_spacing = fov / max(rows, cols)
    extent_z = hi[2] - lo[2]
    if slices is None:
        spacing_z = slice_thickness or 1.0
        slices = int(np.ceil(extent_z / spacing_z)) + 1
    elif slice_thickness is None:
        spacing_z = extent_z / max(slices - 1, 1)
    else:
        spacing_z = float(slice_thickness)
    bottom = center[2] - spacing_z * (slices - 1) / 2.0
    grid = sitk.Image([cols, rows, slices], sitk.sitkUInt8)
    grid.SetSpacing((float(pixel_spacing), float(pixel_spacing), float(spacing_z)))
    origin = (center[0] - pixel_spacing * (cols - 1) / 2.0, center[1] - pixel_spacing * (rows - 1) / 2.0, bottom)
    grid.SetOrigin(tuple(float(v) for v in origin))
    return grid


def _tilted_slices(image: sitk.Image, grid: sitk.Image, tilt: float, air: float) -> tuple[list, np.ndarray]:
    """Sample tilted planes whose centres follow the table (z) positions of the axial grid."""
    cols, rows, n_slices = grid.GetSize()
    spacing = grid.GetSpacing()
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, math.cos(tilt), math.sin(tilt)])
    normal = np.cross(row_dir, col_dir)
    plane = sitk.Image([cols, rows, 1], sitk.sitkUInt8)
    plane.SetSpacing((spacing[0], spacing[1], 1.0))
    plane.SetDirection(tuple(np.column_stack([row_dir, col_dir, normal]).ravel()))
    centre_y = grid.GetOrigin()[1] + spacing[1] * (rows - 1) / 2.0
    values = np.empty((n_slices, rows, cols), dtype=np.float32)
    positions = []
    for k in range(n_slices):
        table_z = grid.GetOrigin()[2] + k * spacing[2]
        origin = np.array([grid.GetOrigin()[0], centre_y, table_z]) - col_dir * spacing[1] * (rows - 1) / 2.0
        plane.SetOrigin(tuple(float(v) for v in origin))
        sampled = sitk.Resample(image, plane, sitk.Transform(), sitk.sitkLinear, air, sitk.sitkFloat32)
        values[k] = sitk.GetArrayViewFromImage(sampled)[0]
        positions.append(tuple(float(v) for v in origin))
    return positions, values


def _to_stored(values: np.ndarray, modality: str) -> np.ndarray:
    """One slice as stored pixel values (CT: HU - intercept as int16; MR: uint16)."""
    if modality == "CT":
        stored = values - CT_RESCALE_INTERCEPT
        np.rint(stored, out=stored)
        return np.clip(stored, -1024, 4095, out=stored).astype(np.int16)
    stored = np.rint(values)
    return np.clip(stored, 0, 65535, out=stored).astype(np.uint16)


def _dates(patient_age: float, study_date: date) -> tuple[date, str]:
    """Birth date and PatientAge string consistent with each other and the study date."""
    birth = study_date - timedelta(days=int(round(patient_age * 365.2425)))
    years = study_date.year - birth.year - ((study_date.month, study_date.day) < (birth.month, birth.day))
    return birth, f"{years:03d}Y"


def _base_dataset(phantom: Phantom, grid: sitk.Image, study_uid: str | None, series_uid: str | None,
                  patient_age: float | None, description: str | None, study_date: date | None,
                  series_number: int, frame_of_reference_uid: str | None, patient_id: str | None,
                  signed: bool) -> Dataset:
    is_ct = phantom.modality == "CT"
    study_date = study_date or datetime.now(UTC).date()
    age = phantom.age if patient_age is None else float(patient_age)
    birth, age_string = _dates(age, study_date)
    study_uid = study_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE if is_ct else MR_IMAGE_STORAGE)
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if is_ct else ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "090000"
    ds.AccessionNumber = ""
    ds.Modality = phantom.modality
    ds.Manufacturer = "headscreen-phantom"
    ds.ManufacturerModelName = "synthetic head"
    ds.StationName = "PHANTOM01"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "HEAD" if is_ct else "BRAIN"
    ds.SeriesDescription = description or ("HEAD 1.0 H30s" if is_ct else "T1 MPRAGE SAG 3D")
    ds.PatientName = f"PHANTOM^{phantom.modality}"
    ds.PatientID = patient_id or f"PHANTOM-{study_uid[-8:]}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "O"
    ds.PatientAge = age_string
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = _ds(grid.GetSpacing()[2])
    ds.SpacingBetweenSlices = _ds(grid.GetSpacing()[2])
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [_ds(v) for v in (1, 0, 0, 0, 1, 0)]
    ds.PixelSpacing = [_ds(grid.GetSpacing()[1]), _ds(grid.GetSpacing()[0])]  # row spacing, column spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = grid.GetSize()[1], grid.GetSize()[0]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if is_ct:
        ds.KVP = "120"
        ds.ConvolutionKernel = "H30s"
        ds.RescaleIntercept = _ds(CT_RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "80"
    else:
        ds.ScanningSequence = ["GR", "IR"]
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = "IR"
        ds.MRAcquisitionType = "3D"
        ds.SequenceName = "tfl3d1"
        ds.RepetitionTime, ds.EchoTime, ds.InversionTime = "2300", "2.98", "900"
        ds.EchoTrainLength = 1
        ds.FlipAngle = "9"
        ds.MagneticFieldStrength = "3"
        ds.ImagedNucleus = "1H"
        ds.ImagingFrequency = "123.2"
    return ds


def _write_slice(base: Dataset, position: tuple[float, float, float], pixels: np.ndarray, k: int, out: Path,
                 transfer_syntax: str) -> Path:
    sop_uid = generate_uid()
    base.SOPInstanceUID = sop_uid
    base.file_meta.MediaStorageSOPInstanceUID = sop_uid
    base.InstanceNumber = k + 1
    base.ImagePositionPatient = [_ds(v) for v in position]
    base.SliceLocation = _ds(position[2])
    path = out / f"{k + 1:04d}_{sop_uid}.dcm"
    if UID(transfer_syntax).is_compressed:
        slice_ds = copy.deepcopy(base)
        slice_ds.compress(transfer_syntax, np.ascontiguousarray(pixels))
        slice_ds.save_as(path, enforce_file_format=True)
    else:
        base.PixelData = np.ascontiguousarray(pixels).tobytes()
        base.save_as(path, enforce_file_format=True)
    return path


def _ds(value: float) -> str:
    """A DICOM DS string (at most 16 characters)."""
    text = f"{float(value):.6g}"
    return "0" if text in ("-0", "0") else text


NonHeadKind = Literal["noise", "chest", "cylinder"]


def make_non_head(kind: NonHeadKind, modality: str = "CT", seed: int = 0,
                  spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)) -> Phantom:
    """Something that is not a head, sent as if it were one: pure noise, a chest, or a
    water cylinder (a QA phantom). The screening must refuse each with a clear reason."""
    rng = np.random.default_rng(seed)
    size = np.array([256, 256, 120])
    extent = size * np.asarray(spacing)
    zz, yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) * s - e / 2.0
                               for n, s, e in zip(size[::-1], np.asarray(spacing)[::-1], extent[::-1])],
                             indexing="ij")
    ct = modality == "CT"
    air = -1000.0 if ct else 0.0
    if kind == "noise":
        values = rng.normal(0.0, 400.0, size[::-1]) if ct else np.abs(rng.normal(300.0, 200.0, size[::-1]))
    elif kind == "cylinder":
        radius = np.hypot(xx, yy)
        values = np.full(xx.shape, air)
        values[(radius < 100.0) & (np.abs(zz) < 90.0)] = 0.0 if ct else 900.0
        values[(radius >= 100.0) & (radius < 106.0) & (np.abs(zz) < 90.0)] = 120.0 if ct else 50.0
    elif kind == "chest":
        values = _chest(xx, yy, zz, ct, air)
    else:
        raise ValueError(f"kind: expected noise, chest or cylinder, got {kind!r}")
    noise_sigma = DEFAULT_NOISE["CT" if ct else "MR"]
    values = values + rng.normal(0.0, noise_sigma, values.shape)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in (-extent / 2.0 + np.asarray(spacing) / 2.0)))
    empty = sitk.Cast(image * 0, sitk.sitkUInt8)
    return Phantom(image=image, brain_mask=empty, lesion_mask=empty, age=50.0, modality=modality, pose=Pose(),
                   scale=1.0, mni_to_native=sitk.AffineTransform(3), metadata={"non_head": kind})


def _chest(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, ct: bool, air: float) -> np.ndarray:
    """A torso: fat and muscle around two lungs, a heart, a spine and ribs (LPS: y posterior)."""
    tissue = {"fat": -90.0, "muscle": 45.0, "lung": -850.0, "bone": 700.0, "blood": 40.0} if ct else \
        {"fat": 900.0, "muscle": 300.0, "lung": 30.0, "bone": 500.0, "blood": 200.0}
    body = (xx / 170.0) ** 2 + (yy / 115.0) ** 2 < 1.0
    inner = (xx / 160.0) ** 2 + (yy / 105.0) ** 2 < 1.0
    values = np.full(xx.shape, air)
    values[body] = tissue["fat"]
    values[inner] = tissue["muscle"]
    for side in (-1.0, 1.0):
        lung = ((xx - side * 75.0) / 60.0) ** 2 + ((yy + 5.0) / 80.0) ** 2 < 1.0
        values[lung] = tissue["lung"]
    values[((xx + 15.0) / 50.0) ** 2 + ((yy + 25.0) / 45.0) ** 2 < 1.0] = tissue["blood"]
    values[np.hypot(xx, yy - 80.0) < 18.0] = tissue["bone"]
    ring = (xx / 150.0) ** 2 + (yy / 97.0) ** 2
    ribs = (ring > 0.86) & (ring < 1.0) & (np.cos(zz * 2.0 * np.pi / 25.0) > 0.3)
    values[ribs] = tissue["bone"]
    return values
