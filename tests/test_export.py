"""export/: SC overlays and TID 1500 SR built from a synthetic CT series, checked by
read-back, highdicom, dciodvfy and dsr2html; delivery to real SCPs."""

from __future__ import annotations

import dataclasses
import io
import shutil
import socket
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from headscreen.errors import TransientError
from headscreen.export import codes
from headscreen.export.delivery import STATUS_NO_CONTEXT, STATUS_SUCCESS, Destination, send
from headscreen.export.model import AlgorithmInfo, ResultSummary
from headscreen.export.sc import (
    DISCLAIMER,
    NOT_SCREENED_SERIES_DESCRIPTION,
    SERIES_DESCRIPTION,
    OverlayStyle,
    build_not_screened_image,
    build_overlay_series,
    choose_slices,
)
from headscreen.export.sr import build_report
from sr_helpers import ReadBack, evaluations_with_details, qualitative_evaluation_items

N_SLICES, SIZE = 40, 128
LESION = (25, 70, 55)  # slice, row, col
LESION_RADIUS = 6
SLICE_SPACING = 2.5

# --------------------------------------------------------------------------- fixtures


def _ct_slice(k: int, hu: np.ndarray, study: str, series: str, frame: str) -> Dataset:
    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.PatientName, ds.PatientID = "Synthetic^Phantom", "SYN0001"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19580101", "O", "067Y"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20250101", "120000", "ACC1", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 2, k + 1, "Synthetic"
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-64.0, -64.0, k * SLICE_SPACING]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], SLICE_SPACING
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.KVP, ds.AcquisitionNumber = 120, 1
    ds.PixelData = np.clip(np.rint(hu + 1024), -32768, 32767).astype(np.int16).tobytes()
    return ds


def make_ct_series(seed: int = 0) -> tuple[list[Dataset], np.ndarray]:
    """A 40-slice head-like CT (skull ring, brain, a brighter spherical 'lesion')
    and a matching error map (Gaussian around the lesion plus uniform noise)."""
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    centre = SIZE / 2
    ellipse = ((yy - centre) / (SIZE * 0.38)) ** 2 + ((xx - centre) / (SIZE * 0.32)) ** 2
    datasets = []
    for k in range(N_SLICES):
        hu = np.full((SIZE, SIZE), -1000.0)
        hu[ellipse < 1.0] = 1000.0
        hu[ellipse < 0.85] = 30.0
        in_lesion = ((k - LESION[0]) * SLICE_SPACING) ** 2 + (yy - LESION[1]) ** 2 + (xx - LESION[2]) ** 2
        hu[in_lesion < LESION_RADIUS**2] = 75.0
        hu += rng.normal(0.0, 3.0, hu.shape)
        datasets.append(_ct_slice(k, hu, study, series, frame))
    kk, yy3, xx3 = np.mgrid[0:N_SLICES, 0:SIZE, 0:SIZE]
    distance2 = ((kk - LESION[0]) * SLICE_SPACING) ** 2 + (yy3 - LESION[1]) ** 2 + (xx3 - LESION[2]) ** 2
    error = np.exp(-distance2 / (2.0 * LESION_RADIUS**2)).astype(np.float32)
    error += rng.uniform(0.0, 0.05, error.shape).astype(np.float32)
    return datasets, error


ALGO_CT = AlgorithmInfo(name="ct-anogan", version="1.2.0", family="f-AnoGAN 3D", sha256="ab" * 32)
ALGO_MR = AlgorithmInfo(
    name="mr-vae-age", version="0.3.1", family="VAE 3D brain age",
    sha256={"model.onnx": "cd" * 32, "encoder.onnx": "ef" * 32},
)


def ct_summary(**changes) -> ResultSummary:
    values = dict(
        eligible=True, modality="CT", algorithm=ALGO_CT, anomaly_score=0.4123, percentile=97.5,
        screen_positive=True, threshold=0.3, chronological_age=67.0,
        qc_reasons=["skull_defect: skull_coverage 0.2 outside [0.35, 10]", "custom check: snr=3.1"],
        selected_series_uid=None,
    )
    values.update(changes)
    return ResultSummary(**values)


MR_SUMMARY = ResultSummary(
    eligible=True, modality="MR", algorithm=ALGO_MR, anomaly_score=1.75, percentile=42.0,
    screen_positive=False, threshold=2.5, predicted_age=71.4, chronological_age=67.0, age_gap=4.4,
)
NOT_ELIGIBLE = ResultSummary(
    eligible=False, modality="CT", algorithm=ALGO_CT, ineligible_reason="no_suitable_series: no axial head CT",
    qc_reasons=[],
)
# What the pipeline makes of a blocking QC result: two blocking reasons sharing a code, one advisory.
QC_BLOCKED = ResultSummary(
    eligible=False, modality="CT", algorithm=ALGO_CT,
    ineligible_reason="noise_high: noise_sigma 49.3 outside [0, 25]; noise_high: noise_relative 0.9 outside [0, 0.3]",
    ineligible_reasons=("noise_high: noise_sigma 49.3 outside [0, 25]",
                        "noise_high: noise_relative 0.9 outside [0, 0.3]"),
    qc_reasons=["noise_high: noise_sigma 49.3 outside [0, 25]", "noise_high: noise_relative 0.9 outside [0, 0.3]",
                "missing_slices: 1 slice(s) missing in 1 gap(s)"],
    qc_metrics={"noise_sigma": 49.3},
)


@pytest.fixture(scope="module")
def ct_series() -> tuple[list[Dataset], np.ndarray]:
    return make_ct_series()


@pytest.fixture(scope="module")
def ct_overlays(ct_series) -> list[hd.sc.SCImage]:
    datasets, error = ct_series
    return build_overlay_series(datasets, error, ct_summary())


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- SC


