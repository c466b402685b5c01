"""What every request handler needs, built once and held by the app (no globals)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from fastapi import HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from db.types import BundleRef

STUDY_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass
class WebContext:
    settings: Settings
    sessions: sessionmaker[Session]
    bundles: list[BundleRef]
    started_monotonic: float = field(default_factory=time.monotonic)

    @property
    def session_lifetime(self) -> timedelta:
        return timedelta(hours=self.settings.web.session_hours)

    @contextmanager
    def db(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session


def context_of(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.context
    return ctx


def checked_uid(study_uid: str) -> str:
    """Study UIDs are dotted digits (at most 64); anything else is refused before any query."""
    if len(study_uid) > 64 or not STUDY_UID.match(study_uid):
        raise HTTPException(status_code=404, detail="no such study")
    return study_uid
