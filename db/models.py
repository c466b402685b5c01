"""SQLAlchemy 2.0 models. Timestamps are timezone-aware UTC; states are string Enums.

Only `db.api` functions change rows; other packages read through it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from headscreen.db.states import DeliveryState, JobState, ObjectKind, ReferenceKind, StudyState
from headscreen.figures import FIGURES

# Stable constraint names so migrations and models compare equal on every dialect.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes as UTC; SQLite loses the offset, so it is restored on read."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; pass a timezone-aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def state_enum(enum_cls: type[StrEnum], name: str, create_constraint: bool = True) -> sa.Enum:
    """A portable string Enum column type: VARCHAR plus a CHECK constraint of the values."""
    return sa.Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=create_constraint,
        length=16,
        values_callable=lambda cls: [member.value for member in cls],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON(), list[Any]: sa.JSON()}


class Study(Base):
    __tablename__ = "studies"
    # Index-backed sorts and filters for the admin console's study list.
    __table_args__ = (
        sa.Index("ix_studies_last_received", "last_received_at", "id"),
        sa.Index("ix_studies_first_received", "first_received_at", "id"),
        sa.Index("ix_studies_station", "station_name", "last_received_at"),
        sa.Index("ix_studies_modality", "modality", "last_received_at"),
        # The console finds a study as the hospital names it.
        sa.Index("ix_studies_accession_number", "accession_number"),
        sa.Index("ix_studies_patient_id", "patient_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(sa.String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(sa.String(16))
    state: Mapped[StudyState] = mapped_column(state_enum(StudyState, "study_state"), index=True)
    generation: Mapped[int] = mapped_column(default=1)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]
    # When an association that stored instances of it last ended in an A-RELEASE (db.sweep).
    released_at: Mapped[datetime | None]
    study_date: Mapped[str | None] = mapped_column(sa.String(8))
    patient_age: Mapped[str | None] = mapped_column(sa.String(4))
    patient_birth_date: Mapped[str | None] = mapped_column(sa.String(8))
    station_name: Mapped[str | None] = mapped_column(sa.String(64))
    institution: Mapped[str | None] = mapped_column(sa.String(64))
    calling_ae: Mapped[str | None] = mapped_column(sa.String(16))
    # Patient data: shown in the authenticated console only, never logged.
    accession_number: Mapped[str | None] = mapped_column(sa.String(64))
    patient_id: Mapped[str | None] = mapped_column(sa.String(64))
    flagged: Mapped[bool] = mapped_column(default=False)
    flag_comment: Mapped[str | None] = mapped_column(sa.Text)
    reviewed: Mapped[bool] = mapped_column(default=False)
    confirmed_normal: Mapped[bool] = mapped_column(default=False)

    series: Mapped[list[Series]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(sa.String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(sa.String(16))
    series_number: Mapped[int | None]
    series_description: Mapped[str | None] = mapped_column(sa.String(64))
    instance_count: Mapped[int] = mapped_column(default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(sa.ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(sa.String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(sa.String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(sa.String(64))
    path: Mapped[str] = mapped_column(sa.String(512))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    instance_number: Mapped[int | None]
    slice_position: Mapped[float | None] = mapped_column(sa.Float)
    images_in_acquisition: Mapped[int | None]
    number_of_frames: Mapped[int | None]
    received_at: Mapped[datetime]
    generation: Mapped[int]

    series: Mapped[Series] = relationship(back_populates="instances")


class IngestRejection(Base):
    __tablename__ = "ingest_rejections"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    calling_ae: Mapped[str | None] = mapped_column(sa.String(16))
    sop_instance_uid: Mapped[str | None] = mapped_column(sa.String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[int]
    reason: Mapped[str] = mapped_column(sa.Text)


# Job priorities: lower is claimed first. Live studies come before archive re-screening.
LIVE_PRIORITY = 0
RESCREEN_PRIORITY = 100


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (sa.Index("ix_jobs_claim", "state", "priority", "available_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    bundle_name: Mapped[str] = mapped_column(sa.String(64))
    bundle_version: Mapped[str] = mapped_column(sa.String(32))
    generation: Mapped[int]
    state: Mapped[JobState] = mapped_column(state_enum(JobState, "job_state"))
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int]
    lease_owner: Mapped[str | None] = mapped_column(sa.String(128))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    available_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    priority: Mapped[int] = mapped_column(default=LIVE_PRIORITY, server_default=sa.text("0"))
    # Set when the job screens a study retrieved by `headscreen rescreen` (its run decides delivery).
    rescreen_run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("rescreen_runs.id"))

    study: Mapped[Study] = relationship(back_populates="jobs")


class RescreenRunState(StrEnum):
    RUNNING = "running"  # a `headscreen rescreen` process works on it (or was killed: resume it)
    STOPPED = "stopped"  # stopped by Ctrl-C / SIGTERM; resumable
    FINISHED = "finished"  # every study skipped, screened or failed


class RescreenItemState(StrEnum):
    PENDING = "pending"  # found by the query, not retrieved yet
    RETRIEVING = "retrieving"  # C-MOVE / WADO-RS under way (or cut short: retrieved again on resume)
    QUEUED = "queued"  # retrieved (or already here) and its jobs queued at RESCREEN_PRIORITY
    DONE = "done"  # its jobs finished: results recorded
    SKIPPED = "skipped"  # already screened by the same bundle (name, version, manifest sha256)
    FAILED = "failed"  # the retrieve or a job failed; `detail` says why


class RescreenRun(Base):
    """One archive re-screening (`headscreen rescreen`): its query and how it is run."""

    __tablename__ = "rescreen_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(sa.String(64))  # the node's name in `destinations`
    source_kind: Mapped[str] = mapped_column(sa.String(16))  # "dimse" or "dicomweb"
    since: Mapped[str] = mapped_column(sa.String(8))  # StudyDate range, YYYYMMDD, inclusive
    until: Mapped[str] = mapped_column(sa.String(8))
    modality: Mapped[str | None] = mapped_column(sa.String(16))
    record_only: Mapped[bool] = mapped_column(default=False)
    per_hour: Mapped[float | None] = mapped_column(sa.Float)  # retrieves started per hour; None: no limit
    max_in_flight: Mapped[int]  # studies retrieved but not yet screened, at most
    state: Mapped[RescreenRunState] = mapped_column(state_enum(RescreenRunState, "rescreen_run_state"))
    created_by: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]

    items: Mapped[list[RescreenItem]] = relationship(back_populates="run")


class RescreenItem(Base):
    """One study a re-screening run found, and how far it got."""

    __tablename__ = "rescreen_items"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "study_instance_uid"),
        # The sweep asks whether a study it completes was retrieved by a run.
        sa.Index("ix_rescreen_items_study", "study_instance_uid", "state"),
        sa.Index("ix_rescreen_items_run_state", "run_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("rescreen_runs.id"))
    study_instance_uid: Mapped[str] = mapped_column(sa.String(64))
    modalities: Mapped[str | None] = mapped_column(sa.String(64))  # ModalitiesInStudy, backslash-separated
    study_date: Mapped[str | None] = mapped_column(sa.String(8))
    state: Mapped[RescreenItemState] = mapped_column(state_enum(RescreenItemState, "rescreen_item_state"))
    detail: Mapped[str | None] = mapped_column(sa.Text)
    updated_at: Mapped[datetime]

    run: Mapped[RescreenRun] = relationship(back_populates="items")


class Result(Base):
    """A job's result. Its figure columns (eligible .. selected_series_uid) hold one
    `headscreen.figures.ResultFigures`; they are read and written by `RESULT_FIGURES` alone."""

    __tablename__ = "results"
    __table_args__ = (
        sa.Index("ix_results_current", "study_id", "superseded", "id"),
        sa.Index("ix_results_station", "bundle_name", "bundle_version", "station_key", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id"), unique=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    bundle_name: Mapped[str] = mapped_column(sa.String(64))
    bundle_version: Mapped[str] = mapped_column(sa.String(32))
    eligible: Mapped[bool]
    ineligible_reason: Mapped[str | None] = mapped_column(sa.Text)
    anomaly_score: Mapped[float | None] = mapped_column(sa.Float)
    percentile: Mapped[float | None] = mapped_column(sa.Float)
    screen_positive: Mapped[bool | None]
    threshold: Mapped[float | None] = mapped_column(sa.Float)
    predicted_age: Mapped[float | None] = mapped_column(sa.Float)
    chronological_age: Mapped[float | None] = mapped_column(sa.Float)
    age_gap: Mapped[float | None] = mapped_column(sa.Float)
    age_offset: Mapped[float | None] = mapped_column(sa.Float)  # headscreen.figures.ResultFigures
    # Denormalised from qc_reasons/eligible so the admin filter is plain SQL on both dialects.
    qc_failed: Mapped[bool] = mapped_column(default=False)
    qc_reasons: Mapped[list[Any]]
    qc_metrics: Mapped[dict[str, Any]]
    selected_series_uid: Mapped[str | None] = mapped_column(sa.String(64))
    series_verdicts: Mapped[list[Any]]
    timings: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    supersedes_result_id: Mapped[int | None] = mapped_column(sa.ForeignKey("results.id"))
    superseded: Mapped[bool] = mapped_column(default=False)
    # Site calibration: the scanner the series came from ("MANUFACTURER|MODEL|STATION"),
    # the sha256 of the bundle manifest that scored it (scores of one manifest compare),
    # and the healthy reference the percentile and screen result were judged against.
    station_key: Mapped[str | None] = mapped_column(sa.String(200))
    scoring_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    # No CHECK constraint: SQLite cannot add one to a populated table without copying it.
    reference_kind: Mapped[ReferenceKind | None] = mapped_column(
        state_enum(ReferenceKind, "reference_kind", create_constraint=False))
    reference_id: Mapped[int | None] = mapped_column(sa.ForeignKey("site_references.id"))

    objects: Mapped[list[ResultObject]] = relationship(back_populates="result")


class SiteReference(Base):
    """A healthy reference distribution and threshold estimated from this site's own studies,
    for one bundle manifest and one scanner group. Never deleted: retired, with who and why."""

    __tablename__ = "site_references"
    __table_args__ = (sa.Index("ix_site_references_lookup", "bundle_name", "bundle_version", "station", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    bundle_name: Mapped[str] = mapped_column(sa.String(64))
    bundle_version: Mapped[str] = mapped_column(sa.String(32))
    scoring_sha256: Mapped[str] = mapped_column(sa.String(64))
    grouping: Mapped[str] = mapped_column(sa.String(16))
    station: Mapped[str] = mapped_column(sa.String(200))
    rule: Mapped[str] = mapped_column(sa.String(32))
    scores: Mapped[list[Any]]
    n: Mapped[int]
    threshold: Mapped[float] = mapped_column(sa.Float)
    specificity: Mapped[float] = mapped_column(sa.Float)
    provenance: Mapped[dict[str, Any]]
    result_ids: Mapped[list[Any]]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(sa.String(64))
    retired_at: Mapped[datetime | None]
    retired_by: Mapped[str | None] = mapped_column(sa.String(64))
    retire_reason: Mapped[str | None] = mapped_column(sa.Text)


class BundleRoleKind(StrEnum):
    """What a configured bundle does for its modality (daemon.shadow resolves the plan)."""

    ACTIVE = "active"  # its results are sent to the PACS; one per modality
    SHADOW = "shadow"  # scores the same studies beside the active one; recorded only, never sent
    RETIRED = "retired"  # not run


class BundleRole(Base):
    """The role recorded for one bundle (name + version) and the manifest it was recorded for.
    Changed in place; every change is an audit event (who, when, why, from, to)."""

    __tablename__ = "bundle_roles"
    __table_args__ = (
        sa.UniqueConstraint("bundle_name", "bundle_version"),
        # At most one active bundle per modality, whatever races the console and the CLI run.
        sa.Index("ix_bundle_roles_one_active", "modality", unique=True,
                 sqlite_where=sa.text("role = 'active'"), postgresql_where=sa.text("role = 'active'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    bundle_name: Mapped[str] = mapped_column(sa.String(64))
    bundle_version: Mapped[str] = mapped_column(sa.String(32))
    modality: Mapped[str] = mapped_column(sa.String(16))
    manifest_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    role: Mapped[BundleRoleKind] = mapped_column(state_enum(BundleRoleKind, "bundle_role"))
    changed_at: Mapped[datetime]
    changed_by: Mapped[str] = mapped_column(sa.String(64))
    reason: Mapped[str | None] = mapped_column(sa.Text)


class ShadowResult(Base):
    """What a shadow bundle made of a study the active bundle screened: recorded, never sent
    (no DICOM object, no delivery). `error` is set when the shadow run itself failed."""

    __tablename__ = "shadow_results"
    __table_args__ = (
        sa.UniqueConstraint("result_id", "bundle_name", "bundle_version"),
        sa.Index("ix_shadow_results_bundle", "bundle_name", "bundle_version", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # The active result this shadow run sat beside (same study, same generation).
    result_id: Mapped[int] = mapped_column(sa.ForeignKey("results.id"))
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    bundle_name: Mapped[str] = mapped_column(sa.String(64))
    bundle_version: Mapped[str] = mapped_column(sa.String(32))
    scoring_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    eligible: Mapped[bool | None]
    ineligible_reason: Mapped[str | None] = mapped_column(sa.Text)
    anomaly_score: Mapped[float | None] = mapped_column(sa.Float)
    percentile: Mapped[float | None] = mapped_column(sa.Float)
    screen_positive: Mapped[bool | None]
    threshold: Mapped[float | None] = mapped_column(sa.Float)
    predicted_age: Mapped[float | None] = mapped_column(sa.Float)
    chronological_age: Mapped[float | None] = mapped_column(sa.Float)
    age_gap: Mapped[float | None] = mapped_column(sa.Float)
    age_offset: Mapped[float | None] = mapped_column(sa.Float)  # headscreen.figures.ResultFigures
    terms: Mapped[dict[str, Any]]
    qc_reasons: Mapped[list[Any]]
    station_key: Mapped[str | None] = mapped_column(sa.String(200))
    reference_kind: Mapped[ReferenceKind | None] = mapped_column(
        state_enum(ReferenceKind, "reference_kind", create_constraint=False))
    reference_id: Mapped[int | None] = mapped_column(sa.ForeignKey("site_references.id"))
    shared_preprocessing: Mapped[bool] = mapped_column(default=False)
    timings: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime]


def stored_figures(model: type[Base]) -> tuple[str, ...]:
    """The result figures (`headscreen.figures.FIGURES`) that `model`'s table has a column for."""
    columns = set(model.__table__.columns.keys())
    return tuple(name for name in FIGURES if name in columns)