def test_default_subset_is_centred_on_the_lesion(ct_series, ct_overlays):
    datasets, error = ct_series
    assert len(ct_overlays) == 24
    indices = choose_slices(error, 24)
    assert LESION[0] in indices and indices == list(range(LESION[0] - 12, LESION[0] + 12))
    referenced = [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in ct_overlays]
    assert referenced == [datasets[k].SOPInstanceUID for k in indices]


def test_choose_slices_stays_inside_the_volume():
    error = np.zeros((30, 4, 4), np.float32)
    error[1] = 1.0
    assert choose_slices(error, 10) == list(range(0, 10))
    error[:] = 0.0
    error[29] = 1.0
    assert choose_slices(error, 10) == list(range(20, 30))
    assert choose_slices(error, 50) == list(range(30))


def test_sc_round_trip_keeps_identity_geometry_and_labels(ct_series, ct_overlays):
    datasets, _ = ct_series
    sc = _round_trip(ct_overlays[0])
    source = datasets[LESION[0] - 12]
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
        assert sc[keyword].value == source[keyword].value, keyword
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.ConversionType == "WSD" and sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription == SERIES_DESCRIPTION and "NOT FOR PRIMARY DIAGNOSIS" in sc.SeriesDescription
    assert sc.SeriesNumber == 9001 and sc.InstanceNumber == 1
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    factor = 3  # 128 columns rendered at >= 384
    assert sc.Columns == SIZE * factor and sc.Rows > SIZE * factor  # legend band below the image
    assert [float(v) for v in sc.PixelSpacing] == pytest.approx([1.0 / factor, 1.0 / factor])
    assert sc.FrameOfReferenceUID == source.FrameOfReferenceUID
    expected_position = np.array([float(v) for v in source.ImagePositionPatient]) - np.array([1 / 3, 1 / 3, 0])
    assert [float(v) for v in sc.ImagePositionPatient] == pytest.approx(list(expected_position), abs=1e-5)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    assert sc.Manufacturer == "headscreen" and sc.ImageComments == DISCLAIMER
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)


