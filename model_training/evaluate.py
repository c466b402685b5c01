"""Evaluation of a bundle on a labelled set: the numbers and the report folder.

Sample level: AUROC, AUPRC and the best specificity at 100 % sensitivity, each with a
stratified bootstrap 95 % CI, overall and per anomaly type (each type against all
normals). Voxel level, where masks exist: AUPRC and best Dice of the error map within
the brain. Age: MAE on normal and abnormal scans. Scans are scored with
`headscreen.inference.BundleRunner` (exactly what the daemon runs), torch-free.

A scan the daemon would not pass as normal without a model score (preprocessing
rejects it, or QC flags it) gets the "system" score +inf: it goes to a person, so it is
caught. Both the model-only and the system numbers are reported.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from headscreen.bundle import Bundle
from headscreen.errors import InputRejected
from headscreen.imaging.preprocess import preprocess
from headscreen.imaging.volume import Volume
from headscreen.inference import BundleRunner

log = logging.getLogger(__name__)

MetricFn = Callable[[np.ndarray, np.ndarray], float]


@dataclass
class Record:
    """One evaluated scan. `model_score` is None when preprocessing rejected the scan."""

    case_id: str
    kind: str  # "normal" or an anomaly type
    label: int
    model_score: float | None
    qc_reasons: list[str]
    rejected: str | None = None
    true_age: float | None = None
    predicted_age: float | None = None
    hemorrhage_ml: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Voxel level (model grid); not written to metrics.json.
    error_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    brain: np.ndarray | None = None

    @property
    def flagged_by_qc(self) -> bool:
        return self.rejected is not None or bool(self.qc_reasons)

    @property
    def system_score(self) -> float:
        return math.inf if self.flagged_by_qc or self.model_score is None else float(self.model_score)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("error_map", "mask", "brain"):
            out.pop(key)
        return out


# ---------------------------------------------------------------- metrics


def specificity_at_full_sensitivity(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best specificity with every positive detected: the threshold is the lowest positive score."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    threshold = scores[labels == 1].min()
    return float(np.mean(scores[labels == 0] < threshold))


METRICS: dict[str, MetricFn] = {
    "auroc": lambda y, s: float(roc_auc_score(y, s)),
    "auprc": lambda y, s: float(average_precision_score(y, s)),
    "specificity_at_100_sensitivity": specificity_at_full_sensitivity,
}


def finite_scores(scores: Sequence[Any]) -> np.ndarray:
    """+inf (caught by QC) becomes just above the highest finite score: same ranks, and
    scikit-learn accepts it."""
    values = np.asarray(scores, dtype=float)
    finite = values[np.isfinite(values)]
    ceiling = (finite.max() + 1.0 + abs(finite.max())) if len(finite) else 1.0
    return np.where(np.isfinite(values), values, ceiling)


def bootstrap_ci(metric: MetricFn, labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI, resampling positives and negatives separately so every
    resample has both classes. Deterministic for a seed."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.r_[rng.choice(neg, len(neg)), rng.choice(pos, len(pos))]
        values[b] = metric(labels[idx], scores[idx])
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def sample_metrics(labels: Sequence[int], scores: Sequence[Any], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    labels_a, scores_a = np.asarray(labels, dtype=int), finite_scores(scores)
    out: dict[str, Any] = {"n_normal": int((labels_a == 0).sum()), "n_abnormal": int((labels_a == 1).sum())}
    if out["n_normal"] == 0 or out["n_abnormal"] == 0:
        return out
    for name, fn in METRICS.items():
        low, high = bootstrap_ci(fn, labels_a, scores_a, n_boot, seed)
        out[name] = {"value": fn(labels_a, scores_a), "ci95": [low, high]}
    return out


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return float(2.0 * np.logical_and(prediction, truth).sum() / total) if total else 1.0


def voxel_metrics(maps: Sequence[Any], masks: Sequence[Any], brains: Sequence[Any],
                  n_thresholds: int = 64) -> dict[str, Any]:
    """Pooled over scans, within the brain: AUPRC of the error map for the anomaly mask,
    and the best Dice over thresholds of the map (one threshold for all scans)."""
    values = np.concatenate([m[b] for m, b in zip(maps, brains)]).astype(np.float64)
    truth = np.concatenate([t[b] for t, b in zip(masks, brains)]).astype(bool)
    if not truth.any() or truth.all():
        return {"n_scans": len(maps), "n_voxels": int(truth.size), "n_anomalous_voxels": int(truth.sum())}
    thresholds = np.unique(np.quantile(values, np.linspace(0.5, 0.9999, n_thresholds)))
    dices = [dice(values > t, truth) for t in thresholds]
    best = int(np.argmax(dices))
    return {"n_scans": len(maps), "n_voxels": int(truth.size), "n_anomalous_voxels": int(truth.sum()),
            "auprc": float(average_precision_score(truth, values)),
            "best_dice": float(dices[best]), "best_dice_threshold": float(thresholds[best])}


def age_metrics(records: Iterable[Record], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """MAE and mean gap (predicted - true) per label. For healthy heads also the MAE's
    percentile-bootstrap 95 % CI (a dozen heads put a year either side of it) and the
    slope of predicted on true age (below 1: regression to the mean, the usual brain-age bias)."""
    out: dict[str, Any] = {}
    for name, label in (("normal", 0), ("abnormal", 1)):
        pairs = np.array([(r.true_age, r.predicted_age) for r in records if r.label == label
                          and r.predicted_age is not None and r.true_age is not None], dtype=float).reshape(-1, 2)
        if not len(pairs):
            continue
        gaps = pairs[:, 1] - pairs[:, 0]
        out[f"age_mae_{name}"] = float(np.mean(np.abs(gaps)))
        out[f"age_mean_gap_{name}"] = float(np.mean(gaps))
        out[f"n_{name}"] = len(gaps)
        if label == 0 and len(gaps) > 1:
            rng = np.random.default_rng(seed)
            maes = np.abs(gaps)[rng.integers(0, len(gaps), (n_boot, len(gaps)))].mean(axis=1)
            out["age_mae_normal_ci95"] = [float(v) for v in np.percentile(maes, [2.5, 97.5])]
            if np.ptp(pairs[:, 0]) > 0:
                out["age_slope_normal"] = float(np.polyfit(pairs[:, 0], pairs[:, 1], 1)[0])
    return out


def evaluate_records(records: Sequence[Record], n_boot: int = 1000, seed: int = 0,
                     min_hemorrhage_ml: float = 5.0) -> dict[str, Any]:
    """All numbers of the report, from scored records."""
    records = list(records)
    normals = [r for r in records if r.label == 0]
    scored = [r for r in records if r.model_score is not None]

    def block(subset: list[Record]) -> dict[str, Any]:
        chosen = normals + [r for r in subset if r.label == 1]
        with_model = [r for r in chosen if r.model_score is not None]
        return {
            "system": sample_metrics([r.label for r in chosen], [r.system_score for r in chosen], n_boot, seed),
            "model_only": sample_metrics([r.label for r in with_model], [r.model_score for r in with_model],
                                         n_boot, seed),
            "qc_flagged": int(sum(r.flagged_by_qc for r in subset if r.label == 1)),
            "rejected": int(sum(r.rejected is not None for r in subset if r.label == 1)),
        }

    kinds = sorted({r.kind for r in records if r.label == 1})
    out: dict[str, Any] = {
        "n_scans": len(records), "n_rejected": sum(r.rejected is not None for r in records),
        "normals_flagged_by_qc": sum(r.flagged_by_qc for r in normals),
        "overall": block(records),
        "per_type": {k: block([r for r in records if r.kind == k]) for k in kinds},
    }
    large = [r for r in records if r.hemorrhage_ml is not None and r.hemorrhage_ml >= min_hemorrhage_ml]
    if large:
        out[f"hemorrhage_ge_{min_hemorrhage_ml:g}ml"] = block(large)
    voxel = {}
    for k in kinds:
        with_masks = [r for r in scored if r.kind == k and r.mask is not None and r.error_map is not None]
        if with_masks:
            voxel[k] = voxel_metrics([r.error_map for r in with_masks], [r.mask for r in with_masks],
                                     [r.brain for r in with_masks])
    out["voxel"] = voxel
    out["age"] = age_metrics(scored, n_boot, seed)
    return out


# ---------------------------------------------------------------- scoring with the daemon's runner


def score_volume(runner: BundleRunner, volume: Volume, case_id: str, kind: str, label: int,
                 true_age: float | None, mask: sitk.Image | None = None, local: bool = False,
                 keep_maps: bool = True, **extra: Any) -> Record:
    """Preprocess (the bundle's parameters) and run the model, as the daemon does."""
    params = runner.bundle.manifest.preprocessing
    record = Record(case_id, kind, label, None, [], true_age=true_age, **extra)
    try:
        prepared = preprocess(volume, params)
    except InputRejected as exc:
        record.rejected = str(exc)
        return record
    inference = runner.run(prepared.model_input, true_age if runner.bundle.manifest.age.supported else None,
                           brain_mask=prepared.brain_mask)
    record.model_score = inference.anomaly_score
    record.qc_reasons = list(prepared.qc_reasons)
    record.predicted_age = inference.predicted_age
    if keep_maps and local and mask is not None:
        # The mask goes through the very registration the image took (nearest neighbour).
        on_grid = sitk.Resample(mask, prepared.reference, prepared.transform, sitk.sitkNearestNeighbor, 0,
                                sitk.sitkUInt8)
        record.mask = sitk.GetArrayFromImage(on_grid).astype(bool)
        record.error_map = inference.error_map
        record.brain = np.asarray(prepared.brain_mask, dtype=bool)
    return record


# ---------------------------------------------------------------- report


def write_report(records: Sequence[Record], metrics: dict[str, Any], out_dir: Path,
                 meta: dict[str, Any] | None = None) -> list[Path]:
    """metrics.json, records.json and PNG plots (ROC, score histograms, age)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "metrics.json", out_dir / "records.json"]
    written[0].write_text(json.dumps({**(meta or {}), **metrics}, indent=2, default=_json_default) + "\n")
    written[1].write_text(json.dumps([r.summary() for r in records], indent=1, default=_json_default) + "\n")
    normals = [r for r in records if r.label == 0 and r.model_score is not None]
    kinds = sorted({r.kind for r in records if r.label == 1})

    fig, ax = plt.subplots(figsize=(7, 6))
    colours = plt.cm.tab20(np.linspace(0.0, 1.0, max(len(kinds), 1)))
    styles = ["-", "--", "-.", ":"]
    for i, kind in enumerate(["all", *kinds]):
        positives = [r for r in records
                     if r.label == 1 and (kind == "all" or r.kind == kind) and r.model_score is not None]
        if not positives or not normals:
            continue
        y = np.r_[np.zeros(len(normals)), np.ones(len(positives))]
        s = np.r_[[r.model_score for r in normals], [r.model_score for r in positives]]
        fpr, tpr, _ = roc_curve(y, s)
        look = {"color": "black", "lw": 2.5} if kind == "all" else {"color": colours[i - 1], "lw": 1.3,
                                                                     "ls": styles[(i - 1) % len(styles)]}
        ax.plot(fpr, tpr, label=f"{kind} (AUROC {roc_auc_score(y, s):.2f})", **look)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, model score (per anomaly type vs normals)")
    ax.legend(fontsize=7, loc="lower right")
    written.append(_save(fig, out_dir / "roc.png", plt))

    fig, ax = plt.subplots(figsize=(7, 5))
    scores = [r.model_score for r in records if r.model_score is not None]
    if scores:
        bins = np.histogram_bin_edges(scores, bins=30)
        edges = list(bins)
        ax.hist(np.array([r.model_score for r in normals], float), bins=edges, alpha=0.6, label="normal")
        ax.hist(np.array([r.model_score for r in records if r.label == 1 and r.model_score is not None], float),
                bins=edges, alpha=0.6, label="abnormal")
    if meta and meta.get("threshold") is not None:
        ax.axvline(meta["threshold"], color="k", ls="--", label="bundle threshold")
    ax.set(xlabel="anomaly score", ylabel="scans", title="Score histogram")
    ax.legend()
    written.append(_save(fig, out_dir / "score_histogram.png", plt))

    aged = [r for r in records if r.predicted_age is not None and r.true_age is not None]
    if aged:
        fig, ax = plt.subplots(figsize=(6, 6))
        for label, name in ((0, "normal"), (1, "abnormal")):
            chosen = [r for r in aged if r.label == label]
            ax.scatter(np.array([r.true_age for r in chosen], float),
                       np.array([r.predicted_age for r in chosen], float),
                       s=14, label=name)
        both = np.array([[r.true_age, r.predicted_age] for r in aged], float)
        low, high = float(both.min()), float(both.max())
        ax.plot([low, high], [low, high], "k:", lw=0.8)
        ax.set(xlabel="true age (years)", ylabel="predicted age (years)", title="Brain age")
        ax.legend()
        written.append(_save(fig, out_dir / "age.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def load_runner(bundle: Bundle, threads: int = 2) -> BundleRunner:
    return BundleRunner(bundle, intra_op_threads=threads)


def score_suite(runner: BundleRunner, cases: Sequence[Any], keep_maps: bool = True,
                progress: Callable[[int, int], None] | None = None) -> list[Record]:
    """Synthesize and score suite cases (model_training.anomalies) one at a time."""
    from headscreen.model_training.anomalies import ANOMALY_TYPES, make_scan

    records = []
    for i, case in enumerate(cases):
        scan = make_scan(case)
        volume = Volume.from_image(scan.image, case.modality, series_uid=f"synthetic.{case.seed}")
        local = case.kind in ANOMALY_TYPES and ANOMALY_TYPES[case.kind].local
        records.append(score_volume(runner, volume, case.case_id, case.kind, case.label, case.age, scan.mask, local,
                                    keep_maps, hemorrhage_ml=scan.hemorrhage_ml,
                                    details={k: v for k, v in scan.details.items()}))
        if progress is not None:
            progress(i + 1, len(cases))
    return records
