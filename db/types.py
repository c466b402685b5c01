"""Plain frozen dataclasses that cross the `db.api` boundary (no ORM objects leak out)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from headscreen.errors import HeadscreenError
from headscreen.figures import ResultFigures


class StudyNotFound(HeadscreenError):
    """No study with the given Study Instance UID."""


@dataclass(frozen=True)
class InstanceRecord:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None
    slice_position: float | None = None
    images_in_acquisition: int | None = None
    number_of_frames: int | None = None
    study_date: str | None = None
    patient_age: str | None = None
    patient_birth_date: str | None = None
    station_name: str | None = None
    institution: str | None = None
    calling_ae: str | None = None
    accession_number: str | None = None  # patient data: never logged
    patient_id: str | None = None  # patient data: never logged


@dataclass(frozen=True)
class RecordOutcome:
    created: bool
    study_reopened: bool
    study_id: int


@dataclass(frozen=True)
class BundleRef:
    name: str
    version: str
    modality: str  # "CT" or "MR"
    # sha256 of the bundle's manifest.json (daemon.reference.scoring_identity); None when unknown.
    manifest_sha256: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class JobTicket:
    job_id: int
    study_id: int
    study_instance_uid: str
    bundle_name: str
    bundle_version: str
    generation: int
    attempt: int


@dataclass(frozen=True)
class OutputObject:
    sop_instance_uid: str
    sop_class_uid: str
    kind: str  # "sc" | "sr" | "seg" | "pm" | "kos"
    path: str


@dataclass(frozen=True)
class CurrentResult:
    """A result a new one of the same study and bundle would supersede (`db.api.current_results`)."""

    result_id: int
    objects: list[OutputObject]  # its SC, SEG and SR (never its own rejection note)
    destinations: list[str]  # where those objects were to be delivered


@dataclass(frozen=True)
class RejectionNote:
    """An IHE IOCM rejection note (KOS) a new result carries for the results it supersedes.
    `finish_job` records it only when `rejects_result_ids` are exactly the results it
    supersedes, and delivers it to those of `destinations` the old results were sent to."""

    object: OutputObject
    rejects_result_ids: tuple[int, ...]
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class JobOutcome(ResultFigures):
    """What a job found (its figures, as its SR reports them) and what it made."""

    series_verdicts: list[dict[str, Any]]
    timings: dict[str, float]
    objects: list[OutputObject]
    # Site calibration (daemon.reference): the scanner, the manifest that scored the
    # study, and the reference that judged it ("bundle", "site" or "calibrating").
    station_key: str | None = None
    scoring_sha256: str | None = None
    reference_kind: str | None = None
    reference_id: int | None = None

    def __post_init__(self) -> None:
        if self.eligible is None:
            raise ValueError("JobOutcome: argument 'eligible' is required")


@dataclass(frozen=True)
class DeliveryTicket:
    delivery_id: int
    destination: str
    path: str
    sop_instance_uid: str
    attempt: int
    result_id: int


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay_s: float = 2.0
    max_delay_s: float = 300.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("base_delay_s must be >= 0 and <= max_delay_s")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based): exponential, capped, jittered."""
        rng = rng or random.Random()
        exponent = max(attempt - 1, 0)
        raw = self.base_delay_s * (2.0 ** min(exponent, 62))
        capped = min(raw, self.max_delay_s)
        return capped * (1.0 + rng.uniform(-self.jitter, self.jitter))


STUDY_SORTS = ("received", "first_received", "percentile", "score", "age_gap", "station", "modality")


@dataclass(frozen=True)
class StudyFilters:
    state: str | None = None
    modality: str | None = None
    outliers_only: bool = False
    qc_failed_only: bool = False
    flagged: bool | None = None
    min_percentile: float | None = None
    limit: int = 100
    offset: int = 0
    # Admin console filters (all optional; ranges are inclusive).
    max_percentile: float | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None
    screen_positive: bool | None = None
    min_age_gap: float | None = None
    max_age_gap: float | None = None
    qc_reason: str | None = None  # substring of any QC reason
    station: str | None = None
    reviewed: bool | None = None
    needs_review: bool = False  # QC failure, screen-positive or flagged, not yet reviewed
    eligible: bool | None = None  # the current result's eligibility (False: a blocking QC failure)
    # Accession number, patient ID or Study Instance UID: exact, or the start of one.
    search: str | None = None
    sort: str = "received"  # one of STUDY_SORTS
    descending: bool = True

    def __post_init__(self) -> None:
        if self.sort not in STUDY_SORTS:
            raise ValueError(f"sort: one of {', '.join(STUDY_SORTS)}")
        if not 1 <= self.limit <= 1000:
            raise ValueError("limit: 1..1000")
        if self.offset < 0:
            raise ValueError("offset: >= 0")


