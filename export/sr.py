"""TID 1500 Comprehensive 3D SR carrying what a screening job found.

One measurement group holds the numeric results as TID 300 NUM items (anomaly
score, percentile, operating threshold, predicted/chronological age, brain-age
gap), the algorithm identity (TID 4019) and the finding site. Without a SEG it is
a TID 1501 group; with one it is a TID 1411 group whose region is the SEG's
segment (Referenced Segment), with the analysed series by UID (Source series for
segmentation) and the region's volume added. Neither lists the source slices one
by one: the series and its instances are in the evidence sequence. A TID 1501
group also gives the anomaly map's maximum, inferred from a POINT where it lies
on its source slice: OHIF shows a group only where it has image coordinates
(TID 1411 allows none beside a Referenced Segment). The
report-level Qualitative Evaluations container (TID 1500 row 12) holds the coded
evaluations: eligibility, screen result, healthy reference, each QC finding,
"Measurement not available" for every value that was not produced, and the
plain-language summary. A coded item that has a detail (a QC finding, the
reference) is followed by a TEXT item whose concept name is the coded value and
whose value is the full text, so two findings sharing a code both keep their
detail. The SC instances, the SEG and the parametric map (export.pm, when one is
sent) are listed in the evidence sequence. A study
that was not eligible still gets a report that says so and why: one coded reason
per blocking reason, the advisory QC issues, and no number, no screen result and
no region at all. An eligible result names the healthy reference its percentile
is against (the bundle's, or this scanner's own); while the scanner is calibrating
it carries the score but no percentile, threshold, screen result or region, and
says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentItem,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    ReferencedSegment,
    SourceImageForRegion,
    SourceSeriesForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from headscreen.export import codes
from headscreen.export.model import ResultSummary, finite_or_none, reference_header
from headscreen.export.seg import source_voxel_ml
from headscreen.imaging.native_map import NativeMap, map_peak

__all__ = ["build_report", "ReferenceNote", "SR_SERIES_DESCRIPTION", "TRACKING_IDENTIFIER",
           "REGION_TRACKING_IDENTIFIER",
           "REPORT_SUMMARY_TEXT"]

logger = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "AI screening report - NOT FOR PRIMARY DIAGNOSIS"
TRACKING_IDENTIFIER = "headscreen brain anomaly screening"
#: Tracking identifier of the region group when the SEG's segment has none of its own.
REGION_TRACKING_IDENTIFIER = "headscreen anomaly region"
_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Concept name of the free-text summary item in the Qualitative Evaluations container.
REPORT_SUMMARY_TEXT = CodedConcept("121106", "DCM", "Comment")

REFERENCE_KINDS = ("bundle", "site", "calibrating")
_REFERENCE_CODES = {"bundle": codes.REFERENCE_BUNDLE, "site": codes.REFERENCE_SITE,
                    "calibrating": codes.REFERENCE_CALIBRATING}


@dataclass(frozen=True)
class ReferenceNote:
    """Which healthy reference an eligible result was judged against ("bundle" or
    "site"), or that the scanner is still "calibrating": then no percentile, threshold
    or screen result exists, and the report and the overlay legend say why.

    ``text`` is the sentence the SR carries (it may name the station); ``legend`` what
    the overlay burns in (ASCII, our own words only), ``text`` when not given.
    """

    kind: str
    text: str
    legend: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in REFERENCE_KINDS:
            raise ValueError(f"ReferenceNote: argument 'kind' must be one of {', '.join(REFERENCE_KINDS)}")
        if not self.text or not self.text.strip():
            raise ValueError("ReferenceNote: argument 'text' must not be empty")
        if not self.legend_text.isascii():
            raise ValueError("ReferenceNote: argument 'legend' must be ASCII")

    @property
    def calibrating(self) -> bool:
        return self.kind == "calibrating"

    @property
    def legend_text(self) -> str:
        return self.legend or self.text

    def check(self, summary: ResultSummary, where: str) -> None:
        if not summary.eligible:
            raise ValueError(f"{where}: argument 'reference' given for a not-eligible summary")
        if self.calibrating and any(v is not None for v in (summary.percentile, summary.threshold,
                                                              summary.screen_positive)):
            raise ValueError(f"{where}: argument 'summary' carries a percentile, threshold or screen result "
                             "although 'reference' says the scanner is calibrating")


def _algorithm_identification(summary: ResultSummary) -> AlgorithmIdentification:
    algo = summary.algorithm
    return AlgorithmIdentification(
        name=algo.name,
        version=algo.version,
        # The bundle hashes pin the exact model files that produced the numbers.
        parameters=algo.sha256_lines(),
        family=codes.algorithm_family_code(algo.family),
        # No Algorithm Manufacturer: not a TID 4019 row for validators; the SR's
        # Manufacturer and the device observer name it.
    )


def _observation_context(summary: ResultSummary) -> ObservationContext:
    algo = summary.algorithm
    # Deterministic per bundle, so every report of one model names the same device.
    device_uid = generate_uid(entropy_srcs=[algo.manufacturer, algo.name, algo.version, *algo.sha256_lines()])
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid,
        name=f"{algo.name} {algo.version}"[:64],
        manufacturer_name=algo.manufacturer,
        model_name=algo.name[:64],
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=dcm_codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _measurements(summary: ResultSummary, reference: ReferenceNote | None = None,
                  algorithm_id: AlgorithmIdentification | None = None) -> tuple[list[Measurement], list[CodedConcept]]:
    """Numeric measurements present in the summary, and the concept of each missing one.

    ``algorithm_id`` names the algorithm on each model output (TID 300 row 17): for a TID 1411
    group, which has no group-level row. A TID 1501 group names it once for all (row 10), and
    its NUMs carry no children: OHIF reads a NUM with children only when one is a SCOORD."""
    # The chronological age is an input taken from the header, not produced by the model.
    planned = [
        (codes.ANOMALY_SCORE, summary.anomaly_score, codes.UNIT_SCORE, True),
        (codes.ANOMALY_PERCENTILE, summary.percentile, codes.UNIT_PERCENT, True),
        (codes.OPERATING_THRESHOLD, summary.threshold, codes.UNIT_SCORE, True),
        (codes.PREDICTED_BRAIN_AGE, summary.predicted_age, codes.UNIT_YEAR, True),
        (codes.CHRONOLOGICAL_AGE, summary.chronological_age, codes.UNIT_YEAR, False),
        (codes.BRAIN_AGE_GAP, summary.age_gap, codes.UNIT_YEAR, True),
    ]
    if reference is not None and reference.calibrating:
        # Not "not available": there is no reference to have a percentile or threshold
        # against, and the reference item says so (a reader must not look for one).
        planned = [p for p in planned if p[0] not in (codes.ANOMALY_PERCENTILE, codes.OPERATING_THRESHOLD)]
    present, absent = [], []
    for name, raw, unit, by_algorithm in planned:
        value = finite_or_none(raw)
        if value is None:
            if raw is not None:
                logger.warning("non-finite value reported as absent",
                               extra={"action": "sr_nonfinite", "concept": name.meaning})
            absent.append(name)
        else:
            present.append(Measurement(name=name, value=float(value), unit=unit,
                                       algorithm_id=algorithm_id if by_algorithm else None))
    return present, absent


def _map_peak(source_datasets: Sequence[Dataset], anomaly_map: NativeMap | np.ndarray,
              map_unit: str) -> Measurement | None:
    """The anomaly map's maximum as a NUM (Derivation: Maximum) inferred from the point
    where it lies: a SCOORD POINT at that pixel's centre on the source image (TID 300 ->
    TID 320). None when the map has no positive finite value."""
    if map_unit not in codes.MAP_QUANTITY:
        raise ValueError(f"build_report: argument 'map_unit' must be one of {', '.join(codes.MAP_QUANTITY)}")
    shape = (len(source_datasets), int(source_datasets[0].Rows), int(source_datasets[0].Columns))
    if tuple(anomaly_map.shape) != shape:
        raise ValueError("build_report: argument 'anomaly_map' does not have the source series' shape")
    peak = map_peak(anomaly_map)
    if peak is None:
        return None
    best, (k, row, column) = peak
    source = source_datasets[k]
    # Image coordinates: (0, 0) is the top left corner of the top left pixel (PS3.3 C.18.6.1.1).
    point = CoordinatesForMeasurement(
        graphic_type=GraphicTypeValues.POINT, graphic_data=np.array([[column + 0.5, row + 0.5]]),
        source_image=SourceImageForRegion(str(source.SOPClassUID), str(source.SOPInstanceUID)))
    return Measurement(name=codes.MAP_QUANTITY[map_unit], value=round(best, 4), unit=codes.UNIT_NONE,
                       derivation=codes.MAXIMUM, referenced_coordinates=[point])


def _coded(name: CodedConcept, value: CodedConcept, detail: str | None = None) -> list[ContentItem]:
    """One coded evaluation, and its full text as the next item (TEXT named by the coded
    value): Pixelmed's templates allow no TEXT beneath a CODE here."""
    items: list[ContentItem] = [CodeContentItem(name=name, value=value, relationship_type="CONTAINS")]
    if detail is not None:
        items.append(TextContentItem(name=value, value=detail, relationship_type="CONTAINS"))
    return items


