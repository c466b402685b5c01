"""The worker's warm-up: one whole job per bundle on a synthetic study, so the first real
study pays no first-use cost; it records nothing, sends nothing and leaves no file."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

import headscreen.daemon.worker
from headscreen.daemon.worker import Worker
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import Result
from worker_helpers import worker_settings

CT_BUNDLE_DIR = Path(__file__).resolve().parents[1] / "models" / "ct-fanogan-compact-2.2.0"


def test_warm_up_builds_every_result_object_and_keeps_none(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'headscreen.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    settings = worker_settings(tmp_path, url, bundles=[str(CT_BUNDLE_DIR)])
    worker = Worker(settings, sessions)
    released = []
    monkeypatch.setattr(headscreen.daemon.worker, "release_template_sources", lambda: released.append(True))
    try:
        with caplog.at_level(logging.INFO, logger="headscreen"):
            worker.warm_up()
        with sessions() as session:
            results = session.scalar(select(func.count()).select_from(Result))
    finally:
        engine.dispose()
    assert results == 0
    warmed = [r for r in caplog.records if r.getMessage() == "warmed up"]
    assert [r.bundle for r in warmed] == ["ct-fanogan-compact-2.2.0"]  # type: ignore[attr-defined]
    # A head with a bleed: the overlays, the SEG and the SR were all built.
    assert warmed[0].objects == ["sc", "seg", "sr"]  # type: ignore[attr-defined]
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    # Its job's own lines are held back: no "job computed" for a study that is not one.
    assert not any("job" in r.getMessage() for r in caplog.records)
    assert logging.root.manager.disable == logging.NOTSET
    assert released == [True]
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "storage").exists() or not any((tmp_path / "storage").rglob("*.dcm"))
