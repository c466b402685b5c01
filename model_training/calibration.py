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
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

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
    seg_threshold: float | None = None
    seg_grow: float | None = None

    def as_manifest(self) -> dict[str, object]:
        out: dict[str, object] = {
            "reference_scores": self.reference_scores,
            "threshold": self.threshold,
            "specificity": self.specificity,
            "error_map_scale": self.error_map_scale,
            "n": self.n,
        }
        if self.seg_threshold is not None:
            out["seg_threshold"] = self.seg_threshold
        if self.seg_grow is not None:
            out["seg_grow"] = self.seg_grow
        return out


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
    """Weight of each score term (`age_gap` weighs |age gap|) and the validation AUROC."""

    terms: dict[str, float]
    validation_auroc: float

    def get(self, term: str) -> float:
        return self.terms.get(term, 0.0)


# Relative weights in units of each term's healthy spread. Only combinations whose
# largest multiplier is 1 are tried: scaling every weight alike ranks cases alike.
_MULTIPLIERS = (0.0, 0.3, 1.0, 3.0)


def _spread(values: np.ndarray) -> float:
    spread = float(np.std(values))
    return spread if spread > 0 else 1.0


def _ranking(labels: np.ndarray, score: np.ndarray) -> tuple[float, float, float]:
    """AUROC first; among equals (a small validation set saturates it), sensitivity
    at 95 % specificity, then how far the anomalies lie in healthy spreads."""
    healthy, anomalous = score[labels == 0], score[labels == 1]
    threshold = threshold_at_specificity(healthy)
    separation = float(np.mean(anomalous - healthy.mean()) / _spread(healthy))
    return float(roc_auc_score(labels, score)), float(np.mean(anomalous > threshold)), separation


# Combinations ranked per block: a block's scores stay a few tens of MB.
_BLOCK = 16384


def _rank_every_combination(weights: np.ndarray, values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`_ranking` of every row of `weights` [C, T] at once, over `values` [T, N]: [C, 3].
    Each score is summed term by term in the same order as a single combination's,
    so ties (a lesion case that is a healthy scan) stay exact ties."""
    healthy, anomalous = labels == 0, labels == 1
    n_healthy, n_anomalous = int(healthy.sum()), int(anomalous.sum())
    if n_healthy == 0 or n_anomalous == 0:
        raise ValueError("the weight search needs healthy and anomalous validation cases")
    k = math.ceil(DEFAULT_SPECIFICITY * n_healthy)
    ranks = np.empty((len(weights), 3))
    for start in range(0, len(weights), _BLOCK):
        block = weights[start:start + _BLOCK]
        score = np.zeros((len(block), values.shape[1]))
        for t in range(values.shape[0]):
            score += block[:, t:t + 1] * values[t][None, :]
        # Mann-Whitney AUROC from average ranks: P(anomalous > healthy) + P(tie) / 2.
        rank_sum = rankdata(score, axis=1)[:, anomalous].sum(axis=1)
        ranks[start:start + len(block), 0] = (rank_sum - n_anomalous * (n_anomalous + 1) / 2) / (
            n_anomalous * n_healthy)
        healthy_scores, anomalous_scores = score[:, healthy], score[:, anomalous]
        threshold = np.partition(healthy_scores, k - 1, axis=1)[:, k - 1]
        ranks[start:start + len(block), 1] = (anomalous_scores > threshold[:, None]).mean(axis=1)
        spread = healthy_scores.std(axis=1)
        spread[spread <= 0] = 1.0
        # As `_ranking` computes it, rounding included: the grid's order breaks exact ties.
        shifted = anomalous_scores - healthy_scores.mean(axis=1, keepdims=True)
        ranks[start:start + len(block), 2] = shifted.mean(axis=1) / spread
    return ranks


def select_score_weights(
    healthy: dict[str, np.ndarray], anomalous: dict[str, np.ndarray], base: str
) -> ScoreWeights:
    """Small grid search on validation data (MR paper, Eq. 3) over every term,
    the paper's own `base` term (KL for the VAE, izi_f for f-AnoGAN) included: a term
    that moves with the scanner more than with findings (on domain-randomised healthy
    heads) may get weight 0. The grid is in units of each term's healthy spread
    relative to the base term's; the simplest combination (fewest terms, the base
    term first) wins among equals. Pass |age gap| as `age_gap`. Each dict maps term -> [N]."""
    names = [base, *(t for t in healthy if t != base)]
    labels = np.r_[np.zeros(len(healthy[base])), np.ones(len(anomalous[base]))]
    values = np.stack([np.r_[healthy[t], anomalous[t]] for t in names]).astype(np.float64)
    units = np.array([_spread(healthy[base]) / _spread(healthy[t]) for t in names])
    combos = [m for m in itertools.product(_MULTIPLIERS, repeat=len(names)) if max(m) == 1.0]
    combos.sort(key=lambda m: (sum(v > 0 for v in m), [v == 0 for v in m]))
    multipliers = np.array(combos)
    ranks = _rank_every_combination(multipliers * units[None, :], values, labels)
    # A small validation set rewards whatever happens to fit it: take the simplest
    # combination (fewest terms) whose AUROC and sensitivity are within one case of the
    # best ("one standard error" rule), then the best ranked among those that simple.
    top = ranks[np.lexsort(ranks.T[::-1])[-1]]
    n_healthy, n_anomalous = int((labels == 0).sum()), int((labels == 1).sum())
    close = (ranks[:, 0] >= top[0] - 1.0 / max(n_healthy, 1)) & (ranks[:, 1] >= top[1] - 1.0 / max(n_anomalous, 1))
    n_terms = (multipliers > 0).sum(axis=1)
    candidates = np.flatnonzero(close & (n_terms == n_terms[close].min()))
    # The best ranked; among equal ranks the first in the grid's order (the simplest).
    order = np.lexsort((-candidates, *ranks[candidates].T[::-1]))
    chosen = candidates[order[-1]]
    terms = {t: float(m) for t, m in zip(names, multipliers[chosen] * units)}
    # The reported AUROC is scikit-learn's, as for any single score.
    auroc = _ranking(labels, sum(w * values[i] for i, w in enumerate(terms.values()) if w))[0]
    log.info("score weights", extra={"action": "score_weights", "weights": terms, "validation_auroc": auroc})
    return ScoreWeights(terms, auroc)
