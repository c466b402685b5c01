"""Pure judgement of whether a received study looks whole (no database access)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

SPACING_REL_TOL = 1e-2
SPACING_ABS_TOL_MM = 1e-3
# A head measures roughly 140-200 mm from skull base to vertex. A send cut short in
# slice order still has contiguous numbers and even spacing, so without
# ImagesInAcquisition only coverage of at least this much along the slice normal
# shows a whole series; anything less waits for the quiet period.
MIN_HEAD_COVERAGE_MM = 140.0
# Coverage is judged from a volume, not from a localizer's one or two slices.
MIN_COVERAGE_SLICES = 3


@dataclass(frozen=True)
class InstanceFacts:
    instance_number: int | None
    slice_position: float | None
    images_in_acquisition: int | None = None
    number_of_frames: int | None = None


@dataclass(frozen=True)
class Wholeness:
    whole: bool
    reason: str


def series_wholeness(instances: Sequence[InstanceFacts]) -> Wholeness:
    """Whole when instance numbers have no gaps, slices are evenly spaced,
    ImagesInAcquisition (where given) is met, and something shows the series is all
    there: the image count equals ImagesInAcquisition, or the slices cover at least
    MIN_HEAD_COVERAGE_MM along their normal."""
    if not instances:
        return Wholeness(False, "series has no instances")
    for check in (_numbers_contiguous, _spacing_even, _acquisition_met, _evidence_of_whole):
        verdict = check(instances)
        if not verdict.whole:
            return verdict
    return Wholeness(True, "whole")


def study_wholeness(series: Sequence[Sequence[InstanceFacts]]) -> Wholeness:
    if not series:
        return Wholeness(False, "study has no series")
    for index, instances in enumerate(series):
        verdict = series_wholeness(instances)
        if not verdict.whole:
            return Wholeness(False, f"series {index}: {verdict.reason}")
    return Wholeness(True, "whole")


def _numbers_contiguous(instances: Sequence[InstanceFacts]) -> Wholeness:
    numbers = [i.instance_number for i in instances]
    if any(n is None for n in numbers):
        return Wholeness(False, "instance number missing")
    present = sorted(n for n in numbers if n is not None)
    if len(set(present)) != len(present):
        return Wholeness(False, "duplicate instance numbers")
    expected = present[-1] - present[0] + 1
    if expected != len(present):
        return Wholeness(False, f"instance numbers have gaps ({len(present)} of {expected})")
    return Wholeness(True, "numbers contiguous")


def _spacing_even(instances: Sequence[InstanceFacts]) -> Wholeness:
    positions = [i.slice_position for i in instances]
    known = sorted(p for p in positions if p is not None)
    if not known:
        return Wholeness(True, "no slice positions (multi-frame or non-image)")
    if len(known) != len(positions):
        return Wholeness(False, "slice position missing on some instances")
    if len(known) < 3:
        return Wholeness(True, "too few slices to judge spacing")
    steps = [b - a for a, b in zip(known, known[1:])]
    typical = median(steps)
    if typical <= SPACING_ABS_TOL_MM:
        return Wholeness(False, "coincident slice positions")
    tolerance = max(SPACING_REL_TOL * typical, SPACING_ABS_TOL_MM)
    worst = max(abs(step - typical) for step in steps)
    if worst > tolerance:
        return Wholeness(False, f"uneven slice spacing (deviation {worst:.3g} mm, typical {typical:.3g} mm)")
    return Wholeness(True, "spacing even")


def _acquisition_met(instances: Sequence[InstanceFacts]) -> Wholeness:
    expected = [i.images_in_acquisition for i in instances if i.images_in_acquisition is not None]
    if not expected:
        return Wholeness(True, "ImagesInAcquisition absent")
    images = sum(i.number_of_frames or 1 for i in instances)
    if images < max(expected):
        return Wholeness(False, f"ImagesInAcquisition not met ({images} of {max(expected)})")
    return Wholeness(True, "ImagesInAcquisition met")


def _evidence_of_whole(instances: Sequence[InstanceFacts]) -> Wholeness:
    """A gap-free, evenly spaced series may still be the first part of a longer one."""
    declared = {i.images_in_acquisition for i in instances}
    images = sum(i.number_of_frames or 1 for i in instances)
    # Only an exact match: some scanners count images per rotation or per acquisition.
    if len(declared) == 1 and None not in declared and images == next(iter(declared)):
        return Wholeness(True, "ImagesInAcquisition matched")
    coverage = slice_coverage_mm(instances)
    if coverage is None:
        return Wholeness(False, "no evidence of a whole series (no ImagesInAcquisition, no slice positions)")
    if coverage < MIN_HEAD_COVERAGE_MM:
        return Wholeness(
            False, f"no evidence of a whole series (slices cover {coverage:.0f} mm < {MIN_HEAD_COVERAGE_MM:.0f} mm)"
        )
    return Wholeness(True, "head coverage")


def slice_coverage_mm(instances: Sequence[InstanceFacts]) -> float | None:
    """Extent along the slice normal, each slice standing for one spacing of tissue
    (the centres' span plus one spacing); None with too few positioned slices."""
    known = sorted(i.slice_position for i in instances if i.slice_position is not None)
    if len(known) < MIN_COVERAGE_SLICES:
        return None
    return (known[-1] - known[0]) * len(known) / (len(known) - 1)
