"""An in-process Worker on a real database, with the model and the pipeline stood in for:
what the worker does around `run_job` (lease, heartbeat, finish, fail, deliver, logs)
is tested without ONNX or imaging."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

import daemon.worker
from daemon.config import Settings, load_settings
from daemon.worker import Worker
from db import api
from db_factories import CT_BUNDLE, complete_study

RunJob = Callable[..., Any]


def worker_settings(tmp_path: Path, database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "storage_dir": str(tmp_path / "storage"), "database_url": database_url, "allow_any_caller": True,
        "environment": "development", "heartbeat_s": 0.02, "lease_s": 30.0, "web": {"port": 0},
    }
    values.update(overrides)
    return load_settings(None, **values)


def fake_runner() -> SimpleNamespace:
    manifest = SimpleNamespace(name=CT_BUNDLE.name, version=CT_BUNDLE.version, modality="CT", key="ct-fake")
    return SimpleNamespace(bundle=SimpleNamespace(manifest=manifest))


def make_worker(monkeypatch: pytest.MonkeyPatch, settings: Settings, sessions: sessionmaker[Session],
                run_job: RunJob, worker_id: str = "test-worker") -> Worker:
    """A Worker whose only bundle is a stand-in CT runner, and whose pipeline is `run_job`."""
    runners = {(CT_BUNDLE.name, CT_BUNDLE.version): fake_runner()}
    monkeypatch.setattr(daemon.worker, "load_runners", lambda _settings: runners)
    monkeypatch.setattr(daemon.worker, "run_job", run_job)
    return Worker(settings, sessions, worker_id=worker_id)


def queued_ct_study(session: Session) -> tuple[str, int]:
    """A completed CT study whose job is claimable now; returns (study uid, study id)."""
    return complete_study(session, now=api.utcnow() - timedelta(hours=2))
