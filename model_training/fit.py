"""From nothing to a verified bundle: cohort -> training -> ONNX -> scores -> calibration -> bundle.

The whole flow is visible in `fit_bundle`; every score, threshold and metric is
computed from the exported ONNX graph (what the daemon runs), not from PyTorch.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headscreen.age_bias import excludes_zero
from headscreen.bundle import Bundle, load_bundle
from headscreen.errors import ConfigError, HeadscreenError
from headscreen.export.seg import SEG_GROW
from headscreen.export.seg import calibrate_threshold as calibrate_seg_threshold
from headscreen.imaging.preprocess import ModelGrid, default_params
from headscreen.model_training.bundles import WEIGHTS_FILE, BundleSpec, load_weights, save_weights, write_model_bundle
from headscreen.model_training.calibration import Calibration, ScoreWeights, calibrate, select_score_weights
from headscreen.model_training.cohort import (
    Cohort,
    CohortSpec,
    build_cohort,
    build_healthy_samples,
    cache_folder,
    imaging_fingerprint,
)
from headscreen.model_training.export_onnx import (
    PARITY_TOLERANCE,
    ExportError,
    ExportGraph,
    FAnoGANGraph,
    VaeGraph,
    export_and_check,
)
from headscreen.model_training.losses import FOCAL_KERNEL
from headscreen.model_training.model_card import write_model_card
from headscreen.model_training.networks import GAN_PRESETS, VAE3D, VAE_PRESETS, GanPreset
from headscreen.model_training.runtime import Samples, pick_device
from headscreen.model_training.scoring import OnnxScorer, Scored, age_mae, detection_metrics
from headscreen.model_training.train_fanogan import FAnoGANConfig, train_fanogan
from headscreen.model_training.train_vae import VaeConfig, train_vae
from headscreen.scores import MASKED_TERMS, NORMATIVE_FILE, Normative, batch_terms, masked_terms, uses_asymmetry

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^(?P<name>.+)-(?P<version>\d+\.\d+\.\d+)$")
METHODS = ("fanogan", "vae", "vae_ac", "vae_ap")
# A bundle whose validation AUROC (lesion vs healthy, the final weighted score) is below
# this is refused unless forced: a run that learnt nothing must not become a bundle.
DEFAULT_MIN_VAL_AUROC = 0.6


class BelowQualityFloor(HeadscreenError):
    """The trained model's validation AUROC is below the floor; no bundle was written."""


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
    beta: float = 1.0  # VAE KL weight (the MR paper's 1)
    denoise: float = 0.0  # VAE input noise SD (train_vae.VaeConfig.denoise_sigma)
    threads: int = 2
    progress: bool = True
    flip_lr: bool = True
    randomise: bool = True  # domain-randomised synthetic heads (imaging.synthesis)
    preprocessing_overrides: dict[str, Any] | None = None
    dataset: Path | None = None  # CSV (model_training.dataset) instead of the synthetic cohort
    init_from: Path | None = None  # a bundle whose weights.pt starts a fine-tune
    min_val_auroc: float = DEFAULT_MIN_VAL_AUROC
    force: bool = False  # write the bundle even below the floor (recorded as forced)
    notes: tuple[str, ...] = ()  # what changed and why, in words, for the manifest and model card
    age_extra: int | None = None  # --refit-age: healthy heads beyond the cohort's train split (None: default)
    age_seed: int | None = None  # --refit-age: their seed (default seed + AGE_EXTRA_SEED_OFFSET)

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
    graph: ExportGraph
    metrics_csv: Path
    steps: int
    hyper: dict[str, Any]
    weights: dict[str, Any]  # state dicts, shipped as weights.pt so a site can fine-tune


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


def _train_fanogan(cohort: Cohort, opts: TrainOptions, device: Any, init: dict | None) -> Trained:
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
                           resume=opts.resume, progress=opts.progress, init=init,
                           val_anomalous=cohort.anomalous.get("val"))
    nets = result.nets
    graph = FAnoGANGraph(nets.encoder, nets.generator, nets.critic, cfg.kappa)
    hyper = {"latent": preset.latent, "channels": list(preset.channels), "kappa": cfg.kappa, "n_critic": cfg.n_critic,
             "gp_lambda": cfg.gp_weight, "lr_gan": cfg.lr_gan, "lr_encoder": cfg.lr_encoder,
             "lr_finetune": cfg.lr_finetune, "epochs": {"wgan": cfg.wgan_epochs, "encoder": cfg.encoder_epochs,
                                                       "finetune": cfg.finetune_epochs}}
    weights = {name: m.state_dict() for name, m in nets.modules().items()}
    return Trained(graph, result.metrics_path, result.steps, hyper, weights)


