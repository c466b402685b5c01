"""model_training end to end: real phantoms through imaging's preprocessing, training,
ONNX export, calibration, bundle, model card, and `evaluate` on the bundle.

A coarse preprocessing (16^3 grid, 4 mm working spacing) keeps this fast; it is
passed through the same `--preprocessing` override a site would use and lands in
the manifest, so the daemon would run exactly it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from headscreen.bundle import load_bundle
from headscreen.imaging.preprocess import default_params
from headscreen.model_training.cli import evaluate_main, main
from headscreen.model_training.cohort import (
    anomalous_cases,
    cache_folder,
    healthy_cases,
    prepare_case,
    stratified_split,
)
from headscreen.scores import MASKED_TERMS

pytestmark = pytest.mark.slow  # training end to end: `make test-fast` leaves it out

COARSE = {
    "grid": [16, 16, 16],
    "working_spacing_mm": 4.0,
    "registration": {"atlas_spacing_mm": 4.0, "rigid": {"iterations": 20}, "affine": {"iterations": 10}},
}


def test_stratified_split_spreads_ages_over_every_split() -> None:
    ages = np.random.default_rng(0).uniform(20, 85, 100)
    split = stratified_split(ages, {"train": 60, "val": 10, "calibration": 20, "test": 10})
    assert {k: len(v) for k, v in split.items()} == {"train": 60, "val": 10, "calibration": 20, "test": 10}
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(100))
    for idx in split.values():
        assert ages[idx].min() < 30 and ages[idx].max() > 75


def test_cases_are_stable_prefixes_and_lesions_alternate_kinds() -> None:
    assert healthy_cases("MR", 3, 5) == healthy_cases("MR", 10, 5)[:3]
    kinds = [c.lesion_kind for c in anomalous_cases("MR", 4, 5)]
    assert kinds == ["tumour", "hemorrhage", "tumour", "hemorrhage"]
    assert all(20 <= c.age <= 85 for c in healthy_cases("CT", 20, 1))


@pytest.fixture(scope="module")
def coarse_params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("params") / "coarse.json"
    path.write_text(json.dumps(COARSE))
    return path


def test_train_cli_writes_a_verified_ct_bundle_and_evaluate_scores_it(
    tmp_path: Path, coarse_params_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "ct-test-0.1.0"
    cache = tmp_path / "cache"
    argv = ["--modality", "CT", "--method", "fanogan", "--out", str(out), "--cache", str(cache),
            "--n-train", "2", "--n-val", "1", "--n-calibration", "2", "--n-test", "1", "--n-anomalous", "2",
            "--epochs", "1", "--encoder-epochs", "1", "--finetune-epochs", "1", "--batch-size", "2",
            "--device", "cpu", "--threads", "1", "--no-progress", "--preprocessing", str(coarse_params_file),
            # One lesion and one healthy validation case: the AUROC is 0, 0.5 or 1, so no floor
            # (tests/test_train_floor.py tests it).
            "--min-val-auroc", "0",
            # The plain phantoms: two cases at a 16^3 grid must pass QC (randomised heads
            # are tested in test_synthesis.py and trained the shipped bundles).
            "--no-randomise"]
    assert main(argv) == 0

    bundle = load_bundle(out)
    m = bundle.manifest
    assert (m.name, m.version, m.modality, m.method) == ("ct-test", "0.1.0", "CT", "f-anogan-3d")
    assert m.input.shape == [1, 16, 16, 16]
    assert m.preprocessing["grid"] == [16, 16, 16] and m.preprocessing["window"] == default_params("CT")["window"]
    # The search weighs the CT paper's izi_f and the masked z-map terms; the unmasked focal
    # term is an output for comparison only. The normative model and the weights ship along.
    assert set(m.score.terms) == {"izi_f", *MASKED_TERMS} and m.outputs.age is None
    assert any(w > 0 for w in m.score.terms.values())
    assert m.normative is not None and bundle.normative is not None and bundle.normative.support.any()
    assert {"model.onnx", "normative.npz", "weights.pt"} <= set(m.files)
    assert "paper_score" in m.metrics and m.training["randomised"] is False
    assert {k: v for k, v in m.metrics["score_weight_search"].items() if k != "validation_auroc"} == m.score.terms
    # Healthy cases failing the preprocessing QC are left out (counted in the metrics).
    assert 1 <= m.calibration.n <= 2 and m.calibration.threshold == max(m.calibration.reference_scores)
    assert 0 <= m.metrics["qc_excluded"] <= 2 and m.metrics["n_train"] >= 1
    assert m.parity["max_abs_diff"] < 1e-4
    assert m.training["command"].startswith("headscreen train --modality CT")
    assert 0.0 <= m.metrics["test"]["auroc"] <= 1.0
    card = (out / "MODEL_CARD.md").read_text()
    assert "never seen a real patient scan" in card and m.training["command"] in card
    # The cache holds every preprocessed case under the params' hash.
    assert len(list(cache_folder(cache, m.preprocessing).glob("*.npz"))) == 2 + 1 + 2 + 1 + 2

    # Seed 0 and n=1 reuse two cached cases; the scoring is the daemon's rule.
    capsys.readouterr()
    assert evaluate_main(["--bundle", str(out), "--n", "1", "--seed", "0", "--cache", str(cache)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bundle"] == "ct-test-0.1.0" and result["sha256"] == bundle.sha256
    assert result["n_healthy"] == 1 and result["n_anomalous"] == 1 and result["auroc"] in (0.0, 1.0)

    # A site fine-tunes the bundle: its weights start the run, its preprocessing is kept.
    tuned = tmp_path / "models" / "ct-test-0.2.0"
    base = ["--modality", "CT", "--method", "fanogan", "--cache", str(cache), "--n-train", "2", "--n-val", "1",
            "--n-calibration", "2", "--n-test", "1", "--n-anomalous", "2", "--encoder-epochs", "1",
            "--finetune-epochs", "1", "--batch-size", "2", "--device", "cpu", "--threads", "1", "--no-progress",
            "--no-randomise", "--min-val-auroc", "0"]
    assert main([*base, "--out", str(tuned), "--init-from", str(out)]) == 0
    child = load_bundle(tuned).manifest
    assert child.training["init_from"] == {"bundle": "ct-test-0.1.0", "sha256": bundle.sha256}
    assert child.preprocessing == m.preprocessing and child.training["epochs"]["wgan"] == 0
    # A bundle of another method cannot start this one.
    assert main([*base[:2], "--method", "vae_ap", *base[4:], "--out", str(tmp_path / "x-0.1.0"),
                 "--init-from", str(out)]) == 2

    # New score terms reach a shipped bundle without training: same network, weights and
    # normative model; the weights searched and the thresholds calibrated again on the
    # bundle's own cohort, the train split not rebuilt.
    recal = tmp_path / "models" / "ct-test-0.1.1"
    cached = len(list(cache_folder(cache, m.preprocessing).glob("*.npz")))
    assert main([*base, "--out", str(recal), "--init-from", str(out), "--recalibrate",
                 "--preprocessing", str(coarse_params_file)]) == 2  # its preprocessing is the bundle's
    assert main([*base, "--out", str(recal), "--init-from", str(out), "--recalibrate",
                 "--note", "why it was recalibrated"]) == 0
    again = load_bundle(recal).manifest
    assert again.training["recalibrated"]["notes"] == ["why it was recalibrated"]
    assert "why it was recalibrated" in (recal / "MODEL_CARD.md").read_text()
    assert {f: again.files[f] for f in ("model.onnx", "normative.npz", "weights.pt")} == \
        {f: m.files[f] for f in ("model.onnx", "normative.npz", "weights.pt")}
    assert again.training["recalibrated"]["from"] == {"bundle": "ct-test-0.1.0", "sha256": bundle.sha256}
    assert again.training["command"] == m.training["command"] and again.preprocessing == m.preprocessing
    assert set(again.score.terms) == {"izi_f", *MASKED_TERMS} and again.calibration.n == m.calibration.n
    assert again.calibration.threshold == max(again.calibration.reference_scores)
    assert len(list(cache_folder(cache, m.preprocessing).glob("*.npz"))) == cached
    assert "z_asym_focal" in again.score.definition and "z_asym_focal" in again.metrics["test_per_term_auroc"]


def test_prepare_case_reads_back_from_the_cache(tmp_path: Path) -> None:
    params = default_params("MR")
    params.update(grid=[16, 16, 16], working_spacing_mm=4.0)
    params["registration"] = {**params["registration"], "atlas_spacing_mm": 4.0}
    case = anomalous_cases("MR", 1, 3)[0]
    first = prepare_case(case, params, tmp_path)
    assert first.image.shape == (16, 16, 16) and first.image.dtype == np.float32
    assert first.image.min() >= -1.0 and first.image.max() <= 1.0 and first.brain_mask.any()
    again = prepare_case(case, params, tmp_path)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.brain_mask, again.brain_mask)


def test_a_recalibration_may_change_the_qc_gates_and_nothing_the_network_sees() -> None:
    from headscreen.errors import ConfigError
    from headscreen.model_training.fit import recalibration_params

    params = default_params("MR")
    stricter = recalibration_params(params, {"qc_ranges": {"noise_relative": [0.0, 0.05]}})
    assert stricter["qc_ranges"]["noise_relative"] == [0.0, 0.05]
    assert stricter["qc_ranges"]["head_dice"] == params["qc_ranges"]["head_dice"]  # merged, not replaced
    assert {**stricter, "qc_ranges": None} == {**params, "qc_ranges": None}
    assert recalibration_params(params, None) == params
    with pytest.raises(ConfigError, match="grid"):
        recalibration_params(params, {"grid": [32, 32, 32]})


REFIT_BASE = ["--modality", "MR", "--method", "vae_ap", "--n-train", "2", "--n-val", "1", "--n-calibration", "2",
              "--n-test", "1", "--n-anomalous", "2", "--batch-size", "2", "--device", "cpu", "--threads", "1",
              "--no-progress", "--no-randomise", "--min-val-auroc", "0"]


@pytest.fixture(scope="module")
def tiny_mr_bundle(tmp_path_factory: pytest.TempPathFactory, coarse_params_file: Path) -> tuple[Path, Path]:
    """A one-epoch VAE-a_p MR bundle on the coarse grid, and its cohort cache."""
    root = tmp_path_factory.mktemp("tiny-mr")
    out, cache = root / "models" / "mr-test-0.1.0", root / "cache"
    assert main([*REFIT_BASE, "--cache", str(cache), "--out", str(out), "--epochs", "1",
                 "--preprocessing", str(coarse_params_file)]) == 0
    return out, cache


def test_refit_age_trains_only_the_age_head_of_a_vae_bundle(tmp_path: Path, tiny_mr_bundle: tuple[Path, Path]) -> None:
    import onnxruntime as ort

    out, cache = tiny_mr_bundle
    base = [*REFIT_BASE, "--cache", str(cache)]
    source = load_bundle(out)

    refit = tmp_path / "models" / "mr-test-0.2.0"
    assert main([*base, "--out", str(refit), "--init-from", str(out), "--refit-age", "--age-seed", "0"]) == 2
    with pytest.raises(SystemExit):
        main([*base, "--out", str(refit), "--init-from", str(out), "--refit-age", "--recalibrate"])
    assert not refit.exists()
    # Judged on one validation head, this refit's head is no better than the source's
    # (24.8 against 1.0 years when written): refused, nothing written, unless forced.
    refit_argv = [*base, "--out", str(refit), "--init-from", str(out), "--refit-age", "--age-extra", "3",
                  "--epochs", "5", "--note", "why the head was refit"]
    assert main(refit_argv) == 3
    assert not refit.exists()
    assert main([*refit_argv, "--force"]) == 0
    m = load_bundle(refit).manifest
    record = m.training["age_refit"]
    assert record["from"] == {"bundle": "mr-test-0.1.0", "sha256": source.sha256}
    assert record["extra"]["seed"] == 7 and record["extra"]["asked"] == 3 and record["epochs"] == 5
    assert record["n_heads"] == record["n_cohort_train"] + record["extra"]["n"] >= 1
    assert 1 <= record["best_epoch"] <= 5 and record["anomaly_outputs_max_abs_diff"] < 1e-4
    assert record["calibrated_on"] == "the bundle's synthetic cohort (seed 0)"
    assert record["gate"]["forced"] and not record["gate"]["passed"] and record["gate"]["n"] == 1
    assert record["gate"]["value"] == record["val_mae"] >= record["gate"]["source_head"] == record["val_mae_before"]
    # A new graph and weights; the normative model and the preprocessing are the source's.
    assert m.files["model.onnx"] != source.manifest.files["model.onnx"]
    assert m.files["weights.pt"] != source.manifest.files["weights.pt"]
    assert m.files["normative.npz"] == source.manifest.files["normative.npz"]
    assert m.preprocessing == source.manifest.preprocessing and m.age.supported
    assert "age_mae_healthy_calibration" in m.metrics
    # Only the age output moved, on any input.
    image = np.random.default_rng(1).uniform(-1, 1, (2, 1, 16, 16, 16)).astype(np.float32)
    before, after = (ort.InferenceSession(str(p / "model.onnx"), providers=["CPUExecutionProvider"])
                     for p in (out, refit))
    names = [o.name for o in before.get_outputs()]
    for name, a, b in zip(names, before.run(names, {"image": image}), after.run(names, {"image": image})):
        assert (np.abs(a - b).max() < 1e-4) == (name != "age"), name
    card = (refit / "MODEL_CARD.md").read_text()
    assert "Brain-age head refit" in card and "why the head was refit" in card
    assert "REFUSED by its gate: written only because --force was given" in card


def _mr_site_csv(folder: Path) -> Path:
    """A site's confirmed-normal MR studies with ages: NIfTI heads, two per split but one in test."""
    import csv

    import SimpleITK as sitk

    from headscreen.imaging import phantoms

    (folder / "scans").mkdir(parents=True)
    rows = []
    splits = ["train", "train", "train", "val", "val", "calibration", "calibration", "calibration", "test"]
    for i, split in enumerate(splits):
        age = 25.0 + 7.0 * i
        head = phantoms.make_head("MR", age=age, seed=700 + i, spacing=(2.0, 2.0, 2.0))
        path = folder / "scans" / f"n{i}.nii.gz"
        sitk.WriteImage(head.image, str(path))
        rows.append([f"scans/{path.name}", age, "F" if i % 2 else "M", "SITE-MR", split, "normal"])
    csv_path = folder / "site.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "age", "sex", "scanner", "split", "label"])
        writer.writerows(rows)
    return csv_path


