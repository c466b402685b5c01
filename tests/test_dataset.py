"""The dataset CSV: NIfTI files and DICOM series folders, the console's manifest format,
validation with line numbers, the preprocessing cache, the training cohort and
`headscreen evaluate --dataset`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from headscreen.errors import ConfigError
from headscreen.imaging import phantoms
from headscreen.imaging.preprocess import default_params
from headscreen.model_training.cli import evaluate_main
from headscreen.model_training.dataset import build_dataset_cohort, load_volume, prepare_row, read_dataset

ROOT = Path(__file__).resolve().parents[1]
CT_BUNDLE = next(p for p in sorted((ROOT / "models").iterdir()) if p.name.startswith("ct-fanogan-compact-"))
CONSOLE_COLUMNS = ["path", "age", "sex", "scanner", "split", "label", "study_instance_uid", "modality"]


def _nifti(folder: Path, name: str, age: float, seed: int, lesion: phantoms.Lesion | None = None) -> Path:
    head = phantoms.make_head("CT", age=age, seed=seed, lesion=lesion, spacing=(2.0, 2.0, 2.0))
    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(head.image, str(path))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Five normals (one per split, two train), one abnormal in test; one DICOM folder."""
    folder = tmp_path_factory.mktemp("dataset")
    (folder / "scans").mkdir()
    rows = []
    for i, (split, age) in enumerate([("train", 30.0), ("train", 70.0), ("val", 45.0), ("calibration", 55.0)]):
        path = _nifti(folder / "scans", f"n{i}", age, seed=500 + i)
        rows.append([str(path.relative_to(folder)), age, "F" if i % 2 else "M", "SIM-CT", split, "normal", "", "CT"])
    dicom = folder / "storage" / "1.2.3" / "1.2.3.4"
    head = phantoms.make_head("CT", age=62.0, seed=520, spacing=(2.0, 2.0, 2.0))
    phantoms.write_dicom_series(head, dicom, rows=128, cols=128, slice_thickness=3.0, patient_age=62.0)
    rows.append([str(dicom), 62.0, "", "SIM-CT", "test", "normal", "1.2.3", "CT"])
    lesion = phantoms.Lesion("hemorrhage", (30.0, -10.0, 20.0), 30.0)
    path = _nifti(folder / "scans", "bleed", 58.0, seed=530, lesion=lesion)
    rows.append([str(path.relative_to(folder)), 58.0, "M", "SIM-CT", "test", "hemorrhage", "", "CT"])
    csv_path = folder / "manifest.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CONSOLE_COLUMNS)
        writer.writerows(rows)
    return csv_path


def test_reads_the_console_manifest_format(dataset: Path) -> None:
    rows = read_dataset(dataset)
    assert [r.split for r in rows] == ["train", "train", "val", "calibration", "test", "test"]
    assert [r.kind for r in rows] == ["normal"] * 5 + ["hemorrhage"]
    assert rows[4].path.is_dir() and rows[4].study_instance_uid == "1.2.3" and rows[4].modality == "CT"
    assert rows[0].path.is_absolute() and rows[0].path.is_file()
    assert load_volume(rows[4], "CT").image.GetSize()[2] > 20


@pytest.mark.parametrize("header,row,message", [
    ("path,age,sex,split", "x.nii.gz,3,F,train", "missing column"),
    ("path,age,sex,scanner,split", "nothere.nii.gz,40,F,S,train", "does not exist"),
    ("path,age,sex,scanner,split", "{ok},forty,F,S,train", "not a number"),
    ("path,age,sex,scanner,split", "{ok},40,F,S,holdout", "split"),
])
def test_bad_rows_are_reported_with_their_line(tmp_path: Path, dataset: Path, header: str, row: str,
                                               message: str) -> None:
    ok = read_dataset(dataset)[0].path
    bad = tmp_path / "bad.csv"
    bad.write_text(header + "\n" + row.format(ok=ok) + "\n")
    with pytest.raises(ConfigError, match=message):
        read_dataset(bad)


def test_preprocessing_is_cached(dataset: Path, tmp_path: Path) -> None:
    row = read_dataset(dataset)[0]
    params = default_params("CT")
    first = prepare_row(row, params, tmp_path)
    cached = list((tmp_path / "dataset").glob("*.npz"))
    assert len(cached) == 1 and first.image is not None and first.image.shape == tuple(params["grid"])
    second = prepare_row(row, params, tmp_path)
    np.testing.assert_array_equal(first.image, second.image)
    assert second.qc_reasons == first.qc_reasons
    # A change of parameters is a different cache entry.
    other = dict(params, smoothing_sigma_mm=float(params["smoothing_sigma_mm"]) + 0.5)
    prepare_row(row, other, tmp_path)
    assert len(list((tmp_path / "dataset").glob("*.npz"))) == 2


