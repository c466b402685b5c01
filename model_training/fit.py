"""From nothing to a verified bundle: cohort -> training -> ONNX -> scores -> calibration -> bundle.

The whole flow is visible in `fit_bundle`; every score, threshold and metric is
computed from the exported ONNX graph (what the daemon runs), not from PyTorch.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from daemon.bundle import Bundle
from daemon.errors import ConfigError
from imaging.preprocess import default_params
from model_training.bundles import BundleSpec, write_model_bundle
from model_training.calibration import ScoreWeights, calibrate, select_score_weights
from model_training.cohort import Cohort, CohortSpec, build_cohort, cache_folder, imaging_fingerprint
from model_training.export_onnx import FAnoGANGraph, VaeGraph, export_and_check
from model_training.losses import FOCAL_KERNEL
from model_training.model_card import write_model_card
from model_training.networks import GAN_PRESETS, VAE_PRESETS, GanPreset
from model_training.runtime import pick_device
from model_training.scoring import OnnxScorer, Scored, age_mae, detection_metrics
from model_training.train_fanogan import FAnoGANConfig, train_fanogan
from model_training.train_vae import VaeConfig, train_vae

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^(?P<name>.+)-(?P<version>\d+\.\d+\.\d+)$")
METHODS = ("fanogan", "vae", "vae_ac", "vae_ap")


@dataclass(frozen=True)
class TrainOptions:
    modality: str
    method: str
    preset: str
    out: Path
    n_train: int
    epochs: int
    encoder_epochs: int
    finetune_epochs: int
    batch_size: int
    cache: Path | None
    device: str
    resume: bool
    seed: int
    command: str
    work_dir: Path | None = None
    n_val: int = 16
    n_calibration: int = 40
    n_test: int = 40
    n_anomalous: int = 40
    kappa: float = 1.0
    threads: int = 2
    progress: bool = True
    flip_lr: bool = True
    preprocessing_overrides: dict[str, Any] | None = None
    dataset: Path | None = None  # CSV (model_training.dataset) instead of the synthetic cohort

    def name_and_version(self) -> tuple[str, str]:
        match = VERSION_PATTERN.match(Path(self.out).name)
        if not match:
            raise ConfigError(f"--out must end in <name>-<major.minor.patch>, got {Path(self.out).name!r}")
        return match["name"], match["version"]

    def run_dir(self) -> Path:
        if self.work_dir is not None:
            return Path(self.work_dir)
        base = Path(self.cache) if self.cache is not None else Path(self.out).parent / ".runs"
        return base / "runs" / Path(self.out).name


@dataclass(frozen=True)
class Trained:
    graph: nn.Module
    metrics_csv: Path
    steps: int
    hyper: dict[str, Any]


def merge_params(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge preprocessing overrides over imaging's defaults; the result is what
    the bundle records, so the daemon runs the very same preprocessing."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_params(merged[key], value)
        else:
            merged[key] = value
    return merged


def _train_fanogan(cohort: Cohort, opts: TrainOptions, device: Any) -> Trained:
    grid = cohort.healthy["train"].grid
    base = GAN_PRESETS[opts.preset]
    if len(set(grid)) != 1:
        raise ConfigError(f"f-AnoGAN needs a cubic preprocessing grid, got {grid}")
    stages = int(np.log2(grid[0] // 4))
    # A smaller grid than the preset's 64^3 keeps the preset's first (widest-grid) stages.
    preset = GanPreset(size=grid[0], latent=base.latent, channels=base.channels[:stages])
    cfg = FAnoGANConfig(preset=preset, wgan_epochs=opts.epochs, encoder_epochs=opts.encoder_epochs,
                        finetune_epochs=opts.finetune_epochs, batch_size=opts.batch_size, kappa=opts.kappa,
                        flip_lr=opts.flip_lr, seed=opts.seed)
    result = train_fanogan(cohort.healthy["train"], cfg, opts.run_dir(), device, val=cohort.healthy["val"],
                           resume=opts.resume, progress=opts.progress)
    nets = result.nets
    graph = FAnoGANGraph(nets.encoder, nets.generator, nets.critic, cfg.kappa)
    hyper = {"latent": preset.latent, "channels": list(preset.channels), "kappa": cfg.kappa, "n_critic": cfg.n_critic,
             "gp_lambda": cfg.gp_weight, "lr_gan": cfg.lr_gan, "lr_encoder": cfg.lr_encoder,
             "lr_finetune": cfg.lr_finetune, "epochs": {"wgan": cfg.wgan_epochs, "encoder": cfg.encoder_epochs,
                                                       "finetune": cfg.finetune_epochs}}
    return Trained(graph, result.metrics_path, result.steps, hyper)


def _train_vae(cohort: Cohort, opts: TrainOptions, device: Any) -> Trained:
    preset = VAE_PRESETS[opts.preset]
    cfg = VaeConfig(preset=preset, variant=opts.method, epochs=opts.epochs, batch_size=opts.batch_size,
                    flip_lr=opts.flip_lr, seed=opts.seed)
    result = train_vae(cohort.healthy["train"], cfg, opts.run_dir(), device, val=cohort.healthy["val"],
                       resume=opts.resume, progress=opts.progress)
    hyper = {"latent": preset.latent, "channels": list(preset.channels), "variant": cfg.variant, "lr": cfg.lr,
             "beta": cfg.beta, "gamma": cfg.gamma, "epochs": cfg.epochs}
    return Trained(VaeGraph(result.model), result.metrics_path, result.steps, hyper)


def _score_weights(method: str, val_healthy: Scored, val_anomalous: Scored) -> ScoreWeights:
    def terms(scored: Scored) -> dict[str, np.ndarray]:
        out = dict(scored.terms)
        if scored.age is not None:
            out["age_gap"] = np.abs(scored.age_gap())  # type: ignore[arg-type]
        return out
    return select_score_weights(terms(val_healthy), terms(val_anomalous), "izi_f" if method == "fanogan" else "kl")


def _term_weights(weights: ScoreWeights) -> tuple[dict[str, float], float]:
    """Graph-output weights for the manifest, and the |age gap| weight apart."""
    return {t: w for t, w in weights.terms.items() if t != "age_gap"}, weights.get("age_gap")


def _last_row(metrics_csv: Path) -> dict[str, str]:
    with metrics_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {k: v for k, v in rows[-1].items() if v not in ("", None)} if rows else {}


FOCAL_DEFINITION = (f"focal = largest mean of the error map over any {FOCAL_KERNEL}^3-voxel cube "
                    "(sees compact findings that a whole-volume mean dilutes)")


def _definition(method: str, kappa: float, terms: dict[str, float], age_gap_weight: float) -> str:
    weighted = " + ".join(f"{w:.6g} * {t}" for t, w in terms.items())
    if method == "fanogan":
        return (f"score = {weighted}; izi_f = (1/n)||x - G(E(x))||^2 + {kappa:g} * (1/m)||f(x) - f(G(E(x)))||^2, "
                f"f = the critic's last convolutional block (the CT paper's score); {FOCAL_DEFINITION}; "
                "weights by grid search on validation data; error_map = |x - G(E(x))|")
    return (f"score = {weighted} + {age_gap_weight:.6g} * |age - chronological age|; "
            "rec = mean |x - recon| per voxel, kl = KL(q(z|x) || N(0, I)) averaged over latent dimensions, "
            f"recon from z = mu; {FOCAL_DEFINITION}; weights by grid search on validation data (MR paper, Eq. 3); "
            "error_map = |x - recon|")


def _cohort_folder(opts: TrainOptions, params: dict[str, Any]) -> Path | None:
    """The cache folder of this run's cohort. A resumed run keeps the folder it
    started with (recorded in the run folder), so it continues on the same data
    even if imaging's code has changed since."""
    pointer = opts.run_dir() / "cohort_cache.json"
    if opts.resume and pointer.is_file():
        folder = Path(json.loads(pointer.read_text())["folder"])
        log.info("resuming on the run's cohort", extra={"action": "cohort_resume", "folder": str(folder)})
        return folder
    if opts.cache is None:
        return None
    folder = cache_folder(opts.cache, params)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(json.dumps({"folder": str(folder)}) + "\n")
    return folder


