"""DICOM SEG of the thresholded anomaly map: valid, exact, on the lesion."""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from headscreen.bundle import Bundle, load_bundle
from headscreen.daemon.config import shipped_bundles
from headscreen.daemon.pipeline import _build_results
from headscreen.export.sc import choose_slices
from headscreen.export.seg import (
    DEFAULT_THRESHOLD,
    MIN_CLUSTER_ML,
    SEG_CANDIDATES,
    SEG_HEALTHY_BUDGET_ML,
    SEG_SERIES_DESCRIPTION,
    SEGMENT_LABEL,
    SEGMENT_TRACKING_ID,
    anomaly_mask,
    build_segmentation,
    calibrate_threshold,
    source_voxel_ml,
)
from serve_harness import dciodvfy_errors
from test_export import LESION, ct_summary, make_ct_series

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# make_ct_series' error map peaks at ~1 on the lesion; scaled so that the
# threshold (1.0) cuts a sphere around it: exp(-d^2 / 2r^2) * 2 >= 1.
SCALE = 2.0


@pytest.fixture(scope="module")
def series():
    datasets, error = make_ct_series(seed=11)
    return datasets, error * SCALE


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory, series) -> Path:
    datasets, error = series
    seg = build_segmentation(datasets, error, ct_summary())
    assert seg is not None
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    return path


def test_seg_passes_dciodvfy(seg_file):
    assert dciodvfy_errors(seg_file) == []


def test_seg_mask_equals_thresholded_map(seg_file, series):
    datasets, error = series
    seg = hd.seg.segread(seg_file)
    assert seg.SOPClassUID == SEG_CLASS
    assert seg.SegmentationType == "BINARY"
    expected = anomaly_mask(error, 1.0, source_voxel_ml(datasets))
    source_uids = [str(d.SOPInstanceUID) for d in datasets]
    volume = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids, segment_numbers=[1], ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )[..., 0]
    assert volume.shape == expected.shape
    assert np.array_equal(volume.astype(bool), expected)
    # Only slices with any voxel set become frames.
    assert seg.NumberOfFrames == int(expected.any(axis=(1, 2)).sum()) < len(datasets)


def test_seg_identity_and_labels(seg_file, series):
    datasets, _ = series
    seg = pydicom.dcmread(seg_file)
    source = datasets[0]
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == source.PatientID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SeriesDescription == SEG_SERIES_DESCRIPTION
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == SEGMENT_LABEL
    # What it is and which algorithm made it, in words too; tracked for the SR to name it.
    assert segment.SegmentDescription == "AI-generated anomaly region, ct-anogan 1.2.0"
    assert segment.TrackingID == SEGMENT_TRACKING_ID and segment.TrackingUID
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ct-anogan", "1.2.0")
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "263654008"
    referenced = {
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced <= {str(d.SOPInstanceUID) for d in datasets}


def test_seg_lines_up_with_the_lesion(seg_file, series):
    datasets, _ = series
    seg = pydicom.dcmread(seg_file)
    positions = [float(d.ImagePositionPatient[2]) for d in datasets]
    frame_slices = [positions.index(float(f.PlanePositionSequence[0].ImagePositionPatient[2]))
                    for f in seg.PerFrameFunctionalGroupsSequence]
    pixels = seg.pixel_array.reshape(len(frame_slices), seg.Rows, seg.Columns)
    counts = pixels.sum(axis=(1, 2))
    centre_slice = frame_slices[int(np.argmax(counts))]
    rows, cols = np.nonzero(pixels.sum(axis=0))
    assert abs(centre_slice - LESION[0]) <= 2
    assert abs(rows.mean() - LESION[1]) <= 2 and abs(cols.mean() - LESION[2]) <= 2


def test_empty_map_gives_no_seg(series):
    datasets, error = series
    assert build_segmentation(datasets, error * 0.1, ct_summary()) is None


def test_shape_mismatch_is_rejected(series):
    datasets, error = series
    with pytest.raises(ValueError, match="native_map"):
        build_segmentation(datasets[:-1], error, ct_summary())


def test_build_results_adds_seg_only_when_enabled(tmp_path, series):
    datasets, error = series
    enabled = _build_results(datasets, error, ct_summary(), choose_slices(error, 4), tmp_path / "on", 1.0)
    disabled = _build_results(datasets, error, ct_summary(), choose_slices(error, 4), tmp_path / "off", None)
    empty = _build_results(datasets, error * 0.1, ct_summary(), choose_slices(error, 4), tmp_path / "empty", 1.0)
    assert [o.kind for o in enabled].count("seg") == 1
    assert "seg" not in [o.kind for o in disabled] and "seg" not in [o.kind for o in empty]
    seg_object = next(o for o in enabled if o.kind == "seg")
    assert pydicom.dcmread(seg_object.path).SOPInstanceUID == seg_object.sop_instance_uid
    # The SEG is built first; the SR references its segment, and none when there is no SEG.
    for objects, seg_uid in ((enabled, seg_object.sop_instance_uid), (disabled, None), (empty, None)):
        report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(next(o.path for o in objects if o.kind == "sr")))
        regions = report.content.get_volumetric_roi_measurement_groups()
        assert [g.referenced_segment.referenced_sop_instance_uid for g in regions] == ([seg_uid] if seg_uid else [])