def _train_vae(cohort: Cohort, opts: TrainOptions, device: Any, init: dict | None) -> Trained:
    preset = VAE_PRESETS[opts.preset]
    cfg = VaeConfig(preset=preset, variant=opts.method, epochs=opts.epochs, batch_size=opts.batch_size,
                    beta=opts.beta, denoise_sigma=opts.denoise, flip_lr=opts.flip_lr, seed=opts.seed)
    result = train_vae(cohort.healthy["train"], cfg, opts.run_dir(), device, val=cohort.healthy["val"],
                       resume=opts.resume, progress=opts.progress, init=init, val_anomalous=cohort.anomalous.get("val"))
    hyper = {"latent": preset.latent, "channels": list(preset.channels), "variant": cfg.variant, "lr": cfg.lr,
             "beta": cfg.beta, "gamma": cfg.gamma, "epochs": cfg.epochs}
    if cfg.denoise_sigma > 0:
        hyper.update(denoise_sigma=cfg.denoise_sigma, denoise_cells=cfg.denoise_cells)
    return Trained(VaeGraph(result.model), result.metrics_path, result.steps, hyper,
                   {"model": result.model.state_dict()})


# Terms the weight search may use: each paper's own term and the masked terms of
# headscreen.scores. The graph's unmasked `focal` and `rec` stay outputs for comparison,
# but a maximum over an unmasked map peaks at the crop edge on real heads.
CANDIDATE_TERMS = {"fanogan": ("izi_f", *MASKED_TERMS), "vae": ("kl", *MASKED_TERMS)}
NORMATIVE_MARGIN_VOXELS = 1


def _score_weights(method: str, val_healthy: Scored, val_anomalous: Scored) -> ScoreWeights:
    allowed = CANDIDATE_TERMS["fanogan" if method == "fanogan" else "vae"]

    def terms(scored: Scored) -> dict[str, np.ndarray]:
        out = {t: v for t, v in scored.terms.items() if t in allowed}
        gap = scored.age_gap()
        if gap is not None:
            out["age_gap"] = np.abs(gap)
        return out
    return select_score_weights(terms(val_healthy), terms(val_anomalous), "izi_f" if method == "fanogan" else "kl")


def _term_weights(weights: ScoreWeights) -> tuple[dict[str, float], float]:
    """Graph-output weights for the manifest, and the |age gap| weight apart."""
    return {t: w for t, w in weights.terms.items() if t != "age_gap"}, weights.get("age_gap")


def _last_row(metrics_csv: Path) -> dict[str, str]:
    with metrics_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {k: v for k, v in rows[-1].items() if v not in ("", None)} if rows else {}


FOCAL_DEFINITION = (f"focal = largest mean of the raw error map over any {FOCAL_KERNEL}^3-voxel cube "
                    "(unmasked, reported for comparison)")
MASKED_DEFINITION = (
    "masked terms (headscreen/scores.py) use z = (error - healthy voxel mean) / healthy voxel SD, the normative "
    "model fitted on the healthy training scans (normative.npz), only inside the case's brain mask eroded by "
    f"{NORMATIVE_MARGIN_VOXELS} voxel and away from the grid edge: z_mean = mean z; z_focal = largest mean z over "
    "any 5^3-voxel cube mostly inside that mask; z_extent = share of those voxels with z > 3; rec_brain = mean "
    "error there; z_focal_rel = (z_focal - median z) / (1.4826 x median absolute deviation of z); z_extent_rel = "
    "share of voxels with z above median + 3 x that spread; z_asym_focal and z_asym_extent = the z_focal and "
    "z_extent of d = z minus z mirrored across the midline (the grid's x centre), over the voxels whose mirror "
    "is scored too, extent at d > 3 x sqrt(2); overlay = positive z over the healthy 99.9th percentile of z; "
    "a score that weighs z_asym terms shows z less its mirror image's z where that is lower (one-sided), in the "
    "overlay and the SEG")


