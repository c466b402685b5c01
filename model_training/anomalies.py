"""A labelled synthetic anomaly suite: phantom heads with known anomaly masks.

Every scan starts as `imaging.phantoms.make_head(...)` and is then changed in the
scanner frame, so the daemon's preprocessing sees it exactly as it would a real
series. Each scan carries a mask of the voxels the anomaly changed (on the image's
own grid); `local` types (lesions, hardware, skull defects) are scored at voxel level,
global ones (motion, noise, orientation, truncation, failed registration) only per scan.

Torch-free: the daemon's side of evaluation (bench/quality.py) must not import torch.
Case seeds are `seed * 100_000 + 90_000 + type_index * 500 + i`, disjoint from the
training cohort's `seed * 100_000 + i` and `+ 50_000 + i` for any other seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from headscreen.imaging import phantoms
from headscreen.imaging.templates import intensity_table

log = logging.getLogger(__name__)

AGE_RANGE = (20.0, 85.0)
BLOOD = {"CT": (60.0, 80.0), "MR": (700.0, 800.0)}  # acute blood: hyperdense CT, bright (methaemoglobin) T1
SMALL_HEMORRHAGE_ML = 5.0  # the benchmark target is for hemorrhages of at least this size


@dataclass(frozen=True)
class AnomalyType:
    name: str
    group: str  # "hemorrhage", "lesion", "artifact" or "qc"
    modalities: tuple[str, ...]
    local: bool  # True: the mask localises it and voxel-level metrics apply


ANOMALY_TYPES: dict[str, AnomalyType] = {t.name: t for t in (
    AnomalyType("epidural", "hemorrhage", ("CT",), True),
    AnomalyType("subdural", "hemorrhage", ("CT",), True),
    AnomalyType("intraparenchymal", "hemorrhage", ("CT", "MR"), True),
    AnomalyType("midline_shift", "hemorrhage", ("CT", "MR"), True),
    AnomalyType("infarct", "lesion", ("CT", "MR"), True),
    AnomalyType("tumour_oedema", "lesion", ("MR", "CT"), True),
    AnomalyType("craniectomy", "qc", ("CT", "MR"), True),
    AnomalyType("metal_streaks", "artifact", ("CT",), True),
    AnomalyType("motion", "artifact", ("CT", "MR"), False),
    AnomalyType("noise", "artifact", ("CT", "MR"), False),
    AnomalyType("wrong_orientation", "qc", ("CT", "MR"), False),
    AnomalyType("truncated", "qc", ("CT", "MR"), False),
    AnomalyType("failed_registration", "qc", ("CT", "MR"), False),
)}
NORMAL = "normal"


@dataclass(frozen=True)
class SuiteCase:
    modality: str
    kind: str  # NORMAL or a key of ANOMALY_TYPES
    age: float
    seed: int
    spacing_mm: float = 1.0

    @property
    def label(self) -> int:
        return 0 if self.kind == NORMAL else 1

    @property
    def case_id(self) -> str:
        return f"{self.modality}-{self.kind}-{self.seed}"


@dataclass
class SyntheticScan:
    case: SuiteCase
    image: sitk.Image  # float32 scanner-frame volume (HU for CT)
    mask: sitk.Image | None  # uint8 anomaly mask on `image`'s grid; None for normals
    brain_mask: sitk.Image  # uint8, the phantom's brain before the anomaly
    details: dict[str, float | str] = field(default_factory=dict)

    @property
    def volume_ml(self) -> float | None:
        value = self.details.get("volume_ml")
        return None if value is None else float(value)

    @property
    def hemorrhage_ml(self) -> float | None:
        value = self.details.get("hemorrhage_ml")
        return None if value is None else float(value)


def suite_cases(modality: str, n_per_type: int, seed: int, kinds: tuple[str, ...] | None = None,
                n_normal: int | None = None, spacing_mm: float = 1.0) -> list[SuiteCase]:
    """`n_per_type` cases of each anomaly type for the modality plus `n_normal` normals
    (default: as many as the largest type). Case i of a type depends only on (seed, type, i)."""
    chosen = kinds or tuple(n for n, t in ANOMALY_TYPES.items() if modality in t.modalities)
    unknown = [k for k in chosen if k not in ANOMALY_TYPES]
    if unknown:
        raise ValueError(f"unknown anomaly types {unknown}; known: {sorted(ANOMALY_TYPES)}")
    counts = {NORMAL: n_per_type if n_normal is None else n_normal, **{k: n_per_type for k in chosen}}
    names = [NORMAL, *ANOMALY_TYPES]
    cases = []
    for kind, count in counts.items():
        type_index = names.index(kind)
        for i in range(count):
            rng = np.random.default_rng([seed, 3, type_index, i])
            age = float(round(rng.uniform(*AGE_RANGE), 1))
            cases.append(SuiteCase(modality, kind, age, seed * 100_000 + 90_000 + type_index * 500 + i, spacing_mm))
    return cases


def make_scan(case: SuiteCase) -> SyntheticScan:
    """Synthesize one suite case. Deterministic for a given case."""
    rng = np.random.default_rng([case.seed, 7])
    pose = phantoms.Pose(rotation_deg=tuple(float(v) for v in rng.uniform(-6, 6, 3)),  # type: ignore[arg-type]
                         translation_mm=tuple(float(v) for v in rng.uniform(-6, 6, 3)))  # type: ignore[arg-type]
    scale = float(rng.uniform(0.94, 1.06))
    spacing = (case.spacing_mm,) * 3
    if case.kind == NORMAL:
        head = phantoms.make_head(case.modality, case.age, case.seed, pose, scale=scale, spacing=spacing)
        return SyntheticScan(case, head.image, None, head.brain_mask)
    builder = _BUILDERS[case.kind]
    return builder(case, pose, scale, spacing, rng)


# ---------------------------------------------------------------- geometry helpers


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float32)


def _like(array: np.ndarray, ref: sitk.Image, dtype: int = sitk.sitkFloat32) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ref)
    return sitk.Cast(image, dtype)


def _mask_image(mask: np.ndarray, ref: sitk.Image) -> sitk.Image:
    return _like(mask.astype(np.uint8), ref, sitk.sitkUInt8)


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def _zyx_spacing(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetSpacing()[::-1], dtype=float)


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    """A unit vector (z, y, x) pointing laterally and upwards, away from the skull base."""
    v = np.array([rng.uniform(0.0, 0.8), rng.uniform(-0.5, 0.5), rng.choice([-1.0, 1.0])])
    return v / np.linalg.norm(v)


def _polar(brain: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Angle (radians) of each voxel about the brain centroid, from `direction`."""
    centre = np.array(ndimage.center_of_mass(brain))
    grids = np.indices(brain.shape, dtype=np.float32)
    offsets = [(grids[a] - centre[a]) * spacing[a] for a in range(3)]
    norm = np.sqrt(sum(o ** 2 for o in offsets)) + 1e-6
    cosine = sum(o * d for o, d in zip(offsets, direction)) / norm
    return np.arccos(np.clip(cosine, -1.0, 1.0))


