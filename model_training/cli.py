"""`headscreen train ...` and `headscreen evaluate ...` (wired in by daemon.cli)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headscreen.bundle import load_bundle
from headscreen.errors import HeadscreenError
from headscreen.inference import BundleRunner
from headscreen.model_training.cohort import anomalous_cases, healthy_cases, prepare_case
from headscreen.model_training.fit import (
    DEFAULT_AGE_EXTRA,
    DEFAULT_MIN_VAL_AUROC,
    METHODS,
    BelowQualityFloor,
    TrainOptions,
    fit_bundle,
    recalibrate_bundle,
    refit_age_bundle,
)
from headscreen.model_training.scoring import detection_metrics

log = logging.getLogger(__name__)

# Compact defaults: about 15 minutes on two CPU cores per bundle.
DEFAULT_EPOCHS = {"fanogan": 10, "vae": 12, "vae_ac": 12, "vae_ap": 12}
# Fine-tuning from a bundle: the GAN is kept (its WGAN stage skipped); the encoder,
# the joint refinement or the VAE adapt to the site's scans.
INIT_FROM_EPOCHS = {"fanogan": 0, "vae": 4, "vae_ac": 4, "vae_ap": 4}
# An age-head refit trains only the small head, on features computed once: epochs are cheap.
AGE_REFIT_EPOCHS = 150

EXIT_OK, EXIT_FAILED, EXIT_BELOW_FLOOR = 0, 2, 3
TRAIN_EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}    the bundle was written
  {EXIT_FAILED}    usage error, or training failed (the message says why); no bundle
  {EXIT_BELOW_FLOOR}    refused: the validation AUROC is below --min-val-auroc; no bundle
       (--force writes it, and its model card and manifest say it was forced)
  130  interrupted (Ctrl-C)"""


