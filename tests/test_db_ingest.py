"""record_instance, rejections and study completeness, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import api
from db.completeness import InstanceFacts, series_wholeness, study_wholeness
from db.models import AuditEvent, IngestRejection, Instance, Job, Series, Study
from db.states import JobState, StudyState
from db_factories import BUNDLES, CT_BUNDLE, T0, add_series, at, record, uid

# ---------------------------------------------------------------- pure wholeness


def facts(numbers, positions=None, iia=None, frames=None) -> list[InstanceFacts]:
    positions = positions if positions is not None else [None] * len(numbers)
    return [InstanceFacts(n, p, iia, frames) for n, p in zip(numbers, positions)]


def test_contiguous_evenly_spaced_series_is_whole() -> None:
    verdict = series_wholeness(facts([3, 1, 2, 4], [15.0, 5.0, 10.0, 20.0]))
    assert verdict.whole, verdict.reason


def test_gap_in_instance_numbers_is_not_whole() -> None:
    verdict = series_wholeness(facts([1, 2, 4, 5], [5.0, 10.0, 20.0, 25.0]))
    assert not verdict.whole
    assert "gaps" in verdict.reason


def test_missing_slice_in_the_middle_is_not_whole() -> None:
    # Numbers renumbered without a gap but one slice position missing: spacing betrays it.
    verdict = series_wholeness(facts([1, 2, 3, 4], [0.0, 1.0, 3.0, 4.0]))
    assert not verdict.whole
    assert "uneven" in verdict.reason


def test_spacing_tolerance_is_relative() -> None:
    assert series_wholeness(facts([1, 2, 3, 4], [0.0, 5.0, 10.04, 15.0])).whole
    assert not series_wholeness(facts([1, 2, 3, 4], [0.0, 5.0, 10.2, 15.0])).whole


def test_images_in_acquisition_must_be_met() -> None:
    assert not series_wholeness(facts([1, 2, 3], [1.0, 2.0, 3.0], iia=4)).whole
    assert series_wholeness(facts([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0], iia=4)).whole
    # A multi-frame instance counts its frames.
    assert series_wholeness(facts([1], [None], iia=40, frames=40)).whole


def test_missing_numbers_or_partial_positions_are_not_whole() -> None:
    assert not series_wholeness(facts([1, None, 3], [1.0, 2.0, 3.0])).whole
    assert not series_wholeness(facts([1, 2, 3], [1.0, None, 3.0])).whole
    assert not series_wholeness(facts([1, 1, 2], [1.0, 1.0, 2.0])).whole


def test_study_is_whole_only_when_every_series_is() -> None:
    good = facts([1, 2, 3], [1.0, 2.0, 3.0])
    bad = facts([1, 3], [1.0, 3.0])
    assert study_wholeness([good, good]).whole
    assert not study_wholeness([good, bad]).whole
    assert not study_wholeness([]).whole


# ---------------------------------------------------------------- record_instance


def test_record_instance_creates_study_series_and_instance(db_session: Session) -> None:
    study, series = uid(), uid()
    rec = record(study, series, 1, 5.0)
    out = api.record_instance(db_session, rec, now=T0)
    assert out.created and not out.study_reopened
    row = db_session.execute(select(Study).where(Study.id == out.study_id)).scalar_one()
    assert (row.state, row.generation, row.modality, row.patient_age) == (StudyState.RECEIVING, 1, "CT", "054Y")
    assert db_session.execute(select(Series.instance_count)).scalar_one() == 1
    assert api.study_instances(db_session, out.study_id) == {series: [(rec.path, rec.sop_instance_uid)]}


def test_duplicate_sop_is_idempotent_and_refreshes_path(db_session: Session) -> None:
    study, series = uid(), uid()
    rec = record(study, series, 1, 5.0)
    first = api.record_instance(db_session, rec, now=T0)
    moved = record(study, series, 1, 5.0, sop=rec.sop_instance_uid, path="elsewhere.dcm", size_bytes=2000)
    again = api.record_instance(db_session, moved, now=at(5))
    assert (again.created, again.study_reopened, again.study_id) == (False, False, first.study_id)
    instance = db_session.execute(select(Instance)).scalar_one()
    assert (instance.path, instance.size_bytes) == ("elsewhere.dcm", 2000)
    assert db_session.execute(select(Series.instance_count)).scalar_one() == 1


def test_late_arrival_reopens_a_complete_study(db_session: Session) -> None:
    study = uid()
    series = add_series(db_session, study, 3)
    [study_id] = api.sweep_completeness(db_session, at(600), 300, 30, BUNDLES)
    late = api.record_instance(db_session, record(study, series, 4, 20.0), now=at(900))
    assert late.created and late.study_reopened and late.study_id == study_id
    row = db_session.execute(select(Study)).scalar_one()
    assert (row.state, row.generation, row.completed_at) == (StudyState.RECEIVING, 2, None)
    generations = db_session.execute(select(Instance.generation).order_by(Instance.id)).scalars().all()
    assert generations == [1, 1, 1, 2]
    # A duplicate of an old instance does not reopen again.
    again = api.record_instance(db_session, record(study, series, 4, 20.0, sop=uid()), now=at(901))
    assert not again.study_reopened


def test_own_result_echoed_back_does_not_reopen(db_session: Session) -> None:
    from db_factories import claimed_job, outcome, sc_object

    ticket = claimed_job(db_session)
    sc = sc_object()
    api.finish_job(db_session, ticket.job_id, "w1", outcome([sc]), ["PACS"], now=at(4000))
    echo = record(ticket.study_instance_uid, uid(), 1, sop=sc.sop_instance_uid, modality="OT")
    out = api.record_instance(db_session, echo, now=at(5000))
    assert out.created and not out.study_reopened
    assert db_session.execute(select(Study.state)).scalar_one() == StudyState.COMPLETE


def test_concurrent_arrivals_of_one_study_never_fail(db_sessions: sessionmaker[Session]) -> None:
    study, series_a, series_b = uid(), uid(), uid()
    sops = [uid() for _ in range(24)]
    threads = 6
    barrier = threading.Barrier(threads)

    def sender(seed: int) -> list[bool]:
        order = list(range(len(sops)))
        random.Random(seed).shuffle(order)
        created = []
        with db_sessions() as session:
            barrier.wait()
            for n in order:
                series = series_a if n % 2 else series_b
                out = api.record_instance(session, record(study, series, n + 1, float(n), sop=sops[n]), now=at(n))
                created.append(out.created)
        return created

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(sender, range(threads)))
    assert sum(sum(r) for r in results) == len(sops)  # each SOP created exactly once
    with db_sessions() as session:
        assert session.execute(select(func.count()).select_from(Study)).scalar_one() == 1
        counts = session.execute(select(Series.instance_count).order_by(Series.id)).scalars().all()
        assert sorted(counts) == [12, 12]
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 24


def test_record_rejection(db_session: Session) -> None:
    rejection_id = api.record_rejection(
        db_session, "EVIL", "calling AE not allowed", 0xA700, sop_instance_uid="1.2.3", now=T0
    )
    row = db_session.get(IngestRejection, rejection_id)
    assert row is not None
    assert (row.calling_ae, row.status, row.sop_instance_uid, row.at) == ("EVIL", 0xA700, "1.2.3", T0)


# ---------------------------------------------------------------- sweep_completeness


def test_quiet_period_completes_an_incomplete_study(db_session: Session) -> None:
    study, series = uid(), uid()
    for n in (1, 2, 4):  # a gap: never whole by content
        api.record_instance(db_session, record(study, series, n, n * 5.0), now=T0)
    assert api.sweep_completeness(db_session, at(100), 300, 30, BUNDLES) == []
    assert api.sweep_completeness(db_session, at(299), 300, 30, BUNDLES) == []
    [done] = api.sweep_completeness(db_session, at(300), 300, 30, BUNDLES)
    jobs = db_session.execute(select(Job).where(Job.study_id == done)).scalars().all()
    assert [(j.bundle_name, j.state, j.generation) for j in jobs] == [(CT_BUNDLE.name, JobState.QUEUED, 1)]
    event = db_session.execute(select(AuditEvent).where(AuditEvent.action == "study_complete")).scalar_one()
    assert event.detail["reason"] == "quiet period elapsed"


def test_whole_study_completes_after_the_short_quiet(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 5)
    assert api.sweep_completeness(db_session, at(29), 300, 30, BUNDLES) == []
    assert len(api.sweep_completeness(db_session, at(30), 300, 30, BUNDLES)) == 1
    event = db_session.execute(select(AuditEvent).where(AuditEvent.action == "study_complete")).scalar_one()
    assert event.detail["reason"] == "whole by content"
    # Completed once only.
    assert api.sweep_completeness(db_session, at(10_000), 300, 30, BUNDLES) == []


def test_images_in_acquisition_unmet_waits_for_the_quiet_period(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 3, images_in_acquisition=5)
    assert api.sweep_completeness(db_session, at(60), 300, 30, BUNDLES) == []
    assert len(api.sweep_completeness(db_session, at(300), 300, 30, BUNDLES)) == 1


def test_study_without_a_matching_bundle_completes_without_job(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 3, modality="US")
    [done] = api.sweep_completeness(db_session, at(400), 300, 30, BUNDLES)
    assert db_session.execute(select(func.count()).select_from(Job)).scalar_one() == 0
    event = db_session.execute(select(AuditEvent).where(AuditEvent.action == "no_job_enqueued")).scalar_one()
    assert event.study_id == done and event.detail["modalities"] == ["US"]


def test_mixed_study_enqueues_the_image_bundle(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 1, modality="SR")
    add_series(db_session, study, 3, modality="MR")
    api.sweep_completeness(db_session, at(400), 300, 30, BUNDLES)
    assert db_session.execute(select(Job.bundle_name)).scalars().all() == ["mr-vae-age"]


@pytest.mark.parametrize("job_state_before", [JobState.QUEUED, JobState.RUNNING])
def test_reopen_and_recomplete_supersedes_older_jobs(db_session: Session, job_state_before: JobState) -> None:
    study = uid()
    series = add_series(db_session, study, 3)
    api.sweep_completeness(db_session, at(400), 300, 30, BUNDLES)
    if job_state_before == JobState.RUNNING:
        assert api.claim_job(db_session, "w1", 600, at(401)) is not None
    api.record_instance(db_session, record(study, series, 4, 20.0), now=at(500))
    api.sweep_completeness(db_session, at(1000), 300, 30, BUNDLES)
    jobs = db_session.execute(select(Job.generation, Job.state).order_by(Job.id)).all()
    assert jobs == [(1, JobState.SUPERSEDED), (2, JobState.QUEUED)]


def test_study_instances_are_grouped_by_series_in_instance_order(db_session: Session) -> None:
    study, series = uid(), uid()
    recs = [record(study, series, n, float(-n)) for n in (3, 1, 2)]
    for rec in recs:
        out = api.record_instance(db_session, rec, now=T0)
    grouped = api.study_instances(db_session, out.study_id)
    assert [sop for _, sop in grouped[series]] == [recs[1].sop_instance_uid, recs[2].sop_instance_uid, recs[0].sop_instance_uid]
