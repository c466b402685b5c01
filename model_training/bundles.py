"""Write a model bundle (manifest + ONNX + training metrics) through headscreen.bundle."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from headscreen.bundle import Bundle, Manifest, NormativeSpec, load_bundle, write_bundle
from headscreen.model_training.calibration import Calibration
from headscreen.scores import NORMATIVE_FILE

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
WEIGHTS_FORMAT = 1
METHODS = {"fanogan": "f-anogan-3d", "vae": "vae-3d-age", "vae_ac": "vae-3d-age", "vae_ap": "vae-3d-age"}


@dataclass(frozen=True)
class BundleSpec:
    """Everything a manifest needs besides the files themselves."""

    name: str
    version: str
    modality: str
    method: str  # cli method: fanogan | vae | vae_ac | vae_ap
    description: str
    grid: tuple[int, int, int]
    preprocessing: dict[str, Any]
    score_terms: dict[str, float]
    age_gap_weight: float
    score_definition: str
    calibration: Calibration
    age_supported: bool
    age_validation_mae: float | None
    training: dict[str, Any]
    metrics: dict[str, Any]
    parity_max_abs_diff: float
    extra: dict[str, Any] = field(default_factory=dict)


def build_manifest(spec: BundleSpec) -> Manifest:
    training = {
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **spec.training,
    }
    return Manifest(
        name=spec.name,
        version=spec.version,
        modality=spec.modality,
        method=METHODS[spec.method],
        description=spec.description,
        model_file="model.onnx",
        input={"name": "image", "shape": [1, *spec.grid]},
        preprocessing=spec.preprocessing,
        outputs={"error_map": "error_map", "age": "age" if spec.age_supported else None},
        score={"terms": spec.score_terms, "age_gap_weight": spec.age_gap_weight, "definition": spec.score_definition},
        calibration=spec.calibration.as_manifest(),
        age={"supported": spec.age_supported, "validation_mae": spec.age_validation_mae},
        training=training,
        metrics=spec.metrics,
        parity={"max_abs_diff": spec.parity_max_abs_diff, "tolerance": 1e-4},
        variant=spec.method,
        **spec.extra,
    )


def save_weights(path: Path, method: str, preset: str, grid: tuple[int, ...], nets: dict[str, Any]) -> None:
    """The networks' PyTorch state dicts, so a site can fine-tune the bundle (`--init-from`).
    The daemon never reads this file; it runs the ONNX graph."""
    torch.save({"format": WEIGHTS_FORMAT, "method": method, "preset": preset, "grid": list(grid),
                "nets": {k: {n: t.detach().cpu() for n, t in v.items()} for k, v in nets.items()}}, path)


def load_weights(path: Path) -> dict[str, Any]:
    weights = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(weights, dict) or weights.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a headscreen weights file of format {WEIGHTS_FORMAT}")
    return weights


def write_model_bundle(out_dir: Path, onnx_path: Path, spec: BundleSpec, metrics_csv: Path | None = None,
                       normative: Path | None = None, weights: Path | None = None) -> Bundle:
    """Copy the ONNX file (and metrics CSV) into `out_dir`, write the manifest with
    every file's sha256, and load it back through the daemon's loader to prove it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if Path(onnx_path).resolve() != (out_dir / "model.onnx").resolve():
        shutil.copyfile(onnx_path, out_dir / "model.onnx")
    if metrics_csv is not None:
        shutil.copyfile(metrics_csv, out_dir / "training_metrics.csv")
    manifest = build_manifest(spec)
    if weights is not None:
        shutil.copyfile(weights, out_dir / WEIGHTS_FILE)
    if normative is not None:
        shutil.copyfile(normative, out_dir / NORMATIVE_FILE)
        manifest = manifest.model_copy(update={"normative": NormativeSpec(
            file=NORMATIVE_FILE, definition="healthy per-voxel error mean and SD on the model grid, the voxels "
            "scored (support) and the overlay unit (z_limit); see headscreen/scores.py")})
    write_bundle(out_dir, manifest)
    bundle = load_bundle(out_dir)
    log.info("bundle written",
             extra={"action": "bundle_written", "bundle": bundle.manifest.key, "sha256": bundle.sha256})
    return bundle
