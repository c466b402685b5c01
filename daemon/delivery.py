"""Sending result objects to the configured destinations, once each.

The database says what is due (`db.api.claim_deliveries` leases it); this
module only does the network I/O and reports each outcome back through `db.api`,
which owns the retry counters, backoff and dead-letter state.

Each C-STORE outcome is committed as soon as its response arrives, before the
next file goes out: a crash mid-delivery can then only re-send the one object
whose response was in flight (see docs/conformance.md, "Delivery guarantee").

A rejection note (IHE IOCM KOS, kind "kos") is claimed only once its new result is
delivered to that destination (db.deliveries); a round that delivered something claims
once more for notes that became due, so a note follows its result in the same call.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.blobstore import BlobStore, Scratch, open_store
from headscreen.daemon.config import DestinationConfig, Settings
from headscreen.db import api
from headscreen.db.states import ObjectKind
from headscreen.errors import TransientError
from headscreen.export.delivery import Destination, send, send_stow

log = logging.getLogger(__name__)

# C-STORE statuses a destination may answer that still mean "stored".
_STORED = {0x0000, 0xB000, 0xB007, 0xB006}

# (status or None, error text or None): error None means delivered.
Outcome = tuple[int | None, str | None]


@dataclass(frozen=True)
class DeliveryStats:
    delivered: int = 0
    failed: int = 0


def retry_policy(settings: Settings) -> api.RetryPolicy:
    return api.RetryPolicy(
        max_attempts=settings.delivery.max_attempts,
        base_delay_s=settings.delivery.base_delay_s,
        max_delay_s=settings.delivery.max_delay_s,
    )


class _Recorder:
    """Commits each delivery's outcome to the database the moment it is known."""

    def __init__(self, sessions: sessionmaker[Session], policy: api.RetryPolicy) -> None:
        self.sessions = sessions
        self.policy = policy
        self.delivered = 0
        self.failed = 0
        self.recorded: set[int] = set()

    def __call__(self, ticket: api.DeliveryTicket, outcome: Outcome) -> None:
        if ticket.delivery_id in self.recorded:
            return
        status, error = outcome
        when = datetime.now(UTC)
        with self.sessions() as session:
            if error is None:
                api.mark_delivered(session, ticket.delivery_id, status, when)
                self.delivered += 1
            else:
                api.mark_delivery_failed(session, ticket.delivery_id, error, status, self.policy, when)
                self.failed += 1
        self.recorded.add(ticket.delivery_id)


def deliver_due(
    sessions: sessionmaker[Session], settings: Settings, result_id: int | None = None, limit: int = 500
) -> DeliveryStats:
    """Deliver what is due now (optionally only one result's objects)."""
    now = datetime.now(UTC)
    lease_s = settings.delivery.timeout_s * 4
    with sessions() as session:
        tickets = api.claim_deliveries(session, now, limit, lease_s, result_id=result_id)
    if not tickets:
        return DeliveryStats()
    record = _Recorder(sessions, retry_policy(settings))
    store = open_store(settings, sessions)
    _send_tickets(settings, store, tickets, record)
    if record.delivered:
        with sessions() as session:
            notes = api.claim_deliveries(session, datetime.now(UTC), limit, lease_s, result_id=result_id,
                                         kind=ObjectKind.KOS)
        _send_tickets(settings, store, notes, record)
    log.info("delivery round", extra={"action": "deliver", "delivered": record.delivered, "failed": record.failed})
    return DeliveryStats(record.delivered, record.failed)


def _send_tickets(settings: Settings, store: BlobStore, tickets: list[api.DeliveryTicket],
                  record: _Recorder) -> None:
    by_destination: dict[str, list[api.DeliveryTicket]] = defaultdict(list)
    for ticket in tickets:
        by_destination[ticket.destination].append(ticket)
    destinations = {d.name: d for d in settings.destinations}
    for name, group in by_destination.items():
        config = destinations.get(name)
        if config is None:
            for ticket in group:
                record(ticket, (None, f"destination {name!r} is no longer configured"))
        else:
            with Scratch(settings.storage_dir, "delivery") as scratch:
                _send_group(settings, config, store, scratch, group, record)


def _outcome(status: int | None) -> Outcome:
    if status in _STORED:
        return status, None
    return status, "no response" if status is None else f"C-STORE status 0x{status:04X}"


def _send_group(
    settings: Settings,
    destination: DestinationConfig,
    store: BlobStore,
    scratch: Scratch,
    group: list[api.DeliveryTicket],
    record: Callable[[api.DeliveryTicket, Outcome], None],
) -> None:
    try:
        # The files as the backend keeps them (a local copy of a result another machine stored).
        found = store.available([t.path for t in group], scratch)
    except TransientError as exc:
        found, missing = {}, str(exc)
    else:
        missing = f"result object missing from {store.where}; storage not reachable?"
    by_path = {found[t.path]: t for t in group if t.path in found}
    for ticket in group:
        if ticket.path not in found:  # a failed attempt: retried, then dead-lettered, as a refused send
            log.warning("result object unreadable", extra={"destination": destination.name,
                                                           "delivery_id": ticket.delivery_id, "error": missing})
            record(ticket, (None, missing))
    if not by_path:
        return
    paths = list(by_path)
    timeout = settings.delivery.timeout_s

    def on_status(path: Path, status: int) -> None:
        ticket = by_path.get(Path(path))
        if ticket is not None:
            record(ticket, _outcome(status))

    try:
        if destination.kind == "stow":
            assert destination.url is not None  # the config validator guarantees it
            statuses = send_stow(destination.url, paths, timeout, destination.authorization or None)
        else:
            peer = Destination(destination.name, destination.ae_title or "", destination.host or "",
                               destination.port or 0,
                               tls=destination.tls)
            statuses = send(peer, paths, calling_ae=settings.ae_title, timeout=timeout, on_status=on_status)
    except TransientError as exc:
        log.warning("destination unreachable", extra={"destination": destination.name, "error": str(exc)})
        for ticket in group:
            record(ticket, (None, str(exc)))
        return
    # Whatever on_status did not record yet (STOW-RS answers once; files with no response).
    for path, ticket in by_path.items():
        record(ticket, _outcome(statuses.get(path)))
