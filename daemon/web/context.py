"""What every request handler needs, built once and held by the app (no globals)."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from headscreen.bundle import Bundle, load_bundle
from headscreen.daemon.config import Settings
from headscreen.daemon.web.searches import SearchHandles
from headscreen.daemon.web.throttle import LoginThrottle
from headscreen.db.types import BundleRef
from headscreen.errors import HeadscreenError

if TYPE_CHECKING:
    from headscreen.daemon.web.health import ServeRuntime

logger = logging.getLogger(__name__)

STUDY_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
BUNDLE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,96}$")


@dataclass
class WebContext:
    settings: Settings
    sessions: sessionmaker[Session]
    bundles: list[BundleRef]
    # What `headscreen serve` runs beside the console; None when the console runs alone.
    runtime: ServeRuntime | None = None
    started_monotonic: float = field(default_factory=time.monotonic)
    _loaded: list[Bundle] | None = None
    login_throttle: LoginThrottle = field(init=False)
    login_csrf_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    searches: SearchHandles = field(default_factory=SearchHandles)

    def __post_init__(self) -> None:
        self.login_throttle = LoginThrottle(self.settings.web)

    @property
    def session_lifetime(self) -> timedelta:
        return timedelta(hours=self.settings.web.session_hours)

    def loaded_bundles(self) -> list[Bundle]:
        """The configured bundles that load and verify (read once, cached)."""
        if self._loaded is None:
            loaded = []
            for path in self.settings.bundles:
                try:
                    loaded.append(load_bundle(Path(path)))
                except HeadscreenError:
                    logger.warning("bundle unreadable for the console", extra={"bundle": str(path)})
            self._loaded = loaded
        return self._loaded

    def preprocessing_of(self, name: str, version: str) -> dict[str, Any] | None:
        """The preprocessing parameters in a configured bundle's manifest."""
        for bundle in self.loaded_bundles():
            if (bundle.manifest.name, bundle.manifest.version) == (name, version):
                return dict(bundle.manifest.preprocessing)
        return None

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


def checked_bundle_key(key: str) -> str:
    """Bundle keys are NAME-VERSION of plain characters; anything else is refused before any query."""
    if not BUNDLE_KEY.match(key):
        raise HTTPException(status_code=404, detail="no configured bundle with that key")
    return key