def test_sc_names_the_acquisition_equipment_and_highdicoms_memoised_check_answers_as_before(ct_series, ct_overlays):
    # export.sc memoises highdicom's pixel-data check per SOP class: same answers, one walk each.
    import highdicom._standard_utils as standard
    import highdicom.base_content as base_content
    from pydicom.uid import BasicTextSRStorage, MRImageStorage

    memoised = base_content.does_iod_have_pixel_data
    for uid in (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, BasicTextSRStorage):
        assert memoised(uid) == standard.does_iod_have_pixel_data(uid), uid
    assert memoised.cache_info().hits > 0
    datasets, _ = ct_series
    for sc in ct_overlays:
        [acquisition] = [item for item in sc.ContributingEquipmentSequence
                         if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"]  # Acquisition Equipment
        assert acquisition.Manufacturer == datasets[0].Manufacturer == "Synthetic"


def test_reddest_pixels_sit_on_the_lesion(ct_overlays):
    lesion_image = ct_overlays[12]  # subset starts 12 slices before the lesion
    assert lesion_image.SourceImageSequence[0].ReferencedSOPInstanceUID
    factor = 3
    rgb = lesion_image.pixel_array[: SIZE * factor].astype(int)  # image area, without the legend
    redness = rgb[..., 0] - rgb[..., 1]
    rows, cols = np.nonzero(redness >= redness.max() - 2)
    centre = (rows.mean() / factor, cols.mean() / factor)
    assert np.hypot(centre[0] - LESION[1], centre[1] - LESION[2]) <= 2.0
    # Far from the lesion the overlay is transparent: grey pixels (R == G == B).
    corner = rgb[: 20 * factor, : 20 * factor]
    assert np.all(corner[..., 0] == corner[..., 1]) and np.all(corner[..., 1] == corner[..., 2])
    # The slice furthest from the lesion in the subset is less red than the lesion slice.
    far = ct_overlays[0].pixel_array[: SIZE * factor].astype(int)
    assert (far[..., 0] - far[..., 1]).max() < redness.max()


@pytest.mark.parametrize("inverted", [False, True])
def test_overlay_pixels_follow_the_blend_formula_pixel_by_pixel(inverted):
    """The overlay blends by flat index, a channel at a time: every pixel is the formula's,
    (1 - alpha) * grey + alpha * (yellow -> red) rounded, and uncoloured ones stay grey."""
    from headscreen.export.sc import OverlayStyle, render_overlay

    rng = np.random.default_rng(3)
    values = rng.random((96, 80), dtype=np.float32) * 400 - 150
    error = np.where(rng.random((96, 80)) < 0.3, rng.random((96, 80), dtype=np.float32) * 3, 0).astype(np.float32)
    error[0, :6] = [np.nan, np.inf, -np.inf, 1.0, 1.0000001, 2.5]  # at and past the bounds
    style = OverlayStyle()
    window, (e_lo, e_hi) = (-20.0, 100.0), (1.0, 2.0)
    rgb = render_overlay(values, error, window, (e_lo, e_hi), style, inverted)
    grey = np.clip((values.astype(np.float64) - window[0]) / (window[1] - window[0]), 0, 1)
    grey = (1 - grey if inverted else grey) * 255
    a_lo, a_hi = style.alpha_range
    for (row, column), e in np.ndenumerate(error):
        g = grey[row, column]
        if not e > e_lo:
            assert list(rgb[row, column]) == [round(g)] * 3
            continue
        level = min(max((e - e_lo) / (e_hi - e_lo), 0.0), 1.0)
        alpha = a_lo + level * (a_hi - a_lo)
        expected = [(1 - alpha) * g + alpha * c for c in (255.0, 255.0 * (1 - level), 0.0)]
        assert np.all(np.abs(rgb[row, column].astype(float) - expected) <= 0.5 + 1e-3), (row, column)
    assert (rgb[..., 0] > rgb[..., 2]).sum() > 0.1 * error.size  # a good part is coloured


def test_fixed_colour_bounds_are_used_without_reading_the_map():
    """The pipeline fixes the scale (1 to 3 healthy limits): the map is not sampled for it."""
    from headscreen.export.sc import OverlayStyle, _error_bounds
    from headscreen.imaging.native_map import DenseMap

    class Unsampled(DenseMap):
        def sample(self, step: int) -> np.ndarray:
            raise AssertionError("sampled")

    values = np.linspace(0.0, 5.0, 4 ** 3).reshape(4, 4, 4)
    assert _error_bounds(Unsampled(values), OverlayStyle(error_lower=1.0, error_upper=3.0)) == (1.0, 3.0)
    with pytest.raises(AssertionError, match="sampled"):  # bounds from the study's own map
        _error_bounds(Unsampled(values), OverlayStyle(error_lower=1.0))
    lower, upper = _error_bounds(DenseMap(values), OverlayStyle(error_lower=1.0))
    assert lower == 1.0 and upper == pytest.approx(np.percentile(values, 99.99))


def test_legend_carries_results_but_no_patient_identity(ct_series):
    from headscreen.export.sc import _legend_lines

    datasets, _ = ct_series
    lines = " ".join(text for text, _ in _legend_lines(MR_SUMMARY, (0.1, 0.9), "slice 1/40"))
    for fragment in ("AI-GENERATED - NOT FOR PRIMARY DIAGNOSIS", "Anomaly score 1.75 (",
                     "42nd percentile of healthy reference", "negative", "+4.4 y", "mr-vae-age 0.3.1"):
        assert fragment in lines, fragment
    for identity in (str(datasets[0].PatientName), datasets[0].PatientID, "Synthetic", "1958"):
        assert identity not in lines
    assert lines.isascii()


@pytest.mark.parametrize("n, text", [(0, "0th"), (1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                     (12, "12th"), (13, "13th"), (21, "21st"), (22, "22nd"), (23, "23rd"),
                                     (101, "101st"), (111, "111th"), (112, "112th")])
def test_ordinals_are_english(n, text):
    from headscreen.export.sc import ordinal

    assert ordinal(n) == text


@pytest.mark.parametrize("value, text", [(79.2, "percentile 79.2"), (79.0, "79th percentile"), (1.0, "1st percentile"),
                                         (42.04, "42nd percentile"), (99.96, "100th percentile"),
                                         (12.0, "12th percentile"), (0.5, "percentile 0.5")])
def test_percentiles_never_get_a_suffix_on_a_decimal(value, text):
    from headscreen.export.sc import percentile_phrase

    assert percentile_phrase(value) == text


def test_legend_states_the_colour_scale_and_its_unit():
    from headscreen.export.sc import _legend_lines

    summary = dataclasses.replace(MR_SUMMARY, percentile=79.2)
    z = [text for text, _ in _legend_lines(summary, (1.0, 3.0), "slice 1/40")]
    assert "Anomaly score 1.75 (percentile 79.2 of healthy reference)" in z
    assert not any("79.2th" in t for t in z)
    assert "Colour: 1 (yellow) to 3 (red), uncoloured below 1  slice 1/40" in z
    # The map's unit: the normative z-map over the healthy limit (headscreen.scores), or the raw error.
    assert ("Unit: positive z-score in multiples of the healthy limit, the z that 99.9% of healthy brain voxels "
            "stay below") in z
    error = [text for text, _ in _legend_lines(summary, (1.0, 3.0), "slice 1/40", map_unit="error")]
    assert ("Unit: voxel error in multiples of the healthy limit, the error that 99% of healthy voxels stay below"
            in error)
    one_sided = [text for text, _ in _legend_lines(summary, (1.0, 3.0), "slice 1/40", map_unit="z_one_sided")]
    assert any("less its mirror image's" in t and "healthy limit" in t for t in one_sided)


def test_legends_drawn_from_a_shared_band_have_the_pixels_of_legends_drawn_whole():
    from headscreen.export.sc import _add_legend, _legend_lines, _line_strip

    image = np.zeros((256, 320, 3), np.uint8)
    positive = ct_summary(qc_reasons=["header_values_dropped: PatientBirthDate (not decodable)"])
    for summary, width in [(MR_SUMMARY, 320), (MR_SUMMARY, 1024), (positive, 512), (positive, 700)]:
        image = np.zeros((64, width, 3), np.uint8)
        pasted = _line_strip.cache_info().hits + _line_strip.cache_info().misses
        for k in (1, 2, 40, 300):
            lines = _legend_lines(summary, (1.0, 3.0), f"slice {k}/300")
            shared = _add_legend(image, lines, per_slice=2)
            # Nothing shared, nothing cached, every line drawn in place.
            whole = _add_legend(image, lines, per_slice=len(lines), reuse_lines=False)
            assert shared.shape == whole.shape and shared.shape[0] > image.shape[0]
            np.testing.assert_array_equal(shared, whole)
        # The slice's own lines were pasted from strips (the colour line, the unit line).
        assert _line_strip.cache_info().hits + _line_strip.cache_info().misses >= pasted + 4 * 2
    first, last = (_add_legend(image, _legend_lines(MR_SUMMARY, (1.0, 3.0), f"slice {k}/40"), per_slice=2)
                   for k in (1, 40))
    assert not np.array_equal(first, last)  # each slice still names itself


def test_legend_says_in_words_when_there_is_no_score():
    from headscreen.export.sc import _legend_lines

    summary = ct_summary(anomaly_score=float("nan"), percentile=None, screen_positive=None, qc_reasons=[])
    lines = _legend_lines(summary, (1.0, 3.0), "slice 1/40")
    assert ("No anomaly score: the model gave no valid number", True) in lines
    assert ("No screen result: absence of findings is NOT implied", True) in lines
    assert not any(t.startswith("Anomaly score") or t.startswith("Screen result") for t, _ in lines)


def test_overlay_names_its_unit_and_refuses_an_unknown_one(ct_series):
    datasets, error = ct_series
    [z] = build_overlay_series(datasets, error, ct_summary(), slice_indices=[25])
    [raw] = build_overlay_series(datasets, error, ct_summary(), slice_indices=[25], map_unit="error")
    assert "positive z-map" in z.DerivationDescription and "voxel error map" in raw.DerivationDescription
    [one_sided] = build_overlay_series(datasets, error, ct_summary(), slice_indices=[25], map_unit="z_one_sided")
    assert "one-sided positive z-map" in one_sided.DerivationDescription
    with pytest.raises(ValueError, match="map_unit"):
        build_overlay_series(datasets, error, ct_summary(), slice_indices=[25], map_unit="hu")


def test_explicit_slices_and_style(ct_series):
    datasets, error = ct_series
    images = build_overlay_series(
        datasets, error, ct_summary(), slice_indices=[3, 25], series_number=42,
        style=OverlayStyle(min_render_width=128, copy_plane_geometry=False),
    )
    assert [im.InstanceNumber for im in images] == [1, 2]
    assert {im.SeriesNumber for im in images} == {42} and len({im.SeriesInstanceUID for im in images}) == 1
    assert images[1].SourceImageSequence[0].ReferencedSOPInstanceUID == datasets[25].SOPInstanceUID
    assert images[0].Columns == SIZE and "ImagePositionPatient" not in images[0]
    assert len(build_overlay_series(datasets, error, ct_summary(), max_slices=5)) == 5


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"error_map_native": np.zeros((39, SIZE, SIZE))}, "error_map_native"),
        ({"error_map_native": np.zeros((N_SLICES, SIZE, 64))}, "error_map_native"),
        ({"slice_indices": [40]}, "slice_indices"),
        ({"slice_indices": []}, "slice_indices"),
        ({"max_slices": 0}, "max_slices"),
    ],
)
def test_overlay_rejects_bad_arguments(ct_series, kwargs, argument):
    datasets, error = ct_series
    call = {"source_datasets": datasets, "error_map_native": error, "summary": ct_summary(), **kwargs}
    with pytest.raises(ValueError, match=argument):
        build_overlay_series(**call)