def test_render_seg_overlay_png(seg_file, series):
    """The SEG drawn on the lesion's source slice, for a person to look at."""
    datasets, _ = series
    seg = pydicom.dcmread(seg_file)
    frames = seg.PerFrameFunctionalGroupsSequence
    pixels = seg.pixel_array.reshape(len(frames), seg.Rows, seg.Columns)
    best = int(np.argmax(pixels.sum(axis=(1, 2))))
    uid = str(frames[best].DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
    source = next(d for d in datasets if str(d.SOPInstanceUID) == uid)
    hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    grey = np.clip((hu - 0.0) / 80.0 * 255.0, 0, 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
    region = pixels[best].astype(bool)
    rgb[region] = 0.5 * rgb[region] + 0.5 * np.array([0.0, 255.0, 0.0])
    out = Path(os.environ.get("HEADSCREEN_RENDER_DIR", seg_file.parent)) / "seg-overlay.png"
    Image.fromarray(rgb.astype(np.uint8)).resize((384, 384), Image.NEAREST).save(out)
    assert region.sum() > 0 and out.stat().st_size > 0


def test_regions_under_the_minimum_volume_are_left_out():
    field = np.zeros((20, 20, 20), dtype=np.float32)
    field[2:8, 2:8, 2:8] = 3.0            # 216 voxels: 1.7 mL at 2 mm
    field[15, 15, 15] = 3.0               # one voxel: 0.008 mL
    field[15, 2, 2:4] = 3.0               # two touching voxels, still tiny
    voxel_ml = 0.008
    assert anomaly_mask(field, 1.0).sum() == 216 + 1 + 2  # no voxel size: no filter
    kept = anomaly_mask(field, 1.0, voxel_ml)
    assert kept.sum() == 216 and kept[2:8, 2:8, 2:8].all()
    # Diagonal neighbours belong to one region (26-neighbourhood).
    diagonal = np.zeros((20, 20, 20), dtype=np.float32)
    diagonal[np.arange(20), np.arange(20), np.arange(20)] = 2.0  # 20 voxels, 0.16 mL, corners touching
    assert anomaly_mask(diagonal, 1.0, voxel_ml, min_cluster_ml=0.1).sum() == 20


def test_source_voxel_ml_uses_the_slice_step(series):
    datasets, _ = series
    rows_mm, cols_mm = (float(v) for v in datasets[0].PixelSpacing)
    step = abs(float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2]))
    assert source_voxel_ml(datasets) == pytest.approx(rows_mm * cols_mm * step / 1000.0)
    broken = [pydicom.Dataset()]
    assert source_voxel_ml(broken) is None


