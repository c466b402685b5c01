"""The worker pipeline in-process, on phantom studies and the shipped CT bundle."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from daemon.bundle import load_bundle
from daemon.config import shipped_bundles
from daemon.inference import BundleRunner
from daemon.pipeline import StudyFiles, run_job
from db.api import JobTicket
from imaging.phantoms import Lesion, make_head, write_dicom_series
from serve_harness import dciodvfy_errors


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


def test_lesion_study_gives_valid_overlays_on_the_lesion(tmp_path, ct_runner):
    phantom = make_head("CT", age=67.0, seed=8, lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=25.0))
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
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(next(o.path for o in outcome.objects if o.kind == "sr")))
    assert report.StudyInstanceUID == study.study_instance_uid
    # The overlays are the slices through the lesion: its mask's z-range in the source series.
    lesion_slices = _lesion_source_slices(phantom, files)
    referenced = {str(pydicom.dcmread(o.path).SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for o in outcome.objects if o.kind == "sc"}
    assert referenced & lesion_slices


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
    [sr] = outcome.objects
    assert sr.kind == "sr" and dciodvfy_errors(Path(sr.path)) == []
    text = str(pydicom.dcmread(sr.path).ContentSequence)
    assert "eligible" in text.lower()
