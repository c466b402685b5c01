"""Several processes and threads on one database: no double claims, no deadlocks,
consistent state. On SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db_factories import (
    BUNDLES,
    add_series,
    at,
    claim_all_in_process,
    outcome,
    record,
    uid,
    upgrade_in_process,
    write_once_in_process,
)
from headscreen.db import api
from headscreen.db.migrate import current_revision, head_revision
from headscreen.db.models import Instance, Job, Result, Series, Study
from headscreen.db.states import JobState, StudyState
from headscreen.db.types import RetryPolicy

LATER_S = 10**6


def test_worker_processes_never_claim_the_same_job(db_url: str, db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        for n in range(40):
            add_series(session, uid(), 1, now=at(n))
        assert len(api.sweep_completeness(session, at(5000), 300, 30, BUNDLES)) == 40
    context = multiprocessing.get_context("spawn")
    processes = 3
    start = context.Barrier(processes)
    out = context.Queue()
    children = [
        context.Process(target=claim_all_in_process, args=(db_url, f"p{n}", 6000, start, out))
        for n in range(processes)
    ]
    for child in children:
        child.start()
    claimed = [job_id for _ in children for job_id in out.get(timeout=60)]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert len(claimed) == 40 and len(set(claimed)) == 40


def test_mixed_load_keeps_state_consistent(db_sessions: sessionmaker[Session]) -> None:
    """Receivers (with late arrivals), a sweeper and workers hammer a few studies at once."""
    studies = [uid() for _ in range(4)]
    series = {s: [uid(), uid()] for s in studies}
    receivers_done = threading.Event()
    errors: list[BaseException] = []
    policy = RetryPolicy(max_attempts=3, base_delay_s=0, max_delay_s=0, jitter=0)

    def guarded(body):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            try:
                body(*args)
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)
                raise
        return run

    @guarded
    def receiver(seed: int) -> None:
        rng = random.Random(seed)
        with db_sessions() as session:
            for n in range(30):
                study = rng.choice(studies)
                rec = record(study, rng.choice(series[study]), n + 1, float(seed * 100 + n), modality="CT")
                api.record_instance(session, rec, now=at(n))

    @guarded
    def sweeper() -> None:
        with db_sessions() as session:
            while not receivers_done.is_set():
                api.sweep_completeness(session, at(LATER_S), 0, 0, BUNDLES)
                api.requeue_expired(session, at(LATER_S))

    @guarded
    def worker(name: str) -> None:
        rng = random.Random(name)
        with db_sessions() as session:
            while True:
                ticket = api.claim_job(session, name, 10**7, at(LATER_S))
                if ticket is None:
                    if receivers_done.is_set():
                        return
                    continue
                api.heartbeat(session, ticket.job_id, name, 10**7, at(LATER_S))
                if rng.random() < 0.2:
                    api.fail_job(session, ticket.job_id, name, "flaky", True, at(LATER_S), policy)
                else:
                    api.finish_job(session, ticket.job_id, name, outcome(), ["PACS"], now=at(LATER_S))

    with ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(worker, f"w{n}") for n in range(2)]
        sweep = pool.submit(sweeper)
        receivers = [pool.submit(receiver, seed) for seed in range(3)]
        for future in receivers:
            future.result()
        receivers_done.set()
        sweep.result()
        for future in workers:
            future.result()
    assert errors == []

    with db_sessions() as session:
        api.sweep_completeness(session, at(LATER_S), 0, 0, BUNDLES)
        while (ticket := api.claim_job(session, "drain", 60, at(LATER_S))) is not None:
            api.finish_job(session, ticket.job_id, "drain", outcome(), ["PACS"], now=at(LATER_S))
        assert_consistent(session)


def assert_consistent(session: Session) -> None:
    assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 90
    per_series = dict(
        session.execute(select(Instance.series_id, func.count()).group_by(Instance.series_id)).all()
    )
    assert dict(session.execute(select(Series.id, Series.instance_count)).all()) == per_series
    for study in session.execute(select(Study)).scalars():
        assert study.state == StudyState.COMPLETE
        jobs = session.execute(select(Job).where(Job.study_id == study.id)).scalars().all()
        current = [j for j in jobs if j.generation == study.generation and j.state != JobState.SUPERSEDED]
        assert current, "the latest generation has a job"
        assert all(j.state in (JobState.DONE, JobState.FAILED) for j in current)
        assert not [j for j in jobs if j.state in (JobState.QUEUED, JobState.RUNNING)]
        live_results = session.execute(
            select(Result.bundle_name).where(Result.study_id == study.id, Result.superseded.is_(False))
        ).scalars().all()
        assert max(Counter(live_results).values(), default=0) <= 1


def test_processes_upgrading_one_database_take_turns(empty_db_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    processes = 3
    start = context.Barrier(processes)
    out = context.Queue()
    children = [context.Process(target=upgrade_in_process, args=(empty_db_url, start, out)) for _ in range(processes)]
    for child in children:
        child.start()
    outcomes = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert outcomes == ["ok"] * processes
    assert current_revision(empty_db_url) == head_revision()


def test_processes_opening_a_fresh_sqlite_file_together(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Switching a new file to WAL raises "database is locked" without waiting when
    several processes open it at once; the engine retries it."""
    context = multiprocessing.get_context("fork")  # cheap: many rounds to hit the window
    outcomes = []
    for round_no in range(15):
        url = f"sqlite:///{tmp_path / f'r{round_no}' / 'hs.sqlite'}"
        start = context.Barrier(6)
        out = context.Queue()
        children = [context.Process(target=write_once_in_process, args=(url, start, out)) for _ in range(6)]
        for child in children:
            child.start()
        outcomes += [out.get(timeout=60) for _ in children]
        for child in children:
            child.join(timeout=60)
    assert set(outcomes) == {"wal"}
