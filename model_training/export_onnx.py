"""Export exactly what the daemon runs as one ONNX graph per bundle, and check it.

Input `image` float32 [N, 1, D, H, W] (dynamic N); outputs `error_map`
[N, 1, D, H, W] = |x - reconstruction| and one [N] output per score term
(f-AnoGAN: `izi_f`, `focal`; VAE: `rec`, `kl`, `focal`), plus `age` [N] for
age-predicting models. `focal` (losses.focal_per_sample) is the largest local
mean of the error map; the manifest's weights say how much of it the score uses.
A vae_ac graph needs a second input `chronological_age` [N] (years).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from headscreen.errors import BundleError
from headscreen.model_training.losses import focal_per_sample, izi_f_per_sample, kl_per_sample, l1_per_sample
from headscreen.model_training.networks import AGE_SCALE, VAE3D, Critic, Encoder, Generator

log = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ExportError(BundleError):
    """The exported graph is missing or disagrees with PyTorch."""


class ExportGraph(nn.Module):
    """A scoring graph that names its ONNX inputs and outputs."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


class FAnoGANGraph(ExportGraph):
    """image -> (error_map, izi_f, focal): the whole f-AnoGAN scoring path in one graph."""

    output_names = ("error_map", "izi_f", "focal")
    input_names = ("image",)

    def __init__(self, encoder: Encoder, generator: Generator, critic: Critic, kappa: float) -> None:
        super().__init__()
        self.encoder, self.generator, self.critic = encoder, generator, critic
        self.kappa = float(kappa)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recon = self.generator(self.encoder(image))
        score = izi_f_per_sample(image, recon, self.critic.features(image), self.critic.features(recon), self.kappa)
        error_map = (image - recon).abs()
        return error_map, score, focal_per_sample(error_map)


class VaeGraph(ExportGraph):
    """image (+ chronological_age for vae_ac) -> (error_map, rec, kl, focal[, age]); z = mu."""

    def __init__(self, vae: VAE3D) -> None:
        super().__init__()
        self.vae = vae
        self.input_names = ("image", "chronological_age") if vae.variant == "vae_ac" else ("image",)
        self.output_names = ("error_map", "rec", "kl", "focal") + (("age",) if vae.variant == "vae_ap" else ())

    def forward(self, image: torch.Tensor, chronological_age: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out = self.vae(image, chronological_age=chronological_age, sample=False)
        error_map = (image - out.recon).abs()
        terms = (error_map, l1_per_sample(image, out.recon), kl_per_sample(out.mu, out.logvar),
                 focal_per_sample(error_map))
        return terms + ((out.age,) if out.age is not None else ())


def _example_inputs(graph: ExportGraph, grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    image = torch.zeros(2, 1, *grid)
    if "chronological_age" in graph.input_names:
        return image, torch.full((2,), 50.0)
    return (image,)


def export_graph(graph: ExportGraph, path: Path, grid: tuple[int, int, int]) -> Path:
    """Write `graph` (in eval mode) as a single-file ONNX model, opset 17, dynamic batch."""
    graph.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(graph.input_names) + list(graph.output_names)
    dynamic = {name: {0: "N"} for name in names}
    # The TorchScript exporter warns about its own deprecation and about traced
    # shape arithmetic; the parity check below is what tells whether it worked.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            _example_inputs(graph, grid),
            str(path),
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    log.info("onnx exported", extra={"action": "onnx_export", "path": str(path), "bytes": path.stat().st_size})
    return path


def parity_max_abs_diff(graph: ExportGraph, path: Path, images: np.ndarray, ages: np.ndarray | None = None) -> float:
    """Largest |onnxruntime - pytorch| over every output for `images` [N,1,D,H,W]."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"image": images.astype(np.float32)}
    torch_inputs = [torch.from_numpy(feeds["image"])]
    if "chronological_age" in graph.input_names:
        if ages is None:
            raise ValueError("a vae_ac graph needs ages for the parity check")
        feeds["chronological_age"] = ages.astype(np.float32)
        torch_inputs.append(torch.from_numpy(feeds["chronological_age"]))
    onnx_out = session.run(list(graph.output_names), feeds)
    graph.eval()
    with torch.no_grad():
        torch_out = [t.cpu().numpy() for t in graph(*torch_inputs)]
    diff = 0.0
    for name, a, b in zip(graph.output_names, onnx_out, torch_out):
        if a.shape != b.shape:
            raise ExportError(f"output {name}: onnx shape {a.shape} != torch shape {b.shape}")
        # `age` is in years (values ~10^2): float32 rounding alone exceeds 1e-4 there,
        # so it is compared in the network's own unit, AGE_SCALE years.
        scale = AGE_SCALE if name == "age" else 1.0
        diff = max(diff, float(np.max(np.abs(a - b))) / scale)
    return diff


def export_and_check(
    graph: ExportGraph, path: Path, real_images: np.ndarray, real_ages: np.ndarray, seed: int = 0
) -> float:
    """Export, then compare on random and on real inputs; raise if above tolerance."""
    graph = graph.cpu()
    grid = tuple(int(s) for s in real_images.shape[1:])
    export_graph(graph, path, grid)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    random_images = rng.uniform(-1, 1, size=(3, 1, *grid)).astype(np.float32)
    random_ages = rng.uniform(20, 85, size=3).astype(np.float32)
    diff = max(
        parity_max_abs_diff(graph, path, random_images, random_ages),
        parity_max_abs_diff(graph, path, real_images[:, None].astype(np.float32), real_ages),
    )
    if not diff < PARITY_TOLERANCE:
        raise ExportError(f"ONNX parity {diff:.3g} exceeds {PARITY_TOLERANCE}")
    log.info("onnx parity", extra={"action": "onnx_parity", "max_abs_diff": diff})
    return diff
