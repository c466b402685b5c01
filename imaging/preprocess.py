"""Native volume -> model input in MNI space, and model maps back to the native slices.

CT follows Simarro Viana et al. (3D f-AnoGAN): affine registration to MNI, QC,
skull stripping, black-border removal (the model grid is the template brain's
bounding box), Gaussian smoothing then linear resize to 64^3, window [-20, 100] HU,
min-max to [-1, 1]. MR (Bengs et al.): registration to the template, template
brain mask, robust percentile normalisation to [-1, 1].

Speed: the native image is block-averaged to ~2 mm first; registration runs at
4 then 2 mm; the model grid is filled by a single resample with the final transform.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from headscreen.errors import ConfigError, InputRejected
from headscreen.imaging import qc, skullstrip, templates
from headscreen.imaging.concurrency import both
from headscreen.imaging.native_map import DenseMap, IndexBox, MapPart, NativeMap, slice_sums_of
from headscreen.imaging.registration import RegistrationResult, register_to_atlas
from headscreen.imaging.volume import BlockShrinker, Volume, evenly_spaced, shrink_factors
from headscreen.scores import FOCAL_KERNEL, focal_centre

logger = logging.getLogger(__name__)

# 2: orientation search and new registration stages, head-similarity QC, T1 brain
# extraction refined by intensity. A bundle written with version 1 keeps what shapes its
# model input (grid, crop, smoothing, normalisation, skull stripping) but takes today's
# registration and QC gates, which are properties of the imaging stage, not the model.
# 3 (MR only): percentiles land at percentile_targets, leaving headroom above white matter
# (see normalise); an MR bundle written before keeps its percentiles spanning the whole
# range. CT's input did not change, so CT stays at 2 (its shipped manifest with it).
PARAMS_VERSION = 2
MR_PARAMS_VERSION = 3
_IMAGING_STAGE_KEYS = ("registration", "qc_ranges", "skull_check")

_COMMON: dict[str, Any] = {
    "version": PARAMS_VERSION,
    "grid": [64, 64, 64],  # (D, H, W) = (z, y, x)
    # Template brain bounding box (LPS mm) plus a 3 mm margin: the "black border" is cropped.
    "fov_lps_mm": {"min": [-75.0, -76.0, -75.0], "max": [75.0, 110.0, 85.0]},
    "working_spacing_mm": 2.0,
    "min_coverage_mm": 60.0,
    "smoothing_sigma_mm": 1.0,
    "output_range": [-1.0, 1.0],
    # What counts as bone for the skull-coverage QC (a missing bone flap).
    "skull_check": {"ct_bone_hu": 250.0},
    "registration": {
        "atlas_spacing_mm": 2.0,
        "metric": "mattes_mutual_information",
        "histogram_bins": 32,
        "seed": 20240611,
        # Orientation search at 8 mm: the head as labelled over pitch +-60, yaw and roll
        # +-30 degrees (15 degree steps); turned 180 degrees about each axis over pitch and
        # yaw +-15; then a 3x3x3 grid of 7.5 degree steps about the best of each. The best
        # few overall and the best of each hypothesis are refined.
        "search": {"spacing_mm": 8.0, "cranium_depth_mm": 110.0, "refine_best": 3,
                   "tilts_deg": {"pitch": [-60.0, -45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0, 60.0],
                                 "yaw": [-30.0, -15.0, 0.0, 15.0, 30.0], "roll": [-30.0, -15.0, 0.0, 15.0, 30.0],
                                 "yaw_turned": [-15.0, 0.0, 15.0], "joint_step": 7.5}},
        # Rigid at 8 then 4 mm and affine at 4 mm with Mattes MI (robust away from the
        # optimum); affine at 2 mm with correlation (smoother near it: re-posed copies of
        # one real head agree within ~1.2 mm where MI's sampling noise left 2-5 mm).
        # A level that ends worse than it started is undone.
        "rigid": {"levels_mm": [8.0, 4.0], "iterations": 100, "max_step_mm": 4.0, "min_step_mm": 0.05,
                  "samples": 3000},
        "affine": {"levels_mm": [4.0, 2.0], "iterations": 60, "max_step_mm": 1.0, "min_step_mm": 0.02,
                   "samples_per_level": [6000, 20000], "metric_per_level": ["mattes", "correlation"]},
    },
}

_CT: dict[str, Any] = {
    "modality": "CT",
    "window": [-20.0, 100.0],
    "normalization": "window",
    # Correlation would be ruled by bone (1000+ HU): a missing bone flap or a thick skull
    # would pull the affine. Clamped, the soft tissue and brain carry the alignment.
    "registration": {"head_threshold": -500.0, "affine": {"clamp": [-150.0, 250.0]}},
    "skull_strip": {"method": "hu_threshold_morphology", "hu_range": [-15.0, 100.0], "erode_voxels": 1,
                    "prior_dilate_mm": 10.0, "boundary_hu": 400.0},
    "noise_band": [-100.0, 150.0],
    # The skull-coverage QC: a ray meets bone where the image rises above ct_bone_hu; rows
    # of the head mostly below ct_air_hu were not scanned; a cap of the vault is judged when
    # at least min_seen of its rays were (the MR manifest keeps only ct_bone_hu).
    "skull_check": {"ct_air_hu": -500.0, "min_seen": 0.5},
    # head_dice: 0.96 on the real T1 after a good registration (one head's shape is not
    # the atlas'), 0.98 on phantoms, 0.70-0.88 for noise, a chest or a cylinder.
    # brain_dice (HU brain extraction vs the registered atlas brain) and affine_scale from
    # 112 healthy domain-randomised heads (synthesis of 9015f1c): correctly registered ones
    # reach brain_dice 0.90-0.95 and scale down to 0.78 (MNI152 is larger than most adult
    # heads); with 0.93 and 0.8, 68 of the 112 failed the QC. A failed extraction or a collapsed
    # registration lies well below the new bounds. skull_coverage (the share of rays meeting
    # bone in the worst 15-degree cap of the vault): 1.0 on all 112 of those heads, 0 on the
    # suite's craniectomies (plain and domain-randomised heads).
    "qc_ranges": {"brain_volume_ml": [900.0, 2600.0], "head_dice": [0.92, 1.0], "brain_dice": [0.85, 1.0],
                  "skull_coverage": [0.5, 1.0],
                  "head_similarity": [0.3, 1.0],
                  "rotation_deg": [0.0, 60.0], "affine_scale": [0.72, 1.25], "noise_sigma": [0.0, 25.0],
                  "slice_spacing_cv": [0.0, 0.05]},
}

_MR: dict[str, Any] = {
    "version": MR_PARAMS_VERSION,
    "modality": "MR",
    "window": None,
    "normalization": "percentile",
    "percentiles": [1.0, 99.0],
    # Where those percentiles land in output_range. White matter is T1's brightest tissue,
    # so the 99th percentile is white matter's upper edge: mapped to the top of the range,
    # subacute blood (about 1.2x white matter, on the real T1 and in the synthesis) was
    # clipped to white matter's level and a 5-15 mL bleed nearly vanished from the model
    # input. At 0.5, intensities up to a third of the p1-p99 span above p99 stay distinct.
    "percentile_targets": [-1.0, 0.5],
    "bias_correction": False,
    "registration": {"head_threshold_fraction": 0.15},
    "skull_strip": {"method": "t1_intensity_refined", "core_mm": 10.0, "search_mm": 5.0,
                    "bone_below_white": 0.4, "opening_voxels": 2, "csf_rim_voxels": 1},
    # The T1 skull check (qc.t1_bone_depth): bone is the dark trough between brain and
    # scalp, not anything dark (CSF and air are dark too). Rays start 8 mm inside the
    # template brain's edge, so the trough's inner wall is brain even where this head's
    # brain is smaller than the template's, and only rays at least 30 degrees above the
    # horizontal count: lower, over the temporal squama, the bone is 2-3 mm under the
    # temporalis muscle and the real T1 shows no trough at 2 mm. A ray has bone where its
    # trough holds at least 1 mm x the brain's level (below the water level by more than
    # 0.05 of it); the brain's level is the 90th percentile of the eroded atlas brain
    # (white matter); rows mostly darker than 0.15 of it were not scanned. Measured: the
    # worst 15-degree cap keeps 0.62-0.74 of its rays on the real T1 in ten poses and
    # resolutions (imaging.realscans), 0.75-0.89 on 4 plain phantoms of the suite (seed
    # 4242) and 0.18-0.80 on 6 domain-randomised heads (seeds 1000-1005, age 50); 0-0.04
    # over the suite's 4 flaps.
    "skull_check": {"t1_start_mm": -8.0, "t1_min_elevation_deg": 30.0, "t1_margin": 0.05,
                    "t1_min_bone": 1.0, "t1_air": 0.15, "min_seen": 0.5},
    "qc_ranges": {"brain_volume_ml": [900.0, 2600.0], "head_dice": [0.92, 1.0],
                  "head_similarity": [0.3, 1.0], "rotation_deg": [0.0, 60.0], "affine_scale": [0.8, 1.25],
                  # Noise SD over the 99.5th intensity percentile. Domain-randomised training heads
                  # reach 0.05-0.08 at their noisiest draw (Rician 8 % of white matter), the real T1
                  # 0.056; the suite's noise artefact (12-18 % of white matter) 0.11-0.15. Beyond
                  # 0.1 a scan is noisier than anything the model learned from: not eligible.
                  "noise_relative": [0.0, 0.1],
                  "skull_coverage": [0.12, 1.0],
                  "slice_spacing_cv": [0.0, 0.05]},
}


def default_params(modality: str) -> dict[str, Any]:
    """Preprocessing parameters (JSON-serialisable); bundles store this dict verbatim."""
    extra = {"CT": _CT, "MR": _MR}.get(modality)
    if extra is None:
        raise ConfigError(f"modality: expected 'CT' or 'MR', got {modality!r}")
    params = copy.deepcopy(_COMMON)
    _deep_update(params, extra)
    return params


def with_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """`params` deep-merged over `default_params(params["modality"])`."""
    if "modality" not in params:
        raise ConfigError("params: 'modality' is required")
    merged = default_params(params["modality"])
    version = int(params.get("version", 1))
    if version < 2:
        params = {key: value for key, value in params.items()
                  if key not in _IMAGING_STAGE_KEYS and key != "version"}
    if version < 3 and params.get("modality") == "MR" and "percentile_targets" not in params:
        # Model input is the model's contract: an older bundle keeps percentiles that span
        # the whole output range (as it was trained).
        params = {**params, "percentile_targets": list(params.get("output_range", merged["output_range"]))}
    _deep_update(merged, params)
    return merged


def _deep_update(target: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass(frozen=True)
class ModelGrid:
    """The model's voxel grid in MNI (LPS, identity direction); size in (z, y, x)."""

    size_zyx: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ModelGrid:
        d, h, w = (int(v) for v in params["grid"])
        low = np.asarray(params["fov_lps_mm"]["min"], dtype=float)
        high = np.asarray(params["fov_lps_mm"]["max"], dtype=float)
        spacing = (high - low) / np.array([w, h, d], dtype=float)
        origin = low + spacing / 2.0  # voxel centres
        return cls(size_zyx=(d, h, w), origin=_triple(origin), spacing=_triple(spacing))

    def reference_image(self) -> sitk.Image:
        ref = sitk.Image(list(self.size_zyx[::-1]), sitk.sitkUInt8)
        ref.SetOrigin(self.origin)
        ref.SetSpacing(self.spacing)
        return ref


