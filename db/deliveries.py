"""Result deliveries: claim under a lease, delivered, failed with backoff, dead letter, resend."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, and_, bindparam, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from headscreen.db.engine import begin_write, is_postgres, write_transaction
from headscreen.db.models import Delivery, Result, ResultObject, Study
from headscreen.db.states import DeliveryState, ObjectKind
from headscreen.db.txn import add_audit, clock, locked
from headscreen.db.types import DeliveryTicket, RetryPolicy

logger = logging.getLogger(__name__)


def claim_deliveries(
    session: Session,
    now: datetime | None,
    limit: int,
    lease_s: float,
    destination: str | None = None,
    result_id: int | None = None,
    kind: ObjectKind | None = None,
) -> list[DeliveryTicket]:
    """Claim due deliveries (pending and due, or in flight with an expired lease) (commits).

    A rejection note (kind "kos") is due at a destination only once its own result is
    delivered there and nothing of the result it rejects is still on its way there: a PACS
    must hold the new result before the old one is hidden, and the old instances before
    their rejection arrives (an archive may refuse or ignore a note for unknown instances).
    """
    now = clock(now)
    begin_write(session)
    try:
        due = or_(
            and_(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now),
            and_(Delivery.state == DeliveryState.IN_FLIGHT, Delivery.lease_expires_at < now),
        )
        stmt = (
            select(Delivery.id)
            .join(ResultObject, ResultObject.id == Delivery.result_object_id)
            .join(Result, Result.id == ResultObject.result_id)
            .where(due, or_(ResultObject.kind != ObjectKind.KOS, _rejection_may_go()))
            .order_by(Delivery.next_attempt_at, Delivery.result_object_id, Delivery.id)
            .limit(limit)
        )
        if destination is not None:
            stmt = stmt.where(Delivery.destination == destination)
        if result_id is not None:
            stmt = stmt.where(ResultObject.result_id == result_id)
        if kind is not None:
            stmt = stmt.where(ResultObject.kind == kind)
        if is_postgres(session):
            stmt = stmt.with_for_update(skip_locked=True, of=Delivery, key_share=True)
        ids = session.execute(stmt).scalars().all()
        if not ids:
            session.commit()
            return []
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(
                state=DeliveryState.IN_FLIGHT,
                attempts=Delivery.attempts + 1,
                lease_expires_at=now + timedelta(seconds=lease_s),
            )
        )
        rows = session.execute(
            select(Delivery.id, Delivery.destination, Delivery.attempts, ResultObject)
            .join(ResultObject, ResultObject.id == Delivery.result_object_id)
            .where(Delivery.id.in_(ids))
            .order_by(Delivery.next_attempt_at, Delivery.result_object_id, Delivery.id)
        ).all()
        tickets = [
            DeliveryTicket(
                delivery_id=delivery_id,
                destination=dest,
                path=obj.path,
                sop_instance_uid=obj.sop_instance_uid,
                attempt=attempts,
                result_id=obj.result_id,
            )
            for delivery_id, dest, attempts, obj in rows
        ]
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return tickets


def _rejection_may_go():
    """For a claim joined to Delivery, ResultObject and Result: no other object of the same
    result is undelivered at this destination, and no SC, SEG or SR of the result it
    supersedes is pending or in flight there (delivered or dead: settled)."""
    other, other_object = aliased(Delivery), aliased(ResultObject)
    new_result_undelivered = exists().where(
        other_object.id == other.result_object_id,
        other_object.result_id == ResultObject.result_id,
        other_object.kind != ObjectKind.KOS,
        other.destination == Delivery.destination,
        other.state != DeliveryState.DELIVERED,
    )
    old, old_object = aliased(Delivery), aliased(ResultObject)
    old_result_open = exists().where(
        old_object.id == old.result_object_id,
        old_object.result_id == Result.supersedes_result_id,
        old_object.kind != ObjectKind.KOS,  # its own note waits on its own terms, not ours
        old.destination == Delivery.destination,
        old.state.in_((DeliveryState.PENDING, DeliveryState.IN_FLIGHT)),
    )
    return and_(~new_result_undelivered, ~old_result_open)


# Core, built once: this runs once per object sent, and the ORM's bulk-update path
# costs more than the statement.
_deliveries = cast(Table, Delivery.__table__)
_MARK_DELIVERED = (
    update(_deliveries)
    .where(_deliveries.c.id == bindparam("b_id"), _deliveries.c.state == DeliveryState.IN_FLIGHT)
    .values(state=DeliveryState.DELIVERED, delivered_at=bindparam("b_now", type_=_deliveries.c.delivered_at.type),
            last_status=bindparam("b_status", type_=_deliveries.c.last_status.type), last_error=None,
            lease_expires_at=None)
)


def mark_delivered(session: Session, delivery_id: int, status: int | None, now: datetime | None = None) -> bool:
    """In flight -> delivered (commits). False when the delivery was not in flight."""
    now = clock(now)
    begin_write(session)
    changed = session.connection().execute(
        _MARK_DELIVERED, {"b_id": delivery_id, "b_now": now, "b_status": status}).rowcount
    session.commit()
    if changed:
        logger.info("delivered", extra={"action": "delivered", "delivery_id": delivery_id, "status": status})
    else:
        logger.warning(
            "delivery was not in flight; left unchanged",
            extra={"action": "delivered_ignored", "delivery_id": delivery_id},
        )
    return changed == 1


def mark_delivery_failed(
    session: Session,
    delivery_id: int,
    error: str,
    status: int | None = None,
    policy: RetryPolicy | None = None,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> DeliveryState:
    """A failed send (commits): pending again after backoff, or dead after policy.max_attempts.

    A delivery that is not in flight is left unchanged and its state returned.
    """
    if isinstance(status, RetryPolicy):
        raise TypeError("status: expected an int DICOM status or None, got a RetryPolicy (pass policy=...)")
    now = clock(now)
    policy = policy or RetryPolicy()
    begin_write(session)
    try:
        delivery = session.execute(locked(select(Delivery).where(Delivery.id == delivery_id))).scalar_one()
        state: DeliveryState = delivery.state
        if state != DeliveryState.IN_FLIGHT:
            session.rollback()
            return state
        delivery.last_error = error
        delivery.last_status = status
        delivery.lease_expires_at = None
        if delivery.attempts >= policy.max_attempts:
            delivery.state = DeliveryState.DEAD
        else:
            delivery.state = DeliveryState.PENDING
            delivery.next_attempt_at = now + timedelta(seconds=policy.delay(delivery.attempts, rng))
        state = delivery.state
        attempts = delivery.attempts
        session.commit()
    except BaseException:
        session.rollback()
        raise
    logger.warning(
        "delivery failed",
        extra={"action": "delivery_failed", "delivery_id": delivery_id, "state": str(state), "attempts": attempts},
    )
    return state


def resend_dead(
    session: Session,
    actor: str,
    study_instance_uid: str | None = None,
    delivery_ids: Sequence[int] | None = None,
    now: datetime | None = None,
) -> int:
    """Dead deliveries -> pending with attempts reset (commits, audited). No filter: all dead."""
    now = clock(now)
    with write_transaction(session):
        stmt = (
            select(Delivery, Result.study_id)
            .join(ResultObject, ResultObject.id == Delivery.result_object_id)
            .join(Result, Result.id == ResultObject.result_id)
            .where(Delivery.state == DeliveryState.DEAD)
        )
        if study_instance_uid is not None:
            stmt = stmt.join(Study, Study.id == Result.study_id).where(Study.study_instance_uid == study_instance_uid)
        if delivery_ids is not None:
            stmt = stmt.where(Delivery.id.in_(list(delivery_ids)))
        rows = session.execute(locked(stmt, of=Delivery)).all()
        by_study: dict[int, list[int]] = defaultdict(list)
        for delivery, study_id in rows:
            delivery.state = DeliveryState.PENDING
            delivery.attempts = 0
            delivery.next_attempt_at = now
            by_study[study_id].append(delivery.id)
        for study_id, ids in by_study.items():
            add_audit(session, actor, "resend_dead", now, study_id, {"delivery_ids": sorted(ids)})
    logger.info("dead deliveries re-sent", extra={"action": "resend_dead", "actor": actor, "deliveries": len(rows)})
    return len(rows)
