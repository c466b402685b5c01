"""Masked z-map scores (headscreen/scores.py): inside the brain, never at the grid edge."""

from __future__ import annotations

import numpy as np
import pytest

from headscreen.scores import (
    EDGE_VOXELS,
    LR_AXIS,
    MASKED_TERMS,
    Normative,
    asymmetry_terms,
    batch_terms,
    evaluation_mask,
    masked_terms,
    one_sided_z,
    z_map,
)

GRID = (24, 24, 24)


def ball(radius: float, centre: tuple[float, float, float] = (11.5, 11.5, 11.5)) -> np.ndarray:
    zz, yy, xx = np.indices(GRID)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius ** 2


@pytest.fixture(scope="module")
def healthy() -> tuple[np.ndarray, np.ndarray]:
    """Healthy error maps with one place that is always hard (a bright rim voxel layer)."""
    rng = np.random.default_rng(0)
    masks = np.stack([ball(9.0 + rng.uniform(-0.5, 0.5)) for _ in range(30)])
    maps = rng.gamma(2.0, 0.05, size=(30, *GRID)).astype(np.float32)
    maps[:, :, :, 16:18] += 0.5  # anatomy that is always reconstructed badly
    return maps, masks


@pytest.fixture(scope="module")
def normative(healthy) -> Normative:
    maps, masks = healthy
    return Normative.fit(maps[:20], masks[:20], margin_voxels=1).with_z_limit(maps[20:], masks[20:])


def test_always_hard_anatomy_does_not_glow(healthy, normative):
    maps, masks = healthy
    z = z_map(maps[25], normative)
    inside = evaluation_mask(masks[25], normative)
    hard = np.zeros(GRID, dtype=bool)
    hard[:, :, 16:18] = True
    # Raw error is ~6x higher there on every head; standardised, it is ordinary.
    assert maps[25][inside & hard].mean() > 4 * maps[25][inside & ~hard].mean()
    assert abs(z[inside & hard].mean()) < 1.0


def test_a_finding_raises_every_masked_term(healthy, normative):
    maps, masks = healthy
    base_terms, _ = masked_terms(maps[21], masks[21], normative)
    lesion = maps[21].copy()
    lesion[ball(3.0, (11.5, 9.0, 9.0))] += 0.6
    terms, overlay = masked_terms(lesion, masks[21], normative)
    assert set(terms) == set(MASKED_TERMS)
    for name in MASKED_TERMS:
        assert terms[name] > base_terms[name], name
    assert overlay[11, 9, 9] > 1.0  # above the healthy limit where the finding is
    assert overlay[~evaluation_mask(masks[21], normative)].max() == 0.0


def test_errors_at_the_grid_edge_and_outside_the_brain_never_count(healthy, normative):
    maps, masks = healthy
    base_terms, _ = masked_terms(maps[22], masks[22], normative)
    edged = maps[22].copy()
    edged[:EDGE_VOXELS] += 50.0       # the crop boundary
    edged[~masks[22]] += 50.0         # background outside the brain
    terms, overlay = masked_terms(edged, masks[22], normative)
    assert terms == pytest.approx(base_terms)
    assert not overlay[:EDGE_VOXELS].any()


def test_the_brain_rim_is_eroded_before_scoring(normative):
    mask = ball(9.0)
    scored = evaluation_mask(mask, normative)
    assert scored.sum() < mask.sum()
    assert not (scored & ~mask).any()


def test_too_little_brain_is_an_error_not_a_score(normative):
    tiny = ball(2.0)
    with pytest.raises(ValueError, match="brain voxels to score"):
        masked_terms(np.zeros(GRID, np.float32), tiny, normative)


def test_normative_round_trips_through_its_file(tmp_path, healthy, normative):
    maps, masks = healthy
    path = tmp_path / "normative.npz"
    normative.save(path)
    loaded = Normative.load(path)
    assert loaded.margin_voxels == normative.margin_voxels
    assert loaded.z_limit == pytest.approx(normative.z_limit)
    assert (loaded.support == normative.support).all()
    # float16 storage: terms agree to a fraction of a percent.
    assert batch_terms(maps[20:23], masks[20:23], loaded)["z_focal"] == pytest.approx(
        batch_terms(maps[20:23], masks[20:23], normative)["z_focal"], rel=1e-2)


def test_sd_is_floored_so_no_voxel_divides_by_chance_lows(healthy):
    maps, masks = healthy
    still = maps[:20].copy()
    still[:, 12, 12, 12] = 0.1  # a voxel whose healthy error never varies
    fitted = Normative.fit(still, masks[:20])
    assert fitted.sd.min() > 0
    assert fitted.sd[12, 12, 12] >= np.percentile(fitted.sd[fitted.support], 5)


