"""Shadow bundles and promotion: roles on SQLite and PostgreSQL (audited), the comparison
on a known set, shared preprocessing, and end to end through the real Worker: a study
screened by an active and two shadow bundles (one failing) sends the active result
only and records the shadows'; an admin promotes a shadow bundle over REST (CSRF,
admin role) and the next job claimed runs with it, without a restart.

Time: the bundles are copies of the shipped CT bundle under other version numbers,
with registration cut short as in test_site_calibration.py; two studies of one small
phantom (96 x 96, 8 mm slices, one overlay slice).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import select

import headscreen.daemon.pipeline
from db_factories import T0, claimed_job, outcome
from headscreen.bundle import load_bundle, write_bundle
from headscreen.daemon.cli import comparison_line, main
from headscreen.daemon.config import load_settings
from headscreen.daemon.instance_record import slice_position
from headscreen.daemon.pipeline import SharedStages, Timer
from headscreen.daemon.scheduler import bundle_refs, sweep_completeness
from headscreen.daemon.shadow import UNASSIGNED, compare, current_plan, promote, put_in_shadow, resolve_roles, retire
from headscreen.daemon.web import create_app
from headscreen.daemon.worker import Worker
from headscreen.db import api
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import AuditEvent, Delivery, Job, Result, ResultObject, ShadowResult, Study
from headscreen.db.types import BundleRef, BundleScoreRow, InstanceRecord, RoleChange, ShadowOutcome
from headscreen.imaging.phantoms import make_head, write_dicom_series
from serve_harness import RecordingSCP
from test_site_calibration import fast_bundle
from web_helpers import ADMIN, VIEWER, add_users

CSRF = "X-CSRF-Token"
A = BundleRef("ct-x", "1.0.0", "CT", "a" * 64)
B = BundleRef("ct-x", "2.0.0", "CT", "b" * 64)
C = BundleRef("ct-y", "1.0.0", "CT", "c" * 64)
M = BundleRef("mr-x", "1.0.0", "MR", "d" * 64)


def _audit(sessions, action: str) -> list[AuditEvent]:
    with sessions() as session:
        return list(session.execute(select(AuditEvent).where(AuditEvent.action == action)
                                    .order_by(AuditEvent.id)).scalars())


# --------------------------------------------------------------------------- roles

def test_roles_are_recorded_and_audited(db_sessions) -> None:
    configured = [A, B, C, M]
    with db_sessions() as session:
        plan = current_plan(session, configured)
        # Nothing recorded: every configured bundle is active, as before roles existed.
        assert {b.key for b in plan.active} == {A.key, B.key, C.key, M.key} and not plan.shadows_for("CT")

        changed = put_in_shadow(session, configured, B.key, "alice", "fine-tuned on our scanners", T0)
        # The bundle active by default is recorded as active in the same change.
        assert {(r.key, r.role) for r in changed} == {(A.key, "active"), (B.key, "shadow")}
        plan = current_plan(session, configured)
        assert plan.active_for("CT") == [A] and plan.shadows_for("CT") == [B] and plan.active_for("MR") == [M]
        assert plan.state_of(C.key).role == UNASSIGNED  # configured, no role, not run
        with pytest.raises(api.RoleConflict, match="not in shadow"):
            promote(session, configured, C.key, "alice", "no", now=T0)
        with pytest.raises(api.RoleConflict, match="active CT bundle"):
            retire(session, configured, A.key, "alice", "no", now=T0)
        with pytest.raises(api.RoleConflict, match="still active"):  # a second active, however asked
            api.change_bundle_roles(session, [RoleChange(C, "active", None)], "mallory", "two actives", now=T0)
        with pytest.raises(api.RoleConflict, match="not recorded now"):  # someone changed it meanwhile
            api.change_bundle_roles(session, [RoleChange(C, "shadow", "shadow")], "bob", "stale view", now=T0)
        with pytest.raises(ValueError, match="reason"):
            promote(session, configured, B.key, "alice", "  ", now=T0)

        changed = promote(session, configured, B.key, "alice", "agrees on 200 studies", "retired",
                          T0 + timedelta(hours=1))
        assert {(r.key, r.role) for r in changed} == {(A.key, "retired"), (B.key, "active")}
        plan = current_plan(session, configured)
        assert plan.active_for("CT") == [B] and plan.state_of(A.key).role == "retired"
        rows = {r.key: r for r in api.list_bundle_roles(session)}
        assert (rows[B.key].changed_by, rows[B.key].changed_at, rows[B.key].reason) == (
            "alice", T0 + timedelta(hours=1), "agrees on 200 studies")
        assert rows[B.key].manifest_sha256 == B.manifest_sha256

        # A rewritten manifest does not inherit the role: B is active only by default then,
        # and A stays retired.
        rewritten = BundleRef(B.name, B.version, "CT", "e" * 64)
        plan = resolve_roles([A, rewritten, C], api.list_bundle_roles(session))
        assert plan.state_of(B.key).stale and plan.state_of(B.key).default
        assert {b.key for b in plan.active_for("CT")} == {B.key, C.key}

    shadowed, promoted = _audit(db_sessions, "bundle_shadowed"), _audit(db_sessions, "bundle_promoted")
    assert [(e.actor, e.detail["bundle"], e.detail["from"], e.detail["to"]) for e in shadowed] == [
        ("alice", B.key, None, "shadow"), ("alice", A.key, None, "active")]
    assert [(e.detail["bundle"], e.detail["from"], e.detail["to"], e.detail["why"]) for e in promoted] == [
        (A.key, "active", "retired", "agrees on 200 studies"), (B.key, "shadow", "active", "agrees on 200 studies")]
    assert all(e.at == T0 + timedelta(hours=1) and e.actor == "alice" for e in promoted)


# --------------------------------------------------------------------------- comparison

def _row(study: int, bundle: BundleRef, source: str, score: float | None, positive: bool | None,
         eligible: bool = True, failed: bool = False) -> BundleScoreRow:
    return BundleScoreRow(study, f"2.25.{study}", bundle.name, bundle.version, source, study, eligible, score,
                          None if score is None else 10.0 * score, positive, failed, T0 + timedelta(minutes=study))


def test_compare_on_a_known_set() -> None:
    rows = []
    # Active A (sent) vs shadow B: scores in the same order on 1-5, reversed on 6; B says
    # positive on 5 (where A is negative), A positive on 6 (where B is negative).
    verdicts = {1: (False, False), 2: (False, False), 3: (True, True), 4: (False, False), 5: (False, True),
                6: (True, False)}
    for study, (a, b) in verdicts.items():
        rows += [_row(study, A, "result", float(study), a), _row(study, B, "shadow", float(study) + 0.5, b)]
    rows[-1] = _row(6, B, "shadow", 0.1, False)
    rows += [_row(7, A, "result", None, None, eligible=False), _row(7, B, "shadow", 7.5, True)]  # eligibility
    rows += [_row(8, A, "result", 8.0, False), _row(8, B, "shadow", None, None, failed=True)]  # shadow failed
    rows += [_row(9, A, "result", 9.0, False)]  # no shadow verdict
    c = compare("CT", A.key, B.key, rows)
    assert (c.studies_both, c.scored_both, c.with_verdict_both) == (7, 6, 6)
    assert (c.both_positive, c.both_negative, c.active_only_positive, c.shadow_only_positive, c.disagree) == (
        1, 3, 1, 1, 2)
    assert (c.eligibility_disagree, c.shadow_failed) == (1, 1)
    assert c.active_positive_share == pytest.approx(2 / 6) and c.shadow_positive_share == pytest.approx(3 / 7)
    assert c.spearman == pytest.approx(1 - 6 * 30 / (6 * 35))  # ranks 1..6 vs 2,3,4,5,6,1: d^2 sums to 30
    assert [(d.study_instance_uid, d.kind) for d in c.disagreements] == [
        ("2.25.5", "screen"), ("2.25.6", "screen"), ("2.25.7", "eligibility")]


def test_compare_reports_each_bundles_brain_age_error_on_confirmed_normal_studies() -> None:
    def aged(study: int, bundle: BundleRef, source: str, predicted: float | None, normal: bool = True,
             chronological: float | None = 50.0) -> BundleScoreRow:
        return dataclasses.replace(_row(study, bundle, source, 1.0, False), predicted_age=predicted,
                                   chronological_age=chronological, confirmed_normal=normal)

    rows = [aged(1, A, "result", 58.0), aged(1, B, "shadow", 51.0),
            aged(2, A, "result", 46.0), aged(2, B, "shadow", 47.0),
            aged(3, A, "result", 90.0, normal=False), aged(3, B, "shadow", 90.0, normal=False),  # a patient
            aged(4, A, "result", 60.0, chronological=None), aged(4, B, "shadow", 50.0, chronological=None),
            aged(5, A, "result", 60.0), aged(5, B, "shadow", None)]  # the shadow's age withheld
    c = compare("MR", A.key, B.key, rows)
    assert c.age_studies == 2
    assert (c.active_age_mae, c.active_age_gap) == pytest.approx((6.0, 2.0))  # gaps +8, -4
    assert (c.shadow_age_mae, c.shadow_age_gap) == pytest.approx((2.0, -1.0))  # gaps +1, -3
    none = compare("MR", A.key, B.key, rows[4:6])
    assert none.age_studies == 0 and none.active_age_mae is None and none.shadow_age_gap is None
    assert comparison_line(c).endswith("; brain-age MAE on 2 confirmed-normal studies 6.0 y (active) vs 2.0 y (shadow)")
    assert "brain-age" not in comparison_line(none)


def test_compare_endpoint_and_promotion_form(tmp_path: Path) -> None:
    """The REST comparison on recorded results and shadow results; the console's promote
    form wants an admin and the session's CSRF token."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    settings = load_settings(None, storage_dir=str(tmp_path / "storage"), database_url=url, allow_any_caller=True,
                             environment="development", web={"port": 0})
    refs = [BundleRef("ct-fanogan", "1.0.0", "CT", "a" * 64), BundleRef("ct-fanogan", "1.1.0", "CT", "b" * 64)]
    with sessions() as session:
        add_users(session)
        put_in_shadow(session, refs, refs[1].key, "alice", "compare")
        uids = []
        for k, (score, positive, shadow_score, shadow_positive) in enumerate(
                [(1.0, False, 1.1, False), (2.0, True, 2.2, True), (3.0, False, 3.3, True)]):
            ticket = claimed_job(session, now=T0 + timedelta(hours=k))
            result_id = api.finish_job(session, ticket.job_id, "w1", outcome(anomaly_score=score,
                                                                             screen_positive=positive,
                                                                             predicted_age=60.0 + k),
                                       [], T0 + timedelta(hours=k, seconds=3605))
            api.record_shadow_result(session, result_id, ShadowOutcome(
                "ct-fanogan", "1.1.0", eligible=True, anomaly_score=shadow_score, screen_positive=shadow_positive,
                predicted_age=55.0 + k, chronological_age=54.0))
            if k < 2:
                api.set_review(session, ticket.study_instance_uid, True, True, "alice")
            # Recorded once: a second record of the same bundle beside the same result is ignored.
            assert api.record_shadow_result(session, result_id, ShadowOutcome("ct-fanogan", "1.1.0")) is None
            uids.append(ticket.study_instance_uid)
    app = create_app(settings, sessions, refs)
    viewer, admin = TestClient(app, follow_redirects=False), TestClient(app, follow_redirects=False)
    viewer.post("/api/v1/login", json={"username": VIEWER[0], "password": VIEWER[1]})
    login = admin.post("/api/v1/login", json={"username": ADMIN[0], "password": ADMIN[1]}).json()

    [body] = viewer.get("/api/v1/bundles/compare").json()
    assert (body["active"], body["shadow"], body["studies_both"], body["scored_both"]) == (
        "ct-fanogan-1.0.0", "ct-fanogan-1.1.0", 3, 3)
    assert (body["both_positive"], body["both_negative"], body["disagree"], body["spearman"]) == (1, 1, 1, 1.0)
    assert (body["active_positive_share"], body["shadow_positive_share"]) == pytest.approx((1 / 3, 2 / 3))
    assert [(d["study_instance_uid"], d["study"]) for d in body["disagreements"]] == [(uids[2], f"/studies/{uids[2]}")]
    # Studies 0 and 1 confirmed normal, chronological age 54: active ages 60, 61; shadow 55, 56.
    assert (body["age_studies"], body["active_age_mae"], body["shadow_age_mae"]) == (2, 6.5, 1.5)
    page = viewer.get("/bundles")
    assert "Brain-age error on confirmed-normal studies</th><td>active 6.5 y (mean gap +6.5), shadow 1.5 y" in page.text
    assert page.status_code == 200 and f'href="/studies/{uids[2]}"' in page.text and "Promote" not in page.text
    study_page = viewer.get(f"/studies/{uids[2]}")
    assert 'id="shadow-results"' in study_page.text and "ct-fanogan-1.1.0" in study_page.text

    form = {"reason": "shadow agrees", "old_active": "retired"}
    assert admin.post("/bundles/ct-fanogan-1.1.0/promote", data=form).status_code == 403  # no CSRF field
    assert viewer.post("/bundles/ct-fanogan-1.1.0/promote",
                       data=form | {"csrf_token": "x"}).status_code == 403
    assert admin.post("/bundles/ct-nothing-1.0/promote",
                      data=form | {"csrf_token": login["csrf_token"]}).status_code == 404
    assert "Promote" in admin.get("/bundles").text
    done = admin.post("/bundles/ct-fanogan-1.1.0/promote", data=form | {"csrf_token": login["csrf_token"]})
    assert done.status_code == 303 and done.headers["location"] == "/bundles"
    with sessions() as session:
        plan = current_plan(session, refs)
    assert [b.key for b in plan.active] == ["ct-fanogan-1.1.0"] and plan.state_of("ct-fanogan-1.0.0").role == "retired"
    roles = {b["key"]: b["role"] for b in viewer.get("/api/v1/bundles").json()["modalities"][0]["bundles"]}
    assert roles == {"ct-fanogan-1.0.0": "retired", "ct-fanogan-1.1.0": "active"}
    engine.dispose()


