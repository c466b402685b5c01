"""A dataset a hospital can produce: a CSV of NIfTI files or DICOM series folders.

Columns: path, age, sex, scanner, split[, label][, study_instance_uid, modality] — the
admin console's training manifest (daemon/web/actions.py MANIFEST_COLUMNS) is accepted
as it is. `path` is a NIfTI file (.nii, .nii.gz) or a folder holding one DICOM series,
relative to the CSV's folder unless absolute. `label`: blank, "normal", "healthy" or
"0" is normal; anything else (e.g. "1", "hemorrhage") is abnormal and names its type.

Each row is preprocessed with imaging.preprocess (the bundle's parameters) and cached as
an npz keyed by the parameters, imaging's code and the file's path, size and mtime.
Torch-free, so the evaluation side can use it without the training stack.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from headscreen import imaging
from headscreen.errors import ConfigError, InputRejected
from headscreen.imaging.preprocess import preprocess
from headscreen.imaging.qc import blocking_reasons
from headscreen.imaging.volume import Volume, load_series

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "age", "sex", "scanner", "split")
SPLITS = ("train", "val", "calibration", "test")
NORMAL_LABELS = ("", "normal", "healthy", "0")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class DatasetRow:
    path: Path
    age: float | None
    sex: str
    scanner: str
    split: str
    label: str  # "" for normal, else the anomaly type or "1"
    modality: str | None = None
    study_instance_uid: str | None = None

    @property
    def is_normal(self) -> bool:
        return self.label.strip().lower() in NORMAL_LABELS

    @property
    def kind(self) -> str:
        if self.is_normal:
            return "normal"
        return "abnormal" if self.label.strip() == "1" else self.label.strip()


@dataclass(frozen=True)
class PreparedRow:
    row: DatasetRow
    image: np.ndarray | None  # model input (D, H, W) float32; None when rejected
    brain_mask: np.ndarray | None
    qc_reasons: tuple[str, ...]
    rejected: str | None = None


def read_dataset(csv_path: Path | str) -> list[DatasetRow]:
    """Parse and check the CSV; every problem is reported with its line number."""
    csv_path = Path(csv_path)
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ConfigError(f"{csv_path}: missing column(s) {missing}; need {list(REQUIRED_COLUMNS)}")
        rows = [_row(csv_path, line, {k.strip(): (v or "").strip() for k, v in raw.items() if k})
                for line, raw in enumerate(reader, start=2)]
    if not rows:
        raise ConfigError(f"{csv_path}: no rows")
    return rows


def _row(csv_path: Path, line: int, raw: dict[str, str]) -> DatasetRow:
    where = f"{csv_path}:{line}"
    if not raw["path"]:
        raise ConfigError(f"{where}: empty path")
    path = Path(raw["path"])
    path = path if path.is_absolute() else csv_path.parent / path
    if not path.exists():
        raise ConfigError(f"{where}: {path} does not exist")
    try:
        age = float(raw["age"]) if raw["age"] else None
    except ValueError:
        raise ConfigError(f"{where}: age {raw['age']!r} is not a number") from None
    split = raw["split"].lower()
    if split not in SPLITS:
        raise ConfigError(f"{where}: split {raw['split']!r} is not one of {SPLITS}")
    modality = raw.get("modality") or None
    return DatasetRow(path, age, raw["sex"], raw["scanner"], split, raw.get("label", ""),
                      modality.upper() if modality else None, raw.get("study_instance_uid") or None)


def load_volume(row: DatasetRow, modality: str) -> Volume:
    """A NIfTI file (geometry from its header) or a folder of one DICOM series."""
    if row.modality and row.modality != modality:
        raise InputRejected(f"modality_mismatch: row is {row.modality}, the bundle is for {modality}")
    if row.path.is_dir():
        files = sorted(p for p in row.path.iterdir() if p.is_file() and not p.name.startswith("."))
        return load_series(files)
    if row.path.name.lower().endswith(NIFTI_SUFFIXES):
        image = sitk.Cast(sitk.ReadImage(str(row.path)), sitk.sitkFloat32)
        return Volume.from_image(image, modality, series_uid=f"nifti.{row.path.name}")
    raise InputRejected(f"unsupported_file: {row.path.name} is neither NIfTI nor a DICOM folder")


def imaging_fingerprint() -> str:
    """Hash of imaging's source (as model_training.cohort does, which imports torch): a
    cached row is reused only while the preprocessing code is unchanged."""
    digest = hashlib.sha256()
    for path in sorted(Path(imaging.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_key(row: DatasetRow, params: dict[str, Any]) -> str:
    stat = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in
            (sorted(row.path.iterdir()) if row.path.is_dir() else [row.path])]
    blob = json.dumps([str(row.path.resolve()), stat, params, imaging_fingerprint()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def prepare_row(row: DatasetRow, params: dict[str, Any], cache_dir: Path | None) -> PreparedRow:
    """Preprocess one row exactly as the daemon would, or read it from the cache."""
    path = Path(cache_dir) / "dataset" / f"{_cache_key(row, params)}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as cached:
            rejected = str(cached["rejected"]) or None
            return PreparedRow(row, None if rejected else cached["image"], None if rejected else cached["brain_mask"],
                               tuple(json.loads(str(cached["qc"]))), rejected)
    try:
        result = preprocess(load_volume(row, params["modality"]), params)
        prepared = PreparedRow(row, np.asarray(result.model_input, np.float32), np.asarray(result.brain_mask, bool),
                               tuple(result.qc_reasons))
    except InputRejected as exc:
        log.warning("dataset row rejected", extra={"action": "dataset_row_rejected", "reason": str(exc)})
        prepared = PreparedRow(row, None, None, (), str(exc))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        empty = np.zeros((0,), np.float32)
        np.savez_compressed(tmp, image=prepared.image if prepared.image is not None else empty,
                            brain_mask=prepared.brain_mask if prepared.brain_mask is not None else empty,
                            qc=json.dumps(list(prepared.qc_reasons)), rejected=prepared.rejected or "")
        tmp.replace(path)
    return prepared


def prepare_dataset(rows: list[DatasetRow], params: dict[str, Any], cache_dir: Path | None) -> Iterator[PreparedRow]:
    for row in rows:
        yield prepare_row(row, params, cache_dir)


def _stack(arrays: list[Any]) -> np.ndarray:
    return np.stack(arrays)


def training_arrays(prepared: list[PreparedRow], split: str, drop_qc: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, D, H, W) and ages of one split's usable normal rows (the training input)."""
    chosen = [p for p in prepared if p.row.split == split and p.row.is_normal and p.image is not None
              and not (drop_qc and blocking_reasons(list(p.qc_reasons))) and p.row.age is not None]
    if not chosen:
        raise ConfigError(f"split {split!r}: no usable normal rows with an age")
    return _stack([p.image for p in chosen]).astype(np.float32), np.array([p.row.age for p in chosen], np.float32)