def _smallest(rank: np.ndarray, candidates: np.ndarray, n_voxels: int) -> np.ndarray:
    """The `n_voxels` candidate voxels with the smallest rank: an exact target volume."""
    index = np.flatnonzero(candidates.ravel())
    if len(index) == 0:
        return np.zeros(candidates.shape, dtype=bool)
    keep = index[np.argsort(rank.ravel()[index], kind="stable")[:n_voxels]]
    out = np.zeros(candidates.size, dtype=bool)
    out[keep] = True
    return out.reshape(candidates.shape)


def _fill(values: np.ndarray, region: np.ndarray, level: float, rng: np.random.Generator, sigma: float) -> None:
    values[region] = level + rng.normal(0.0, sigma, int(region.sum()))


def _head(case: SuiteCase, pose: phantoms.Pose, scale: float, spacing: tuple[float, float, float],
          lesion: phantoms.Lesion | None = None) -> phantoms.Phantom:
    return phantoms.make_head(case.modality, case.age, case.seed, pose, lesion=lesion, scale=scale, spacing=spacing)


def _noise_sigma(modality: str) -> float:
    return phantoms.DEFAULT_NOISE[modality]


def _scan(case: SuiteCase, head: phantoms.Phantom, values: np.ndarray, mask: np.ndarray,
          **details: float | str) -> SyntheticScan:
    volume = float(mask.sum()) * _voxel_ml(head.image)
    return SyntheticScan(case, _like(values, head.image), _mask_image(mask, head.image), head.brain_mask,
                         {"volume_ml": round(volume, 2), **details})