# --------------------------------------------------------------------------- shared stages

def test_preprocessing_is_shared_only_between_equal_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(headscreen.daemon.pipeline, "preprocess",
                        lambda volume, params: calls.append(params) or object())
    stages, timer = SharedStages(), Timer()
    first, reused_first = stages.preprocess("volume", {"a": 1, "b": [2]}, timer)
    again, reused_again = stages.preprocess("volume", {"b": [2], "a": 1}, timer)
    other, reused_other = stages.preprocess("volume", {"a": 2, "b": [2]}, timer)
    assert (reused_first, reused_again, reused_other) == (False, True, False)
    assert again is first and other is not first and len(calls) == 2


# --------------------------------------------------------------------------- end to end

def _copy(source: Path, root: Path, version: str) -> Path:
    """The bundle under another version number: a fine shadow of itself."""
    bundle = load_bundle(source)
    target = root / f"{bundle.manifest.name}-{version}"
    shutil.copytree(source, target)
    write_bundle(target, bundle.manifest.model_copy(update={"version": version}))
    return target


@pytest.fixture
def site(tmp_path: Path):
    active = fast_bundle(tmp_path / "a")
    shadow, failing = _copy(active, tmp_path / "b", "9.1.0"), _copy(active, tmp_path / "c", "9.2.0")
    pacs = RecordingSCP(tmp_path / "pacs")
    storage = tmp_path / "storage"
    url = f"sqlite:///{storage / 'headscreen.db'}"
    config = tmp_path / "headscreen.toml"
    config.write_text(
        f'environment = "development"\nallow_any_caller = true\nstorage_dir = "{storage}"\n'
        f'database_url = "{url}"\nbundles = ["{active}", "{shadow}", "{failing}"]\noverlay_slices = 1\n'
        f'heartbeat_s = 5.0\ndestinations = [{{ name = "pacs", ae_title = "RESULTS", host = "127.0.0.1", '
        f'port = {pacs.port} }}]\n[selection.CT]\nslice_thickness_mm = [0.4, 8.0]\n')
    settings = load_settings(config)
    storage.mkdir()
    upgrade(url)
    engine = make_engine(url)
    worker = Worker(settings, session_factory(engine), worker_id="shadow-test")
    yield config, settings, worker, pacs
    pacs.stop()
    engine.dispose()