def hold_out_validation(prepared: list[PreparedRow], every: int = 4) -> tuple[list[PreparedRow], int]:
    """With no normal val rows (the console's export marks every row train), every
    `every`-th normal train row with an age, in order of age, becomes a val row: the held
    out rows span the ages. Returns the rows and how many were moved (0: val rows exist)."""
    if any(p.row.split == "val" and p.row.is_normal for p in prepared):
        return prepared, 0
    train = sorted((i for i, p in enumerate(prepared) if p.row.split == "train" and p.row.is_normal
                    and p.row.age is not None), key=lambda i: (prepared[i].row.age, i))
    moved = set(train[every // 2::every])
    out = [dataclasses.replace(p, row=dataclasses.replace(p.row, split="val")) if i in moved else p
           for i, p in enumerate(prepared)]
    return out, len(moved)


def build_dataset_cohort(csv_path: Path | str, params: dict[str, Any], cache_dir: Path | None, spec: Any,
                         progress: bool = True) -> Any:
    """A training Cohort (model_training.cohort) from the CSV: normal rows by split; abnormal
    rows of val/test as the anomalous sets. A hospital's normal-only manifest has no
    abnormal rows, so those fall back to the synthetic lesion cases (recorded as such)."""
    from headscreen.model_training.cohort import Cohort, anomalous_cases, prepare_case  # torch side: imported on use
    from headscreen.model_training.runtime import Samples

    rows = read_dataset(csv_path)
    modality = params["modality"]
    prepared = [p for p in prepare_dataset(rows, params, cache_dir)]
    cohort = Cohort(spec=spec, params=params, healthy={}, healthy_masks={}, anomalous={})
    for split in SPLITS:
        usable = [p for p in prepared if p.row.split == split and p.row.is_normal and p.image is not None
                  and p.row.age is not None]
        kept = [p for p in usable if not blocking_reasons(list(p.qc_reasons))]  # as the daemon screens
        cohort.qc_excluded += len(usable) - len(kept)
        if not kept:
            raise ConfigError(f"{csv_path}: split {split!r} has no usable normal {modality} rows with an age")
        cohort.healthy[split] = Samples(_stack([p.image for p in kept]).astype(np.float32),
                                        np.array([p.row.age for p in kept], np.float32))
        cohort.healthy_masks[split] = _stack([p.brain_mask for p in kept])
        cohort.cases[split] = []
    synthetic = anomalous_cases(modality, spec.n_anomalous_val + spec.n_anomalous_test, spec.seed, spec.randomise)
    for split, fallback in (("val", synthetic[: spec.n_anomalous_val]), ("test", synthetic[spec.n_anomalous_val:])):
        abnormal = [p for p in prepared if p.row.split == split and not p.row.is_normal and p.image is not None]
        if abnormal:
            cohort.anomalous[split] = Samples(_stack([p.image for p in abnormal]).astype(np.float32),
                                              np.array([p.row.age or 0.0 for p in abnormal], np.float32))
            cohort.anomalous_masks[split] = _stack([p.brain_mask for p in abnormal])
            cohort.cases[f"anomalous_{split}"] = []
        else:
            log.warning("no abnormal rows: synthetic lesions stand in",
                        extra={"action": "dataset_synthetic_anomalies", "split": split, "n": len(fallback)})
            stand_ins = [prepare_case(c, params, cache_dir) for c in fallback]
            cohort.anomalous[split] = Samples(np.stack([p.image for p in stand_ins]).astype(np.float32),
                                              np.array([c.age for c in fallback], np.float32))
            cohort.anomalous_masks[split] = np.stack([p.brain_mask for p in stand_ins])
            cohort.cases[f"anomalous_{split}"] = fallback
    log.info("dataset cohort ready", extra={"action": "dataset_cohort_ready", "rows": len(rows),
                                            "n_train": len(cohort.healthy["train"]), "qc_excluded": cohort.qc_excluded})
    return cohort