def abs_graph(path) -> None:
    """error_map = |x|, rec = mean |x| on the test grid."""
    import onnx
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, *GRID])
    outputs = [helper.make_tensor_value_info("error_map", TensorProto.FLOAT, ["N", 1, *GRID]),
               helper.make_tensor_value_info("rec", TensorProto.FLOAT, ["N"])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [4], [1, 2, 3, 4])
    nodes = [helper.make_node("Abs", ["image"], ["error_map"]),
             helper.make_node("ReduceMean", ["error_map", "axes"], ["rec"], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "abs", [image], outputs, initializer=[axes]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)


def normative_bundle(tmp_path, normative: Normative, with_file: bool = True,
                     terms: dict[str, float] | None = None):
    from headscreen.bundle import Manifest, write_bundle

    folder = tmp_path / "masked-1.0.0"
    folder.mkdir()
    abs_graph(folder / "model.onnx")
    if with_file:
        normative.save(folder / "normative.npz")
    manifest = Manifest(
        name="masked", version="1.0.0", modality="CT", method="f-anogan-3d",
        input={"name": "image", "shape": [1, *GRID]}, preprocessing={"grid": list(GRID)},
        score={"terms": terms or {"z_focal": 1.0, "rec": 0.0}},
        calibration={"reference_scores": [0.0, 1.0, 2.0, 3.0], "threshold": 2.5, "error_map_scale": 1.0, "n": 4},
        normative={"file": "normative.npz"} if with_file else None,
    )
    write_bundle(folder, manifest)
    return folder


def test_the_daemon_scores_inside_the_case_brain_with_the_bundle_normative_model(tmp_path, healthy, normative):
    from headscreen.bundle import load_bundle
    from headscreen.inference import BundleRunner

    maps, masks = healthy
    runner = BundleRunner(load_bundle(normative_bundle(tmp_path, normative)))
    outside = maps[23].copy()
    outside[~masks[23]] = 9.0  # huge "error" outside the brain: ignored
    result = runner.run(outside, None, brain_mask=masks[23])
    shipped = runner.bundle.normative  # as stored (float16), not the fitted arrays
    assert shipped is not None
    expected, overlay = masked_terms(maps[23], masks[23], shipped)
    assert result.anomaly_score == pytest.approx(expected["z_focal"], rel=1e-5)
    assert result.terms["z_focal"] == pytest.approx(expected["z_focal"], rel=1e-5)
    assert result.terms["rec"] > 1.0  # the unmasked graph term still sees it, and is reported
    np.testing.assert_allclose(result.error_map, overlay, rtol=1e-5, atol=1e-6)


def test_a_bundle_with_masked_terms_but_no_normative_model_is_refused(tmp_path, normative):
    from headscreen.bundle import load_bundle
    from headscreen.errors import BundleError

    with pytest.raises(BundleError, match="need a normative section"):
        load_bundle(normative_bundle(tmp_path, normative, with_file=False))


def test_relative_terms_ignore_an_error_that_rises_everywhere(healthy, normative):
    """A scanner unlike the training data: every voxel's error higher by the same amount."""
    maps, masks = healthy
    base, _ = masked_terms(maps[24], masks[24], normative)
    shifted, _ = masked_terms(maps[24] + 0.08, masks[24], normative)
    assert shifted["z_mean"] > base["z_mean"] + 1.0
    assert shifted["z_focal_rel"] == pytest.approx(base["z_focal_rel"], rel=0.35)
    lesion = maps[24].copy()
    lesion[ball(3.0, (11.5, 9.0, 9.0))] += 0.6
    found, _ = masked_terms(lesion, masks[24], normative)
    assert found["z_focal_rel"] > 2 * shifted["z_focal_rel"]


def test_asymmetry_terms_cancel_what_is_mirror_symmetric_and_keep_what_is_one_sided():
    """z minus z mirrored across the midline (the grid's x centre): zero for any symmetric map."""
    mask = ball(9.0)
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 1.0, GRID).astype(np.float32)
    symmetric = z + np.flip(z, axis=LR_AXIS)
    symmetric[ball(3.0, (11.5, 11.5, 6.0)) | ball(3.0, (11.5, 11.5, 17.0))] += 8.0  # a bilateral "finding"
    assert asymmetry_terms(symmetric, mask) == {"z_asym_focal": 0.0, "z_asym_extent": 0.0}
    one_sided = z.copy()
    one_sided[ball(3.0, (11.5, 11.5, 6.0))] += 8.0
    terms = asymmetry_terms(one_sided, mask)
    assert terms["z_asym_focal"] > 4.0 and terms["z_asym_extent"] > 0.01
    assert asymmetry_terms(z, mask)["z_asym_focal"] < 0.5 * terms["z_asym_focal"]


