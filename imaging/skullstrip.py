"""Brain extraction on the model grid (MNI space).

CT follows the threshold-and-morphology approach validated by Muschelli et al.,
"Validated automatic brain extraction of head CT images", NeuroImage 114 (2015)
379-385: keep voxels in a brain HU range, cut thin bridges by erosion, keep the
largest connected component, grow back and fill holes. Because we work after
registration, a dilated template brain mask bounds the search (a prior that stops
leaks through the foramina into the neck and orbits).
MR uses the template brain mask carried into the registered image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage


def strip_ct(hu: np.ndarray, template_mask: np.ndarray, spacing_zyx: tuple[float, float, float],
             settings: dict[str, Any]) -> np.ndarray:
    """Brain mask (bool, same shape) of a CT already registered to MNI (values in HU)."""
    low, high = settings["hu_range"]
    prior = _dilate_mm(template_mask, float(settings["prior_dilate_mm"]), spacing_zyx)
    candidate = (hu > low) & (hu < high) & prior
    core = ndimage.binary_erosion(candidate, iterations=int(settings["erode_voxels"]))
    core = _largest_component(core)
    if not core.any():
        return core
    mask = ndimage.binary_dilation(core, iterations=int(settings["erode_voxels"])) & candidate
    mask = ndimage.binary_fill_holes(mask)
    # One ring of partial-volume voxels against the inner table still belongs to the brain.
    ring = ndimage.binary_dilation(mask) & ~mask & (hu < float(settings["boundary_hu"])) & prior
    return mask | ring


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _dilate_mm(mask: np.ndarray, radius_mm: float, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    if radius_mm <= 0:
        return mask.astype(bool)
    distance = ndimage.distance_transform_edt(~mask.astype(bool), sampling=spacing_zyx)
    return distance <= radius_mm


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0
