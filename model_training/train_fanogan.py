"""3D f-AnoGAN training in the CT paper's three stages.

1. "wgan": WGAN-GP (critic n_critic steps per generator step, lambda = 10).
2. "encoder": E trained on izi_f with G and D frozen.
3. "finetune": E and G fine-tuned together on the same izi_f loss.

A checkpoint is written after every epoch (stage, epoch, weights, optimiser and
RNG state), so `resume=True` continues exactly where a run stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from headscreen.model_training.losses import critic_loss, generator_loss, izi_f_loss, izi_f_per_sample
from headscreen.model_training.networks import GAN_PRESETS, Critic, Encoder, GanPreset, Generator, build_fanogan
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

STAGES = ("wgan", "encoder", "finetune")
# val_auroc: AUROC of the per-case izi_f, lesion vs healthy validation cases (stages 2 and 3,
# when the trainer is given lesion cases): what the encoder has learnt so far; the bundle's
# validation AUROC uses the weighted score chosen after training.
METRIC_FIELDS = ["stage", "epoch", "steps", "d_loss", "wasserstein", "gp", "g_loss", "izi_f", "val_izi_f", "val_auroc",
                 "seconds"]
BAR_FIGURES = ("d_loss", "wasserstein", "izi_f", "val_izi_f", "val_auroc")
CHECKPOINT = "fanogan.pt"


@dataclass(frozen=True)
class FAnoGANConfig:
    preset: GanPreset = field(default_factory=lambda: GAN_PRESETS["compact"])
    wgan_epochs: int = 10
    encoder_epochs: int = 5
    finetune_epochs: int = 3
    batch_size: int = 8
    n_critic: int = 5
    lr_gan: float = 1e-4
    lr_encoder: float = 1e-4
    lr_finetune: float = 1e-4
    kappa: float = 1.0
    gp_weight: float = 10.0
    flip_lr: bool = False
    seed: int = 0

    def epochs(self, stage: str) -> int:
        return {"wgan": self.wgan_epochs, "encoder": self.encoder_epochs, "finetune": self.finetune_epochs}[stage]


@dataclass
class FAnoGANNets:
    generator: Generator
    critic: Critic
    encoder: Encoder

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "critic": self.critic, "encoder": self.encoder}


@dataclass(frozen=True)
class FAnoGANResult:
    nets: FAnoGANNets
    metrics_path: Path
    steps: int
    epochs: int


def _adam(params: Any, lr: float) -> torch.optim.Adam:
    # beta1 = 0, beta2 = 0.9: the usual WGAN-GP setting (Gulrajani et al.).
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.9))


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def _optimisers(nets: FAnoGANNets, stage: str, cfg: FAnoGANConfig) -> dict[str, torch.optim.Optimizer]:
    if stage == "wgan":
        return {"d": _adam(nets.critic.parameters(), cfg.lr_gan), "g": _adam(nets.generator.parameters(), cfg.lr_gan)}
    if stage == "encoder":
        return {"e": torch.optim.Adam(nets.encoder.parameters(), lr=cfg.lr_encoder)}
    params = list(nets.encoder.parameters()) + list(nets.generator.parameters())
    return {"eg": torch.optim.Adam(params, lr=cfg.lr_finetune)}


def _stage_lr(cfg: FAnoGANConfig, stage: str) -> float:
    return {"wgan": cfg.lr_gan, "encoder": cfg.lr_encoder, "finetune": cfg.lr_finetune}[stage]


def _prepare_stage(nets: FAnoGANNets, stage: str) -> None:
    """Set train/eval modes and frozen weights for a stage.

    From stage 2 on, G stays in eval mode so its batch-norm statistics are the
    ones the exported graph uses; stage 3 still trains G's weights.
    """
    nets.critic.train(stage == "wgan")
    nets.generator.train(stage == "wgan")
    nets.encoder.train(stage != "wgan")
    _set_trainable(nets.critic, stage == "wgan")
    _set_trainable(nets.generator, stage in ("wgan", "finetune"))
    _set_trainable(nets.encoder, stage != "wgan")


def _wgan_epoch(
    nets: FAnoGANNets, opts: dict[str, torch.optim.Optimizer], samples: Samples, cfg: FAnoGANConfig,
    generator: torch.Generator, device: torch.device, bar: tqdm,
) -> dict[str, float]:
    sums = {"d_loss": 0.0, "wasserstein": 0.0, "gp": 0.0, "g_loss": 0.0}
    d_steps = g_steps = 0
    for images, _ in batches(samples, cfg.batch_size, generator, device, cfg.flip_lr):
        # At least two z: the generator's batch norm cannot train on one sample.
        z = torch.randn(max(images.shape[0], 2), nets.generator.latent, device=device)
        with torch.no_grad():
            fake = nets.generator(z)[: images.shape[0]]
        d_loss, wasserstein, gp = critic_loss(nets.critic, images, fake, cfg.gp_weight)
        opts["d"].zero_grad(set_to_none=True)
        d_loss.backward()
        opts["d"].step()
        d_steps += 1
        sums["d_loss"] += d_loss.item()
        sums["wasserstein"] += wasserstein.item()
        sums["gp"] += gp.item()
        if d_steps % cfg.n_critic == 0:
            sums["g_loss"] += _generator_step(nets, opts["g"], images.shape[0], device)
            g_steps += 1
        bar.update(1)
    out = {k: v / max(d_steps, 1) for k, v in sums.items() if k != "g_loss"}
    out["g_loss"] = sums["g_loss"] / g_steps if g_steps else float("nan")
    out["steps"] = d_steps
    return out


def _generator_step(nets: FAnoGANNets, opt: torch.optim.Optimizer, n: int, device: torch.device) -> float:
    _set_trainable(nets.critic, False)
    z = torch.randn(max(n, 2), nets.generator.latent, device=device)
    loss = generator_loss(nets.critic(nets.generator(z)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _set_trainable(nets.critic, True)
    return loss.item()


def reconstruct(nets: FAnoGANNets, images: torch.Tensor) -> torch.Tensor:
    return nets.generator(nets.encoder(images))


def izi_f_scores(nets: FAnoGANNets, images: torch.Tensor, kappa: float) -> torch.Tensor:
    recon = reconstruct(nets, images)
    return izi_f_per_sample(images, recon, nets.critic.features(images), nets.critic.features(recon), kappa)


def _izi_f_epoch(
    nets: FAnoGANNets, opt: torch.optim.Optimizer, samples: Samples, cfg: FAnoGANConfig,
    generator: torch.Generator, device: torch.device, bar: tqdm,
) -> dict[str, float]:
    total, steps = 0.0, 0
    for images, _ in batches(samples, cfg.batch_size, generator, device, cfg.flip_lr):
        recon = reconstruct(nets, images)
        loss = izi_f_loss(images, recon, nets.critic.features(images), nets.critic.features(recon), cfg.kappa)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
        steps += 1
        bar.update(1)
    return {"izi_f": total / max(steps, 1), "steps": steps}


def evaluate_izi_f(nets: FAnoGANNets, samples: Samples, kappa: float, device: torch.device) -> np.ndarray:
    """Per-sample izi_f with every network in eval mode (as exported)."""
    modes = {name: m.training for name, m in nets.modules().items()}
    for m in nets.modules().values():
        m.eval()
    scores = []
    with torch.no_grad():
        for images, _ in in_chunks(samples, 8, device):
            scores.append(izi_f_scores(nets, images, kappa).cpu().numpy())
    for name, m in nets.modules().items():
        m.train(modes[name])
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def _checkpoint_state(nets: FAnoGANNets, opts: dict, stage: str, epoch: int, steps: int, gen: torch.Generator) -> dict:
    return {
        "stage": stage,
        "epoch": epoch,
        "steps": steps,
        "nets": {name: m.state_dict() for name, m in nets.modules().items()},
        "optimisers": {k: o.state_dict() for k, o in opts.items()},
        "rng": rng_state(gen),
    }


def train_fanogan(
    samples: Samples,
    cfg: FAnoGANConfig,
    work_dir: Path,
    device: torch.device,
    val: Samples | None = None,
    resume: bool = False,
    progress: bool = True,
    init: dict | None = None,
    val_anomalous: Samples | None = None,
) -> FAnoGANResult:
    """Run (or resume) the three stages; returns the trained networks. `init` (a
    bundle's weights, `{"generator": ..., "critic": ..., "encoder": ...}`) starts a
    fine-tune from trained networks (a stage with 0 epochs is skipped). `val_anomalous`
    (lesion cases) adds the validation AUROC to the figures of stages 2 and 3."""
    if samples.grid != (cfg.preset.size,) * 3:
        raise ValueError(f"samples grid {samples.grid} does not match preset size {cfg.preset.size}")
    work_dir = Path(work_dir)
    gen = seed_everything(cfg.seed)
    generator, critic, encoder = build_fanogan(cfg.preset)
    nets = FAnoGANNets(generator.to(device), critic.to(device), encoder.to(device))
    metrics = MetricsLog(work_dir / "metrics.csv", METRIC_FIELDS)
    state = load_checkpoint(work_dir / CHECKPOINT) if resume else None
    if not resume and metrics.path.exists():
        metrics.path.unlink()
    start_stage, start_epoch, steps = 0, 0, 0
    if state is None and init is not None:
        for name, m in nets.modules().items():
            m.load_state_dict(init[name])
    if state is not None:
        for name, m in nets.modules().items():
            m.load_state_dict(state["nets"][name])
        start_stage, start_epoch, steps = STAGES.index(state["stage"]), state["epoch"], state["steps"]
        restore_rng(state["rng"], gen)
        log.info("resuming", extra={"action": "train_resume", "stage": state["stage"], "epoch": start_epoch})
    epochs_done = 0
    for stage_index, stage in enumerate(STAGES):
        if stage_index < start_stage:
            continue
        _prepare_stage(nets, stage)
        opts = _optimisers(nets, stage, cfg)
        first = start_epoch if stage_index == start_stage else 0
        if state is not None and stage_index == start_stage and first > 0:
            for k, o in opts.items():
                o.load_state_dict(state["optimisers"][k])
        epochs = cfg.epochs(stage) - first
        with stage_bar(batches_per_epoch(len(samples), cfg.batch_size) * epochs, stage, progress and epochs > 0) as bar:
            for epoch in range(first, cfg.epochs(stage)):
                began = time.monotonic()
                if stage != "wgan":  # the WGAN keeps the usual constant rate
                    cosine_lr(next(iter(opts.values())), _stage_lr(cfg, stage), epoch, cfg.epochs(stage))
                bar.set_description(f"{stage} epoch {epoch + 1}/{cfg.epochs(stage)}")
                if stage == "wgan":
                    row = _wgan_epoch(nets, opts, samples, cfg, gen, device, bar)
                else:
                    row = _izi_f_epoch(nets, next(iter(opts.values())), samples, cfg, gen, device, bar)
                steps += int(row.pop("steps"))
                if val is not None and stage != "wgan":
                    healthy = evaluate_izi_f(nets, val, cfg.kappa, device)
                    row["val_izi_f"] = float(healthy.mean())
                    if val_anomalous is not None and len(val_anomalous):
                        row["val_auroc"] = rank_auroc(healthy, evaluate_izi_f(nets, val_anomalous, cfg.kappa, device))
                metrics.append({"stage": stage, "epoch": epoch + 1, "steps": steps,
                                "seconds": round(time.monotonic() - began, 2), **row})
                bar.set_postfix(bar_figures(row, BAR_FIGURES))
                epochs_done += 1
                save_checkpoint(work_dir / CHECKPOINT, _checkpoint_state(nets, opts, stage, epoch + 1, steps, gen))
        start_epoch = 0
    for m in nets.modules().values():
        m.eval()
    return FAnoGANResult(nets=nets, metrics_path=metrics.path, steps=steps, epochs=epochs_done)