def test_a_bilateral_error_raises_z_focal_but_hardly_the_asymmetry(healthy, normative):
    """Errors that every re-posed or blurred head shows on both sides (the cortex rim) are not
    findings; the same error on one side is."""
    maps, masks = healthy
    base, _ = masked_terms(maps[23], masks[23], normative)
    left, right = ball(2.5, (11.5, 11.5, 6.5)), ball(2.5, (11.5, 11.5, 16.5))
    both_sides, one_side = maps[23].copy(), maps[23].copy()
    both_sides[left | right] += 0.6
    one_side[left] += 0.6
    bilateral, _ = masked_terms(both_sides, masks[23], normative)
    unilateral, _ = masked_terms(one_side, masks[23], normative)
    assert bilateral["z_focal"] > base["z_focal"] + 3.0 and unilateral["z_focal"] > base["z_focal"] + 3.0
    assert unilateral["z_asym_focal"] > base["z_asym_focal"] + 3.0
    assert bilateral["z_asym_focal"] < base["z_asym_focal"] + 1.0


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_the_model_grid_is_centred_on_the_midline_so_mirroring_x_mirrors_the_head(modality):
    from headscreen.imaging.preprocess import default_params

    fov = default_params(modality)["fov_lps_mm"]
    assert fov["min"][0] == -fov["max"][0]  # x (left-right) spans -a..a: voxel i mirrors voxel W-1-i
    assert LR_AXIS in (-1, 2)  # x is the last axis of the (z, y, x) grid


def test_one_sided_z_fades_what_both_sides_share_and_keeps_a_one_sided_finding():
    mask = ball(9.0)
    z = np.zeros(GRID, dtype=np.float32)
    left, right, lone = ball(2.0, (11.5, 8.0, 6.0)), ball(2.0, (11.5, 8.0, 17.0)), ball(2.0, (11.5, 15.0, 6.0))
    z[left | right] = 5.0   # alike on both sides (mirror images of each other)
    z[lone] = 6.0           # one side only
    shown = one_sided_z(z, mask)
    assert np.abs(shown[left | right]).max() == 0.0
    assert shown[lone].min() == pytest.approx(6.0)
    # A mirror that is better than usual (negative z) does not raise a voxel above its own z.
    z[np.flip(lone, axis=LR_AXIS)] = -2.0
    assert one_sided_z(z, mask)[lone].max() == pytest.approx(6.0)


def test_a_bundle_scored_on_asymmetry_shows_a_one_sided_overlay_and_says_so(tmp_path, healthy, normative):
    from headscreen.bundle import load_bundle
    from headscreen.inference import BundleRunner, map_unit_of

    maps, masks = healthy
    runner = BundleRunner(load_bundle(normative_bundle(tmp_path, normative, terms={"z_asym_focal": 1.0})))
    left, right = ball(2.5, (11.5, 11.5, 6.5)), ball(2.5, (11.5, 11.5, 16.5))
    both_sides = maps[23].copy()
    both_sides[left | right] += 0.6
    result = runner.run(both_sides, None, brain_mask=masks[23])
    _, plain = masked_terms(both_sides, masks[23], runner.bundle.normative)
    assert plain[left].max() > 2.0 and result.error_map[left].max() < 0.5 * plain[left].max()
    assert map_unit_of(runner.bundle.manifest) == "z_one_sided"
    (tmp_path / "plain").mkdir()
    assert map_unit_of(load_bundle(normative_bundle(tmp_path / "plain", normative)).manifest) == "z"


def test_the_focal_centre_is_where_the_strongest_cube_lies_inside_the_mask():
    from headscreen.scores import FOCAL_KERNEL, focal_centre

    values = np.zeros((24, 24, 24), dtype=np.float32)
    mask = np.zeros_like(values, dtype=bool)
    mask[2:22, 2:22, 2:22] = True
    values[8:13, 14:19, 5:10] = 3.0          # a 5^3 block: its centre is the focal centre
    values[20, 20, 20] = 50.0                # one bright voxel on the mask's edge loses to the block
    assert FOCAL_KERNEL == 5
    assert focal_centre(values, mask) == (10, 16, 7)
    values[0, 0, 0] = 1e6                    # outside the mask: never counted
    assert focal_centre(values, mask) == (10, 16, 7)
    assert focal_centre(values, np.zeros_like(mask)) is None
