"""The only functions that change the state of studies, jobs, results and deliveries.

Every function takes a Session first and commits its own transaction (a transaction
the caller left open is committed first). They are safe with several processes on
one database: SQLite write transactions are BEGIN IMMEDIATE (serialised, with a busy
timeout); on PostgreSQL rows are locked FOR NO KEY UPDATE, and queue claims skip
rows other workers hold (SKIP LOCKED). Timestamps are timezone-aware UTC; `now`
defaults to the current time so tests can pass a fixed clock.

The functions live in one module per concern and are re-exported here, with the
dataclasses they take and return, so callers need only `from db import api`.
"""

from db.calibration import (
    active_site_reference,
    calibration_candidates,
    create_site_reference,
    list_site_references,
    retire_site_reference,
    station_counts,
)
from db.deliveries import claim_deliveries, mark_delivered, mark_delivery_failed, resend_dead
from db.housekeeping import counts, get_result_objects, mark_purged, retention_candidates, study_instances
from db.ingest import record_instance, record_instances, record_rejection, recorded_instance_paths
from db.jobs import claim_job, current_results, fail_job, finish_job, heartbeat, requeue_expired
from db.console import QueueHealth, audit_trail, failures, metrics_snapshot, overview, queue_health, score_distributions, training_manifest
from db.review import audit, count_studies, get_study, list_studies, requeue_study, set_flag, set_review
from db.shadow import (
    bundle_scores,
    change_bundle_roles,
    list_bundle_roles,
    rebind_job,
    record_shadow_result,
    shadow_results_of_study,
)
from db.sweep import sweep_completeness
from db.users import create_user, list_users, login, logout, resolve_session, set_password
from db.txn import DEFAULT_JOB_MAX_ATTEMPTS, SYSTEM_ACTOR, utcnow
from db.types import (
    BundleRef,
    BundleRoleRow,
    BundleScoreRow,
    CalibrationCandidate,
    CurrentResult,
    DeliverySummary,
    DeliveryTicket,
    InstanceRecord,
    JobOutcome,
    JobSummary,
    JobTicket,
    NewSiteReference,
    OutputObject,
    RecordOutcome,
    ReferenceNotFound,
    RejectionNote,
    ResultSummaryRow,
    RetryPolicy,
    RoleChange,
    RoleConflict,
    SeriesSummary,
    ShadowOutcome,
    ShadowResultRow,
    SiteReferenceRow,
    StationCounts,
    StudyDetail,
    StudyFilters,
    StudyNotFound,
    StudyRow,
)

__all__ = [
    "DEFAULT_JOB_MAX_ATTEMPTS",
    "SYSTEM_ACTOR",
    "BundleRef",
    "BundleRoleRow",
    "BundleScoreRow",
    "RoleChange",
    "RoleConflict",
    "ShadowOutcome",
    "ShadowResultRow",
    "bundle_scores",
    "change_bundle_roles",
    "list_bundle_roles",
    "rebind_job",
    "record_shadow_result",
    "shadow_results_of_study",
    "CalibrationCandidate",
    "NewSiteReference",
    "QueueHealth",
    "ReferenceNotFound",
    "SiteReferenceRow",
    "StationCounts",
    "active_site_reference",
    "calibration_candidates",
    "create_site_reference",
    "list_site_references",
    "retire_site_reference",
    "station_counts",
    "CurrentResult",
    "DeliverySummary",
    "DeliveryTicket",
    "InstanceRecord",
    "JobOutcome",
    "JobSummary",
    "JobTicket",
    "OutputObject",
    "RecordOutcome",
    "RejectionNote",
    "ResultSummaryRow",
    "RetryPolicy",
    "SeriesSummary",
    "StudyDetail",
    "StudyFilters",
    "StudyNotFound",
    "StudyRow",
    "audit",
    "audit_trail",
    "count_studies",
    "create_user",
    "failures",
    "list_users",
    "login",
    "logout",
    "metrics_snapshot",
    "overview",
    "queue_health",
    "resolve_session",
    "score_distributions",
    "set_password",
    "training_manifest",
    "claim_deliveries",
    "claim_job",
    "counts",
    "current_results",
    "fail_job",
    "finish_job",
    "get_result_objects",
    "get_study",
    "heartbeat",
    "list_studies",
    "mark_delivered",
    "mark_delivery_failed",
    "mark_purged",
    "record_instance",
    "record_instances",
    "record_rejection",
    "recorded_instance_paths",
    "requeue_expired",
    "requeue_study",
    "resend_dead",
    "retention_candidates",
    "set_flag",
    "set_review",
    "study_instances",
    "sweep_completeness",
    "utcnow",
]
