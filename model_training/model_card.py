"""MODEL_CARD.md for a bundle, written from its manifest (so the two cannot disagree)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from headscreen.bundle import MANIFEST_NAME, Manifest, load_bundle
from headscreen.export.seg import DEFAULT_THRESHOLD, MIN_CLUSTER_ML, SEG_HEALTHY_BUDGET_ML, SEG_HEALTHY_QUANTILE
from headscreen.scores import uses_asymmetry


def _fmt(value: Any, decimals: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return "n/a" if value is None else str(value)


def _sig(value: Any) -> str:
    """Four significant digits: scores near the threshold differ in the third."""
    return f"{value:.4g}" if isinstance(value, float) else _fmt(value)


def render_model_card(m: Manifest) -> str:
    t, metrics, cal = m.training, m.metrics, m.calibration
    one_sided = uses_asymmetry(m.score.terms)
    test = metrics.get("test", {})
    lines = [
        f"# Model card: {m.name} {m.version}",
        "",
        f"{m.description}",
        "",
        *_forced_warning(t.get("quality_gate")),
        "## What it was trained on",
        "",
        *_training_data(t),
        f"Healthy ages are uniform in 20-85 years and split stratified by age. n_train = {t.get('n_train')},",
        f"healthy cases left out by the preprocessing QC: {metrics.get('qc_excluded', 'n/a')}.",
        f"Anomalies for validation and test: synthetic lesions ({', '.join(metrics.get('anomaly_kinds', []))}), "
        "3-40 mL, log-uniform.",
        "",
        "## Reproduce",
        "",
        "```",
        f"{t.get('command')}",
        "```",
        "",
        f"Preset `{t.get('preset')}`, seed {t.get('seed')}, epochs {t.get('epochs')}, "
        f"{t.get('steps')} optimiser steps,",
        f"{t.get('duration_s')} s in total on {t.get('device')} (torch {t.get('torch')}), {t.get('date')}"
        + (" (the last, resumed segment of the run only)." if t.get("resumed") else "."),
        *(f"- {note}" for note in t.get("notes", [])),
        *_recalibrated(t.get("recalibrated")),
        *_age_refit(t.get("age_refit")),
        "",
        "## Scoring",
        "",
        f"{m.score.definition}",
        "",
        f"Calibration on {cal.n} held-out healthy {_calibration_source(t)}: threshold {cal.threshold:.6g} at",
        f"{cal.specificity:.0%} specificity. "
        f"ONNX vs PyTorch max |diff| {m.parity.get('max_abs_diff', float('nan')):.2e}.",
        (f"Overlay and SEG: the one-sided positive z-map inside the scored brain (z lowered by its mirror image's z "
         f"where that is positive too, as the score is), in units of the healthy 99.9th percentile of z "
         f"(`{m.normative.file}`)." if m.normative and one_sided else
         f"Overlay and SEG: the positive z-map inside the scored brain, in units of the healthy 99.9th percentile "
         f"of z (`{m.normative.file}`)." if m.normative else
         f"Overlay and SEG: the raw error in units of the healthy voxel-error 99th percentile inside the brain "
         f"({cal.error_map_scale:.4g})."),
        (f"SEG threshold {cal.seg_threshold:g} (overlay units): the lowest at which {SEG_HEALTHY_QUANTILE:.0%} of the "
         f"healthy calibration cases mark at most {SEG_HEALTHY_BUDGET_ML:g} mL (regions under {MIN_CLUSTER_ML:g} mL "
         f"left out)" + (f"; each region grows from its voxels at the threshold through connected voxels at "
                         f"{cal.seg_grow:g} x it ({cal.seg_grow * cal.seg_threshold:g}), and the threshold was "
                         f"calibrated so. A screen-positive result also keeps the region at that level where the "
                         f"map's focal term peaks (export.seg.anomaly_mask)." if cal.seg_grow and cal.seg_grow < 1
                         else ".")
         if cal.seg_threshold else
         f"SEG threshold {DEFAULT_THRESHOLD:g} (overlay units; not calibrated for this bundle; regions under "
         f"{MIN_CLUSTER_ML:g} mL left out)."),
        "",
        "A site re-estimates the reference and threshold from its own healthy studies with",
        "`headscreen calibrate` (README, \"Site calibration\"); until then these synthetic figures apply.",
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
        *_gate_row(metrics.get("validation", {}), t.get("quality_gate")),
    ]
    for term, auroc in metrics.get("test_per_term_auroc", {}).items():
        lines.append(f"| AUROC of `{term}` alone | {_fmt(auroc)} |")
    if m.age.supported:
        lines += [
            f"| brain-age MAE, healthy test (years) | {_fmt(metrics.get('age_mae_healthy_test'))} |",
            f"| brain-age MAE, lesion test (years) | {_fmt(metrics.get('age_mae_anomalous_test'))} |",
            f"| brain-age MAE, healthy validation (years) | {_fmt(m.age.validation_mae)} |",
        ]
        if "age_mae_healthy_calibration" in metrics:
            lines.append("| brain-age MAE, healthy calibration (years) | "
                         f"{_fmt(metrics['age_mae_healthy_calibration'])} |")
    paper = metrics.get("paper_score")
    if paper:
        lines.append(f"| AUROC of the paper's own score ({paper.get('definition')}) "
                     f"| {_fmt(paper.get('test_auroc'))} |")
    lines += [
        "",
        "These numbers measure how well the model separates synthetic lesions from synthetic healthy",
        "heads. They say nothing about performance on real patients; the real-scan section does, as far",
        "as one real scan can.",
        *_synthetic_suite(metrics.get("synthetic_suite")),
        *_real_scans(metrics.get("real_scans")),
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
        "- Not validated on a real population (one real T1 and no real head CT volume are reachable",
        "  where it was trained); do not use for clinical decisions.",
        "- The compact preset is far smaller and trained far shorter than the papers' models; the",
        "  reconstructions are blurry and the scores reflect coarse deviations (intensity, shape, pose).",
        "- Synthetic anatomy comes from one template's label maps, deformed: real anatomical variability,",
        "  real scanners and real artefacts are only approximated by the randomisation ranges.",
        "- Lesions are idealised blobs of a single intensity; real findings are far more varied.",
    ]
    if one_sided:
        lines.append("- The score weighs left-right asymmetry: a finding alike on both sides (bilateral subdurals, "
                     "symmetric oedema or atrophy) fades in the score, the overlay and the SEG.")
    if m.age.supported:
        lines.append("- Brain age is learned from the phantoms' synthetic atrophy model, not from real ageing.")
    return "\n".join(lines) + "\n"


def _recalibrated(record: dict[str, Any] | None) -> list[str]:
    if not record:
        return []
    source = record.get("from", {})
    return [f"- Recalibrated {record.get('date')} from {source.get('bundle')} ({record.get('duration_s')} s): "
            f"{record.get('what')}.", f"  `{record.get('command')}`",
            *(f"- {note}" for note in record.get("notes", []))]


def _calibration_source(training: dict[str, Any]) -> str:
    """What the calibration split was drawn from: the latest rebuild that calibrated, else the training's."""
    rebuilds = sorted((r for r in (training.get("recalibrated"), training.get("age_refit")) if r and
                       r.get("calibrated_on")), key=lambda r: str(r.get("date")))
    data = rebuilds[-1]["calibrated_on"] if rebuilds else training.get("data") or ""
    return f"cases of the {data}" if data.startswith("dataset CSV") else "synthetic cases"


