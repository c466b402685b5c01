"""What a viewer may read of failure text: its category (the exception type or the
stage that failed), never the text, which may quote a data set. Admins read the
text as the database gives it (already scrubbed of DICOM values). Account events
(log-ins, failed log-ins, lockouts, users made or changed) are for admins only."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass, replace
from typing import Any, TypeVar

from headscreen.daemon.web.auth import Principal
from headscreen.db.console import AuditEntry

T = TypeVar("T")

ERROR_FIELDS = ("last_error", "error")
# Audit actions whose "reason" is failure text rather than words we or an admin chose.
FAILURE_REASON_ACTIONS = ("job_failed",)
GENERIC = "error"
# An exception class (two capitals at least: a lone capitalised word could be a name) or a
# snake_case stage name, ending the text or followed by ":" or " (".
_CLASS = re.compile(r"^([A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+)(?=$|:| \()")
_SNAKE = re.compile(r"^([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?=$|:| \()")
_STAGES = re.compile(r"^(load|selection|preprocess|preprocessing|registration|inference|qc|report|delivery)(?=$|:| \()")
# Fixed phrases our own code writes (jobs.requeue_expired, daemon.delivery).
_PHRASES = {"lease expired": "lease_expired", "C-STORE status": "cstore_status", "no response": "no_response",
            "destination": "destination_unconfigured"}


def error_category(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    for pattern in (_CLASS, _SNAKE, _STAGES):
        match = pattern.match(text)
        if match and len(match.group(1)) <= 48:
            return match.group(1)
    for phrase, category in _PHRASES.items():
        if text.startswith(phrase + " "):
            return category
    return GENERIC


def for_role(user: Principal, value: T) -> T:
    """`value` as `user` may read it: unchanged for admins; for viewers every error field
    (last_error, error, a failed job's audited reason) replaced by its category."""
    return value if user.is_admin else _redacted(value)


# Who logged in, from where, who failed and which accounts exist: account security.
ACCOUNT_ACTION_PREFIXES = ("login", "logout", "user_")


def _account_event(value: Any) -> bool:
    return isinstance(value, AuditEntry) and value.action.startswith(ACCOUNT_ACTION_PREFIXES)


def _redacted(value: Any) -> Any:
    if isinstance(value, list):
        return [_redacted(v) for v in value if not _account_event(v)]
    if isinstance(value, tuple):
        return tuple(_redacted(v) for v in value)
    if isinstance(value, AuditEntry):
        return replace(value, detail=_redacted_detail(value.action, value.detail))
    if is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in fields(value):
            if not f.init:
                continue
            current = getattr(value, f.name)
            if f.name in ERROR_FIELDS and isinstance(current, str):
                changes[f.name] = error_category(current)
            elif isinstance(current, (list, tuple)) or (is_dataclass(current) and not isinstance(current, type)):
                changes[f.name] = _redacted(current)
        return replace(value, **changes) if changes else value
    return value


def _redacted_detail(action: str, detail: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, item in detail.items():
        failure_text = key in ERROR_FIELDS or (key == "reason" and action in FAILURE_REASON_ACTIONS)
        out[key] = error_category(item) if failure_text and isinstance(item, str) else item
    return out
