"""The worker pipeline in-process, on phantom studies and the shipped CT bundle."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.valuerep import DA

import headscreen.daemon.pipeline
from bad_input import BAD_BIRTH_DATES, BY_NAME, PATIENT, PATIENT_ID, damage, leaks
from headscreen.bundle import load_bundle
from headscreen.daemon.config import shipped_bundles
from headscreen.daemon.pipeline import SharedStages, StudyFiles, run_job
from headscreen.db.api import JobTicket
from headscreen.export import codes
from headscreen.export.sc import NOT_SCREENED_SERIES_DESCRIPTION
from headscreen.imaging.phantoms import Lesion, make_head, write_dicom_series
from headscreen.imaging.selection import SelectionRules
from headscreen.inference import BundleRunner
from serve_harness import dciodvfy_errors
from sr_helpers import coded_evaluations, measurement_group, sr_texts


@pytest.fixture(scope="module")
def ct_runner() -> BundleRunner:
    bundles = [load_bundle(p) for p in shipped_bundles()]
    return BundleRunner(next(b for b in bundles if b.manifest.modality == "CT"))


def ticket(study_uid: str) -> JobTicket:
    return JobTicket(job_id=1, study_id=1, study_instance_uid=study_uid, bundle_name="ct", bundle_version="1",
                     generation=1, attempt=1)


def study_of(files: list[Path]) -> StudyFiles:
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return StudyFiles(str(first.StudyInstanceUID), {str(first.SeriesInstanceUID): files})


def test_a_job_decodes_its_series_straight_to_the_working_spacing_unless_a_shadow_shares_it(
        tmp_path, ct_runner, monkeypatch):
    """With no shadow bundle the volume is decoded straight to the bundle's working spacing
    (no native voxels); a job whose stages a shadow shares decodes it whole. Both screen
    the study the same, to the last digit."""
    real_load = headscreen.daemon.pipeline.load_series
    calls: list[tuple[float | None, bool]] = []

    def recording_load(sources, shrink_to_mm=None):  # type: ignore[no-untyped-def]
        volume = real_load(sources, shrink_to_mm)
        calls.append((shrink_to_mm, volume.shrunk is not None))
        return volume

    monkeypatch.setattr(headscreen.daemon.pipeline, "load_series", recording_load)
    phantom = make_head("CT", age=58.0, seed=14,
                        lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=20.0))
    files = write_dicom_series(phantom, tmp_path / "in", rows=192, cols=192, slices=120, slice_thickness=1.0)
    study = study_of(files)
    alone = run_job(ticket(study.study_instance_uid), study, ct_runner, tmp_path / "alone", overlay_slices=4)
    shared = run_job(ticket(study.study_instance_uid), study, ct_runner, tmp_path / "shared", overlay_slices=4,
                     shared=SharedStages())
    spacing = float(ct_runner.bundle.manifest.preprocessing["working_spacing_mm"])
    assert calls == [(spacing, True), (None, False)]
    assert alone.anomaly_score is not None and alone.anomaly_score == shared.anomaly_score
    assert alone.qc_metrics == shared.qc_metrics and alone.qc_reasons == shared.qc_reasons


def test_lesion_study_gives_valid_overlays_on_the_lesion(tmp_path, ct_runner):
    phantom = make_head("CT", age=67.0, seed=8,
                        lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=25.0))
    files = write_dicom_series(phantom, tmp_path / "in", rows=256, cols=256, slices=100, slice_thickness=1.8)
    study = study_of(files)
    outcome = run_job(ticket(study.study_instance_uid), study, ct_runner, tmp_path / "out", overlay_slices=12)
    assert outcome.eligible and outcome.anomaly_score is not None
    assert outcome.chronological_age == pytest.approx(67.0, abs=1.0)
    assert 0.0 <= outcome.percentile <= 100.0
    kinds = [o.kind for o in outcome.objects]
    assert kinds.count("sr") == 1 and kinds.count("sc") == 12
    for obj in outcome.objects:
        assert dciodvfy_errors(Path(obj.path)) == [], obj.path
    sr_path = next(o.path for o in outcome.objects if o.kind == "sr")
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    assert report.StudyInstanceUID == study.study_instance_uid
    # The overlays are the slices through the lesion: its mask's z-range in the source series.
    lesion_slices = _lesion_source_slices(phantom, files)
    referenced = {str(pydicom.dcmread(o.path).SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for o in outcome.objects if o.kind == "sc"}
    assert referenced & lesion_slices
    # Positive: its SEG keeps the region at the map's focal maximum too, and says so.
    assert outcome.screen_positive
    seg = pydicom.dcmread(next(o.path for o in outcome.objects if o.kind == "seg"))
    parameters = str(seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters)
    assert "kept_at_focus=" in parameters, parameters


def _lesion_source_slices(phantom, files: list[Path]) -> set[str]:
    import SimpleITK as sitk

    mask = phantom.lesion_mask
    uids = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        point = [float(v) for v in ds.ImagePositionPatient]
        z = point[2]
        zs = [mask.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(mask.GetSize()[2])]
        k = int(np.argmin([abs(z - v) for v in zs]))
        if sitk.GetArrayViewFromImage(mask)[k].any():
            uids.add(str(ds.SOPInstanceUID))
    return uids


def test_study_without_suitable_series_gets_an_sr_saying_so(tmp_path, ct_runner):
    phantom = make_head("CT", age=50.0, seed=9)
    files = write_dicom_series(phantom, tmp_path / "scout", rows=128, cols=128, slices=3, slice_thickness=5.0,
                               series_description="SCOUT")
    study = study_of(files)
    outcome = run_job(ticket(study.study_instance_uid), study, ct_runner, tmp_path / "out", overlay_slices=12)
    assert not outcome.eligible and outcome.anomaly_score is None
    assert "no suitable series" in outcome.ineligible_reason
    assert outcome.series_verdicts and not outcome.series_verdicts[0]["accepted"]
    assert sorted(o.kind for o in outcome.objects) == ["sc", "sr"]
    for obj in outcome.objects:
        assert dciodvfy_errors(Path(obj.path)) == [], obj.path
    sr = next(o for o in outcome.objects if o.kind == "sr")
    text = str(pydicom.dcmread(sr.path).ContentSequence)
    assert "eligible" in text.lower()
    # No series was chosen, so no slice of another series is shown: a text card only.
    card = pydicom.dcmread(next(o.path for o in outcome.objects if o.kind == "sc"))
    assert "SourceImageSequence" not in card and "NOT SCREENED: No suitable series" in card.ImageComments


# --------------------------------------------------------------------------- QC gate

NOISY_PATIENT_ID = "NOISE-PHANTOM-7"


@pytest.fixture(scope="module")
def noisy_study(tmp_path_factory) -> StudyFiles:
    """A head CT with 80 HU noise: QC measures noise_sigma far above the bundle's range."""
    phantom = make_head("CT", age=50.0, seed=4, noise=80.0)
    files = write_dicom_series(phantom, tmp_path_factory.mktemp("noisy"), rows=128, cols=128, slices=60,
                               slice_thickness=3.0, patient_id=NOISY_PATIENT_ID)
    return study_of(files)