def _changed(before: np.ndarray, after: np.ndarray, tolerance: float) -> np.ndarray:
    return np.abs(after - before) > tolerance


def _tolerance(modality: str) -> float:
    return 3.0 * _noise_sigma(modality)


# ---------------------------------------------------------------- hemorrhages


def _extra_axial(case: SuiteCase, pose, scale, spacing, rng, lens: bool) -> SyntheticScan:
    """Blood in the brain's outer shell under a skull cap: a lens (epidural, thickest in
    the middle) or a crescent (subdural, even thickness, wider). The cap is sized so the
    collection is 3-8 mm thick on average, as bleeds that are reported are: a fixed
    wide cap made small volumes sub-millimetre sheets that no CT shows."""
    head = _head(case, pose, scale, spacing)
    values, brain = _array(head.image), _array(head.brain_mask) > 0
    sp = _zyx_spacing(head.image)
    depth = ndimage.distance_transform_edt(brain, sampling=sp)
    angle = _polar(brain, sp, _random_direction(rng))
    target_ml = float(np.exp(rng.uniform(np.log(2.0), np.log(45.0))))
    # Lens: mean thickness is half the peak, so the same volume needs a smaller cap.
    area_mm2 = target_ml * 1000.0 / rng.uniform(3.0, 8.0) / (2.0 if lens else 1.0)
    radius_mm = (3.0 * float(brain.sum()) * float(np.prod(sp)) / (4.0 * math.pi)) ** (1.0 / 3.0)
    # A spherical cap of half-angle a has area 2 pi r^2 (1 - cos a).
    cap = math.acos(max(-1.0, 1.0 - area_mm2 / (2.0 * math.pi * radius_mm ** 2)))
    low, high = (15.0, 60.0) if lens else (20.0, 85.0)
    cap = float(np.clip(cap, math.radians(low), math.radians(high)))
    within = brain & (angle < cap)
    rank = depth / np.maximum(1.0 - (angle / cap) ** 2, 1e-3) if lens else depth
    blood = _smallest(rank, within, int(round(target_ml / _voxel_ml(head.image))))
    _fill(values, blood, rng.uniform(*BLOOD[case.modality]), rng, _noise_sigma(case.modality))
    return _scan(case, head, values, blood, hemorrhage_ml=round(float(blood.sum()) * _voxel_ml(head.image), 2))


def _epidural(case, pose, scale, spacing, rng) -> SyntheticScan:
    return _extra_axial(case, pose, scale, spacing, rng, lens=True)


def _subdural(case, pose, scale, spacing, rng) -> SyntheticScan:
    return _extra_axial(case, pose, scale, spacing, rng, lens=False)


def _lesion_center(rng: np.random.Generator) -> tuple[float, float, float]:
    side = float(rng.choice([-1.0, 1.0]))
    return (side * float(rng.uniform(15, 35)), float(rng.uniform(-45, 25)), float(rng.uniform(0, 35)))


def _blob(case, pose, scale, spacing, rng, kind: str, low_ml: float,
          high_ml: float) -> tuple[phantoms.Phantom, np.ndarray]:
    volume = float(np.exp(rng.uniform(np.log(low_ml), np.log(high_ml))))
    head = _head(case, pose, scale, spacing, phantoms.Lesion(kind, _lesion_center(rng), volume))  # type: ignore[arg-type]
    return head, _array(head.lesion_mask) > 0