@dataclass(frozen=True)
class StudyRow(ResultFigures):
    """A study with the figures of its latest current result (all None without one)."""

    study_id: int
    study_instance_uid: str
    modality: str | None
    state: str
    generation: int
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    jobs: dict[str, int]  # job state -> count
    flagged: bool
    flag_comment: str | None
    result_id: int | None = None
    bundle_name: str | None = None
    bundle_version: str | None = None
    station_name: str | None = None
    reviewed: bool = False
    confirmed_normal: bool = False
    qc_failed: bool = False
    # How the hospital names the study (patient data: the authenticated console only).
    accession_number: str | None = None
    patient_id: str | None = None
    study_date: str | None = None  # YYYYMMDD as received


@dataclass(frozen=True)
class SeriesSummary:
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_count: int


@dataclass(frozen=True)
class JobSummary:
    job_id: int
    bundle_name: str
    bundle_version: str
    generation: int
    state: str
    attempts: int
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class ResultSummaryRow(ResultFigures):
    """One recorded result of a study: its figures and its bookkeeping."""

    result_id: int
    job_id: int
    bundle_name: str
    bundle_version: str
    series_verdicts: list[dict[str, Any]]
    timings: dict[str, float]
    created_at: datetime
    superseded: bool
    supersedes_result_id: int | None
    station_key: str | None = None
    reference_kind: str | None = None
    reference_id: int | None = None


@dataclass(frozen=True)
class DeliverySummary:
    delivery_id: int
    result_id: int
    sop_instance_uid: str
    kind: str
    destination: str
    state: str
    attempts: int
    last_error: str | None
    last_status: int | None
    delivered_at: datetime | None


@dataclass(frozen=True)
class StudyDetail:
    row: StudyRow
    study_date: str | None
    patient_age: str | None
    station_name: str | None
    institution: str | None
    calling_ae: str | None
    reviewed: bool
    confirmed_normal: bool
    series: list[SeriesSummary]
    jobs: list[JobSummary]
    results: list[ResultSummaryRow]
    deliveries: list[DeliverySummary]


class ReferenceNotFound(HeadscreenError):
    """No active site reference with the given id."""


@dataclass(frozen=True)
class NewSiteReference:
    """A site reference to store (`db.api.create_site_reference`); `scores` sorted."""

    bundle_name: str
    bundle_version: str
    scoring_sha256: str
    grouping: str  # "station" | "model"
    station: str
    rule: str  # "confirmed_normal" | "first_n_robust"
    scores: list[float]
    threshold: float
    specificity: float
    provenance: dict[str, Any]
    result_ids: list[int]

    def __post_init__(self) -> None:
        if self.grouping not in ("station", "model"):
            raise ValueError("grouping: 'station' or 'model'")
        if self.rule not in ("confirmed_normal", "first_n_robust"):
            raise ValueError("rule: 'confirmed_normal' or 'first_n_robust'")
        if not self.scores:
            raise ValueError("scores: at least one healthy score")
        if list(self.scores) != sorted(self.scores):
            raise ValueError("scores: must be sorted")
        if not 0.0 < self.specificity < 1.0:
            raise ValueError("specificity: in (0, 1)")
        if not self.station:
            raise ValueError("station: must not be empty")


@dataclass(frozen=True)
class SiteReferenceRow:
    reference_id: int
    bundle_name: str
    bundle_version: str
    scoring_sha256: str
    grouping: str
    station: str
    rule: str
    scores: list[float]
    n: int
    threshold: float
    specificity: float
    provenance: dict[str, Any]
    result_ids: list[int]
    created_at: datetime
    created_by: str
    retired_at: datetime | None
    retired_by: str | None
    retire_reason: str | None

    @property
    def bundle_key(self) -> str:
        return f"{self.bundle_name}-{self.bundle_version}"

    @property
    def active(self) -> bool:
        return self.retired_at is None


