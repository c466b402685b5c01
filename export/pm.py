"""DICOM Parametric Map: the anomaly map itself, as float32 values on the source series' geometry.

The same map the SEG thresholds and the SC overlays colour (``native_map``, from
``imaging.preprocess.to_native``: index k = source slice k), not resampled again. Viewers
that show parametric maps (an IHE AI Results primitive) can then window or fuse it over the
source series. One frame per source slice, each frame referencing its source image.

The values are in multiples of the bundle's healthy limit (headscreen.inference): the positive
z over the healthy 99.9th percentile of z ("z", a bundle with a normative voxel model), or
the voxel error over the healthy 99th percentile of error ("error"). Below 1 is within the
healthy range. The Real World Value Mapping says so: unit UCUM "1" (a dimensionless ratio)
and a quantity code per kind (export.codes.MAP_QUANTITY). Off by default
(``parametric_map_enabled``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from headscreen.export import codes as hs_codes
from headscreen.export.model import ResultSummary
from headscreen.export.sc import MAP_UNITS
from headscreen.imaging.native_map import NativeMap, as_native_map

__all__ = ["build_parametric_map", "PM_SERIES_DESCRIPTION", "PM_CONTENT_LABEL", "PM_SERIES_NUMBER", "LUT_LABELS",
           "lut_explanation", "map_description"]

logger = logging.getLogger(__name__)

PM_SERIES_DESCRIPTION = "AI anomaly map - NOT FOR PRIMARY DIAGNOSIS"
PM_CONTENT_LABEL = "ANOMALY_MAP"
#: SC 9001, SR 9002, SEG 9902, rejection note 9903.
PM_SERIES_NUMBER = 9904
#: Real World Value Mapping LUT Label (SH, 16) per kind of map.
LUT_LABELS = {"z": "Z_OVER_LIMIT", "error": "ERROR_OVER_LIMIT", "z_one_sided": "ZASYM_OVER_LIMIT"}
#: The window a viewer opens it with: 1 (the healthy limit) to 3 (full red on the SC overlay).
_WINDOW = (1.0, 3.0)
_WINDOW_EXPLANATION = "healthy limit (1) to 3x"


def lut_explanation(map_unit: str) -> str:
    """LUT Explanation (LO, 64): what one unit of the map is."""
    return {"z": "positive z / healthy limit (z of healthy 99.9th pct)",
            "error": "voxel error / healthy limit (healthy 99th pct error)",
            "z_one_sided": "one-sided positive z / healthy limit (healthy 99.9th pct)"}[map_unit]


def map_description(summary: ResultSummary, map_unit: str) -> str:
    """The sentence that says what made the map and that it is not for diagnosis (Derivation Description)."""
    algo = summary.algorithm
    return (f"AI-generated {MAP_UNITS[map_unit][0]} of {algo.family} ({algo.name} {algo.version}), "
            f"in multiples of the healthy limit; not for primary diagnosis")[:1024]


def build_parametric_map(
    sources: Sequence[Dataset],
    native_map: NativeMap | np.ndarray,
    summary: ResultSummary,
    map_unit: str = "z",
) -> hd.pm.ParametricMap:
    """A float32 Parametric Map of ``native_map`` (shape (slices, rows, cols), index k =
    ``sources[k]``, the source datasets in slice order; headers suffice). Values that are
    not finite are stored as 0 (not above the healthy limit)."""
    if map_unit not in MAP_UNITS:
        raise ValueError(f"build_parametric_map: argument 'map_unit' must be one of {', '.join(MAP_UNITS)}")
    if len(native_map.shape) != 3 or native_map.shape[0] != len(sources):
        raise ValueError(f"build_parametric_map: argument 'native_map' shape {native_map.shape} does not match "
                         f"{len(sources)} sources")
    values = np.nan_to_num(as_native_map(native_map).full(), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    first = sources[0]
    algo = summary.algorithm
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABELS[map_unit],
        lut_explanation=lut_explanation(map_unit),
        unit=hs_codes.UNIT_NONE,
        value_range=(low, high if high > low else low + 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=hs_codes.MAP_QUANTITY[map_unit],
    )
    description = map_description(summary, map_unit)
    window = hd.VOILUTTransformation(window_center=(_WINDOW[0] + _WINDOW[1]) / 2,
                                     window_width=_WINDOW[1] - _WINDOW[0])
    # Set here: highdicom 0.28 splits a single explanation string into its characters.
    window.WindowCenterWidthExplanation = _WINDOW_EXPLANATION  # type: ignore[assignment]
    pm = hd.pm.ParametricMap(
        source_images=list(sources),
        pixel_array=values,
        series_instance_uid=hd.UID(),
        series_number=PM_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=algo.manufacturer,
        manufacturer_model_name=algo.name[:64],
        software_versions=algo.version[:64],
        device_serial_number=str(first.get("DeviceSerialNumber", "") or "0"),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[window],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label=PM_CONTENT_LABEL,
        content_description=f"AI-generated {MAP_UNITS[map_unit][0]}, not for primary diagnosis"[:64],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        series_description=PM_SERIES_DESCRIPTION,
    )
    # Frame Anatomy: the head, unpaired (so no General Series Laterality is needed).
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [hd.sr.CodedConcept("69536005", "SCT", "Head")]
    anatomy.FrameLaterality = "U"
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    pm.BodyPartExamined = "HEAD"
    # Type 3 in each frame's Derivation Image item: what made the frame, and by whom.
    for frame in pm.PerFrameFunctionalGroupsSequence:
        for item in frame.get("DerivationImageSequence", []):
            item.DerivationDescription = description
    logger.info("parametric map built", extra={"action": "pm_built", "frames": int(values.shape[0]),
                                               "map_unit": map_unit, "max": round(high, 3),
                                               "sop_instance_uid": str(pm.SOPInstanceUID)})
    return pm
