"""MODEL_CARD.md for a bundle, written from its manifest (so the two cannot disagree)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.bundle import Manifest


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "n/a" if value is None else str(value)


def render_model_card(m: Manifest) -> str:
    t, metrics, cal = m.training, m.metrics, m.calibration
    test = metrics.get("test", {})
    lines = [
        f"# Model card: {m.name} {m.version}",
        "",
        f"{m.description}",
        "",
        "## What it was trained on",
        "",
        "**Synthetic phantoms only. This model has never seen a real patient scan.** Every training,",
        "validation, calibration and test volume is a synthetic head made by `imaging.phantoms.make_head`",
        "from the ICBM152 2009 template (nilearn: brain mask, GM and WM maps) and the Colin27 whole-head",
        "template (mricron-data), aged by widening CSF spaces (each head's atrophy follows its age plus",
        "a per-subject brain-age gap, SD 2.5 years), placed with small random poses and head",
        "sizes, with noise; then put through the daemon's own preprocessing (`imaging.preprocess` with",
        "the parameters recorded under `preprocessing` in `manifest.json`).",
        f"Healthy ages are uniform in 20-85 years and split stratified by age. n_train = {t.get('n_train')},",
        f"healthy cases left out by the preprocessing QC: {metrics.get('qc_excluded', 'n/a')}.",
        f"Anomalies for validation and test: synthetic lesions ({', '.join(metrics.get('anomaly_kinds', []))}), 3-40 mL, log-uniform.",
        "",
        "## Reproduce",
        "",
        "```",
        f"{t.get('command')}",
        "```",
        "",
        f"Preset `{t.get('preset')}`, seed {t.get('seed')}, epochs {t.get('epochs')}, {t.get('steps')} optimiser steps,",
        f"{t.get('duration_s')} s in total on {t.get('device')} (torch {t.get('torch')}), {t.get('date')}"
        + (" (the last, resumed segment of the run only)." if t.get("resumed") else "."),
        "",
        "## Scoring",
        "",
        f"{m.score.definition}",
        "",
        f"Calibration on {cal.n} held-out healthy synthetic cases: threshold {cal.threshold:.6g} at",
        f"{cal.specificity:.0%} specificity; error-map colour scale (healthy voxel-error 99th percentile",
        f"inside the brain) {cal.error_map_scale:.4g}. ONNX vs PyTorch max |diff| {m.parity.get('max_abs_diff', float('nan')):.2e}.",
        "",
        "## Measured (held-out synthetic test set)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| AUROC, lesion vs healthy | {_fmt(test.get('auroc'))} |",
        f"| AUPRC | {_fmt(test.get('auprc'))} |",
        f"| sensitivity at threshold | {_fmt(test.get('sensitivity_at_threshold'))} |",
        f"| specificity at threshold | {_fmt(test.get('specificity_at_threshold'))} |",
        f"| n healthy / n lesion | {_fmt(test.get('n_healthy'))} / {_fmt(test.get('n_anomalous'))} |",
    ]
    for term, auroc in metrics.get("test_per_term_auroc", {}).items():
        lines.append(f"| AUROC of `{term}` alone | {_fmt(auroc)} |")
    if m.age.supported:
        lines += [
            f"| brain-age MAE, healthy test (years) | {_fmt(metrics.get('age_mae_healthy_test'))} |",
            f"| brain-age MAE, lesion test (years) | {_fmt(metrics.get('age_mae_anomalous_test'))} |",
            f"| brain-age MAE, healthy validation (years) | {_fmt(m.age.validation_mae)} |",
        ]
    lines += [
        "",
        "These numbers measure how well the model separates synthetic lesions from synthetic healthy",
        "heads. They say nothing about performance on real patients.",
        "",
        "## Intended use",
        "",
        "Exercising and demonstrating the headscreen pipeline end to end (ingest, preprocessing, ONNX",
        "inference, calibration, DICOM SC overlays and SR) and serving as a reproducible baseline to",
        "retrain on real, locally curated healthy scans. Results are marked as derived and not for",
        "primary diagnosis.",
        "",
        "## Limitations",
        "",
        "- Not validated on any real scan; do not use for clinical decisions.",
        "- The compact preset is far smaller and trained far shorter than the papers' models; the",
        "  reconstructions are blurry and the scores reflect coarse deviations (intensity, shape, pose).",
        "- Phantom anatomy varies only by age-related atrophy, pose, size and noise; real anatomical",
        "  variability, scanner differences and artefacts are absent from the training data.",
        "- Lesions are idealised blobs of a single intensity; real findings are far more varied.",
    ]
    if m.age.supported:
        lines.append("- Brain age is learned from the phantoms' synthetic atrophy model, not from real ageing.")
    return "\n".join(lines) + "\n"


def write_model_card(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / "MODEL_CARD.md"
    path.write_text(render_model_card(manifest))
    return path
