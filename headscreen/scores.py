"""Scores from a model's error map, inside the brain and against healthy voxels.

A reconstruction model's error is never zero: some anatomy (the cortex rim, the
ventricle walls, the frontal pole where it meets the crop) is hard to reconstruct
on every head. Scoring the raw error lets those places dominate. Here each voxel's
error is standardised against the healthy reference in model space (a z-map, one
mean and one SD per voxel, fitted on healthy training scans and shipped in the
bundle), and every term is taken only inside the case's own brain mask, eroded by
a margin and kept away from the model grid's edge.

The `_rel` terms compare each voxel with the case's own median and spread of z, so
a scanner that raises the error everywhere does not raise them; a finding does.

The `z_asym` terms compare each voxel with its mirror image across the midline. The
model grid is MNI, centred on the midline in x (its last array axis), and healthy
anatomy, the model's systematic errors and the blur of re-posing a head are nearly
left-right symmetric there, while hemorrhage, subdurals, infarcts and tumours are
mostly one-sided: z minus mirrored z cancels the first and keeps the second.

Torch-free: training computes the same terms with this module, so the bundle's
calibration describes exactly what the daemon computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

NORMATIVE_FILE = "normative.npz"
# Terms this module computes (the ONNX graph computes the papers' own terms).
ASYMMETRY_TERMS = ("z_asym_focal", "z_asym_extent")
MASKED_TERMS = ("z_mean", "z_focal", "z_extent", "rec_brain", "z_focal_rel", "z_extent_rel", *ASYMMETRY_TERMS)
#: The SEG's threshold on the error map, in multiples of the healthy limit: 1.0 marks every
#: voxel above what healthy scans reach. A bundle may carry its own, calibrated on healthy
#: scans (manifest calibration.seg_threshold); this is the fallback.
DEFAULT_SEG_THRESHOLD = 1.0
EXTENT_Z = 3.0            # a voxel "exceeds" the healthy range above this z
FOCAL_KERNEL = 5          # voxels per side of the cube the focal term averages over
FOCAL_MIN_SHARE = 0.5     # share of the cube that must lie in the mask
EDGE_VOXELS = 2           # voxels next to the grid edge never count (the crop boundary)
SUPPORT_SHARE = 0.8       # a voxel counts where at least this share of healthy brains cover it
SD_FLOOR_PERCENTILE = 10  # SDs below this percentile of the brain's SDs are raised to it
MIN_EVALUATED_VOXELS = 200
LR_AXIS = -1              # x (left-right) on the (z, y, x) model grid, whose x range is symmetric about 0
# z minus mirrored z: the difference of two unit-SD values has SD sqrt(2).
ASYM_EXTENT_Z = EXTENT_Z * float(np.sqrt(2.0))


@dataclass(frozen=True)
class Normative:
    """Healthy voxel-error statistics on the model grid."""

    mean: np.ndarray     # float32 (D, H, W)
    sd: np.ndarray       # float32 (D, H, W), floored, > 0 everywhere
    support: np.ndarray  # bool: where healthy brains are, away from the grid edge
    margin_voxels: int   # erosion of each case's brain mask before scoring
    z_limit: float = 1.0  # healthy 99.9th percentile of z: the overlay's unit

    @classmethod
    def fit(cls, error_maps: np.ndarray, brain_masks: np.ndarray, margin_voxels: int = 1) -> Normative:
        """Per-voxel mean and SD of healthy errors, each voxel over the cases whose
        brain covers it. `error_maps` and `brain_masks` are [N, D, H, W]."""
        masks = np.asarray(brain_masks, dtype=bool)
        maps = np.asarray(error_maps, dtype=np.float64)
        count = masks.sum(axis=0)
        safe = np.maximum(count, 1)
        mean = np.where(masks, maps, 0.0).sum(axis=0) / safe
        var = np.where(masks, (maps - mean) ** 2, 0.0).sum(axis=0) / np.maximum(count - 1, 1)
        support = (count >= SUPPORT_SHARE * len(masks)) & _away_from_edge(mean.shape)
        if not support.any():
            raise ValueError("no voxel is inside the brain in enough healthy cases to fit a normative model")
        # Smoothing the SD map keeps single noisy voxels from dividing by chance lows.
        sd = ndimage.gaussian_filter(np.sqrt(var), sigma=1.0)
        floor = float(np.percentile(sd[support], SD_FLOOR_PERCENTILE))
        sd = np.maximum(sd, max(floor, 1e-6))
        return cls(mean.astype(np.float32), sd.astype(np.float32), support, int(margin_voxels))

    def with_z_limit(self, error_maps: np.ndarray, brain_masks: np.ndarray, percentile: float = 99.9) -> Normative:
        """Set the overlay unit from held-out healthy cases (not those the statistics came from)."""
        values = [z_map(e, self)[evaluation_mask(m, self)] for e, m in zip(error_maps, brain_masks)]
        pooled = np.concatenate(values) if values else np.zeros(0)
        limit = float(np.percentile(pooled, percentile)) if pooled.size else 1.0
        return Normative(self.mean, self.sd, self.support, self.margin_voxels, max(limit, 1e-3))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, mean=self.mean.astype(np.float16), sd=self.sd.astype(np.float16),
                            support=np.packbits(self.support), shape=np.asarray(self.mean.shape),
                            margin_voxels=self.margin_voxels, z_limit=self.z_limit)

    @classmethod
    def load(cls, path: Path) -> Normative:
        with np.load(path) as data:
            shape = tuple(int(s) for s in data["shape"])
            support = np.unpackbits(data["support"])[: int(np.prod(shape))].reshape(shape).astype(bool)
            return cls(data["mean"].astype(np.float32), data["sd"].astype(np.float32), support,
                       int(data["margin_voxels"]), float(data["z_limit"]))


def _away_from_edge(shape: tuple[int, ...]) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    inside[tuple(slice(EDGE_VOXELS, n - EDGE_VOXELS) for n in shape)] = True
    return inside


def evaluation_mask(brain_mask: np.ndarray, normative: Normative) -> np.ndarray:
    """The voxels a case is scored on: its brain, eroded, where the healthy model is defined."""
    mask = np.asarray(brain_mask, dtype=bool)
    if normative.margin_voxels > 0:
        mask = ndimage.binary_erosion(mask, iterations=normative.margin_voxels)
    return mask & normative.support


def z_map(error_map: np.ndarray, normative: Normative) -> np.ndarray:
    return ((np.asarray(error_map, dtype=np.float32) - normative.mean) / normative.sd).astype(np.float32)


def uses_asymmetry(term_weights: dict[str, float]) -> bool:
    """Whether a bundle's score weighs the asymmetry terms: its overlay and SEG are then
    one-sided too, so they show what the score saw."""
    return any(weight > 0 for term, weight in term_weights.items() if term in ASYMMETRY_TERMS)


def masked_terms(error_map: np.ndarray, brain_mask: np.ndarray, normative: Normative,
                 one_sided: bool = False) -> tuple[dict[str, float], np.ndarray]:
    """The masked score terms and the overlay map (positive z in units of the healthy
    limit, zero outside the evaluated voxels; `one_sided`: less what the voxel's mirror
    image also has, see `one_sided_z`). Raises ValueError when too little brain is left
    to score, which preprocessing QC should have caught."""
    mask = evaluation_mask(brain_mask, normative)
    if int(mask.sum()) < MIN_EVALUATED_VOXELS:
        raise ValueError(f"only {int(mask.sum())} brain voxels to score (need {MIN_EVALUATED_VOXELS})")
    z = z_map(error_map, normative)
    inside = z[mask]
    focal = _focal(z, mask)
    # A scanner unlike the training data raises the error everywhere; a finding raises
    # it somewhere. The *_rel terms measure against the case's own median and spread.
    median = float(np.median(inside))
    spread = max(1.4826 * float(np.median(np.abs(inside - median))), 1e-3)
    terms = {
        "z_mean": float(inside.mean()),
        "z_focal": focal,
        "z_extent": float(np.mean(inside > EXTENT_Z)),
        "rec_brain": float(np.asarray(error_map)[mask].mean()),
        "z_focal_rel": (focal - median) / spread,
        "z_extent_rel": float(np.mean(inside > median + EXTENT_Z * spread)),
        **asymmetry_terms(z, mask),
    }
    shown = one_sided_z(z, mask) if one_sided else z
    overlay = np.where(mask, np.clip(shown, 0.0, None) / normative.z_limit, 0.0).astype(np.float32)
    return terms, overlay


def one_sided_z(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """z, lowered by the mirror image's z where that is positive too: an error both
    hemispheres share (hard anatomy, a scanner unlike training) fades, a one-sided
    finding keeps its value. Voxels whose mirror is not scored keep z."""
    both = mask & np.flip(mask, axis=LR_AXIS)
    mirrored = np.flip(z, axis=LR_AXIS)
    return np.where(both, np.minimum(z, z - mirrored), z).astype(np.float32)


def _cube_means(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centres, means): the voxels whose FOCAL_KERNEL cube lies mostly inside `mask`, and
    the mean of `values` (inside `mask`) over each of those cubes."""
    weights = ndimage.uniform_filter(mask.astype(np.float32), FOCAL_KERNEL, mode="constant")
    sums = ndimage.uniform_filter(np.where(mask, values, 0.0).astype(np.float32), FOCAL_KERNEL, mode="constant")
    eligible = mask & (weights >= FOCAL_MIN_SHARE)
    return eligible, sums[eligible] / weights[eligible]


