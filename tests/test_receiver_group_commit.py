"""The receiver's group commit on a real SQLite database with dcmtk storescu peers."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from headscreen.daemon.callers import AllowedCaller
from headscreen.daemon.receiver import Receiver, ReceiverConfig, start_receiver
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import Instance, Series
from receiver_helpers import write_ct_series

SCU_AE = "GCSCU"
SCP_AE = "HEADSCREEN"


@pytest.fixture
def receiver_and_url(tmp_path: Path) -> Iterator[tuple[Receiver, str]]:
    storage = tmp_path / "store"
    url = f"sqlite:///{storage / 'headscreen.db'}"
    storage.mkdir()
    upgrade(url)
    engine = make_engine(url)
    config = ReceiverConfig(ae_title=SCP_AE, storage_dir=storage, bind_address="127.0.0.1", port=0,
                            allowed_callers=[AllowedCaller(SCU_AE)], disk_min_free_mb=0)
    receiver = start_receiver(config, session_factory(engine))
    try:
        yield receiver, url
    finally:
        receiver.shutdown()
        engine.dispose()


def storescu(port: int, paths: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(["storescu", "-R", "-aet", SCU_AE, "-aec", SCP_AE, "127.0.0.1", str(port),
                             *map(str, paths)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rows(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            instances = session.scalar(select(func.count()).select_from(Instance))
            counted = session.scalar(select(func.sum(Series.instance_count)))
            return int(instances or 0), int(counted or 0)
    finally:
        engine.dispose()


def test_a_lone_association_commits_each_row_at_once(receiver_and_url: tuple[Receiver, str],
                                                     tmp_path: Path) -> None:
    receiver, url = receiver_and_url
    paths = write_ct_series(tmp_path / "ct", 10, seed=3)
    process = storescu(receiver.port, paths)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    stats = receiver.stats.snapshot()
    # Nothing else is queued, so no row waits for company: one commit per row.
    assert stats["stored"] == stats["row_commits"] == 10
    assert rows(url) == (10, 10)


def test_concurrent_associations_share_commits_and_lose_nothing(receiver_and_url: tuple[Receiver, str],
                                                                tmp_path: Path) -> None:
    receiver, url = receiver_and_url
    series = [write_ct_series(tmp_path / f"ct{i}", 15, seed=40 + i) for i in range(4)]
    processes = [storescu(receiver.port, paths) for paths in series]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    stats = receiver.stats.snapshot()
    assert stats["stored"] == 60 and stats["refused"] == {}
    assert 1 <= stats["row_commits"] <= 60
    assert rows(url) == (60, 60)