def _intraparenchymal(case, pose, scale, spacing, rng) -> SyntheticScan:
    head, mask = _blob(case, pose, scale, spacing, rng, "hemorrhage", 2.0, 45.0)
    return _scan(case, head, _array(head.image), mask,
                 hemorrhage_ml=round(float(mask.sum()) * _voxel_ml(head.image), 2))


def _midline_shift(case, pose, scale, spacing, rng) -> SyntheticScan:
    """A large haematoma pushing the brain across the midline: a smooth lateral
    displacement inside the brain, largest at the haematoma."""
    head, blood = _blob(case, pose, scale, spacing, rng, "hemorrhage", 25.0, 60.0)
    values, brain = _array(head.image), _array(head.brain_mask) > 0
    sp = _zyx_spacing(head.image)
    centre = np.array(ndimage.center_of_mass(blood))
    shift_mm = float(rng.uniform(5.0, 10.0))
    toward_midline = -1.0 if centre[2] > ndimage.center_of_mass(brain)[2] else 1.0
    grids = np.indices(values.shape, dtype=np.float32)
    distance2 = sum(((grids[a] - centre[a]) * sp[a]) ** 2 for a in range(3))
    weight = np.exp(-distance2 / (2 * 35.0 ** 2)) * ndimage.gaussian_filter(brain.astype(np.float32), 2.0)
    displacement_vox = toward_midline * shift_mm / sp[2] * weight
    coords = [grids[0], grids[1], grids[2] - displacement_vox]  # pull-back: out(p) = in(p - u(p))
    warped = ndimage.map_coordinates(values, coords, order=1, mode="nearest").astype(np.float32)
    moved_blood = ndimage.map_coordinates(blood.astype(np.float32), coords, order=1) > 0.5
    mask = moved_blood | (brain & (np.abs(displacement_vox) * sp[2] > shift_mm / 2.0))
    return _scan(case, head, warped, mask, shift_mm=round(shift_mm, 2),
                 hemorrhage_ml=round(float(moved_blood.sum()) * _voxel_ml(head.image), 2))


# ---------------------------------------------------------------- other lesions


def _infarct(case, pose, scale, spacing, rng) -> SyntheticScan:
    head, mask = _blob(case, pose, scale, spacing, rng, "infarct", 5.0, 50.0)
    return _scan(case, head, _array(head.image), mask)


def _tumour_oedema(case, pose, scale, spacing, rng) -> SyntheticScan:
    """A tumour with a rim of vasogenic oedema (hypointense on T1, hypodense on CT) in the brain."""
    head, tumour = _blob(case, pose, scale, spacing, rng, "tumour", 5.0, 30.0)
    values, brain = _array(head.image), _array(head.brain_mask) > 0
    rim_mm = float(rng.uniform(4.0, 9.0))
    outside = ndimage.distance_transform_edt(~tumour, sampling=_zyx_spacing(head.image))
    oedema = brain & ~tumour & (outside <= rim_mm)
    level = {"CT": 15.0, "MR": 300.0}[case.modality]
    values[oedema] = 0.3 * values[oedema] + 0.7 * level
    return _scan(case, head, values, tumour | oedema, oedema_ml=round(float(oedema.sum()) * _voxel_ml(head.image), 2))


# ---------------------------------------------------------------- skull and hardware


def _craniectomy(case, pose, scale, spacing, rng) -> SyntheticScan:
    """A missing bone flap: skull under a cap replaced by scalp-like soft tissue."""
    head = _head(case, pose, scale, spacing)
    values, brain = _array(head.image), _array(head.brain_mask) > 0
    sp = _zyx_spacing(head.image)
    table = intensity_table(case.modality)
    outside = ndimage.distance_transform_edt(~brain, sampling=sp)
    angle = _polar(brain, sp, _random_direction(rng))
    shell = ~brain & (outside <= 14.0) & (angle < math.radians(rng.uniform(25, 40)))
    if case.modality == "CT":
        bone = shell & (values > 200.0)
    else:  # T1 bone is dark between bright scalp and brain
        bone = shell & (values > table["air"] + 20.0) & (values < 0.5 * (table["scalp"] + table["skull_diploe"]))
    before = values.copy()
    _fill(values, bone, table["scalp"], rng, _noise_sigma(case.modality))
    return _scan(case, head, values, _changed(before, values, _tolerance(case.modality)) | bone)