def test_seg_threshold_is_calibrated_on_healthy_overlays():
    rng = np.random.default_rng(3)
    voxel_ml = 0.02
    # Healthy overlays: smooth noise whose upper tail crosses 1.0 in sizeable patches.
    overlays = []
    for _ in range(20):
        noise = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 2.0)
        overlays.append((np.clip(noise, 0, None) / noise.std() * 0.45).astype(np.float32))
    threshold = calibrate_threshold(overlays, voxel_ml)
    assert threshold in SEG_CANDIDATES

    def healthy_ml(t: float) -> float:
        return float(np.quantile([anomaly_mask(o, t, voxel_ml).sum() * voxel_ml for o in overlays], 0.95))

    assert healthy_ml(threshold) <= SEG_HEALTHY_BUDGET_ML
    lower = SEG_CANDIDATES[SEG_CANDIDATES.index(threshold) - 1] if threshold != SEG_CANDIDATES[0] else None
    assert lower is None or healthy_ml(lower) > SEG_HEALTHY_BUDGET_ML
    with pytest.raises(ValueError, match="no healthy overlays"):
        calibrate_threshold([], voxel_ml)


def test_site_setting_overrides_the_bundle_seg_threshold():
    bundle = load_bundle(shipped_bundles()[0])
    calibrated = bundle.manifest.calibration.model_copy(update={"seg_threshold": 0.65})
    with_own = Bundle(bundle.path, bundle.manifest.model_copy(update={"calibration": calibrated}))
    assert with_own.seg_threshold() == 0.65
    assert with_own.seg_threshold(1.2) == 1.2
    without = bundle.manifest.calibration.model_copy(update={"seg_threshold": None})
    assert Bundle(bundle.path, bundle.manifest.model_copy(update={"calibration": without})).seg_threshold() \
        == DEFAULT_THRESHOLD
    assert MIN_CLUSTER_ML > 0


def test_a_region_grows_from_its_peak_to_its_edge_and_unseeded_ones_stay_out():
    field = np.zeros((20, 20, 20), dtype=np.float32)
    field[2:10, 2:10, 2:10] = 0.8            # a finding's body: under the threshold
    field[5:7, 5:7, 5:7] = 2.0               # its peak: over it
    field[14:19, 14:19, 14:19] = 0.8         # a shoulder with no peak (healthy noise)
    field[0, 19, 19] = np.nan                # never set
    voxel_ml = 0.008
    assert anomaly_mask(field, 1.0, voxel_ml, min_cluster_ml=0.0).sum() == 8  # no growth: the peak only
    assert anomaly_mask(field, 1.0, voxel_ml).sum() == 0  # ... and 0.064 mL is under the minimum
    grown = anomaly_mask(field, 1.0, voxel_ml, min_cluster_ml=0.0, grow=0.5)
    assert grown.sum() == 512 and grown[2:10, 2:10, 2:10].all()
    # The size filter applies to the grown region: 512 voxels are 4.1 mL.
    assert anomaly_mask(field, 1.0, voxel_ml, min_cluster_ml=5.0, grow=0.5).sum() == 0
    assert anomaly_mask(field, 1.0, voxel_ml, grow=0.5).sum() == 512
    # Only the voxels at the threshold seed: no peak anywhere, nothing at all.
    assert anomaly_mask(np.where(field > 1, 0.8, field), 1.0, voxel_ml, grow=0.5).sum() == 0
    with pytest.raises(ValueError, match="grow"):
        anomaly_mask(field, 1.0, grow=0.0)


