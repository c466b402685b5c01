"""Evaluation: metrics against scikit-learn and hand counts, bootstrap CIs, the report
folder, and `headscreen evaluate --report` on the shipped CT bundle (real ONNX, real
preprocessing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from headscreen.model_training.cli import evaluate_main
from headscreen.model_training.evaluate import (
    Record,
    age_metrics,
    bootstrap_ci,
    dice,
    evaluate_records,
    finite_scores,
    sample_metrics,
    specificity_at_full_sensitivity,
    voxel_metrics,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
CT_BUNDLE = next(p for p in sorted((ROOT / "models").iterdir()) if p.name.startswith("ct-fanogan-compact-"))


@pytest.fixture()
def fixed() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    labels = np.r_[np.zeros(40, int), np.ones(25, int)]
    scores = np.r_[rng.normal(0.0, 1.0, 40), rng.normal(1.2, 1.0, 25)]
    return labels, scores


def test_sample_metrics_match_scikit_learn(fixed) -> None:
    labels, scores = fixed
    m = sample_metrics(labels, scores, n_boot=200, seed=1)
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["auprc"]["value"] == pytest.approx(average_precision_score(labels, scores))
    # Best specificity at 100 % sensitivity: the ROC point with TPR = 1 and the lowest FPR.
    fpr, tpr, _ = roc_curve(labels, scores)
    assert m["specificity_at_100_sensitivity"]["value"] == pytest.approx(1.0 - fpr[tpr >= 1.0].min())
    assert (m["n_normal"], m["n_abnormal"]) == (40, 25)


def test_specificity_at_full_sensitivity_by_hand() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.5, 0.7, 0.9, 0.6, 2.0])
    # Lowest positive 0.6: normals below it are 0.1 and 0.5 -> 2 of 4.
    assert specificity_at_full_sensitivity(labels, scores) == 0.5


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic(fixed) -> None:
    labels, scores = fixed
    fn = lambda y, s: float(roc_auc_score(y, s))  # noqa: E731
    point = fn(labels, scores)
    low, high = bootstrap_ci(fn, labels, scores, n_boot=300, seed=7)
    assert low < point < high
    assert 0.0 <= low and high <= 1.0 and high - low > 0.05
    assert bootstrap_ci(fn, labels, scores, n_boot=300, seed=7) == (low, high)
    assert bootstrap_ci(fn, labels, scores, n_boot=300, seed=8) != (low, high)
    for name in ("auroc", "auprc", "specificity_at_100_sensitivity"):
        m = sample_metrics(labels, scores, n_boot=300, seed=3)[name]
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1], name


def test_qc_caught_scans_rank_above_every_model_score() -> None:
    values = finite_scores([0.2, np.inf, 3.0, -1.0])
    assert values[1] > 3.0 and list(values[[0, 2, 3]]) == [0.2, 3.0, -1.0]


def test_voxel_metrics_match_scikit_learn_and_dice_by_hand() -> None:
    rng = np.random.default_rng(0)
    masks = [np.zeros((8, 8, 8), bool) for _ in range(2)]
    masks[0][2:5, 2:5, 2:5] = True
    masks[1][4:7, 1:3, 3:6] = True
    maps = [rng.normal(0, 1, m.shape) + 2.5 * m for m in masks]
    brains = [np.ones(m.shape, bool) for m in masks]
    brains[1][0] = False
    v = voxel_metrics(maps, masks, brains)
    truth = np.concatenate([masks[0].ravel(), masks[1][1:].ravel()])
    values = np.concatenate([maps[0].ravel(), maps[1][1:].ravel()])
    assert v["auprc"] == pytest.approx(average_precision_score(truth, values))
    assert v["best_dice"] == pytest.approx(dice(values > v["best_dice_threshold"], truth))
    assert v["best_dice"] > 0.6
    assert dice(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)) == 0.5


def _records() -> list[Record]:
    rng = np.random.default_rng(5)
    out = [Record(f"n{i}", "normal", 0, float(rng.normal(1.0, 0.1)), [], true_age=50.0 + i, predicted_age=52.0 + i)
           for i in range(12)]
    out += [Record(f"h{i}", "subdural", 1, float(rng.normal(1.3, 0.1)), [], true_age=60.0, predicted_age=70.0,
                   hemorrhage_ml=3.0 + 4 * i) for i in range(6)]
    out += [Record(f"q{i}", "truncated", 1, float(rng.normal(1.0, 0.1)), ["registration_poor: x"]) for i in range(3)]
    out.append(Record("r0", "truncated", 1, None, [], rejected="insufficient_coverage: 40 mm"))
    return out


def test_evaluate_records_per_type_system_and_age() -> None:
    m = evaluate_records(_records(), n_boot=100, seed=0)
    # QC-caught truncations count as detected by the system, not by the model.
    assert m["per_type"]["truncated"]["system"]["auroc"]["value"] == 1.0
    assert m["per_type"]["truncated"]["model_only"]["n_abnormal"] == 3
    assert m["per_type"]["truncated"]["qc_flagged"] == 4 and m["per_type"]["truncated"]["rejected"] == 1
    assert m["hemorrhage_ge_5ml"]["system"]["n_abnormal"] == 5
    assert m["age"]["age_mae_normal"] == pytest.approx(2.0) and m["age"]["age_mae_abnormal"] == pytest.approx(10.0)
    assert m["age"]["age_mae_normal_ci95"] == pytest.approx([2.0, 2.0])
    assert m["age"]["age_slope_normal"] == pytest.approx(1.0)
    assert m["n_rejected"] == 1


def test_age_metrics_show_the_spread_and_the_regression_to_the_mean() -> None:
    rng = np.random.default_rng(1)
    true = np.linspace(20.0, 80.0, 15)
    predicted = 0.5 * true + 25.0 + rng.normal(0.0, 3.0, true.size)  # pulled towards 50
    age = age_metrics([Record(f"n{i}", "normal", 0, 1.0, [], true_age=float(t), predicted_age=float(p))
                       for i, (t, p) in enumerate(zip(true, predicted))], n_boot=500, seed=0)
    low, high = age["age_mae_normal_ci95"]
    assert low < age["age_mae_normal"] < high and high - low > 1.0
    assert age["age_slope_normal"] == pytest.approx(0.5, abs=0.1)
    assert age_metrics([Record("n0", "normal", 0, 1.0, [], true_age=50.0, predicted_age=53.0)]) == {
        "age_mae_normal": 3.0, "age_mean_gap_normal": 3.0, "n_normal": 1}


def test_write_report_files(tmp_path: Path) -> None:
    records = _records()
    metrics = evaluate_records(records, n_boot=50, seed=0)
    written = write_report(records, metrics, tmp_path / "report", {"bundle": "x-1.0.0", "threshold": 1.2})
    names = {p.name for p in written}
    assert names == {"metrics.json", "records.json", "roc.png", "score_histogram.png", "age.png"}
    for p in written:
        assert p.stat().st_size > 1000, p
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["bundle"] == "x-1.0.0"
    assert (tmp_path / "report" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # evaluates the shipped bundle on fresh phantoms
def test_headscreen_evaluate_report_on_the_shipped_ct_bundle(tmp_path: Path, capsys) -> None:
    report = tmp_path / "report"
    argv = ["--bundle", str(CT_BUNDLE), "--report", str(report), "--kinds", "subdural,failed_registration",
            "--n-per-type", "1", "--normals", "2", "--spacing", "2", "--seed", "4242", "--bootstrap", "50",
            "--threads", "2"]
    assert evaluate_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((report / "metrics.json").read_text())
    assert printed["bundle"] == metrics["bundle"] == CT_BUNDLE.name
    assert set(metrics["per_type"]) == {"subdural", "failed_registration"}
    assert metrics["per_type"]["failed_registration"]["qc_flagged"] == 1
    assert metrics["voxel"]["subdural"]["n_anomalous_voxels"] > 0
    assert {p.name for p in report.iterdir()} >= {"metrics.json", "records.json", "roc.png", "score_histogram.png"}
