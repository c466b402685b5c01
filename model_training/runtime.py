"""Shared training plumbing: seeding, devices, samples, checkpoints, metrics CSV."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from headscreen.durable import atomic_write

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def pick_device(requested: str = "auto", threads: int = 2) -> torch.device:
    """`auto` uses CUDA when present. CPU runs are capped at `threads` threads
    because the machine is shared with the daemon's workers."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    torch.set_num_threads(threads)
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class Samples:
    """Preprocessed volumes [N, D, H, W] (float32) and chronological ages [N] (years)."""

    images: np.ndarray
    ages: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, D, H, W], got shape {self.images.shape}")
        if self.ages.shape != (self.images.shape[0],):
            raise ValueError(f"ages must be [N] with N={self.images.shape[0]}, got {self.ages.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray) -> Samples:
        return Samples(self.images[index], self.ages[index])


def batches(
    samples: Samples, batch_size: int, generator: torch.Generator, device: torch.device, flip_lr: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch of (images [B,1,D,H,W], ages [B]); drops a last batch of 1
    (batch norm cannot train on a single sample). `flip_lr` mirrors a random half
    of the volumes left-right (the last axis; the model grid is symmetric about
    the MNI midline), which doubles the variety of a small synthetic cohort."""
    order = torch.randperm(len(samples), generator=generator).numpy()
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        if len(index) < 2 and len(order) > 1:
            continue
        images = torch.from_numpy(samples.images[index]).unsqueeze(1)
        if flip_lr:
            flip = torch.rand(len(index), generator=generator) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1, 1), images.flip(-1), images)
        images = images.to(device)
        ages = torch.from_numpy(samples.ages[index].astype(np.float32)).to(device)
        yield images, ages


def batches_per_epoch(n: int, batch_size: int) -> int:
    """How many batches `batches` yields for `n` samples (a last batch of 1 is dropped)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and n == 1) else 0)


def in_chunks(
    samples: Samples, size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All samples in order, `size` at a time (evaluation)."""
    for start in range(0, len(samples), size):
        images = torch.from_numpy(samples.images[start : start + size]).unsqueeze(1).to(device)
        ages = torch.from_numpy(samples.ages[start : start + size].astype(np.float32)).to(device)
        yield images, ages


def cosine_lr(opt: torch.optim.Optimizer, base_lr: float, epoch: int, epochs: int, floor: float = 0.05) -> float:
    """Set the learning rate for `epoch` (0-based) of `epochs` on a cosine from base_lr
    down to floor * base_lr. A function of the epoch alone, so a resumed run gets the
    same schedule without saving scheduler state."""
    progress = epoch / max(epochs - 1, 1)
    lr = base_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Whole or absent after a crash, so a resumed run never reads a torn checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["data"])


class MetricsLog:
    """Append-only per-epoch metrics CSV; the header is fixed by the first row."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path = path
        self.fields = fields

    def append(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        # One line per epoch; figures to 5 significant digits (the CSV keeps them all).
        figures = {k: _rounded(row[k]) for k in self.fields if row.get(k) is not None}
        log.info("epoch done", extra={"action": "train_epoch", **figures})

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))


def _rounded(value: Any) -> Any:
    return float(f"{value:.5g}") if isinstance(value, float) else value


@contextlib.contextmanager
def stage_bar(total_batches: int, desc: str, progress: bool) -> Iterator[tqdm]:
    """One progress bar over a whole training stage (a step per batch; the last epoch's
    figures beside it via `set_postfix`). Drawn only on a terminal: tqdm's `disable=None`
    turns it off when stderr is a file or a pipe, which get the log's one line per epoch and
    never the bar's carriage returns. While it is drawn, log lines print above it."""
    with tqdm(total=total_batches, desc=desc, unit="batch", dynamic_ncols=True,
              disable=None if progress else True) as bar:
        with logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext():
            yield bar


def bar_figures(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, str]:
    """The figures of an epoch's row worth showing beside the bar, compactly."""
    return {k: f"{row[k]:.4g}" for k in keys if isinstance(row.get(k), float) and math.isfinite(row[k])}