def _definition(method: str, kappa: float, terms: dict[str, float], age_gap_weight: float) -> str:
    weighted = " + ".join(f"{w:.6g} * {t}" for t, w in terms.items())
    if method == "fanogan":
        return (f"score = {weighted}; izi_f = (1/n)||x - G(E(x))||^2 + {kappa:g} * (1/m)||f(x) - f(G(E(x)))||^2, "
                f"f = the critic's last convolutional block (the CT paper's score); {MASKED_DEFINITION}; "
                f"{FOCAL_DEFINITION}; weights by grid search on validation data; error_map = |x - G(E(x))|")
    return (f"score = {weighted} + {age_gap_weight:.6g} * |age - chronological age|; "
            "rec = mean |x - recon| per voxel, kl = KL(q(z|x) || N(0, I)) averaged over latent dimensions, "
            f"recon from z = mu; {MASKED_DEFINITION}; {FOCAL_DEFINITION}; weights by grid search on validation data "
            "(MR paper, Eq. 3); error_map = |x - recon|")


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
    init, init_bundle = _init_weights(opts)
    # A fine-tune keeps the preprocessing of the bundle it starts from: the weights
    # only make sense for the inputs they were trained on.
    base_params = init_bundle.manifest.preprocessing if init_bundle else default_params(opts.modality)
    params = merge_params(base_params, opts.preprocessing_overrides or {})
    spec = _cohort_spec(opts)
    folder = _cohort_folder(opts, params)
    if opts.dataset is not None:
        from headscreen.model_training.dataset import build_dataset_cohort
        cohort = build_dataset_cohort(opts.dataset, params, opts.cache, spec, opts.progress)
    else:
        cohort = build_cohort(spec, params, opts.cache, opts.progress, folder, jobs=opts.threads)
    cohort_s = time.monotonic() - began

    trained = (_train_fanogan if opts.method == "fanogan" else _train_vae)(cohort, opts, device, init)
    weights_path = opts.run_dir() / WEIGHTS_FILE
    save_weights(weights_path, opts.method, opts.preset, cohort.healthy["test"].grid, trained.weights)
    train_s = time.monotonic() - began - cohort_s
    onnx_path = opts.run_dir() / "model.onnx"
    test = cohort.healthy["test"]
    parity = export_and_check(trained.graph, onnx_path, test.images[:2], test.ages[:2], seed=opts.seed)

    scorer = OnnxScorer(onnx_path, opts.threads)
    cal_raw = scorer.score(cohort.healthy["calibration"])  # maps kept: the z_limit and the error scale
    normative = _fit_normative(scorer, cohort, cal_raw)
    normative.save(opts.run_dir() / NORMATIVE_FILE)
    fitted = _weigh_and_calibrate(opts, scorer, cohort, normative, params, cal_raw)
    del cal_raw
    terms, age_gap_weight, calibration = fitted.terms, fitted.age_gap_weight, fitted.calibration
    metrics = fitted.metrics
    metrics.update(n_train=len(cohort.healthy["train"]), qc_excluded=cohort.qc_excluded,
                   final_epoch=_last_row(trained.metrics_csv))
    gate = quality_gate(metrics["validation"]["auroc"], opts)
    bundle_spec = BundleSpec(
        name=name, version=version, modality=opts.modality, method=opts.method,
        description=_description(opts), grid=test.grid, preprocessing=params, score_terms=terms,
        age_gap_weight=age_gap_weight, score_definition=_definition(opts.method, opts.kappa, terms, age_gap_weight),
        calibration=calibration, age_supported=fitted.age_supported, age_validation_mae=fitted.age_validation_mae,
        training={"command": opts.command, "preset": opts.preset, "seed": opts.seed,
                  "n_train": len(cohort.healthy["train"]),
                  "epochs": trained.hyper["epochs"], "steps": trained.steps, "batch_size": opts.batch_size,
                  "duration_s": round(time.monotonic() - began, 1), "flip_lr": opts.flip_lr, "resumed": opts.resume,
                  "imaging_code_sha256": folder.name.rsplit("-", 1)[-1] if folder else imaging_fingerprint(),
                  "cohort_s": round(cohort_s, 1),
                  "train_s": round(train_s, 1), "device": str(device), "hyperparameters": trained.hyper,
                  "data": f"dataset CSV {opts.dataset}" if opts.dataset is not None else
                  ("domain-randomised synthetic heads (imaging.synthesis over imaging.phantoms: ICBM152 2009 tissue "
                   "maps + Colin27 head outline)" if opts.randomise else
                   "synthetic phantoms (imaging.phantoms: ICBM152 2009 tissue maps + Colin27 head outline)"),
                  "randomised": opts.randomise,
                  "init_from": ({"bundle": init_bundle.manifest.key, "sha256": init_bundle.sha256}
                                if init_bundle else None),
                  "quality_gate": gate, **({"notes": list(opts.notes)} if opts.notes else {})},
        metrics=metrics, parity_max_abs_diff=parity,
        extra={"extra_inputs": {"chronological_age": "float32 [N], years"}} if opts.method == "vae_ac" else {},
    )
    bundle = write_model_bundle(opts.out, onnx_path, bundle_spec, trained.metrics_csv,
                                normative=opts.run_dir() / NORMATIVE_FILE, weights=weights_path)
    write_model_card(Path(opts.out), bundle.manifest)
    return bundle


@dataclass(frozen=True)
class Weighed:
    """Score weights (validation split), calibration (calibration split) and test metrics."""

    terms: dict[str, float]
    age_gap_weight: float
    calibration: Calibration  # SEG threshold included
    metrics: dict[str, Any]
    age_supported: bool
    age_validation_mae: float | None


