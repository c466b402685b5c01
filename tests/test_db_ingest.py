"""record_instance, rejections and study completeness, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db_factories import BUNDLES, CT_BUNDLE, T0, add_series, at, record, uid
from headscreen.db import api
from headscreen.db.completeness import (
    MIN_HEAD_COVERAGE_MM,
    InstanceFacts,
    series_wholeness,
    slice_coverage_mm,
    study_wholeness,
)
from headscreen.db.models import AuditEvent, IngestRejection, Instance, Job, Series, Study
from headscreen.db.states import JobState, StudyState

# ---------------------------------------------------------------- pure wholeness


def facts(numbers, positions=None, iia=None, frames=None) -> list[InstanceFacts]:
    positions = positions if positions is not None else [None] * len(numbers)
    return [InstanceFacts(n, p, iia, frames) for n, p in zip(numbers, positions)]


def head(count: int = 250, spacing: float = 0.625, iia: int | None = None) -> list[InstanceFacts]:
    """The first `count` slices, in order, of a 250-slice 0.625 mm head CT (156 mm)."""
    return facts(list(range(1, count + 1)), [n * spacing for n in range(1, count + 1)], iia=iia)


def test_contiguous_evenly_spaced_series_is_whole() -> None:
    numbers = list(range(1, 33))
    random.Random(3).shuffle(numbers)
    verdict = series_wholeness(facts(numbers, [n * 5.0 for n in numbers]))  # 32 x 5 mm: 160 mm
    assert verdict.whole, verdict.reason


def test_a_send_cut_short_in_order_is_not_whole() -> None:
    verdict = series_wholeness(head(120))
    assert not verdict.whole
    assert "no evidence of a whole series" in verdict.reason


def test_a_send_cut_short_is_not_whole_by_its_images_in_acquisition() -> None:
    assert not series_wholeness(head(120, iia=250)).whole
    assert series_wholeness(head(250, iia=250)).whole
    # A count other than ImagesInAcquisition (per rotation on some scanners) is no evidence.
    assert not series_wholeness(head(120, iia=4)).whole


def test_the_whole_head_is_whole_by_coverage() -> None:
    assert series_wholeness(head(250)).whole
    # Coverage counts one spacing per slice: 28 slices of 5 mm cover 140 mm.
    assert slice_coverage_mm(head(28, spacing=5.0)) == pytest.approx(MIN_HEAD_COVERAGE_MM)
    assert series_wholeness(head(28, spacing=5.0)).whole
    assert not series_wholeness(head(27, spacing=5.0)).whole


def test_slices_without_positions_need_images_in_acquisition() -> None:
    assert not series_wholeness(facts([1, 2, 3])).whole
    assert series_wholeness(facts([1, 2, 3], iia=3)).whole
    # Two slices far apart are no volume.
    assert not series_wholeness(facts([1, 2], [0.0, 150.0])).whole


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
    assert series_wholeness(facts([1, 2, 3, 4], [0.0, 5.0, 10.04, 15.0], iia=4)).whole
    assert not series_wholeness(facts([1, 2, 3, 4], [0.0, 5.0, 10.2, 15.0], iia=4)).whole


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
    good = facts([1, 2, 3], [1.0, 2.0, 3.0], iia=3)
    bad = facts([1, 3], [1.0, 3.0], iia=3)
    assert study_wholeness([good, good]).whole
    assert not study_wholeness([good, bad]).whole
    assert not study_wholeness([]).whole
    # Every series needs its evidence: a whole head beside a part-sent one is not whole.
    assert not study_wholeness([head(250), head(120)]).whole


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
    add_series(db_session, study, 32)  # 5 mm slices, 160 mm: skull base to vertex
    assert api.sweep_completeness(db_session, at(29), 300, 30, BUNDLES) == []
    assert len(api.sweep_completeness(db_session, at(30), 300, 30, BUNDLES)) == 1
    event = db_session.execute(select(AuditEvent).where(AuditEvent.action == "study_complete")).scalar_one()
    assert event.detail["reason"] == "whole by content"
    # Completed once only.
    assert api.sweep_completeness(db_session, at(10_000), 300, 30, BUNDLES) == []


def _completion_reason(session: Session, study_id: int) -> str:
    event = session.execute(select(AuditEvent).where(AuditEvent.study_id == study_id,
                                                     AuditEvent.action == "study_complete")).scalar_one()
    return str(event.detail["reason"])


def test_a_whole_study_whose_sender_released_completes_after_the_release_quiet(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 32)
    # Still open (never released): the whole-study quiet applies.
    assert api.sweep_completeness(db_session, at(5), 300, 30, BUNDLES, released_quiet_s=2) == []
    assert api.record_association_released(db_session, [study, uid()], now=at(1)) == 1  # an unknown UID: nothing
    assert api.sweep_completeness(db_session, at(1.9), 300, 30, BUNDLES, released_quiet_s=2) == []
    assert api.sweep_completeness(db_session, at(5), 300, 30, BUNDLES) == []  # the rule is off without it
    [done] = api.sweep_completeness(db_session, at(5), 300, 30, BUNDLES, released_quiet_s=2)
    assert _completion_reason(db_session, done) == "whole by content, sender released"
    # A complete study is not stamped again.
    assert api.record_association_released(db_session, [study], now=at(6)) == 0


def test_an_instance_after_the_release_waits_for_its_own_association(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 32)
    api.record_association_released(db_session, [study], now=at(1))
    add_series(db_session, study, 32, now=at(3))  # a second series, from an association still open
    assert api.sweep_completeness(db_session, at(10), 300, 30, BUNDLES, released_quiet_s=2) == []
    api.record_association_released(db_session, [study], now=at(11))
    [done] = api.sweep_completeness(db_session, at(13), 300, 30, BUNDLES, released_quiet_s=2)
    assert _completion_reason(db_session, done) == "whole by content, sender released"


def test_a_released_study_that_is_not_whole_waits_for_the_quiet_period(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 120, spacing=0.625)  # 75 mm of a head: cut short
    api.record_association_released(db_session, [study], now=at(1))
    assert api.sweep_completeness(db_session, at(100), 300, 30, BUNDLES, released_quiet_s=2) == []
    [done] = api.sweep_completeness(db_session, at(300), 300, 30, BUNDLES, released_quiet_s=2)
    assert _completion_reason(db_session, done) == "quiet period elapsed"


def test_images_in_acquisition_unmet_waits_for_the_quiet_period(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 3, images_in_acquisition=5)
    assert api.sweep_completeness(db_session, at(60), 300, 30, BUNDLES) == []
    assert len(api.sweep_completeness(db_session, at(300), 300, 30, BUNDLES)) == 1


@pytest.mark.parametrize("images_in_acquisition", [None, 250])
def test_a_half_sent_study_waits_for_the_quiet_period(db_session: Session, images_in_acquisition) -> None:
    # Issue 12 (2): the first 120 of 250 slices, in order, counted as whole.
    study = uid()
    add_series(db_session, study, 120, spacing=0.625, images_in_acquisition=images_in_acquisition)
    assert api.sweep_completeness(db_session, at(30), 300, 30, BUNDLES) == []
    assert api.sweep_completeness(db_session, at(299), 300, 30, BUNDLES) == []
    [done] = api.sweep_completeness(db_session, at(300), 300, 30, BUNDLES)
    event = db_session.execute(select(AuditEvent).where(AuditEvent.study_id == done,
                                                        AuditEvent.action == "study_complete")).scalar_one()
    assert event.detail["reason"] == "quiet period elapsed"


@pytest.mark.parametrize("images_in_acquisition", [None, 250])
def test_all_250_slices_complete_after_the_short_quiet(db_session: Session, images_in_acquisition) -> None:
    study = uid()
    add_series(db_session, study, 250, spacing=0.625, images_in_acquisition=images_in_acquisition)
    [done] = api.sweep_completeness(db_session, at(30), 300, 30, BUNDLES)
    event = db_session.execute(select(AuditEvent).where(AuditEvent.study_id == done,
                                                        AuditEvent.action == "study_complete")).scalar_one()
    assert event.detail["reason"] == "whole by content"


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
    assert [sop for _, sop in grouped[series]] == [recs[1].sop_instance_uid, recs[2].sop_instance_uid,
                                                   recs[0].sop_instance_uid]


# ---------------------------------------------------------------- an instance re-sent under another study


def series_counts(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Series.series_instance_uid, Series.instance_count)).all())


def moved_audits(session: Session) -> list[AuditEvent]:
    return list(session.execute(
        select(AuditEvent).where(AuditEvent.action == "instance_moved").order_by(AuditEvent.id)
    ).scalars())


def test_an_instance_resent_under_another_study_moves_there(db_session: Session) -> None:
    # Issue 12 (4): the later study wins; both studies are re-evaluated.
    study_a, study_b, series_b = uid(), uid(), uid()
    series_a = add_series(db_session, study_a, 3)
    [a_id] = api.sweep_completeness(db_session, at(600), 300, 30, BUNDLES)
    x = api.study_instances(db_session, a_id)[series_a][1][1]
    resent = record(study_b, series_b, 1, 5.0, sop=x)
    out = api.record_instance(db_session, resent, now=at(900))
    b_id = out.study_id
    assert b_id != a_id and not out.created
    row = db_session.execute(select(Instance).where(Instance.sop_instance_uid == x)).scalar_one()
    assert row.path == resent.path == f"{study_b}/{series_b}/{x}.dcm"
    assert row.series.series_instance_uid == series_b and row.generation == 1
    assert api.study_instances(db_session, b_id) == {series_b: [(resent.path, x)]}
    left_in_a = [sop for _, sop in api.study_instances(db_session, a_id)[series_a]]
    assert len(left_in_a) == 2 and x not in left_in_a
    assert series_counts(db_session) == {series_a: 2, series_b: 1}
    a, b = db_session.get(Study, a_id), db_session.get(Study, b_id)
    assert (a.state, a.generation, a.completed_at, a.last_received_at) == (StudyState.RECEIVING, 2, None, at(900))
    assert (b.state, b.generation, b.last_received_at) == (StudyState.RECEIVING, 1, at(900))
    audits = moved_audits(db_session)
    assert sorted(e.study_id for e in audits) == sorted([a_id, b_id])
    assert all(e.detail["sop_instance_uid"] == x and e.detail["from_study_id"] == a_id
               and e.detail["to_study_id"] == b_id for e in audits)
    # Re-evaluated: both complete after the quiet period; A's first job is superseded.
    assert sorted(api.sweep_completeness(db_session, at(1200), 300, 30, BUNDLES)) == sorted([a_id, b_id])
    jobs = db_session.execute(select(Job.study_id, Job.generation, Job.state).order_by(Job.id)).all()
    assert sorted(jobs) == sorted([(a_id, 1, JobState.SUPERSEDED), (a_id, 2, JobState.QUEUED),
                                   (b_id, 1, JobState.QUEUED)])


def test_a_move_out_of_a_receiving_study_restarts_its_quiet_period(db_session: Session) -> None:
    study_a, study_b = uid(), uid()
    series_a = add_series(db_session, study_a, 3)
    x = db_session.execute(select(Instance.sop_instance_uid).order_by(Instance.id)).scalars().first()
    out = api.record_instance(db_session, record(study_b, uid(), 1, sop=x), now=at(200))
    a = db_session.execute(select(Study).where(Study.study_instance_uid == study_a)).scalar_one()
    assert (a.state, a.generation, a.last_received_at) == (StudyState.RECEIVING, 1, at(200))
    assert series_counts(db_session)[series_a] == 2
    assert api.sweep_completeness(db_session, at(400), 300, 30, BUNDLES) == []
    assert sorted(api.sweep_completeness(db_session, at(500), 300, 30, BUNDLES)) == sorted([a.id, out.study_id])


def test_an_instance_sent_back_returns_to_its_first_study(db_session: Session) -> None:
    study_a, study_b, series_b = uid(), uid(), uid()
    series_a = add_series(db_session, study_a, 3)
    x = db_session.execute(select(Instance.sop_instance_uid).order_by(Instance.id)).scalars().first()
    api.record_instance(db_session, record(study_b, series_b, 1, sop=x), now=at(10))
    back = record(study_a, series_a, 1, 5.0, sop=x)
    out = api.record_instance(db_session, back, now=at(20))
    assert series_counts(db_session) == {series_a: 3, series_b: 0}
    row = db_session.execute(select(Instance).where(Instance.sop_instance_uid == x)).scalar_one()
    assert (row.path, row.series.study_id) == (back.path, out.study_id)
    assert len(moved_audits(db_session)) == 4
    assert db_session.execute(select(func.count()).select_from(Instance)).scalar_one() == 3


def test_an_instance_resent_under_another_series_of_its_study_moves_there(db_session: Session) -> None:
    study, series_2 = uid(), uid()
    series_1 = add_series(db_session, study, 3)
    [study_id] = api.sweep_completeness(db_session, at(600), 300, 30, BUNDLES)
    x = db_session.execute(select(Instance.sop_instance_uid).order_by(Instance.id)).scalars().first()
    out = api.record_instance(db_session, record(study, series_2, 1, sop=x), now=at(900))
    assert out.study_reopened and out.study_id == study_id
    assert series_counts(db_session) == {series_1: 2, series_2: 1}
    [event] = moved_audits(db_session)
    assert (event.study_id, event.detail["from_study_id"], event.detail["to_study_id"]) == (study_id,) * 3
    study_row = db_session.get(Study, study_id)
    assert (study_row.state, study_row.generation) == (StudyState.RECEIVING, 2)
    assert db_session.execute(select(Instance.generation).where(Instance.sop_instance_uid == x)).scalar_one() == 2


def test_a_move_into_a_complete_study_reopens_it(db_session: Session) -> None:
    study_a, study_b = uid(), uid()
    add_series(db_session, study_a, 3)
    series_b = add_series(db_session, study_b, 3, now=at(100))
    done = api.sweep_completeness(db_session, at(1000), 300, 30, BUNDLES)
    assert len(done) == 2
    x = db_session.execute(
        select(Instance.sop_instance_uid).join(Series).where(Series.series_instance_uid != series_b)
        .order_by(Instance.id)).scalars().first()
    out = api.record_instance(db_session, record(study_b, series_b, 4, 20.0, sop=x), now=at(2000))
    assert out.study_reopened
    generations = dict(db_session.execute(select(Study.study_instance_uid, Study.generation)).all())
    assert generations == {study_a: 2, study_b: 2}
    assert db_session.execute(select(Instance.generation).where(Instance.sop_instance_uid == x)).scalar_one() == 2