def test_mr_overlay_uses_a_percentile_window(ct_series):
    datasets, error = ct_series
    k, row, col = LESION[0], 64, 95  # a brain pixel far from the lesion: no overlay colour
    mr = build_overlay_series(datasets, error, MR_SUMMARY, slice_indices=[k])[0].pixel_array
    ct = build_overlay_series(datasets, error, ct_summary(), slice_indices=[k])[0].pixel_array
    values = datasets[k].pixel_array.astype(float) - 1024.0
    lo, hi = np.percentile(values[values > 0], (1.0, 99.5))
    expected = np.clip((values[row, col] - lo) / (hi - lo), 0, 1) * 255
    assert mr[row * 3, col * 3] == pytest.approx([expected] * 3, abs=1)
    ct_expected = np.clip(values[row, col] / 80.0, 0, 1) * 255  # W80/L40 -> [0, 80] HU
    assert ct[row * 3, col * 3] == pytest.approx([ct_expected] * 3, abs=1)


# --------------------------------------------------------------------------- SR


def _all_text(ds: Dataset) -> str:
    """Every value in the dataset, nested sequences included, untruncated."""
    return "\n".join(str(element.value) for element in ds.iterall() if element.VR != "SQ")


def _group(sr_dataset: Dataset) -> ReadBack:
    """The one measurement group, and the report's qualitative evaluations (sr_helpers)."""
    return ReadBack(hd.sr.Comprehensive3DSR.from_dataset(sr_dataset))


def _measured(group) -> dict[str, tuple[float, str]]:
    return {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}


def _evaluated(group: ReadBack) -> dict[str, list[str]]:
    """Concept code -> value codes of the coded evaluations, in order."""
    found: dict[str, list[str]] = {}
    for concept, value, _ in evaluations_with_details(group.evaluation_items):
        found.setdefault(concept, []).append(value)
    return found


def _coded_items(group: ReadBack, concept) -> list:
    return [item for item in group.evaluation_items
            if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == concept.value]


def test_sr_measurements_equal_the_summary_ct(ct_series, ct_overlays):
    datasets, _ = ct_series
    summary = ct_summary()
    sr = _round_trip(build_report(datasets, summary, ct_overlays))
    group = _group(sr)
    assert _measured(group) == {
        codes.ANOMALY_SCORE.value: (pytest.approx(0.4123), "{score}"),
        codes.ANOMALY_PERCENTILE.value: (pytest.approx(97.5), "%"),
        codes.OPERATING_THRESHOLD.value: (pytest.approx(0.3), "{score}"),
        codes.CHRONOLOGICAL_AGE.value: (pytest.approx(67.0), "a"),
    }
    evaluations = _evaluated(group)
    assert evaluations[codes.ELIGIBILITY.value] == [codes.ELIGIBLE.value]
    assert evaluations[codes.SCREEN_RESULT.value] == [codes.SCREEN_POSITIVE.value]
    # Absent values are stated, not silently dropped; brain age is never a CODE item's concept.
    assert evaluations[codes.MEASUREMENT_ABSENT.value] == [codes.PREDICTED_BRAIN_AGE.value, codes.BRAIN_AGE_GAP.value]
    assert codes.PREDICTED_BRAIN_AGE.value not in evaluations and codes.BRAIN_AGE_GAP.value not in evaluations
    assert evaluations[codes.QC_ISSUE.value] == ["HS0111", "HS0199"]
    meanings = [item.ConceptCodeSequence[0].CodeMeaning for item in _coded_items(group, codes.QC_ISSUE)]
    assert meanings == ["Skull defect (bone missing from the vault)", "custom check: snr=3.1"]
    # Numbers only in the measurement group, evaluations only in the report-level container
    # (highdicom counts the group's Algorithm Family as a qualitative evaluation).
    assert {e.name.value for e in group.get_qualitative_evaluations()} <= {"111000"}
    assert "Not available: Predicted brain age, Brain age gap." in _all_text(sr)
    assert all(item.ValueType in ("CODE", "TEXT") for item in group.evaluation_items)
    assert _reason_details(sr, codes.QC_ISSUE) == [
        ("HS0111", "skull_defect: skull_coverage 0.2 outside [0.35, 10]"), ("HS0199", "custom check: snr=3.1")]
    assert sr.StudyInstanceUID == datasets[0].StudyInstanceUID and sr.PatientID == datasets[0].PatientID
    assert sr.SeriesNumber == 9002 and sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    # No row per slice: the evidence sequence below lists the series' instances.
    assert group.source_images == []
    assert not [e for e in sr.iterall() if e.keyword == "ValueType" and e.value == "IMAGE"]
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert {sc.SOPInstanceUID for sc in ct_overlays} <= evidence
    assert {d.SOPInstanceUID for d in datasets} <= evidence