def _age_refit(record: dict[str, Any] | None) -> list[str]:
    if not record:
        return []
    gate = record.get("gate") or {}
    forced = " (REFUSED by its gate: written only because --force was given)" if gate.get("forced") else ""
    head = f"({record.get('duration_s')} s): {record.get('what')}."
    held_out = " (held out from its train rows: the CSV had none)" if record.get("val_held_out_from_train") else ""
    if record.get("mode") == "site_offset":
        before, after = record.get("before", {}), record.get("after", {})
        rows = [f"  - {split}: n = {before[split]['n']}, MAE {before[split]['mae']:.1f} -> "
                f"{after[split]['mae']:.1f} years, mean gap {before[split]['mean_gap']:+.1f} -> "
                f"{after[split]['mean_gap']:+.1f}" for split in before]
        return [f"- Brain age corrected for a site {record.get('date')} from {record.get('from', {}).get('bundle')} "
                f"{head} Offset {record.get('offset_years'):+.2f} years (95 % bootstrap interval "
                f"{', '.join('n/a' if v is None else f'{v:+.2f}' for v in record.get('offset_ci95', []))}), "
                f"the median gap of {record.get('n_train')} healthy training heads of the {record.get('data')}; "
                f"judged on its {record.get('n_val')} validation heads"
                f"{held_out}{forced}. Anomaly outputs differ from the source graph's by at most "
                f"{record.get('anomaly_outputs_max_abs_diff'):.3g}. Its healthy heads, before and after:", *rows,
                f"  `{record.get('command')}`", *(f"- {note}" for note in record.get("notes", []))]
    extra = record.get("extra", {})
    return [f"- Brain-age head refit {record.get('date')} from {record.get('from', {}).get('bundle')} "
            f"{head} Trained on {record.get('n_heads')} healthy heads "
            f"(the cohort's {record.get('n_cohort_train')} training heads and {extra.get('n')} more, seed "
            f"{extra.get('seed')}{', each also mirrored' if record.get('flip_lr') else ''}), epoch "
            f"{record.get('best_epoch')} of {record.get('epochs')} kept for its MAE on "
            f"{record.get('n_val', 'the')} healthy validation heads: "
            f"{_fmt(record.get('val_mae_before'))} years before, {_fmt(record.get('val_mae'))} after{forced}. Anomaly "
            f"outputs differ from the source graph's by at most {record.get('anomaly_outputs_max_abs_diff'):.3g}; "
            f"score {'unchanged' if record.get('score_unchanged') else 'searched again and changed'}.",
            f"  `{record.get('command')}`", *(f"- {note}" for note in record.get("notes", []))]


