"""Archive re-screening in the database (db.rescreen): jobs behind live studies, record-only
results, skipping what the same bundle screened, and the state a stopped run resumes from."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db_factories import BUNDLES, add_series, at, outcome, uid
from headscreen.db import api
from headscreen.db import rescreen as runs
from headscreen.db.models import RESCREEN_PRIORITY, Delivery, Job, RescreenItemState
from headscreen.db.rescreen import FoundStudy, RescreenQuery
from headscreen.db.states import JobState
from headscreen.db.types import BundleRef
from web_helpers import ADMIN, VIEWER, Console

QUERY = RescreenQuery("pacs", "dimse", "20250101", "20251231", "CT", record_only=False)


def _run_with(session: Session, study_uids: list[str], query: RescreenQuery = QUERY) -> tuple[int, dict[str, int]]:
    run_id = runs.create_run(session, query, None, 4, "test", now=at(0))
    assert runs.add_found(session, run_id, [FoundStudy(u, ("CT",), "20250105") for u in study_uids], now=at(0)) \
        == len(study_uids)
    items = {p.study_instance_uid: p.item_id for p in runs.next_pending(session, run_id, 100)}
    return run_id, items


def _retrieving(session: Session, item_id: int) -> None:
    assert runs.mark_item(session, item_id, RescreenItemState.RETRIEVING, expect=RescreenItemState.PENDING)


def test_a_retrieved_study_waits_behind_a_live_one_queued_after_it(db_session: Session) -> None:
    archived, live = uid(), uid()
    run_id, items = _run_with(db_session, [archived])
    _retrieving(db_session, items[archived])
    add_series(db_session, archived, 4, now=at(0))  # the C-MOVE's instances
    assert runs.queue_retrieved(db_session, items[archived], BUNDLES, "test", now=at(10))
    add_series(db_session, live, 4, now=at(20))
    api.sweep_completeness(db_session, at(200), 60, 10, BUNDLES)  # the live study: quiet, so complete
    jobs = {j.study.study_instance_uid: j for j in db_session.scalars(select(Job))}
    assert (jobs[archived].priority, jobs[archived].rescreen_run_id) == (RESCREEN_PRIORITY, run_id)
    assert (jobs[live].priority, jobs[live].rescreen_run_id) == (0, None)
    first = api.claim_job(db_session, "w1", 60, at(300))
    second = api.claim_job(db_session, "w1", 60, at(300))
    assert first is not None and second is not None
    assert (first.study_instance_uid, second.study_instance_uid) == (live, archived)


def test_the_sweep_tags_a_study_it_completes_while_the_retrieve_runs(db_session: Session) -> None:
    study = uid()
    run_id, items = _run_with(db_session, [study])
    _retrieving(db_session, items[study])
    add_series(db_session, study, 4, now=at(0))
    assert api.sweep_completeness(db_session, at(100), 60, 10, BUNDLES)
    job = db_session.scalars(select(Job)).one()
    assert (job.priority, job.rescreen_run_id) == (RESCREEN_PRIORITY, run_id)
    # The retrieve ends: the sweep's job stands, none is added.
    assert runs.queue_retrieved(db_session, items[study], BUNDLES, "test", now=at(110)) == []
    assert len(db_session.scalars(select(Job)).all()) == 1
    assert runs.item_counts(db_session, run_id) == {"queued": 1}


def test_record_only_results_get_no_delivery(db_session: Session) -> None:
    study = uid()
    query = RescreenQuery("pacs", "dimse", "20250101", "20251231", None, record_only=True)
    run_id, items = _run_with(db_session, [study], query)
    _retrieving(db_session, items[study])
    add_series(db_session, study, 4, now=at(0))
    runs.queue_retrieved(db_session, items[study], BUNDLES, "test", now=at(10))
    ticket = api.claim_job(db_session, "w1", 60, at(20))
    assert ticket is not None
    result_id = api.finish_job(db_session, ticket.job_id, "w1", outcome(), ["pacs"], at(30))
    assert result_id is not None
    assert db_session.scalars(select(Delivery)).all() == []
    runs.refresh_items(db_session, run_id, now=at(40))
    assert runs.item_counts(db_session, run_id) == {"done": 1}


def test_a_live_result_is_delivered_as_before(db_session: Session) -> None:
    add_series(db_session, uid(), 4, now=at(0))
    api.sweep_completeness(db_session, at(100), 60, 10, BUNDLES)
    ticket = api.claim_job(db_session, "w1", 60, at(110))
    assert ticket is not None
    api.finish_job(db_session, ticket.job_id, "w1", outcome(), ["pacs"], at(120))
    assert len(db_session.scalars(select(Delivery)).all()) == 2  # SC and SR, to pacs


def test_screened_means_the_same_bundle_name_version_and_manifest(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 4, now=at(0))
    ct = [b for b in BUNDLES if b.modality == "CT"]
    assert runs.screening_state(db_session, study, ct) == "busy"  # still receiving
    api.sweep_completeness(db_session, at(100), 60, 10, BUNDLES)
    assert runs.screening_state(db_session, study, ct) == "busy"  # its job is queued
    ticket = api.claim_job(db_session, "w1", 60, at(110))
    assert ticket is not None
    api.finish_job(db_session, ticket.job_id, "w1", outcome(scoring_sha256="a" * 64), [], at(120))
    same = [BundleRef(b.name, b.version, b.modality, "a" * 64) for b in ct]
    assert runs.screening_state(db_session, study, same) == "screened"
    newer = [BundleRef(b.name, b.version + ".1", b.modality, "a" * 64) for b in ct]
    assert runs.screening_state(db_session, study, newer) == "absent"
    rewritten = [BundleRef(b.name, b.version, b.modality, "b" * 64) for b in ct]
    assert runs.screening_state(db_session, study, rewritten) == "absent"
    assert runs.screening_state(db_session, uid(), same) == "absent"
    # Not eligible: no score, so no manifest recorded; the same name and version judged it.
    unscored = uid()
    add_series(db_session, unscored, 4, now=at(0))
    api.sweep_completeness(db_session, at(100), 60, 10, BUNDLES)
    ticket = api.claim_job(db_session, "w1", 60, at(130))
    assert ticket is not None and ticket.study_instance_uid == unscored
    api.finish_job(db_session, ticket.job_id, "w1", outcome(eligible=False, anomaly_score=None), [], at(140))
    assert runs.screening_state(db_session, unscored, same) == "screened"
    assert runs.screening_state(db_session, unscored, newer) == "absent"


def test_a_stopped_run_resumes_with_its_cut_short_retrieve_still_retrieving(db_session: Session) -> None:
    a, b, c = uid(), uid(), uid()
    run_id, items = _run_with(db_session, [a, b, c])
    _retrieving(db_session, items[a])
    runs.set_run_state(db_session, run_id, runs.RescreenRunState.STOPPED, "test", now=at(50))
    assert runs.unfinished_run(db_session, QUERY) == run_id
    assert runs.unfinished_run(db_session, RescreenQuery("pacs", "dimse", "20250101", "20251231", "MR",
                                                         record_only=False)) is None
    assert runs.resume_run(db_session, run_id, 60.0, 2, "test", now=at(60)) == 1  # done again first
    summary = runs.get_run(db_session, run_id)
    assert summary is not None and summary.state == "running" and summary.per_hour == 60.0
    assert summary.counts == {"retrieving": 1, "pending": 2}
    # A study already found is not added twice when found again.
    assert runs.add_found(db_session, run_id, [FoundStudy(a, ("CT",), None)]) == 0
    runs.set_run_state(db_session, run_id, runs.RescreenRunState.FINISHED, "test", now=at(70))
    assert runs.unfinished_run(db_session, QUERY) is None


def test_nothing_retrieved_fails_the_study_and_a_failed_job_fails_it(db_session: Session) -> None:
    missing, broken = uid(), uid()
    run_id, items = _run_with(db_session, [missing, broken])
    _retrieving(db_session, items[missing])
    assert runs.queue_retrieved(db_session, items[missing], BUNDLES, "test", now=at(10)) == []
    _retrieving(db_session, items[broken])
    add_series(db_session, broken, 4, now=at(0))
    runs.queue_retrieved(db_session, items[broken], BUNDLES, "test", now=at(10))
    ticket = api.claim_job(db_session, "w1", 60, at(20))
    assert ticket is not None
    api.fail_job(db_session, ticket.job_id, "w1", "bundle not loaded", retryable=False, now=at(30))
    runs.refresh_items(db_session, run_id, now=at(40) + timedelta(seconds=1))
    failed = dict(runs.failed_items(db_session, run_id))
    assert failed[missing] == "the PACS sent no instance"
    assert failed[broken] == "bundle not loaded"
    assert db_session.scalars(select(Job)).one().state == JobState.FAILED


def test_the_console_shows_each_run_and_admins_see_why_studies_failed(console: Console) -> None:
    a, b, c = uid(), uid(), uid()
    with console.sessions() as session:
        run_id, items = _run_with(session, [a, b, c])
        runs.mark_item(session, items[a], RescreenItemState.SKIPPED, "already screened")
        runs.mark_item(session, items[b], RescreenItemState.FAILED, "the PACS sent no instance")
    page = console.client(ADMIN).get("/rescreen")
    assert page.status_code == 200
    row = re.search(rf'<tr id="rescreen-run-{run_id}">.*?</tr>', page.text, re.S)
    assert row is not None
    assert 'max="3" value="2"' in row.group(0) and "2/3" in row.group(0)
    assert '<td class="pending">1</td>' in row.group(0) and '<td class="failed">1</td>' in row.group(0)
    assert b in page.text and "the PACS sent no instance" in page.text
    # A viewer sees the progress, not the reasons.
    viewed = console.client(VIEWER).get("/rescreen")
    assert viewed.status_code == 200 and f"rescreen-run-{run_id}" in viewed.text
    assert "the PACS sent no instance" not in viewed.text
    assert 'href="/rescreen"' in viewed.text  # in the menu


# --------------------------------------------------------------------------- the run loop


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class WorkingStop:
    """The run's stop flag; each wait moves the clock on and a worker screens one queued job."""

    def __init__(self, clock: FakeClock, sessions) -> None:
        self.clock, self.sessions, self.flag, self.waits = clock, sessions, False, 0

    def is_set(self) -> bool:
        return self.flag

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        assert self.waits < 500, "the run does not end"
        self.clock.now += timeout or 0.0
        with self.sessions() as session:
            ticket = api.claim_job(session, "w1", 60)
            if ticket is not None:
                api.finish_job(session, ticket.job_id, "w1", outcome(), [])
        return self.flag


