"""Quality-control measurements, their plausible ranges, and which reasons block a result.

A value outside its range becomes a human-readable reason such as
"registration_poor: head_dice 0.62 outside [0.85, 1.0]"; it flags the study
instead of crashing the job. Every reason prefix is either *blocking* (the study
is not eligible: no score, no percentile, no coloured overlay, no SEG) or
*advisory* (it travels with a normal result). docs/conformance.md lists both.
"""

from __future__ import annotations

import numpy as np

# metric name -> reason prefix used when the metric is out of range
REASON_PREFIX = {
    "brain_volume_ml": "brain_volume_implausible",
    "head_dice": "registration_poor",
    "brain_dice": "skull_strip_poor",
    "rotation_deg": "orientation_unusual",
    "affine_scale": "registration_scale_implausible",
    "noise_sigma": "noise_high",
    "noise_relative": "noise_high",
    "slice_spacing_cv": "slice_spacing_irregular",
    "registration_metric": "registration_poor",
    "skull_coverage": "skull_defect",
    "head_similarity": "not_a_head",
}

# A screen result computed after one of these cannot be trusted: the model would be
# judging a misplaced, mis-stripped, mis-oriented, incomplete or non-head image.
BLOCKING = frozenset({
    "registration_failed", "registration_poor", "registration_scale_implausible",
    "orientation_unusual", "orientation_flipped",
    "skull_strip_poor", "brain_extraction_failed", "brain_volume_implausible",
    "insufficient_coverage", "noise_high", "not_a_head", "modality_mismatch", "geometry_assumed",
    "no_suitable_series",
    # The input itself failed to decode or was refused (headscreen.errors): nothing to screen.
    "input_undecodable", "input_rejected",
})
# Worth telling the reader, but the result still stands.
ADVISORY = frozenset({
    "skull_defect", "slice_spacing_irregular", "missing_slices", "uneven_slice_spacing", "gantry_tilt",
    "chronological_age", "brain_age_implausible", "qc_out_of_range",
    # Bad input that was left out so the rest could be screened (daemon.pipeline).
    "header_values_dropped", "instances_excluded", "seg_not_built",
})


def reason_prefix(reason: str) -> str:
    """'registration_poor: head_dice ...' -> 'registration_poor'."""
    return reason.split(":", 1)[0].strip()


def is_blocking(reason: str) -> bool:
    """True for a reason that makes a study not eligible; unknown prefixes are advisory."""
    prefix = reason_prefix(reason)
    return any(prefix == name or prefix.startswith(name + "_") for name in BLOCKING)


def blocking_reasons(reasons: list[str]) -> list[str]:
    """The blocking reasons among `reasons`, in order, without duplicates."""
    return [r for r in dict.fromkeys(reasons) if is_blocking(r)]


def check_ranges(metrics: dict[str, float], ranges: dict[str, list[float]]) -> list[str]:
    """One reason per metric that lies outside its [low, high] range."""
    reasons = []
    for name, (low, high) in ranges.items():
        if name not in metrics:
            continue
        value = metrics[name]
        if not (low <= value <= high) or not np.isfinite(value):
            prefix = REASON_PREFIX.get(name, "qc_out_of_range")
            reasons.append(f"{prefix}: {name} {value:.3g} outside [{low:g}, {high:g}]")
    return reasons


def noise_sigma(slab: np.ndarray, low: float, high: float) -> float:
    """Noise estimate from in-plane neighbour differences inside a tissue intensity band.

    Differences of neighbouring pixels cancel smooth anatomy; the robust spread
    (MAD) of those differences divided by sqrt(2) estimates the per-pixel sigma.
    """
    diff = np.diff(slab.astype(np.float32), axis=-1)
    both = (slab[..., 1:] > low) & (slab[..., 1:] < high) & (slab[..., :-1] > low) & (slab[..., :-1] < high)
    values = diff[both]
    if values.size < 100:
        return float("nan")
    mad = np.median(np.abs(values - np.median(values)))
    return float(1.4826 * mad / np.sqrt(2.0))


def skull_coverage(profiles: np.ndarray, seen: np.ndarray, caps: np.ndarray, bone_hu: float,
                   min_seen: float) -> float:
    """Bone found in the worst-covered cap of the skull vault: the share of the cap's rays
    along which the image rises above `bone_hu` (1 = bone all round, 0 = a missing bone flap).

    `profiles` (rays, samples) are values along rays from inside the brain outward, `seen`
    (same shape, bool) says which samples the scan acquired, `caps` (rays, rays) which rays
    make up the cap about each ray (templates.skull_rays). A ray that meets bone counts
    wherever it is cut; one without bone counts only if the scan covered all of it, and a
    cap only if at least `min_seen` of its rays count: an unscanned vertex is not a defect.
    """
    return cap_coverage(((profiles > bone_hu) & seen).any(axis=1), seen, caps, min_seen)


def cap_coverage(bone: np.ndarray, seen: np.ndarray, caps: np.ndarray, min_seen: float) -> float:
    """The share of rays with `bone` (rays,) in the worst judged cap (see skull_coverage)."""
    counted = bone | seen.all(axis=1)
    in_cap = caps.sum(axis=1)
    counted_in_cap = caps.astype(np.int32) @ counted.astype(np.int32)
    bone_in_cap = caps.astype(np.int32) @ bone.astype(np.int32)
    judged = (counted_in_cap >= min_seen * in_cap) & (counted_in_cap > 0)
    if not judged.any():
        return float("nan")
    return float(np.min(bone_in_cap[judged] / counted_in_cap[judged]))


def t1_bone_depth(profiles: np.ndarray, margin: float, step_mm: float) -> np.ndarray:
    """How much dark bone each ray crosses on T1 (mm x fraction of the brain's level).

    Cortical bone has no T1 signal: between the brain and the scalp (bright fat, marrow,
    muscle) it is a dark trough. `profiles` (rays, samples), divided by the brain's level,
    run from inside the brain outward. Each sample's depth below the lower of the brightest
    values inward and outward of it (the water level of the trough) is summed where it
    exceeds `margin`. A missing bone flap leaves soft tissue against the brain: the only
    trough left is the thin CSF rim. Air beyond the skin is no trough (no wall outside it).
    """
    inward = np.maximum.accumulate(profiles, axis=1)
    outward = np.maximum.accumulate(profiles[:, ::-1], axis=1)[:, ::-1]
    depth = np.minimum(inward, outward) - profiles
    return np.clip(depth - margin, 0.0, None).sum(axis=1) * step_mm


def scanned_rows(values: np.ndarray, head: np.ndarray, air_below: float) -> np.ndarray:
    """Per row (axis 0) of a registered image: False where most of the head there reads
    as air. Such rows lie beyond the scanned range (slices filled with air, as synthetic
    partial coverage does) and say nothing about the bone in them."""
    in_head = head.sum(axis=(1, 2))
    air = (head & (values < air_below)).sum(axis=(1, 2))
    return ~((in_head > 0) & (air > 0.5 * in_head))