def _triple(values) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclass(frozen=True)
class Preprocessed:
    model_input: np.ndarray          # float32 (D, H, W) in [-1, 1]
    brain_mask: np.ndarray           # bool (D, H, W)
    qc_metrics: dict[str, float]
    qc_reasons: list[str]
    transform: sitk.AffineTransform  # MNI (model grid) point -> native point
    reference: sitk.Image            # model grid geometry (uint8 zeros)
    timings: dict[str, float] = field(default_factory=dict)
    # The brain mask at the resolution it was extracted (MR: the 2 mm atlas grid; CT: the
    # model grid), in MNI like `reference`: what a brain-extraction Dice should judge.
    brain_extraction: sitk.Image | None = None


class _OneItkThread:
    """ITK on one thread while any preprocessing runs in this process.

    With several threads ITK sums a registration metric (and N4's fit) per work unit in
    whatever order the threads finish; the optimiser amplifies those last-bit differences,
    and the same real T1 scored up to 3.4 % apart (1.6 years of predicted age) from one
    run to the next (bench/real_scans.py). On one thread it is the same to the bit, and
    no slower on these ~2 mm images. A count, so that concurrent calls restore the
    setting only when the last one ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._previous = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
            self._active += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(self._previous)


_one_itk_thread = _OneItkThread()


def preprocess(volume: Volume, params: dict[str, Any]) -> Preprocessed:
    """Register, QC, skull-strip, crop, smooth, resize, window and normalise one volume.

    Keys missing from `params` (a bundle written by an older version) take today's
    defaults for its modality; every key present is used as given.
    """
    params = with_defaults(params)
    modality = params["modality"]
    if volume.pixels_released and volume.shrunk_to(float(params["working_spacing_mm"])) is None:
        raise ValueError("preprocess: argument 'volume' has had its pixels released")
    if volume.modality != modality:
        raise InputRejected(f"modality_mismatch: preprocessing is for {modality}, the series is {volume.modality}")
    _check_coverage(volume, float(params["min_coverage_mm"]))
    with _one_itk_thread:
        return _preprocess(volume, params, modality)


def _preprocess(volume: Volume, params: dict[str, Any], modality: str) -> Preprocessed:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now

    air = templates.intensity_table(modality)["air"]
    spacing_mm = float(params["working_spacing_mm"])
    # A job's volume comes decoded straight to the working spacing (load_series' shrink_to_mm).
    working = volume.shrunk_to(spacing_mm)
    if working is None:
        working = shrink(regular_image(volume), spacing_mm)
    if params.get("bias_correction"):
        working = _n4(working)
    lap("shrink")

    reg_settings = _registration_settings(params, working)
    atlas_spacing = float(params["registration"]["atlas_spacing_mm"])
    atlas = templates.atlas(modality, atlas_spacing)
    registration = register_to_atlas(working, atlas, templates.atlas_metric_mask(atlas_spacing), reg_settings)
    lap("register")
    timings.update({f"register.{stage}": seconds for stage, seconds in (registration.stage_seconds or {}).items()})

    grid = ModelGrid.from_params(params)
    reference = grid.reference_image()
    # Unsmoothed values on the model grid are enough to find the brain.
    values = sitk.GetArrayFromImage(
        sitk.Resample(working, reference, registration.transform, sitk.sitkLinear, air, sitk.sitkFloat32))
    lap("resample")

    # The head on the 2 mm atlas grid, and which of its voxels the scan covered at all.
    moved, in_view = _in_atlas_space(working, registration, modality, atlas_spacing)
    template_mask = template_mask_on_grid(grid)
    method = params["skull_strip"]["method"]
    extraction_grid = reference
    if method == "hu_threshold_morphology":
        brain = skullstrip.strip_ct(values, template_mask, grid.spacing[::-1], params["skull_strip"])
        extracted = brain
    elif method == "t1_intensity_refined":
        prior = sitk.GetArrayViewFromImage(templates.atlas_brain_mask(atlas_spacing)).astype(bool)
        extracted = skullstrip.strip_mr(moved, prior, atlas_spacing, params["skull_strip"])
        extraction_grid = atlas
        brain = _atlas_mask_on_grid(extracted, atlas, reference)
    else:
        brain = template_mask.copy()
        extracted = brain
    brain_extraction = sitk.GetImageFromArray(extracted.astype(np.uint8))
    brain_extraction.CopyInformation(extraction_grid)
    lap("skull_strip")

    def model_input_of() -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        # Paper order: strip the skull, then smooth and resize, so bone never bleeds into the
        # brain's edge (the edge blends with the black border instead, the same in every scan).
        stripped = _strip_working(working, brain, reference, registration.transform, _masked_value(params, air),
                                  _edge_ceiling(params))
        sigma = float(params["smoothing_sigma_mm"])
        smoothed = sitk.SmoothingRecursiveGaussian(stripped, sigma) if sigma > 0 else stripped
        values = sitk.GetArrayFromImage(
            sitk.Resample(smoothed, reference, registration.transform, sitk.sitkLinear, air, sitk.sitkFloat32))
        return normalise(values, brain, params), time.perf_counter() - started

    def qc_of() -> tuple[dict[str, float], float]:
        started = time.perf_counter()
        return (_qc_metrics(volume, working, registration, brain, template_mask, grid, params, reg_settings,
                            moved, in_view), time.perf_counter() - started)

    # Both only read what is above (imaging.concurrency): side by side, the same to the bit.
    (model_input, input_s), (metrics, qc_s) = both(model_input_of, qc_of)
    reasons = (list(volume.qc_reasons) + _orientation_reasons(registration)
               + qc.check_ranges(metrics, params["qc_ranges"]))
    # When the image is not a head at all, that is the reason a reader needs first.
    reasons.sort(key=lambda reason: qc.reason_prefix(reason) != "not_a_head")
    lap("input_and_qc")
    timings.update({"input_and_qc.smooth_resize_normalise": input_s, "input_and_qc.qc": qc_s})
    timings["total"] = sum(seconds for stage, seconds in timings.items() if "." not in stage)
    logger.info("preprocessed", extra={"action": "preprocessed", "series_uid": volume.series_uid,
                                       "seconds": round(timings["total"], 3), "qc_reasons": reasons})
    return Preprocessed(model_input=model_input, brain_mask=brain, qc_metrics=metrics, qc_reasons=reasons,
                        transform=registration.transform, reference=reference, timings=timings,
                        brain_extraction=brain_extraction)


def _check_coverage(volume: Volume, minimum_mm: float) -> None:
    """A head cannot be registered from a few slices: reject instead of guessing."""
    size, spacing = volume.size, volume.image.GetSpacing()
    extents = [n * s for n, s in zip(size, spacing)]
    if min(extents) < minimum_mm:
        raise InputRejected(f"insufficient_coverage: volume extent {min(extents):.0f} mm < {minimum_mm:g} mm "
                            f"({size[2]} slice(s))")


def _masked_value(params: dict[str, Any], air: float) -> float:
    """What the skull-stripped image holds outside the brain: the bottom of the window."""
    if params.get("window"):
        return float(params["window"][0])
    return air


def _edge_ceiling(params: dict[str, Any]) -> float | None:
    """CT: edge voxels brighter than the window top are partial-volume bone, not brain."""
    return float(params["window"][1]) if params.get("window") else None


def _strip_working(working: sitk.Image, brain: np.ndarray, reference: sitk.Image,
                   mni_to_native: sitk.Transform, outside: float, edge_ceiling: float | None) -> sitk.Image:
    """Apply a model-grid brain mask to the working (native, ~2 mm) image."""
    mask = sitk.GetImageFromArray(brain.astype(np.float32))
    mask.CopyInformation(reference)
    on_working = sitk.Resample(mask, working, mni_to_native.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    inside = sitk.GetArrayViewFromImage(on_working) > 0.5
    values = sitk.GetArrayViewFromImage(working)
    if edge_ceiling is not None:
        edge = inside & ~ndimage.binary_erosion(inside)
        inside &= ~(edge & (values > edge_ceiling))
    array = np.where(inside, values, np.float32(outside)).astype(np.float32)
    stripped = sitk.GetImageFromArray(array)
    stripped.CopyInformation(working)
    return stripped


def regular_image(volume: Volume) -> sitk.Image:
    """The volume on an evenly spaced slice grid: gaps are filled by linear interpolation.

    `volume.image` assumes even spacing; after missing slices that puts later slices
    at the wrong height, so registration uses this instead. (Tilted series are already
    resampled to an orthogonal grid by `load_series`.)
    """
    image = volume.image
    if volume.slice_positions is None or image.GetSize()[2] < 2 or evenly_spaced(image, volume.slice_positions):
        return image
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    distances = (volume.slice_positions - np.asarray(image.GetOrigin())) @ direction[:, 2]
    step = float(image.GetSpacing()[2])
    count = int(round(distances[-1] / step)) + 1
    targets = np.arange(count) * step
    upper = np.clip(np.searchsorted(distances, targets, side="right"), 1, len(distances) - 1)
    lower = upper - 1
    weight = np.clip((targets - distances[lower]) / (distances[upper] - distances[lower]), 0.0, 1.0)
    source = sitk.GetArrayViewFromImage(image)
    filled = np.empty((count,) + source.shape[1:], dtype=np.float32)
    for k in range(count):
        filled[k] = (1.0 - weight[k]) * source[lower[k]] + weight[k] * source[upper[k]]
    regular = sitk.GetImageFromArray(filled)
    regular.SetSpacing(image.GetSpacing())
    regular.SetOrigin(image.GetOrigin())
    regular.SetDirection(image.GetDirection())
    return regular


def _n4(image: sitk.Image) -> sitk.Image:
    """N4 bias-field correction (MR, optional) on the small working image."""
    mask = sitk.OtsuThreshold(image, 0, 1)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([20, 20])
    return corrector.Execute(sitk.Cast(image, sitk.sitkFloat32), mask)


def shrink(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Block-average to about `spacing_mm` (integer factors; anti-aliases for free), float32."""
    factors = shrink_factors(image.GetSpacing(), spacing_mm)
    if image.GetPixelID() == sitk.sitkFloat32:
        return image if factors == [1, 1, 1] else sitk.BinShrink(image, factors)
    if factors == [1, 1, 1]:
        return sitk.Cast(image, sitk.sitkFloat32)
    return _shrink_in_slabs(image, factors)