def _weigh_and_calibrate(opts: TrainOptions, scorer: OnnxScorer, cohort: Cohort, normative: Normative,
                         params: dict[str, Any], cal_raw: Scored) -> Weighed:
    """Everything after the network and its normative model: the weight search over the
    candidate terms, the threshold and SEG threshold on healthy calibration scans, and
    the test metrics (n_train, qc_excluded and final_epoch are the caller's)."""

    def scored(samples: Samples, masks: np.ndarray) -> Scored:
        return _with_masked_terms(scorer.score(samples), masks, normative)

    val_h = scored(cohort.healthy["val"], cohort.healthy_masks["val"])
    val_a = scored(cohort.anomalous["val"], cohort.anomalous_masks["val"])
    weights = _score_weights(opts.method, val_h, val_a)
    terms, age_gap_weight = _term_weights(weights)
    cal = _with_masked_terms(cal_raw, cohort.healthy_masks["calibration"], normative)
    calibration = calibrate(cal.combined(terms, age_gap_weight), cal_raw.error_maps,
                            cohort.healthy_masks["calibration"])
    overlays = [masked_terms(error, mask, normative, one_sided=uses_asymmetry(terms))[1]
                for error, mask in zip(cal_raw.error_maps, cohort.healthy_masks["calibration"])]
    grid_voxel_ml = float(np.prod(ModelGrid.from_params(params).spacing)) / 1000.0
    seg_threshold = calibrate_seg_threshold(overlays, grid_voxel_ml, SEG_GROW)
    calibration = dataclasses.replace(calibration, seg_threshold=seg_threshold, seg_grow=SEG_GROW)
    del overlays
    test_h = scored(cohort.healthy["test"], cohort.healthy_masks["test"])
    test_a = scored(cohort.anomalous["test"], cohort.anomalous_masks["test"])
    metrics = _metrics(test_h, test_a, val_h, val_a, terms, age_gap_weight, calibration.threshold)
    metrics["anomaly_kinds"] = sorted({c.lesion_kind for c in cohort.cases["anomalous_test"] if c.lesion_kind})
    metrics["score_weight_search"] = {**weights.terms, "validation_auroc": weights.validation_auroc}
    metrics["paper_score"] = _paper_score(opts.method, val_h, val_a, test_h, test_a)
    if cal.age is not None:
        metrics["age_mae_healthy_calibration"] = age_mae(cal)
    return Weighed(terms, age_gap_weight, calibration, metrics, val_h.age is not None, age_mae(val_h))


def recalibrate_bundle(opts: TrainOptions) -> Bundle:
    """A new version of the bundle `opts.init_from` with the very same network (model.onnx,
    weights.pt) and normative model, trained on nothing: the score weights are searched
    again over today's candidate terms on the validation split, the threshold and SEG
    threshold calibrated again and the test metrics recomputed, on the cohort the bundle
    was trained with (same seed, split counts and preprocessing; the train split, which
    only the network and the normative model used, is not rebuilt). This is how a new
    score term (headscreen.scores) reaches a shipped bundle without retraining."""
    source, params, began, _ = _rebuild_source(opts, "--recalibrate")
    cohort = build_cohort(_cohort_spec(opts), params, opts.cache, opts.progress, _cache(opts, params),
                          jobs=opts.threads, healthy_splits=("val", "calibration", "test"))
    weights = source.path / WEIGHTS_FILE if WEIGHTS_FILE in source.manifest.files else None
    return _rebuild_bundle(opts, source, params, cohort, source.model_path, weights, began, "recalibrated",
                           "same network and normative model; score weights, threshold and SEG threshold searched "
                           "and calibrated again on the training cohort's validation and calibration splits, rebuilt "
                           "with the imaging code of the day",
                           {"calibrated_on": f"the bundle's synthetic cohort (seed {opts.seed})"})


# The extra healthy heads of an age-head refit must not be the cohort's own heads.
DEFAULT_AGE_EXTRA = 400
AGE_EXTRA_SEED_OFFSET = 7
# 1e-4, 1e-3 and 1e-2 gave validation MAEs within 0.7 years of each other on the MR cohort; the strongest is kept.
AGE_HEAD_WEIGHT_DECAY = 1e-2


def refit_age_bundle(opts: TrainOptions) -> Bundle:
    """A new version of the VAE-a_p bundle `opts.init_from` whose brain-age head is trained
    again (model_training.age_refit) on the cohort's train split plus `opts.age_extra`
    more healthy heads, everything else in the network frozen. The graph's anomaly
    outputs are checked to be unchanged; then the bundle is recalibrated as by
    --recalibrate, so its age figures (and any age-gap weight) are the new head's.
    With `opts.dataset` (a site's confirmed-normal studies with ages) only the age
    output's offset is corrected instead (site_age_offset_bundle). Either way a head no
    better on the validation split than the source's is refused unless forced."""
    from headscreen.model_training.age_refit import refit_age_head

    if opts.method != "vae_ap":
        raise ConfigError(f"--refit-age needs a vae_ap bundle (the method with an age head), not {opts.method}")
    if opts.dataset is not None:
        return site_age_offset_bundle(opts)
    source, params, began, nets = _rebuild_source(opts, "--refit-age")
    age_seed = opts.seed + AGE_EXTRA_SEED_OFFSET if opts.age_seed is None else opts.age_seed
    if age_seed == opts.seed:
        raise ConfigError("--age-seed must differ from --seed: the extra heads would be the cohort's own")
    cohort = build_cohort(_cohort_spec(opts), params, opts.cache, opts.progress, _cache(opts, params),
                          jobs=opts.threads)
    train = cohort.healthy["train"]
    age_extra = DEFAULT_AGE_EXTRA if opts.age_extra is None else opts.age_extra
    if age_extra > 0:
        extra = build_healthy_samples(opts.modality, age_extra, age_seed, params, opts.cache,
                                      _cache(opts, params), opts.randomise, opts.progress, opts.threads)
        train = Samples(np.concatenate([train.images, extra.images]), np.concatenate([train.ages, extra.ages]))
    model = _source_network(opts, nets, train.grid)
    fit = refit_age_head(model, train, cohort.healthy["val"], seed=opts.seed, flip_lr=opts.flip_lr,
                         epochs=opts.epochs, weight_decay=AGE_HEAD_WEIGHT_DECAY)
    gate = age_refit_gate(fit.val_mae, fit.val_mae_before, len(cohort.healthy["val"]), opts)
    test = cohort.healthy["test"]
    onnx_path, weights_path, parity, unchanged = _export_refit(opts, source, model, test, cohort.healthy["val"])
    record = {"n_heads": fit.n_heads, "n_cohort_train": len(cohort.healthy["train"]),
              "n_val": len(cohort.healthy["val"]),
              "extra": {"n": len(train) - len(cohort.healthy["train"]), "asked": age_extra, "seed": age_seed},
              "flip_lr": opts.flip_lr, "epochs": fit.epochs, "best_epoch": fit.best_epoch,
              "weight_decay": fit.weight_decay, "train_mae": round(fit.train_mae, 3),
              "val_mae_before": round(fit.val_mae_before, 3), "val_mae": round(fit.val_mae, 3), "gate": gate,
              "anomaly_outputs_max_abs_diff": unchanged, "parity_max_abs_diff": parity,
              "calibrated_on": f"the bundle's synthetic cohort (seed {opts.seed})"}
    return _rebuild_bundle(opts, source, params, cohort, onnx_path, weights_path, began, "age_refit",
                           "brain-age head trained again on more healthy heads, the rest of the network frozen "
                           "(anomaly outputs unchanged); score weights, threshold and SEG threshold searched and "
                           "calibrated again as by --recalibrate", record)


