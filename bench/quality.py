"""Quality of the SHIPPED bundles on a held-out synthetic anomaly suite (trains nothing).

Each bundle is run through headscreen.inference.BundleRunner after imaging's preprocessing
with the bundle's own parameters, i.e. exactly what the daemon runs. The suite's case
seeds (model_training.anomalies) are disjoint from the training cohort's: the suite
seed must differ from the seed recorded in the bundle's manifest.

    .venv/bin/python bench/quality.py                 # small default, ~8-10 min on 2 cores
    .venv/bin/python bench/quality.py --cases 10 --report out/quality
    .venv/bin/python bench/quality.py --bundle models/X --cases 4 --normals 12 --record   # into X's card

Targets (issues 4 and 11): hemorrhage >= 5 mL AUROC >= 0.95; QC anomalies AUROC >= 0.99;
age MAE on normal scans <= 4 years; infarct and tumour with oedema are reported per type.
Real scans are judged by bench/real_scans.py.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headscreen.bundle import discover_bundles, load_bundle  # noqa: E402
from headscreen.model_training.anomalies import ANOMALY_TYPES, suite_cases  # noqa: E402
from headscreen.model_training.evaluate import evaluate_records, load_runner, sample_metrics, score_suite, write_report  # noqa: E402
from headscreen.model_training.model_card import auroc_ci  # noqa: E402

QC_TYPES = ("wrong_orientation", "truncated", "failed_registration", "craniectomy")


def _group(records: list, kinds: tuple[str, ...] | None, min_ml: float | None = None) -> dict:
    chosen = [r for r in records if r.label == 0 or (
        (kinds is None or r.kind in kinds) and (min_ml is None or (r.hemorrhage_ml or 0) >= min_ml))]
    return {
        "system": sample_metrics([r.label for r in chosen], [r.system_score for r in chosen], 500, 0),
        "model_only": sample_metrics([r.label for r in chosen if r.model_score is not None],
                                     [r.model_score for r in chosen if r.model_score is not None], 500, 0),
    }


def run(bundle_dir: Path, n: int, n_normal: int, seed: int, threads: int, report: Path | None,
        kinds: tuple[str, ...] | None = None, record: str | None = None) -> None:
    """`record`: the command line, to write the figures into the bundle's manifest and model card."""
    bundle = load_bundle(ROOT / bundle_dir)
    m = bundle.manifest
    training_seed = int(m.training.get("seed", 0)) if isinstance(m.training, dict) else 0
    if seed == training_seed:
        raise SystemExit(f"suite seed {seed} equals the bundle's training seed: not held out")
    if kinds is not None:  # the types this modality has among those asked for
        kinds = tuple(k for k in kinds if m.modality in ANOMALY_TYPES[k].modalities)
    cases = suite_cases(m.modality, n, seed, kinds=kinds, n_normal=n_normal)
    began = time.monotonic()
    records = score_suite(load_runner(bundle, threads), cases, keep_maps=report is not None)
    seconds = time.monotonic() - began
    metrics = evaluate_records(records, n_boot=500, seed=0)
    print(f"\n== {m.key}  ({m.modality}, training seed {training_seed}, suite seed {seed}; "
          f"{len(cases)} scans in {seconds:.0f} s, {seconds / len(cases):.1f} s/scan)")
    print(f"   normals flagged by QC: {metrics['normals_flagged_by_qc']}/{n_normal}; "
          f"threshold {m.calibration.threshold:.4g}")
    print(f"   {'type':22s} {'n':>3s} {'system AUROC [95% CI]':>24s} {'model-only AUROC':>24s} {'QC-caught':>9s}")
    for kind, block in metrics["per_type"].items():
        n_kind = block["system"].get("n_abnormal", 0)
        print(f"   {kind:22s} {n_kind:3d} {auroc_ci(block['system']):>24s} {auroc_ci(block['model_only']):>24s} "
              f"{block['qc_flagged']:>5d}/{n_kind}")
    targets: list[tuple[str, dict, float]] = []
    verdicts: list[dict[str, str]] = []
    hem = [k for k, t in ANOMALY_TYPES.items() if t.group == "hemorrhage"]
    g = _group(records, tuple(hem), 5.0)
    if g["system"].get("n_abnormal"):
        targets.append(("hemorrhage >= 5 mL", g, 0.95))
    targets.append(("QC anomalies", _group(records, QC_TYPES), 0.99))
    for name, block, target in targets:
        value = block["system"].get("auroc", {}).get("value")
        verdict = "n/a" if value is None else ("MET" if value >= target else "MISSED")
        print(f"   target {name:20s} AUROC >= {target}: system {auroc_ci(block['system'])}, "
              f"model-only {auroc_ci(block['model_only'])} -> {verdict}")
        verdicts.append({"name": f"{name} AUROC >= {target}",
                         "text": f"system {auroc_ci(block['system'])}, model-only "
                                 f"{auroc_ci(block['model_only'])}: {verdict}"})
    age = metrics["age"]
    if "age_mae_normal" in age:
        verdict = "MET" if age["age_mae_normal"] <= 4.0 else "MISSED"
        ci = age.get("age_mae_normal_ci95")
        spread = (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
        bias = (f"mean gap {age['age_mean_gap_normal']:+.1f} y"
                + (f", slope {age['age_slope_normal']:.2f}" if "age_slope_normal" in age else ""))
        print(f"   target age MAE normal <= 4 y: {age['age_mae_normal']:.1f} y{spread} (n={age['n_normal']}; "
              f"{bias}); abnormal {age.get('age_mae_abnormal', float('nan')):.1f} y -> {verdict}")
        verdicts.append({"name": "brain-age MAE on healthy heads <= 4 y",
                         "text": f"{age['age_mae_normal']:.1f} y{spread} (n = {age['n_normal']}; {bias}; lesion "
                                 f"heads {age.get('age_mae_abnormal', float('nan')):.1f} y): {verdict}"})
    for kind, v in metrics["voxel"].items():
        if "auprc" in v:
            print(f"   voxel {kind:20s} AUPRC {v['auprc']:.3f}  best Dice {v['best_dice']:.3f}")
    if report is not None:
        write_report(records, metrics, report / m.key, {"bundle": m.key, "threshold": m.calibration.threshold})
    if record is not None:
        from headscreen.model_training.model_card import record_metrics

        per_type = {kind: {"n": block["system"].get("n_abnormal", 0), "system": block["system"],
                           "model_only": block["model_only"], "qc_caught": block["qc_flagged"]}
                    for kind, block in metrics["per_type"].items()}
        path = record_metrics(bundle.path, "synthetic_suite", {
            "command": record, "seed": seed, "n_normal": n_normal,
            "normals_flagged_by_qc": metrics["normals_flagged_by_qc"], "per_type": per_type, "targets": verdicts})
        print(f"   recorded in {path} and its MODEL_CARD.md")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=2, help="scans per anomaly type")
    p.add_argument("--normals", type=int, default=8)
    p.add_argument("--seed", type=int, default=4242, help="suite seed; must differ from the training seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bundle", action="append", type=Path, help="default: every shipped bundle under models/")
    p.add_argument("--report", type=Path, help="also write report folders (PNGs, metrics.json) here")
    p.add_argument("--record", action="store_true",
                   help="write the figures into each bundle's manifest (metrics.synthetic_suite) and model card; "
                   "before release only: a rewritten manifest is a new scoring identity for site references")
    p.add_argument("--kinds", help="comma-separated anomaly types (default: all); 'qc' = the QC target's "
                   "types. A case depends only on (seed, type, index), so a subset scores as in the full suite")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Figures appear as each bundle finishes.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    kinds = None
    if args.kinds:
        kinds = tuple(k for name in args.kinds.split(",") for k in (QC_TYPES if name == "qc" else (name,)))
        unknown = [k for k in kinds if k not in ANOMALY_TYPES]
        if unknown:
            p.error(f"unknown anomaly types {unknown}; known: {sorted(ANOMALY_TYPES)}")
    for bundle in args.bundle or discover_bundles(ROOT / "models"):
        run(bundle, args.cases, args.normals, args.seed, args.threads, args.report, kinds,
            record=shlex.join(["bench/quality.py", *sys.argv[1:]]) if args.record else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
