"""Shadow bundles: which configured bundle is active for a modality (its results go to the
PACS), which run in shadow (they score the same studies; recorded, never sent), role
changes (put in shadow, promote, retire; audited by db.shadow), and how an active and a
shadow bundle compare on the studies both scored.

Roles live in the database, so the scheduler and every worker read them per sweep or
per job: a promotion applies to the next job claimed, without a restart. Which bundles
exist is the configuration's (`bundles`): a new bundle needs a restart to be loaded,
as any configuration change does.

With no role recorded for a modality, every configured bundle of it is active, as it
was before roles existed (normally one per modality), and none is in shadow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from headscreen.db.shadow import recorded_role
from headscreen.db.types import BundleRef, BundleRoleRow, BundleScoreRow, RoleChange, RoleConflict
from headscreen.errors import HeadscreenError

log = logging.getLogger(__name__)

UNASSIGNED = "unassigned"  # configured, no role while another bundle is the recorded active one: not run
OldActive = Literal["shadow", "retired"]


class BundleNotConfigured(HeadscreenError):
    """No configured bundle has the given key."""


def configured_refs(paths: Sequence[Path]) -> list[BundleRef]:
    """The configured bundles (verified) with their modality and manifest sha256."""
    from headscreen.bundle import load_bundle
    from headscreen.daemon.reference import scoring_identity

    refs = []
    for path in paths:
        bundle = load_bundle(Path(path))
        m = bundle.manifest
        refs.append(BundleRef(m.name, m.version, m.modality, scoring_identity(bundle)))
    return refs


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class BundleState:
    """What one configured bundle does now."""

    bundle: BundleRef
    role: str  # "active", "shadow", "retired" or UNASSIGNED
    recorded: BundleRoleRow | None  # the row for its name and version, even one of another manifest
    default: bool = False  # active only because no active bundle is recorded for its modality

    @property
    def recorded_role(self) -> str | None:
        """The recorded role, None when none is recorded for this manifest."""
        return recorded_role(self.recorded, self.bundle)

    @property
    def stale(self) -> bool:
        """A role was recorded for another manifest of this name and version."""
        return self.recorded is not None and self.recorded_role is None


@dataclass(frozen=True)
class RolePlan:
    states: list[BundleState]
    recorded: list[BundleRoleRow] = field(default_factory=list)

    @property
    def active(self) -> list[BundleRef]:
        return [s.bundle for s in self.states if s.role == "active"]

    def active_for(self, modality: str) -> list[BundleRef]:
        return [b for b in self.active if b.modality == modality]

    def shadows_for(self, modality: str) -> list[BundleRef]:
        return [s.bundle for s in self.states if s.role == "shadow" and s.bundle.modality == modality]

    @property
    def modalities(self) -> list[str]:
        return sorted({s.bundle.modality for s in self.states} | {r.modality for r in self.recorded})

    def state_of(self, key: str) -> BundleState | None:
        return next((s for s in self.states if s.bundle.key == key), None)

    def is_active(self, name: str, version: str) -> bool:
        return any((b.name, b.version) == (name, version) for b in self.active)

    def modality_of(self, name: str, version: str) -> str | None:
        for s in self.states:
            if (s.bundle.name, s.bundle.version) == (name, version):
                return s.bundle.modality
        return next((r.modality for r in self.recorded if (r.bundle_name, r.bundle_version) == (name, version)), None)

    def recorded_active(self, modality: str) -> list[BundleRoleRow]:
        """Rows that say active for the modality, whether or not that bundle is configured."""
        return [r for r in self.recorded if r.modality == modality and r.role == "active"]


def resolve_roles(configured: Sequence[BundleRef], recorded: Sequence[BundleRoleRow]) -> RolePlan:
    """What each configured bundle does, from the roles recorded for it.

    A bundle's recorded role counts only for the manifest it was recorded for. The
    modality's active bundle is the configured one recorded active; when there is none,
    every configured bundle of the modality without a role is active (the behaviour
    before roles); when there is one, those are unassigned and not run.
    """
    rows = {(r.bundle_name, r.bundle_version): r for r in recorded}
    states: list[BundleState] = []
    for modality in sorted({b.modality for b in configured}):
        mine = [b for b in configured if b.modality == modality]
        roles = {b: recorded_role(rows.get((b.name, b.version)), b) for b in mine}
        has_active = any(role == "active" for role in roles.values())
        for b in mine:
            row = rows.get((b.name, b.version))
            role = roles[b]
            if role is None:
                states.append(BundleState(b, UNASSIGNED if has_active else "active", row, default=not has_active))
            else:
                states.append(BundleState(b, role, row))
            if row is not None and role is None:
                log.warning("bundle role recorded for another manifest; not used",
                            extra={"bundle": b.key, "recorded_role": str(row.role)})
    return RolePlan(states, list(recorded))


def current_plan(session: Any, configured: Sequence[BundleRef]) -> RolePlan:
    from headscreen.db import api

    return resolve_roles(configured, api.list_bundle_roles(session))


# --------------------------------------------------------------------------- role changes

def _state(plan: RolePlan, key: str) -> BundleState:
    state = plan.state_of(key)
    if state is None:
        raise BundleNotConfigured(f"no configured bundle is called {key!r} (configured: "
                                  f"{', '.join(s.bundle.key for s in plan.states) or 'none'})")
    return state


def put_in_shadow(session: Any, configured: Sequence[BundleRef], key: str, actor: str, reason: str,
                  now: datetime | None = None) -> list[BundleRoleRow]:
    """Run `key` in shadow of its modality's active bundle (audited). With no active bundle
    recorded yet, the one active by default is recorded as active in the same change."""
    from headscreen.db import api

    plan = current_plan(session, configured)
    state = _state(plan, key)
    if state.role == "shadow":
        return []
    modality = state.bundle.modality
    if state.role == "active" and not state.default:
        raise RoleConflict(f"{key} is the active {modality} bundle: promote another bundle to replace it")
    changes = [RoleChange(state.bundle, "shadow", state.recorded_role)]
    if not any(s.role == "active" and not s.default for s in plan.states if s.bundle.modality == modality):
        keep = [b for b in plan.active_for(modality) if b.key != key]
        if not keep:
            raise RoleConflict(f"{key} is the only {modality} bundle that would be active: configure the "
                               "bundle that should stay active, or promote one")
        changes.append(RoleChange(keep[0], "active", None))
    return api.change_bundle_roles(session, changes, actor, reason, "bundle_shadowed", now)


def promote(session: Any, configured: Sequence[BundleRef], key: str, actor: str, reason: str,
            old_active: OldActive = "shadow", now: datetime | None = None) -> list[BundleRoleRow]:
    """Make the shadow bundle `key` its modality's active bundle; the active one becomes
    `old_active` ("shadow" or "retired"). One audited change; jobs claimed afterwards use it."""
    from headscreen.db import api

    if old_active not in ("shadow", "retired"):
        raise ValueError(f"old_active: 'shadow' or 'retired', got {old_active!r}")
    plan = current_plan(session, configured)
    state = _state(plan, key)
    if state.role != "shadow":
        raise RoleConflict(f"{key} is {state.role}, not in shadow: run it in shadow first "
                           f"(headscreen bundles --shadow {key}) and compare")
    modality = state.bundle.modality
    changes = [RoleChange(b, old_active, plan.state_of(b.key).recorded_role)  # type: ignore[union-attr]
               for b in plan.active_for(modality)]
    configured_keys = {s.bundle.key for s in plan.states}
    # An active role recorded for a bundle no longer configured is demoted too.
    changes += [RoleChange(BundleRef(r.bundle_name, r.bundle_version, r.modality, r.manifest_sha256), old_active,
                           "active") for r in plan.recorded_active(modality) if r.key not in configured_keys]
    changes.append(RoleChange(state.bundle, "active", "shadow"))
    return api.change_bundle_roles(session, changes, actor, reason, "bundle_promoted", now)


def retire(session: Any, configured: Sequence[BundleRef], key: str, actor: str, reason: str,
           now: datetime | None = None) -> list[BundleRoleRow]:
    """Stop running a shadow (or unassigned) bundle (audited); the active one is replaced by promoting."""
    from headscreen.db import api

    plan = current_plan(session, configured)
    state = _state(plan, key)
    if state.role == "retired":
        return []
    if state.role == "active":
        raise RoleConflict(f"{key} is the active {state.bundle.modality} bundle: promote another bundle "
                           "and retire this one in the same step")
    return api.change_bundle_roles(session, [RoleChange(state.bundle, "retired", state.recorded_role)], actor,
                                   reason, "bundle_retired", now)


# --------------------------------------------------------------------------- comparison

MAX_DISAGREEMENTS = 500


@dataclass(frozen=True)
class Disagreement:
    """A study the two bundles judged differently (UIDs and numbers only)."""

    study_instance_uid: str
    kind: str  # "screen": one positive, one negative; "eligibility": one scored, one not
    active_positive: bool | None
    shadow_positive: bool | None
    active_score: float | None
    shadow_score: float | None
    active_percentile: float | None
    shadow_percentile: float | None


@dataclass(frozen=True)
class Comparison:
    """An active and a shadow bundle of one modality on the studies both judged."""

    modality: str
    active: str
    shadow: str
    studies_both: int  # studies with a verdict of each (failed shadow runs left out)
    scored_both: int  # both eligible with a finite score
    with_verdict_both: int  # both gave a screen result
    both_positive: int
    both_negative: int
    active_only_positive: int
    shadow_only_positive: int
    eligibility_disagree: int
    shadow_failed: int  # shadow runs that failed on studies the active bundle screened
    spearman: float | None
    spearman_p: float | None
    active_positive_share: float | None  # positives / screen results, on the studies both judged
    shadow_positive_share: float | None
    disagreements: list[Disagreement]
    # Brain age on the studies confirmed normal that both bundles gave one for (with a
    # chronological age): what an age correction or refit is there to improve. Mean
    # absolute and mean signed gap (reported - chronological), years; None without such studies.
    age_studies: int = 0
    active_age_mae: float | None = None
    shadow_age_mae: float | None = None
    active_age_gap: float | None = None
    shadow_age_gap: float | None = None

    @property
    def disagree(self) -> int:
        return self.active_only_positive + self.shadow_only_positive


def _newest(rows: Sequence[BundleScoreRow], key: str) -> dict[int, BundleScoreRow]:
    out: dict[int, BundleScoreRow] = {}
    for row in sorted((r for r in rows if r.bundle_key == key), key=lambda r: (r.created_at, r.row_id)):
        out[row.study_id] = row
    return out


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def spearman(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, float | None]:
    """Spearman's rank correlation and its p-value; None with fewer than 3 pairs or a constant side."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None, None
    from scipy.stats import spearmanr

    rho, p = spearmanr(a, b)
    return (float(rho), float(p)) if math.isfinite(rho) else (None, None)