def _auroc_floor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not an AUROC (0 to 1)")
    return value


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headscreen train", description="Train a model and write its bundle.",
                                epilog=TRAIN_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=("CT", "MR"), required=True)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--preset", choices=("compact", "paper"), default="compact")
    p.add_argument("--out", type=Path, required=True, help="bundle folder, models/<name>-<version>")
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--n-calibration", type=int, default=24)
    p.add_argument("--n-test", type=int, default=24)
    p.add_argument("--n-anomalous", type=int, default=24, help="lesion cases, half validation, half test")
    p.add_argument("--epochs", type=int, help="VAE epochs, or f-AnoGAN WGAN-GP epochs")
    p.add_argument("--encoder-epochs", type=int, default=6, help="f-AnoGAN stage 2")
    p.add_argument("--finetune-epochs", type=int, default=12, help="f-AnoGAN stage 3")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--kappa", type=float, default=1.0, help="f-AnoGAN feature-loss weight")
    p.add_argument("--beta", type=float, default=1.0,
                   help="VAE KL weight; the KL is averaged over latent dimensions and the L1 over voxels")
    p.add_argument("--denoise", type=float, default=0.0, metavar="SIGMA",
                   help="train the VAE to remove coarse noise of this SD (model input range [-1, 1]) "
                        "added inside the brain; 0: clean inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("cache"), help="preprocessed cohort cache and run folders")
    p.add_argument("--work-dir", type=Path, help="checkpoints and metrics (default <cache>/runs/<out name>)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch threads, and processes building the cohort")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is drawn only when stderr is a terminal; the log has one line per epoch)")
    p.add_argument("--min-val-auroc", type=_auroc_floor, default=DEFAULT_MIN_VAL_AUROC, metavar="AUROC",
                   help="refuse to write a bundle whose validation AUROC (lesion vs healthy) is below this "
                        f"(default {DEFAULT_MIN_VAL_AUROC})")
    p.add_argument("--force", action="store_true",
                   help="write the bundle even below --min-val-auroc; its model card and manifest say so")
    p.add_argument("--no-flip", action="store_true", help="no left-right flip augmentation")
    p.add_argument("--recalibrate", action="store_true",
                   help="with --init-from: keep its network and normative model, train nothing; search the score "
                        "weights again over today's terms and recalibrate the thresholds on the same cohort "
                        "(give the bundle's own --seed and split counts)")
    p.add_argument("--refit-age", action="store_true",
                   help="with --init-from (vae_ap): train its brain-age head again, the rest of the network "
                        "frozen, on the cohort's train split plus --age-extra more healthy heads, then "
                        f"recalibrate as --recalibrate does (give the bundle's own --seed and split counts; "
                        f"--epochs: head epochs, default {AGE_REFIT_EPOCHS}); with --dataset (a site's normal "
                        "studies with ages) only the predicted age's offset is corrected, by the median gap of its "
                        "train rows, and judged on its val rows. Refused unless better on the validation split "
                        "(and, with --dataset, unless the offset's 95 %% interval excludes 0)")
    p.add_argument("--age-extra", type=int, metavar="N",
                   help=f"--refit-age: extra healthy synthetic heads (default {DEFAULT_AGE_EXTRA}; "
                        "not with --dataset)")
    p.add_argument("--age-seed", type=int, metavar="SEED",
                   help="--refit-age: seed of the extra heads (default --seed + 7; must differ from --seed)")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="what changed and why, in words; recorded in the manifest and the model card (repeatable)")
    p.add_argument("--init-from", type=Path, metavar="BUNDLE",
                   help="fine-tune from a bundle's weights.pt (same method and preset; its preprocessing is kept)")
    p.add_argument("--no-randomise", action="store_true",
                   help="train on the plain template phantoms instead of domain-randomised heads")
    p.add_argument("--preprocessing", type=Path,
                   help="JSON file of preprocessing parameters merged over imaging's defaults")
    p.add_argument("--dataset", type=Path,
                   help="CSV (path,age,sex,scanner,split[,label]) of NIfTI files or DICOM series folders, "
                        "e.g. the admin console's training manifest, instead of the synthetic cohort")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    if args.refit_age and args.recalibrate:
        parser.error("--refit-age recalibrates too: give one of --refit-age and --recalibrate")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    opts = TrainOptions(
        modality=args.modality, method=args.method, preset=args.preset, out=args.out, n_train=args.n_train,
        epochs=(args.epochs if args.epochs is not None else AGE_REFIT_EPOCHS if args.refit_age else
                (INIT_FROM_EPOCHS if args.init_from else DEFAULT_EPOCHS)[args.method]),
        encoder_epochs=args.encoder_epochs,
        finetune_epochs=args.finetune_epochs, batch_size=args.batch_size, cache=args.cache, device=args.device,
        resume=args.resume, seed=args.seed,
        # A resume restores weights, optimiser and RNG state exactly, so the same
        # command without --resume reproduces the bundle from scratch.
        command="headscreen train " + shlex.join(a for a in argv_list if a != "--resume"),
        work_dir=args.work_dir, n_val=args.n_val, n_calibration=args.n_calibration, n_test=args.n_test,
        n_anomalous=args.n_anomalous, kappa=args.kappa, beta=args.beta, denoise=args.denoise, threads=args.threads,
        progress=not args.no_progress,
        flip_lr=not args.no_flip,
        randomise=not args.no_randomise,
        preprocessing_overrides=json.loads(args.preprocessing.read_text()) if args.preprocessing else None,
        dataset=args.dataset,
        init_from=args.init_from,
        min_val_auroc=args.min_val_auroc,
        force=args.force,
        notes=tuple(args.note),
        age_extra=args.age_extra,
        age_seed=args.age_seed,
    )
    try:
        build = refit_age_bundle if args.refit_age else recalibrate_bundle if args.recalibrate else fit_bundle
        bundle = build(opts)
    except BelowQualityFloor as exc:
        log.error("%s", exc, extra={"action": "train_refused", "exit_code": EXIT_BELOW_FLOOR})
        return EXIT_BELOW_FLOOR
    except HeadscreenError as exc:
        log.error("training failed: %s", exc, extra={"action": "train_failed"})
        return EXIT_FAILED
    m = bundle.manifest
    log.info("bundle ready", extra={"action": "train_done", "bundle": m.key, "sha256": bundle.sha256,
                                    "validation_auroc": m.metrics.get("validation", {}).get("auroc"),
                                    "test_auroc": m.metrics.get("test", {}).get("auroc"),
                                    "forced": m.training.get("quality_gate", {}).get("forced", False)})
    return EXIT_OK


