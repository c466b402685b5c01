"""Benchmark: training-step and inference time of both methods, compact and paper presets.

    .venv/bin/python bench/train_speed.py [--device auto|cpu|cuda] [--batch 4] [--repeat 3]
    .venv/bin/python bench/train_speed.py --preset paper --amp     # on a GPU

Times, on random 64^3 volumes (speed does not depend on content):
- f-AnoGAN: one WGAN-GP critic step (with the gradient penalty), one generator step
  and one stage-3 fine-tune step (encoder + generator on izi_f);
- VAE-a_p: one training step (L1 + KL + age);
- inference: the exported scoring path (FAnoGANGraph / VaeGraph) for one volume.
Prints seconds per step (median of --repeat after one warm-up) and volumes per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model_training.export_onnx import FAnoGANGraph, VaeGraph  # noqa: E402
from model_training.losses import critic_loss, generator_loss, izi_f_loss, vae_loss  # noqa: E402
from model_training.networks import GAN_PRESETS, VAE_PRESETS, VAE3D, build_fanogan  # noqa: E402
from model_training.runtime import pick_device  # noqa: E402

GRID = 64


def _timed(step: Callable[[], object], device: torch.device, repeat: int) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began
    once()  # warm-up: allocation, cuDNN autotuning
    return statistics.median(once() for _ in range(repeat))


def fanogan(preset_name: str, device: torch.device, batch: int, repeat: int, amp: bool) -> dict[str, float]:
    preset = GAN_PRESETS[preset_name]
    generator, critic, encoder = (m.to(device) for m in build_fanogan(preset))
    x = torch.rand(batch, 1, GRID, GRID, GRID, device=device) * 2 - 1
    d_opt = torch.optim.Adam(critic.parameters(), 1e-4, betas=(0.0, 0.9))
    g_opt = torch.optim.Adam(generator.parameters(), 1e-4, betas=(0.0, 0.9))
    eg_opt = torch.optim.Adam([*encoder.parameters(), *generator.parameters()], 1e-4)
    autocast = torch.autocast(device.type, enabled=amp)

    def critic_step() -> None:
        with torch.no_grad(), autocast:
            fake = generator(torch.randn(batch, preset.latent, device=device))
        loss, _, _ = critic_loss(critic, x, fake.float())
        d_opt.zero_grad(set_to_none=True)
        loss.backward()
        d_opt.step()

    def generator_step() -> None:
        with autocast:
            loss = generator_loss(critic(generator(torch.randn(batch, preset.latent, device=device))))
        g_opt.zero_grad(set_to_none=True)
        loss.backward()
        g_opt.step()

    def finetune_step() -> None:
        with autocast:
            recon = generator(encoder(x))
            loss = izi_f_loss(x, recon, critic.features(x), critic.features(recon), 1.0)
        eg_opt.zero_grad(set_to_none=True)
        loss.backward()
        eg_opt.step()

    graph = FAnoGANGraph(encoder, generator, critic, 1.0)
    one = x[:1]

    def infer() -> None:
        graph.eval()
        with torch.no_grad(), autocast:
            graph(one)

    return {"critic_step_s": _timed(critic_step, device, repeat), "generator_step_s": _timed(generator_step, device, repeat),
            "finetune_step_s": _timed(finetune_step, device, repeat), "inference_s": _timed(infer, device, repeat)}


def vae(preset_name: str, device: torch.device, batch: int, repeat: int, amp: bool) -> dict[str, float]:
    model = VAE3D((GRID,) * 3, VAE_PRESETS[preset_name], "vae_ap").to(device)
    x = torch.rand(batch, 1, GRID, GRID, GRID, device=device) * 2 - 1
    ages = torch.full((batch,), 50.0, device=device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    autocast = torch.autocast(device.type, enabled=amp)

    def step() -> None:
        model.train()
        with autocast:
            out = model(x, chronological_age=ages, sample=True)
            parts = vae_loss(x, out.recon.float(), out.mu.float(), out.logvar.float(), out.age.float(), ages)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()

    graph = VaeGraph(model)
    one = x[:1]

    def infer() -> None:
        graph.eval()
        with torch.no_grad(), autocast:
            graph(one)

    return {"train_step_s": _timed(step, device, repeat), "inference_s": _timed(infer, device, repeat)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--preset", choices=("compact", "paper"), action="append", help="default: both")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    args = p.parse_args()
    device = pick_device(args.device, args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; 64^3; amp {args.amp}")
    for preset in args.preset or ["compact", "paper"]:
        for method, run in (("f-AnoGAN", fanogan), ("VAE-a_p", vae)):
            figures = run(preset, device, args.batch, args.repeat, args.amp)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
            print(f"{method:9s} {preset:8s} {shown}; inference {1.0 / figures['inference_s']:.1f} volumes/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
