"""The admin CLI on a real SQLite database: list, filter, flag (audited), resend, status."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from db_factories import T0, claimed_job, outcome
from headscreen.daemon.cli import main
from headscreen.db import api
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import AuditEvent


@pytest.fixture
def configured(tmp_path, monkeypatch):
    storage = tmp_path / "storage"
    config = tmp_path / "headscreen.toml"
    config.write_text(f'allow_any_caller = true\nstorage_dir = "{storage}"\n'
                      'destinations = [{ name = "pacs", ae_title = "PACS", host = "127.0.0.1", port = 1 }]\n')
    url = f"sqlite:///{storage / 'headscreen.db'}"
    storage.mkdir()
    upgrade(url)
    engine = make_engine(url)
    yield config, session_factory(engine)
    engine.dispose()


def finished_study(sessions, positive: bool, qc: list[str]) -> str:
    with sessions() as session:
        ticket = claimed_job(session)
        result = outcome(screen_positive=positive, qc_reasons=qc, percentile=99.5 if positive else 40.0)
        assert api.finish_job(session, ticket.job_id, "w1", result, ["pacs"], T0 + timedelta(seconds=3605))
    return ticket.study_instance_uid


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_list_filters_outliers_and_qc(configured, capsys):
    config, sessions = configured
    positive = finished_study(sessions, True, [])
    normal = finished_study(sessions, False, [])
    qc_failed = finished_study(sessions, False, ["registration_poor: dice 0.61"])
    code, out = run(capsys, "-c", str(config), "studies", "--json")
    assert code == 0 and {r["study_instance_uid"] for r in json.loads(out)} == {positive, normal, qc_failed}
    _, out = run(capsys, "-c", str(config), "studies", "--outliers", "--json")
    assert [r["study_instance_uid"] for r in json.loads(out)] == [positive]
    _, out = run(capsys, "-c", str(config), "studies", "--qc-failed", "--json")
    assert [r["study_instance_uid"] for r in json.loads(out)] == [qc_failed]
    _, out = run(capsys, "-c", str(config), "studies")
    assert "POS" in out and "registration_poor" in out


def test_flag_and_unflag_are_audited(configured, capsys):
    config, sessions = configured
    study = finished_study(sessions, True, [])
    assert run(capsys, "-c", str(config), "studies", "flag", study, "--comment", "check left temporal",
               "--actor", "dr.a")[0] == 0
    _, out = run(capsys, "-c", str(config), "studies", "--flagged", "--json")
    rows = json.loads(out)
    assert [r["study_instance_uid"] for r in rows] == [study] and rows[0]["flag_comment"] == "check left temporal"
    assert run(capsys, "-c", str(config), "studies", "unflag", study, "--actor", "dr.a")[0] == 0
    with sessions() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.actor == "dr.a")).all()
    assert len(events) == 2


def test_flag_unknown_study_is_a_clear_error(configured, capsys):
    config, _ = configured
    assert main(["-c", str(config), "studies", "flag", "1.2.3.4", "--comment", "x"]) == 2
    assert "1.2.3.4" in capsys.readouterr().err


def test_resend_requeues_dead_deliveries(configured, capsys):
    config, sessions = configured
    finished_study(sessions, True, [])
    with sessions() as session:
        later = T0 + timedelta(seconds=3700)
        tickets = api.claim_deliveries(session, later, 100, 30)
        assert tickets
        for t in tickets:
            api.mark_delivery_failed(session, t.delivery_id, "refused", None, api.RetryPolicy(max_attempts=1), later)
    code, out = run(capsys, "-c", str(config), "resend", "--no-send")
    assert code == 0 and f"{len(tickets)} dead-lettered" in out
    _, out = run(capsys, "-c", str(config), "status")
    assert json.loads(out)["deliveries"].get("pending") == len(tickets)


def test_config_example_prints_valid_toml(capsys):
    import tomllib

    code, out = run(capsys, "config", "example")
    assert code == 0 and tomllib.loads(out)["ae_title"] == "HEADSCREEN"


DB_PASSWORD = "Pg-s3cret-4711"
BEARER_TOKEN = "tok-9f8e7d6c5b4a3210"
STOW_PASSWORD = "stow-pass-0815"


def _config_with_secrets(tmp_path) -> str:
    return (f'allow_any_caller = true\nstorage_dir = "{tmp_path / "storage"}"\n'
            f'database_url = "postgresql+psycopg://headscreen:{DB_PASSWORD}@db.example:5432/headscreen"\n'
            'destinations = [\n'
            f'  {{ name = "web", kind = "stow", url = "https://pacs.example/dicom-web/studies", '
            f'authorization = "Bearer {BEARER_TOKEN}" }},\n'
            f'  {{ name = "web2", kind = "stow", '
            f'url = "https://hs:{STOW_PASSWORD}@pacs2.example/dicom-web/studies" }},\n'
            '  { name = "pacs", ae_title = "PACS", host = "127.0.0.1", port = 104 },\n'
            ']\n')


def test_config_check_shows_secrets_are_set_but_not_what_they_are(tmp_path, capsys):
    config = tmp_path / "headscreen.toml"
    config.write_text(_config_with_secrets(tmp_path))
    code = main(["-c", str(config), "config", "check"])
    out, err = capsys.readouterr()
    assert code == 0
    for secret in (DB_PASSWORD, BEARER_TOKEN, STOW_PASSWORD):
        assert secret not in out + err
    printed = json.loads(out)
    assert printed["database_url"] == "postgresql+psycopg://headscreen:***@db.example:5432/headscreen"
    web, web2, pacs = printed["destinations"]
    assert web["authorization"] == "Bearer ***"
    assert web2["url"] == "https://hs:***@pacs2.example/dicom-web/studies" and web2["authorization"] is None
    assert (pacs["host"], pacs["port"]) == ("127.0.0.1", 104)


def test_config_check_redacts_secrets_given_in_the_environment(tmp_path, capsys, monkeypatch):
    config = tmp_path / "headscreen.toml"
    config.write_text(f'allow_any_caller = true\nstorage_dir = "{tmp_path / "storage"}"\n')
    monkeypatch.setenv("HEADSCREEN_DATABASE_URL", f"postgresql+psycopg://hs:{DB_PASSWORD}@db/hs")
    monkeypatch.setenv("HEADSCREEN_DESTINATIONS", json.dumps([
        {"name": "web", "kind": "stow", "url": "https://pacs/dicom-web/studies",
         "authorization": f"Basic {BEARER_TOKEN}"}]))
    assert main(["-c", str(config), "config", "check"]) == 0
    out, err = capsys.readouterr()
    assert DB_PASSWORD not in out + err and BEARER_TOKEN not in out + err
    assert "hs:***@db" in out and "Basic ***" in out


def test_invalid_config_error_names_the_key_but_no_secret(tmp_path, capsys):
    config = tmp_path / "headscreen.toml"
    config.write_text(_config_with_secrets(tmp_path) + "port = 70000\n")
    assert main(["-c", str(config), "config", "check"]) == 2
    out, err = capsys.readouterr()
    assert "port" in err
    for secret in (DB_PASSWORD, BEARER_TOKEN, STOW_PASSWORD):
        assert secret not in out + err