class ArchiveSource:
    """A PACS whose retrieve records the study's instances as the receiver would, failing
    the first `failures[uid]` times."""

    kind, name = "dimse", "pacs"

    def __init__(self, sessions, clock: FakeClock, run_id: int, failures: dict[str, int]) -> None:
        self.sessions, self.clock, self.run_id, self.failures = sessions, clock, run_id, failures
        self.calls: list[tuple[str, float, int]] = []  # (study, when, studies in flight then)

    def find(self, since: str, until: str, modality: str | None) -> list[FoundStudy]:
        raise AssertionError("not asked")

    def retrieve(self, study_uid: str, stop) -> str | None:
        with self.sessions() as session:
            counts = runs.item_counts(session, self.run_id)
        self.calls.append((study_uid, self.clock.now, counts.get("retrieving", 0) + counts.get("queued", 0)))
        if self.failures.get(study_uid, 0) > 0:
            self.failures[study_uid] -= 1
            return "PACS busy"
        with self.sessions() as session:
            add_series(session, study_uid, 4)
        return None


def test_the_run_keeps_its_rate_and_in_flight_limit_and_retries_a_failed_retrieve(db_sessions, monkeypatch) -> None:
    import types

    import headscreen.daemon.rescreen as rescreen

    clock = FakeClock()
    monkeypatch.setattr(rescreen.time, "monotonic", clock)
    studies = [uid() for _ in range(6)]
    flaky, broken = studies[1], studies[2]
    with db_sessions() as session:
        run_id, _ = _run_with(session, studies)
        screened = uid()  # found by the query, already screened by the same bundle: skipped
        runs.add_found(session, run_id, [FoundStudy(screened, ("CT",), None)])
        add_series(session, screened, 4, now=at(0))
        api.sweep_completeness(session, at(100), 60, 10, BUNDLES)
        ticket = api.claim_job(session, "w0", 60, at(110))
        assert ticket is not None
        api.finish_job(session, ticket.job_id, "w0", outcome(), [], at(120))
    stop = WorkingStop(clock, db_sessions)
    source = ArchiveSource(db_sessions, clock, run_id, {flaky: 2, broken: 5})
    runner = rescreen.Rescreen(types.SimpleNamespace(job_max_attempts=3), db_sessions, run_id, source,
                               lambda: BUNDLES, stop, per_hour=360, max_in_flight=2, actor="test")
    counts = runner.run()
    assert counts == {"done": 5, "failed": 1, "skipped": 1}
    with db_sessions() as session:
        assert dict(runs.failed_items(session, run_id)) == {broken: "PACS busy"}
        summary = runs.get_run(session, run_id)
        assert summary is not None and summary.state == "finished"
    assert all(in_flight <= 2 for _, _, in_flight in source.calls)  # the one being retrieved counts
    starts = [when for _, when, _ in source.calls]
    assert all(b - a >= 10.0 for a, b in zip(starts, starts[1:], strict=False))  # 360 an hour
    tries = [when for study, when, _ in source.calls if study == flaky]
    assert len(tries) == 3 and tries[1] - tries[0] >= 5.0 and tries[2] - tries[1] >= 10.0
    assert [study for study, _, _ in source.calls].count(broken) == 3
    assert screened not in [study for study, _, _ in source.calls]