def _receive(settings, sessions, phantom) -> str:
    study_uid, series_uid = generate_uid(), generate_uid()
    files = write_dicom_series(phantom, settings.storage_dir / study_uid / series_uid, study_uid=study_uid,
                               series_uid=series_uid, rows=96, cols=96, slice_thickness=8.0)
    records = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        records.append(InstanceRecord(
            study_instance_uid=study_uid, series_instance_uid=series_uid, sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=path.relative_to(settings.storage_dir).as_posix(), size_bytes=path.stat().st_size, modality="CT",
            series_number=1, instance_number=int(ds.InstanceNumber), slice_position=slice_position(ds),
            calling_ae="PACS"))
    with sessions() as session:
        api.record_instances(session, records, now=api.utcnow() - timedelta(hours=2))
    # The scheduler's own sweep: it queues a job for the modality's active bundle only.
    sweep_completeness(settings, sessions, bundle_refs(settings))
    return study_uid


def _rows(sessions, study_uid: str, model, *where):
    with sessions() as session:
        study_id = session.execute(select(Study.id).where(Study.study_instance_uid == study_uid)).scalar_one()
        return list(session.execute(select(model).where(model.study_id == study_id, *where)).scalars())


def _sent_objects(sessions, result_id: int) -> set[str]:
    with sessions() as session:
        objects = session.execute(select(ResultObject).where(ResultObject.result_id == result_id)).scalars().all()
        deliveries = session.execute(select(Delivery)).scalars().all()
    assert {d.result_object_id for d in deliveries} >= {o.id for o in objects}
    return {o.sop_instance_uid for o in objects}