def test_sr_records_algorithm_identity_and_observer(ct_series):
    datasets, _ = ct_series
    sr = build_report(datasets, dataclasses.replace(MR_SUMMARY, modality="CT"), [])
    text = _all_text(_round_trip(sr))
    for fragment in ("mr-vae-age", "0.3.1", "model.onnx sha256:" + "cd" * 32, "encoder.onnx sha256:" + "ef" * 32,
                     "Algorithm Name", "Algorithm Version", "Device Observer Name", "HS0031"):
        assert fragment in text, fragment
    # Not a TID 4019 row: the manufacturer is the SR's Manufacturer and the device observer's.
    assert "Algorithm Manufacturer" not in text and sr.Manufacturer == "headscreen"
    assert sr.ManufacturerModelName == "mr-vae-age" and sr.SoftwareVersions == "0.3.1"


def test_sr_measurements_equal_the_summary_mr(ct_series):
    datasets, _ = ct_series
    group = _group(_round_trip(build_report(datasets, MR_SUMMARY, [])))
    measured = _measured(group)
    assert measured[codes.PREDICTED_BRAIN_AGE.value] == (pytest.approx(71.4), "a")
    assert measured[codes.BRAIN_AGE_GAP.value] == (pytest.approx(4.4), "a")
    assert measured[codes.ANOMALY_SCORE.value] == (pytest.approx(1.75), "{score}")
    assert _evaluated(group)[codes.SCREEN_RESULT.value] == [codes.SCREEN_NEGATIVE.value]
    assert codes.QC_ISSUE.value not in _evaluated(group)


def test_non_finite_values_are_reported_absent(ct_series):
    datasets, _ = ct_series
    summary = ct_summary(anomaly_score=float("nan"), percentile=float("inf"))
    group = _group(_round_trip(build_report(datasets, summary, [])))
    assert codes.ANOMALY_SCORE.value not in _measured(group)
    assert _evaluated(group)[codes.MEASUREMENT_ABSENT.value] == [
        codes.ANOMALY_SCORE.value, codes.ANOMALY_PERCENTILE.value, codes.PREDICTED_BRAIN_AGE.value,
        codes.BRAIN_AGE_GAP.value]


def _reason_details(sr: Dataset, concept) -> list[tuple[str, str]]:
    """(value code, detail text after it) of every `concept` item of the qualitative evaluations."""
    return [(value, detail) for name, value, detail in evaluations_with_details(qualitative_evaluation_items(sr))
            if name == concept.value]


def test_not_eligible_sr_says_so_and_why(ct_series):
    datasets, _ = ct_series
    sr = _round_trip(build_report(datasets, NOT_ELIGIBLE, []))
    group = _group(sr)
    assert _measured(group) == {}
    evaluations = _evaluated(group)
    assert evaluations[codes.ELIGIBILITY.value] == [codes.NOT_ELIGIBLE.value]
    assert evaluations[codes.NOT_ELIGIBLE_REASON.value] == ["HS0109"]
    # "Screen result = Absent" would read as "no anomaly": no screen result item at all.
    assert codes.SCREEN_RESULT.value not in evaluations and codes.QC_ISSUE.value not in evaluations
    text = _all_text(sr)
    assert "no axial head CT" in text and "NOT ELIGIBLE" in text


def test_qc_blocked_sr_gives_every_reason_with_its_text(ct_series):
    datasets, _ = ct_series
    sr = _round_trip(build_report(datasets, QC_BLOCKED, []))
    group = _group(sr)
    assert _measured(group) == {}
    evaluations = _evaluated(group)
    assert evaluations[codes.ELIGIBILITY.value] == [codes.NOT_ELIGIBLE.value]
    for concept in (codes.SCREEN_RESULT, codes.ANOMALY_SCORE, codes.ANOMALY_PERCENTILE, codes.OPERATING_THRESHOLD,
                    codes.PREDICTED_BRAIN_AGE, codes.BRAIN_AGE_GAP, codes.MEASUREMENT_ABSENT, codes.HEALTHY_REFERENCE):
        assert concept.value not in evaluations, concept.meaning
    assert _reason_details(sr, codes.NOT_ELIGIBLE_REASON) == [
        ("HS0106", "noise_high: noise_sigma 49.3 outside [0, 25]"),
        ("HS0106", "noise_high: noise_relative 0.9 outside [0, 0.3]"),
    ]
    assert _reason_details(sr, codes.QC_ISSUE) == [("HS0120", "missing_slices: 1 slice(s) missing in 1 gap(s)")]


def test_not_eligible_summary_cannot_carry_a_score():
    with pytest.raises(ValueError, match="anomaly_score, percentile"):
        dataclasses.replace(QC_BLOCKED, anomaly_score=0.5, percentile=99.0)
    with pytest.raises(ValueError, match="screen_positive"):
        dataclasses.replace(NOT_ELIGIBLE, screen_positive=False)


