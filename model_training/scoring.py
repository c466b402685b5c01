"""Run an exported graph with ONNX Runtime and score samples the way the daemon does.

Calibration and the model card's metrics are computed from the exported ONNX
graph, not from PyTorch, so they describe exactly what the daemon will run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.metrics import average_precision_score, roc_auc_score

from headscreen.model_training.runtime import Samples


@dataclass(frozen=True)
class Scored:
    terms: dict[str, np.ndarray]  # score term -> [N]
    age: np.ndarray | None  # predicted age [N] or None
    error_maps: np.ndarray  # [N, D, H, W]
    chronological_age: np.ndarray

    def combined(self, weights: dict[str, float], age_gap_weight: float) -> np.ndarray:
        """score = sum(weight[t] * term[t]) (+ age_gap_weight * |age - chronological|)."""
        score = sum(w * self.terms[t] for t, w in weights.items())
        if self.age is not None and age_gap_weight:
            score = score + age_gap_weight * np.abs(self.age - self.chronological_age)
        return np.asarray(score, dtype=np.float64)

    def age_gap(self) -> np.ndarray | None:
        return None if self.age is None else self.age - self.chronological_age


class OnnxScorer:
    def __init__(self, path: Path, threads: int = 2) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def score(self, samples: Samples, chunk: int = 4, keep_maps: bool = True) -> Scored:
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for start in range(0, len(samples), chunk):
            feeds = {"image": samples.images[start : start + chunk, None].astype(np.float32)}
            if "chronological_age" in self.inputs:
                feeds["chronological_age"] = samples.ages[start : start + chunk].astype(np.float32)
            for name, value in zip(self.outputs, self.session.run(self.outputs, feeds)):
                if name != "error_map" or keep_maps:
                    parts[name].append(value)
        joined = {name: np.concatenate(v) for name, v in parts.items() if v}
        maps = joined.pop("error_map")[:, 0] if keep_maps else np.zeros((0,))
        age = joined.pop("age", None)
        return Scored(terms=joined, age=age, error_maps=maps, chronological_age=samples.ages.astype(np.float64))


def rank_auroc(healthy: np.ndarray, anomalous: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic: P(anomalous > healthy) + P(tie) / 2.
    Independent of scikit-learn, which `detection_metrics` uses; tests compare the two."""
    healthy, anomalous = np.asarray(healthy, float), np.asarray(anomalous, float)
    greater = (anomalous[:, None] > healthy[None, :]).sum()
    ties = (anomalous[:, None] == healthy[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(healthy) * len(anomalous)))


def detection_metrics(healthy: np.ndarray, anomalous: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """AUROC/AUPRC of anomalous (positive) vs healthy; sensitivity and specificity at a threshold."""
    labels = np.r_[np.zeros(len(healthy)), np.ones(len(anomalous))]
    scores = np.r_[healthy, anomalous]
    out = {
        "auroc": float(roc_auc_score(labels, scores)),
        "auroc_mann_whitney": rank_auroc(healthy, anomalous),
        "auprc": float(average_precision_score(labels, scores)),
        "n_healthy": int(len(healthy)),
        "n_anomalous": int(len(anomalous)),
    }
    if threshold is not None:
        out["sensitivity_at_threshold"] = float(np.mean(anomalous > threshold))
        out["specificity_at_threshold"] = float(np.mean(healthy <= threshold))
    return out


def age_mae(scored: Scored) -> float | None:
    gap = scored.age_gap()
    return None if gap is None else float(np.mean(np.abs(gap)))