def _evaluations(summary: ResultSummary, reference: ReferenceNote | None = None,
                 absent: Sequence[CodedConcept] = ()) -> list[ContentItem]:
    items = _coded(codes.ELIGIBILITY, codes.ELIGIBLE if summary.eligible else codes.NOT_ELIGIBLE)
    reference_items = [] if reference is None else _coded(
        codes.HEALTHY_REFERENCE, _REFERENCE_CODES[reference.kind], reference.text)
    if not summary.eligible:
        # No screen-result item at all: "screen result = Absent" reads as "no anomaly".
        for reason in summary.reasons_not_eligible():
            items += _coded(codes.NOT_ELIGIBLE_REASON, codes.qc_reason_code(reason), reason)
    elif reference is not None and reference.calibrating:
        # Likewise no screen result while calibrating: the reference item says why.
        items += reference_items
    else:
        if summary.screen_positive is None:
            verdict = codes.ABSENT
        else:
            verdict = codes.SCREEN_POSITIVE if summary.screen_positive else codes.SCREEN_NEGATIVE
        items += _coded(codes.SCREEN_RESULT, verdict)
        items += reference_items
    for reason in summary.advisory_reasons():
        items += _coded(codes.QC_ISSUE, codes.qc_reason_code(reason), reason)
    for concept in absent:
        items += _coded(codes.MEASUREMENT_ABSENT, concept)
    return items


