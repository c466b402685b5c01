"""Benchmark: model bundles judged on the one real head reachable offline (the real-scan protocol).

    .venv/bin/python bench/real_scans.py [--bundle DIR ...] [--json PATH] [--age 40]

The shipped models were trained on phantoms only; this asks what they do with a real
head. The real whole-head T1 of Debian's insighttoolkit5-examples (imaging/realscans.py)
goes the daemon's way: written as an axial DICOM series, read back with `load_series`,
preprocessed as the bundle's manifest says, QC-gated (a blocking reason: "not eligible",
never scored), inferred with the case's own brain mask, and the brain-masked error map
taken back to the native slices and thresholded as the SEG is (export/seg.py).

1. Healthy: as acquired and in four other poses (10-20 degree rotations about different
   axes plus shifts). Targets per pose: below the threshold, predicted brain age 20-90
   years, native SEG volume at most 5 mL.
2. Lesions painted into the as-acquired scan (`realscans.insert_lesion`, inside its
   reference brain mask, at T1 levels from the scan's own tissue means): parenchymal
   hemorrhage 5 / 15 / 40 mL, subdural 35 mL, infarct 25 mL, tumour 20 mL + oedema.
   Targets per lesion: screen positive, score above every healthy pose's, Dice of the
   native SEG with the inserted mask (tumour: core and oedema) at least 0.3.
3. How many targets each bundle meets.
4. For bundles with a normative model, how the network itself sees each lesion: inside
   it, on the model grid, the mean error against the healthy voxel mean +- SD there and
   the mean z (what bounds every score term and the SEG); and, at best, the score, verdict
   and SEG Dice of a network that copied none of the lesion (`_healed`): which targets
   better healing could reach, and which need less healthy error.

Only MR bundles are judged: no real head CT volume is reachable offline (pydicom's real
CT is single slices). The T1's age is unknown; an assumed age (default 40) is passed and
printed. Every number is from one deterministic run (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from headscreen.bundle import Bundle, load_bundle
from headscreen.daemon.config import shipped_bundles
from headscreen.errors import InputRejected
from headscreen.export.seg import MIN_CLUSTER_ML, anomaly_mask
from headscreen.imaging import qc, realscans
from headscreen.imaging.phantoms import Pose, write_dicom_series
from headscreen.imaging.preprocess import Preprocessed, native_focus, preprocess, to_native_map
from headscreen.imaging.skullstrip import dice
from headscreen.imaging.volume import Volume, load_series
from headscreen.inference import BundleRunner, Inference
from headscreen.scores import evaluation_mask, masked_terms, uses_asymmetry, z_map

# No age in the ITK example data (no header fields, no documentation of the subject).
ASSUMED_AGE_YEARS = 40.0
HEALTHY_POSES: dict[str, Pose] = {
    "as acquired": Pose(),
    "pitch 15, shift": Pose((15.0, 0.0, 0.0), (0.0, 10.0, -10.0)),
    "roll 12, shift": Pose((0.0, 12.0, 0.0), (-10.0, 0.0, 10.0)),
    "yaw -18, shift": Pose((0.0, 0.0, -18.0), (15.0, -10.0, 0.0)),
    "oblique 10/-10/15, shift": Pose((10.0, -10.0, 15.0), (-20.0, 15.0, 10.0)),
}


@dataclass(frozen=True)
class LesionCase:
    name: str
    kind: str
    volume_ml: float
    seed: int


LESIONS = (
    LesionCase("hemorrhage 5 mL", "hemorrhage", 5.0, 11),
    LesionCase("hemorrhage 15 mL", "hemorrhage", 15.0, 12),
    LesionCase("hemorrhage 40 mL", "hemorrhage", 40.0, 13),
    LesionCase("subdural 35 mL", "subdural", 35.0, 14),
    LesionCase("infarct 25 mL", "infarct", 25.0, 15),
    LesionCase("tumour 20 mL + oedema", "tumour", 20.0, 16),
)
# Targets.
AGE_RANGE_YEARS = (20.0, 90.0)
HEALTHY_MAX_SEG_ML = 5.0
MIN_DICE = 0.3
# The series as a scanner writes a 2D T1: axial, 128 x 128, 2 mm apart (as tests/test_real_scans.py).
SERIES_ROWS = 128
SERIES_SLICE_MM = 2.0
NO_CT_NOTE = "CT bundles are not judged: no real head CT volume is reachable offline (only single real CT slices)"


@dataclass
class Case:
    name: str
    group: str                      # "healthy" or "lesion"
    volume: Volume
    lesion: np.ndarray | None       # bool on the volume's grid (tumour: core and oedema)
    inserted_ml: float | None = None
    oedema_ml: float | None = None


@dataclass
class Row:
    case: str
    group: str
    eligible: bool
    reason: str | None = None
    score: float | None = None
    threshold: float | None = None
    positive: bool | None = None
    percentile: float | None = None
    terms: dict[str, float] = field(default_factory=dict)
    predicted_age: float | None = None
    notes: list[str] = field(default_factory=list)
    seg_ml: float | None = None
    inserted_ml: float | None = None
    oedema_ml: float | None = None
    dice: float | None = None
    above_healthy: bool | None = None
    # How the network sees the inserted lesion on the model grid (`_lesion_seen`).
    lesion_seen: dict[str, float] | None = None
    targets: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", type=Path, default=[],
                        help="bundle folder (repeatable); default: every MR bundle under models/")
    parser.add_argument("--json", type=Path, help="also write the rows and summaries here")
    parser.add_argument("--record", action="store_true",
                        help="write the figures into each bundle's manifest (metrics.real_scans) and model card")
    parser.add_argument("--age", type=float, default=ASSUMED_AGE_YEARS,
                        help="chronological age passed for the real T1 (unknown; assumed)")
    args = parser.parse_args()
    start = time.perf_counter()

    bundles = [load_bundle(p) for p in (args.bundle or shipped_bundles())]
    skipped = [b.manifest.key for b in bundles if b.manifest.modality != "MR"]
    bundles = [b for b in bundles if b.manifest.modality == "MR"]
    print(NO_CT_NOTE + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    if not bundles:
        raise SystemExit("no MR bundle to judge")
    head = realscans.load_real_t1()
    means = realscans.tissue_means(head)
    print(f"real T1: {realscans.REAL_T1.name}; chronological age unknown, assumed {args.age:g} years")
    print(f"tissue means in the brain mask (3-class k-means): CSF {means.csf:.0f}, GM {means.gm:.0f}, "
          f"WM {means.wm:.0f}; noise sigma {means.noise_sigma:.0f}")
    for kind, level in realscans.T1_LEVELS.items():
        print(f"  {kind:<10} T1 {level.value(means):5.0f}  ({level.reason})")

    with tempfile.TemporaryDirectory() as tmp:
        cases = _healthy_cases(head, args.age, Path(tmp)) + _lesion_cases(head, means, args.age, Path(tmp))
        print(f"cases written and read back: {len(cases)} ({time.perf_counter() - start:.1f} s)", flush=True)
        prepared: dict[str, dict[str, Preprocessed | str]] = {}
        report: dict[str, dict] = {}
        for bundle in bundles:
            params = bundle.manifest.preprocessing
            key = json.dumps(params, sort_keys=True)
            if key not in prepared:  # bundles sharing preprocessing share its results
                prepared[key] = {case.name: _prepare(case, params) for case in cases}
            rows = _judge(BundleRunner(bundle), cases, prepared[key], args.age)
            summary = _summary(rows)
            _print_table(bundle, rows, summary)
            report[bundle.manifest.key] = {"sha256": bundle.sha256, "rows": [asdict(r) for r in rows],
                                           "summary": summary}
            if args.record:
                _record(bundle, rows, summary, args.age)
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "note": NO_CT_NOTE, "assumed_age_years": args.age, "tissue_means": asdict(means),
            "lesion_t1": {k: {"value": round(v.value(means), 1), "reason": v.reason}
                          for k, v in realscans.T1_LEVELS.items()},
            "targets": {"age_range_years": AGE_RANGE_YEARS, "healthy_max_seg_ml": HEALTHY_MAX_SEG_ML,
                        "min_dice": MIN_DICE, "seg_min_region_ml": MIN_CLUSTER_ML},
            "bundles": report, "wall_s": round(wall, 1)}, indent=2) + "\n")


# --------------------------------------------------------------------------- cases


def _series(image: sitk.Image, mask: sitk.Image, age: float, folder: Path) -> Volume:
    phantom = realscans.as_phantom(image, mask, age=age)
    return load_series(write_dicom_series(phantom, folder, rows=SERIES_ROWS, cols=SERIES_ROWS,
                                          slice_thickness=SERIES_SLICE_MM))


def _healthy_cases(head: realscans.RealHead, age: float, folder: Path) -> list[Case]:
    cases = []
    for k, (name, pose) in enumerate(HEALTHY_POSES.items()):
        image, mask = head.image, head.brain_mask
        if pose != Pose():
            image, mask = realscans.repose(image, pose), realscans.repose(mask, pose, nearest=True)
        cases.append(Case(name, "healthy", _series(image, mask, age, folder / f"healthy-{k}"), None))
    return cases


def _lesion_cases(head: realscans.RealHead, means: realscans.TissueMeans, age: float, folder: Path) -> list[Case]:
    cases = []
    voxel_ml = float(np.prod(head.image.GetSpacing())) / 1000.0
    for k, lesion in enumerate(LESIONS):
        image, labels = realscans.insert_lesion(head, lesion.kind, lesion.volume_ml, lesion.seed, means)
        volume = _series(image, head.brain_mask, age, folder / f"lesion-{k}")
        # The whole abnormality (a tumour's oedema too) on the series' grid, by partial volume.
        whole = sitk.Cast(labels > 0, sitk.sitkFloat32)
        on_series = sitk.Resample(whole, volume.image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        array = sitk.GetArrayViewFromImage(labels)
        cases.append(Case(lesion.name, "lesion", volume, sitk.GetArrayFromImage(on_series) >= 0.5,
                          inserted_ml=float((array == realscans.LESION_LABEL).sum()) * voxel_ml,
                          oedema_ml=float((array == realscans.OEDEMA_LABEL).sum()) * voxel_ml or None))
    return cases


def _prepare(case: Case, params: dict) -> Preprocessed | str:
    """The preprocessed case, or why it is not eligible (the daemon's QC gate)."""
    try:
        result = preprocess(case.volume, params)
    except InputRejected as exc:
        return str(exc)
    blocking = qc.blocking_reasons([*case.volume.qc_reasons, *result.qc_reasons])
    return "; ".join(blocking) if blocking else result


# --------------------------------------------------------------------------- judging


def _judge(runner: BundleRunner, cases: list[Case], prepared: dict[str, Preprocessed | str],
           age: float) -> list[Row]:
    # The lesions are painted into the as-acquired scan (the first healthy case): its model
    # input and error at the lesion's voxels say what the lesion changed and what was there.
    first = prepared[cases[0].name]
    baseline = (None if isinstance(first, str)
                else (first, runner.run(first.model_input, age, brain_mask=first.brain_mask)))
    rows = [_score(runner, case, prepared[case.name], age, baseline) for case in cases]
    healthy = [r.score for r in rows if r.group == "healthy" and r.score is not None]
    low, high = AGE_RANGE_YEARS
    for row in rows:
        if row.group == "healthy":
            row.targets = {"below_threshold": row.eligible and not row.positive,
                           "age_20_90": row.predicted_age is not None and low <= row.predicted_age <= high,
                           "seg_le_5ml": row.seg_ml is not None and row.seg_ml <= HEALTHY_MAX_SEG_ML}
        else:
            row.above_healthy = (None if row.score is None or not healthy
                                 else bool(row.score > max(healthy)))
            row.targets = {"positive": bool(row.positive), "above_every_healthy": bool(row.above_healthy),
                           "dice_ge_0.3": row.dice is not None and row.dice >= MIN_DICE}
    return rows


def _score(runner: BundleRunner, case: Case, prepared: Preprocessed | str, age: float,
           baseline: tuple[Preprocessed, Inference] | None = None) -> Row:
    """One case through inference the daemon's way (daemon/pipeline.run_job)."""
    row = Row(case.name, case.group, eligible=False, inserted_ml=case.inserted_ml, oedema_ml=case.oedema_ml)
    if isinstance(prepared, str):
        row.reason = prepared
        return row
    clock = time.perf_counter()
    inference: Inference = runner.run(prepared.model_input, age, brain_mask=prepared.brain_mask)
    blocking = qc.blocking_reasons(list(inference.notes))
    if blocking:  # a model note that says its own output cannot be trusted
        row.reason = "; ".join(blocking)
        return row
    seg = _seg(runner, case, prepared, inference.error_map, inference.screen_positive)
    voxel_ml = float(np.prod(case.volume.image.GetSpacing())) / 1000.0
    row.eligible = True
    row.score, row.threshold = inference.anomaly_score, inference.threshold
    row.positive, row.percentile = inference.screen_positive, inference.percentile
    row.terms, row.predicted_age = dict(inference.terms), inference.predicted_age
    row.notes = list(inference.notes)
    row.seg_ml = float(seg.sum()) * voxel_ml
    row.dice = dice(seg, case.lesion) if case.lesion is not None else None
    if case.lesion is not None:
        row.lesion_seen = _lesion_seen(runner, case, prepared, inference, baseline)
    row.seconds = time.perf_counter() - clock
    return row


def _seg(runner: BundleRunner, case: Case, prepared: Preprocessed, overlay: np.ndarray, positive: bool) -> np.ndarray:
    """The native SEG mask of a model-grid overlay, as the daemon builds it (export/seg.py)."""
    brain_map = np.where(prepared.brain_mask, overlay, 0.0).astype(np.float32)
    voxel_ml = float(np.prod(case.volume.image.GetSpacing())) / 1000.0
    focus = native_focus(brain_map, prepared, case.volume) if positive else None
    # Read in parts, as the daemon's SEG reads it (imaging.preprocess.ResampledMap).
    return anomaly_mask(to_native_map(brain_map, prepared, case.volume), runner.bundle.seg_threshold(), voxel_ml,
                        grow=runner.bundle.seg_grow(), focus=focus)


def _healed(runner: BundleRunner, case: Case, prepared: Preprocessed, lesion_on_model: np.ndarray,
            baseline: tuple[Preprocessed, Inference], age_gap: float | None) -> dict[str, float]:
    """At best, a network that copies none of the lesion: the scan's own error without the
    lesion plus the lesion's whole contrast where it lies, scored with this bundle's
    normative model, score and threshold, and its SEG. An upper bound (where the lesion's
    contrast opposes the scan's own error there, a real one would cancel part of it): a
    target this misses is out of reach of any network at the healthy error spread the
    normative model holds; only less healthy error (a sharper reconstruction) reaches it."""
    before, before_inference = baseline
    assert before_inference.raw_error is not None and runner.bundle.normative is not None
    manifest = runner.bundle.manifest
    healed = before_inference.raw_error.copy()
    healed[lesion_on_model] += np.abs(prepared.model_input - before.model_input)[lesion_on_model]
    masked, overlay = masked_terms(healed, prepared.brain_mask, runner.bundle.normative,
                                   one_sided=uses_asymmetry(manifest.score.terms))
    terms = {**before_inference.terms, **masked}
    score = sum(weight * terms[name] for name, weight in manifest.score.terms.items())
    score += manifest.score.age_gap_weight * abs(age_gap or 0.0)
    positive = runner.bundle.screen_positive(score)
    seg = _seg(runner, case, prepared, overlay, positive)
    return {"healed_score": float(score), "healed_positive": float(positive),
            "healed_dice": dice(seg, case.lesion) if case.lesion is not None else math.nan}


def _lesion_seen(runner: BundleRunner, case: Case, prepared: Preprocessed, inference: Inference,
                 baseline: tuple[Preprocessed, Inference] | None = None) -> dict[str, float] | None:
    """Inside the inserted lesion, taken to the model grid: the network's mean error, the
    healthy voxel mean and SD of the error there (the normative model) and the mean z. A
    score and a SEG can only see a lesion that the network reconstructs worse than healthy
    tissue, by several healthy SDs; None without a normative model.

    With the `baseline` (the scan the lesion was painted into): the lesion's contrast in
    the model input (lesion minus the same voxels without it), the share of that contrast
    that shows as error (the rise of the error there; 1: the network copied none of it),
    and the mean z a network that copied none of it would reach, from the means
    ((baseline error + |contrast| - healthy mean) / healthy SD): the most that healing
    the lesion can give at this normalisation and healthy spread."""
    normative = runner.bundle.normative
    if normative is None or inference.raw_error is None or case.lesion is None:
        return None
    lesion = sitk.GetImageFromArray(case.lesion.astype(np.float32))
    lesion.CopyInformation(case.volume.image)
    on_model = sitk.Resample(lesion, prepared.reference, prepared.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    lesion_on_model = sitk.GetArrayViewFromImage(on_model) >= 0.5
    inside = lesion_on_model & evaluation_mask(prepared.brain_mask, normative)
    if not inside.any():
        return None
    z = z_map(inference.raw_error, normative)
    seen = {"voxels": float(inside.sum()), "error": float(inference.raw_error[inside].mean()),
            "healthy_error_mean": float(normative.mean[inside].mean()),
            "healthy_error_sd": float(normative.sd[inside].mean()),
            "z": float(z[inside].mean()), "z_p90": float(np.percentile(z[inside], 90))}
    if baseline is not None and baseline[1].raw_error is not None:
        before, before_inference = baseline
        contrast = float((prepared.model_input[inside] - before.model_input[inside]).mean())
        before_error = float(before_inference.raw_error[inside].mean())
        seen.update(contrast=contrast, baseline_error=before_error,
                    shown=(seen["error"] - before_error) / abs(contrast) if contrast else math.nan,
                    z_healed=(before_error + abs(contrast) - seen["healthy_error_mean"]) / seen["healthy_error_sd"])
        seen.update(_healed(runner, case, prepared, lesion_on_model, baseline, inference.age_gap))
    return seen


def _summary(rows: list[Row]) -> dict[str, int]:
    """Targets met per group, and rows that meet all of theirs."""
    out: dict[str, int] = {"targets_met": 0, "targets": 0}
    for group in ("healthy", "lesion"):
        mine = [r for r in rows if r.group == group]
        out[f"{group}_targets_met"] = sum(sum(r.targets.values()) for r in mine)
        out[f"{group}_targets"] = sum(len(r.targets) for r in mine)
        out[f"{group}_rows_all_met"] = sum(all(r.targets.values()) for r in mine)
        out[f"{group}_rows"] = len(mine)
        out["targets_met"] += out[f"{group}_targets_met"]
        out["targets"] += out[f"{group}_targets"]
    return out


def _record(bundle: Bundle, rows: list[Row], summary: dict[str, int], age: float) -> None:
    """Into the manifest's metrics (not hashed: the files it lists are) and the model card."""
    from headscreen.model_training.model_card import record_metrics  # torch-free

    path = record_metrics(bundle.path, "real_scans", {
        "source": (f"The real whole-head T1 of Debian insighttoolkit5-examples ({realscans.REAL_T1.name}, never used "
                   f"in training), healthy in {len(HEALTHY_POSES)} poses and with lesions painted in; age unknown, "
                   f"{age:g} years assumed"
                   + (f" (the score's |age gap| term, weight {bundle.manifest.score.age_gap_weight:.3g}, uses it)"
                      if bundle.manifest.score.age_gap_weight else "")
                   + ". No real head CT volume is reachable, so CT bundles have no real-scan rows."),
        "rows": [{"case": r.case, "score": r.score, "threshold": r.threshold, "percentile": r.percentile,
                  "positive": r.positive,
                  "predicted_age": r.predicted_age, "seg_ml": r.seg_ml, "dice": r.dice,
                  "eligible": r.eligible, "reason": r.reason} for r in rows],
        "summary": (f"{summary['targets_met']}/{summary['targets']} targets met (healthy "
                    f"{summary['healthy_targets_met']}/{summary['healthy_targets']}, lesions "
                    f"{summary['lesion_targets_met']}/{summary['lesion_targets']}): below threshold, age 20-90 y and "
                    f"SEG <= {HEALTHY_MAX_SEG_ML:g} mL when healthy; positive, above every healthy pose and Dice >= "
                    f"{MIN_DICE:g} with a lesion."),
    })
    print(f"recorded in {path} and its MODEL_CARD.md")


# --------------------------------------------------------------------------- printing


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _print_table(bundle: Bundle, rows: list[Row], summary: dict[str, int]) -> None:
    manifest = bundle.manifest
    grown = f", grown to {bundle.seg_grow():g} x it" if bundle.seg_grow() < 1 else ""
    print(f"\n== {manifest.key} ({manifest.modality}, {manifest.method}); SEG threshold {bundle.seg_threshold():g} "
          f"x healthy limit{grown}, regions >= {MIN_CLUSTER_ML:g} mL")
    print("healthy poses (targets: below threshold, predicted age 20-90 y, SEG <= 5 mL)")
    header = f"{'case':<25} {'score':>9} {'thresh':>9} {'pos':>4} {'pct':>6} {'age':>6} {'SEG mL':>7} {'met':>4}  terms"
    print(header)
    for row in (r for r in rows if r.group == "healthy"):
        if not row.eligible:
            print(f"{row.case:<25} not eligible: {row.reason}  met 0/{len(row.targets)}")
            continue
        terms = " ".join(f"{k}={v:.4g}" for k, v in row.terms.items())
        age_note = next((n.split(":", 1)[1].strip() for n in row.notes if n.startswith("brain_age_implausible")), "")
        terms += f"  (age: {age_note})" if age_note else ""
        print(f"{row.case:<25} {_fmt(row.score, '.5g'):>9} {_fmt(row.threshold, '.5g'):>9} {_yes(row.positive):>4} "
              f"{_fmt(row.percentile, '.1f'):>6} {_fmt(row.predicted_age, '.1f'):>6} {_fmt(row.seg_ml, '.1f'):>7} "
              f"{sum(row.targets.values())}/{len(row.targets)}  {terms}")
    blocked = sum(not r.eligible for r in rows if r.group == "healthy")
    print("lesions in the as-acquired scan (targets: positive, above every healthy pose, Dice >= 0.3)"
          + (f"; {blocked} healthy pose(s) not eligible, compared with the others only" if blocked else ""))
    print(f"{'case':<25} {'mL in':>6} {'score':>9} {'pos':>4} {'pct':>6} {'>healthy':>8} {'SEG mL':>7} "
          f"{'Dice':>5} {'met':>4}  terms")
    for row in (r for r in rows if r.group == "lesion"):
        inserted = f"{row.inserted_ml:.0f}" + (f"+{row.oedema_ml:.0f}" if row.oedema_ml else "")
        if not row.eligible:
            print(f"{row.case:<25} {inserted:>6} not eligible: {row.reason}  met 0/{len(row.targets)}")
            continue
        terms = " ".join(f"{k}={v:.4g}" for k, v in row.terms.items())
        print(f"{row.case:<25} {inserted:>6} {_fmt(row.score, '.5g'):>9} {_yes(row.positive):>4} "
              f"{_fmt(row.percentile, '.1f'):>6} {_yes(row.above_healthy):>8} {_fmt(row.seg_ml, '.1f'):>7} "
              f"{_fmt(row.dice, '.2f'):>5} {sum(row.targets.values())}/{len(row.targets)}  {terms}")
    seen = [r for r in rows if r.group == "lesion" and r.lesion_seen]
    if seen:
        print("how the network sees each lesion (inside it, on the model grid): its error against the healthy "
              "voxel mean +- SD there, and z;\n  contrast: the lesion in the model input against the same voxels "
              "of the scan without it (error there before: 'before'); shown: the share of the contrast that shows "
              "as error;\n  z healed: the mean z of a network that copied none of it (from the means); healed: "
              "that network's score, verdict and SEG Dice at best (the scan's own error plus the lesion's whole\n"
              "  contrast, scored as the daemon scores; an upper bound): a target it misses is out of reach at this "
              "healthy error spread")
        print(f"{'case':<25} {'voxels':>6} {'error':>6} {'healthy':>13} {'mean z':>7} {'z p90':>6} "
              f"{'contrast':>8} {'before':>6} {'shown':>5} {'z healed':>8} {'healed score':>12} {'pos':>4} {'Dice':>5}")
        for row in seen:
            s = row.lesion_seen or {}
            extra = (f" {s['contrast']:>+8.3f} {s['baseline_error']:>6.3f} {s['shown']:>5.2f} {s['z_healed']:>8.2f}"
                     f" {s['healed_score']:>12.5g} {_yes(bool(s['healed_positive'])):>4}"
                     f" {_fmt(s['healed_dice'], '.2f'):>5}"
                     if "contrast" in s else "")
            print(f"{row.case:<25} {s['voxels']:>6.0f} {s['error']:>6.3f} "
                  f"{s['healthy_error_mean']:>6.3f} +- {s['healthy_error_sd']:<4.3f} {s['z']:>7.2f} {s['z_p90']:>6.2f}"
                  + extra)
    print(f"summary {manifest.key}: {summary['targets_met']}/{summary['targets']} targets met "
          f"(healthy {summary['healthy_targets_met']}/{summary['healthy_targets']}, "
          f"lesions {summary['lesion_targets_met']}/{summary['lesion_targets']}); rows meeting every target: "
          f"healthy {summary['healthy_rows_all_met']}/{summary['healthy_rows']}, "
          f"lesions {summary['lesion_rows_all_met']}/{summary['lesion_rows']}")


if __name__ == "__main__":
    main()