def test_grown_regions_are_calibrated_with_their_growth_and_named_in_the_seg(series):
    rng = np.random.default_rng(3)
    overlays = [(np.clip(n := ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 2.0), 0, None)
                 / n.std() * 0.45).astype(np.float32) for _ in range(20)]
    # Growth marks more of each healthy patch: the calibrated seed threshold rises.
    assert calibrate_threshold(overlays, 0.02, grow=0.5) > calibrate_threshold(overlays, 0.02)
    datasets, error = series
    plain = build_segmentation(datasets, error, ct_summary())
    grown = build_segmentation(datasets, error, ct_summary(), grow=0.5)
    assert plain is not None and grown is not None
    frames = [len(s.PerFrameFunctionalGroupsSequence) for s in (plain, grown)]
    assert frames[1] > frames[0]  # the grown region spans more slices

    def parameters(seg: hd.seg.Segmentation) -> str:
        return str(seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters)

    assert "grown_to" not in parameters(plain) and "grown_to=0.5 x healthy limit" in parameters(grown)
    bundle = load_bundle(shipped_bundles()[0])
    assert Bundle(bundle.path, bundle.manifest.model_copy(update={"calibration": bundle.manifest.calibration
                  .model_copy(update={"seg_grow": None})})).seg_grow() == 1.0


def test_a_positive_results_focus_keeps_the_region_under_the_threshold_that_made_it_positive():
    field = np.zeros((20, 20, 20), dtype=np.float32)
    field[2:10, 2:10, 2:10] = 0.8            # a finding under the threshold everywhere
    field[14:19, 14:19, 14:19] = 0.8         # another patch, away from the focus
    field[16, 2, 2] = np.nan
    voxel_ml = 0.008
    focus = ((4, 4, 4), (6, 6, 6))
    assert anomaly_mask(field, 1.0, voxel_ml, min_cluster_ml=0.0, grow=0.5).sum() == 0  # no peak, no focus
    kept = anomaly_mask(field, 1.0, voxel_ml, min_cluster_ml=0.0, grow=0.5, focus=focus)
    assert kept.sum() == 512 and kept[2:10, 2:10, 2:10].all()  # the focused region only
    # The growth level bounds it (without growth: the threshold itself, which nothing reaches)...
    assert anomaly_mask(field, 1.0, voxel_ml, min_cluster_ml=0.0, focus=focus).sum() == 0
    # ... and the minimum region volume still applies (512 voxels are 4.1 mL).
    assert anomaly_mask(field, 1.0, voxel_ml, min_cluster_ml=5.0, grow=0.5, focus=focus).sum() == 0
    # A focus on nothing set, or off the map, adds nothing.
    for elsewhere in (((11, 11, 11), (12, 12, 12)), ((30, 0, 0), (31, 5, 5))):
        assert anomaly_mask(field, 1.0, voxel_ml, min_cluster_ml=0.0, grow=0.5, focus=elsewhere).sum() == 0
    # Beside a region that reaches the threshold, the focused one is added, not swapped in.
    peaked = field.copy()
    peaked[16, 16, 16] = 2.0
    both = anomaly_mask(peaked, 1.0, voxel_ml, min_cluster_ml=0.0, grow=0.5, focus=focus)
    assert both.sum() == 512 + 125 and both[14:19, 14:19, 14:19].all()
    # A focus box reaching past the slices that hold set voxels is clipped to them.
    wide = anomaly_mask(field, 1.0, voxel_ml, min_cluster_ml=0.0, grow=0.5, focus=((0, 4, 4), (19, 5, 5)))
    assert wide.sum() == 512


def test_the_seg_of_a_focused_result_says_so(series):
    datasets, error = series
    plain = build_segmentation(datasets, error, ct_summary(), grow=0.5)
    focused = build_segmentation(datasets, error, ct_summary(), grow=0.5, focus=((0, 0, 0), (1, 1, 1)))
    assert plain is not None and focused is not None

    def parameters(seg: hd.seg.Segmentation) -> str:
        return str(seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters)

    assert "kept_at_focus" not in parameters(plain)
    assert "kept_at_focus=regions at the focal maximum of a positive result" in parameters(focused)