def summary_text(summary: ResultSummary, reference: ReferenceNote | None = None,
                 absent: Sequence[CodedConcept] = ()) -> str:
    """One human-readable sentence block, shown by every SR viewer."""
    parts = ["AI-generated result, not for primary diagnosis."]
    if not summary.eligible:
        parts.append("Study NOT ELIGIBLE for automated screening: " + "; ".join(summary.reasons_not_eligible()) + ".")
        parts.append("No screening result was produced; absence of findings is NOT implied.")
    else:
        value = finite_or_none(summary.anomaly_score)
        score = "not available" if value is None else f"{value:.4g}"
        parts.append(f"Anomaly score {score}.")
        if reference is not None and reference.calibrating:
            parts.append(reference.text.rstrip(".") + ".")
        elif summary.screen_positive is not None:
            parts.append(f"Screen {'POSITIVE' if summary.screen_positive else 'negative'} at the operating point.")
        if reference is not None and not reference.calibrating:
            parts.append(reference.text.rstrip(".") + ".")
        # Some renderers (dsr2html) show a coded item's value only: say it in words too.
        missing = [c.meaning for c in absent if c != codes.ANOMALY_SCORE]
        if missing:
            parts.append("Not available: " + ", ".join(missing) + ".")
    advisory = summary.advisory_reasons()
    if advisory:
        parts.append(("Other QC issues: " if not summary.eligible else "QC: ") + "; ".join(advisory) + ".")
    return " ".join(parts)[:1024]


def _check_inputs(source_datasets: Sequence[Dataset], sc_datasets: Sequence[Dataset], summary: ResultSummary,
                  reference: ReferenceNote | None, segmentation: Dataset | None) -> None:
    if len(source_datasets) == 0:
        raise ValueError("build_report: argument 'source_datasets' is empty")
    study = source_datasets[0].StudyInstanceUID
    for name, group in (("source_datasets", source_datasets), ("sc_datasets", sc_datasets)):
        if any(ds.StudyInstanceUID != study for ds in group):
            raise ValueError(f"build_report: argument '{name}' contains instances of another study")
    if segmentation is None:
        return
    if segmentation.SOPClassUID != _SEG_STORAGE:
        raise ValueError("build_report: argument 'segmentation' is not a Segmentation instance")
    if segmentation.StudyInstanceUID != study:
        raise ValueError("build_report: argument 'segmentation' belongs to another study")
    # A region beside no screen result would read as a finding.
    if not summary.eligible or (reference is not None and reference.calibrating):
        raise ValueError("build_report: argument 'segmentation' given for a result without a screen result")
    series = {str(s.SeriesInstanceUID) for s in segmentation.get("ReferencedSeriesSequence", [])}
    if str(source_datasets[0].SeriesInstanceUID) not in series:
        raise ValueError("build_report: argument 'segmentation' was not made from the source series")


