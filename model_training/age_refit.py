"""Refit a VAE-a_p network's brain-age head, everything else frozen.

The age head of a compact bundle learns from the ~100 heads its network was trained
on and overfits them: its error on held-out heads is three to four times that on its
own training heads. Refitting only the head on features of many more healthy heads
(the encoder frozen, features computed once) costs minutes on a CPU, and leaves every
anomaly output of the graph, and so the normative model and the calibration, as they
were. `headscreen train --refit-age --dataset CSV` does the same on a site's
confirmed-normal studies with known ages (model_training.fit.refit_age_bundle).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from headscreen.model_training.networks import VAE3D
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
