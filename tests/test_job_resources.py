"""What makes a job cheap (issue 14) without changing what it finds: each file read once,
the volume's voxels released once preprocessed, the SEG built from the slices it marks, the
sources cleaned in full only where an object copies from them, result files synced as a
set, and a worker woken by the sweep that queues its job."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bad_input import BY_NAME, damage
from db_factories import BUNDLES, add_series, outcome, uid
from headscreen.daemon import scheduler
from headscreen.db import api
from headscreen.db.models import Job
from headscreen.db.states import JobState
from headscreen.export.sanitise import (
    _SHARED,
    COPIED,
    REFERENCE_KEYWORDS,
    TYPE2,
    clean_header,
    reference_copies,
    sanitise_sources,
)
from headscreen.export.seg import anomaly_mask, anomaly_region, build_segmentation, source_voxel_ml
from headscreen.imaging.phantoms import make_head, write_dicom_series
from headscreen.imaging.preprocess import (
    ModelGrid,
    Preprocessed,
    default_params,
    preprocess,
    regular_image,
    shrink,
    to_native,
)
from headscreen.imaging.volume import load_series, read_header
from serve_harness import dciodvfy_errors
from test_export import ct_summary, make_ct_series
from worker_helpers import make_worker, worker_settings


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory) -> list[Path]:
    phantom = make_head("CT", age=50.0, seed=3, spacing=(2.0, 2.0, 2.0))
    return write_dicom_series(phantom, tmp_path_factory.mktemp("ct"), rows=96, cols=96, slices=60)


def _naive_stack(files: list[Path]) -> np.ndarray:
    """Every slice read in full by pydicom, rescaled, in order along the slice normal."""
    datasets = [pydicom.dcmread(p) for p in files]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope)
                     + np.float32(ds.RescaleIntercept) for ds in datasets])


def test_a_series_read_once_gives_the_same_volume_and_keeps_no_pixels(ct_files):
    headers = [read_header(p) for p in reversed(ct_files)]
    from_headers = load_series(headers)
    from_paths = load_series(ct_files)
    assert np.array_equal(sitk.GetArrayViewFromImage(from_headers.image), _naive_stack(ct_files))
    assert np.array_equal(sitk.GetArrayViewFromImage(from_headers.image), sitk.GetArrayViewFromImage(from_paths.image))
    assert from_headers.slice_sop_uids == from_paths.slice_sop_uids
    assert from_headers.image.GetOrigin() == from_paths.image.GetOrigin()
    assert from_headers.image.GetDirection() == from_paths.image.GetDirection()
    # The headers are as if read without pixels: nothing is held twice.
    assert all("PixelData" not in ds for ds in headers)
    assert all(str(ds.SOPInstanceUID) for ds in headers)


def test_a_released_volume_maps_back_the_same_and_is_not_preprocessed_again(ct_files):
    volume = load_series(ct_files)
    grid = ModelGrid.from_params(default_params("CT"))
    reference = grid.reference_image()
    # The phantom is written in MNI space: the identity places the model grid on it.
    prepared = Preprocessed(model_input=np.zeros(grid.size_zyx, np.float32), brain_mask=np.ones(grid.size_zyx, bool),
                            qc_metrics={}, qc_reasons=[], transform=sitk.AffineTransform(3), reference=reference)
    model_map = np.random.default_rng(0).random(grid.size_zyx, dtype=np.float32)
    before = to_native(model_map, prepared, volume)
    size = volume.image.GetSize()
    volume.release_pixels()
    assert volume.pixels_released and volume.size == size and volume.image.GetNumberOfPixels() == 1
    after = to_native(model_map, prepared, volume)
    assert before.shape == (size[2], size[1], size[0]) and np.count_nonzero(before) > 0
    assert np.array_equal(before, after)
    with pytest.raises(ValueError, match="volume"):
        preprocess(volume, default_params("CT"))


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetOrigin() == b.GetOrigin() and a.GetSpacing() == b.GetSpacing() and a.GetDirection() == b.GetDirection()


def test_a_series_decoded_straight_to_the_working_spacing_gives_the_shrunk_image_to_the_bit(tmp_path, ct_files):
    """load_series(shrink_to_mm) decodes a slab at a time into the block average the job
    preprocesses: the same voxels, grid, geometry and middle slices (the noise QC's
    sample) as loading the whole series and shrinking it, without the native voxels; also
    when some slices do not fit int16 (the whole image would then be float32)."""
    thin = write_dicom_series(make_head("MR", age=40.0, seed=9), tmp_path / "mr", rows=128, cols=128, slices=90,
                              slice_thickness=1.0)
    wide = write_dicom_series(make_head("MR", age=40.0, seed=10), tmp_path / "wide", rows=96, cols=96, slices=70,
                              slice_thickness=1.0)
    for path in wide[30:40]:  # the middle slices among them
        ds = pydicom.dcmread(path)
        ds.RescaleIntercept = 40000
        ds.save_as(path)
    for files, spacing, middle_type in ((ct_files, 4.0, np.int16), (thin, 2.0, np.int16), (wide, 2.0, np.float32)):
        whole = load_series([read_header(p) for p in files])
        streamed = load_series([read_header(p) for p in files], shrink_to_mm=spacing)
        expected, shrunk = shrink(regular_image(whole), spacing), streamed.shrunk_to(spacing)
        assert shrunk is not None and streamed.shrunk_to(spacing / 2) is None
        assert np.array_equal(sitk.GetArrayViewFromImage(shrunk), sitk.GetArrayViewFromImage(expected))
        assert _same_grid(shrunk, expected) and _same_grid(streamed.image, whole.image)
        assert streamed.pixels_released and streamed.size == whole.size
        assert streamed.middle_slices().dtype == whole.middle_slices().dtype == middle_type
        assert np.array_equal(streamed.middle_slices(), whole.middle_slices())
        assert streamed.slice_sop_uids == whole.slice_sop_uids and streamed.qc_reasons == whole.qc_reasons
        assert np.array_equal(streamed.slice_positions, whole.slice_positions)
    # The job's preprocessing of it is the whole series' to the bit.
    params = default_params("CT")
    fine = write_dicom_series(make_head("CT", age=60.0, seed=12), tmp_path / "ct", rows=192, cols=192, slices=150,
                              slice_thickness=1.0)
    streamed = load_series(fine, shrink_to_mm=float(params["working_spacing_mm"]))
    assert streamed.shrunk is not None
    one, other = preprocess(streamed, params), preprocess(load_series(fine), params)
    assert np.array_equal(one.model_input, other.model_input) and np.array_equal(one.brain_mask, other.brain_mask)
    assert one.qc_metrics == other.qc_metrics and one.qc_reasons == other.qc_reasons


def test_a_series_that_needs_resampling_or_rescaling_is_decoded_whole(tmp_path, ct_files):
    """A gap in the slices or a fractional rescale slope: shrink_to_mm is declined and the
    volume holds its native voxels as before."""
    gap = [p for k, p in enumerate(ct_files) if k != 30]
    sloped = write_dicom_series(make_head("MR", age=40.0, seed=11), tmp_path / "sloped", rows=64, cols=64, slices=40,
                                slice_thickness=2.0)
    for path in sloped:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = 0.5
        ds.save_as(path)
    for files in (gap, sloped):
        volume = load_series(files, shrink_to_mm=4.0)
        assert volume.shrunk is None and not volume.pixels_released
        assert volume.image.GetNumberOfPixels() == volume.size[0] * volume.size[1] * volume.size[2]


def _labelled_everywhere(native_map: np.ndarray, threshold: float, voxel_ml: float, min_ml: float) -> np.ndarray:
    """The mask as it was computed before: the whole map thresholded and labelled."""
    with np.errstate(invalid="ignore"):
        mask = native_map >= threshold
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    keep = np.bincount(labels.ravel()) * voxel_ml >= min_ml
    keep[0] = False
    return keep[labels]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_region_is_the_mask_labelled_over_the_whole_map(seed):
    rng = np.random.default_rng(seed)
    native_map = rng.random((50, 40, 30), dtype=np.float32) * 0.9
    native_map[10:16, 5:12, 4:9] = 1.5           # a region kept
    native_map[30, 20, 20] = 2.0                 # an isolated voxel: left out
    native_map[44:47, 30:33, 25:28] = 1.2        # a small region at the edge
    native_map[rng.random(native_map.shape) < 0.001] = np.nan
    for min_ml in (0.0, 0.02, 0.5):
        expected = _labelled_everywhere(native_map, 1.0, 0.001, min_ml)
        assert np.array_equal(anomaly_mask(native_map, 1.0, 0.001, min_ml), expected)
        region = anomaly_region(native_map, 1.0, 0.001, min_ml)
        if not expected.any():
            assert region is None
            continue
        assert region is not None
        first, mask = region
        assert np.array_equal(mask, expected[first:first + len(mask)])
        assert not expected[:first].any() and not expected[first + len(mask):].any()
    assert anomaly_region(np.zeros((5, 4, 4), np.float32), 1.0, 0.001) is None


def test_the_seg_references_only_the_slices_it_marks(tmp_path):
    datasets, error = make_ct_series(seed=11)
    error = error * 2.0
    expected = anomaly_mask(error, 1.0, source_voxel_ml(datasets))
    marked = [k for k in range(len(datasets)) if expected[k].any()]
    assert 0 < len(marked) < len(datasets)
    seg = build_segmentation(datasets, error, ct_summary())
    assert seg is not None
    referenced = [item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(str(datasets[k].SOPInstanceUID) for k in marked)
    assert int(seg.NumberOfFrames) == len(marked)
    assert int(np.count_nonzero(seg.pixel_array)) == int(expected.sum())
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_sources_are_cleaned_in_full_only_where_objects_copy_from_them():
    datasets, _ = make_ct_series(seed=4)
    clean = sanitise_sources(datasets, full={0, 7})
    assert len(clean.datasets) == len(datasets)
    for k, ds in enumerate(clean.datasets):
        assert str(ds.SOPInstanceUID) == str(datasets[k].SOPInstanceUID)
        assert list(ds.ImagePositionPatient) == list(datasets[k].ImagePositionPatient)
        assert str(ds.StudyInstanceUID) == str(datasets[0].StudyInstanceUID)
        keywords = {element.keyword for element in ds}
        if k in (0, 7):
            assert "WindowCenter" in keywords or "KVP" in keywords or len(keywords - REFERENCE_KEYWORDS - COPIED) > 0
            assert "PixelData" in keywords
        else:
            assert keywords <= REFERENCE_KEYWORDS | COPIED | {"SpecificCharacterSet"}, keywords - REFERENCE_KEYWORDS
            assert "PixelData" not in keywords


def test_a_reference_copy_holds_what_a_whole_clean_copy_holds_of_those_attributes(tmp_path: Path):
    datasets, _ = make_ct_series(seed=5)
    datasets[3].add_new(0x00091010, "LO", "private")  # never copied
    datasets[3].ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    path = tmp_path / "slice.dcm"
    datasets[3].save_as(path, enforce_file_format=True)
    damage([path], BY_NAME["slice_thickness_bad"], random.Random(0))  # a reference attribute that does not decode
    source = pydicom.dcmread(path, stop_before_pixels=True)
    whole, whole_dropped = clean_header(source, skip=_SHARED)
    reference, reference_dropped = clean_header(source, skip=_SHARED, only=REFERENCE_KEYWORDS)
    expected = [e for e in whole if e.keyword in REFERENCE_KEYWORDS | set(TYPE2)]  # Type 2: present, empty in both
    assert [(e.tag, e.VR, e.value) for e in reference] == [(e.tag, e.VR, e.value) for e in expected]
    assert "SliceThickness" in whole_dropped and reference_dropped == ["SliceThickness"]
    assert {"SOPInstanceUID", "ImagePositionPatient", "ImageType", "Rows"} <= {e.keyword for e in reference}


@pytest.mark.parametrize("full", [{0, 3, 7}, {0}, None])
def test_reference_copies_made_ahead_give_what_sanitising_alone_gives(tmp_path: Path, full: set[int] | None):
    """The pipeline makes the reference-only copies while it maps the anomaly map back to
    the native slices (daemon.pipeline._native_map_with_references); handed to
    sanitise_sources they must give the very datasets and left-out keywords it makes alone."""
    datasets, _ = make_ct_series(seed=5)
    paths = []
    for k, dataset in enumerate(datasets):
        paths.append(tmp_path / f"{k:03d}.dcm")
        dataset.save_as(paths[-1], enforce_file_format=True)
    damage([paths[5]], BY_NAME["slice_thickness_bad"], random.Random(0))  # left out, and reported
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    sources = list(headers)
    sources[3] = pydicom.dcmread(paths[3])  # an overlay slice, read again with its pixels

    def elements(sanitised):
        return [[(e.tag, e.VR, e.value) for e in ds] for ds in sanitised.datasets]

    alone = sanitise_sources(sources, full)
    ahead = sanitise_sources(sources, full, reference_copies(headers))
    assert elements(ahead) == elements(alone)
    assert ahead.dropped == alone.dropped and "SliceThickness" in alone.dropped
    with pytest.raises(ValueError, match="references"):
        sanitise_sources(sources[:-1], full, reference_copies(headers))


def test_a_sweep_that_queues_a_job_wakes_the_workers(tmp_path, db_url: str, db_sessions: sessionmaker[Session]):
    settings = worker_settings(tmp_path, db_url, quiet_period_s=60.0, whole_quiet_s=0.0)
    with db_sessions() as session:
        add_series(session, uid(), 30, now=api.utcnow() - timedelta(seconds=120), spacing=5.0)
    wake = threading.Event()
    assert scheduler.sweep_completeness(settings, db_sessions, list(BUNDLES), wake) != []
    assert wake.is_set()
    wake.clear()
    assert scheduler.sweep_completeness(settings, db_sessions, list(BUNDLES), wake) == []
    assert not wake.is_set()


def test_a_woken_worker_claims_at_once_not_at_its_next_poll(tmp_path, db_url: str,
                                                            db_sessions: sessionmaker[Session],
                                                            monkeypatch: pytest.MonkeyPatch):
    settings = worker_settings(tmp_path, db_url, quiet_period_s=60.0, whole_quiet_s=0.0)
    done = threading.Event()

    def job(*_args: object, **_kwargs: object):
        done.set()
        return outcome(objects=[])

    worker = make_worker(monkeypatch, settings, db_sessions, job)
    wake = threading.Event()
    # A poll far longer than the wait below: only the event can bring the job in time.
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_s": 3600.0, "wake": wake}, daemon=True)
    thread.start()
    try:
        with db_sessions() as session:
            add_series(session, uid(), 30, now=api.utcnow() - timedelta(seconds=120), spacing=5.0)
        assert scheduler.sweep_completeness(settings, db_sessions, list(BUNDLES), wake) != []
        assert done.wait(120), "the woken worker did not take the job"
    finally:
        worker.stopping.set()
        wake.set()
        thread.join(120)
    with db_sessions() as session:
        assert [j.state for j in session.scalars(select(Job))] == [JobState.DONE]