def test_shadow_bundles_score_beside_the_active_one_and_a_promotion_applies_to_the_next_job(
        site, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    config, settings, worker, pacs = site
    sessions = worker.sessions
    shipped = load_bundle(next(iter(settings.bundles))).manifest
    keys = {version: f"ct-fanogan-compact-{version}" for version in (shipped.version, "9.1.0", "9.2.0")}
    active, shadow, failing = keys[shipped.version], keys["9.1.0"], keys["9.2.0"]

    def broken(*_args, **_kwargs):
        raise RuntimeError("scanner said PHANTOM^HEAD")  # a library quoting a value: never recorded

    monkeypatch.setattr(worker.runners[("ct-fanogan-compact", "9.2.0")], "run", broken)

    # Roles from the CLI: two shadows beside the bundle that was active as configured.
    assert main(["-c", str(config), "bundles", "--shadow", shadow]) == 0
    assert main(["-c", str(config), "bundles", "--shadow", failing, "--actor", "alice"]) == 0
    assert main(["-c", str(config), "bundles", "--list"]) == 0
    listing = capsys.readouterr().out
    assert f"active     {active}" in listing and f"shadow     {shadow}" in listing

    phantom = make_head("CT", age=50.0, seed=11, spacing=(2.0, 2.0, 2.0))
    first = _receive(settings, sessions, phantom)
    [job] = _rows(sessions, first, Job)
    assert (job.bundle_name, job.bundle_version) == ("ct-fanogan-compact", shipped.version)
    assert worker.run_one() and not worker.run_one()

    # One result, the active bundle's, and the PACS got exactly its objects, once each.
    [result] = _rows(sessions, first, Result)
    assert (result.bundle_version, result.eligible) == (shipped.version, True), result.qc_reasons
    sent = _sent_objects(sessions, result.id)
    assert set(pacs.received) == sent and set(pacs.received.values()) == {1}
    assert {p.name for p in (settings.results_dir / first).iterdir()} == {f"job-{job.id}-attempt-1"}
    # The shadows' verdicts are recorded beside it, nothing of theirs is written or sent.
    shadows = {s.bundle_version: s for s in _rows(sessions, first, ShadowResult)}
    assert set(shadows) == {"9.1.0", "9.2.0"}
    good, bad = shadows["9.1.0"], shadows["9.2.0"]
    assert good.result_id == result.id and good.error is None and good.eligible
    # The same ONNX model on the very same model input (shared preprocessing): the same score.
    assert good.shared_preprocessing and "preprocess" not in good.timings and "infer" in good.timings
    assert good.anomaly_score == pytest.approx(result.anomaly_score, rel=1e-5)
    assert (good.threshold, good.percentile, good.screen_positive) == (
        result.threshold, result.percentile, result.screen_positive)
    assert good.terms and str(good.reference_kind) == "bundle" and good.station_key == result.station_key
    assert bad.error.startswith("RuntimeError") and "PHANTOM" not in bad.error and bad.eligible is None

    # A second study is queued for the active bundle, then an admin promotes the shadow.
    second = _receive(settings, sessions, phantom)
    [queued] = _rows(sessions, second, Job)
    assert queued.bundle_version == shipped.version
    with sessions() as session:
        add_users(session)
    client = TestClient(create_app(settings, sessions, bundle_refs(settings)), follow_redirects=False)
    csrf = client.post("/api/v1/login", json={"username": ADMIN[0], "password": ADMIN[1]}).json()["csrf_token"]
    [before] = [c for c in client.get("/api/v1/bundles/compare").json() if c["shadow"] == shadow]
    assert (before["studies_both"], before["scored_both"], before["disagree"]) == (1, 1, 0)
    body = {"reason": "agrees with the active bundle", "old_active": "shadow"}
    assert client.post(f"/api/v1/bundles/{shadow}/promote", json=body).status_code == 403  # no CSRF header
    response = client.post(f"/api/v1/bundles/{shadow}/promote", json=body, headers={CSRF: csrf})
    assert response.status_code == 200, response.text
    assert [e.detail["to"] for e in _audit(sessions, "bundle_promoted")] == ["shadow", "active"]

    # The job queued before the promotion is claimed after it: it runs with the promoted bundle.
    assert worker.run_one()
    [result2] = _rows(sessions, second, Result)
    assert result2.bundle_version == "9.1.0" and result2.eligible
    sent2 = _sent_objects(sessions, result2.id)
    assert set(pacs.received) == sent | sent2 and set(pacs.received.values()) == {1}
    [sr] = [ds for ds in pacs.datasets() if ds.SOPInstanceUID in sent2 and ds.Modality == "SR"]
    assert "9.1.0" in str(sr.ContentSequence) and shipped.version not in str(sr.ContentSequence)
    assert {s.bundle_version for s in _rows(sessions, second, ShadowResult)} == {shipped.version, "9.2.0"}
    assert [e.detail["to"] for e in _audit(sessions, "job_rebound")] == [shadow]
    [after] = [c for c in client.get("/api/v1/bundles/compare").json() if c["shadow"] == active]
    assert (after["active"], after["studies_both"], after["scored_both"]) == (shadow, 2, 2)

    # And back from the command line: a promotion needs a reason; the old active is retired.
    assert main(["-c", str(config), "bundles", "--promote", active]) == 2
    assert main(["-c", str(config), "bundles", "--promote", active, "--reason", "rollback",
                 "--old-active", "retired", "--actor", "alice"]) == 0
    assert "no restart needed" in capsys.readouterr().out
    assert main(["-c", str(config), "bundles", "--list", "--json"]) == 0
    roles = {b["key"]: b["role"] for b in json.loads(capsys.readouterr().out)["bundles"]}
    assert roles == {active: "active", shadow: "retired", failing: "shadow"}


def test_shadow_verdicts_are_calibration_candidates(tmp_path: Path) -> None:
    """A shadow bundle can get a site reference before it is promoted: its verdicts beside
    current results count, identified by the study's current result; failed runs do not."""
    from headscreen.db.calibration import calibration_candidates

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    sessions = session_factory(make_engine(url))
    with sessions() as session:
        ids = []
        for k, (score, error) in enumerate([(1.5, None), (2.5, None), (None, "failed")]):
            ticket = claimed_job(session, now=T0 + timedelta(hours=k))
            result_id = api.finish_job(session, ticket.job_id, "w1", outcome(anomaly_score=float(k)), [],
                                       T0 + timedelta(hours=k, seconds=3605))
            api.record_shadow_result(session, result_id, ShadowOutcome(
                "ct-fanogan", "1.1.0", eligible=error is None, anomaly_score=score, station_key="ACME|CT1|ROOM1",
                scoring_sha256="b" * 64, error=error))
            ids.append(result_id)
        found = calibration_candidates(session, "ct-fanogan", "1.1.0")
    assert [(c.result_id, c.anomaly_score, c.station_key) for c in found] == [
        (ids[0], 1.5, "ACME|CT1|ROOM1"), (ids[1], 2.5, "ACME|CT1|ROOM1")]