def site_age_offset_bundle(opts: TrainOptions) -> Bundle:
    """A new version of `opts.init_from` whose predicted brain age is lowered by the median
    gap of the site's normal train rows (model_training.age_refit.correct_age_offset);
    the val rows judge it (age_refit_gate; with none, a quarter of the train rows are
    held out, dataset.hold_out_validation), every split present is reported before and
    after. Nothing else changes: the score, the thresholds and the normative model are
    the source's (a site's threshold is `headscreen calibrate`'s, per scanner)."""
    from headscreen.model_training.age_refit import correct_age_offset
    from headscreen.model_training.dataset import SPLITS as ROW_SPLITS
    from headscreen.model_training.dataset import hold_out_validation, prepare_dataset, read_dataset, training_arrays

    if opts.age_extra:
        raise ConfigError("--refit-age --dataset corrects the age offset on the site's own heads: no --age-extra")
    source, params, began, nets = _rebuild_source(opts, "--refit-age", dataset_allowed=True)
    prepared = list(prepare_dataset(read_dataset(opts.dataset), params, opts.cache))  # type: ignore[arg-type]
    prepared, held_out = hold_out_validation(prepared)
    present = {p.row.split for p in prepared if p.row.is_normal}
    splits = {name: Samples(*training_arrays(prepared, name)) for name in ROW_SPLITS
              if name in present or name in ("train", "val")}  # train and val must have usable rows
    model = _source_network(opts, nets, splits["train"].grid)
    fit = correct_age_offset(model, splits)
    gate = age_refit_gate(fit.val_mae, fit.val_mae_before, len(splits["val"]), opts, fit.offset_ci95)
    onnx_path, weights_path, parity, unchanged = _export_refit(opts, source, model, splits["val"], splits["val"])
    m = source.manifest
    record = {"mode": "site_offset", "data": f"dataset CSV {opts.dataset}", "offset_years": round(fit.offset_years, 3),
              "offset_ci95": _finite_or_none(fit.offset_ci95),
              "n_train": fit.n_train, "n_val": len(splits["val"]), "val_held_out_from_train": held_out,
              "before": fit.before, "after": fit.after,
              # normal rows with an age that were not used: unreadable, or refused by the screening's QC
              "rows_left_out": sum(p.row.is_normal and p.row.age is not None for p in prepared)
              - sum(len(samples) for samples in splits.values()),
              "gate": gate, "anomaly_outputs_max_abs_diff": unchanged, "parity_max_abs_diff": parity}
    training = {**m.training, "age_refit": _rebuild_record(
        opts, source, began, "predicted brain age lowered by the median gap of the site's healthy training heads "
        "(the age head's last bias; nothing else in the network changed); score, thresholds and normative model "
        "are the source's", {**record, "score_unchanged": True})}
    calibration = Calibration(**{f.name: getattr(m.calibration, f.name) for f in dataclasses.fields(Calibration)})
    return _write_rebuilt(opts, source, params, onnx_path, weights_path, training, m.score.terms,
                          m.score.age_gap_weight, calibration, dict(m.metrics), True, fit.val_mae, parity)


def _source_network(opts: TrainOptions, nets: dict, grid: tuple[int, int, int]) -> VAE3D:
    model = VAE3D(grid, VAE_PRESETS[opts.preset], opts.method)
    model.load_state_dict(nets["model"])
    return model