def fit_bundle(opts: TrainOptions) -> Bundle:
    """Train one model and write its verified bundle (plus model card) to `opts.out`."""
    if opts.method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS}, got {opts.method!r}")
    began = time.monotonic()
    name, version = opts.name_and_version()
    device = pick_device(opts.device, opts.threads)
    params = merge_params(default_params(opts.modality), opts.preprocessing_overrides or {})
    spec = CohortSpec(opts.modality, opts.n_train, opts.n_val, opts.n_calibration, opts.n_test,
                      opts.n_anomalous // 2, opts.n_anomalous - opts.n_anomalous // 2, opts.seed)
    folder = _cohort_folder(opts, params)
    if opts.dataset is not None:
        from model_training.dataset import build_dataset_cohort
        cohort = build_dataset_cohort(opts.dataset, params, opts.cache, spec, opts.progress)
    else:
        cohort = build_cohort(spec, params, opts.cache, opts.progress, folder)
    cohort_s = time.monotonic() - began

    trained = (_train_fanogan if opts.method == "fanogan" else _train_vae)(cohort, opts, device)
    train_s = time.monotonic() - began - cohort_s
    onnx_path = opts.run_dir() / "model.onnx"
    test = cohort.healthy["test"]
    parity = export_and_check(trained.graph, onnx_path, test.images[:2], test.ages[:2], seed=opts.seed)

    scorer = OnnxScorer(onnx_path, opts.threads)
    val_h, val_a = scorer.score(cohort.healthy["val"], keep_maps=False), scorer.score(cohort.anomalous["val"], keep_maps=False)
    weights = _score_weights(opts.method, val_h, val_a)
    terms, age_gap_weight = _term_weights(weights)
    cal = scorer.score(cohort.healthy["calibration"])
    calibration = calibrate(cal.combined(terms, age_gap_weight), cal.error_maps, cohort.healthy_masks["calibration"])
    test_h, test_a = scorer.score(test, keep_maps=False), scorer.score(cohort.anomalous["test"], keep_maps=False)
    metrics = _metrics(test_h, test_a, val_h, val_a, terms, age_gap_weight, calibration.threshold)
    metrics.update(n_train=len(cohort.healthy["train"]), qc_excluded=cohort.qc_excluded,
                   final_epoch=_last_row(trained.metrics_csv),
                   anomaly_kinds=sorted({c.lesion_kind for c in cohort.cases["anomalous_test"] if c.lesion_kind}))
    metrics["score_weight_search"] = {**weights.terms, "validation_auroc": weights.validation_auroc}
    age_supported = val_h.age is not None
    bundle_spec = BundleSpec(
        name=name, version=version, modality=opts.modality, method=opts.method,
        description=_description(opts), grid=test.grid, preprocessing=params, score_terms=terms,
        age_gap_weight=age_gap_weight, score_definition=_definition(opts.method, opts.kappa, terms, age_gap_weight),
        calibration=calibration, age_supported=age_supported, age_validation_mae=age_mae(val_h),
        training={"command": opts.command, "preset": opts.preset, "seed": opts.seed, "n_train": len(cohort.healthy["train"]),
                  "epochs": trained.hyper["epochs"], "steps": trained.steps, "batch_size": opts.batch_size,
                  "duration_s": round(time.monotonic() - began, 1), "flip_lr": opts.flip_lr, "resumed": opts.resume,
                  "imaging_code_sha256": folder.name.rsplit("-", 1)[-1] if folder else imaging_fingerprint(), "cohort_s": round(cohort_s, 1),
                  "train_s": round(train_s, 1), "device": str(device), "hyperparameters": trained.hyper,
                  "data": f"dataset CSV {opts.dataset}" if opts.dataset is not None else
                  "synthetic phantoms (imaging.phantoms: ICBM152 2009 tissue maps + Colin27 head outline)"},
        metrics=metrics, parity_max_abs_diff=parity,
        extra={"extra_inputs": {"chronological_age": "float32 [N], years"}} if opts.method == "vae_ac" else {},
    )
    bundle = write_model_bundle(opts.out, onnx_path, bundle_spec, trained.metrics_csv)
    write_model_card(Path(opts.out), bundle.manifest)
    return bundle


def _metrics(test_h: Scored, test_a: Scored, val_h: Scored, val_a: Scored, terms: dict[str, float],
             age_gap_weight: float, threshold: float) -> dict[str, Any]:
    score_h, score_a = test_h.combined(terms, age_gap_weight), test_a.combined(terms, age_gap_weight)
    out: dict[str, Any] = {"test": detection_metrics(score_h, score_a, threshold)}
    out["test_per_term_auroc"] = {t: detection_metrics(test_h.terms[t], test_a.terms[t])["auroc"] for t in test_h.terms}
    if test_h.age is not None:
        out["test_per_term_auroc"]["age_gap"] = detection_metrics(np.abs(test_h.age_gap()), np.abs(test_a.age_gap()))["auroc"]
        out["age_mae_healthy_test"] = age_mae(test_h)
        out["age_mae_anomalous_test"] = age_mae(test_a)
    out["validation"] = detection_metrics(val_h.combined(terms, age_gap_weight), val_a.combined(terms, age_gap_weight))
    return out


def _description(opts: TrainOptions) -> str:
    what = {"fanogan": "3D f-AnoGAN anomaly detection (Simarro Viana et al.)",
            "vae": "3D VAE anomaly detection (Bengs, Behrendt et al., baseline VAE)",
            "vae_ac": "3D VAE-a_c anomaly detection, latent scaled by chronological age (Bengs, Behrendt et al.)",
            "vae_ap": "3D VAE-a_p anomaly detection with multi-task brain-age prediction (Bengs, Behrendt et al.)"}
    return (f"{what[opts.method]} for {'head CT' if opts.modality == 'CT' else 'brain MRI'}, preset {opts.preset}. "
            "Trained only on synthetic phantoms; it has never seen a real patient scan.")