def test_a_stopped_run_is_marked_stopped(db_sessions) -> None:
    import types

    import headscreen.daemon.rescreen as rescreen

    with db_sessions() as session:
        run_id, _ = _run_with(session, [uid()])
    stop = WorkingStop(FakeClock(), db_sessions)
    stop.flag = True
    runner = rescreen.Rescreen(types.SimpleNamespace(job_max_attempts=3), db_sessions, run_id,
                               ArchiveSource(db_sessions, FakeClock(), run_id, {}), lambda: BUNDLES, stop,
                               per_hour=None, max_in_flight=2, actor="test")
    assert runner.run() == {"pending": 1}
    with db_sessions() as session:
        summary = runs.get_run(session, run_id)
        assert summary is not None and summary.state == "stopped"


def test_the_api_lists_runs_with_failure_reasons_for_admins(console: Console) -> None:
    a, b = uid(), uid()
    with console.sessions() as session:
        run_id, items = _run_with(session, [a, b])
        runs.mark_item(session, items[b], RescreenItemState.FAILED, "the PACS sent no instance")
    listed = console.client(ADMIN).get("/api/v1/rescreen").json()
    run = next(r for r in listed if r["run_id"] == run_id)
    assert (run["found"], run["finished"], run["counts"]) == (2, 1, {"pending": 1, "failed": 1})
    assert run["failed_studies"] == [{"study_uid": b, "reason": "the PACS sent no instance"}]
    viewed = next(r for r in console.client(VIEWER).get("/api/v1/rescreen").json() if r["run_id"] == run_id)
    assert viewed["counts"] == run["counts"] and "failed_studies" not in viewed
    assert console.client().get("/api/v1/rescreen").status_code == 401
