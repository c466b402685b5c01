"""Benchmark: training-step and inference time of both methods, compact and paper presets.

    .venv/bin/python bench/train_speed.py [--device auto|cpu|cuda] [--batch 4] [--steps 5]
    .venv/bin/python bench/train_speed.py --preset paper          # on a GPU

Runs the trainers' own epoch functions (model_training.train_fanogan and
train_vae) on random 64^3 volumes (speed does not depend on content) and prints
seconds per optimiser step, after one untimed warm-up epoch:
- f-AnoGAN: WGAN-GP critic steps (with the gradient penalty and, every n_critic
  steps, a generator step) and stage-3 fine-tune steps (encoder + generator on izi_f);
- VAE-a_p: training steps (L1 + KL + age);
- inference: the exported scoring path (FAnoGANGraph / VaeGraph) for one volume.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from headscreen.model_training import train_fanogan as fanogan_training  # noqa: E402
from headscreen.model_training import train_vae as vae_training  # noqa: E402
from headscreen.model_training.export_onnx import FAnoGANGraph, VaeGraph  # noqa: E402
from headscreen.model_training.networks import GAN_PRESETS, VAE3D, VAE_PRESETS, build_fanogan  # noqa: E402
from headscreen.model_training.runtime import Samples, pick_device, seed_everything  # noqa: E402

GRID = 64


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def _per_step(epoch: Callable[[tqdm], dict[str, float]], device: torch.device) -> float:
    """Seconds per optimiser step of one epoch, after a warm-up epoch (allocation, cuDNN autotuning)."""
    with tqdm(disable=True) as bar:
        epoch(bar)
        steps: list[int] = []
        seconds = _seconds(lambda: steps.append(int(epoch(bar)["steps"])), device)
    return seconds / steps[0]


def _inference(graph: torch.nn.Module, image: torch.Tensor, device: torch.device) -> float:
    graph.eval()
    with torch.no_grad():
        graph(image)
        return _seconds(lambda: graph(image), device)


def _samples(batch: int, steps: int) -> Samples:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch * steps, GRID, GRID, GRID)).astype(np.float32)
    return Samples(images, np.full(batch * steps, 50.0, dtype=np.float32))


def fanogan(preset: str, device: torch.device, batch: int, steps: int) -> dict[str, float]:
    cfg = fanogan_training.FAnoGANConfig(preset=GAN_PRESETS[preset], batch_size=batch)
    nets = fanogan_training.FAnoGANNets(*(m.to(device) for m in build_fanogan(cfg.preset)))
    samples, gen = _samples(batch, steps), seed_everything(0)
    figures = {}
    for stage in ("wgan", "finetune"):
        fanogan_training._prepare_stage(nets, stage)
        opts = fanogan_training._optimisers(nets, stage, cfg)
        if stage == "wgan":
            figures["critic_step_s"] = _per_step(
                lambda bar: fanogan_training._wgan_epoch(nets, opts, samples, cfg, gen, device, bar),  # noqa: B023 (called at once)
                device)
        else:
            figures["finetune_step_s"] = _per_step(
                lambda bar: fanogan_training._izi_f_epoch(nets, opts["eg"], samples, cfg, gen, device, bar),  # noqa: B023
                device)
    graph = FAnoGANGraph(nets.encoder, nets.generator, nets.critic, cfg.kappa)
    figures["inference_s"] = _inference(graph, torch.from_numpy(samples.images[:1, None]).to(device), device)
    return figures


def vae(preset: str, device: torch.device, batch: int, steps: int) -> dict[str, float]:
    cfg = vae_training.VaeConfig(preset=VAE_PRESETS[preset], batch_size=batch)
    model = VAE3D((GRID,) * 3, cfg.preset, cfg.variant).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    samples, gen = _samples(batch, steps), seed_everything(0)
    figures = {"train_step_s": _per_step(
        lambda bar: vae_training._epoch(model, opt, samples, cfg, gen, device, bar), device)}
    figures["inference_s"] = _inference(VaeGraph(model), torch.from_numpy(samples.images[:1, None]).to(device), device)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--preset", choices=("compact", "paper"), action="append", help="default: both")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="optimiser steps timed per figure")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    device = pick_device(args.device, args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; 64^3")
    for preset in args.preset or ["compact", "paper"]:
        for method, run in (("f-AnoGAN", fanogan), ("VAE-a_p", vae)):
            figures = run(preset, device, args.batch, args.steps)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
            print(f"{method:9s} {preset:8s} {shown}; inference {1.0 / figures['inference_s']:.1f} volumes/s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
