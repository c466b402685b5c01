"""The synthetic anomaly suite: every type builds, its mask marks what changed, it is
deterministic, and the preprocessing's QC catches the QC-type failures."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from headscreen.imaging.preprocess import default_params, preprocess
from headscreen.imaging.volume import Volume
from headscreen.model_training.anomalies import ANOMALY_TYPES, NORMAL, SuiteCase, make_scan, suite_cases

SPACING = 2.0  # coarse native grid keeps each scan well under a second


def _arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


@pytest.fixture(scope="module")
def ct_scans() -> dict[str, object]:
    return {c.kind: make_scan(c) for c in suite_cases("CT", 1, seed=11, spacing_mm=SPACING)}


def test_suite_covers_every_type_for_ct_and_seeds_are_disjoint_from_training() -> None:
    cases = suite_cases("CT", 2, seed=3, n_normal=4)
    kinds = [c.kind for c in cases]
    assert kinds.count(NORMAL) == 4
    assert {k for k in kinds if k != NORMAL} == {n for n, t in ANOMALY_TYPES.items() if "CT" in t.modalities}
    assert len({c.seed for c in cases}) == len(cases)
    # The training cohort (model_training.cohort) uses seed*100_000 + i and + 50_000 + i.
    training_seeds = {0 * 100_000 + i for i in range(50_000)} | {3 * 100_000 + i for i in range(90_000)}
    assert not training_seeds & {c.seed for c in cases}
    mr_kinds = {c.kind for c in suite_cases("MR", 1, seed=3)}
    assert "metal_streaks" not in mr_kinds and "epidural" not in mr_kinds and "tumour_oedema" in mr_kinds
    with pytest.raises(ValueError, match="unknown anomaly"):
        suite_cases("CT", 1, 0, kinds=("alien",))


def test_every_ct_anomaly_has_a_nonempty_mask_on_its_image_grid(ct_scans) -> None:
    normal = ct_scans[NORMAL]
    assert normal.mask is None and normal.case.label == 0
    for kind, scan in ct_scans.items():
        if kind == NORMAL:
            continue
        assert scan.case.label == 1
        assert scan.mask is not None, kind
        assert scan.mask.GetSize() == scan.image.GetSize(), kind
        assert _arr(scan.mask).sum() > 0, kind


def test_extra_axial_blood_is_hyperdense_inside_the_brain_shell_with_its_stated_volume(ct_scans) -> None:
    for kind in ("epidural", "subdural", "intraparenchymal"):
        scan = ct_scans[kind]
        mask = _arr(scan.mask).astype(bool)
        brain = _arr(scan.brain_mask).astype(bool)
        values = _arr(scan.image)
        assert (mask & ~brain).sum() <= 0.05 * mask.sum(), kind
        assert 55.0 < values[mask].mean() < 85.0, kind  # acute blood, 60-80 HU plus noise
        assert values[brain & ~mask].mean() < 45.0, kind
        assert scan.hemorrhage_ml == pytest.approx(mask.sum() * SPACING ** 3 / 1000.0, abs=0.01)
    # A lens hugs the surface less broadly than a crescent of the same volume would: it is
    # thicker, so more of it lies deeper than the shell's outer voxel.
    for kind in ("epidural", "subdural"):
        assert ct_scans[kind].hemorrhage_ml >= 2.0 * 0.9


def test_midline_shift_moves_tissue_and_reports_the_shift(ct_scans) -> None:
    scan = ct_scans["midline_shift"]
    assert 5.0 <= scan.details["shift_mm"] <= 10.0
    assert scan.hemorrhage_ml >= 15.0
    plain = make_scan(SuiteCase("CT", NORMAL, scan.case.age, scan.case.seed, SPACING))
    # Same seed, same anatomy (noise differs): the masked region is where the warp moved tissue.
    diff = np.abs(_arr(scan.image) - _arr(plain.image))
    mask = _arr(scan.mask).astype(bool)
    assert diff[mask].mean() > 1.4 * diff[~mask].mean()
    assert mask.sum() * SPACING ** 3 / 1000.0 > 2 * scan.hemorrhage_ml


def test_qc_type_geometry(ct_scans) -> None:
    wrong = ct_scans["wrong_orientation"]
    truncated = ct_scans["truncated"]
    normal = make_scan(SuiteCase("CT", NORMAL, truncated.case.age, truncated.case.seed, SPACING))
    assert truncated.image.GetSize()[2] < 0.65 * normal.image.GetSize()[2]
    assert wrong.image.GetSpacing() == normal.image.GetSpacing()
    assert ct_scans["failed_registration"].details["variant"] in ("scrambled", "water_cylinder")
    values = _arr(ct_scans["metal_streaks"].image)
    assert values.max() >= 2999.0  # the catheter


def test_scans_are_deterministic() -> None:
    case = suite_cases("CT", 1, seed=5, kinds=("subdural",), n_normal=0, spacing_mm=SPACING)[0]
    a, b = make_scan(case), make_scan(case)
    np.testing.assert_array_equal(_arr(a.image), _arr(b.image))
    np.testing.assert_array_equal(_arr(a.mask), _arr(b.mask))


def test_mr_tumour_oedema_is_darker_than_white_matter_on_t1() -> None:
    case = suite_cases("MR", 1, seed=2, kinds=("tumour_oedema",), n_normal=0, spacing_mm=SPACING)[0]
    scan = make_scan(case)
    mask = _arr(scan.mask).astype(bool)
    brain = _arr(scan.brain_mask).astype(bool)
    values = _arr(scan.image)
    assert scan.details["oedema_ml"] > 0
    assert values[mask].mean() < values[brain & ~mask].mean()


def test_preprocessing_qc_flags_what_is_not_a_normal_head(ct_scans) -> None:
    params = default_params("CT")
    assert preprocess(Volume.from_image(ct_scans[NORMAL].image, "CT"), params).qc_reasons == []
    for kind in ("wrong_orientation", "failed_registration"):
        assert preprocess(Volume.from_image(ct_scans[kind].image, "CT"), params).qc_reasons != [], kind
