"""DICOM Parametric Map of the anomaly map: valid, the same values on the source geometry,
its unit stated; off by default, and when on written, recorded and delivered like the others."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pynetdicom import build_context
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db_factories import outcome
from headscreen.daemon.config import Settings
from headscreen.daemon.pipeline import SharedStages, StudyFiles, _build_results, run_job
from headscreen.daemon.reference import ReferencePolicy
from headscreen.db.api import JobTicket
from headscreen.db.models import Delivery, ResultObject
from headscreen.db.states import DeliveryState, ObjectKind
from headscreen.export import codes
from headscreen.export.pm import (
    LUT_LABELS,
    PM_CONTENT_LABEL,
    PM_SERIES_DESCRIPTION,
    PM_SERIES_NUMBER,
    build_parametric_map,
)
from headscreen.export.sc import build_overlay_series, choose_slices
from headscreen.export.seg import build_segmentation
from headscreen.export.sr import ReferenceNote, build_report
from headscreen.imaging.phantoms import make_head, write_dicom_series
from headscreen.imaging.selection import SelectionRules
from serve_harness import RecordingSCP, dciodvfy_errors
from sr_helpers import errors_and_warnings, pixelmed_findings
from test_export import ct_summary, make_ct_series
from worker_helpers import make_worker, queued_ct_study, reporting_runner, worker_settings

PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SCALE = 2.0  # as in test_seg: the map crosses the SEG threshold on the lesion


@pytest.fixture(scope="module")
def series():
    datasets, error = make_ct_series(seed=11)
    return datasets, error * SCALE


@pytest.fixture(scope="module")
def pm_file(tmp_path_factory, series) -> Path:
    datasets, error = series
    path = tmp_path_factory.mktemp("pm") / "pm.dcm"
    build_parametric_map(datasets, error, ct_summary()).save_as(path, enforce_file_format=True)
    return path


def test_pm_passes_dciodvfy(pm_file):
    assert dciodvfy_errors(pm_file) == []


def test_read_back_gives_the_same_values_on_the_source_geometry(pm_file, series):
    datasets, error = series
    back = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(pm_file))
    assert back.SOPClassUID == PM_CLASS
    assert back.NumberOfFrames == len(datasets)
    assert (back.Rows, back.Columns) == error.shape[1:]
    assert back.BitsAllocated == 32 and "FloatPixelData" in back
    source_uids = [str(d.SOPInstanceUID) for d in datasets]
    values = back.get_pixels_by_source_instance(source_uids, apply_real_world_transform=True,
                                                dtype=np.float32)
    assert values.shape[:3] == error.shape
    assert float(np.abs(values.reshape(error.shape) - error).max()) < 1e-6
    # Each frame sits where its source slice is, in the source's frame of reference.
    assert back.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    shared = back.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == \
        [float(v) for v in datasets[0].ImageOrientationPatient]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == \
        [float(v) for v in datasets[0].PixelSpacing]
    by_uid = {str(d.SOPInstanceUID): d for d in datasets}
    for frame in back.PerFrameFunctionalGroupsSequence:
        source = by_uid[str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == \
            pytest.approx([float(v) for v in source.ImagePositionPatient])


def test_the_unit_and_the_quantity_are_stated(pm_file, series, tmp_path):
    _, error = series
    shared = pydicom.dcmread(pm_file, stop_before_pixels=True).SharedFunctionalGroupsSequence[0]
    [mapping] = shared.RealWorldValueMappingSequence
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == (codes.MAP_QUANTITY["z"].value, "99HEADSCREEN")
    assert "healthy limit" in quantity.CodeMeaning and "z" in quantity.CodeMeaning
    assert mapping.LUTLabel == LUT_LABELS["z"] and "healthy limit" in mapping.LUTExplanation
    assert (float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)) == (1.0, 0.0)
    assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) == pytest.approx(float(error.max()))
    window = shared.FrameVOILUTSequence[0]
    assert (float(window.WindowCenter), float(window.WindowWidth)) == (2.0, 2.0)
    assert window.WindowCenterWidthExplanation == "healthy limit (1) to 3x"
    # A bundle without a normative model: the raw error over its healthy limit.
    datasets, _ = series
    raw = build_parametric_map(datasets, error, ct_summary(), map_unit="error")
    [raw_mapping] = raw.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert raw_mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == \
        codes.MAP_QUANTITY["error"].value
    assert raw_mapping.LUTLabel == LUT_LABELS["error"]
    with pytest.raises(ValueError, match="map_unit"):
        build_parametric_map(datasets, error, ct_summary(), map_unit="hu")


def test_identity_says_ai_generated_not_for_diagnosis(pm_file, series):
    datasets, _ = series
    pm = pydicom.dcmread(pm_file, stop_before_pixels=True)
    assert pm.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert pm.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert pm.SeriesNumber == PM_SERIES_NUMBER and PM_SERIES_NUMBER not in (9001, 9002, 9902, 9903)
    assert pm.SeriesDescription == PM_SERIES_DESCRIPTION and "NOT FOR PRIMARY DIAGNOSIS" in pm.SeriesDescription
    assert pm.ContentLabel == PM_CONTENT_LABEL
    assert "AI-generated" in pm.ContentDescription and "not for primary diagnosis" in pm.ContentDescription
    assert pm.ContentQualification == "RESEARCH"
    algo = ct_summary().algorithm
    assert (pm.ManufacturerModelName, pm.SoftwareVersions) == (algo.name, algo.version)
    derivation = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].DerivationDescription
    assert "AI-generated" in derivation and algo.name in derivation and "not for primary diagnosis" in derivation


def test_values_that_are_not_finite_are_stored_as_zero(series):
    datasets, error = series
    damaged = error.copy()
    damaged[0, 0, 0], damaged[0, 0, 1] = np.nan, np.inf
    pm = build_parametric_map(datasets, damaged, ct_summary())
    values = pm.pixel_array
    assert np.isfinite(values).all()
    with pytest.raises(ValueError, match="native_map"):
        build_parametric_map(datasets[:-1], error, ct_summary())


def test_build_results_writes_it_only_when_asked(tmp_path, series):
    datasets, error = series
    default = _build_results(datasets, error, ct_summary(), choose_slices(error, 2), tmp_path / "off", 1.0)
    enabled = _build_results(datasets, error, ct_summary(), choose_slices(error, 2), tmp_path / "on", 1.0,
                             parametric_map=True)
    assert "pm" not in [o.kind for o in default] and not (tmp_path / "off" / "pm.dcm").exists()
    [pm] = [o for o in enabled if o.kind == "pm"]
    assert pm.path == str(tmp_path / "on" / "pm.dcm") and pm.sop_class_uid == PM_CLASS
    assert pydicom.dcmread(pm.path, stop_before_pixels=True).SOPInstanceUID == pm.sop_instance_uid
    assert sorted({o.kind for o in enabled}) == ["pm", "sc", "seg", "sr"]


# --------------------------------------------------------------------------- the SR lists it


@pytest.fixture(scope="module")
def report_with_map(tmp_path_factory, series, pm_file) -> Path:
    datasets, error = series
    reference = ReferenceNote(kind="bundle", text="Reference: bundle ct-anogan-1.2.0, synthetic healthy phantoms")
    overlays = build_overlay_series(datasets, error, ct_summary(), slice_indices=[20, 25], reference=reference)
    seg = build_segmentation(datasets, error, ct_summary())
    sr = build_report(datasets, ct_summary(), overlays, reference=reference, segmentation=seg,
                      parametric_map=pydicom.dcmread(pm_file, stop_before_pixels=True))
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def test_the_report_lists_the_map_in_its_evidence(report_with_map, pm_file):
    pm = pydicom.dcmread(pm_file, stop_before_pixels=True)
    sr = pydicom.dcmread(report_with_map)
    listed = {(str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID))
              for study in sr.CurrentRequestedProcedureEvidenceSequence
              for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert (PM_CLASS, str(pm.SOPInstanceUID)) in listed
    assert dciodvfy_errors(report_with_map) == []
    other_study = pydicom.dcmread(pm_file, stop_before_pixels=True)
    other_study.StudyInstanceUID = hd.UID()
    datasets = [pydicom.dcmread(report_with_map)]  # any instance of the study as the source header
    with pytest.raises(ValueError, match="parametric_map"):
        build_report(datasets, ct_summary(), [], parametric_map=other_study)


@pytest.mark.slow  # PixelMed's SR validator in a Java process
def test_pixelmed_finds_no_error_and_no_warning_in_the_report_listing_the_map(report_with_map):
    [lines] = pixelmed_findings([report_with_map]).values()
    assert errors_and_warnings(lines) == ([], []), lines


# --------------------------------------------------------------------------- the pipeline


def test_the_setting_is_off_by_default(tmp_path):
    assert worker_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}").parametric_map_enabled is False
    assert Settings.model_fields["parametric_map_enabled"].default is False


EIGHT_MM = SelectionRules.default_for("CT").model_copy(update={"slice_thickness_mm": (0.4, 8.0)})


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory) -> StudyFiles:
    head = make_head("CT", age=55.0, seed=21, spacing=(2.0, 2.0, 2.0))
    files = write_dicom_series(head, tmp_path_factory.mktemp("in"), rows=64, cols=64, slice_thickness=8.0)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return StudyFiles(str(first.StudyInstanceUID), {str(first.SeriesInstanceUID): files})


@pytest.fixture(scope="module")
def fast_runner(tmp_path_factory):
    from headscreen.bundle import load_bundle
    from headscreen.inference import BundleRunner
    from test_site_calibration import fast_bundle

    return BundleRunner(load_bundle(fast_bundle(tmp_path_factory.mktemp("fast"))))


def _ticket(study: StudyFiles) -> JobTicket:
    return JobTicket(job_id=1, study_id=1, study_instance_uid=study.study_instance_uid, bundle_name="ct",
                     bundle_version="1", generation=1, attempt=1)


def test_pipeline_sends_it_only_when_enabled_and_only_for_a_judged_eligible_study(tmp_path, fast_runner,
                                                                                   phantom_study):
    study, shared = phantom_study, SharedStages()  # read and preprocessed once for the three runs

    def run(folder: str, **kwargs):  # type: ignore[no-untyped-def]
        return run_job(_ticket(study), study, fast_runner, tmp_path / folder, 1, EIGHT_MM, shared=shared, **kwargs)

    default = run("default")
    assert default.eligible, default.qc_reasons
    assert "pm" not in [o.kind for o in default.objects] and not (tmp_path / "default" / "pm.dcm").exists()

    enabled = run("on", parametric_map_enabled=True)
    assert enabled.eligible and enabled.anomaly_score == default.anomaly_score
    [pm] = [o for o in enabled.objects if o.kind == "pm"]
    assert dciodvfy_errors(Path(pm.path)) == []
    back = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(pm.path))
    [series_files] = study.series.values()
    assert back.NumberOfFrames == len(series_files)
    assert float(np.asarray(back.pixel_array).max()) > 0.0  # the map itself, not an empty frame set
    assert {str(back.StudyInstanceUID)} == {study.study_instance_uid}

    # A calibrating scanner gets no SEG, and no parametric map either.
    calibrating = run("calibrating", parametric_map_enabled=True,
                      references=ReferencePolicy(mode="site", lookup=lambda *_args: None))
    assert calibrating.reference_kind == "calibrating"
    assert not {"pm", "seg"} & {o.kind for o in calibrating.objects}


def test_a_not_eligible_study_gets_no_parametric_map(tmp_path, fast_runner, phantom_study):
    # The default CT rules refuse the phantom's 8 mm slices: no suitable series.
    result = run_job(_ticket(phantom_study), phantom_study, fast_runner, tmp_path / "out", 1,
                     parametric_map_enabled=True)
    assert not result.eligible
    assert sorted(o.kind for o in result.objects) == ["sc", "sr"]
    assert not (tmp_path / "out" / "pm.dcm").exists()


# --------------------------------------------------------------------------- the worker and delivery


class MapAcceptingSCP(RecordingSCP):
    """The destination PACS, also accepting Parametric Map Storage (pynetdicom's default
    storage contexts leave it out)."""

    def start(self) -> None:
        from pynetdicom import AE, StoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = [*StoragePresentationContexts, build_context(PM_CLASS)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])


@pytest.mark.parametrize("enabled", [False, True])
def test_worker_passes_the_setting_records_the_kind_and_delivers_it(
    tmp_path: Path, db_url: str, db_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, series,
    enabled: bool,
) -> None:
    datasets, error = series
    asked: list[bool] = []

    def writing_job(ticket, _study, _runner, output_dir: Path, *_args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(kwargs.get("parametric_map_enabled", False))
        objects = _build_results(datasets, error, ct_summary(), choose_slices(error, 1), output_dir, 1.0,
                                 parametric_map=asked[-1])
        return outcome(objects=objects)

    pacs = MapAcceptingSCP(tmp_path / "pacs", "PACS")
    try:
        settings = worker_settings(tmp_path, db_url, parametric_map_enabled=enabled,
                                   destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                                  "port": pacs.port}])
        worker = make_worker(monkeypatch, settings, db_sessions, writing_job, runner=reporting_runner())
        with db_sessions() as session:
            queued_ct_study(session)
        assert worker.run_one()
    finally:
        pacs.stop()
    assert asked == [enabled]
    with db_sessions() as session:
        rows = session.execute(select(ResultObject, Delivery)
                               .join(Delivery, Delivery.result_object_id == ResultObject.id)).all()
    kinds = sorted(o.kind for o, _ in rows)
    assert kinds == (["pm", "sc", "seg", "sr"] if enabled else ["sc", "seg", "sr"])
    assert all(d.state == DeliveryState.DELIVERED for _, d in rows)
    assert set(pacs.received) == {o.sop_instance_uid for o, _ in rows}
    if enabled:
        [pm] = [o for o, _ in rows if o.kind == ObjectKind.PM]
        received = pydicom.dcmread(pacs.folder / f"{pm.sop_instance_uid}.dcm", stop_before_pixels=True)
        assert received.SOPClassUID == PM_CLASS


def test_a_one_sided_map_names_its_own_quantity_and_passes_dciodvfy(series, tmp_path):
    """A bundle scored on left-right asymmetry sends the one-sided z (headscreen.scores.one_sided_z)."""
    datasets, error = series
    path = tmp_path / "pm-one-sided.dcm"
    build_parametric_map(datasets, error, ct_summary(), map_unit="z_one_sided").save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path, stop_before_pixels=True)
    [mapping] = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("HS0052", "99HEADSCREEN")
    assert mapping.LUTLabel == "ZASYM_OVER_LIMIT" and "one-sided" in mapping.LUTExplanation
    assert back.ContentDescription == "AI-generated one-sided positive z-map, not for primary diagnosis"