def test_not_screened_image_shows_the_slice_in_grey_and_the_reason(ct_series):
    datasets, _ = ct_series
    sc = _round_trip(build_not_screened_image(datasets[20], QC_BLOCKED))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.SeriesDescription == NOT_SCREENED_SERIES_DESCRIPTION
    assert sc.PhotometricInterpretation == "MONOCHROME2" and sc.SamplesPerPixel == 1 and sc.BitsAllocated == 8
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY", "OTHER"] and sc.BurnedInAnnotation == "YES"
    assert sc.ImageComments.startswith("NOT SCREENED: High image noise") and "Not for diagnosis" in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == datasets[20].SOPInstanceUID
    assert sc.StudyInstanceUID == datasets[20].StudyInstanceUID and sc.PatientID == datasets[20].PatientID
    assert sc.SeriesInstanceUID != datasets[20].SeriesInstanceUID
    pixels = sc.pixel_array
    factor = sc.Columns // SIZE
    assert pixels.ndim == 2 and sc.Rows > SIZE * factor  # the slice, then the text band
    # Brain-window grey of the source: the skull ring saturates white, air is black.
    assert pixels[: SIZE * factor].max() == 255 and pixels[0, 0] == 0
    for identity in (str(datasets[0].PatientName), datasets[0].PatientID, "1958"):
        assert identity not in sc.ImageComments and identity not in sc.DerivationDescription


def test_not_screened_image_without_pixels_is_a_text_card(ct_series):
    datasets, _ = ct_series
    header = pydicom.dcmread(io.BytesIO(_bytes(datasets[0])), stop_before_pixels=True)
    odd = dataclasses.replace(NOT_ELIGIBLE, ineligible_reason="Smith^John: free text from somewhere")
    sc = _round_trip(build_not_screened_image(header, odd))
    assert "SourceImageSequence" not in sc and sc.pixel_array.ndim == 2
    # Free text is never burnt in: only our own words.
    assert sc.ImageComments.startswith("NOT SCREENED: the series could not be analysed")
    with pytest.raises(ValueError, match="eligible"):
        build_not_screened_image(header, ct_summary())


def test_not_eligible_study_gets_no_coloured_overlay(ct_series):
    datasets, error = ct_series
    with pytest.raises(ValueError, match="not eligible"):
        build_overlay_series(datasets, error, QC_BLOCKED, slice_indices=[20])


def test_sr_from_headers_missing_type2_attributes(ct_series):
    datasets, _ = ct_series
    headers = []
    for ds in datasets[:3]:
        header = pydicom.dcmread(io.BytesIO(_bytes(ds)), stop_before_pixels=True)
        del header.AccessionNumber, header.ReferringPhysicianName
        headers.append(header)
    sr = _round_trip(build_report(headers, NOT_ELIGIBLE, []))
    assert sr.AccessionNumber == "" and sr.PatientID == "SYN0001"


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_report_rejects_mixed_studies(ct_series, ct_overlays):
    datasets, _ = ct_series
    other, other_error = make_ct_series(seed=1)
    foreign = build_overlay_series(other, other_error, ct_summary(), slice_indices=[0])
    with pytest.raises(ValueError, match="sc_datasets"):
        build_report(datasets, ct_summary(), [*ct_overlays[:1], *foreign])
    with pytest.raises(ValueError, match="source_datasets"):
        build_report([], ct_summary(), [])


@pytest.mark.parametrize(
    ("reason", "value"),
    [
        ("registration_poor: head_dice 0.62 outside [0.85, 1]", "HS0101"),
        ("no suitable series: 1.2.3 not axial", "HS0109"),
        ("chronological_age_absent", "HS0110"),
        ("chronological age absent: anomaly score excludes the age-gap term", "HS0110"),
        ("qc_out_of_range: foo 3 outside [0, 1]", "HS0108"),
        ("skull_defect: skull_coverage 0.01 outside [0.35, 10]", "HS0111"),
        ("brain_age_implausible: estimate 150 years outside 0-120, not reported", "HS0112"),
        ("orientation_flipped: head upside down", "HS0113"),
        ("not_a_head: head_similarity 0.1 outside [0.5, 1]", "HS0114"),
        ("brain_extraction_failed: empty mask", "HS0115"),
        ("registration_failed: no convergence", "HS0116"),
        ("insufficient_coverage: volume extent 40 mm < 80 mm", "HS0117"),
        ("modality_mismatch: preprocessing is for CT, the series is MR", "HS0118"),
        ("geometry_assumed: multi-frame object without plane position/orientation", "HS0119"),
        ("missing_slices: 2 slice(s) missing in 1 gap(s)", "HS0120"),
        ("uneven_slice_spacing: 3 step(s) deviate", "HS0121"),
        ("gantry_tilt: 12.0 deg (resampled to an orthogonal grid)", "HS0122"),
        ("something new", "HS0199"),
    ],
)
def test_qc_reason_codes(reason, value):
    code = codes.qc_reason_code(reason)
    assert code.value == value and code.scheme_designator == codes.PRIVATE_SCHEME and len(code.meaning) <= 64


# --------------------------------------------------------------------------- validators


def test_every_object_passes_dciodvfy(tmp_path, ct_series, ct_overlays):
    datasets, error = ct_series
    objects = {f"sc-{i}": sc for i, sc in enumerate(ct_overlays)}
    objects["sr-ct"] = build_report(datasets, ct_summary(), ct_overlays)
    objects["sr-mr"] = build_report(datasets, MR_SUMMARY, [])
    objects["sr-not-eligible"] = build_report(datasets, NOT_ELIGIBLE, [])
    objects["sc-not-screened"] = build_not_screened_image(datasets[20], QC_BLOCKED)
    objects["sc-not-screened-card"] = build_not_screened_image(
        pydicom.dcmread(io.BytesIO(_bytes(datasets[0])), stop_before_pixels=True), NOT_ELIGIBLE)
    objects["sr-qc-blocked"] = build_report(datasets, QC_BLOCKED, [objects["sc-not-screened"]])
    objects["sc-mr"] = build_overlay_series(datasets, error, MR_SUMMARY, slice_indices=[25])[0]
    failures = {}
    for name, ds in objects.items():
        errors = _dciodvfy_errors(_write(ds, tmp_path / f"{name}.dcm"))
        if errors:
            failures[name] = errors
    assert failures == {}