def _export_refit(opts: TrainOptions, source: Bundle, model: VAE3D, parity_heads: Samples,
                  compare_heads: Samples) -> tuple[Path, Path, float, float]:
    """Weights and ONNX graph of a model whose age head changed; the parity of the export,
    and the largest change of any other output from the source graph's (anomaly_outputs_diff)."""
    run = opts.run_dir()
    run.mkdir(parents=True, exist_ok=True)
    weights_path, onnx_path = run / WEIGHTS_FILE, run / "model.onnx"
    save_weights(weights_path, opts.method, opts.preset, parity_heads.grid, {"model": model.state_dict()})
    parity = export_and_check(VaeGraph(model), onnx_path, parity_heads.images[:2], parity_heads.ages[:2],
                              seed=opts.seed)
    return onnx_path, weights_path, parity, anomaly_outputs_diff(source.model_path, onnx_path,
                                                                 compare_heads.images[:4])


def age_refit_gate(val_mae: float, val_mae_before: float, n_val: int, opts: TrainOptions,
                   offset_ci95: tuple[float, float] | None = None) -> dict[str, Any]:
    """The refit head must predict the validation split's ages better than the source's
    head did, and a site's offset (`offset_ci95`, its bootstrap interval) must be told
    apart from zero: a correction by noise only adds noise. Raises BelowQualityFloor
    (nothing written) when not, unless forced."""
    better = val_mae < val_mae_before
    biased = offset_ci95 is None or excludes_zero(offset_ci95)  # NaN (one head): not biased
    passed = better and biased
    gate = {"metric": "brain-age MAE on the healthy validation split, years", "n": n_val,
            "source_head": round(val_mae_before, 3), "value": round(val_mae, 3), "passed": passed,
            "forced": not passed and opts.force}
    if offset_ci95 is not None:
        gate["offset_ci95"] = _finite_or_none(offset_ci95)
    if not passed and not opts.force:
        why = (f"the offset's 95 % interval [{offset_ci95[0]:.2f}, {offset_ci95[1]:.2f}] years holds 0: these heads "
               "show no age bias to correct" if not biased and offset_ci95 is not None else
               f"its brain-age MAE on the {n_val} healthy validation heads is {val_mae:.2f} years, no better than "
               f"the source head's {val_mae_before:.2f}")
        raise BelowQualityFloor(
            f"age-head refit refused: {why}; nothing was written to {opts.out}. Give more healthy heads with ages, "
            "or --force to write it anyway (its manifest will say it was forced)")
    return gate


def _finite_or_none(values: tuple[float, ...]) -> list[float | None]:
    """For JSON: rounded, NaN as null."""
    return [round(v, 3) if np.isfinite(v) else None for v in values]


def anomaly_outputs_diff(before: Path, after: Path, images: np.ndarray) -> float:
    """Largest difference between two graphs' outputs other than `age` on `images`;
    raises ExportError above the parity tolerance."""
    old, new = OnnxScorer(before, 1), OnnxScorer(after, 1)
    feeds = {"image": images[:, None].astype(np.float32)}
    names = [n for n in old.outputs if n != "age"]
    if sorted(names) != sorted(n for n in new.outputs if n != "age"):
        raise ExportError(f"the refit graph's outputs {new.outputs} differ from the source's {old.outputs}")
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(old.session.run(names, feeds),
                                                            new.session.run(names, feeds)))
    if not diff < PARITY_TOLERANCE:
        raise ExportError(f"the age-head refit changed the anomaly outputs by {diff:.3g}")
    return diff


def _rebuild_source(opts: TrainOptions, flag: str,
                    dataset_allowed: bool = False) -> tuple[Bundle, dict[str, Any], float, dict]:
    """The checked source bundle of a --recalibrate or --refit-age, its preprocessing, the
    start time and its network weights (read once: weights.pt holds every net)."""
    if opts.init_from is None:
        raise ConfigError(f"{flag} needs --init-from BUNDLE (the bundle to start from)")
    if opts.dataset is not None and not dataset_allowed:
        raise ConfigError(f"{flag} keeps the bundle's synthetic cohort: no --dataset")
    if Path(opts.out).resolve() == Path(opts.init_from).resolve():
        raise ConfigError(f"{flag} writes a new bundle: --out must differ from --init-from")
    began = time.monotonic()
    opts.name_and_version()
    nets, source = _init_weights(opts)  # the same checks as a fine-tune: modality, method and preset match
    assert nets is not None and source is not None  # init_from is set
    if source.normative is None:
        raise ConfigError(f"--init-from {opts.init_from}: the bundle has no normative model to score against")
    return source, recalibration_params(source.manifest.preprocessing, opts.preprocessing_overrides), began, nets