def _shrink_in_slabs(image: sitk.Image, factors: list[int]) -> sitk.Image:
    """BinShrink of a non-float32 image (an int16 thin-slice CT) in slabs of whole blocks,
    each slab cast to float32 on its own (`BlockShrinker`), without a full-size float32 copy."""
    shrinker = BlockShrinker(image, image.GetSize(), factors)
    if shrinker.used_slices == 0:
        return sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    voxels = sitk.GetArrayViewFromImage(image)
    for start in range(0, shrinker.used_slices, shrinker.slab_slices):
        shrinker.add(start, voxels[start:min(shrinker.used_slices, start + shrinker.slab_slices)])
    return shrinker.image()


def normalise(values: np.ndarray, brain: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Window (CT) or robust percentiles (MR, landing at percentile_targets) to the output
    range, clipped there; outside the brain -> minimum."""
    out_low, out_high = params["output_range"]
    target_low, target_high = out_low, out_high
    if params["normalization"] == "window":
        low, high = params["window"]
    else:
        target_low, target_high = params.get("percentile_targets") or (out_low, out_high)
        inside = values[brain]
        if inside.size == 0:
            low, high = 0.0, 1.0
        else:
            low, high = (float(v) for v in np.percentile(inside, params["percentiles"]))
            high = max(high, low + 1e-3)
    scaled = (np.clip(values, low, high + (high - low) * (out_high - target_high) / (target_high - target_low))
              - low) / (high - low)
    result = target_low + scaled * (target_high - target_low)
    result[~brain] = out_low
    # float32 rounding can step a hair past the range (1.0000002); the contract is the range.
    return np.clip(result.astype(np.float32), np.float32(out_low), np.float32(out_high))


def to_native(model_map: np.ndarray, preprocessed: Preprocessed, volume: Volume) -> np.ndarray:
    """Take a model-grid map back to the native slices: (slices, rows, cols), float32.

    Index k is the slice of `volume.slice_sop_uids[k]`; `[k, r, c]` is pixel (row r,
    column c) of that slice. Outside the model grid the map is 0.
    """
    return to_native_map(model_map, preprocessed, volume).full()


def to_native_map(model_map: np.ndarray, preprocessed: Preprocessed, volume: Volume) -> NativeMap:
    """`to_native`'s map, resampled only where it is read (`ResampledMap`); a slice grid
    with gaps or tilt is resampled slice by slice at once (`DenseMap`)."""
    expected = tuple(preprocessed.reference.GetSize()[::-1])
    if model_map.shape != expected:
        raise ValueError(f"model_map: expected shape {expected}, got {model_map.shape}")
    model_map = np.ascontiguousarray(model_map, dtype=np.float32)
    source = sitk.GetImageFromArray(model_map)
    source.CopyInformation(preprocessed.reference)
    if not volume.is_regular:
        return DenseMap(_to_native_per_slice(source, preprocessed.transform.GetInverse(), volume))
    return ResampledMap(source, model_map, preprocessed.transform, volume.image, volume.size)


def _nonzero_box(model_map: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The (x, y, z) index range, inclusive, of a map's non-zero voxels widened by one: a
    linear interpolation outside it weighs zeros only (a brain-masked map is mostly zero)."""
    nonzero = np.nonzero(model_map)
    if nonzero[0].size == 0:
        return None
    return _widened(np.array([axis.min() for axis in nonzero[::-1]]), np.array([axis.max() for axis in nonzero[::-1]]),
                    model_map.shape)


def _widened(low: np.ndarray, high: np.ndarray, shape_zyx: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """An inclusive (x, y, z) index range widened by one voxel, inside the grid."""
    return np.maximum(low - 1, 0), np.minimum(high + 1, np.array(shape_zyx[::-1]) - 1)


class ResampledMap:
    """A model-grid map on a regular native slice grid (imaging.native_map.NativeMap),
    resampled linearly only where it is read. A linearly interpolated value is a weighted
    mean of the 8 model voxels around it, so it is 0 away from the map's non-zero voxels
    and reaches a level only near a voxel that does: only those boxes are resampled.
    A map whose non-zero box is small (WHOLE_MAP_VOXELS; an MR's is ~5 M voxels) is
    resampled whole at its first read and served from that: reading it in parts would
    cost about as much, and its slice sums would be estimates. `native` gives the grid's
    geometry, `native_size_xyz` its size (the voxels may be released)."""

    def __init__(self, source: sitk.Image, model_map: np.ndarray, mni_to_native: sitk.Transform,
                 native: sitk.Image, native_size_xyz: tuple[int, int, int]) -> None:
        self._source = source
        self._model_map = model_map
        self._mni_to_native = mni_to_native
        self._native_to_mni = mni_to_native.GetInverse()
        self._native = native
        self._size_xyz = np.array(native_size_xyz)
        self._nonzero = self._native_box(_nonzero_box(model_map))
        self._small = (self._nonzero is not None
                       and int(np.prod(self._nonzero[1] - self._nonzero[0])) <= WHOLE_MAP_VOXELS)
        self._whole: DenseMap | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self._size_xyz[::-1])

    def _dense(self) -> DenseMap | None:
        """The whole map, resampled at the first read, when it is small."""
        if self._small and self._whole is None:
            self._whole = DenseMap(self._slab(0, self.shape[0]))
        return self._whole

    def slab(self, start: int, stop: int) -> np.ndarray:
        dense = self._dense()
        return dense.slab(start, stop) if dense is not None else self._slab(start, stop)

    def _slab(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros((stop - start, *self.shape[1:]), dtype=np.float32)
        if self._nonzero is not None:
            low, high = self._nonzero[0].copy(), self._nonzero[1].copy()
            low[2], high[2] = max(low[2], start), min(high[2], stop)
            if high[2] > low[2]:
                out[low[2] - start:high[2] - start, low[1]:high[1], low[0]:high[0]] = self._region(low, high)
        return out

    def full(self) -> np.ndarray:
        return self.slab(0, self.shape[0])

    def sample(self, step: int) -> np.ndarray:
        dense = self._dense()
        return dense.sample(step) if dense is not None else self._strided(np.array([step, step, step]))

    def slice_sums(self) -> np.ndarray:
        """Estimated from every k-th row and column of every slice, k pixels no wider than
        a model voxel: the map is linear between model voxels (~2.5 mm; a thin-slice CT's
        pixels are ~0.5 mm, so k = 5 there); exact for a small map."""
        dense = self._dense()
        if dense is not None:
            return dense.slice_sums()
        pixel = min(self._native.GetSpacing()[:2])
        step = max(1, int(min(self._source.GetSpacing()) / pixel))
        return slice_sums_of(self._strided(np.array([step, step, 1])))

    def at_least(self, level: float, seeded_by: float | None = None,
                 near: IndexBox | None = None
                 ) -> tuple[tuple[int, ...], np.ndarray] | None:
        dense = self._dense()
        if dense is not None:
            return dense.at_least(level, seeded_by, near)
        with np.errstate(invalid="ignore"):  # NaN >= level is False
            mask = self._model_map >= level
            if seeded_by is not None:
                mask &= self._seeded(mask, self._model_map >= seeded_by, near)
        box = self._native_box(_nonzero_box(mask))
        if box is None:
            return None
        low, high = box[0], box[1]
        return (int(low[2]), int(low[1]), int(low[0])), self._region(low, high)

    def parts_at_least(self, level: float) -> list[MapPart]:
        """One box per connected group of model voxels >= `level`: a native voxel's value is
        a weighted mean of its 8 model corners, so it reaches a level only in the box of a
        group whose maximum (the part's bound) is at least its value. Scattered groups (a
        healthy map's top voxels lie apart) are read as small boxes, not one that spans them."""
        dense = self._dense()
        if dense is not None:
            return dense.parts_at_least(level)
        with np.errstate(invalid="ignore"):  # NaN >= level is False
            mask = self._model_map >= level
        labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        if count == 0:
            return []
        bounds, boxes = np.empty(count), []
        for number, found in enumerate(ndimage.find_objects(labels), start=1):
            bounds[number - 1] = self._model_map[found][labels[found] == number].max()
            low = np.array([axis.start for axis in found[::-1]])
            boxes.append(self._native_box(_widened(low, np.array([axis.stop - 1 for axis in found[::-1]]),
                                                   mask.shape)))
        spanning = self._native_box(_nonzero_box(mask))
        # Boxes that overlap so much that they hold more than the box around them all are read as that.
        if spanning is None or (sum(int(np.prod(box[1] - box[0])) for box in boxes if box is not None)
                                >= int(np.prod(spanning[1] - spanning[0]))):
            parts = [(float(bounds.max()), spanning)]
        else:
            parts = [(float(bounds[i]), boxes[i]) for i in np.argsort(-bounds, kind="stable")]
        return [(bound, functools.partial(self._read_box, box)) for bound, box in parts if box is not None]

    def _read_box(self, box: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
        low, high = box[0], box[1]
        return (int(low[2]), int(low[1]), int(low[0])), self._region(low, high)

    def _seeded(self, mask: np.ndarray, seeds: np.ndarray,
                near: IndexBox | None) -> np.ndarray:
        """The model voxels of `mask` that native voxels connected to a seed (or to `near`)
        can rest on. Neighbouring native voxels lie in the same or neighbouring model
        cells, whose corners are at most two voxels apart: components of `mask` grown by
        one voxel, kept where they hold a seed or meet the model box around `near`."""
        cube = np.ones((3, 3, 3), dtype=bool)
        labels, count = ndimage.label(ndimage.binary_dilation(mask, structure=cube), structure=cube)
        keep = np.zeros(count + 1, dtype=bool)
        keep[np.unique(labels[seeds])] = True
        if near is not None:
            keep[np.unique(labels[self._model_box(near)])] = True
        keep[0] = False
        return keep[labels]

    def _model_box(self, near: IndexBox) -> tuple[slice, slice, slice]:
        """The model (z, y, x) index box around an inclusive native (slice, row, column) box."""
        (z0, y0, x0), (z1, y1, x1) = near
        corners = [self._source.TransformPhysicalPointToContinuousIndex(self._native_to_mni.TransformPoint(
            self._native.TransformContinuousIndexToPhysicalPoint([float(x), float(y), float(z)])))
            for z in (z0, z1) for y in (y0, y1) for x in (x0, x1)]
        low = np.maximum(np.floor(np.min(corners, axis=0)).astype(int) - 1, 0)
        high = np.minimum(np.ceil(np.max(corners, axis=0)).astype(int) + 2, np.array(self._source.GetSize()))
        return slice(low[2], high[2]), slice(low[1], high[1]), slice(low[0], high[0])

    def _strided(self, step: np.ndarray) -> np.ndarray:
        """map[::step_z, ::step_y, ::step_x] (step given as x, y, z)."""
        out = np.zeros(tuple((-(-self._size_xyz // step))[::-1]), dtype=np.float32)
        if self._nonzero is None:
            return out
        low, high = self._nonzero
        first = -(-low // step) * step  # the first index on the stride inside the box
        if np.any(first >= high):
            return out
        count = -(-(high - first) // step)
        at = first // step
        out[at[2]:at[2] + count[2], at[1]:at[1] + count[1], at[0]:at[0] + count[0]] = self._region(first, high, step)
        return out

    def _native_box(self, model_box: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
        """The native (x, y, z) index box, [low, high) as a (2, 3) array, that holds every
        native voxel whose interpolation weighs a voxel of `model_box`; None if empty."""
        if model_box is None:
            return None
        ranges = [[float(lo) - 0.5, float(hi) + 0.5] for lo, hi in zip(*model_box, strict=True)]
        corners = [self._source.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
                   for corner in np.array(np.meshgrid(*ranges)).reshape(3, -1).T]
        indices = np.array([self._native.TransformPhysicalPointToContinuousIndex(self._mni_to_native.TransformPoint(c))
                            for c in corners])
        low = np.clip(np.floor(indices.min(axis=0)).astype(int) - 1, 0, self._size_xyz)
        high = np.clip(np.ceil(indices.max(axis=0)).astype(int) + 2, 0, self._size_xyz)
        if np.any(high <= low):
            return None
        return np.array([low, high])

    def _region(self, low: np.ndarray, high: np.ndarray, step: np.ndarray | None = None) -> np.ndarray:
        """The map at native indices low + step * i below high per axis (x, y, z), as (z, y, x)."""
        step = np.ones(3, dtype=int) if step is None else step
        count = -(-(high - low) // step)
        out = np.empty(tuple(int(n) for n in count[::-1]), dtype=np.float32)
        resample = sitk.ResampleImageFilter()
        resample.SetOutputSpacing([float(s) * int(k) for s, k in zip(self._native.GetSpacing(), step, strict=True)])
        resample.SetOutputDirection(self._native.GetDirection())
        resample.SetTransform(self._native_to_mni)
        resample.SetInterpolator(sitk.sitkLinear)
        resample.SetDefaultPixelValue(0.0)
        resample.SetOutputPixelType(sitk.sitkFloat32)
        # In slabs of slices, each straight into its place: the box of a thin-slice CT is
        # hundreds of MB of float32, a slab a few tens (each voxel is the same either way).
        per_slab = max(1, _SLAB_VOXELS // int(count[0] * count[1]))
        for start in range(0, int(count[2]), per_slab):
            stop = min(start + per_slab, int(count[2]))
            resample.SetSize([int(count[0]), int(count[1]), stop - start])
            origin = [int(low[0]), int(low[1]), int(low[2] + step[2] * start)]
            resample.SetOutputOrigin(self._native.TransformIndexToPhysicalPoint(origin))
            slab = resample.Execute(self._source)  # held: the view below does not keep it alive
            out[start:stop] = sitk.GetArrayViewFromImage(slab)
        return out


_SLAB_VOXELS = 8_000_000
# A map whose non-zero box holds at most this many native voxels is resampled whole (one slab).
WHOLE_MAP_VOXELS = _SLAB_VOXELS


def native_focus(model_map: np.ndarray, preprocessed: Preprocessed, volume: Volume
                 ) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """Where on the native slices a model-grid map's focal term peaks: the native index box
    (low and high (slice, row, column), inclusive) around the centre of its strongest
    FOCAL_KERNEL cube (`headscreen.scores.focal_centre`, inside the brain mask), as wide as
    that cube. None when no cube fits in the brain or the centre falls off the slices."""
    centre = focal_centre(model_map, preprocessed.brain_mask)
    if centre is None:
        return None
    z, y, x = centre
    point = preprocessed.transform.TransformPoint(preprocessed.reference.TransformIndexToPhysicalPoint((x, y, z)))
    column, row, depth = volume.image.TransformPhysicalPointToContinuousIndex(point)
    spacing = np.array(volume.image.GetSpacing())  # (columns, rows, slices)
    if not volume.is_regular and volume.slice_positions is not None:
        # Slices with gaps or tilt: the slice whose plane lies nearest the point.
        normal = np.asarray(volume.image.GetDirection()).reshape(3, 3)[:, 2]
        offsets = (np.asarray(volume.slice_positions) - np.asarray(point)) @ normal
        depth = float(np.argmin(np.abs(offsets)))
        steps = np.abs(np.diff(np.asarray(volume.slice_positions) @ normal))
        spacing[2] = float(np.median(steps)) if steps.size else spacing[2]
    half_mm = 0.5 * FOCAL_KERNEL * max(preprocessed.reference.GetSpacing())
    half = np.ceil(half_mm / spacing).astype(int)
    centre_native = np.rint([depth, row, column]).astype(int)
    size = np.array(volume.size)[::-1]  # (slices, rows, columns)
    if np.any(centre_native < 0) or np.any(centre_native >= size):
        return None
    low = np.maximum(centre_native - half[::-1], 0)
    high = np.minimum(centre_native + half[::-1], size - 1)
    return (int(low[0]), int(low[1]), int(low[2])), (int(high[0]), int(high[1]), int(high[2]))


def _to_native_per_slice(source: sitk.Image, native_to_mni: sitk.Transform, volume: Volume) -> np.ndarray:
    """Resample slice by slice at the true slice positions (gaps, gantry tilt)."""
    positions = volume.slice_positions
    if positions is None:
        raise ValueError("volume: slice_positions are needed for an irregular slice grid")
    cols, rows, n_slices = volume.size
    out = np.zeros((n_slices, rows, cols), dtype=np.float32)
    plane = sitk.Image([cols, rows, 1], sitk.sitkUInt8)
    plane.SetSpacing(volume.image.GetSpacing())
    plane.SetDirection(volume.image.GetDirection())
    for k in range(n_slices):
        plane.SetOrigin(_triple(positions[k]))
        resampled = sitk.Resample(source, plane, native_to_mni, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out[k] = sitk.GetArrayViewFromImage(resampled)[0]
    return out


@functools.lru_cache(maxsize=8)
def _template_mask_cached(size_zyx: tuple[int, int, int], origin: tuple[float, ...],
                          spacing: tuple[float, ...]) -> np.ndarray:
    grid = ModelGrid(size_zyx, _triple(origin), _triple(spacing))
    maps = templates.tissue_maps()
    base = sitk.GetImageFromArray(maps.brain.astype(np.float32))
    base.CopyInformation(maps.reference)
    resampled = sitk.Resample(base, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = sitk.GetArrayFromImage(resampled) > 0.5
    mask.setflags(write=False)
    return mask


def template_mask_on_grid(grid: ModelGrid) -> np.ndarray:
    """The ICBM brain mask on the model grid (bool, read-only)."""
    return _template_mask_cached(grid.size_zyx, grid.origin, grid.spacing)


@functools.lru_cache(maxsize=8)
def _atlas_head_mask(modality: str, spacing_mm: float) -> sitk.Image:
    maps = templates.tissue_maps()
    head = sitk.GetImageFromArray(maps.head.astype(np.float32))
    head.CopyInformation(maps.reference)
    atlas = templates.atlas(modality, spacing_mm)
    return sitk.Cast(sitk.Resample(head, atlas, sitk.Transform(), sitk.sitkLinear, 0.0) > 0.5, sitk.sitkUInt8)


def _registration_settings(params: dict[str, Any], working: sitk.Image) -> dict[str, Any]:
    """Registration settings with the head threshold resolved for this image and the atlas."""
    settings = dict(params["registration"])
    if "head_threshold" in settings:
        settings.setdefault("atlas_head_threshold", settings["head_threshold"])
        return settings
    # MR has no absolute scale: the head is everything above a fraction of the bright end,
    # of each image's own (a scanner's units are not the atlas').
    fraction = float(settings["head_threshold_fraction"])
    atlas = templates.atlas(params["modality"], float(settings["atlas_spacing_mm"]))
    settings["head_threshold"] = fraction * _bright_end(working)
    settings["atlas_head_threshold"] = fraction * _bright_end(atlas)
    return settings


def _bright_end(image: sitk.Image) -> float:
    return float(np.percentile(sitk.GetArrayViewFromImage(image), 99.5))


def _atlas_mask_on_grid(mask: np.ndarray, atlas: sitk.Image, reference: sitk.Image) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.float32))
    image.CopyInformation(atlas)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled) > 0.5


def _orientation_reasons(registration: RegistrationResult) -> list[str]:
    """A head stored upside down is named, never registered silently into a result."""
    if registration.upside_down:
        return [f"orientation_flipped: the head is upside down relative to the DICOM patient axes "
                f"(registration needed a {registration.rotation_deg:.0f} degree turn)"]
    return []


def _qc_metrics(volume: Volume, working: sitk.Image, registration: RegistrationResult, brain: np.ndarray,
                template_mask: np.ndarray, grid: ModelGrid, params: dict[str, Any],
                reg_settings: dict[str, Any], moved: np.ndarray, in_view: np.ndarray) -> dict[str, float]:
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    metrics: dict[str, float] = {
        "brain_volume_ml": float(brain.sum()) * voxel_ml * registration.affine_scale ** 3,
        "rotation_deg": registration.rotation_deg,
        "affine_scale": registration.affine_scale,
        "registration_metric": registration.metric,
    }
    atlas_spacing = float(params["registration"]["atlas_spacing_mm"])
    metrics["head_dice"] = _head_dice(moved, in_view, float(reg_settings["head_threshold"]), volume.modality,
                                      atlas_spacing)
    metrics["head_similarity"] = _head_similarity(moved, in_view, volume.modality, atlas_spacing)
    if volume.modality == "CT":
        metrics["skull_coverage"] = _skull_coverage(moved, in_view, atlas_spacing, params["skull_check"])
        metrics["brain_dice"] = skullstrip.dice(brain, template_mask)
        metrics["noise_sigma"] = _native_noise(volume, *params["noise_band"])
    else:
        band = np.percentile(sitk.GetArrayViewFromImage(working), [50.0, 99.5])
        sigma = _native_noise(volume, float(reg_settings["head_threshold"]), float(band[1]))
        metrics["noise_relative"] = sigma / float(band[1]) if band[1] > 0 else float("nan")
        metrics["skull_coverage"] = _t1_skull_coverage(moved, in_view, atlas_spacing, params["skull_check"])
    for key in ("slice_spacing_cv", "gantry_tilt_deg", "missing_slices"):
        if key in volume.qc_metrics:
            metrics[key] = float(volume.qc_metrics[key])
    # NaN/inf are not JSON (and PostgreSQL refuses them): an unmeasurable metric is left out.
    return {name: value for name, value in metrics.items() if np.isfinite(value)}


def _in_atlas_space(working: sitk.Image, registration: RegistrationResult, modality: str,
                    atlas_spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """The working image on the atlas grid, and a mask of the atlas voxels it covers."""
    atlas = templates.atlas(modality, atlas_spacing)
    moved = sitk.Resample(working, atlas, registration.transform, sitk.sitkLinear,
                          float(templates.intensity_table(modality)["air"]), sitk.sitkFloat32)
    covered = sitk.Image(working.GetSize(), sitk.sitkUInt8) + 1
    covered.CopyInformation(working)
    in_view = sitk.Resample(covered, atlas, registration.transform, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(in_view).astype(bool)


@functools.lru_cache(maxsize=8)
def _cranium_rows(modality: str, atlas_spacing: float) -> slice:
    """Atlas rows (z) from 20 mm above the template brain's floor up: the face and neck
    vary with the field of view and from head to head; the cranium does not. Cached: the
    template brain's box is a search of the 1 mm tissue model, which a worker releases
    once warm (daemon.worker)."""
    atlas = templates.atlas(modality, atlas_spacing)
    floor_z = templates.brain_bbox_lps()[0][2] + 20.0
    floor_index = int(np.ceil(atlas.TransformPhysicalPointToContinuousIndex((0.0, 0.0, floor_z))[2]))
    return slice(max(floor_index, 0), None)


def _head_dice(moved: np.ndarray, in_view: np.ndarray, threshold: float, modality: str,
               atlas_spacing: float) -> float:
    """Overlap of the registered head with the atlas head: cranium only, and only where
    the scan has voxels (a field of view that cuts the occiput is a coverage question)."""
    atlas_head = sitk.GetArrayViewFromImage(_atlas_head_mask(modality, atlas_spacing)).astype(bool)
    rows = _cranium_rows(modality, atlas_spacing)
    view = in_view[rows]
    # Bone, sinuses and CSF are dark on T1 but inside the head: fill them in, slice by slice.
    head = skullstrip.fill_holes(ndimage.binary_closing(moved[rows] > threshold, iterations=2), in_planes=True)
    return skullstrip.dice(head & view, atlas_head[rows] & view)


def _head_similarity(moved: np.ndarray, in_view: np.ndarray, modality: str, atlas_spacing: float) -> float:
    """Correlation of the registered image with the atlas over the atlas head (cranium).

    A real head, even an unusual one, resembles a head (0.6-0.9 measured on the real T1
    and on phantoms); noise, a chest or a cylinder registered "as best it can" does not.
    """
    atlas = sitk.GetArrayViewFromImage(templates.atlas(modality, atlas_spacing))
    head = sitk.GetArrayViewFromImage(_atlas_head_mask(modality, atlas_spacing)).astype(bool)
    rows = _cranium_rows(modality, atlas_spacing)
    region = head[rows] & in_view[rows]
    if region.sum() < 100:
        return 0.0
    a, b = atlas[rows][region].astype(np.float64), moved[rows][region].astype(np.float64)
    if modality == "CT":
        # Bone would dominate a plain correlation; soft tissue and brain carry the anatomy.
        a, b = np.clip(a, -100.0, 300.0), np.clip(b, -100.0, 300.0)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _skull_coverage(moved: np.ndarray, in_view: np.ndarray, atlas_spacing: float, check: dict[str, float]) -> float:
    """qc.skull_coverage on CT, where bone is what is dense, judged only where the scan
    covered the head (a field of view that stops at the vertex says nothing about bone)."""
    head = sitk.GetArrayViewFromImage(_atlas_head_mask("CT", atlas_spacing)).astype(bool) & in_view
    acquired = in_view & qc.scanned_rows(moved, head, float(check["ct_air_hu"]))[:, None, None]
    rays = templates.skull_rays(atlas_spacing)
    where = rays.points.transpose(2, 0, 1)
    profiles = ndimage.map_coordinates(moved, where, order=1, cval=float(check["ct_air_hu"]))
    seen = ndimage.map_coordinates(acquired.astype(np.uint8), where, order=0, cval=0) > 0
    return qc.skull_coverage(profiles, seen, rays.caps, float(check["ct_bone_hu"]), float(check["min_seen"]))


def _t1_skull_coverage(moved: np.ndarray, in_view: np.ndarray, atlas_spacing: float,
                       check: dict[str, float]) -> float:
    """qc.cap_coverage of qc.t1_bone_depth over the upper vault, in units of the brain's own
    level (T1 has no absolute scale); judged only where the scan covered the head."""
    brain = sitk.GetArrayViewFromImage(templates.atlas_brain_mask(atlas_spacing)).astype(bool)
    core = ndimage.binary_erosion(brain, iterations=3) & in_view
    if core.sum() < 100:
        return float("nan")
    level = float(np.percentile(moved[core], 90.0))
    if level <= 0:
        return float("nan")
    values = moved / level
    head = sitk.GetArrayViewFromImage(_atlas_head_mask("MR", atlas_spacing)).astype(bool) & in_view
    acquired = in_view & qc.scanned_rows(values, head, float(check["t1_air"]))[:, None, None]
    rays = templates.skull_rays(atlas_spacing)
    up = rays.directions[:, 0] >= np.sin(np.radians(float(check["t1_min_elevation_deg"])))
    first = int(np.searchsorted(templates.skull_ray_offsets_mm(), float(check["t1_start_mm"])))
    where = rays.points[up, first:].transpose(2, 0, 1)
    profiles = ndimage.map_coordinates(values, where, order=1, cval=0.0)
    seen = ndimage.map_coordinates(acquired.astype(np.uint8), where, order=0, cval=0) > 0
    bone = qc.t1_bone_depth(profiles, float(check["t1_margin"]), templates.SKULL_RAY_STEP_MM) >= float(
        check["t1_min_bone"])
    return qc.cap_coverage(bone & seen.any(axis=1), seen, rays.caps[np.ix_(up, up)], float(check["min_seen"]))


def _native_noise(volume: Volume, low: float, high: float) -> float:
    return qc.noise_sigma(volume.middle_slices(), low, high)