def _anomaly_kinds(text: str) -> tuple[str, ...]:
    """--kinds: known anomaly types only (a usage error, not a traceback, names the rest)."""
    from headscreen.model_training.anomalies import ANOMALY_TYPES

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ANOMALY_TYPES]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown anomaly type(s) {', '.join(unknown) or repr(text)}; "
                                         f"known: {', '.join(sorted(ANOMALY_TYPES))}")
    return kinds


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headscreen evaluate",
                                description="Score a bundle on a fresh labelled synthetic set (AUROC, age MAE).")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--n", type=int, default=20, help="healthy cases and lesion cases each")
    p.add_argument("--seed", type=int, default=1000, help="differs from training seeds by default")
    p.add_argument("--cache", type=Path, default=Path("cache"))
    p.add_argument("--json-out", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", type=Path, help="report folder: metrics.json, records.json, ROC/histogram/age PNGs; "
                   "evaluates on the synthetic anomaly suite (or --dataset) with bootstrap CIs")
    p.add_argument("--dataset", type=Path, help="labelled CSV (model_training.dataset) instead of the suite")
    p.add_argument("--n-per-type", type=int, default=3, help="suite scans per anomaly type")
    p.add_argument("--normals", type=int, default=12, help="suite normal scans")
    p.add_argument("--kinds", type=_anomaly_kinds, help="comma-separated anomaly types (default: all for the modality)")
    p.add_argument("--spacing", type=float, default=1.0, help="suite native voxel size in mm")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% CIs")
    return p


def evaluate_report(args: argparse.Namespace) -> dict:
    """The full evaluation (model_training.evaluate) with a report folder."""
    from headscreen.model_training import evaluate as ev
    from headscreen.model_training.anomalies import suite_cases
    from headscreen.model_training.dataset import load_volume, read_dataset

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    runner = ev.load_runner(bundle, args.threads)
    if args.dataset is not None:
        records = []
        for i, row in enumerate(read_dataset(args.dataset)):
            try:
                volume = load_volume(row, m.modality)
            except HeadscreenError as exc:
                records.append(ev.Record(f"row{i + 2}", row.kind, int(not row.is_normal), None, [], rejected=str(exc),
                                         true_age=row.age))
                continue
            records.append(ev.score_volume(runner, volume, f"row{i + 2}", row.kind, int(not row.is_normal), row.age))
        source = f"dataset {args.dataset}"
    else:
        cases = suite_cases(m.modality, args.n_per_type, args.seed, args.kinds, args.normals, args.spacing)
        records = ev.score_suite(runner, cases)
        source = f"synthetic anomaly suite, seed {args.seed}"
    metrics = ev.evaluate_records(records, n_boot=args.bootstrap, seed=0)
    meta = {"bundle": m.key, "sha256": bundle.sha256, "source": source, "threshold": m.calibration.threshold}
    ev.write_report(records, metrics, args.report, meta)
    return {**meta, **metrics}


def evaluate_bundle(bundle_dir: Path, n: int, seed: int, cache: Path | None, threads: int = 2) -> dict:
    """The daemon's scoring (headscreen.inference.BundleRunner) applied to fresh labelled phantoms."""
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    runner = BundleRunner(bundle, intra_op_threads=threads)
    scores: dict[str, list[float]] = {}
    age_errors: dict[str, list[float]] = {}
    randomise = bool(m.training.get("randomised"))  # held-out cases like the ones it was trained on
    for label, cases in (("healthy", healthy_cases(m.modality, n, seed, randomise)),
                         ("lesion", anomalous_cases(m.modality, n, seed, randomise))):
        for case in cases:
            prepared = prepare_case(case, m.preprocessing, cache)
            result = runner.run(prepared.image, case.age if m.age.supported else None, brain_mask=prepared.brain_mask)
            scores.setdefault(label, []).append(result.anomaly_score)
            if result.age_gap is not None:
                age_errors.setdefault(label, []).append(abs(result.age_gap))
    summary: dict[str, Any] = {
        "bundle": m.key, "sha256": bundle.sha256, "seed": seed,
        **detection_metrics(np.array(scores["healthy"]), np.array(scores["lesion"]), m.calibration.threshold)}
    if m.age.supported:
        summary["age_mae_healthy"] = float(np.mean(age_errors["healthy"])) if age_errors.get("healthy") else None
        summary["age_mae_lesion"] = float(np.mean(age_errors["lesion"])) if age_errors.get("lesion") else None
    return summary


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    args = evaluate_parser().parse_args(argv)
    try:
        if args.report is not None:
            result = evaluate_report(args)
        else:
            result = evaluate_bundle(args.bundle, args.n, args.seed, args.cache, args.threads)
    except HeadscreenError as exc:
        log.error("evaluation failed: %s", exc, extra={"action": "evaluate_failed"})
        return 2
    text = json.dumps(result, indent=2, default=str)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    sys.stdout.write(text + "\n")  # the command's output, not a log line
    log.info("evaluated", extra={"action": "evaluate_done", "bundle": result.get("bundle"),
                                 "report": str(args.report) if args.report else None})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
