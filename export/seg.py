"""DICOM Segmentation: the thresholded anomaly map on the source series' geometry.

Viewers that overlay SEG (OHIF, 3D Slicer, many PACS) then show the region on
the original slices. One BINARY segment, labelled as an AI-generated anomaly
region; one frame per source slice that has any voxel set, each frame
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

from export.model import ResultSummary

__all__ = ["build_segmentation", "anomaly_mask", "missing_for_seg", "SEG_SERIES_DESCRIPTION", "SEGMENT_LABEL",
           "DEFAULT_THRESHOLD"]

logger = logging.getLogger(__name__)

SEG_SERIES_DESCRIPTION = "AI anomaly region - NOT FOR PRIMARY DIAGNOSIS"
SEGMENT_LABEL = "AI anomaly region"
#: Error-map units are multiples of the healthy 99th percentile (daemon.inference):
#: 1.0 marks every voxel above what 99 % of healthy voxels reach.
DEFAULT_THRESHOLD = 1.0
_SEG_SERIES_NUMBER = 9902
_ABNORMAL = hd.sr.CodedConcept("263654008", "SCT", "Abnormal")


def anomaly_mask(native_map: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Voxels at or above ``threshold`` (NaN counts as not set)."""
    with np.errstate(invalid="ignore"):  # NaN >= t is False: no full-volume copy needed
        return np.asarray(native_map) >= threshold


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
    native_map: np.ndarray,
    summary: ResultSummary,
    threshold: float = DEFAULT_THRESHOLD,
) -> hd.seg.Segmentation | None:
    """A BINARY SEG of ``native_map >= threshold``, or None when nothing is set.

    ``sources`` are the full source datasets in slice order (index k = slice k of
    ``native_map``, shape (slices, rows, cols)).
    """
    if native_map.ndim != 3 or native_map.shape[0] != len(sources):
        raise ValueError(
            f"build_segmentation: argument 'native_map' shape {native_map.shape} does not match {len(sources)} sources"
        )
    mask = anomaly_mask(native_map, threshold)
    if not mask.any():
        logger.info("anomaly mask empty, no SEG", extra={"action": "seg_skip", "threshold": threshold})
        return None
    first = sources[0]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=_ABNORMAL,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=summary.algorithm.name,
            version=summary.algorithm.version,
            family=codes.cid7162.ArtificialIntelligence,
            source=summary.algorithm.manufacturer,
            parameters={"threshold": f"{threshold:g} x healthy p99"},
        ),
    )
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