def test_dsr2html_renders_scores_and_ineligibility(tmp_path, ct_series, ct_overlays):
    datasets, _ = ct_series
    for name, summary, expected in (
        ("eligible", ct_summary(), ["0.4123", "Anomaly score", "Positive", "Predicted brain age",
                                    "Not available: Predicted brain age, Brain age gap."]),
        ("not-eligible", NOT_ELIGIBLE, ["Not eligible", "no axial head CT"]),
        ("qc-blocked", QC_BLOCKED, ["Not eligible", "High image noise", "noise_relative 0.9", "Missing slices"]),
    ):
        path = _write(build_report(datasets, summary, ct_overlays if summary.eligible else []),
                      tmp_path / f"{name}.dcm")
        html = tmp_path / f"{name}.html"
        run = subprocess.run(["dsr2html", str(path), str(html)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        content = html.read_text(errors="replace")
        for fragment in expected:
            assert fragment in content, (name, fragment)
        if not summary.eligible:
            # Nothing that reads as a result: no "Absent" screen result, no score.
            for fragment in ("Absent", "Not available", "Predicted brain age", "Anomaly score"):
                assert fragment not in content, (name, fragment)


# --------------------------------------------------------------------------- delivery


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def result_files(tmp_path, ct_series, ct_overlays) -> list[Path]:
    datasets, _ = ct_series
    paths = [_write(sc, tmp_path / f"sc-{i:03d}.dcm") for i, sc in enumerate(ct_overlays[:5])]
    paths.append(_write(build_report(datasets, ct_summary(), ct_overlays[:5]), tmp_path / "sr.dcm"))
    return paths


def _start_scp(received: list[str], contexts: list) -> tuple[object, int]:
    def on_store(event: evt.Event, sink: list[str]) -> int:
        sink.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="TESTPACS")
    for context in contexts:
        ae.add_supported_context(context)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store, [received])])
    return server, server.server_address[1]


def test_send_delivers_every_object_to_a_pynetdicom_scp(result_files):
    received: list[str] = []
    server, port = _start_scp(received, [SecondaryCaptureImageStorage, Comprehensive3DSRStorage])
    try:
        statuses = send(Destination("test", "TESTPACS", "127.0.0.1", port), result_files, timeout=10)
    finally:
        server.shutdown()
    assert statuses == {p: STATUS_SUCCESS for p in result_files}
    expected = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in result_files]
    assert received == expected