@dataclass(frozen=True)
class CalibrationCandidate:
    """One current result of a bundle, as calibration sees it (no patient values)."""

    result_id: int
    station_key: str
    eligible: bool
    anomaly_score: float | None
    scoring_sha256: str | None
    confirmed_normal: bool
    flagged: bool
    # Brain age as reported (after any site correction, age_offset) and from the header.
    predicted_age: float | None = None
    chronological_age: float | None = None
    age_offset: float | None = None


@dataclass(frozen=True)
class StationCounts:
    """Current results of one bundle from one scanner (full station key)."""

    bundle_name: str
    bundle_version: str
    station_key: str
    results: int
    scored: int  # eligible with a score
    confirmed_normal_scored: int
    calibrating: int


# --------------------------------------------------------------------------- shadow bundles

BUNDLE_ROLES = ("active", "shadow", "retired")


class RoleConflict(HeadscreenError):
    """A bundle role change that does not fit the roles recorded now (changed meanwhile,
    or it would leave a modality without an active bundle)."""


@dataclass(frozen=True)
class BundleRoleRow:
    """The role recorded for one bundle, with who set it, when and why."""

    bundle_name: str
    bundle_version: str
    modality: str
    manifest_sha256: str | None
    role: str  # one of BUNDLE_ROLES
    changed_at: datetime
    changed_by: str
    reason: str | None

    @property
    def key(self) -> str:
        return f"{self.bundle_name}-{self.bundle_version}"


@dataclass(frozen=True)
class RoleChange:
    """One bundle's role change (`db.api.change_bundle_roles`). `expected` is its role as the
    caller saw it (None: no role recorded for this manifest); a different one is a conflict."""

    bundle: BundleRef
    role: str
    expected: str | None

    def __post_init__(self) -> None:
        if self.role not in BUNDLE_ROLES:
            raise ValueError(f"role: one of {', '.join(BUNDLE_ROLES)}, got {self.role!r}")
        if self.expected is not None and self.expected not in BUNDLE_ROLES:
            raise ValueError(f"expected: one of {', '.join(BUNDLE_ROLES)} or None, got {self.expected!r}")


@dataclass(frozen=True)
class ShadowOutcome(ResultFigures):
    """What a shadow bundle made of a study (`db.api.record_shadow_result`); `error` set when
    the run itself failed (and `eligible` None). Never delivered: there are no objects."""

    bundle_name: str
    bundle_version: str
    scoring_sha256: str | None = None
    terms: dict[str, float] = field(default_factory=dict)
    station_key: str | None = None
    reference_kind: str | None = None
    reference_id: int | None = None
    shared_preprocessing: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class ShadowResultRow(ResultFigures):
    """One recorded shadow run; `eligible` None when the run failed."""

    shadow_result_id: int
    result_id: int
    bundle_name: str
    bundle_version: str
    reference_kind: str | None
    shared_preprocessing: bool
    timings: dict[str, float]
    error: str | None
    created_at: datetime

    @property
    def bundle_key(self) -> str:
        return f"{self.bundle_name}-{self.bundle_version}"


@dataclass(frozen=True)
class BundleScoreRow:
    """One bundle's current verdict on one study, sent ("result") or shadow ("shadow")."""

    study_id: int
    study_instance_uid: str
    bundle_name: str
    bundle_version: str
    source: str  # "result" | "shadow"
    row_id: int
    eligible: bool | None
    anomaly_score: float | None
    percentile: float | None
    screen_positive: bool | None
    failed: bool  # a shadow run that failed (no verdict)
    created_at: datetime
    # Brain age as reported (after any site correction) and from the header; whether an
    # admin confirmed the study normal (the comparison's brain-age error is on those only).
    predicted_age: float | None = None
    chronological_age: float | None = None
    confirmed_normal: bool = False

    @property
    def bundle_key(self) -> str:
        return f"{self.bundle_name}-{self.bundle_version}"
