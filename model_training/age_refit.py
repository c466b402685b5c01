"""Refit a VAE-a_p network's brain-age head, everything else frozen.

The age head of a compact bundle learns from the ~100 heads its network was trained
on and overfits them: its error on held-out heads is three to four times that on its
own training heads. Refitting only the head on features of many more healthy heads
(the encoder frozen, features computed once) costs minutes on a CPU, and leaves every
anomaly output of the graph, and so the normative model and the calibration, as they
were. With a site's confirmed-normal studies (`headscreen train --refit-age --dataset
CSV`) only the age output's offset is corrected (correct_age_offset): a few dozen heads
estimate one number well, a whole head badly.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from headscreen.age_bias import age_bias
from headscreen.model_training.networks import AGE_SCALE, VAE3D
from headscreen.model_training.runtime import Samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgeHeadFit:
    epochs: int
    best_epoch: int  # the epoch with the lowest validation MAE, whose head is kept
    n_heads: int  # training heads (each also seen mirrored when flip_lr)
    train_mae: float
    val_mae: float
    val_mae_before: float
    weight_decay: float


@torch.no_grad()
def encoder_features(model: VAE3D, images: np.ndarray, flip_lr: bool = False, batch: int = 8) -> torch.Tensor:
    """The age head's input for each image (and, with flip_lr, for its mirror image)."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images[:, None], dtype=np.float32))
    parts = [model.encoder_features(x[i : i + batch])[1] for i in range(0, len(x), batch)]
    if flip_lr:  # the grid's last axis is left-right, as in train_vae's augmentation
        parts += [model.encoder_features(x[i : i + batch].flip(-1))[1] for i in range(0, len(x), batch)]
    return torch.cat(parts)


def _mae(model: VAE3D, features: torch.Tensor, ages: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model.age_from_features(features) - ages).abs().mean())


def refit_age_head(model: VAE3D, train: Samples, val: Samples, seed: int = 0, flip_lr: bool = True,
                   epochs: int = 200, weight_decay: float = 1e-2, lr: float = 1e-3,
                   batch_size: int = 32) -> AgeHeadFit:
    """Train `model.age_head` afresh on `train` (L1 on years, as train_vae), keeping the
    epoch with the lowest MAE on `val`; the rest of `model` is not touched."""
    if model.age_head is None:
        raise ValueError(f"variant {model.variant} has no age head to refit")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    features = encoder_features(model, train.images, flip_lr)
    ages = torch.from_numpy(np.asarray(train.ages, dtype=np.float32))
    ages = torch.cat([ages, ages]) if flip_lr else ages
    val_features = encoder_features(model, val.images)
    val_ages = torch.from_numpy(np.asarray(val.ages, dtype=np.float32))
    before = _mae(model, val_features, val_ages)

    head: nn.Module = model.age_head
    for layer in head.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()  # type: ignore[operator]
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best = (float("inf"), copy.deepcopy(head.state_dict()), -1)
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(features), generator=gen)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if len(rows) < 2:  # batch norm needs two
                continue
            loss = (model.age_from_features(features[rows]) - ages[rows]).abs().mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        val_mae = _mae(model, val_features, val_ages)
        if val_mae < best[0]:
            best = (val_mae, copy.deepcopy(head.state_dict()), epoch + 1)
    head.load_state_dict(best[1])
    model.eval()
    fit = AgeHeadFit(epochs=epochs, best_epoch=best[2], n_heads=len(train), train_mae=_mae(model, features, ages),
                     val_mae=best[0], val_mae_before=before, weight_decay=weight_decay)
    log.info("age head refit", extra={"action": "age_head_refit", "n_heads": fit.n_heads,
                                      "best_epoch": fit.best_epoch, "val_mae": round(fit.val_mae, 2),
                                      "val_mae_before": round(before, 2)})
    return fit


@dataclass(frozen=True)
class AgeOffsetFit:
    offset_years: float  # subtracted from every predicted age
    offset_ci95: tuple[float, float]  # bootstrap interval of that median (NaN with fewer than 2 heads)
    n_train: int
    before: dict[str, dict[str, float]]  # per split: n, MAE and mean gap (predicted - true) before
    after: dict[str, dict[str, float]]

    @property
    def val_mae_before(self) -> float:
        return self.before["val"]["mae"]

    @property
    def val_mae(self) -> float:
        return self.after["val"]["mae"]


def correct_age_offset(model: VAE3D, splits: dict[str, Samples]) -> AgeOffsetFit:
    """Lower the age output by the median gap (predicted - true) of `splits["train"]`: a
    site's scanner shifts predicted brain age as a whole, and one number is all a few
    dozen heads can estimate without overfitting (on a simulated MR site of 56 training
    heads, retraining the head raised the held-out MAE, the offset lowered it: see
    docs/internals.md). The median: one mistyped age must not move it.
    Only the head's last bias changes, so the graph's other outputs stay as they were."""
    if model.age_head is None:
        raise ValueError(f"variant {model.variant} has no age head to correct")
    predicted = {name: _predicted(model, samples) for name, samples in splits.items()}
    bias = age_bias(predicted["train"] - splits["train"].ages)
    offset = bias.offset_years
    last = model.age_head[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.bias.sub_(offset / AGE_SCALE)
    fit = AgeOffsetFit(offset_years=offset, offset_ci95=bias.ci95, n_train=len(splits["train"]),
                       before={n: _figures(p, splits[n].ages) for n, p in predicted.items()},
                       after={n: _figures(p - offset, splits[n].ages) for n, p in predicted.items()})
    log.info("age offset corrected", extra={"action": "age_offset_corrected", "offset_years": round(offset, 2),
                                            "n_train": fit.n_train, "val_mae": round(fit.val_mae, 2),
                                            "val_mae_before": round(fit.val_mae_before, 2)})
    return fit


def _predicted(model: VAE3D, samples: Samples) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model.age_from_features(encoder_features(model, samples.images)).numpy().astype(np.float64)


def _figures(predicted: np.ndarray, ages: np.ndarray) -> dict[str, float]:
    gap = predicted - np.asarray(ages, dtype=np.float64)
    return {"n": int(len(gap)), "mae": round(float(np.abs(gap).mean()), 3), "mean_gap": round(float(gap.mean()), 3)}