@pytest.mark.slow  # builds a training cohort
def test_training_cohort_from_the_csv(dataset: Path, tmp_path: Path) -> None:
    from headscreen.model_training.cohort import CohortSpec

    spec = CohortSpec("CT", n_train=2, n_val=1, n_calibration=1, n_test=1, n_anomalous_val=1, n_anomalous_test=1)
    cohort = build_dataset_cohort(dataset, default_params("CT"), tmp_path, spec, progress=False)
    assert {k: len(v) for k, v in cohort.healthy.items()} == {"train": 2, "val": 1, "calibration": 1, "test": 1}
    assert sorted(cohort.healthy["train"].ages.tolist()) == [30.0, 70.0]
    assert len(cohort.anomalous["test"]) == 1 and cohort.cases["anomalous_test"] == []  # the CSV's hemorrhage
    assert len(cohort.anomalous["val"]) == 1 and len(cohort.cases["anomalous_val"]) == 1  # synthetic stand-in
    assert cohort.healthy_masks["train"].shape == (2, *default_params("CT")["grid"])


@pytest.mark.slow  # evaluates a bundle on the CSV cohort
def test_headscreen_evaluate_on_the_csv(dataset: Path, tmp_path: Path, capsys) -> None:
    report = tmp_path / "report"
    argv = ["--bundle", str(CT_BUNDLE), "--dataset", str(dataset), "--report", str(report), "--bootstrap", "50"]
    assert evaluate_main(argv) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_scans"] == 6
    assert metrics["overall"]["system"]["n_abnormal"] == 1 and metrics["overall"]["system"]["n_normal"] == 5
    assert "hemorrhage" in metrics["per_type"]
    assert json.loads(capsys.readouterr().out)["source"].startswith("dataset ")


@pytest.mark.slow  # trains a bundle
def test_headscreen_train_on_the_csv_writes_a_bundle_that_records_it(dataset: Path, tmp_path: Path) -> None:
    from headscreen.bundle import load_bundle
    from headscreen.model_training.cli import main

    coarse = tmp_path / "coarse.json"
    coarse.write_text(json.dumps({"grid": [16, 16, 16], "working_spacing_mm": 4.0,
                                  "registration": {"atlas_spacing_mm": 4.0, "rigid": {"iterations": 20},
                                                   "affine": {"iterations": 10}}}))
    out = tmp_path / "models" / "ct-site-0.1.0"
    argv = ["--modality", "CT", "--method", "vae_ap", "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--dataset", str(dataset), "--n-anomalous", "2", "--epochs", "1", "--batch-size", "2",
            "--device", "cpu", "--threads", "1", "--no-progress", "--preprocessing", str(coarse),
            # one epoch on two scans: the floor is not tested here
            "--min-val-auroc", "0", "--beta", "0.001", "--denoise", "0.2"]
    assert main(argv) == 0
    manifest = load_bundle(out).manifest
    assert manifest.training["hyperparameters"]["beta"] == 0.001
    assert manifest.training["hyperparameters"]["denoise_sigma"] == 0.2
    assert manifest.training["data"] == f"dataset CSV {dataset}"
    assert manifest.training["n_train"] == 2
    assert "--dataset" in manifest.training["command"]


def test_rows_the_daemon_would_screen_stay_in_training_and_calibration() -> None:
    """An advisory QC reason (a suspected skull defect) keeps a normal row: the daemon screens
    such a study, so its calibration must see it. A blocking one (registration) drops it."""
    from headscreen.model_training.dataset import DatasetRow, PreparedRow, training_arrays

    def prepared(age: float, *reasons: str) -> PreparedRow:
        row = DatasetRow(Path(f"{age}.nii.gz"), age, "F", "SIM-CT", "calibration", "normal")
        return PreparedRow(row, np.full((2, 2, 2), age, np.float32), np.ones((2, 2, 2), bool), reasons)

    rows = [prepared(30.0), prepared(40.0, "skull_defect: skull_coverage 0 outside [0.12, 1]"),
            prepared(50.0, "registration_poor: head_dice 0.85 outside [0.92, 1]")]
    _, ages = training_arrays(rows, "calibration")
    assert ages.tolist() == [30.0, 40.0]
    assert training_arrays(rows, "calibration", drop_qc=False)[1].tolist() == [30.0, 40.0, 50.0]


def test_with_no_val_rows_a_quarter_of_the_train_rows_across_the_ages_is_held_out() -> None:
    """The console's export marks every row train: a site's age correction still needs
    rows to judge it on."""
    from headscreen.model_training.dataset import DatasetRow, PreparedRow, hold_out_validation

    def prepared(age: float | None, split: str = "train", label: str = "normal") -> PreparedRow:
        row = DatasetRow(Path(f"{age}.nii.gz"), age, "F", "SITE", split, label)
        return PreparedRow(row, np.zeros((2, 2, 2), np.float32), np.ones((2, 2, 2), bool), ())

    ages = [float(a) for a in np.random.default_rng(3).permutation(np.arange(20, 84, 4))]  # 16 rows
    rows = [prepared(a) for a in ages] + [prepared(None), prepared(50.0, "train", "hemorrhage")]
    moved, n = hold_out_validation(rows)
    held = sorted(p.row.age for p in moved if p.row.split == "val")
    assert n == 4 and held == [28.0, 44.0, 60.0, 76.0]  # every 4th by age: young to old
    assert [p.row.age for p in moved] == [p.row.age for p in rows]  # order and rows kept
    assert moved[-2].row.split == moved[-1].row.split == "train"  # no age, or abnormal: never val
    # A CSV with val rows of its own is left as it is.
    with_val = [*rows, prepared(40.0, "val")]
    kept, n = hold_out_validation(with_val)
    assert n == 0 and kept is with_val