def _segment_volumes_ml(segmentation: Dataset, voxel_ml: float | None) -> dict[int, float]:
    """Volume of each segment in mL (set pixels x source voxel volume); empty when the
    voxel volume is not known."""
    if voxel_ml is None:
        return {}
    frames = np.asarray(segmentation.pixel_array).reshape(-1, int(segmentation.Rows), int(segmentation.Columns))
    # Per frame, or once in the shared groups when there is one segment.
    shared = segmentation.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    counts: dict[int, int] = {}
    for index, item in enumerate(segmentation.PerFrameFunctionalGroupsSequence):
        number = int((item.get("SegmentIdentificationSequence") or shared)[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + int(np.count_nonzero(frames[index]))
    return {number: count * voxel_ml for number, count in counts.items()}


def _referenced_segment(segmentation: Dataset, source_datasets: Sequence[Dataset]) -> tuple[ReferencedSegment, Dataset]:
    """The SEG's one segment as a Referenced Segment, with the analysed series by UID
    (Source series for segmentation: one row, not one per slice); and its Segment item."""
    if len(segmentation.SegmentSequence) != 1:
        raise ValueError("build_report: argument 'segmentation' must have exactly one segment")
    segment = segmentation.SegmentSequence[0]
    reference = ReferencedSegment(
        sop_class_uid=segmentation.SOPClassUID,
        sop_instance_uid=segmentation.SOPInstanceUID,
        segment_number=int(segment.SegmentNumber),
        source_series=SourceSeriesForSegmentation(str(source_datasets[0].SeriesInstanceUID)),
    )
    for item in reference:
        if item.ConceptNameCodeSequence[0].CodeValue == "121232":
            # pydicom's meaning is capitalised; PS3.16's (Pixelmed warns on the difference) is not.
            item.ConceptNameCodeSequence[0].CodeMeaning = "Source series for segmentation"
    return reference, segment


def _measurement_group(source_datasets: Sequence[Dataset], measurements: list[Measurement],
                       algorithm_id: AlgorithmIdentification, segmentation: Dataset | None):
    """TID 1501 without a SEG; with one, TID 1411 whose region is the SEG's segment.

    One group either way: validators (Pixelmed) check every group of the report against
    one template, so a TID 1501 group beside a TID 1411 one fails. TID 1411 has no
    group-level algorithm row: each NUM names its algorithm (TID 4019) itself.
    Neither lists source slices: the evidence sequence holds the series.
    """
    if segmentation is None:
        return MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(identifier=TRACKING_IDENTIFIER, uid=hd.UID()),
            finding_type=codes.ANOMALY_FINDING,
            algorithm_id=algorithm_id,
            finding_sites=[FindingSite(anatomic_location=codes.BRAIN)],
            measurements=measurements or None,
        )
    reference, segment = _referenced_segment(segmentation, source_datasets)
    volume = _segment_volumes_ml(segmentation, source_voxel_ml(source_datasets)).get(int(segment.SegmentNumber))
    if volume is not None:
        measurements = [*measurements, Measurement(name=codes.REGION_VOLUME, value=round(volume, 3), unit=codes.UNIT_ML,
                                                   algorithm_id=algorithm_id)]
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        # The segment's own tracking ID/UID, so SEG and SR name one region.
        tracking_identifier=TrackingIdentifier(
            identifier=str(segment.get("TrackingID") or REGION_TRACKING_IDENTIFIER),
            uid=str(segment.get("TrackingUID") or hd.UID())),
        referenced_segment=reference,
        finding_type=codes.ANOMALY_FINDING,
        finding_sites=[FindingSite(anatomic_location=codes.BRAIN)],
        measurements=measurements or None,
    )


