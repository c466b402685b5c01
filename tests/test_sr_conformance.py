"""Every kind of headscreen SR is a conformant TID 1500 report: Pixelmed's DicomSRValidator
finds no error and no warning, dciodvfy no error, and highdicom reads back the values the
summary had, each in its place (numbers in the measurement group, coded evaluations and their
details in the report-level Qualitative Evaluations container). The positive result comes
with a SEG: its group (TID 1411) references the SEG's segment; no other kind references one,
and none lists the source slices one by one. The other eligible kinds (a TID 1501 group) give
the anomaly map's maximum at the point it lies on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from headscreen.export import codes
from headscreen.export.model import ResultSummary
from headscreen.export.sc import build_overlay_series
from headscreen.export.seg import build_segmentation, source_voxel_ml
from headscreen.export.sr import REPORT_SUMMARY_TEXT, ReferenceNote, build_report
from serve_harness import dciodvfy_errors
from sr_helpers import (
    ReadBack,
    errors_and_warnings,
    evaluations_with_details,
    pixelmed_findings,
)
from test_export import ALGO_CT, MR_SUMMARY, N_SLICES, ct_summary, make_ct_series

BUNDLE = ReferenceNote(kind="bundle", text="Reference: bundle ct-anogan-1.2.0, synthetic healthy phantoms, n=200")
SITE = ReferenceNote(kind="site", text="Reference: site, station ACME|HEADSCAN 9|MR-EAST, n=60, created 2026-01-05",
                     legend="Reference: site, this scanner, n=60, created 2026-01-05")
CALIBRATING = ReferenceNote(kind="calibrating", text="Calibrating: no screen result until this scanner has 20 "
                                                     "healthy reference studies (has 3)")
NOISE = ("noise_high: noise_sigma 49.3 outside [0, 25]", "noise_high: noise_relative 0.9 outside [0, 0.3]")
GAP = "missing_slices: 1 slice(s) missing in 1 gap(s)"
# Two blocking QC findings sharing one code (each must keep its detail), one advisory.
QC_BLOCKED = ResultSummary(eligible=False, modality="CT", algorithm=ALGO_CT, ineligible_reason="; ".join(NOISE),
                           ineligible_reasons=NOISE, qc_reasons=[*NOISE, GAP])
NO_SERIES = ResultSummary(eligible=False, modality="OT", algorithm=ALGO_CT,
                          ineligible_reason="no_suitable_series: no axial head CT")
POSITIVE_MR = dataclasses.replace(MR_SUMMARY, anomaly_score=3.1, percentile=99.2, screen_positive=True,
                                  qc_reasons=[GAP, "uneven_slice_spacing: 3 step(s) deviate"])


@dataclass(frozen=True)
class Kind:
    summary: ResultSummary
    reference: ReferenceNote | None
    numbers: dict[str, float]       # measurement code -> value
    evaluations: list[tuple[str, str, str]]  # (concept, value, detail) in order
    procedure: str
    with_seg: bool = False  # built with this job's SEG (then the group is TID 1411)


def _absent(*concepts) -> list[tuple[str, str, str]]:
    return [(codes.MEASUREMENT_ABSENT.value, c.value, "") for c in concepts]


def _eligible(verdict) -> list[tuple[str, str, str]]:
    return [(codes.ELIGIBILITY.value, codes.ELIGIBLE.value, ""), (codes.SCREEN_RESULT.value, verdict.value, "")]


def _kinds() -> dict[str, Kind]:
    negative = ct_summary(screen_positive=False, percentile=40.0, qc_reasons=[])
    ct_numbers = {codes.ANOMALY_SCORE.value: 0.4123, codes.ANOMALY_PERCENTILE.value: 40.0,
                  codes.OPERATING_THRESHOLD.value: 0.3, codes.CHRONOLOGICAL_AGE.value: 67.0}
    return {
        "eligible-negative": Kind(
            negative, BUNDLE, ct_numbers,
            [*_eligible(codes.SCREEN_NEGATIVE),
             (codes.HEALTHY_REFERENCE.value, codes.REFERENCE_BUNDLE.value, BUNDLE.text),
             *_absent(codes.PREDICTED_BRAIN_AGE, codes.BRAIN_AGE_GAP)],
            "25045-6"),
        "eligible-positive": Kind(
            POSITIVE_MR, SITE,
            {codes.ANOMALY_SCORE.value: 3.1, codes.ANOMALY_PERCENTILE.value: 99.2, codes.OPERATING_THRESHOLD.value: 2.5,
             codes.PREDICTED_BRAIN_AGE.value: 71.4, codes.CHRONOLOGICAL_AGE.value: 67.0,
             codes.BRAIN_AGE_GAP.value: 4.4},
            [*_eligible(codes.SCREEN_POSITIVE),
             (codes.HEALTHY_REFERENCE.value, codes.REFERENCE_SITE.value, SITE.text),
             (codes.QC_ISSUE.value, "HS0120", GAP),
             (codes.QC_ISSUE.value, "HS0121", "uneven_slice_spacing: 3 step(s) deviate")],
            "25056-3", with_seg=True),
        "not-eligible": Kind(
            QC_BLOCKED, None, {},
            [(codes.ELIGIBILITY.value, codes.NOT_ELIGIBLE.value, ""),
             (codes.NOT_ELIGIBLE_REASON.value, "HS0106", NOISE[0]),
             (codes.NOT_ELIGIBLE_REASON.value, "HS0106", NOISE[1]),
             (codes.QC_ISSUE.value, "HS0120", GAP)],
            "25045-6"),
        "not-eligible-no-series": Kind(
            NO_SERIES, None, {},
            [(codes.ELIGIBILITY.value, codes.NOT_ELIGIBLE.value, ""),
             (codes.NOT_ELIGIBLE_REASON.value, "HS0109", "no_suitable_series: no axial head CT")],
            "363679005"),
        "calibrating": Kind(
            ct_summary(percentile=None, screen_positive=None, threshold=None, qc_reasons=[]), CALIBRATING,
            {codes.ANOMALY_SCORE.value: 0.4123, codes.CHRONOLOGICAL_AGE.value: 67.0},
            [(codes.ELIGIBILITY.value, codes.ELIGIBLE.value, ""),
             (codes.HEALTHY_REFERENCE.value, codes.REFERENCE_CALIBRATING.value, CALIBRATING.text),
             *_absent(codes.PREDICTED_BRAIN_AGE, codes.BRAIN_AGE_GAP)],
            "25045-6"),
        # Built below with the eligible-negative report as its predecessor.
        "superseded": Kind(
            negative, BUNDLE, ct_numbers,
            [*_eligible(codes.SCREEN_NEGATIVE),
             (codes.HEALTHY_REFERENCE.value, codes.REFERENCE_BUNDLE.value, BUNDLE.text),
             *_absent(codes.PREDICTED_BRAIN_AGE, codes.BRAIN_AGE_GAP)],
            "25045-6"),
    }


KINDS = _kinds()


@pytest.fixture(scope="module")
def series():
    return make_ct_series()


@pytest.fixture(scope="module")
def segmentation(series) -> hd.seg.Segmentation:
    datasets, error = series
    # make_ct_series' map peaks at ~1 on the lesion: doubled, the 1.0 threshold cuts a sphere.
    seg = build_segmentation(datasets, error * 2.0, KINDS["eligible-positive"].summary)
    assert seg is not None
    return seg


@pytest.fixture(scope="module")
def reports(tmp_path_factory, series, segmentation) -> dict[str, Path]:
    datasets, error = series
    out = tmp_path_factory.mktemp("sr-kinds")
    overlays = build_overlay_series(datasets, error, KINDS["eligible-negative"].summary, slice_indices=[20, 25],
                                    reference=BUNDLE)
    built = {}
    for name, kind in KINDS.items():
        previous = [built["eligible-negative"]] if name == "superseded" else None
        sc = overlays if name in ("eligible-negative", "superseded") else []
        built[name] = build_report(datasets, kind.summary, sc, reference=kind.reference, previous_versions=previous,
                                   segmentation=segmentation if kind.with_seg else None, anomaly_map=error)
    # A bundle scored on asymmetry names its one-sided map maximum with its own code (HS0052).
    built["eligible-negative-one-sided"] = build_report(
        datasets, KINDS["eligible-negative"].summary, overlays, reference=BUNDLE, anomaly_map=error,
        map_unit="z_one_sided")
    paths = {}
    for name, sr in built.items():
        paths[name] = out / f"{name}.dcm"
        sr.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.mark.slow  # PixelMed's SR validator in a Java process
def test_pixelmed_finds_no_error_and_no_warning_in_any_kind(reports) -> None:
    findings = pixelmed_findings(list(reports.values()))
    failures = {}
    for name, path in reports.items():
        lines = findings[path]
        assert any("Found Root Template TID_1500" in line for line in lines), (name, lines[-40:])
        assert any("IOD validation complete" in line for line in lines), (name, lines[-40:])
        if errors_and_warnings(lines) != ([], []):
            failures[name] = errors_and_warnings(lines)
    assert failures == {}


def test_dciodvfy_finds_no_error_in_any_kind(reports) -> None:
    failures = {name: errors for name, path in reports.items() if (errors := dciodvfy_errors(path))}
    assert failures == {}


def _read(path: Path) -> tuple[pydicom.Dataset, ReadBack]:
    dataset = pydicom.dcmread(path)
    return dataset, ReadBack(hd.sr.Comprehensive3DSR.from_dataset(dataset))


def _children(item, concept: str) -> list:
    return [c for c in item.get("ContentSequence", []) if c.ConceptNameCodeSequence[0].CodeValue == concept]


PEAK = codes.MAP_QUANTITY["z"].value


@pytest.mark.parametrize("name", list(KINDS))
def test_highdicom_reads_back_the_summary(reports, name) -> None:
    kind = KINDS[name]
    dataset, group = _read(reports[name])
    measured = {m.name.value: m for m in group.get_measurements()}
    # The region's volume (with a SEG) is checked against the SEG below, the map's maximum
    # (without one) in test_the_map_maximum_is_given_at_its_point.
    assert ({code: m.value for code, m in measured.items() if code not in (codes.REGION_VOLUME.value, PEAK)}
            == pytest.approx(kind.numbers))
    assert (codes.REGION_VOLUME.value in measured) == kind.with_seg
    assert (PEAK in measured) == (kind.summary.eligible and not kind.with_seg)
    for code, measurement in measured.items():
        unit = {codes.ANOMALY_PERCENTILE.value: "%", codes.ANOMALY_SCORE.value: "{score}",
                codes.OPERATING_THRESHOLD.value: "{score}", codes.REGION_VOLUME.value: "ml", PEAK: "1"}.get(code, "a")
        assert measurement.unit.value == unit and measurement.unit.scheme_designator == "UCUM", code
        # In a TID 1411 group each model output names its algorithm (TID 4019; Subject Age is a
        # header input); a TID 1501 group names it once, and its NUMs have no algorithm children
        # (OHIF drops a NUM whose children hold no SCOORD).
        names = [str(c.TextValue) for c in _children(measurement[0], "111001")]
        by_model = kind.with_seg and code != codes.CHRONOLOGICAL_AGE.value
        assert names == ([kind.summary.algorithm.name] if by_model else []), code
    coded = evaluations_with_details(group.evaluation_items)
    assert coded == kind.evaluations
    # The plain-language summary closes the container; nothing else is in it.
    last = group.evaluation_items[-1]
    assert last.ValueType == "TEXT" and last.ConceptNameCodeSequence[0].CodeValue == REPORT_SUMMARY_TEXT.value
    assert str(last.TextValue).startswith("AI-generated result, not for primary diagnosis.")
    details = sum(1 for _, _, detail in coded if detail)
    assert len(group.evaluation_items) == len(coded) + details + 1
    # One Procedure Reported, from CID 100.
    procedures = _children(dataset, "121058")
    assert [p.ConceptCodeSequence[0].CodeValue for p in procedures] == [kind.procedure]
    # Algorithm identity per TID 4019 in the group (TID 1411 has no such row: each NUM names
    # it, checked above); the manufacturer only as the SR's.
    versions = [str(c.TextValue) for c in _children(group.group[0], "111003")]
    assert versions == ([] if kind.with_seg else [kind.summary.algorithm.version])
    if not kind.with_seg:
        assert _children(group.group[0], "111002") and _children(group.group[0], "111000")
    assert "122405" not in {e.value for e in dataset.iterall() if e.keyword == "CodeValue"}
    assert dataset.Manufacturer == kind.summary.algorithm.manufacturer
    # No row per source slice: the one IMAGE item is the Referenced Segment, or the image the
    # map's maximum is on; none without a result.
    images = [e for e in dataset.iterall() if e.keyword == "ValueType" and e.value == "IMAGE"]
    assert len(images) == (1 if kind.summary.eligible else 0)
    evidence = [ref for study in dataset.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
    assert sum(ref.ReferencedSOPClassUID != SEG_STORAGE for ref in evidence) >= N_SLICES


SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def test_the_positive_report_references_its_seg_segment(reports, series, segmentation) -> None:
    datasets, _ = series
    dataset = pydicom.dcmread(reports["eligible-positive"])
    report = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    assert report.content.get_image_measurement_groups() == []
    [group] = report.content.get_volumetric_roi_measurement_groups(
        referenced_sop_instance_uid=segmentation.SOPInstanceUID)
    reference = group.referenced_segment
    assert reference.referenced_sop_instance_uid == segmentation.SOPInstanceUID
    assert reference.referenced_sop_class_uid == SEG_STORAGE
    assert reference.referenced_segment_numbers == [1]
    # One series-level row for the sources, not one per slice.
    assert reference.source_series_for_segmentation.value == datasets[0].SeriesInstanceUID
    assert reference.source_images_for_segmentation == []
    # SEG and SR track the same region, and the SR measures its volume.
    segment = segmentation.SegmentSequence[0]
    assert (group.tracking_identifier, group.tracking_uid) == (segment.TrackingID, segment.TrackingUID)
    [volume] = [m for m in group.get_measurements() if m.name == codes.REGION_VOLUME]
    set_voxels = int(np.count_nonzero(segmentation.pixel_array))
    assert volume.value == pytest.approx(set_voxels * source_voxel_ml(datasets), abs=1e-3) and volume.value > 0.5
    assert volume.unit.value == "ml"
    evidence = {ref.ReferencedSOPInstanceUID: ref.ReferencedSOPClassUID
                for study in dataset.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence[segmentation.SOPInstanceUID] == SEG_STORAGE


def test_a_one_sided_map_maximum_has_its_own_code(reports) -> None:
    _, group = _read(reports["eligible-negative-one-sided"])
    names = {m.name.value for m in group.get_measurements()}
    assert codes.MAP_QUANTITY["z_one_sided"].value in names and PEAK not in names


@pytest.mark.parametrize("name", [n for n, k in KINDS.items() if not k.with_seg])
def test_a_report_without_a_seg_references_none(reports, name) -> None:
    dataset = pydicom.dcmread(reports[name])
    report = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    assert report.content.get_volumetric_roi_measurement_groups() == []
    codes_used = {e.value for e in dataset.iterall() if e.keyword == "CodeValue"}
    assert not codes_used & {"121191", "121232"}  # Referenced Segment, Source series for segmentation
    classes = {e.value for e in dataset.iterall() if e.keyword == "ReferencedSOPClassUID"}
    assert SEG_STORAGE not in classes


def test_a_seg_is_refused_beside_no_screen_result(series, segmentation) -> None:
    datasets, _ = series
    for summary, reference in ((QC_BLOCKED, None), (KINDS["calibrating"].summary, CALIBRATING)):
        with pytest.raises(ValueError, match="segmentation"):
            build_report(datasets, summary, [], reference=reference, segmentation=segmentation)
    other, _ = make_ct_series(seed=3)
    with pytest.raises(ValueError, match="segmentation"):
        build_report(other, ct_summary(), [], segmentation=segmentation)


@pytest.mark.parametrize("name", [n for n, k in KINDS.items() if k.summary.eligible and not k.with_seg])
def test_the_map_maximum_is_given_at_its_point(reports, series, name) -> None:
    """OHIF shows a measurement group only where it has image coordinates: the map's maximum
    (Derivation: Maximum) is inferred from the point it lies at, on the source image."""
    datasets, error = series
    _, group = _read(reports[name])
    [peak] = [m for m in group.get_measurements() if m.name.value == PEAK]
    assert peak.value == pytest.approx(float(error.max()), abs=1e-4)
    assert peak.derivation == codes.MAXIMUM
    [point] = peak.referenced_coordinates
    k, row, column = np.unravel_index(int(np.argmax(error)), error.shape)
    assert point.GraphicType == "POINT"
    assert [float(v) for v in point.GraphicData] == [column + 0.5, row + 0.5]
    [image] = point.ContentSequence
    assert image.RelationshipType == "SELECTED FROM"
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == datasets[k].SOPInstanceUID


def test_a_not_eligible_report_reads_as_not_eligible(reports) -> None:
    for name in ("not-eligible", "not-eligible-no-series"):
        dataset, group = _read(reports[name])
        assert group.get_measurements() == []
        concepts = {concept for concept, _, _ in evaluations_with_details(group.evaluation_items)}
        assert concepts <= {codes.ELIGIBILITY.value, codes.NOT_ELIGIBLE_REASON.value, codes.QC_ISSUE.value}, name
        assert not any(e.keyword == "MeasuredValueSequence" for e in dataset.iterall()), name


def test_a_superseding_report_names_its_predecessor(reports) -> None:
    first = pydicom.dcmread(reports["eligible-negative"])
    second = pydicom.dcmread(reports["superseded"])
    [study] = second.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == [first.SOPInstanceUID]
    assert second.SOPInstanceUID != first.SOPInstanceUID and second.StudyInstanceUID == first.StudyInstanceUID
