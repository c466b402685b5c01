"""Which healthy reference judges a score, and how a site estimates its own.

A bundle ships a healthy reference (sorted scores and a threshold at a chosen
specificity) estimated on synthetic phantoms. A hospital's scanners are not those
phantoms, so a site can estimate a reference from its own healthy studies, per
scanner (`headscreen calibrate`, stored by db.calibration). With
`[calibration] mode = "site"` a scanner without such a reference of at least
`min_references` studies is *calibrating*: its scores are recorded (they feed the
next calibration) but no percentile and no screen result are reported.

Torch-free and free of model_training: the threshold rule is repeated here as a
small pure function (the same as model_training.calibration.threshold_at_specificity).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import logging
import math
import re
import statistics
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from headscreen.age_bias import age_bias
from headscreen.bundle import MANIFEST_NAME, Bundle
from headscreen.db.types import CalibrationCandidate, SiteReferenceRow

log = logging.getLogger(__name__)

GROUPINGS = ("station", "model")
RULE_CONFIRMED_NORMAL = "confirmed_normal"
RULE_FIRST_N = "first_n_robust"
# A scanner's brain-age bias is corrected only from at least this many confirmed-normal
# studies with both ages by default ([calibration] age_min_studies): the bootstrap
# interval of a median of fewer is not worth much.
AGE_BIAS_MIN_STUDIES = 20
# MAD x 1.4826 estimates the standard deviation of normally distributed scores.
MAD_TO_SD = 1.4826
UNKNOWN_PART = "UNKNOWN"
_HEADER_PARTS = ("Manufacturer", "ManufacturerModelName", "StationName")
_NOT_KEY_TEXT = re.compile(r"[^A-Z0-9 ._+/-]+")


# --------------------------------------------------------------------------- math

def threshold_at_specificity(scores: Iterable[float], specificity: float) -> float:
    """The smallest healthy score t with at least `specificity` of healthy scores <= t
    (the rule model_training.calibration uses for a bundle's own threshold)."""
    if not 0.0 < specificity < 1.0:
        raise ValueError(f"specificity: must be in (0, 1), got {specificity}")
    ordered = sorted(float(s) for s in scores)
    if not ordered:
        raise ValueError("scores: must not be empty")
    return ordered[math.ceil(specificity * len(ordered)) - 1]


def robust_cut(scores: Sequence[float], mads: float = 3.0) -> float:
    """median + mads x 1.4826 x MAD: healthy scores above it are taken for outliers."""
    if not scores:
        raise ValueError("scores: must not be empty")
    median = statistics.median(scores)
    mad = statistics.median(abs(s - median) for s in scores)
    return median + mads * MAD_TO_SD * mad


# --------------------------------------------------------------------------- scanners

def _key_part(value: object) -> str:
    # ASCII upper case with single spaces: "Siemens  Healthineers" and "SIEMENS HEALTHINEERS"
    # are one scanner, and the key can go into an SR and a log line as it is.
    text = unicodedata.normalize("NFKD", str(value or "")).encode("ascii", "ignore").decode("ascii").upper()
    return " ".join(_NOT_KEY_TEXT.sub(" ", text).split())[:64] or UNKNOWN_PART


def station_key(header: Any) -> str:
    """'MANUFACTURER|MODEL|STATION' from a series' header (a part absent: UNKNOWN)."""
    parts = []
    for keyword in _HEADER_PARTS:
        try:
            value = header.get(keyword)
        except Exception:  # an undecodable value: that part is unknown, the study still runs
            value = None
        parts.append(_key_part(value))
    return "|".join(parts)


def group_key(key: str, grouping: str) -> str:
    """The scanner group a full station key belongs to: itself, or manufacturer + model."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping: one of {', '.join(GROUPINGS)}, got {grouping!r}")
    return key if grouping == "station" else "|".join(key.split("|")[:2])


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def scoring_identity(bundle: Bundle) -> str:
    """sha256 of the bundle's manifest, which pins the model files (by their hashes),
    preprocessing and score definition: only scores of one manifest are comparable."""
    path = Path(bundle.path) / MANIFEST_NAME
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


# --------------------------------------------------------------------------- references

@dataclass(frozen=True)
class Reference:
    """A healthy reference a score is judged against: percentile and screen result."""

    scores: tuple[float, ...]  # sorted
    threshold: float
    specificity: float
    n: int
    source: Literal["bundle", "site"]
    station: str | None  # the scanner group of a site reference
    provenance: dict[str, Any] = field(default_factory=dict)
    bundle_key: str = ""
    reference_id: int | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.source not in ("bundle", "site"):
            raise ValueError(f"source: 'bundle' or 'site', got {self.source!r}")
        if not self.scores:
            raise ValueError("scores: must not be empty")
        if list(self.scores) != sorted(self.scores):
            raise ValueError("scores: must be sorted")

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Reference:
        calibration = bundle.manifest.calibration
        return cls(scores=tuple(calibration.reference_scores), threshold=calibration.threshold,
                   specificity=calibration.specificity, n=len(calibration.reference_scores), source="bundle",
                   station=None, provenance={"rule": "bundle manifest: synthetic healthy phantoms"},
                   bundle_key=bundle.manifest.key)

    @classmethod
    def from_site(cls, row: SiteReferenceRow) -> Reference:
        return cls(scores=tuple(sorted(row.scores)), threshold=row.threshold, specificity=row.specificity, n=row.n,
                   source="site", station=row.station, provenance=dict(row.provenance), bundle_key=row.bundle_key,
                   reference_id=row.reference_id, created_at=row.created_at)

    @property
    def kind(self) -> str:
        return self.source

    @property
    def age_offset(self) -> float | None:
        """Years this scanner's brain age is lowered by: a site reference's bias where
        `calibrate` found one (provenance "brain_age"); None: no correction."""
        bias = self.provenance.get("brain_age") or {}
        return float(bias["offset_years"]) if self.source == "site" and bias.get("applied") else None

    def percentile(self, score: float) -> float:
        """Percent of the reference's healthy scores at or below `score`."""
        return 100.0 * bisect.bisect_right(self.scores, score) / len(self.scores)

    def positive(self, score: float) -> bool:
        return score > self.threshold

    def describe(self) -> str:
        """The sentence the SR carries: which reference the percentile is against (and
        the brain-age correction that came with it)."""
        if self.source == "bundle":
            return f"Reference: bundle {self.bundle_key}, synthetic healthy phantoms, n={self.n}"
        return f"Reference: site, station {self.station}, n={self.n}, created {self._created()}{self._age_note()}"

    def legend(self) -> str:
        """What the overlay burns in: no header text (the station), only our own words."""
        if self.source == "bundle":
            return self.describe()
        # No brain-age note: the overlay's brain-age line names the correction itself.
        return f"Reference: site, this scanner, n={self.n}, created {self._created()}"

    def _created(self) -> str:
        return self.created_at.date().isoformat() if self.created_at else "unknown"

    def _age_note(self) -> str:
        offset = self.age_offset
        if offset is None:
            return ""
        n = self.provenance["brain_age"]["n"]
        return (f"; brain age corrected by {-offset:+.1f} y, this scanner's median gap on "
                f"{n} confirmed-normal studies")


@dataclass(frozen=True)
class Calibrating:
    """No usable site reference for this scanner yet: a score, but no screen result."""

    station: str
    needed: int
    has: int
    bundle_key: str = ""

    kind = "calibrating"

    def describe(self) -> str:
        return (f"Calibrating: no screen result until this scanner has {self.needed} healthy reference "
                f"studies (has {self.has})")

    def legend(self) -> str:
        return self.describe()


# (bundle name, version, scoring sha256, grouping, scanner group) -> the active site reference
SiteLookup = Callable[[str, str, str, str, str], SiteReferenceRow | None]


@dataclass(frozen=True)
class ReferencePolicy:
    """Chooses the reference for a bundle and a scanner (`[calibration]` settings)."""

    mode: Literal["bundle", "site"] = "bundle"
    min_references: int = 20
    grouping: str = "station"
    lookup: SiteLookup | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("bundle", "site"):
            raise ValueError(f"mode: 'bundle' or 'site', got {self.mode!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping: one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        if self.min_references < 1:
            raise ValueError("min_references: >= 1")
        if self.mode == "site" and self.lookup is None:
            raise ValueError("lookup: site mode needs a way to read site references")

    @classmethod
    def from_settings(cls, calibration: Any, lookup: SiteLookup | None) -> ReferencePolicy:
        return cls(mode=calibration.mode, min_references=calibration.min_references,
                   grouping=calibration.grouping, lookup=lookup)

    def choose(self, bundle: Bundle, station: str) -> Reference | Calibrating:
        if self.mode == "bundle":
            return Reference.from_bundle(bundle)
        assert self.lookup is not None  # checked in __post_init__
        manifest = bundle.manifest
        group = group_key(station, self.grouping)
        row = self.lookup(manifest.name, manifest.version, scoring_identity(bundle), self.grouping, group)
        if row is not None and row.n >= self.min_references:
            return Reference.from_site(row)
        return Calibrating(station=group, needed=self.min_references, has=0 if row is None else row.n,
                           bundle_key=manifest.key)


# --------------------------------------------------------------------------- estimating

@dataclass(frozen=True)
class Estimate:
    """A site reference estimated for one scanner group, before it is stored."""

    station: str
    rule: str
    scores: tuple[float, ...]  # sorted, what the reference keeps
    result_ids: tuple[int, ...]
    threshold: float
    specificity: float
    considered: int
    excluded: dict[str, int]  # reason -> count
    outlier_cut: float | None = None
    requested: int | None = None
    brain_age: dict[str, Any] | None = None  # estimate_age_bias; None: the bundle predicts no age

    @property
    def n(self) -> int:
        return len(self.scores)

    def provenance(self, grouping: str, bundle: Bundle, outlier_mads: float) -> dict[str, Any]:
        """Which rule, how many studies, how many excluded and why: counts, never patient values."""
        calibration = bundle.manifest.calibration
        if self.rule == RULE_CONFIRMED_NORMAL:
            text = "studies an admin marked confirmed normal"
        else:
            text = (f"first {self.requested} scored studies of this scanner; scores above median + "
                    f"{outlier_mads:g} x 1.4826 x MAD dropped")
        out: dict[str, Any] = {
            "rule": self.rule, "rule_text": text, "grouping": grouping, "considered": self.considered,
            "used": self.n, "excluded": dict(self.excluded), "specificity": self.specificity,
            "threshold_rule": "smallest healthy score with at least the specificity of healthy scores at or below it",
            "bundle": bundle.manifest.key,
            "bundle_reference": {"n": len(calibration.reference_scores), "threshold": calibration.threshold},
        }
        if self.requested is not None:
            out["requested_first_n"] = self.requested
        if self.outlier_cut is not None:
            out["outlier_cut"] = self.outlier_cut
            out["outlier_mads"] = outlier_mads
        if self.brain_age is not None:
            out["brain_age"] = self.brain_age
        return out


def _scored(candidate: CalibrationCandidate, scoring: str) -> str | None:
    """Why a result cannot be a healthy reference score, or None when it can."""
    if not candidate.eligible:
        return "not_eligible"
    if candidate.anomaly_score is None or not math.isfinite(candidate.anomaly_score):
        return "no_score"
    if candidate.scoring_sha256 != scoring:
        return "other_bundle_manifest"
    return None


def estimate_age_bias(candidates: Sequence[CalibrationCandidate], scoring: str,
                      min_studies: int = AGE_BIAS_MIN_STUDIES) -> dict[str, Any]:
    """One scanner group's brain-age bias (headscreen.age_bias) from its results of studies
    confirmed normal that have both ages, whatever rule chose the reference's scores:
    patients not confirmed normal may be old beyond their years, which is what the gap is
    there to show. Applied only from `min_studies` studies on, and only where its
    95 % interval excludes 0. A JSON-ready record: counts and figures, no patient value."""
    gaps: list[float] = []
    excluded: dict[str, int] = {}
    for c in candidates:
        if not c.confirmed_normal:
            continue
        why = _scored(c, scoring) or ("no_predicted_age" if c.predicted_age is None else
                                      "no_chronological_age" if c.chronological_age is None else None)
        if why:
            excluded[why] = excluded.get(why, 0) + 1
            continue
        # The model's own estimate: a result judged against an earlier site reference
        # reports its brain age after that reference's correction.
        gaps.append(float(c.predicted_age) + (c.age_offset or 0.0) - float(c.chronological_age))  # type: ignore[arg-type]
    record: dict[str, Any] = {
        "rule_text": "median gap (model brain age - chronological age) of studies confirmed normal",
        "n": len(gaps), "excluded": excluded, "min_studies": min_studies, "applied": False,
    }
    if not gaps:
        record["reason"] = "no study confirmed normal with both ages"
        return record
    bias = age_bias(gaps)
    ci = [round(v, 3) if math.isfinite(v) else None for v in bias.ci95]
    record.update(offset_years=round(bias.offset_years, 3), ci95=ci)
    if bias.n < min_studies:
        record["reason"] = f"{bias.n} studies with both ages, fewer than {min_studies}"
    elif not bias.excludes_zero:
        record["reason"] = (f"its 95 % interval [{bias.ci95[0]:+.2f}, {bias.ci95[1]:+.2f}] y holds 0: "
                            "no bias to correct")
    else:
        record["applied"] = True
    return record


def estimate(candidates: Sequence[CalibrationCandidate], station: str, scoring: str, specificity: float, *,
             first_n: int | None = None, outlier_mads: float = 3.0, with_age: bool = False,
             age_min_studies: int = AGE_BIAS_MIN_STUDIES) -> Estimate | None:
    """A reference from one scanner group's results (oldest first); None when none is usable.

    Without `first_n`: every result of a study confirmed normal. With it: the first
    `first_n` scored results, less those an admin flagged and the robust outliers.
    `with_age` (the bundle predicts brain age): the group's brain-age bias too
    (`estimate_age_bias`, from `age_min_studies`).
    """
    excluded: dict[str, int] = {}

    def drop(reason: str) -> None:
        excluded[reason] = excluded.get(reason, 0) + 1

    kept: list[CalibrationCandidate] = []
    if first_n is None:
        rule, considered, cut = RULE_CONFIRMED_NORMAL, 0, None
        for c in candidates:
            if not c.confirmed_normal:
                continue
            considered += 1
            reason = _scored(c, scoring)
            if reason:
                drop(reason)
            else:
                kept.append(c)
    else:
        if first_n < 1:
            raise ValueError("first_n: >= 1")
        rule = RULE_FIRST_N
        pool = [c for c in candidates if _scored(c, scoring) is None][:first_n]
        considered = len(pool)
        for c in pool:
            if c.flagged and not c.confirmed_normal:
                drop("flagged_by_admin")
            else:
                kept.append(c)
        cut = robust_cut([float(c.anomaly_score) for c in kept], outlier_mads) if kept else None  # type: ignore[arg-type]
        if cut is not None:
            inliers = [c for c in kept if float(c.anomaly_score) <= cut]  # type: ignore[arg-type]
            for _ in range(len(kept) - len(inliers)):
                drop("outlier")
            kept = inliers
    if not kept:
        return None
    kept.sort(key=lambda c: float(c.anomaly_score))  # type: ignore[arg-type]
    scores = tuple(float(c.anomaly_score) for c in kept)  # type: ignore[arg-type]
    return Estimate(station=station, rule=rule, scores=scores, result_ids=tuple(c.result_id for c in kept),
                    threshold=threshold_at_specificity(scores, specificity), specificity=specificity,
                    considered=considered, excluded=excluded, outlier_cut=cut, requested=first_n,
                    brain_age=estimate_age_bias(candidates, scoring, age_min_studies) if with_age else None)


@dataclass(frozen=True)
class CalibrationRun:
    """What `calibrate` did for one scanner group."""

    bundle_key: str
    estimate: Estimate
    created: SiteReferenceRow | None  # None: dry run, or unchanged
    unchanged_from: int | None = None  # the active reference already built from these studies


def calibrate(session: Any, bundle: Bundle, *, actor: str, grouping: str = "station", first_n: int | None = None,
              station: str | None = None, outlier_mads: float = 3.0, dry_run: bool = False,
              now: datetime | None = None, age_min_studies: int = AGE_BIAS_MIN_STUDIES) -> list[CalibrationRun]:
    """Estimate and store a site reference per scanner group of `bundle` (one group when
    `station` is given). A group whose active reference was built from the very same
    studies by the same rule, with the same brain-age bias, is left as it is."""
    from headscreen.db import api

    if grouping not in GROUPINGS:
        raise ValueError(f"grouping: one of {', '.join(GROUPINGS)}, got {grouping!r}")
    manifest = bundle.manifest
    scoring = scoring_identity(bundle)
    rows = api.calibration_candidates(session, manifest.name, manifest.version,
                                      confirmed_normal_only=first_n is None)
    groups: dict[str, list[CalibrationCandidate]] = {}
    for row in rows:
        groups.setdefault(group_key(row.station_key, grouping), []).append(row)
    if station is not None:
        groups = {station: groups.get(station, [])}
    runs = []
    for group, members in sorted(groups.items()):
        found = estimate(members, group, scoring, manifest.calibration.specificity, first_n=first_n,
                         outlier_mads=outlier_mads, with_age=bool(manifest.outputs.age),
                         age_min_studies=age_min_studies)
        if found is None:
            continue
        active = api.active_site_reference(session, manifest.name, manifest.version, scoring, grouping, group)
        if (active is not None and active.rule == found.rule and sorted(active.result_ids) == sorted(found.result_ids)
                and active.provenance.get("brain_age") == found.brain_age):
            runs.append(CalibrationRun(manifest.key, found, None, unchanged_from=active.reference_id))
            continue
        created = None
        if not dry_run:
            created = api.create_site_reference(session, api.NewSiteReference(
                bundle_name=manifest.name, bundle_version=manifest.version, scoring_sha256=scoring,
                grouping=grouping, station=group, rule=found.rule, scores=list(found.scores),
                threshold=found.threshold, specificity=found.specificity,
                provenance=found.provenance(grouping, bundle, outlier_mads), result_ids=list(found.result_ids),
            ), actor, now)
        runs.append(CalibrationRun(manifest.key, found, created))
    return runs


# --------------------------------------------------------------------------- console view

@dataclass(frozen=True)
class StationView:
    """The reference one bundle uses on one scanner group, for the console and the API."""

    bundle_key: str
    modality: str
    station: str
    grouping: str
    results: int
    scored: int
    confirmed_normal_scored: int  # what `calibrate` would take from this scanner now
    calibrating_results: int
    in_use: str  # "bundle", "site" or "calibrating"
    reference_id: int | None
    n: int
    threshold: float | None
    specificity: float
    provenance: dict[str, Any]
    created_at: datetime | None
    created_by: str | None
    needed: int | None  # more healthy references before a screen result (calibrating only)
    unused_site_reference: int | None = None  # mode "bundle": an active site reference not used


def station_views(bundles: Sequence[Bundle], counts: Sequence[Any], references: Sequence[SiteReferenceRow],
                  mode: str, min_references: int, grouping: str) -> list[StationView]:
    """Per configured bundle and scanner group seen in its results (or holding a site
    reference): the reference in use, decided as ReferencePolicy decides for a study."""
    views = []
    for bundle in bundles:
        manifest = bundle.manifest
        scoring = scoring_identity(bundle)
        active: dict[str, SiteReferenceRow] = {}
        for ref in sorted(references, key=lambda r: r.reference_id):
            if (ref.active and ref.bundle_name == manifest.name and ref.bundle_version == manifest.version
                    and ref.scoring_sha256 == scoring and ref.grouping == grouping):
                active[ref.station] = ref  # the newest wins
        tally: dict[str, list[int]] = {group: [0, 0, 0, 0] for group in active}
        for c in counts:
            if (c.bundle_name, c.bundle_version) == (manifest.name, manifest.version):
                totals = tally.setdefault(group_key(c.station_key, grouping), [0, 0, 0, 0])
                for i, value in enumerate((c.results, c.scored, c.confirmed_normal_scored, c.calibrating)):
                    totals[i] += value
        policy = ReferencePolicy(mode=mode, min_references=min_references, grouping=grouping,  # type: ignore[arg-type]
                                 lookup=lambda *key: active.get(key[-1]))  # noqa: B023 (used in this iteration only)
        for group, (results, scored, normal, calibrating) in sorted(tally.items()):
            # The group key is a station key of itself (a model key lacks the station part).
            chosen = policy.choose(bundle, group)
            site = active.get(group)
            common: dict[str, Any] = dict(
                bundle_key=manifest.key, modality=manifest.modality, station=group, grouping=grouping,
                results=results, scored=scored, confirmed_normal_scored=normal, calibrating_results=calibrating,
                in_use=chosen.kind)
            if isinstance(chosen, Calibrating):
                views.append(StationView(
                    **common, reference_id=None if site is None else site.reference_id, n=chosen.has,
                    threshold=None if site is None else site.threshold,
                    specificity=manifest.calibration.specificity,
                    provenance={} if site is None else dict(site.provenance),
                    created_at=None if site is None else site.created_at,
                    created_by=None if site is None else site.created_by,
                    needed=max(0, chosen.needed - chosen.has)))
            else:
                views.append(StationView(
                    **common, reference_id=chosen.reference_id, n=chosen.n, threshold=chosen.threshold,
                    specificity=chosen.specificity, provenance=dict(chosen.provenance), created_at=chosen.created_at,
                    created_by=None if site is None or chosen.source == "bundle" else site.created_by, needed=None,
                    unused_site_reference=(site.reference_id if site is not None and chosen.source == "bundle"
                                           else None)))
    return views
