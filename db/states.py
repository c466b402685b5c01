"""State Enums for studies, jobs and deliveries (stored as their string values)."""

from __future__ import annotations

from enum import StrEnum


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"

    @property
    def is_active(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


class DeliveryState(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    DEAD = "dead"


class ObjectKind(StrEnum):
    SC = "sc"
    SR = "sr"
    SEG = "seg"
    PM = "pm"  # a Parametric Map of the anomaly map (parametric_map_enabled)
    KOS = "kos"  # an IOCM rejection note: lists the instances of the result it supersedes


class ReferenceKind(StrEnum):
    """Which healthy reference judged an eligible result (daemon.reference)."""

    BUNDLE = "bundle"  # the bundle's own, from synthetic phantoms
    SITE = "site"  # estimated from this scanner's healthy studies
    CALIBRATING = "calibrating"  # none yet for this scanner: score recorded, no screen result