def compare(modality: str, active: str, shadow: str, rows: Sequence[BundleScoreRow]) -> Comparison:
    """`active` against `shadow` (bundle keys) on the studies both judged: the newest
    current verdict of each per study, whether it was sent or recorded in shadow."""
    mine, theirs = _newest(rows, active), _newest(rows, shadow)
    failed = sum(1 for s in mine if s in theirs and theirs[s].failed)
    both = sorted((s for s in mine if s in theirs and not theirs[s].failed),
                  key=lambda s: mine[s].created_at)
    counts = dict(pp=0, nn=0, pn=0, np=0, elig=0)
    scores_a: list[float] = []
    scores_b: list[float] = []
    positives_a = positives_b = verdicts_a = verdicts_b = 0
    disagreements: list[Disagreement] = []
    gaps_a: list[float] = []
    gaps_b: list[float] = []
    for study in both:
        a, b = mine[study], theirs[study]
        if a.confirmed_normal and all(_finite(v) for v in (a.predicted_age, b.predicted_age, a.chronological_age)):
            gaps_a.append(float(a.predicted_age) - float(a.chronological_age))  # type: ignore[arg-type]
            gaps_b.append(float(b.predicted_age) - float(a.chronological_age))  # type: ignore[arg-type]
        if bool(a.eligible) != bool(b.eligible):
            counts["elig"] += 1
            disagreements.append(_disagreement(a, b, "eligibility"))
        if a.eligible and b.eligible and _finite(a.anomaly_score) and _finite(b.anomaly_score):
            scores_a.append(float(a.anomaly_score))  # type: ignore[arg-type]
            scores_b.append(float(b.anomaly_score))  # type: ignore[arg-type]
        if a.screen_positive is not None:
            verdicts_a += 1
            positives_a += bool(a.screen_positive)
        if b.screen_positive is not None:
            verdicts_b += 1
            positives_b += bool(b.screen_positive)
        if a.screen_positive is None or b.screen_positive is None:
            continue
        key = ("p" if a.screen_positive else "n") + ("p" if b.screen_positive else "n")
        counts[key] += 1
        if a.screen_positive != b.screen_positive:
            disagreements.append(_disagreement(a, b, "screen"))
    rho, p = spearman(scores_a, scores_b)
    disagreements.sort(key=lambda d: d.kind != "screen")
    return Comparison(
        modality=modality, active=active, shadow=shadow, studies_both=len(both), scored_both=len(scores_a),
        with_verdict_both=counts["pp"] + counts["nn"] + counts["pn"] + counts["np"], both_positive=counts["pp"],
        both_negative=counts["nn"], active_only_positive=counts["pn"], shadow_only_positive=counts["np"],
        eligibility_disagree=counts["elig"], shadow_failed=failed, spearman=rho, spearman_p=p,
        active_positive_share=positives_a / verdicts_a if verdicts_a else None,
        shadow_positive_share=positives_b / verdicts_b if verdicts_b else None,
        disagreements=disagreements[:MAX_DISAGREEMENTS], age_studies=len(gaps_a),
        active_age_mae=_mean([abs(g) for g in gaps_a]), shadow_age_mae=_mean([abs(g) for g in gaps_b]),
        active_age_gap=_mean(gaps_a), shadow_age_gap=_mean(gaps_b),
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _disagreement(a: BundleScoreRow, b: BundleScoreRow, kind: str) -> Disagreement:
    return Disagreement(study_instance_uid=a.study_instance_uid, kind=kind, active_positive=a.screen_positive,
                        shadow_positive=b.screen_positive, active_score=a.anomaly_score, shadow_score=b.anomaly_score,
                        active_percentile=a.percentile, shadow_percentile=b.percentile)


def comparisons(session: Any, plan: RolePlan) -> list[Comparison]:
    """Each modality's active bundle against each of its shadow bundles (read-only)."""
    from headscreen.db import api

    pairs = [(m, a.key, s.key) for m in plan.modalities for a in plan.active_for(m) for s in plan.shadows_for(m)]
    if not pairs:
        return []
    keys = {k for _, a, s in pairs for k in (a, s)}
    wanted = [(s.bundle.name, s.bundle.version) for s in plan.states if s.bundle.key in keys]
    rows = api.bundle_scores(session, wanted)
    return [compare(m, a, s, rows) for m, a, s in pairs]