def _screen_outputs(outcome) -> dict[str, object]:
    names = ("anomaly_score", "percentile", "screen_positive", "threshold", "predicted_age", "age_gap")
    return {name: getattr(outcome, name) for name in names if getattr(outcome, name) is not None}


def test_blocking_qc_makes_the_study_not_eligible(tmp_path, ct_runner, noisy_study, monkeypatch):
    def no_inference(*args, **kwargs):
        raise AssertionError("inference must not run after a blocking QC reason")

    monkeypatch.setattr(ct_runner, "run", no_inference)
    outcome = run_job(ticket(noisy_study.study_instance_uid), noisy_study, ct_runner, tmp_path / "out",
                      overlay_slices=12)

    assert not outcome.eligible and outcome.ineligible_reason.startswith("noise_high: noise_sigma")
    assert _screen_outputs(outcome) == {}
    assert any(r.startswith("noise_high") for r in outcome.qc_reasons)
    assert outcome.qc_metrics["noise_sigma"] > 25.0 and "head_dice" in outcome.qc_metrics
    assert sorted(o.kind for o in outcome.objects) == ["sc", "sr"]  # no SEG, no overlays
    for obj in outcome.objects:
        assert dciodvfy_errors(Path(obj.path)) == [], obj.path

    sc = pydicom.dcmread(next(o.path for o in outcome.objects if o.kind == "sc"))
    assert sc.SeriesDescription == NOT_SCREENED_SERIES_DESCRIPTION
    assert sc.PhotometricInterpretation == "MONOCHROME2" and sc.SamplesPerPixel == 1
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
    assert "NOT SCREENED: High image noise" in sc.ImageComments and "Not for diagnosis" in sc.ImageComments
    assert NOISY_PATIENT_ID not in sc.ImageComments and sc.PatientID == NOISY_PATIENT_ID
    # The middle slice of the analysed series is shown, so the reader sees which series it was.
    series_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in next(iter(noisy_study.series.values()))}
    assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in series_sops
    assert sc.pixel_array.ndim == 2

    sr_path = next(o.path for o in outcome.objects if o.kind == "sr")
    group = measurement_group(sr_path)
    assert group.get_measurements() == []
    coded = coded_evaluations(group)
    assert coded[codes.ELIGIBILITY.value] == [(codes.NOT_ELIGIBLE.value, "")]
    [(code, detail)] = coded[codes.NOT_ELIGIBLE_REASON.value]
    assert code == "HS0106" and detail.startswith("noise_high: noise_sigma")
    # Nothing a reader could take for a result: no screen result (not even "Absent"), no score.
    for concept in (codes.SCREEN_RESULT, codes.ANOMALY_SCORE, codes.ANOMALY_PERCENTILE, codes.PREDICTED_BRAIN_AGE,
                    codes.BRAIN_AGE_GAP, codes.OPERATING_THRESHOLD):
        assert concept.value not in coded, concept.meaning
    sr = pydicom.dcmread(sr_path)
    evidence = {ref.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert sc.SOPInstanceUID in evidence
    comment = " ".join(sr_texts(sr))
    assert "NOT ELIGIBLE" in comment and "absence of findings is NOT implied" in comment
    assert "Anomaly score" not in comment


def test_blocking_reason_with_odd_headers_still_gives_the_report(tmp_path, ct_runner):
    phantom = make_head("CT", age=50.0, seed=4, noise=80.0)
    odd = {"PatientSex": "X", "StudyDate": "2025-01-01", "PatientBirthDate": "19xx"}
    files = write_dicom_series(phantom, tmp_path / "in", rows=128, cols=128, slices=60, slice_thickness=3.0,
                               extra=odd)
    study = study_of(files)
    outcome = run_job(ticket(study.study_instance_uid), study, ct_runner, tmp_path / "out", overlay_slices=12)
    assert not outcome.eligible and outcome.ineligible_reason.startswith("noise_high")
    assert sorted(o.kind for o in outcome.objects) == ["sc", "sr"]
    sr = pydicom.dcmread(next(o.path for o in outcome.objects if o.kind == "sr"))
    assert sr.StudyInstanceUID == study.study_instance_uid and sr.PatientSex == ""


def test_blocking_and_advisory_reasons_are_both_reported(tmp_path, ct_runner, noisy_study, monkeypatch):
    real_preprocess = headscreen.daemon.pipeline.preprocess

    def flipped(volume, params):
        prepared = real_preprocess(volume, params)
        return dataclasses.replace(prepared, qc_reasons=[
            "orientation_flipped: head upside down", "skull_defect: skull_coverage 0.1 outside [0.35, 10]",
            "noise_high: noise_sigma 49 outside [0, 25]", "noise_high: noise_relative 0.9 outside [0, 0.3]"])

    monkeypatch.setattr(headscreen.daemon.pipeline, "preprocess", flipped)
    outcome = run_job(ticket(noisy_study.study_instance_uid), noisy_study, ct_runner, tmp_path / "out",
                      overlay_slices=12)
    assert not outcome.eligible and _screen_outputs(outcome) == {}
    assert outcome.ineligible_reason.startswith("orientation_flipped: head upside down; noise_high")
    assert "skull_defect: skull_coverage 0.1 outside [0.35, 10]" in outcome.qc_reasons
    coded = coded_evaluations(measurement_group(next(o.path for o in outcome.objects if o.kind == "sr")))
    # One item per reason, each keeping its own text, even where two share a code.
    assert coded[codes.NOT_ELIGIBLE_REASON.value] == [
        ("HS0113", "orientation_flipped: head upside down"),
        ("HS0106", "noise_high: noise_sigma 49 outside [0, 25]"),
        ("HS0106", "noise_high: noise_relative 0.9 outside [0, 0.3]"),
    ]
    assert coded[codes.QC_ISSUE.value] == [("HS0111", "skull_defect: skull_coverage 0.1 outside [0.35, 10]")]
    sc = pydicom.dcmread(next(o.path for o in outcome.objects if o.kind == "sc"))
    assert "NOT SCREENED: Head orientation flipped" in sc.ImageComments


def test_advisory_reason_keeps_a_normal_result(tmp_path, ct_runner):
    phantom = make_head("CT", age=60.0, seed=6)
    files = write_dicom_series(phantom, tmp_path / "in", rows=128, cols=128, slices=60, slice_thickness=3.0)
    del files[30]  # one slice lost in transfer: missing_slices, advisory
    study = study_of(files)
    outcome = run_job(ticket(study.study_instance_uid), study, ct_runner, tmp_path / "out", overlay_slices=4)
    assert outcome.eligible, outcome.qc_reasons
    assert outcome.anomaly_score is not None and outcome.screen_positive is not None
    assert any(r.startswith("missing_slices") for r in outcome.qc_reasons)
    assert [o.kind for o in outcome.objects].count("sc") == 4
    sr_path = next(o.path for o in outcome.objects if o.kind == "sr")
    assert dciodvfy_errors(Path(sr_path)) == []
    group = measurement_group(sr_path)
    coded = coded_evaluations(group)
    assert coded[codes.ELIGIBILITY.value] == [(codes.ELIGIBLE.value, "")]
    assert codes.NOT_ELIGIBLE_REASON.value not in coded
    missing = next(r for r in outcome.qc_reasons if r.startswith("missing_slices"))
    assert ("HS0120", missing) in coded[codes.QC_ISSUE.value]
    assert codes.ANOMALY_SCORE.value in {m.name.value for m in group.get_measurements()}


def test_a_missing_stored_file_is_a_transient_error_never_a_result(tmp_path, ct_runner):
    """Storage that is not there (an unmounted share) must be retried, not screened as "no images"."""
    from headscreen.errors import TransientError

    phantom = make_head("CT", age=50.0, seed=9)
    files = write_dicom_series(phantom, tmp_path / "series", rows=64, cols=64, slices=4, slice_thickness=5.0)
    study = study_of(files)
    files[1].unlink()
    with pytest.raises(TransientError, match="storage not reachable") as caught:
        run_job(ticket(study.study_instance_uid), study, ct_runner, tmp_path / "out", overlay_slices=4)
    assert str(tmp_path) not in str(caught.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.dcm"))


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def fast_runner(tmp_path_factory) -> BundleRunner:
    """The shipped CT model with registration cut short (test_site_calibration.fast_bundle)."""
    from test_site_calibration import fast_bundle

    return BundleRunner(load_bundle(fast_bundle(tmp_path_factory.mktemp("fast"))))


@pytest.fixture(scope="module")
def small_head():
    return make_head("CT", age=55.0, seed=21, spacing=(2.0, 2.0, 2.0))


EIGHT_MM = SelectionRules.default_for("CT").model_copy(update={"slice_thickness_mm": (0.4, 8.0)})


def _bad_study(small_head, folder: Path, *mutations: str) -> tuple[StudyFiles, list[Path]]:
    files = write_dicom_series(small_head, folder, rows=64, cols=64, slice_thickness=8.0, patient_id=PATIENT_ID,
                               extra=dict(PATIENT))
    for name in mutations:
        damage(files, BY_NAME[name], random.Random(7))
    return study_of(files), files


def test_one_undecodable_slice_costs_that_slice_not_the_study(tmp_path, fast_runner, small_head, monkeypatch):
    from headscreen.imaging import selection

    study, files = _bad_study(small_head, tmp_path / "in")
    garbage, broken = files[5], files[-6]
    damage([garbage], BY_NAME["position_garbage_one"], random.Random(0))
    damage([broken], BY_NAME["pixels_truncated_one"], random.Random(0))
    judged: list[object] = []
    judge = selection.instance_problem
    monkeypatch.setattr(selection, "instance_problem", lambda ds: judged.append(ds) or judge(ds))
    outcome = run_job(ticket(study.study_instance_uid), study, fast_runner, tmp_path / "out", overlay_slices=2,
                      rules=EIGHT_MM)
    assert outcome.eligible and outcome.anomaly_score is not None, outcome.qc_reasons
    assert (f"instances_excluded: 2 of {len(files)} instances of the series left out "
            "(geometry undecodable 1, pixel data missing or undecodable 1)") in outcome.qc_reasons
    assert "1 instance(s) left out: geometry undecodable 1" in outcome.series_verdicts[0]["reason"]
    # Each header judged once, for selection and the volume alike; then, as the series did not
    # load (the truncated slice), each of the files kept is read whole and judged again.
    assert len(judged) == len(files) + (len(files) - 1)
    # A SEG only where the map crosses its threshold; never left out for want of geometry here.
    assert sorted(o.kind for o in outcome.objects if o.kind != "seg") == ["sc", "sc", "sr"]
    assert not any(r.startswith("seg_not_built") for r in outcome.qc_reasons)
    for obj in outcome.objects:
        assert dciodvfy_errors(Path(obj.path)) == [], obj.path
    left_out = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (garbage, broken)}
    sr = pydicom.dcmread(next(o.path for o in outcome.objects if o.kind == "sr"))
    evidence = {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert len(evidence) >= len(files) - 2 + 2 and not evidence & left_out  # the other slices, the SCs (the SEG)


def test_undecodable_patient_values_are_left_out_of_every_result_and_named(tmp_path, fast_runner, small_head):
    study, _ = _bad_study(small_head, tmp_path / "in", "birth_date_iso", "study_time_bad", "institution_unknown_vr",
                          "sex_bad")
    outcome = run_job(ticket(study.study_instance_uid), study, fast_runner, tmp_path / "out", overlay_slices=1,
                      rules=EIGHT_MM)
    assert outcome.eligible, outcome.qc_reasons
    [note] = [r for r in outcome.qc_reasons if r.startswith("header_values_dropped")]
    named = note.removeprefix("header_values_dropped: ").split(" (")[0]
    assert sorted(named.split(", ")) == ["InstitutionName", "PatientBirthDate", "PatientSex", "StudyTime"]
    assert leaks(note) == [] and leaks(" ".join(outcome.qc_reasons)) == []
    assert sorted(o.kind for o in outcome.objects if o.kind != "seg") == ["sc", "sr"]
    for obj in outcome.objects:
        assert dciodvfy_errors(Path(obj.path)) == [], obj.path
        ds = pydicom.dcmread(obj.path)
        assert (ds.PatientID, str(ds.PatientName), ds.AccessionNumber) == (PATIENT_ID, PATIENT["PatientName"],
                                                                          PATIENT["AccessionNumber"])
        assert (ds.PatientBirthDate, ds.PatientSex, ds.StudyTime) == ("", "", ""), obj.kind
        assert ds.StudyDate != ""
    # The SR and the overlay legend say what was left out, by keyword.
    sr_path = next(o.path for o in outcome.objects if o.kind == "sr")
    assert any(detail == note for _, detail in coded_evaluations(measurement_group(sr_path))[codes.QC_ISSUE.value])


def test_an_input_error_while_building_results_gives_a_not_eligible_report(tmp_path, fast_runner, small_head,
                                                                           monkeypatch):
    study, _ = _bad_study(small_head, tmp_path / "in")
    real = headscreen.daemon.pipeline.build_overlay_series

    def refuses_a_value(*args, **kwargs):
        DA(BAD_BIRTH_DATES[0])  # as highdicom does on a value it will not copy
        return real(*args, **kwargs)

    monkeypatch.setattr(headscreen.daemon.pipeline, "build_overlay_series", refuses_a_value)
    out = tmp_path / "out"
    (out / "sc-0007.dcm").parent.mkdir(parents=True)
    (out / "sc-0007.dcm").write_bytes(b"left by an earlier stage")
    outcome = run_job(ticket(study.study_instance_uid), study, fast_runner, out, overlay_slices=1, rules=EIGHT_MM)
    assert not outcome.eligible and _screen_outputs(outcome) == {}
    assert outcome.ineligible_reason == ("input_undecodable: a value of the stored instances does not decode "
                                         "or is not valid (ValueError)")
    assert sorted(o.kind for o in outcome.objects) == ["sc", "sr"]
    assert sorted(p.name for p in out.iterdir()) == ["sc-0001.dcm", "sr.dcm"]  # nothing else of this attempt
    for obj in outcome.objects:
        assert dciodvfy_errors(Path(obj.path)) == [], obj.path
    assert "NOT SCREENED: Stored instances do not decode" in pydicom.dcmread(out / "sc-0001.dcm").ImageComments


def test_the_not_eligible_report_goes_out_even_when_highdicom_refuses_the_series(tmp_path, ct_runner, monkeypatch,
                                                                                  caplog):
    phantom = make_head("CT", age=50.0, seed=9)
    files = write_dicom_series(phantom, tmp_path / "scout", rows=64, cols=64, slices=3, slice_thickness=5.0,
                               series_description="SCOUT", patient_id=PATIENT_ID, extra=dict(PATIENT))
    study = study_of(files)
    real = headscreen.daemon.pipeline.build_report

    def refuses_all_but_the_last(sources, summary, sc_datasets, *args, **kwargs):
        if sc_datasets:  # the first two tries list the image: refused as if a value did not validate
            DA(BAD_BIRTH_DATES[1])
        return real(sources, summary, sc_datasets, *args, **kwargs)

    monkeypatch.setattr(headscreen.daemon.pipeline, "build_report", refuses_all_but_the_last)
    outcome = run_job(ticket(study.study_instance_uid), study, ct_runner, tmp_path / "out", overlay_slices=1)
    assert not outcome.eligible and "no suitable series" in outcome.ineligible_reason
    # The report alone: an image it cannot list is not sent.
    assert [o.kind for o in outcome.objects] == ["sr"]
    sr_path = Path(outcome.objects[0].path)
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    assert (sr.StudyInstanceUID, sr.PatientID) == (study.study_instance_uid, PATIENT_ID)
    assert sum("retried on less" in r.getMessage() for r in caplog.records) == 2
    ours = [r for r in caplog.records if r.name.startswith("headscreen.")]
    assert [r.getMessage() for r in ours if leaks(f"{r.getMessage()} {getattr(r, 'error', '')}")] == []


def test_an_mr_scanners_site_reference_corrects_the_reported_brain_age(tmp_path) -> None:
    """The shipped MR bundle, a healthy phantom, judged against its bundle reference and then
    against a site reference that holds an 8-year brain-age bias: the same model, the same
    score, the brain age and gap 8 years lower, and the SR saying why."""
    from headscreen.daemon.pipeline import SharedStages
    from headscreen.daemon.reference import ReferencePolicy
    from headscreen.db.api import SiteReferenceRow
    from test_reference import T0

    runner = BundleRunner(next(b for b in (load_bundle(p) for p in shipped_bundles()) if b.manifest.modality == "MR"))
    phantom = make_head("MR", age=60.0, seed=11)
    study = study_of(write_dicom_series(phantom, tmp_path / "in", rows=128, cols=128, slices=60, slice_thickness=3.0))
    stages = SharedStages()
    bundle = run_job(ticket(study.study_instance_uid), study, runner, tmp_path / "bundle", overlay_slices=1,
                     shared=stages)
    assert bundle.eligible and bundle.predicted_age is not None and bundle.age_offset is None
    calibration = runner.bundle.manifest.calibration
    row = SiteReferenceRow(
        reference_id=3, bundle_name=runner.bundle.manifest.name, bundle_version=runner.bundle.manifest.version,
        scoring_sha256="s", grouping="station", station="ANY", rule="confirmed_normal",
        scores=sorted(calibration.reference_scores), n=len(calibration.reference_scores),
        threshold=calibration.threshold, specificity=calibration.specificity, result_ids=[], created_at=T0,
        provenance={"rule": "confirmed_normal", "brain_age": {"applied": True, "offset_years": 8.0, "n": 40}},
        created_by="alice", retired_at=None, retired_by=None, retire_reason=None)
    site = ReferencePolicy(mode="site", min_references=5, lookup=lambda *key: row)
    corrected = run_job(ticket(study.study_instance_uid), study, runner, tmp_path / "site", overlay_slices=1,
                        references=site, shared=stages)
    assert corrected.reference_kind == "site" and corrected.age_offset == 8.0
    assert corrected.anomaly_score == bundle.anomaly_score
    assert corrected.predicted_age == pytest.approx(bundle.predicted_age - 8.0)
    assert corrected.age_gap == pytest.approx(bundle.age_gap - 8.0)
    sr_path = Path(next(o.path for o in corrected.objects if o.kind == "sr"))
    assert dciodvfy_errors(sr_path) == []
    numbers = {m.name.value: m.value for m in measurement_group(str(sr_path)).get_measurements()}
    assert float(numbers[codes.PREDICTED_BRAIN_AGE.value]) == pytest.approx(corrected.predicted_age, abs=1e-3)
    assert "brain age corrected by -8.0 y, this scanner's median gap on 40 confirmed-normal studies" in " ".join(
        sr_texts(pydicom.dcmread(sr_path)))