def build_report(
    source_datasets: Sequence[Dataset],
    summary: ResultSummary,
    sc_datasets: Sequence[Dataset],
    series_number: int = 9002,
    *,
    series_instance_uid: str | None = None,
    previous_versions: Sequence[Dataset] | None = None,
    reference: ReferenceNote | None = None,
    segmentation: Dataset | None = None,
    parametric_map: Dataset | None = None,
    anomaly_map: NativeMap | np.ndarray | None = None,
    map_unit: str = "z",
) -> Comprehensive3DSR:
    """The TID 1500 report for one job (see module docstring).

    ``source_datasets`` are the slices (headers suffice) of the analysed series;
    ``sc_datasets`` the overlay images (may be empty, e.g. when not eligible).
    ``previous_versions`` are earlier reports this one supersedes. ``reference`` names
    the healthy reference of an eligible result, or says the scanner is calibrating.
    ``segmentation`` is this job's SEG (export.seg), built first so its UIDs are known;
    each of its segments gets a region group that references it. ``parametric_map`` is
    this job's Parametric Map (export.pm): listed in the evidence, not in the content tree.
    ``anomaly_map`` is the map on the source geometry (slices, rows, columns; ``map_unit``
    "z" or "error" as in export.sc): an eligible report gives its maximum and the point
    where it lies, the location a viewer such as OHIF needs to show the group at all.
    """
    _check_inputs(source_datasets, sc_datasets, summary, reference, segmentation)
    if parametric_map is not None and parametric_map.StudyInstanceUID != source_datasets[0].StudyInstanceUID:
        raise ValueError("build_report: argument 'parametric_map' belongs to another study")
    if reference is not None:
        reference.check(summary, "build_report")
    algorithm_id = _algorithm_identification(summary)
    measurements: list[Measurement] = []
    absent: list[CodedConcept] = []
    if summary.eligible:
        measurements, absent = _measurements(summary, reference,
                                             algorithm_id=None if segmentation is None else algorithm_id)
        # TID 1419 (the NUMs of a TID 1411 group) has no INFERRED FROM row: the peak and its
        # point only in a TID 1501 group.
        peak = (None if anomaly_map is None or segmentation is not None
                else _map_peak(source_datasets, anomaly_map, map_unit))
        if peak is not None:
            measurements.append(peak)
    report = MeasurementReport(
        observation_context=_observation_context(summary),
        procedure_reported=codes.procedure_code(summary.modality),
        imaging_measurements=[_measurement_group(source_datasets, measurements, algorithm_id, segmentation)],
    )
    evaluations = ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    # pydicom types the attribute as a Sequence; a list of content items is what it takes.
    evaluations.ContentSequence = [  # type: ignore[assignment]
        *_evaluations(summary, reference, absent),
        TextContentItem(name=REPORT_SUMMARY_TEXT, value=summary_text(summary, reference, absent),
                        relationship_type="CONTAINS"),
    ]
    report[0].ContentSequence.append(evaluations)
    evidence = [reference_header(source_datasets[0]), *source_datasets[1:], *sc_datasets,
                *([] if segmentation is None else [segmentation]),
                *([] if parametric_map is None else [parametric_map])]
    algo = summary.algorithm
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=algo.manufacturer,
        is_complete=True,
        is_final=True,
        previous_versions=previous_versions,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=algo.name[:64],
        software_versions=algo.version[:64],
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=codes.PRIVATE_SCHEME,
                name=codes.PRIVATE_SCHEME_NAME,
                responsible_organization=algo.manufacturer,
            )
        ],
    )
    _separate_containers(sr)
    logger.info(
        "built report",
        extra={"action": "sr_built", "sop_instance_uid": sr.SOPInstanceUID, "eligible": summary.eligible,
               "reference": None if reference is None else reference.kind,
               "measurements": len(measurements), "sc_instances": len(sc_datasets),
               "segment_referenced": segmentation is not None},
    )
    return sr


def _separate_containers(node: Dataset) -> None:
    """Every container's items are separate statements, not one running text (highdicom
    writes CONTINUOUS): viewers such as dcmtk's dsr2html then print each measurement with
    its name ("Anomaly score: 3.1 {score}") instead of the bare numbers."""
    if "ContinuityOfContent" in node:
        node.ContinuityOfContent = "SEPARATE"
    for item in node.get("ContentSequence", []):
        if item.ValueType == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        _separate_containers(item)