def _focal(values: np.ndarray, mask: np.ndarray) -> float:
    """Largest mean of `values` over a FOCAL_KERNEL cube mostly inside `mask`."""
    _, local = _cube_means(values, mask)
    return float(local.max()) if local.size else float(values[mask].max())


def focal_centre(values: np.ndarray, mask: np.ndarray) -> tuple[int, int, int] | None:
    """The centre (z, y, x) of the FOCAL_KERNEL cube, mostly inside `mask`, where `values`
    have their largest mean: where a map's focal term finds it. None when no cube fits."""
    mask = np.asarray(mask, dtype=bool)
    eligible, local = _cube_means(np.asarray(values), mask)
    if local.size == 0:
        return None
    z, y, x = np.argwhere(eligible)[int(np.argmax(local))]
    return int(z), int(y), int(x)


def asymmetry_terms(z: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """z_asym_focal and z_asym_extent: the focal and extent terms of z minus z mirrored
    across the midline, over the scored voxels whose mirror image is scored too."""
    both = mask & np.flip(mask, axis=LR_AXIS)
    if not both.any():
        return {"z_asym_focal": 0.0, "z_asym_extent": 0.0}
    difference = np.where(both, z - np.flip(z, axis=LR_AXIS), 0.0).astype(np.float32)
    return {"z_asym_focal": _focal(difference, both),
            "z_asym_extent": float(np.mean(difference[both] > ASYM_EXTENT_Z))}


def batch_terms(error_maps: np.ndarray, brain_masks: np.ndarray, normative: Normative) -> dict[str, np.ndarray]:
    """`masked_terms` over [N, D, H, W] arrays -> term -> [N]."""
    rows = [masked_terms(e, m, normative)[0] for e, m in zip(error_maps, brain_masks)]
    return {t: np.array([r[t] for r in rows], dtype=np.float64) for t in MASKED_TERMS}
