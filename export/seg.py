"""DICOM Segmentation: the thresholded anomaly map on the source series' geometry.

Viewers that overlay SEG (OHIF, 3D Slicer, many PACS) then show the region on
the original slices. One BINARY segment, labelled and described as an
AI-generated anomaly region with the algorithm that made it, and tracked (Tracking
ID/UID) so the SR's region group names the same segment; one frame per source slice that has any voxel set, each frame
referencing its source image. An empty mask gives no SEG at all: a SEG with no
frames is not a valid object, and the SR already says the study was screened.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from headscreen.export import codes as hs_codes
from headscreen.export.model import ResultSummary
from headscreen.imaging.native_map import IndexBox, NativeMap
from headscreen.imaging.volume import slice_normal
from headscreen.scores import DEFAULT_SEG_THRESHOLD

__all__ = ["build_segmentation", "anomaly_mask", "missing_for_seg", "source_voxel_ml", "SEG_SERIES_DESCRIPTION",
           "SEGMENT_LABEL", "SEGMENT_TRACKING_ID",
           "segmented_slices", "segment_description_text", "DEFAULT_THRESHOLD", "MIN_CLUSTER_ML",
           "calibrate_threshold", "anomaly_region", "SEG_GROW"]

logger = logging.getLogger(__name__)

SEG_SERIES_DESCRIPTION = "AI anomaly region - NOT FOR PRIMARY DIAGNOSIS"
SEGMENT_LABEL = "AI anomaly region"
#: The segment's Tracking ID; the SR's TID 1411 group carries the same ID and UID.
SEGMENT_TRACKING_ID = "headscreen anomaly region"
#: The fallback threshold, in multiples of the healthy limit (the bundle contract's).
DEFAULT_THRESHOLD = DEFAULT_SEG_THRESHOLD
#: Connected regions smaller than this are left out: isolated voxels and thin rims above the
#: threshold are the healthy reference's own noise, not findings (0.5 mL is an 8 mm cube).
MIN_CLUSTER_ML = 0.5
_SEG_SERIES_NUMBER = 9902


def segment_description_text(summary: ResultSummary) -> str:
    """Segment Description (LO, 64): what the segment is and which algorithm made it."""
    algo = summary.algorithm
    return f"AI-generated anomaly region, {algo.name} {algo.version}"[:64]


def anomaly_mask(native_map: NativeMap | np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                 voxel_ml: float | None = None,
                 min_cluster_ml: float = MIN_CLUSTER_ML, grow: float = 1.0, focus: IndexBox | None = None
                 ) -> np.ndarray:
    """Voxels at or above ``threshold`` (NaN counts as not set), in connected regions
    (26-neighbourhood) of at least ``min_cluster_ml`` when the voxel volume is known.
    ``grow`` < 1 (hysteresis): a region is every connected voxel at or above
    ``grow * threshold`` around at least one voxel at or above ``threshold``, so a finding is
    marked to its edge, not only at its peak; regions with no such voxel are left out.
    ``focus`` (a screen-positive result: where the map's focal term peaks) keeps as well
    the regions at or above ``grow * threshold`` that reach into that box, so the SEG of a
    positive result marks what made it positive even where the map stays under the
    threshold (the threshold is set for healthy scans to mark almost nothing)."""
    if not isinstance(native_map, NativeMap):
        native_map = np.asarray(native_map)
    mask = np.zeros(native_map.shape, dtype=bool)
    region = anomaly_region(native_map, threshold, voxel_ml, min_cluster_ml, grow, focus)
    if region is not None:
        mask[region[0]:region[0] + len(region[1])] = region[1]
    return mask


def anomaly_region(native_map: NativeMap | np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                   voxel_ml: float | None = None, min_cluster_ml: float = MIN_CLUSTER_ML, grow: float = 1.0,
                   focus: IndexBox | None = None) -> tuple[int, np.ndarray] | None:
    """`anomaly_mask` as (first slice, mask of the slices from it to the last one set), or
    None when none is set: only the slices that can hold a region are thresholded and
    labelled (a thin-slice CT map is ~80 M voxels, its labels 4 bytes each). Of a map that
    is not an array only the box where it reaches the growth level, connected to a voxel at
    the threshold or to the focus, is read: every voxel of a region lies in it."""
    if not 0 < grow <= 1:
        raise ValueError(f"grow must be in (0, 1], got {grow}")
    if isinstance(native_map, np.ndarray):
        return _anomaly_region(native_map, threshold, voxel_ml, min_cluster_ml, grow, focus)
    shape = native_map.shape
    found = native_map.at_least(threshold * grow, seeded_by=threshold, near=focus)
    if found is None:
        return None
    offset, box = found
    if focus is not None:  # in the box's indices
        focus = (_shifted(focus[0], offset), _shifted(focus[1], offset))
    region = _anomaly_region(box, threshold, voxel_ml, min_cluster_ml, grow, focus)
    if region is None:
        return None
    first, mask = region
    whole = np.zeros((mask.shape[0], *shape[1:]), dtype=bool)
    whole[:, offset[1]:offset[1] + mask.shape[1], offset[2]:offset[2] + mask.shape[2]] = mask
    return first + offset[0], whole


def _shifted(index: tuple[int, int, int], offset: tuple[int, ...]) -> tuple[int, int, int]:
    z, y, x = (int(i) - int(o) for i, o in zip(index, offset, strict=True))
    return z, y, x


def _anomaly_region(native_map: np.ndarray, threshold: float, voxel_ml: float | None, min_cluster_ml: float,
                    grow: float, focus: IndexBox | None) -> tuple[int, np.ndarray] | None:
    native_map = np.asarray(native_map)
    low = threshold * grow
    if native_map.ndim < 2 or native_map.size == 0:
        mask = native_map >= threshold
        return (0, mask) if mask.any() else None
    focus_slices = _focus_slices(focus, native_map.shape) if native_map.ndim == 3 else None
    # fmax skips NaN (never set); one value per slice, no full-size temporary.
    peaks = np.fmax.reduce(native_map.reshape(native_map.shape[0], -1), axis=1)
    with np.errstate(invalid="ignore"):
        focused = focus_slices is not None and bool(np.any(native_map[focus_slices] >= low))
        if not (peaks >= threshold).any() and not focused:
            return None
        hits = np.flatnonzero(peaks >= low)
    first, last = int(hits[0]), int(hits[-1]) + 1
    with np.errstate(invalid="ignore"):  # NaN >= t is False
        mask = native_map[first:last] >= low
    by_size = voxel_ml is not None and min_cluster_ml > 0
    if by_size or grow < 1 or focused:
        box = _bounding_box(mask)
        assert box is not None  # the slices were chosen for holding set voxels
        labels, _ = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
        keep = np.ones(int(labels.max()) + 1, dtype=bool)
        if by_size:
            assert voxel_ml is not None
            keep &= np.bincount(labels.ravel(), minlength=keep.size) * voxel_ml >= min_cluster_ml
        if grow < 1 or focused:  # only regions that reach the threshold itself (or the focus)
            with np.errstate(invalid="ignore"):
                seeded = labels[native_map[first:last][box] >= threshold]
            if focused:  # the labels inside the focus box, read through a view (no full-size mask)
                assert focus_slices is not None
                z_focus = slice(focus_slices[0].start - first, focus_slices[0].stop - first)
                within = tuple(slice(max(f.start, b.start) - b.start, max(min(f.stop, b.stop) - b.start, 0))
                               for f, b in zip((z_focus, *focus_slices[1:]), box, strict=True))
                seeded = np.concatenate([seeded, labels[within].ravel()])
            keep &= np.isin(np.arange(keep.size), np.unique(seeded))
        keep[0] = False  # background
        mask[box] = keep[labels]
        hits = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        if hits.size == 0:
            return None
        mask = mask[int(hits[0]):int(hits[-1]) + 1]
        first += int(hits[0])
    return first, mask


def _focus_slices(focus: IndexBox | None, shape: tuple[int, ...]) -> tuple[slice, slice, slice] | None:
    """The focus box clipped to the map; None when it is not given or lies outside."""
    if focus is None:
        return None
    low = [max(int(v), 0) for v in focus[0]]
    high = [min(int(v) + 1, n) for v, n in zip(focus[1], shape, strict=True)]
    if any(h <= lo for lo, h in zip(low, high, strict=True)):
        return None
    return slice(low[0], high[0]), slice(low[1], high[1]), slice(low[2], high[2])


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every set voxel of `mask`; None when none is set."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def segmented_slices(mask: np.ndarray) -> list[int]:
    """Indices of the slices (axis 0) holding any set voxel of `mask`."""
    return [int(k) for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))]


def source_voxel_ml(sources: Sequence[Dataset]) -> float | None:
    """Voxel volume of a single-frame series in mL (pixel spacing x slice step, the step
    from the first two positions along the slice normal, else SliceThickness); None when
    the headers do not say."""
    try:
        first = sources[0]
        rows_mm, cols_mm = (float(v) for v in first.PixelSpacing)
        step = float(first.get("SliceThickness") or 0.0)
        if len(sources) > 1:
            normal = slice_normal(first.ImageOrientationPatient)
            delta = np.asarray([float(v) for v in sources[1].ImagePositionPatient]) - np.asarray(
                [float(v) for v in first.ImagePositionPatient])
            step = abs(float(delta @ normal)) or step
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    volume = rows_mm * cols_mm * step / 1000.0
    return volume if volume > 0 else None


# The SEG threshold is the lowest at which healthy scans stay nearly empty: at most
# SEG_HEALTHY_BUDGET_ML marked (after the small-region filter) in
# SEG_HEALTHY_QUANTILE of the healthy calibration scans. Lower thresholds mark more of a
# finding; this bounds what they mark on healthy heads.
SEG_HEALTHY_BUDGET_ML = 1.0
SEG_HEALTHY_QUANTILE = 0.95
SEG_CANDIDATES = tuple(round(0.3 + 0.05 * k, 2) for k in range(35))  # 0.30 ... 2.00
# What `headscreen train` calibrates new bundles with (manifest calibration.seg_grow): each
# region grows from its voxels at the threshold through connected voxels at half of it
# (hysteresis, as in Canny's edge linking). At the threshold alone a finding's peak was
# marked and its body was not.
SEG_GROW = 0.5


def calibrate_threshold(overlays: list[np.ndarray], voxel_ml: float, grow: float = 1.0) -> float:
    """The lowest candidate threshold whose healthy SEG volumes (model grid, overlay units,
    regions grown to `grow` x the threshold) meet the budget; the highest candidate when none does."""
    if not overlays:
        raise ValueError("no healthy overlays to calibrate the SEG threshold on")
    for threshold in SEG_CANDIDATES:
        volumes = [float(anomaly_mask(o, threshold, voxel_ml, grow=grow).sum()) * voxel_ml for o in overlays]
        healthy_ml = float(np.quantile(volumes, SEG_HEALTHY_QUANTILE))
        if healthy_ml <= SEG_HEALTHY_BUDGET_ML:
            break
    logger.info("SEG threshold calibrated", extra={"action": "seg_threshold", "threshold": threshold,
                                                   "healthy_ml_quantile": round(healthy_ml, 3)})
    return float(threshold)


# What highdicom reads of every source to place the SEG's frames (it fails without them).
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
             "FrameOfReferenceUID")


def missing_for_seg(sources: Sequence[Dataset]) -> list[str]:
    """The geometry attributes some source lacks (e.g. left out as undecodable by
    export.sanitise): a SEG cannot be placed without them. Empty when a SEG can be built."""
    missing = []
    for keyword in _GEOMETRY:
        if any(ds.get(keyword) in (None, "") for ds in sources if "PerFrameFunctionalGroupsSequence" not in ds):
            missing.append(keyword)
    return missing


def build_segmentation(
    sources: Sequence[Dataset],
    native_map: NativeMap | np.ndarray,
    summary: ResultSummary,
    threshold: float = DEFAULT_THRESHOLD,
    mask: np.ndarray | None = None,
    grow: float = 1.0,
    focus: IndexBox | None = None,
) -> hd.seg.Segmentation | None:
    """A BINARY SEG of ``native_map >= threshold`` (grown to ``grow * threshold``, with the
    regions reaching into ``focus``, as `anomaly_mask`), or None when nothing is set.

    ``sources`` are the source datasets in slice order (index k = slice k of
    ``native_map``, shape (slices, rows, cols)); only the slices the region touches are
    read (headers suffice), and only they are the SEG's source images. ``mask`` is
    ``anomaly_mask(native_map, threshold, source_voxel_ml(sources), grow=grow, focus=focus)``
    when the caller has it.
    """
    if len(native_map.shape) != 3 or native_map.shape[0] != len(sources):
        raise ValueError(
            f"build_segmentation: argument 'native_map' shape {native_map.shape} does not match {len(sources)} sources"
        )
    if mask is None:
        region = anomaly_region(native_map, threshold, source_voxel_ml(sources), grow=grow, focus=focus)
    elif mask.shape != native_map.shape:
        raise ValueError(f"build_segmentation: argument 'mask' shape {mask.shape} is not {native_map.shape}")
    else:
        region = (0, mask)
    touched = [] if region is None else segmented_slices(region[1])
    if region is None or not touched:
        logger.info("anomaly mask empty, no SEG", extra={"action": "seg_skip", "threshold": threshold})
        return None
    # highdicom checks and references every source image it is given; empty frames are
    # left out anyway, so the slices without a region need not be given at all.
    first_slice, region_mask = region
    sources = [sources[first_slice + k] for k in touched]
    mask = region_mask[touched]
    first = sources[0]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=hs_codes.ABNORMAL_STRUCTURE,
        segmented_property_type=hs_codes.ANOMALY_REGION,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=summary.algorithm.name,
            version=summary.algorithm.version,
            family=codes.cid7162.ArtificialIntelligence,
            source=summary.algorithm.manufacturer,
            parameters={"threshold": f"{threshold:g} x healthy limit", "min_region_ml": f"{MIN_CLUSTER_ML:g}",
                        **({"grown_to": f"{threshold * grow:g} x healthy limit"} if grow < 1 else {}),
                        **({"kept_at_focus": "regions at the focal maximum of a positive result"}
                           if focus is not None else {})},
        ),
        tracking_id=SEGMENT_TRACKING_ID,
        tracking_uid=hd.UID(),
    )
    # Type 3, not a highdicom argument: the label is short, this says what it is and by whom.
    description.SegmentDescription = segment_description_text(summary)
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=_SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=summary.algorithm.manufacturer,
        manufacturer_model_name=summary.algorithm.name,
        software_versions=summary.algorithm.version,
        device_serial_number=str(first.get("DeviceSerialNumber", "") or "0"),
        series_description=SEG_SERIES_DESCRIPTION,
        content_label="ANOMALY",
        content_description="AI-generated anomaly region, not for primary diagnosis",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )
    logger.info(
        "SEG built",
        extra={"action": "seg_built", "frames": int(mask.any(axis=(1, 2)).sum()), "voxels": int(mask.sum()),
               "threshold": threshold, "sop_instance_uid": str(seg.SOPInstanceUID)},
    )
    return seg