# What `headscreen.figures.figures_of` copies between a record and a row, both ways. A shadow
# run keeps no QC metrics and no selected series (its active result has them).
RESULT_FIGURES = stored_figures(Result)
SHADOW_FIGURES = stored_figures(ShadowResult)


class ResultObject(Base):
    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(sa.ForeignKey("results.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(sa.String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(sa.String(64))
    kind: Mapped[ObjectKind] = mapped_column(state_enum(ObjectKind, "object_kind"))
    path: Mapped[str] = mapped_column(sa.String(512))

    result: Mapped[Result] = relationship(back_populates="objects")


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        sa.UniqueConstraint("result_object_id", "destination"),
        sa.Index("ix_deliveries_claim", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    result_object_id: Mapped[int] = mapped_column(sa.ForeignKey("result_objects.id"))
    destination: Mapped[str] = mapped_column(sa.String(64))
    state: Mapped[DeliveryState] = mapped_column(state_enum(DeliveryState, "delivery_state"))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime]
    lease_expires_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    last_status: Mapped[int | None]
    delivered_at: Mapped[datetime | None]


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(sa.String(64))
    action: Mapped[str] = mapped_column(sa.String(64))
    study_id: Mapped[int | None] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    detail: Mapped[dict[str, Any]]


class UserRole(StrEnum):
    VIEWER = "viewer"
    ADMIN = "admin"


class User(Base):
    """A local console user; the password is stored only as a scrypt hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(64), unique=True)
    role: Mapped[UserRole] = mapped_column(state_enum(UserRole, "user_role"))
    password_hash: Mapped[str] = mapped_column(sa.String(256))
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime]
    last_login_at: Mapped[datetime | None]


class WebSession(Base):
    """A console login: only the sha256 of the cookie token is stored."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


class StorageIdentity(Base):
    """The identity of the storage root the instances are in (one row, id 1): the UUID
    `serve` wrote to `<storage_dir>/.headscreen-storage-id`. A worker whose storage_dir
    holds another marker, or none, is not on the receiver's storage and takes no jobs
    (daemon/storage_probe.py)."""

    __tablename__ = "storage_identity"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    storage_id: Mapped[str] = mapped_column(sa.String(36))
    created_at: Mapped[datetime]


class StoredBlob(Base):
    """Instance and result bytes when `storage_backend = "postgresql"` (daemon/blobstore.py),
    keyed by the path an instance or result object row records (relative to the storage
    root), so every machine reads them through the database alone. `kind` is "instance" or
    "result"; the study UID lets a retention purge delete a study's instances at once."""

    __tablename__ = "stored_blobs"

    key: Mapped[str] = mapped_column(sa.String(512), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    study_instance_uid: Mapped[str] = mapped_column(sa.String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    stored_at: Mapped[datetime]
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)