def _metal_streaks(case, pose, scale, spacing, rng) -> SyntheticScan:
    """A shunt catheter (metal-dense) from the skull to the ventricles, with the radial
    bright and dark streaks that beam hardening draws around metal on CT."""
    head = _head(case, pose, scale, spacing)
    values, brain = _array(head.image), _array(head.brain_mask) > 0
    sp = _zyx_spacing(head.image)
    centre = np.array(ndimage.center_of_mass(brain))
    direction = _random_direction(rng)
    depth = ndimage.distance_transform_edt(brain, sampling=sp)
    entry_depth = np.linalg.norm((np.argwhere(brain & (depth <= sp.max() * 1.01)) - centre) * sp, axis=1).mean() + 8.0
    points = centre + np.outer(np.linspace(0.0, entry_depth, 200), direction) / sp
    catheter = np.zeros(values.shape, dtype=bool)
    idx = np.clip(np.round(points).astype(int), 0, np.array(values.shape) - 1)
    catheter[tuple(idx.T)] = True
    catheter = ndimage.binary_dilation(catheter, iterations=max(1, int(round(1.5 / sp.min()))))
    metal = {"CT": 3000.0, "MR": intensity_table("MR")["air"]}[case.modality]  # MR: a signal void
    before = values.copy()
    head_region = values > intensity_table(case.modality)["air"] + (500.0 if case.modality == "CT" else 60.0)
    amplitude, lines = float(rng.uniform(120.0, 250.0)), int(rng.integers(6, 12))
    if case.modality == "CT":
        yy, xx = np.indices(values.shape[1:], dtype=np.float32)
        for z in np.flatnonzero(catheter.any(axis=(1, 2))):
            cy, cx = np.argwhere(catheter[z]).mean(axis=0)
            r = np.hypot((yy - cy) * sp[1], (xx - cx) * sp[2])
            phi = np.arctan2(yy - cy, xx - cx)
            values[z] += (amplitude * np.cos(lines * phi) * np.exp(-r / 40.0) * head_region[z]).astype(np.float32)
    values[catheter] = metal
    return _scan(case, head, values, _changed(before, values, _tolerance(case.modality)) | catheter,
                 streak_lines=lines)


# ---------------------------------------------------------------- global artifacts and QC failures


