"""Domain randomisation (imaging/synthesis.py) and make_head(randomise=True).

Fast: the draws are checked over many seeds (cheap), the scanner effects on small
arrays, and three randomised heads are built once per module. Seeds are chosen for
coarse drawn grids (quick to build): MR 0 (1.15 mm isotropic), MR 2 (3.3 mm slices, cut at
vertex and base), CT 8 (4.6 mm slices). How the heads compare with real scans is a
benchmark, not a test: bench/synthesis_realism.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import SimpleITK as sitk

from headscreen.imaging import synthesis, templates
from headscreen.imaging.phantoms import make_head

DRAW_SEEDS = range(300)
ANATOMY = synthesis.ANATOMY


def within(value: float, bounds: tuple[float, float], slack: float = 1e-9) -> bool:
    return bounds[0] - slack <= value <= bounds[1] + slack


def looks(modality: str) -> list[synthesis.Appearance]:
    return [synthesis.draw(modality, np.random.default_rng([seed, 7])) for seed in DRAW_SEEDS]


# --------------------------------------------------------------------------- draws


def test_draw_is_deterministic_per_seed_and_differs_between_seeds():
    for modality in ("CT", "MR"):
        first = synthesis.draw(modality, np.random.default_rng([5, 7]))
        assert first == synthesis.draw(modality, np.random.default_rng([5, 7]))
        assert first != synthesis.draw(modality, np.random.default_rng([6, 7]))


def test_draw_rejects_unknown_modality():
    with pytest.raises(ValueError, match="modality"):
        synthesis.draw("PET", np.random.default_rng(0))


def test_ct_draws_lie_in_the_documented_ranges_and_keep_grey_above_white_above_csf():
    r = synthesis.RANGES["CT"]
    for look in looks("CT"):
        t = look.tissue
        # The scanner offset shifts grey, white and CSF together; their differences are offset-free.
        assert within(t["gm"] - t["wm"], r["gm_minus_wm"])
        assert within(t["gm"], (r["gm"][0] + r["offset"][0], r["gm"][1] + r["offset"][1]))
        assert within(t["csf"], (r["csf"][0] + r["offset"][0], r["csf"][1] + r["offset"][1]))
        assert within(t["gm"] - t["csf"], (r["gm"][0] - r["csf"][1], r["gm"][1] - r["csf"][0]))
        assert t["gm"] > t["wm"] > t["csf"], t
        offset = t["gm"] - (t["air"] + 1000.0)  # the scanner offset moves every soft tissue and air alike
        for name in ("scalp", "fat"):
            assert within(t[name] - (t["air"] + 1000.0), r[name]), (name, t[name])
        for name in ("skull_table", "skull_diploe"):
            assert within(t[name], r[name]), (name, t[name])
        assert within(t["air"] + 1000.0, r["offset"]) and within(offset, r["gm"])
        # Noise is drawn for 5 mm slices and grows as slices thin.
        at_5mm = look.noise / math.sqrt(synthesis.NOISE_REFERENCE_SLICE_MM / look.spacing_mm[2])
        assert within(at_5mm, r["noise_at_5mm"], 1e-6) and within(look.noise_corr_mm, r["noise_corr_mm"])
        assert look.streak_hu == 0.0 or within(look.streak_hu, r["streak_hu"])
        assert within(look.beam_hardening_hu, r["beam_hardening_hu"]) and within(look.bias, (0.0, 4.0))
    # Both branches of the coin flips happen.
    assert {look.streak_hu == 0.0 for look in looks("CT")} == {True, False}
    assert {look.holder for look in looks("CT")} == {True, False}


def test_mr_draws_lie_in_the_documented_ranges_and_keep_white_above_grey_above_csf():
    r = synthesis.RANGES["MR"]
    ratios = {"gm": "gm_ratio", "csf": "csf_ratio", "scalp": "scalp_ratio", "fat": "fat_ratio",
              "skull_table": "table_ratio", "skull_diploe": "diploe_ratio"}
    for look in looks("MR"):
        t = look.tissue
        assert within(t["wm"], r["wm"]) and t["air"] == 0.0
        for name, key in ratios.items():
            assert within(t[name] / t["wm"], r[key], 1e-6), (name, t[name] / t["wm"])
        assert t["wm"] > t["gm"] > t["csf"] > 0.0, t
        assert within(look.noise / t["wm"], r["noise_ratio"], 1e-6) and within(look.bias, r["bias"])
        assert look.streak_hu == look.beam_hardening_hu == look.noise_corr_mm == 0.0 and not look.holder


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_anatomy_and_acquisition_draws_lie_in_the_documented_ranges(modality):
    isotropic = 0
    for look in looks(modality):
        inplane, _, thick = look.spacing_mm
        assert look.spacing_mm[0] == look.spacing_mm[1]
        if inplane == thick:  # the 3D branch: at least 1 mm
            isotropic += 1
            assert within(inplane, (1.0, ANATOMY["inplane_mm"][1]))
        else:
            assert within(inplane, ANATOMY["inplane_mm"]) and within(thick, ANATOMY["slice_mm"])
        assert all(within(s, ANATOMY["axis_scale"]) for s in look.axis_scale)
        for name in ("deformation_mm", "deformation_asymmetry", "skull_mm", "blur_mm"):
            assert within(getattr(look, name), ANATOMY[name]), name
        assert look.cut_vertex_mm is None or within(look.cut_vertex_mm, ANATOMY["vertex_cut_mm"])
        assert look.cut_base_mm is None or within(look.cut_base_mm, ANATOMY["base_cut_mm"])
        assert within(look.scalp_trim_mm, ANATOMY["scalp_trim_mm"])
    assert 0 < isotropic < len(DRAW_SEEDS)


def _displacement_and_mirror(look: synthesis.Appearance, points: list[tuple[float, float, float]]):
    transform = synthesis.deformation(look, np.random.default_rng(3))
    here = np.array([np.subtract(transform.TransformPoint(p), p) for p in points])
    mirrored = [(-x, y, z) for x, y, z in points]
    there = np.array([np.subtract(transform.TransformPoint(p), p) for p in mirrored])
    return here, there * np.array([-1.0, 1.0, 1.0])  # the mirror image of the displacement there


def test_the_deformation_is_mirror_symmetric_but_for_its_one_sided_share():
    points = [(float(x), float(y), float(z)) for x in (12.0, 37.0, 61.0) for y in (-55.0, 4.0, 48.0)
              for z in (-20.0, 15.0, 44.0)]
    look = synthesis.draw("MR", np.random.default_rng([4, 7]))
    here, mirror = _displacement_and_mirror(dataclasses.replace(look, deformation_asymmetry=0.0), points)
    np.testing.assert_allclose(here, mirror, atol=1e-6)
    assert np.abs(here).max() > 1.0  # and it does deform
    # The one-sided part grows with its share and stays below the symmetric part.
    shares = {}
    for asymmetry in (0.1, 0.4, 1.0):
        here, mirror = _displacement_and_mirror(dataclasses.replace(look, deformation_asymmetry=asymmetry), points)
        shares[asymmetry] = float(np.linalg.norm(here - mirror) / np.linalg.norm(here + mirror))
    assert shares[0.1] < shares[0.4] < shares[1.0]
    assert shares[0.4] < 0.6 < shares[1.0]


# --------------------------------------------------------------------------- scanner effects on small arrays


def test_smooth_field_spans_minus_one_to_one_on_any_shape():
    field = synthesis.smooth_field((7, 33, 50), np.random.default_rng(0))
    assert field.shape == (7, 33, 50) and field.dtype == np.float32
    assert field.min() >= -1.0 and field.max() <= 1.0 and np.abs(field).max() == pytest.approx(1.0)
    # Low frequency: neighbouring voxels barely differ.
    assert np.abs(np.diff(field, axis=2)).max() < 0.2
    assert np.array_equal(field, synthesis.smooth_field((7, 33, 50), np.random.default_rng(0)))


def test_ct_noise_has_the_drawn_sd_in_plane_texture_and_independent_slices():
    look = dataclasses.replace(synthesis.draw("CT", np.random.default_rng([1, 7])), noise=6.0, noise_corr_mm=1.0)
    spacing = np.array([0.8, 0.8, 4.0])  # x, y, z as SimpleITK orders them
    noise = synthesis._correlated_noise((6, 128, 128), spacing, look, np.random.default_rng(0))
    assert noise.std() == pytest.approx(6.0, rel=1e-3)
    in_plane = np.corrcoef(noise[:, :, 1:].ravel(), noise[:, :, :-1].ravel())[0, 1]
    across = np.corrcoef(noise[1:].ravel(), noise[:-1].ravel())[0, 1]
    assert in_plane > 0.3 and abs(across) < 0.05, (in_plane, across)
    # Filtered back-projection texture: the lowest frequencies carry less power than mid ones.
    power = np.mean(np.abs(np.fft.fft2(noise)) ** 2, axis=0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(128, 0.8), np.fft.fftfreq(128, 0.8), indexing="ij"))
    low, mid = power[(f > 0) & (f < 0.03)].mean(), power[(f > 0.1) & (f < 0.2)].mean()
    assert low < 0.5 * mid, (low, mid)


def test_mr_acquisition_gives_rician_noise_in_air():
    look = dataclasses.replace(synthesis.draw("MR", np.random.default_rng([1, 7])), cut_base_mm=None,
                               cut_vertex_mm=None, spacing_mm=(2.0, 2.0, 2.0), blur_mm=0.0)
    values = np.zeros((40, 40, 40), dtype=np.float32)
    values[12:28, 12:28, 12:28] = look.tissue["wm"]
    fine = sitk.GetImageFromArray(values)
    fine.SetSpacing((2.0, 2.0, 2.0))
    image = synthesis.acquire_and_sample(fine, fine, look, np.random.default_rng(0))
    air = sitk.GetArrayFromImage(image)[:, :, :4].ravel()
    # Magnitude of complex Gaussian noise in air: Rayleigh, mean / SD = sqrt(pi / (4 - pi)) = 1.91.
    assert air.min() >= 0.0 and air.mean() > 0.0
    assert air.mean() / air.std() == pytest.approx(math.sqrt(math.pi / (4.0 - math.pi)), rel=0.05)
    assert air.mean() / math.sqrt(math.pi / 2.0) == pytest.approx(look.noise, rel=0.05)


# --------------------------------------------------------------------------- randomised heads


@pytest.fixture(scope="module")
def mr_head():
    return make_head("MR", 60.0, 0, randomise=True)


@pytest.fixture(scope="module")
def mr_other():
    return make_head("MR", 60.0, 2, randomise=True)


@pytest.fixture(scope="module")
def ct_head():
    return make_head("CT", 60.0, 8, randomise=True)


def appearance(phantom) -> dict:
    return phantom.metadata["appearance"]


def test_randomised_head_is_deterministic_per_seed(ct_head):
    again = make_head("CT", 60.0, 8, randomise=True)
    assert appearance(again) == appearance(ct_head)
    assert again.image.GetSize() == ct_head.image.GetSize() and again.image.GetSpacing() == ct_head.image.GetSpacing()
    assert np.array_equal(sitk.GetArrayViewFromImage(again.image), sitk.GetArrayViewFromImage(ct_head.image))
    assert np.array_equal(sitk.GetArrayViewFromImage(again.brain_mask), sitk.GetArrayViewFromImage(ct_head.brain_mask))


def test_two_seeds_differ_in_appearance(mr_head, mr_other):
    a, b = appearance(mr_head), appearance(mr_other)
    assert a["tissue"]["wm"] != pytest.approx(b["tissue"]["wm"], rel=0.01)
    assert a["spacing_mm"] != b["spacing_mm"] and a["axis_scale"] != b["axis_scale"]
    assert mr_head.image.GetSpacing() != mr_other.image.GetSpacing()
    # The image follows the draw: brain intensities scale with each head's own white matter.
    for phantom in (mr_head, mr_other):
        brain = sitk.GetArrayViewFromImage(phantom.image)[sitk.GetArrayViewFromImage(phantom.brain_mask) > 0]
        t, bias = appearance(phantom)["tissue"], appearance(phantom)["bias"]
        assert t["csf"] < np.median(brain) < t["wm"] * (1.0 + bias), (np.median(brain), t)


def test_grid_and_metadata_follow_the_draw(mr_head, ct_head):
    for phantom in (mr_head, ct_head):
        look = appearance(phantom)
        assert phantom.image.GetSpacing() == pytest.approx(look["spacing_mm"])
        assert phantom.metadata["noise_sigma"] == look["noise"]
        assert phantom.brain_mask.GetSize() == phantom.image.GetSize()


def test_brain_mask_volume_follows_the_drawn_head_shape(mr_head, mr_other, ct_head):
    template_ml = float(templates.tissue_maps().brain.sum()) / 1000.0  # 1 mm grid
    for phantom in (mr_head, mr_other, ct_head):
        expected = template_ml * float(np.prod(appearance(phantom)["axis_scale"]))
        # The random deformation is volume-neutral on average; partial coverage does not cut the mask.
        assert phantom.brain_mask_volume_ml() == pytest.approx(expected, rel=0.05)
        assert 1000.0 <= phantom.brain_mask_volume_ml() <= 2.2 * 1000.0


def test_randomised_brain_volumes_are_adult_plausible():
    template_ml = float(templates.tissue_maps().brain.sum()) / 1000.0
    volumes = [template_ml * float(np.prod(look.axis_scale)) for look in looks("CT") + looks("MR")]
    assert 1000.0 <= min(volumes) and max(volumes) <= 1800.0, (min(volumes), max(volumes))


def test_ct_brain_median_lies_between_drawn_white_and_grey(ct_head):
    look = appearance(ct_head)
    t = look["tissue"]
    values = sitk.GetArrayViewFromImage(ct_head.image)
    brain = values[sitk.GetArrayViewFromImage(ct_head.brain_mask) > 0]
    median = float(np.median(brain))
    assert t["wm"] - look["noise"] <= median <= t["gm"] + look["noise"], (median, t, look["noise"])
    assert values.min() >= -1100.0 and float(np.percentile(values, 99.9)) > 600.0  # air and skull present


def test_mr_head_background_is_rician(mr_head):
    look = appearance(mr_head)
    values = sitk.GetArrayViewFromImage(mr_head.image)
    # The outermost 3 mm left and right lie in the grid's 8 mm margin of air.
    n = int(math.ceil(3.0 / look["spacing_mm"][0]))
    air = np.concatenate([values[:, :, :n].ravel(), values[:, :, -n:].ravel()]).astype(np.float64)
    assert air.size > 1000 and air.min() >= 0.0 and air.mean() > 0.0
    assert air.mean() / air.std() == pytest.approx(1.91, rel=0.1)
    assert air.mean() / math.sqrt(math.pi / 2.0) == pytest.approx(look["noise"], rel=0.15)


def test_partial_coverage_cuts_relative_to_the_brain_and_keeps_noise():
    look = dataclasses.replace(synthesis.draw("MR", np.random.default_rng([1, 7])), cut_base_mm=-4.0,
                               cut_vertex_mm=2.0, spacing_mm=(2.0, 2.0, 2.0), blur_mm=0.0, bias=0.05)
    values = np.zeros((40, 20, 20), dtype=np.float32)
    values[10:30] = look.tissue["wm"]  # "brain" rows 10-29
    fine = sitk.GetImageFromArray(values)
    fine.SetSpacing((2.0, 2.0, 2.0))
    out = sitk.GetArrayFromImage(synthesis.acquire_and_sample(fine, fine, look, np.random.default_rng(0), (10, 29)))
    bright = out.reshape(40, -1).mean(axis=1) > 0.5 * look.tissue["wm"]
    # Base: 4 mm into the brain (2 slices) removed; vertex: 2 mm (1 slice) of air beyond it kept.
    assert not bright[:12].any() and bright[12:30].all()
    assert out[:12].mean() > 0.0  # cut slices carry the same Rician noise as other air
