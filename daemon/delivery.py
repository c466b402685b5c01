"""Sending result objects to the configured destinations, once each.

The database says what is due (`db.api.claim_deliveries` leases it); this
module only does the network I/O and reports each outcome back through `db.api`,
which owns the retry counters, backoff and dead-letter state.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from daemon.config import DestinationConfig, Settings
from daemon.errors import TransientError
from db import api
from export.delivery import Destination, send, send_stow

log = logging.getLogger(__name__)

# C-STORE statuses a destination may answer that still mean "stored".
_STORED = {0x0000, 0xB000, 0xB007, 0xB006}


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
    by_destination: dict[str, list[api.DeliveryTicket]] = defaultdict(list)
    for ticket in tickets:
        by_destination[ticket.destination].append(ticket)
    destinations = {d.name: d for d in settings.destinations}
    delivered = failed = 0
    policy = retry_policy(settings)
    for name, group in by_destination.items():
        config = destinations.get(name)
        if config is None:
            outcomes = {t.delivery_id: (None, f"destination {name!r} is no longer configured") for t in group}
        else:
            outcomes = _send_group(settings, config, group)
        with sessions() as session:
            for ticket in group:
                status, error = outcomes[ticket.delivery_id]
                when = datetime.now(UTC)
                if error is None:
                    api.mark_delivered(session, ticket.delivery_id, status, when)
                    delivered += 1
                else:
                    api.mark_delivery_failed(session, ticket.delivery_id, error, status, policy, when)
                    failed += 1
    log.info("delivery round", extra={"action": "deliver", "delivered": delivered, "failed": failed})
    return DeliveryStats(delivered, failed)


def _send_group(
    settings: Settings, destination: DestinationConfig, group: list[api.DeliveryTicket]
) -> dict[int, tuple[int | None, str | None]]:
    paths = [settings.storage_dir / t.path for t in group]
    timeout = settings.delivery.timeout_s
    try:
        if destination.kind == "stow":
            assert destination.url is not None  # the config validator guarantees it
            statuses = send_stow(destination.url, paths, timeout, destination.authorization or None)
        else:
            peer = Destination(destination.name, destination.ae_title or "", destination.host or "", destination.port or 0)
            statuses = send(peer, paths, calling_ae=settings.ae_title, timeout=timeout)
    except TransientError as exc:
        log.warning("destination unreachable", extra={"destination": destination.name, "error": str(exc)})
        return {t.delivery_id: (None, str(exc)) for t in group}
    outcomes: dict[int, tuple[int | None, str | None]] = {}
    for ticket, path in zip(group, paths):
        status = statuses.get(Path(path))
        if status in _STORED:
            outcomes[ticket.delivery_id] = (status, None)
        else:
            text = "no response" if status is None else f"C-STORE status 0x{status:04X}"
            outcomes[ticket.delivery_id] = (status, text)
    return outcomes