def _cohort_spec(opts: TrainOptions) -> CohortSpec:
    return CohortSpec(opts.modality, opts.n_train, opts.n_val, opts.n_calibration, opts.n_test,
                      opts.n_anomalous // 2, opts.n_anomalous - opts.n_anomalous // 2, opts.seed, opts.randomise)


def _cache(opts: TrainOptions, params: dict[str, Any]) -> Path | None:
    return cache_folder(opts.cache, params) if opts.cache is not None else None


def _rebuild_bundle(opts: TrainOptions, source: Bundle, params: dict[str, Any], cohort: Cohort, onnx_path: Path,
                    weights_path: Path | None, began: float, key: str, what: str,
                    record: dict[str, Any]) -> Bundle:
    """Weigh, calibrate and write the new version of `source` with the graph at `onnx_path`;
    the manifest's training record gains `key` saying what was done."""
    m = source.manifest
    scorer = OnnxScorer(onnx_path, opts.threads)
    cal_raw = scorer.score(cohort.healthy["calibration"])
    fitted = _weigh_and_calibrate(opts, scorer, cohort, source.normative, params, cal_raw)  # type: ignore[arg-type]
    del cal_raw
    metrics: dict[str, Any] = dict(fitted.metrics)
    metrics.update({k: m.metrics[k] for k in ("n_train", "qc_excluded", "final_epoch") if k in m.metrics})
    gate = quality_gate(metrics["validation"]["auroc"], opts)
    score_unchanged = fitted.terms == m.score.terms and fitted.age_gap_weight == m.score.age_gap_weight
    training = {**m.training, "quality_gate": gate,
                key: _rebuild_record(opts, source, began, what, {**record, "score_unchanged": score_unchanged})}
    return _write_rebuilt(opts, source, params, onnx_path, weights_path, training, fitted.terms,
                          fitted.age_gap_weight, fitted.calibration, metrics, fitted.age_supported,
                          fitted.age_validation_mae,
                          float(record.get("parity_max_abs_diff", m.parity.get("max_abs_diff", 0.0))))


def _rebuild_record(opts: TrainOptions, source: Bundle, began: float, what: str,
                    record: dict[str, Any]) -> dict[str, Any]:
    return {"command": opts.command, "from": {"bundle": source.manifest.key, "sha256": source.sha256},
            "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "duration_s": round(time.monotonic() - began, 1), "what": what, **record,
            "imaging_code_sha256": imaging_fingerprint(), "notes": list(opts.notes)}


def _write_rebuilt(opts: TrainOptions, source: Bundle, params: dict[str, Any], onnx_path: Path,
                   weights_path: Path | None, training: dict[str, Any], terms: dict[str, float],
                   age_gap_weight: float, calibration: Calibration, metrics: dict[str, Any],
                   age_supported: bool, age_validation_mae: float | None, parity: float) -> Bundle:
    """Write the new version of `source` (its normative model, description and grid) and its card."""
    name, version = opts.name_and_version()
    m = source.manifest
    spec_out = BundleSpec(
        name=name, version=version, modality=m.modality, method=opts.method, description=m.description,
        grid=(int(m.input.shape[1]), int(m.input.shape[2]), int(m.input.shape[3])), preprocessing=params,
        score_terms=terms, age_gap_weight=age_gap_weight,
        score_definition=_definition(opts.method, opts.kappa, terms, age_gap_weight),
        calibration=calibration, age_supported=age_supported,
        age_validation_mae=age_validation_mae, training=training, metrics=metrics, parity_max_abs_diff=parity,
        extra={"extra_inputs": {"chronological_age": "float32 [N], years"}} if opts.method == "vae_ac" else {},
    )
    csv_path = source.path / "training_metrics.csv"
    bundle = write_model_bundle(opts.out, onnx_path, spec_out, csv_path if csv_path.is_file() else None,
                                normative=source.path / NORMATIVE_FILE, weights=weights_path)
    write_model_card(Path(opts.out), bundle.manifest)
    return bundle


# What a recalibration may change in a bundle's preprocessing: the QC gates decide which
# studies are scored, not what the network sees.
RECALIBRATION_PREPROCESSING_KEYS = frozenset({"qc_ranges"})


def recalibration_params(bundle_params: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle's preprocessing with `overrides` merged, which may only touch the QC gates."""
    changed = set(overrides or {}) - RECALIBRATION_PREPROCESSING_KEYS
    if changed:
        raise ConfigError(f"--recalibrate keeps the bundle's preprocessing; --preprocessing may change only "
                          f"{', '.join(sorted(RECALIBRATION_PREPROCESSING_KEYS))}, not {', '.join(sorted(changed))}")
    return merge_params(bundle_params, overrides or {})


def quality_gate(validation_auroc: float, opts: TrainOptions) -> dict[str, Any]:
    """The floor check, as the manifest records it; raises BelowQualityFloor (before
    anything is written to `opts.out`) when the model is below it and not forced."""
    passed = validation_auroc >= opts.min_val_auroc
    gate = {"metric": "validation AUROC, lesion vs healthy, final weighted score", "floor": opts.min_val_auroc,
            "value": round(validation_auroc, 4), "passed": passed, "forced": not passed and opts.force}
    if not passed and not opts.force:
        raise BelowQualityFloor(
            f"bundle refused: validation AUROC {validation_auroc:.3f} is below the floor {opts.min_val_auroc:.3f} "
            f"(--min-val-auroc); nothing was written to {opts.out}. Train longer or on more data, or pass --force "
            "to write it anyway (its model card and manifest will say it was forced)")
    if not passed:
        log.warning("bundle below the quality floor written because --force was given", extra={
            "action": "train_forced", "validation_auroc": round(validation_auroc, 4), "floor": opts.min_val_auroc})
    return gate


PAPER_TERMS = {"fanogan": ("izi_f",), "vae": ("rec", "kl")}


def _paper_score(method: str, val_h: Scored, val_a: Scored, test_h: Scored, test_a: Scored) -> dict[str, Any]:
    """Each paper's own score, for comparison: izi_f (CT paper); alpha * rec + beta * KL
    + gamma * |age gap| with weights by the same grid search (MR paper, Eq. 3)."""
    names = PAPER_TERMS["fanogan" if method == "fanogan" else "vae"]

    def terms(scored: Scored) -> dict[str, np.ndarray]:
        out = {t: scored.terms[t] for t in names}
        gap = scored.age_gap()
        if gap is not None:
            out["age_gap"] = np.abs(gap)
        return out
    weights = select_score_weights(terms(val_h), terms(val_a), names[-1])

    def combined(scored: Scored) -> np.ndarray:
        return np.sum([w * v for t, v in terms(scored).items() for w in [weights.get(t)]], axis=0)
    definition = " + ".join(f"{w:.3g} * {t}" for t, w in weights.terms.items())
    return {"definition": definition, "weights": weights.terms,
            "test_auroc": detection_metrics(combined(test_h), combined(test_a))["auroc"]}


def _init_weights(opts: TrainOptions) -> tuple[dict | None, Bundle | None]:
    """The starting weights of a fine-tune (`--init-from`), checked against this run."""
    if opts.init_from is None:
        return None, None
    bundle = load_bundle(opts.init_from)  # verifies every file's hash, weights.pt included
    path = bundle.path / WEIGHTS_FILE
    if WEIGHTS_FILE not in bundle.manifest.files:
        raise ConfigError(f"--init-from {opts.init_from}: the bundle ships no {WEIGHTS_FILE} to fine-tune from")
    weights = load_weights(path)
    wanted = {"method": opts.method, "preset": opts.preset}
    found = {k: weights.get(k) for k in wanted}
    if found != wanted or bundle.manifest.modality != opts.modality:
        raise ConfigError(f"--init-from {opts.init_from}: bundle is {bundle.manifest.modality} {found}, "
                          f"this run is {opts.modality} {wanted}")
    log.info("fine-tuning from a bundle", extra={"action": "train_init_from", "bundle": bundle.manifest.key})
    return weights["nets"], bundle


def _fit_normative(scorer: OnnxScorer, cohort: Cohort, cal: Scored) -> Normative:
    """Per-voxel healthy error statistics from the training scans; the overlay unit
    (z_limit) from the calibration scans, which the statistics never saw."""
    train = scorer.score(cohort.healthy["train"])
    normative = Normative.fit(train.error_maps, cohort.healthy_masks["train"], NORMATIVE_MARGIN_VOXELS)
    del train
    return normative.with_z_limit(cal.error_maps, cohort.healthy_masks["calibration"])


def _with_masked_terms(scored: Scored, masks: np.ndarray, normative: Normative) -> Scored:
    """The same scores plus headscreen.scores' masked terms; the maps are dropped."""
    masked = batch_terms(scored.error_maps, masks, normative)
    return Scored(terms={**scored.terms, **masked}, age=scored.age, error_maps=np.zeros((0,)),
                  chronological_age=scored.chronological_age)


def _metrics(test_h: Scored, test_a: Scored, val_h: Scored, val_a: Scored, terms: dict[str, float],
             age_gap_weight: float, threshold: float) -> dict[str, Any]:
    score_h, score_a = test_h.combined(terms, age_gap_weight), test_a.combined(terms, age_gap_weight)
    out: dict[str, Any] = {"test": detection_metrics(score_h, score_a, threshold)}
    out["test_per_term_auroc"] = {t: detection_metrics(test_h.terms[t], test_a.terms[t])["auroc"] for t in test_h.terms}
    gap_h, gap_a = test_h.age_gap(), test_a.age_gap()
    if gap_h is not None and gap_a is not None:
        out["test_per_term_auroc"]["age_gap"] = detection_metrics(np.abs(gap_h), np.abs(gap_a))["auroc"]
        out["age_mae_healthy_test"] = age_mae(test_h)
        out["age_mae_anomalous_test"] = age_mae(test_a)
    out["validation"] = detection_metrics(val_h.combined(terms, age_gap_weight), val_a.combined(terms, age_gap_weight))
    return out


def _description(opts: TrainOptions) -> str:
    what = {"fanogan": "3D f-AnoGAN anomaly detection (Simarro Viana et al.)",
            "vae": "3D VAE anomaly detection (Bengs, Behrendt et al., baseline VAE)",
            "vae_ac": "3D VAE-a_c anomaly detection, latent scaled by chronological age (Bengs, Behrendt et al.)",
            "vae_ap": "3D VAE-a_p anomaly detection with multi-task brain-age prediction (Bengs, Behrendt et al.)"}
    data = "domain-randomised synthetic heads" if opts.randomise else "synthetic phantoms"
    return (f"{what[opts.method]} for {'head CT' if opts.modality == 'CT' else 'brain MRI'}, preset {opts.preset}. "
            f"Trained only on {data}; it has never seen a real patient scan.")