def _motion(case, pose, scale, spacing, rng) -> SyntheticScan:
    """CT: the patient moved between slice blocks (stair steps plus blur); MR: phase-encode
    ghosts, a faint copy of the head shifted along y."""
    head = _head(case, pose, scale, spacing)
    values = _array(head.image)
    before = values.copy()
    if case.modality == "MR":
        ghost = np.roll(values, values.shape[1] // int(rng.integers(3, 5)), axis=1)
        values = values + float(rng.uniform(0.15, 0.3)) * ghost
    else:
        edges = np.sort(rng.choice(np.arange(10, values.shape[0] - 10), size=3, replace=False))
        for lo, hi in zip(edges[:-1], [*edges[1:-1], values.shape[0]]):
            shift = rng.uniform(-6.0, 6.0, 2) / _zyx_spacing(head.image)[1:]
            values[lo:hi] = ndimage.shift(values[lo:hi], (0.0, *shift), order=1, mode="nearest")
        values = ndimage.gaussian_filter(values, (0.0, 1.2, 1.2))
    return _scan(case, head, values.astype(np.float32), _changed(before, values, _tolerance(case.modality)))


def _noise(case, pose, scale, spacing, rng) -> SyntheticScan:
    head = _head(case, pose, scale, spacing)
    values = _array(head.image)
    sigma = _noise_sigma(case.modality) * float(rng.uniform(6.0, 10.0))
    head_region = values > intensity_table(case.modality)["air"] + (500.0 if case.modality == "CT" else 60.0)
    noisy = values + rng.normal(0.0, sigma, values.shape).astype(np.float32)
    return _scan(case, head, noisy, head_region, noise_sigma=round(sigma, 1))


def _wrong_orientation(case, pose, scale, spacing, rng) -> SyntheticScan:
    """Pixels that disagree with the header: the head upside down, or turned 90 degrees
    in the sagittal plane, while the geometry still says axial head-first."""
    head = _head(case, pose, scale, spacing)
    values = _array(head.image)
    variant = "flipped_z" if rng.random() < 0.5 else "rotated_90"
    if variant == "flipped_z":
        moved = values[::-1].copy()
        image = _like(moved, head.image)
    else:
        moved = np.ascontiguousarray(np.rot90(values, k=1, axes=(0, 1)))
        image = sitk.GetImageFromArray(moved)
        image.SetSpacing(head.image.GetSpacing())
        image.SetOrigin(head.image.GetOrigin())
        image.SetDirection(head.image.GetDirection())
    mask = np.ones(moved.shape, dtype=np.uint8)
    brain = _mask_image(np.zeros(moved.shape, dtype=bool), image)
    return SyntheticScan(case, image, _mask_image(mask, image), brain, {"variant": variant})


def _truncated(case, pose, scale, spacing, rng) -> SyntheticScan:
    """Coverage ends part-way through the head (only the top or bottom slab acquired)."""
    head = _head(case, pose, scale, spacing)
    n = head.image.GetSize()[2]
    keep = int(round(n * rng.uniform(0.35, 0.6)))
    start = n - keep if rng.random() < 0.6 else 0
    image = head.image[:, :, start:start + keep]
    return SyntheticScan(case, image, _mask_image(np.ones(_array(image).shape, bool), image),
                         head.brain_mask[:, :, start:start + keep],
                         {"kept_fraction": round(keep / n, 3), "kept_from": "top" if start else "bottom"})


def _failed_registration(case, pose, scale, spacing, rng) -> SyntheticScan:
    """Something that is not a head: a head cut into shuffled blocks, or a water cylinder."""
    head = _head(case, pose, scale, spacing)
    values = _array(head.image)
    table = intensity_table(case.modality)
    if rng.random() < 0.5:
        variant, block = "scrambled", max(4, int(round(24 / case.spacing_mm)))
        shape = [s // block * block for s in values.shape]
        cut = values[:shape[0], :shape[1], :shape[2]]
        blocks = cut.reshape(shape[0] // block, block, shape[1] // block, block, shape[2] // block, block)
        blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, block, block, block)
        blocks = blocks[rng.permutation(len(blocks))]
        grid = (shape[0] // block, shape[1] // block, shape[2] // block)
        cut[:] = blocks.reshape(*grid, block, block, block).transpose(0, 3, 1, 4, 2, 5).reshape(shape)
    else:
        variant = "water_cylinder"
        yy, xx = np.indices(values.shape[1:])
        radius = min(values.shape[1:]) * 0.4
        disc = np.hypot(yy - values.shape[1] / 2, xx - values.shape[2] / 2) < radius
        level = 0.0 if case.modality == "CT" else table["gm"]
        values[:] = table["air"]
        values[:, disc] = level
        values += rng.normal(0.0, _noise_sigma(case.modality), values.shape).astype(np.float32)
    return _scan(case, head, values, np.ones(values.shape, dtype=bool), variant=variant)


_BUILDERS: dict[str, Callable[..., SyntheticScan]] = {
    "epidural": _epidural, "subdural": _subdural, "intraparenchymal": _intraparenchymal,
    "midline_shift": _midline_shift, "infarct": _infarct, "tumour_oedema": _tumour_oedema,
    "craniectomy": _craniectomy, "metal_streaks": _metal_streaks, "motion": _motion, "noise": _noise,
    "wrong_orientation": _wrong_orientation, "truncated": _truncated, "failed_registration": _failed_registration,
}