def test_refit_age_on_a_sites_dataset_corrects_only_the_age_offset(
        tmp_path: Path, tiny_mr_bundle: tuple[Path, Path]) -> None:
    import onnxruntime as ort

    out, cache = tiny_mr_bundle
    site = _mr_site_csv(tmp_path / "site")
    refit = tmp_path / "models" / "mr-site-0.2.0"
    argv = [*REFIT_BASE, "--cache", str(cache), "--out", str(refit), "--init-from", str(out), "--refit-age",
            "--dataset", str(site)]
    assert main([*argv, "--age-extra", "2"]) == 2  # the site's own heads only
    assert not refit.exists()
    code = main(argv)
    source = load_bundle(out)
    if code == 3:  # no better on the site's two val heads: refused, nothing written; --force writes it
        assert not refit.exists()
        assert main([*argv, "--force"]) == 0
    else:
        assert code == 0
    m = load_bundle(refit).manifest
    record = m.training["age_refit"]
    assert record["mode"] == "site_offset" and record["data"] == f"dataset CSV {site}"
    assert record["n_train"] == 3 and record["n_val"] == 2 and record["gate"]["n"] == 2
    assert record["gate"]["passed"] == (code == 0) and record["gate"]["forced"] == (code == 3)
    assert {k: v["n"] for k, v in record["before"].items()} == {"train": 3, "val": 2, "calibration": 3, "test": 1}
    assert record["rows_left_out"] == 0
    # The train rows' median gap is the offset: afterwards it is 0 (their mean gap moved by as much).
    offset = record["offset_years"]
    assert record["after"]["train"]["mean_gap"] == pytest.approx(record["before"]["train"]["mean_gap"] - offset,
                                                                 abs=2e-3)
    assert record["anomaly_outputs_max_abs_diff"] < 1e-4 and record["score_unchanged"]
    # The age output moved by exactly the offset; nothing else moved; score and thresholds are the source's.
    image = np.random.default_rng(2).uniform(-1, 1, (2, 1, 16, 16, 16)).astype(np.float32)
    before, after = (ort.InferenceSession(str(p / "model.onnx"), providers=["CPUExecutionProvider"])
                     for p in (out, refit))
    names = [o.name for o in before.get_outputs()]
    for name, a, b in zip(names, before.run(names, {"image": image}), after.run(names, {"image": image})):
        if name == "age":
            np.testing.assert_allclose(b, a - offset, atol=1e-3)
        else:
            assert np.abs(a - b).max() < 1e-4, name
    assert m.calibration == source.manifest.calibration and m.score == source.manifest.score
    assert m.files["normative.npz"] == source.manifest.files["normative.npz"]
    assert m.age.validation_mae == pytest.approx(record["after"]["val"]["mae"])
    card = (refit / "MODEL_CARD.md").read_text()
    assert "Brain age corrected for a site" in card and f"healthy training heads of the dataset CSV {site}" in card
    assert "held-out healthy synthetic cases" in card  # the calibration stayed the source's
    # A recalibration keeps the bundle's synthetic cohort: a dataset is refused there.
    assert main([*REFIT_BASE, "--cache", str(cache), "--out", str(tmp_path / "recal"), "--init-from", str(out),
                 "--recalibrate", "--dataset", str(site)]) == 2
