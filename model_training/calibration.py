"""Calibration on held-out healthy data, and the score-weight grid search.

The daemon reads the result from the manifest: the sorted healthy reference
scores (for percentiles), the threshold at the chosen specificity (a score
above it screens positive) and `error_map_scale`, the healthy voxel-error 99th
percentile that sets the overlay colour range.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from model_training.losses import anomaly_score

log = logging.getLogger(__name__)

DEFAULT_SPECIFICITY = 0.95
ERROR_MAP_PERCENTILE = 99.0


@dataclass(frozen=True)
class Calibration:
    reference_scores: list[float]
    threshold: float
    specificity: float
    error_map_scale: float
    n: int

    def as_manifest(self) -> dict[str, object]:
        return {
            "reference_scores": self.reference_scores,
            "threshold": self.threshold,
            "specificity": self.specificity,
            "error_map_scale": self.error_map_scale,
            "n": self.n,
        }


def threshold_at_specificity(healthy_scores: np.ndarray, specificity: float = DEFAULT_SPECIFICITY) -> float:
    """The smallest healthy score t with at least `specificity` of healthy scores <= t."""
    if not 0 < specificity < 1:
        raise ValueError(f"specificity must be in (0, 1), got {specificity}")
    scores = np.sort(np.asarray(healthy_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("healthy_scores must not be empty")
    k = math.ceil(specificity * scores.size)
    return float(scores[k - 1])


def error_map_scale(error_maps: np.ndarray, masks: np.ndarray | None = None) -> float:
    """99th percentile of healthy voxel errors, inside the brain masks when given."""
    values = error_maps[masks] if masks is not None else error_maps.ravel()
    if values.size == 0:
        raise ValueError("no voxels to calibrate the error map scale on")
    scale = float(np.percentile(values, ERROR_MAP_PERCENTILE))
    # A perfect reconstruction would give 0; the manifest needs a positive scale.
    return max(scale, 1e-6)


def calibrate(
    healthy_scores: np.ndarray,
    healthy_error_maps: np.ndarray,
    masks: np.ndarray | None = None,
    specificity: float = DEFAULT_SPECIFICITY,
) -> Calibration:
    scores = sorted(float(s) for s in np.asarray(healthy_scores).ravel())
    result = Calibration(
        reference_scores=scores,
        threshold=threshold_at_specificity(np.asarray(scores), specificity),
        specificity=specificity,
        error_map_scale=error_map_scale(healthy_error_maps, masks),
        n=len(scores),
    )
    log.info("calibrated", extra={"action": "calibrate", "n": result.n, "threshold": result.threshold,
                                  "error_map_scale": result.error_map_scale})
    return result


@dataclass(frozen=True)
class ScoreWeights:
    rec: float
    kl: float
    age_gap: float
    validation_auroc: float


_MULTIPLIERS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)


def _spread(values: np.ndarray) -> float:
    spread = float(np.std(values))
    return spread if spread > 0 else 1.0


def select_vae_weights(
    healthy: dict[str, np.ndarray], anomalous: dict[str, np.ndarray]
) -> ScoreWeights:
    """Small grid search on validation data (MR paper): beta = 1 on KL, alpha on
    rec and gamma on |age gap| from a grid. The terms differ by orders of
    magnitude, so the grid is expressed in units of each term's healthy spread
    relative to KL's. Each dict holds `rec`, `kl` and optionally `age_gap` [N]."""
    labels = np.r_[np.zeros(len(healthy["kl"])), np.ones(len(anomalous["kl"]))]
    rec = np.r_[healthy["rec"], anomalous["rec"]]
    kl = np.r_[healthy["kl"], anomalous["kl"]]
    has_age = "age_gap" in healthy and "age_gap" in anomalous
    gap = np.r_[healthy["age_gap"], anomalous["age_gap"]] if has_age else None
    kl_spread = _spread(healthy["kl"])
    alpha_unit = kl_spread / _spread(healthy["rec"])
    gamma_unit = kl_spread / _spread(np.abs(healthy["age_gap"])) if has_age else 0.0
    candidates = []
    gammas = _MULTIPLIERS if has_age else (0.0,)
    for a, g in itertools.product(_MULTIPLIERS, gammas):
        alpha, gamma = a * alpha_unit, g * gamma_unit
        score = anomaly_score(rec, kl, gap, alpha, 1.0, gamma)
        auroc = float(roc_auc_score(labels, score))
        candidates.append(ScoreWeights(rec=alpha, kl=1.0, age_gap=gamma, validation_auroc=auroc))
    # max() keeps the first of equals: the grid starts at the simplest weights.
    best = max(candidates, key=lambda w: w.validation_auroc)
    log.info("score weights", extra={"action": "score_weights", **best.__dict__})
    return best