def _forced_warning(gate: dict[str, Any] | None) -> list[str]:
    if not gate or not gate.get("forced"):
        return []
    return [f"**Forced: its validation AUROC {_fmt(gate.get('value'))} is below the quality floor "
            f"{_fmt(gate.get('floor'))}. `headscreen train` refused it and it was written only because "
            "`--force` was given. Do not serve it without checking why.**", ""]


def _gate_row(validation: dict[str, Any], gate: dict[str, Any] | None) -> list[str]:
    if not gate:
        return [f"| validation AUROC | {_fmt(validation.get('auroc'))} |"]
    verdict = "passed" if gate.get("passed") else ("**below, forced**" if gate.get("forced") else "below")
    return [f"| validation AUROC (quality floor {_fmt(gate.get('floor'))}: {verdict}) | {_fmt(gate.get('value'))} |"]


def _training_data(t: dict[str, Any]) -> list[str]:
    if t.get("randomised"):
        return [
            "**Synthetic heads only. This model has never seen a real patient scan.** Every training,",
            "validation, calibration and test volume is a domain-randomised synthetic head",
            "(`imaging.phantoms.make_head(..., randomise=True)`, after SynthSeg and SynthBA): label maps",
            "from the ICBM152 2009 template (nilearn: brain mask, GM and WM maps) and the Colin27",
            "whole-head outline (mricron-data), each head with its own smooth non-linear deformation,",
            "head shape, skull thickness, tissue intensities drawn from physical ranges, resolution,",
            "slice thickness, bias field and noise texture (ranges and sources in `imaging/synthesis.py`),",
            "aged by widening CSF spaces (atrophy follows age plus a per-subject brain-age gap, SD 2.5",
            "years), posed, then put through the daemon's own preprocessing (`imaging.preprocess` with",
            "the parameters under `preprocessing` in `manifest.json`). The real T1 used below was never a source.",
        ]
    return [
        "**Synthetic phantoms only. This model has never seen a real patient scan.** Every training,",
        "validation, calibration and test volume is a synthetic head made by `imaging.phantoms.make_head`",
        "from the ICBM152 2009 template (nilearn: brain mask, GM and WM maps) and the Colin27 whole-head",
        "template (mricron-data), aged by widening CSF spaces (each head's atrophy follows its age plus",
        "a per-subject brain-age gap, SD 2.5 years), placed with small random poses and head",
        "sizes, with noise; then put through the daemon's own preprocessing (`imaging.preprocess` with",
        "the parameters recorded under `preprocessing` in `manifest.json`).",
    ]