def test_send_streams_each_file_as_stored(monkeypatch, result_files):
    """The bytes that arrive are the file's data set as stored, and no file is parsed on
    the way out (pynetdicom would otherwise read each whole and encode it again)."""
    import pynetdicom.association
    from pydicom.filereader import read_preamble
    from pynetdicom import _config
    from pynetdicom.dsutils import split_dataset

    def no_parsing(*_args, **_kwargs):
        raise AssertionError("send_c_store parsed a result file")

    monkeypatch.setattr(pynetdicom.association, "dcmread", no_parsing)
    arrived: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        arrived[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title="TESTPACS")
    for context in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage):
        # As stored: pynetdicom's default would pick implicit VR, which needs a conversion.
        ae.add_supported_context(context, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        statuses = send(Destination("test", "TESTPACS", "127.0.0.1", server.server_address[1]), result_files,
                        timeout=10)
    finally:
        server.shutdown()
    assert statuses == {p: STATUS_SUCCESS for p in result_files}
    assert _config.STORE_SEND_CHUNKED_DATASET is False  # pynetdicom's switch is left as it was
    for path in result_files:
        _, offset = split_dataset(path)
        with path.open("rb") as stored:
            read_preamble(stored, False)
            stored.seek(offset)
            as_stored = stored.read()
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert arrived[uid] == as_stored


def _pdata_received(result_files: list[Path], max_pdu: int, direct: bool, monkeypatch) -> tuple[list[bytes], int]:
    """The P-DATA PDUs a pynetdicom SCP (accepting PDUs of `max_pdu`, 0: any) received
    while `send` delivered the files, and how many P-DATA primitives our side handed to
    pynetdicom's DUL to send; `direct` False sends without send_stored_files_directly."""
    import pynetdicom.dul

    from headscreen.export import delivery

    if not direct:
        handlers = [h for h in delivery.requestor_handlers() if h[1] is not delivery.send_stored_files_directly]
        monkeypatch.setattr(delivery, "requestor_handlers", lambda: handlers)
    queued: list[object] = []
    original_send_pdu = pynetdicom.dul.DULServiceProvider.send_pdu

    def counting_send_pdu(self, primitive):  # type: ignore[no-untyped-def]
        if self.assoc.is_requestor and type(primitive).__name__ == "P_DATA":
            queued.append(primitive)
        return original_send_pdu(self, primitive)

    monkeypatch.setattr(pynetdicom.dul.DULServiceProvider, "send_pdu", counting_send_pdu)
    received: list[bytes] = []

    def on_data(event: evt.Event) -> None:
        if event.data[:1] == b"\x04":
            received.append(bytes(event.data))

    ae = AE(ae_title="TESTPACS")
    ae.maximum_pdu_size = max_pdu
    for context in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage):
        ae.add_supported_context(context, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_DATA_RECV, on_data), (evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        statuses = send(Destination("test", "TESTPACS", "127.0.0.1", server.server_address[1]), result_files,
                        timeout=10)
    finally:
        server.shutdown()
        monkeypatch.undo()
    assert statuses == {p: STATUS_SUCCESS for p in result_files}
    return received, len(queued)


@pytest.mark.parametrize("max_pdu", [4096, 16384, 0])
def test_stored_files_are_framed_and_written_directly_with_the_bytes_pynetdicom_sends(
        monkeypatch, result_files, max_pdu):
    """A C-STORE of a stored file is framed into P-DATA PDUs and written to the socket by
    the sender, not queued PDU by PDU for pynetdicom's DUL thread, and the peer receives
    the very PDUs pynetdicom sends: the same fragments, headers and message control bits,
    whatever maximum PDU length the peer accepts (0: no limit, one PDU per part)."""
    direct, queued_direct = _pdata_received(result_files, max_pdu, True, monkeypatch)
    general, queued_general = _pdata_received(result_files, max_pdu, False, monkeypatch)
    assert queued_direct == 0 and queued_general == len(general)
    assert direct == general
    if max_pdu:
        assert max(len(pdu) for pdu in direct) == max_pdu + 6
        assert len(direct) > 2 * len(result_files)  # the data sets were fragmented
    else:
        assert len(direct) == 2 * len(result_files)  # a command and a data set each


def test_the_direct_write_gives_up_when_the_peer_takes_nothing_and_reports_a_closed_peer():
    """The sender writes without blocking the socket the DUL thread reads, waiting for room
    at most the network timeout; a peer that closed gives an OSError (the association then
    ends as pynetdicom's own send ends it)."""
    from headscreen.export import delivery

    sender, peer = socket.socketpair()
    try:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            delivery._send_all(sender, bytearray(8 * 1024 * 1024), timeout=0.3)
        assert time.monotonic() - started >= 0.3
        peer.close()
        with pytest.raises(OSError):
            delivery._send_all(sender, bytearray(8 * 1024 * 1024), timeout=5)
    finally:
        sender.close()
        peer.close()


def test_send_sets_tcp_nodelay_and_acknowledges_what_it_reads_at_once(monkeypatch, result_files):
    from headscreen.export import delivery

    seen: list[tuple[int, type]] = []
    original = delivery.prompt_connection

    def observe(event: evt.Event) -> None:
        original(event)
        seen.append((event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                     type(event.assoc.dul.socket)))

    monkeypatch.setattr(delivery, "prompt_connection", observe)
    received: list[str] = []
    server, port = _start_scp(received, [SecondaryCaptureImageStorage])
    try:
        statuses = send(Destination("test", "TESTPACS", "127.0.0.1", port), result_files[:2], timeout=10)
    finally:
        server.shutdown()
    assert seen == [(1, delivery._PromptAckSocket)] and len(received) == 2
    assert list(statuses.values()) == [STATUS_SUCCESS, STATUS_SUCCESS]


def test_each_read_asks_for_an_immediate_acknowledgement():
    """Linux leaves quick-ACK mode by itself, so it is asked for before every read (a
    peer with Nagle's algorithm on otherwise waits ~40 ms for each response's second half)."""
    from headscreen.export import delivery

    class RecordingSocket:
        def __init__(self, data: bytes) -> None:
            self.data, self.calls = data, []

        def setsockopt(self, level: int, option: int, value: int) -> None:
            self.calls.append(("setsockopt", level, option, value))

        def recv(self, count: int) -> bytes:
            chunk, self.data = self.data[:count], self.data[count:]
            self.calls.append(("recv", count))
            return chunk

    prompt = object.__new__(delivery._PromptAckSocket)  # as prompt_connection makes it of pynetdicom's
    prompt.socket = RecordingSocket(bytes(range(256)) * 40)
    assert prompt.recv(6) == bytes(range(6))
    assert prompt.recv(5000) == (bytes(range(256)) * 40)[6:5006]
    quick_ack = ("setsockopt", socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    assert prompt.socket.calls == [quick_ack, ("recv", 6), quick_ack, ("recv", 4096), ("recv", 904)]


def test_send_reports_objects_the_peer_does_not_accept(result_files):
    received: list[str] = []
    server, port = _start_scp(received, [SecondaryCaptureImageStorage])
    try:
        statuses = send(Destination("sc-only", "TESTPACS", "127.0.0.1", port), result_files, timeout=10)
    finally:
        server.shutdown()
    assert statuses[result_files[-1]] == STATUS_NO_CONTEXT
    assert all(statuses[p] == STATUS_SUCCESS for p in result_files[:-1]) and len(received) == 5


def test_send_to_a_closed_port_raises_transient(result_files):
    with pytest.raises(TransientError):
        send(Destination("down", "NOBODY", "127.0.0.1", _free_port()), result_files, timeout=5)


def test_send_skips_unreadable_files(tmp_path, result_files):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    received: list[str] = []
    server, port = _start_scp(received, [SecondaryCaptureImageStorage, Comprehensive3DSRStorage])
    try:
        statuses = send(Destination("test", "TESTPACS", "127.0.0.1", port), [junk, result_files[0]], timeout=10)
    finally:
        server.shutdown()
    assert statuses == {result_files[0]: STATUS_SUCCESS}


def _wait_listening(port: int, process: subprocess.Popen, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"storescp exited early: {process.stderr.read() if process.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # the port is the only readiness signal storescp gives
    raise RuntimeError("storescp did not start listening")


def test_send_to_dcmtk_storescp(tmp_path, result_files):
    storescp = shutil.which("storescp")
    assert storescp, "dcmtk storescp must be installed (see tests/install-system-deps.sh)"
    out_dir = tmp_path / "received"
    out_dir.mkdir()
    port = _free_port()
    process = subprocess.Popen(
        [storescp, "--aetitle", "DCMTKPACS", "--output-directory", str(out_dir), "--accept-all", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_listening(port, process)
        statuses = send(Destination("dcmtk", "DCMTKPACS", "127.0.0.1", port), result_files, timeout=10)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert statuses == {p: STATUS_SUCCESS for p in result_files}
    stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in out_dir.iterdir()}
    assert stored == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in result_files}
