"""3D VAE training (variants vae, vae_ac, vae_ap) on L1 + beta*KL + gamma*L1(age).

Adam with the MR paper's learning rate 1e-3, decayed on a cosine over the run (a
few hundred CPU steps, not the paper's 400 epochs, need the decay to settle the age
head); a checkpoint after every epoch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from headscreen.model_training.losses import kl_per_sample, l1_per_sample, vae_loss
from headscreen.model_training.networks import VAE3D, VAE_PRESETS, VaePreset
from headscreen.model_training.runtime import (
    MetricsLog,
    Samples,
    bar_figures,
    batches,
    batches_per_epoch,
    cosine_lr,
    in_chunks,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
    seed_everything,
    stage_bar,
)
from headscreen.model_training.scoring import rank_auroc

log = logging.getLogger(__name__)

# val_auroc: AUROC of the per-case reconstruction error (rec), lesion vs healthy validation
# cases, when the trainer is given lesion cases: a quick figure of what the network has
# learnt so far (the bundle's validation AUROC uses the weighted score chosen after training).
METRIC_FIELDS = ["epoch", "steps", "loss", "rec", "kl", "age_mae", "val_rec", "val_kl", "val_age_mae", "val_auroc",
                 "seconds"]
BAR_FIGURES = ("loss", "val_rec", "val_age_mae", "val_auroc")
CHECKPOINT = "vae.pt"


@dataclass(frozen=True)
class VaeConfig:
    preset: VaePreset = field(default_factory=lambda: VAE_PRESETS["compact"])
    variant: str = "vae_ap"
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    beta: float = 1.0
    gamma: float = 1.0
    flip_lr: bool = False
    seed: int = 0
    schedule_epochs: int | None = None  # the cosine's length; default `epochs`
    # Denoising (Kascenas et al. 2022): the network sees its input plus coarse noise
    # and is scored on rebuilding the clean head, so it learns to remove blob-sized
    # deviations instead of copying them. 0 trains on clean inputs (the MR paper).
    denoise_sigma: float = 0.0
    denoise_cells: int = 8  # noise drawn on cells^3 and upsampled to the grid


@dataclass(frozen=True)
class VaeResult:
    model: VAE3D
    metrics_path: Path
    steps: int
    epochs: int


@dataclass(frozen=True)
class VaeTerms:
    """Per-sample score terms of a trained VAE in eval mode (z = mu)."""

    rec: np.ndarray
    kl: np.ndarray
    age: np.ndarray | None


def coarse_noise(images: torch.Tensor, sigma: float, cells: int, generator: torch.Generator) -> torch.Tensor:
    """`images` plus Gaussian noise drawn on a cells^3 grid and upsampled trilinearly,
    inside the brain only (the background stays at the range's minimum), clipped to the
    model's input range as preprocessing clips."""
    coarse = torch.randn((images.shape[0], 1, cells, cells, cells), generator=generator) * sigma
    noise = nn.functional.interpolate(coarse.to(images.device), size=images.shape[2:], mode="trilinear",
                                      align_corners=False)
    low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
    return torch.where(images > low, (images + noise).clamp(-1.0, 1.0), images)


def _epoch(
    model: VAE3D, opt: torch.optim.Optimizer, samples: Samples, cfg: VaeConfig,
    gen: torch.Generator, device: torch.device, bar: tqdm,
) -> dict[str, float]:
    sums = {"loss": 0.0, "rec": 0.0, "kl": 0.0, "age_mae": 0.0}
    steps = 0
    for images, ages in batches(samples, cfg.batch_size, gen, device, cfg.flip_lr):
        seen = coarse_noise(images, cfg.denoise_sigma, cfg.denoise_cells, gen) if cfg.denoise_sigma > 0 else images
        out = model(seen, chronological_age=ages, sample=True)
        parts = vae_loss(images, out.recon, out.mu, out.logvar, out.age, ages, cfg.beta, cfg.gamma)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()
        for key, value in (("loss", parts.total), ("rec", parts.rec), ("kl", parts.kl), ("age_mae", parts.age)):
            sums[key] += value.item()
        steps += 1
        bar.update(1)
    row = {k: v / max(steps, 1) for k, v in sums.items()}
    row["steps"] = steps
    return row


def recalibrate_batch_norm(model: VAE3D, samples: Samples, batch_size: int, device: torch.device) -> None:
    """Recompute batch-norm statistics (the age head's) over the whole training set with
    the encoder as it is now. The running averages lag behind an encoder that is still
    learning, and the age head reads differences of a few percent between subjects, so
    lagging statistics ruin the exported, eval-mode prediction."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over this pass
    model.train()
    with torch.no_grad():
        for images, _ in in_chunks(samples, batch_size, device):
            if images.shape[0] > 1:  # batch norm cannot use a single sample
                model.encode(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def evaluate_terms(model: VAE3D, samples: Samples, device: torch.device) -> VaeTerms:
    """rec, kl and predicted age per sample, deterministic (as exported)."""
    was_training = model.training
    model.eval()
    rec, kl, age = [], [], []
    with torch.no_grad():
        for images, ages in in_chunks(samples, 8, device):
            out = model(images, chronological_age=ages, sample=False)
            rec.append(l1_per_sample(images, out.recon).cpu().numpy())
            kl.append(kl_per_sample(out.mu, out.logvar).cpu().numpy())
            if out.age is not None:
                age.append(out.age.cpu().numpy())
    model.train(was_training)
    return VaeTerms(np.concatenate(rec), np.concatenate(kl), np.concatenate(age) if age else None)


def train_vae(
    samples: Samples,
    cfg: VaeConfig,
    work_dir: Path,
    device: torch.device,
    val: Samples | None = None,
    resume: bool = False,
    progress: bool = True,
    init: dict | None = None,
    val_anomalous: Samples | None = None,
) -> VaeResult:
    """`init` (a bundle's weights, `{"model": state_dict}`) starts a fine-tune from a trained model;
    `val_anomalous` (lesion cases) adds the validation AUROC to each epoch's figures."""
    work_dir = Path(work_dir)
    gen = seed_everything(cfg.seed)
    model = VAE3D(samples.grid, cfg.preset, cfg.variant).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    metrics = MetricsLog(work_dir / "metrics.csv", METRIC_FIELDS)
    if not resume and metrics.path.exists():
        metrics.path.unlink()
    first, steps = 0, 0
    state = load_checkpoint(work_dir / CHECKPOINT) if resume else None
    if state is None and init is not None:
        model.load_state_dict(init["model"])
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimiser"])
        restore_rng(state["rng"], gen)
        first, steps = state["epoch"], state["steps"]
        log.info("resuming", extra={"action": "train_resume", "epoch": first})
    model.train()
    epochs = cfg.epochs - first
    total_batches = batches_per_epoch(len(samples), cfg.batch_size) * epochs
    with stage_bar(total_batches, cfg.variant, progress and epochs > 0) as bar:
        for epoch in range(first, cfg.epochs):
            began = time.monotonic()
            cosine_lr(opt, cfg.lr, epoch, cfg.schedule_epochs or cfg.epochs)
            bar.set_description(f"{cfg.variant} epoch {epoch + 1}/{cfg.epochs}")
            row = _epoch(model, opt, samples, cfg, gen, device, bar)
            steps += int(row.pop("steps"))
            recalibrate_batch_norm(model, samples, cfg.batch_size, device)
            if val is not None:
                terms = evaluate_terms(model, val, device)
                row.update(val_rec=float(terms.rec.mean()), val_kl=float(terms.kl.mean()))
                if terms.age is not None:
                    row["val_age_mae"] = float(np.abs(terms.age - val.ages).mean())
                if val_anomalous is not None and len(val_anomalous):
                    row["val_auroc"] = rank_auroc(terms.rec, evaluate_terms(model, val_anomalous, device).rec)
            metrics.append({"epoch": epoch + 1, "steps": steps, "seconds": round(time.monotonic() - began, 2), **row})
            bar.set_postfix(bar_figures(row, BAR_FIGURES))
            save_checkpoint(
                work_dir / CHECKPOINT,
                {"epoch": epoch + 1, "steps": steps, "model": model.state_dict(), "optimiser": opt.state_dict(),
                 "rng": rng_state(gen)},
            )
    model.eval()
    return VaeResult(model=model, metrics_path=metrics.path, steps=steps, epochs=cfg.epochs - first)
