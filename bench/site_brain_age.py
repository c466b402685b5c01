"""A scanner's brain-age bias, found and corrected by its site reference, on simulated sites.

    .venv/bin/python bench/site_brain_age.py [--gamma 1.6 1.0] [--n-calibration 30] [--n-test 20]
                                             [--bundle DIR]

No real population with known ages is reachable offline, so a "site" is simulated: one
set of domain-randomised MR heads (imaging.synthesis, seeds 9000 on, ages 20-85, small
random poses) seen by a scanner whose T1 contrast differs from any in training: each
head's intensities pass through a fixed gamma curve (--gamma; 1.0 is the synthesis' own
contrast, a site with no bias to find). For each gamma:

1. the first --n-calibration heads are the scanner's studies an admin confirmed normal:
   each goes the daemon's way (preprocessing as the bundle's manifest says, the QC gate:
   a blocked head is not eligible and left out, then BundleRunner, whose own blocking
   notes leave a head out too), and their model brain ages give the scanner's bias with
   `daemon.reference.estimate_age_bias`, what
   `headscreen calibrate` stores in the site reference (median gap, 95 % bootstrap
   interval, applied only from 20 studies and where the interval excludes 0);
2. the next --n-test heads are new studies of that scanner: brain-age MAE and mean gap
   (predicted - true) as the bundle reports them, and after the site reference's
   correction (the same numbers when it applies none).

Every number comes from one deterministic run (fixed seeds). A benchmark, not a test:
it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from headscreen.bundle import load_bundle  # noqa: E402
from headscreen.daemon.config import shipped_bundles  # noqa: E402
from headscreen.daemon.reference import estimate_age_bias  # noqa: E402
from headscreen.db.types import CalibrationCandidate  # noqa: E402
from headscreen.errors import InputRejected  # noqa: E402
from headscreen.imaging.phantoms import Pose, make_head  # noqa: E402
from headscreen.imaging.preprocess import preprocess  # noqa: E402
from headscreen.imaging.qc import blocking_reasons  # noqa: E402
from headscreen.imaging.volume import Volume  # noqa: E402
from headscreen.inference import BundleRunner  # noqa: E402

FIRST_SEED = 9000
AGE_RANGE = (20.0, 85.0)


@dataclass(frozen=True)
class Head:
    seed: int
    age: float
    image: sitk.Image


@dataclass(frozen=True)
class Seen:
    """One head as the bundle saw it: its model brain age, or why it has none."""

    age: float
    predicted: float | None
    why_not: str | None


def head(i: int) -> Head:
    rng = np.random.default_rng([FIRST_SEED, i])
    age = float(round(rng.uniform(*AGE_RANGE), 1))
    pose = Pose(tuple(float(v) for v in rng.uniform(-6, 6, 3)),  # type: ignore[arg-type]
                tuple(float(v) for v in rng.uniform(-6, 6, 3)))  # type: ignore[arg-type]
    return Head(FIRST_SEED + i, age, make_head("MR", age=age, seed=FIRST_SEED + i, pose=pose, randomise=True).image)


_RUNNER: BundleRunner | None = None


def _load_runner(bundle_path: str) -> None:
    global _RUNNER
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core per process
    _RUNNER = BundleRunner(load_bundle(Path(bundle_path)))


def seen_at_each_gamma(i: int, gammas: list[float]) -> list[Seen]:
    """Head i synthesised once and seen through each scanner (in a pool process)."""
    assert _RUNNER is not None
    one = head(i)
    return [seen_by(_RUNNER, one, gamma) for gamma in gammas]


def through_scanner(image: sitk.Image, gamma: float) -> sitk.Image:
    """The site's contrast: intensities scaled to the head's 99.5th percentile, raised to
    `gamma`, scaled back (a monotone curve: the tissue order stays, the contrast moves)."""
    if gamma == 1.0:
        return image
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    top = float(np.percentile(values[values > 0], 99.5)) if (values > 0).any() else 1.0
    curved = top * np.power(np.clip(values, 0.0, None) / top, gamma)
    out = sitk.GetImageFromArray(curved.astype(np.float32))
    out.CopyInformation(image)
    return out


def seen_by(runner: BundleRunner, one: Head, gamma: float) -> Seen:
    volume = Volume.from_image(through_scanner(one.image, gamma), "MR", series_uid=f"site.{one.seed}")
    try:
        prepared = preprocess(volume, runner.bundle.manifest.preprocessing)
    except InputRejected as exc:
        return Seen(one.age, None, str(exc).split(":")[0])
    blocking = blocking_reasons([*volume.qc_reasons, *prepared.qc_reasons])
    if blocking:
        return Seen(one.age, None, blocking[0].split(":")[0])
    inference = runner.run(prepared.model_input, one.age, brain_mask=prepared.brain_mask)
    blocking = blocking_reasons(list(inference.notes))  # a model note that says its output cannot be trusted
    if blocking:
        return Seen(one.age, None, blocking[0].split(":")[0])
    if inference.predicted_age is None:
        return Seen(one.age, None, "brain_age_implausible")
    return Seen(one.age, inference.predicted_age, None)


def _figures(seen: list[Seen], offset: float) -> str:
    gaps = [s.predicted - offset - s.age for s in seen if s.predicted is not None]
    if not gaps:
        return "no head with a brain age"
    return f"MAE {statistics.fmean(abs(g) for g in gaps):5.2f} y, mean gap {statistics.fmean(gaps):+6.2f} y"


def _left_out(seen: list[Seen]) -> str:
    reasons: dict[str, int] = {}
    for s in seen:
        if s.why_not:
            reasons[s.why_not] = reasons.get(s.why_not, 0) + 1
    return ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gamma", type=float, nargs="+", default=[1.6, 1.0])
    parser.add_argument("--n-calibration", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--bundle", type=Path, help="an MR bundle with a brain-age output (default: the shipped one)")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle) if args.bundle else next(
        b for b in (load_bundle(p) for p in shipped_bundles()) if b.manifest.modality == "MR")
    if not bundle.manifest.outputs.age:
        parser.error(f"{bundle.manifest.key} predicts no brain age")
    n = args.n_calibration + args.n_test
    began = time.perf_counter()
    # One process per core (synthesis and registration are the cost); the runs do not interact.
    with ProcessPoolExecutor(max_workers=args.processes, initializer=_load_runner,
                             initargs=(str(bundle.path),)) as pool:
        by_head = list(pool.map(seen_at_each_gamma, range(n), [args.gamma] * n))
    print(f"bundle {bundle.manifest.key}; {n} domain-randomised MR heads (seeds {FIRST_SEED}-{FIRST_SEED + n - 1}): "
          f"{args.n_calibration} confirmed normal, {args.n_test} new studies; {len(args.gamma)} scanners; "
          f"{time.perf_counter() - began:.0f} s with {args.processes} processes")
    for g, gamma in enumerate(args.gamma):
        seen = [views[g] for views in by_head]
        normals, new = seen[:args.n_calibration], seen[args.n_calibration:]
        candidates = [CalibrationCandidate(result_id=i, station_key="SITE|SIM|1", eligible=s.why_not is None,
                                           anomaly_score=0.0 if s.why_not is None else None, scoring_sha256="s",
                                           confirmed_normal=True, flagged=False, predicted_age=s.predicted,
                                           chronological_age=s.age) for i, s in enumerate(normals)]
        bias = estimate_age_bias(candidates, "s")
        offset = bias["offset_years"] if bias["applied"] else 0.0
        ci = bias.get("ci95") or [None, None]
        interval = "n/a" if None in ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
        verdict = "applied" if bias["applied"] else f"not applied: {bias.get('reason')}"
        print(f"\ngamma {gamma:g}")
        print(f"  confirmed normal: {bias['n']} of {len(normals)} with a brain age (left out: {_left_out(normals)})")
        print(f"  bias {bias.get('offset_years', float('nan')):+.2f} y, 95 % interval {interval}: {verdict}")
        print(f"  confirmed normal, as reported:  {_figures(normals, 0.0)}")
        print(f"  new studies ({sum(s.predicted is not None for s in new)} of {len(new)}; left out: {_left_out(new)})")
        print(f"    as the bundle reports:        {_figures(new, 0.0)}")
        print(f"    after the site correction:    {_figures(new, offset)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
