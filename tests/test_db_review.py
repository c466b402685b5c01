"""Admin review: listing and filters, flags, requeue, audit, retention, counts."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db_factories import BUNDLES, CT_BUNDLE, MR_BUNDLE, add_series, at, complete_study, outcome, uid
from headscreen.db import api
from headscreen.db.models import AuditEvent, Instance, Job
from headscreen.db.states import JobState, StudyState
from headscreen.db.types import StudyFilters, StudyNotFound


def finish_next(session: Session, now_s: float, **overrides: object) -> int:
    ticket = api.claim_job(session, "w1", 60, at(now_s))
    assert ticket is not None
    result_id = api.finish_job(session, ticket.job_id, "w1", outcome(**overrides), ["PACS"], now=at(now_s + 1))
    assert result_id is not None
    return result_id


@pytest.fixture
def three_studies(db_session: Session) -> dict[str, str]:
    """An outlier CT, a QC-failed MR (both with results) and a CT still receiving."""
    outlier, _ = complete_study(db_session, "CT", now=at(0))
    finish_next(db_session, 4000, percentile=99.0, screen_positive=True)
    qc_failed, _ = complete_study(db_session, "MR", now=at(10))
    finish_next(db_session, 4100, percentile=40.0, screen_positive=False, qc_reasons=["motion"])
    receiving = uid()
    add_series(db_session, receiving, 2, now=at(5000))
    return {"outlier": outlier, "qc_failed": qc_failed, "receiving": receiving}


def uids(rows) -> set[str]:  # type: ignore[no-untyped-def]
    return {r.study_instance_uid for r in rows}


def test_list_studies_filters(db_session: Session, three_studies: dict[str, str]) -> None:
    everything = api.list_studies(db_session)
    assert [r.study_instance_uid for r in everything][0] == three_studies["receiving"]  # newest first
    assert len(everything) == 3
    s = three_studies
    assert uids(api.list_studies(db_session, StudyFilters(outliers_only=True))) == {s["outlier"]}
    assert uids(api.list_studies(db_session, StudyFilters(qc_failed_only=True))) == {s["qc_failed"]}
    assert uids(api.list_studies(db_session, StudyFilters(modality="MR"))) == {s["qc_failed"]}
    assert uids(api.list_studies(db_session, StudyFilters(state="receiving"))) == {s["receiving"]}
    assert uids(api.list_studies(db_session, StudyFilters(min_percentile=50))) == {s["outlier"]}
    assert len(api.list_studies(db_session, StudyFilters(limit=2))) == 2
    assert uids(api.list_studies(db_session, StudyFilters(limit=2, offset=2))) == {s["outlier"]}  # oldest


def test_study_row_carries_the_latest_result_and_job_summary(
    db_session: Session, three_studies: dict[str, str]
) -> None:
    [row] = api.list_studies(db_session, StudyFilters(outliers_only=True))
    assert (row.percentile, row.screen_positive, row.instance_count, row.modality) == (99.0, True, 4, "CT")
    assert row.jobs == {"done": 1}
    [receiving] = api.list_studies(db_session, StudyFilters(state="receiving"))
    assert (receiving.result_id, receiving.jobs, receiving.qc_reasons) == (None, {}, [])


def test_set_flag_is_audited_and_filterable(db_session: Session, three_studies: dict[str, str]) -> None:
    api.set_flag(db_session, three_studies["outlier"], True, "check the bleed", "dr.admin", now=at(9000))
    [flagged] = api.list_studies(db_session, StudyFilters(flagged=True))
    assert (flagged.study_instance_uid, flagged.flag_comment) == (three_studies["outlier"], "check the bleed")
    assert len(api.list_studies(db_session, StudyFilters(flagged=False))) == 2
    api.set_flag(db_session, three_studies["outlier"], False, None, "dr.admin", now=at(9001))
    events = db_session.execute(
        select(AuditEvent.action, AuditEvent.actor, AuditEvent.at, AuditEvent.detail)
        .where(AuditEvent.action.like("flag%"))
        .order_by(AuditEvent.id)
    ).all()
    assert events == [
        ("flag_set", "dr.admin", at(9000), {"comment": "check the bleed"}),
        ("flag_cleared", "dr.admin", at(9001), {"comment": None}),
    ]
    with pytest.raises(StudyNotFound):
        api.set_flag(db_session, "1.2.3.4", True, None, "dr.admin")


def test_a_review_and_its_flag_commit_together_or_not_at_all(
    db_session: Session, three_studies: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """'Normal' clears the flag and marks the study reviewed in one transaction: when the
    second half fails, the first is not left behind."""
    import headscreen.db.review

    study = three_studies["outlier"]
    api.set_flag(db_session, study, True, "check the bleed", "dr.admin", now=at(9000))
    real_audit = headscreen.db.review.add_audit

    def failing_review_audit(session, actor, action, *args, **kwargs):  # type: ignore[no-untyped-def]
        if action == "review_set":
            raise RuntimeError("database went away")
        return real_audit(session, actor, action, *args, **kwargs)

    monkeypatch.setattr(headscreen.db.review, "add_audit", failing_review_audit)
    with pytest.raises(RuntimeError):
        api.record_review(db_session, study, "dr.admin", flagged=False, comment="benign", reviewed=True,
                          confirmed_normal=True, now=at(9100))
    db_session.expire_all()
    [row] = [r for r in api.list_studies(db_session, StudyFilters()) if r.study_instance_uid == study]
    assert (row.flagged, row.flag_comment, row.reviewed) == (True, "check the bleed", False)
    monkeypatch.undo()
    api.record_review(db_session, study, "dr.admin", flagged=False, comment="benign", reviewed=True,
                      confirmed_normal=True, now=at(9200))
    db_session.expire_all()
    [row] = [r for r in api.list_studies(db_session, StudyFilters()) if r.study_instance_uid == study]
    assert (row.flagged, row.flag_comment, row.reviewed) == (False, "benign", True)


def test_get_study_detail(db_session: Session, three_studies: dict[str, str]) -> None:
    detail = api.get_study(db_session, three_studies["qc_failed"])
    assert detail is not None
    assert detail.row.qc_reasons == ["motion"] and detail.row.state == StudyState.COMPLETE
    assert [j.state for j in detail.jobs] == ["done"]
    assert len(detail.results) == 1 and len(detail.deliveries) == 2 and len(detail.series) == 1
    assert api.get_study(db_session, "1.2.3.4") is None


def test_requeue_study_supersedes_and_audits(db_session: Session) -> None:
    study, study_id = complete_study(db_session)
    new_ids = api.requeue_study(db_session, study, "dr.admin", BUNDLES, now=at(5000))
    jobs = db_session.execute(select(Job.id, Job.state).order_by(Job.id)).all()
    assert [state for _, state in jobs] == [JobState.SUPERSEDED, JobState.QUEUED]
    assert new_ids == [jobs[1][0]]
    event = db_session.execute(select(AuditEvent).where(AuditEvent.action == "study_requeued")).scalar_one()
    assert (event.actor, event.study_id, event.detail["job_ids"]) == ("dr.admin", study_id, new_ids)


def test_requeue_of_a_receiving_study_force_completes_it(db_session: Session) -> None:
    study = uid()
    add_series(db_session, study, 2, modality="MR")
    assert len(api.requeue_study(db_session, study, "dr.admin", [CT_BUNDLE, MR_BUNDLE], now=at(10))) == 1
    assert api.list_studies(db_session)[0].state == StudyState.COMPLETE


def test_retention_candidates_and_purge(db_session: Session) -> None:
    study, study_id = complete_study(db_session)  # completed at 3600
    cutoff = at(100_000)
    assert api.retention_candidates(db_session, cutoff) == []  # its job is still queued
    result_id = finish_next(db_session, 4000)
    assert api.retention_candidates(db_session, cutoff) == []  # deliveries pending
    for ticket in api.claim_deliveries(db_session, at(5000), 10, 30, result_id=result_id):
        api.mark_delivered(db_session, ticket.delivery_id, 0, at(5001))
    assert api.retention_candidates(db_session, at(3600)) == []  # not older than the cutoff
    assert api.retention_candidates(db_session, cutoff) == [(study_id, study)]
    assert api.mark_purged(db_session, study_id, now=at(6000)) == 4
    assert db_session.execute(select(Instance)).first() is None
    assert api.retention_candidates(db_session, cutoff) == []
    detail = api.get_study(db_session, study)
    assert detail is not None and detail.row.instance_count == 0 and len(detail.results) == 1
    assert api.study_instances(db_session, study_id) == {}


def test_counts_list_every_state(db_session: Session, three_studies: dict[str, str]) -> None:
    got = api.counts(db_session)
    assert got["studies"] == {"receiving": 1, "complete": 2}
    assert got["jobs"] == {"queued": 0, "running": 0, "done": 2, "failed": 0, "superseded": 0}
    assert got["deliveries"] == {"pending": 4, "in_flight": 0, "delivered": 0, "dead": 0}


def test_audit_appends_events(db_session: Session) -> None:
    event_id = api.audit(db_session, "dr.admin", "login", detail={"ip": "10.0.0.1"}, now=at(1))
    event = db_session.get(AuditEvent, event_id)
    assert event is not None and (event.actor, event.action, event.detail, event.at) == (
        "dr.admin", "login", {"ip": "10.0.0.1"}, at(1),
    )


def test_purging_an_unknown_study_is_refused(db_session: Session) -> None:
    with pytest.raises(StudyNotFound):
        api.mark_purged(db_session, 424242)
