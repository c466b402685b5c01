"""Bundles and the ONNX runtime: hashes enforced, scores computed as the manifest says."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from headscreen.bundle import Manifest, load_bundle, write_bundle
from headscreen.errors import BundleError
from headscreen.inference import BundleRunner

GRID = [4, 4, 4]


def tiny_graph(path):
    """error_map = |x|, rec = mean|x|, kl = mean x^2, age = 50 + 10 * mean x."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, *GRID])
    outputs = [
        helper.make_tensor_value_info("error_map", TensorProto.FLOAT, ["N", 1, *GRID]),
        helper.make_tensor_value_info("rec", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("kl", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("age", TensorProto.FLOAT, ["N"]),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [4], [1, 2, 3, 4])
    ten = helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])
    fifty = helper.make_tensor("fifty", TensorProto.FLOAT, [], [50.0])
    nodes = [
        helper.make_node("Abs", ["image"], ["error_map"]),
        helper.make_node("ReduceMean", ["error_map", "axes"], ["rec"], keepdims=0),
        helper.make_node("Mul", ["image", "image"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["kl"], keepdims=0),
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "ten"], ["scaled"]),
        helper.make_node("Add", ["scaled", "fifty"], ["age"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [image], outputs, initializer=[axes, ten, fifty])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def make_bundle(tmp_path):
    folder = tmp_path / "tiny-1.0.0"
    folder.mkdir()
    tiny_graph(folder / "model.onnx")
    manifest = Manifest(
        name="tiny", version="1.0.0", modality="MR", method="vae-3d-age",
        input={"name": "image", "shape": [1, *GRID]}, preprocessing={"grid": GRID},
        outputs={"error_map": "error_map", "age": "age"},
        score={"terms": {"rec": 1.0, "kl": 2.0}, "age_gap_weight": 0.1},
        calibration={"reference_scores": [float(v) for v in np.linspace(0, 10, 101)], "threshold": 8.0,
                     "error_map_scale": 2.0, "n": 101},
    )
    write_bundle(folder, manifest)
    return folder


def test_scores_follow_the_manifest(tmp_path):
    runner = BundleRunner(load_bundle(make_bundle(tmp_path)))
    image = np.full(GRID, 0.5, dtype=np.float32)
    result = runner.run(image, chronological_age=40.0)
    assert result.terms == pytest.approx({"rec": 0.5, "kl": 0.25})
    assert result.predicted_age == pytest.approx(55.0)
    assert result.age_gap == pytest.approx(15.0)
    assert result.anomaly_score == pytest.approx(0.5 + 2 * 0.25 + 0.1 * 15.0)
    assert result.percentile == pytest.approx(100 * 26 / 101)  # 0..2.5 in steps of 0.1
    assert not result.screen_positive
    assert np.allclose(result.error_map, 0.25)  # |0.5| / error_map_scale
    assert result.raw_error is not None and np.allclose(result.raw_error, 0.5)  # the network's own |x|


def test_missing_age_is_stated_not_guessed(tmp_path):
    runner = BundleRunner(load_bundle(make_bundle(tmp_path)))
    result = runner.run(np.zeros(GRID, dtype=np.float32), chronological_age=None)
    assert result.age_gap is None and result.predicted_age == pytest.approx(50.0)
    assert any("chronological age absent" in note for note in result.notes)


def test_impossible_brain_age_is_not_reported_but_still_scores(tmp_path):
    runner = BundleRunner(load_bundle(make_bundle(tmp_path)))
    result = runner.run(np.full(GRID, 10.0, dtype=np.float32), chronological_age=40.0)  # age head says 150
    assert result.predicted_age is None and result.age_gap is None
    assert any(note.startswith("brain_age_implausible: estimate 150 years") for note in result.notes)
    # rec = 10, kl = 100, 0.1 * |150 - 40|: the gap still counts in the score.
    assert result.anomaly_score == pytest.approx(10.0 + 2.0 * 100.0 + 0.1 * 110.0)


def test_tampered_bundle_is_refused(tmp_path):
    folder = make_bundle(tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(folder)


def test_unknown_schema_is_refused(tmp_path):
    folder = make_bundle(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version"):
        load_bundle(folder)


def test_wrong_grid_is_refused(tmp_path):
    runner = BundleRunner(load_bundle(make_bundle(tmp_path)))
    with pytest.raises(BundleError, match="grid"):
        runner.run(np.zeros((5, 4, 4), dtype=np.float32), chronological_age=50.0)