def _synthetic_suite(suite: dict[str, Any] | None) -> list[str]:
    """The held-out anomaly suite (bench/quality.py) as recorded under metrics.synthetic_suite."""
    if not suite:
        return ["", "## Measured on the synthetic anomaly suite", "",
                "Not recorded for this bundle (`bench/quality.py --record`)."]
    lines = ["", "## Measured on the synthetic anomaly suite (`bench/quality.py`)", "",
             f"`{suite.get('command', '')}`: suite seed {suite.get('seed')}, disjoint from the training seed; "
             f"{suite.get('n_normal')} healthy heads ({suite.get('normals_flagged_by_qc')} refused by QC) against "
             f"each type. System = the daemon's verdict (a QC refusal counts as flagged); model-only = the score "
             f"alone. Synthetic scans only: evidence about synthetic heads, not about patients.", "",
             "| type | n | system AUROC [95% CI] | model-only AUROC | refused by QC |", "|---|---|---|---|---|"]
    for kind, row in suite.get("per_type", {}).items():
        lines.append(f"| {kind} | {row.get('n')} | {auroc_ci(row.get('system'))} | "
                     f"{auroc_ci(row.get('model_only'))} | {row.get('qc_caught')}/{row.get('n')} |")
    lines.append("")
    for target in suite.get("targets", []):
        lines.append(f"- Target {target.get('name')}: {target.get('text')}")
    return lines


def auroc_ci(block: dict[str, Any] | None) -> str:
    """An AUROC block of model_training.evaluate.sample_metrics as 'value [low, high]'."""
    auroc = (block or {}).get("auroc")
    if not auroc:
        return "n/a"
    low, high = auroc["ci95"]
    return f"{auroc['value']:.3f} [{low:.2f}, {high:.2f}]"


def record_metrics(bundle_dir: Path, key: str, value: dict[str, Any]) -> Path:
    """Put `value` under the manifest's metrics[key] and rewrite the model card from it.
    The files the manifest lists keep their hashes, so network, normative model and
    calibration stay those the bundle was made with; but the manifest's own sha256 is the
    scoring identity that site references and bundle roles are tied to: record before a
    bundle is deployed."""
    path = Path(bundle_dir) / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw.setdefault("metrics", {})[key] = value
    path.write_text(json.dumps(raw, indent=2) + "\n")
    write_model_card(bundle_dir, load_bundle(bundle_dir).manifest)
    return path


def _real_scans(real: dict[str, Any] | None) -> list[str]:
    """The real-scan protocol (bench/real_scans.py) as recorded under metrics.real_scans."""
    if not real:
        return ["", "## Measured on real scans", "",
                "Not measured for this bundle (`bench/real_scans.py --record`). No real head CT volume is",
                "reachable where the shipped bundles were made, so CT bundles have no real-scan figures."]
    lines = ["", "## Measured on real scans (`bench/real_scans.py`)", "", real.get("source", ""), "",
             "| case | score | threshold | percentile | positive | predicted age | SEG mL | Dice |",
             "|---|---|---|---|---|---|---|---|"]
    for row in real.get("rows", []):
        if not row.get("eligible", True):
            lines.append(f"| {row.get('case')} | not eligible: {row.get('reason')} | | | | | | |")
            continue
        score, threshold = row.get("score"), row.get("threshold")
        lines.append(f"| {row.get('case')} | {_sig(score)} | {_sig(threshold)} | {_fmt(row.get('percentile'), 1)} | "
                     f"{'yes' if row.get('positive') else 'no'} | {_fmt(row.get('predicted_age'), 1)} | "
                     f"{_fmt(row.get('seg_ml'), 1)} | {_fmt(row.get('dice'), 2)} |")
    if real.get("summary"):
        lines += ["", real["summary"]]
    return lines


def write_model_card(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / "MODEL_CARD.md"
    path.write_text(render_model_card(manifest))
    return path
