"""Operations that follow conventions: /metrics through prometheus_client, /healthz that
tells the truth (liveness apart from readiness, 503 naming what failed), logs as one JSON
object per line, `headscreen --version`, one-line errors with documented exit codes,
and unknown configuration keys rejected in every section."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from sqlalchemy import func, select

from db_factories import BUNDLES, T0, add_series, claimed_job, outcome, uid
from headscreen.daemon.cli import main
from headscreen.daemon.config import Settings, example_toml, load_settings
from headscreen.daemon.logs import JsonFormatter, TextFormatter
from headscreen.daemon.receiver import ReceiverConfig, start_receiver
from headscreen.daemon.web import create_app, health
from headscreen.daemon.web.health import ServeRuntime
from headscreen.daemon.web.metrics import _ResultTail
from headscreen.db import api
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.models import IngestRejection
from headscreen.errors import ConfigError
from headscreen.privacy import WithholdValues
from serve_harness import REPO
from web_helpers import Console

SHIPPED_CT_BUNDLE = next(p for p in sorted((REPO / "models").iterdir()) if p.name.startswith("ct-fanogan-compact-"))


def scrape(client, accept: str | None = None) -> dict[str, object]:
    response = client.get("/metrics", headers={"Accept": accept} if accept else {})
    assert response.status_code == 200
    parse = openmetrics_families if accept else text_string_to_metric_families
    return {family.name: family for family in parse(response.text)}


def value(families: dict, family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in families[family].samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, (family, sample, labels, families[family].samples)
    return found[0]


# --- /metrics ---------------------------------------------------------------------------------

def test_metrics_types_and_names_follow_prometheus_conventions(console: Console) -> None:
    response = console.client().get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    ours = {name: f for name, f in families.items() if name.startswith("headscreen_")}
    assert {"headscreen_studies", "headscreen_jobs", "headscreen_jobs_finished", "headscreen_results",
            "headscreen_deliveries", "headscreen_deliveries_delivered", "headscreen_instances_stored",
            "headscreen_pipeline_stage_duration_seconds", "headscreen_study_turnaround_seconds",
            "headscreen_job_duration_seconds", "headscreen_queue_oldest_job_age_seconds",
            "headscreen_build_info"} <= set(ours)
    for name, family in ours.items():
        assert re.fullmatch(r"headscreen_[a-z0-9_]+", name), name
        assert not re.search(r"_(ms|milliseconds|minutes|hours|percent)(_|$)", name), f"{name}: not a base unit"
        if family.type == "counter":
            assert all(s.name in (f"{name}_total", f"{name}_created") for s in family.samples), name
        elif family.type == "gauge":
            assert not name.endswith("_total"), f"{name}: a gauge named like a counter"
        elif family.type == "histogram":
            kinds = {s.name.removeprefix(name) for s in family.samples}
            assert kinds <= {"_bucket", "_count", "_sum"}, (name, kinds)
            assert any(s.labels.get("le") == "+Inf" for s in family.samples), name
        else:
            raise AssertionError(f"{name}: unexpected type {family.type}")
        if any(word in name for word in ("duration", "turnaround", "age_seconds", "latency")):
            assert name.endswith("_seconds"), name
    # Counters are counters, histograms have buckets.
    assert ours["headscreen_results"].type == "counter" and ours["headscreen_jobs_finished"].type == "counter"
    assert ours["headscreen_pipeline_stage_duration_seconds"].type == "histogram"
    assert families["process_start_time_seconds"].type == "gauge"
    assert value(families, "headscreen_instances_stored", "headscreen_instances_stored") == 11
    assert value(families, "headscreen_jobs_finished", "headscreen_jobs_finished_total", outcome="failed") == 1
    assert value(families, "headscreen_deliveries", "headscreen_deliveries", state="dead") == 1
    assert value(families, "headscreen_results", "headscreen_results_total",
                 bundle="ct-fanogan-1.0.0", outcome="positive") == 1
    assert console.seeded.positive not in response.text  # no study UIDs, let alone patient data


def test_counters_and_histograms_grow_with_events_and_only_then(console_any_db: Console) -> None:
    console = console_any_db
    client = console.client()
    before = scrape(client)
    again = scrape(client)
    histogram = ("headscreen_pipeline_stage_duration_seconds", "headscreen_pipeline_stage_duration_seconds_count")
    assert value(again, *histogram, stage="inference") == value(before, *histogram, stage="inference") == 4

    with console.sessions() as session:  # a worker finishes one more job
        ticket = claimed_job(session)
        assert api.finish_job(session, ticket.job_id, "w1", outcome(timings={"inference_s": 0.7}), ["pacs"],
                              T0 + timedelta(seconds=3605))
    after = scrape(client)
    done = ("headscreen_jobs_finished", "headscreen_jobs_finished_total")
    assert value(after, *done, outcome="done") == value(before, *done, outcome="done") + 1
    positive = ("headscreen_results", "headscreen_results_total")
    assert (value(after, *positive, bundle="ct-fanogan-1.0.0", outcome="positive")
            == value(before, *positive, bundle="ct-fanogan-1.0.0", outcome="positive") + 1)
    assert value(after, *histogram, stage="inference") == 5
    bucket = ("headscreen_pipeline_stage_duration_seconds", "headscreen_pipeline_stage_duration_seconds_bucket")
    assert value(after, *bucket, stage="inference", le="1.0") == value(before, *bucket, stage="inference", le="1.0") + 1
    assert value(scrape(client), *histogram, stage="inference") == 5  # read once, not again per scrape


def test_openmetrics_when_asked(console: Console) -> None:
    families = scrape(console.client(), accept="application/openmetrics-text; version=1.0.0")
    assert families["headscreen_results"].type == "counter"
    assert families["headscreen_result_anomaly_score"].type == "histogram"


def test_a_scrape_reports_an_unreadable_database_instead_of_failing(tmp_path: Path) -> None:
    settings = load_settings(None, storage_dir=str(tmp_path), allow_any_caller=True, web={"port": 0},
                             database_url=f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    engine = make_engine(settings.database_url)
    try:
        client = _client(create_app(settings, session_factory(engine), BUNDLES))
        families = scrape(client)
        assert value(families, "headscreen_database_up", "headscreen_database_up") == 0
        live = client.get("/healthz/live")
        assert live.status_code == 200 and live.json()["ok"] is True
        ready = client.get("/healthz/ready")
        assert ready.status_code == 503 and "database" in ready.json()["failed"]
    finally:
        engine.dispose()


@dataclass
class Row:
    id: int
    created_at: datetime
    timings: dict = field(default_factory=lambda: {"infer_s": 1.0})
    anomaly_score: float | None = None
    percentile: float | None = None
    bundle_name: str = "b"
    bundle_version: str = "1"
    started_at: datetime | None = None
    last_received_at: datetime | None = None


def test_the_result_tail_counts_a_row_that_commits_after_a_higher_id() -> None:
    # PostgreSQL hands out ids before commit: row 2 may be visible before row 1.
    now = datetime(2026, 1, 5, 12, tzinfo=UTC)
    tail = _ResultTail()
    table: list[Row] = [Row(1, now - timedelta(hours=2)), Row(3, now - timedelta(seconds=2))]

    def fetch(after: int) -> list[Row]:
        return sorted((r for r in table if r.id > after), key=lambda r: r.id)

    def count() -> float:
        return [s.value for m in tail.stage.collect() for s in m.samples if s.name.endswith("_count")][0]

    tail.consume(fetch, now)
    assert count() == 2 and tail.cursor == 1  # row 1 is settled; row 3 is remembered
    table.append(Row(2, now - timedelta(seconds=3)))  # its transaction commits only now
    tail.consume(fetch, now)
    assert count() == 3
    for _ in range(2):
        tail.consume(fetch, now + timedelta(hours=2))  # all settled: the cursor moves on, nothing twice
    assert count() == 3 and tail.cursor == 3 and not tail.recent


# --- /healthz ---------------------------------------------------------------------------------

def _client(app):
    from fastapi.testclient import TestClient

    return TestClient(app, follow_redirects=False)


def test_readiness_names_the_failed_checks_and_liveness_stays_up(console_any_db: Console) -> None:
    console = console_any_db
    client = console.client()
    ready = client.get("/healthz/ready")
    assert ready.status_code == 200, ready.json()
    body = ready.json()
    assert body["ok"] is True and body["failed"] == [] and body["role"] == "console"
    assert set(body["checks"]) == {"process", "database", "storage", "workers", "scheduler"}
    assert client.get("/healthz").json()["checks"].keys() == body["checks"].keys()

    with console.sessions() as session:
        # A study quiet for an hour is still receiving: nothing completes studies.
        add_series(session, uid(), 2, now=api.utcnow() - timedelta(hours=1))
        # A job whose lease ran out long ago is still "running": its worker is gone.
        claimed_job(session)
    console.settings.disk_min_free_mb = 10**12  # more than any disk
    ready = client.get("/healthz/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["failed"] == ["scheduler", "storage", "workers"]
    assert "receiving" in body["checks"]["scheduler"]["error"] and body["checks"]["scheduler"]["overdue_studies"] == 1
    assert "lease" in body["checks"]["workers"]["error"] and body["checks"]["workers"]["stale_leases"] == 1
    assert "disk_min_free_mb" in body["checks"]["storage"]["error"]
    assert client.get("/healthz").status_code == 503
    live = client.get("/healthz/live")
    assert live.status_code == 200 and live.json()["ok"] is True and set(live.json()["checks"]) == {"process"}


@dataclass
class FakeProcess:
    alive: bool = True

    def is_alive(self) -> bool:
        return self.alive


def test_inside_serve_readiness_probes_the_receiver_sweeps_and_worker_processes(
        console: Console, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "PROBE_REUSE_S", 0.0)  # each request probes afresh
    receiver = start_receiver(ReceiverConfig(ae_title="HEADSCREEN", storage_dir=tmp_path / "in",
                                             bind_address="127.0.0.1", port=0, allowed_callers=["PACS"],
                                             durable=False), console.sessions)
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(lambda: None, "interval", seconds=0.2, id="completeness")
    pool = SimpleNamespace(count=2, processes={0: FakeProcess(), 1: FakeProcess()})
    runtime = ServeRuntime(receiver, scheduler, pool)
    scheduler.start()
    receiver_stopped = False
    try:
        client = _client(create_app(console.settings, console.sessions, BUNDLES, runtime))
        deadline = time.monotonic() + 60
        while runtime.sweeps.snapshot()[1].get("completeness") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        ready = client.get("/healthz/ready")
        body = ready.json()
        assert ready.status_code == 200, body
        assert body["role"] == "serve" and body["checks"]["receiver"]["ok"] is True
        assert body["checks"]["receiver"]["address"] == f"127.0.0.1:{receiver.port}"
        assert body["checks"]["scheduler"]["last_sweep_at"] is not None
        assert body["checks"]["workers"]["processes_alive"] == 2
        with console.sessions() as session:  # the probe is no refused peer
            assert session.execute(select(func.count(IngestRejection.id))).scalar_one() == 0

        receiver.stats.add_sanitised(["PatientAge", "PatientAge"], ["StationName"])
        families = scrape(client)
        assert value(families, "headscreen_receiver_instances_stored",
                     "headscreen_receiver_instances_stored_total") == 0
        header_values = ("headscreen_receiver_header_values", "headscreen_receiver_header_values_total")
        assert value(families, *header_values, outcome="dropped", keyword="PatientAge") == 2
        assert value(families, *header_values, outcome="truncated", keyword="StationName") == 1
        assert value(families, "headscreen_worker_processes", "headscreen_worker_processes", state="alive") == 2
        assert families["headscreen_scheduler_last_sweep_timestamp_seconds"].type == "gauge"

        pool.processes[1].alive = False
        body = client.get("/healthz/ready").json()
        assert body["failed"] == ["workers"] and "1 of 2 worker" in body["checks"]["workers"]["error"]
        pool.processes[1].alive = True

        scheduler.shutdown(wait=True)
        ready = client.get("/healthz/ready")
        assert ready.status_code == 503 and ready.json()["failed"] == ["scheduler"]

        receiver.shutdown()
        receiver_stopped = True
        ready = client.get("/healthz/ready")
        assert ready.status_code == 503 and ready.json()["failed"] == ["receiver", "scheduler"]
        assert ready.json()["checks"]["receiver"]["error"]
        assert client.get("/healthz/live").status_code == 200
    finally:
        if not receiver_stopped:
            receiver.shutdown()
        if scheduler.running:
            scheduler.shutdown(wait=False)


# --- logs -------------------------------------------------------------------------------------

def _log_through(formatter: logging.Formatter, emit, withhold: bool = False) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    if withhold:
        handler.addFilter(WithholdValues())
    logger = logging.getLogger(f"test.operations.{uid()}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    emit(logger)
    return stream.getvalue()


def _raise_and_log(logger: logging.Logger) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("job \x1b[31mfailed\x1b[0m\nsecond line", extra={"job_id": 7, "peer": "\x1b[1mPACS\x1b[0m",
                                                                             "time": "not the timestamp"})


@pytest.mark.parametrize("withhold", [False, True])
def test_json_logs_are_one_object_per_line_with_an_aware_time_and_the_traceback_inside(withhold: bool) -> None:
    text = _log_through(JsonFormatter(), _raise_and_log, withhold)
    lines = text.splitlines()
    assert len(lines) == 1 and "\x1b" not in text and "\\u001b" not in text
    event = json.loads(lines[0])
    stamp = datetime.fromisoformat(event["time"])
    assert stamp.utcoffset() == timedelta(0) and abs((datetime.now(UTC) - stamp).total_seconds()) < 3600
    assert event["level"] == "ERROR" and event["message"] == "job failed\nsecond line"
    assert event["job_id"] == 7 and event["peer"] == "PACS" and event["time_"] == "not the timestamp"
    trace = event["error_trace" if withhold else "exception"]
    assert "Traceback" in trace and "RuntimeError" in trace


def test_text_logs_have_no_colour_codes_and_one_line_per_message() -> None:
    text = _log_through(TextFormatter(), lambda logger: logger.warning("a \x1b[32mgreen\x1b[0m\nb",
                                                                        extra={"peer": "X\ny"}))
    assert "\x1b" not in text and text.count("\n") == 1
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 WARNING ", text)
    assert "a green\\nb" in text and "peer=X\\ny" in text
    with_trace = _log_through(TextFormatter(), _raise_and_log)
    first, *rest = with_trace.splitlines()
    assert "\x1b" not in with_trace and rest and all(line.startswith("    ") for line in rest)


# --- the command line -------------------------------------------------------------------------

def cli(*argv: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headscreen", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout_s)


def test_version_and_exit_codes_in_help() -> None:
    version = cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"headscreen \S+\n", version.stdout), version
    helptext = cli("--help")
    assert helptext.returncode == 0
    assert "exit codes:" in helptext.stdout and re.search(r"\n  2 +usage or configuration error", helptext.stdout)


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "headscreen.toml"
    path.write_text(f'allow_any_caller = true\nstorage_dir = "{tmp_path / "storage"}"\nbind_address = "127.0.0.1"\n'
                    f"workers = 0\n{extra}\n[web]\nenabled = false\n")
    return path


def test_a_bogus_study_state_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("-c", str(_config(tmp_path)), "studies", "--state", "bogus")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid choice: 'bogus'" in result.stderr and "receiving" in result.stderr


def test_serve_on_a_port_in_use_says_so_in_one_json_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("-c", str(_config(tmp_path, f"port = {port}")), "serve", "--log-format", "json")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]  # every line is one JSON object
    last = events[-1]
    assert last["level"] == "ERROR" and last["exit_code"] == 1
    assert f"127.0.0.1:{port}" in last["message"] and "already in use" in last["message"]
    assert all(datetime.fromisoformat(e["time"]).tzinfo is not None for e in events)


def test_an_unknown_anomaly_kind_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("evaluate", "--bundle", str(SHIPPED_CT_BUNDLE), "--kinds", "hemorrhage",
                 "--report", str(tmp_path / "report"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown anomaly type(s) hemorrhage" in result.stderr and "subdural" in result.stderr
    assert not (tmp_path / "report").exists()


def test_an_unexpected_error_is_one_line_without_its_message(monkeypatch, capsys, tmp_path: Path) -> None:
    def broken(args) -> int:
        raise ValueError("Smith^John 19700101")  # a message that quotes patient data

    monkeypatch.setattr("headscreen.daemon.cli.cmd_status", broken)
    assert main(["-c", str(_config(tmp_path)), "status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ValueError" in err and "Smith" not in err and "19700101" not in err


def test_runtime_failures_exit_1_in_one_line(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "bad-storage.toml"
    config.write_text(f'allow_any_caller = true\nstorage_dir = "{blocker / "storage"}"\n')
    assert main(["-c", str(config), "db", "upgrade"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker / "storage") in err and "Not a directory" in err
    # A database that cannot be opened (here: a folder where the file should be).
    config.write_text(f'allow_any_caller = true\nstorage_dir = "{tmp_path}"\ndatabase_url = "sqlite:///{tmp_path}"\n')
    assert main(["-c", str(config), "status"]) == 1
    err = capsys.readouterr().err
    assert err == "headscreen: database: unable to open database file\n"


def test_a_configuration_error_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["-c", str(_config(tmp_path, "port = 70000")), "config", "check"]) == 2
    assert "port" in capsys.readouterr().err


# --- configuration: unknown keys --------------------------------------------------------------

def test_a_top_level_key_appended_after_the_last_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "headscreen.toml"
    path.write_text(example_toml() + "\nworkers = 4\n")  # lands in [selection.CT]
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "unknown key 'workers' in [selection.CT]" in message and "top-level key" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("[calibration]\nworkers = 4\n", "calibration.workers: unknown key 'workers' in [calibration]"),
    ("[delivery]\nmax_attempt = 4\n", "unknown key 'max_attempt' in [delivery]"),
    ("[web]\nsesion_hours = 4\n", "unknown key 'sesion_hours' in [web]"),
    ('destinations = [{ name = "p", ae_title = "P", host = "h", port = 4, colour = 1 }]\n',
     "unknown key 'colour' in destinations[0]"),
    ("[selection.MR]\nmin_slice = 4\n", "unknown key 'min_slice' in [selection.MR]"),
    ('[selection.CT]\npreferences = [{ field = "description", pattern = "x", weight = 1.0, label = "l", '
     'wieght = 2 }]\n', "unknown key 'wieght' in selection.CT.preferences[0]"),
    ("typo_key = 1\n", "unknown key 'typo_key' (not a setting)"),
])
def test_unknown_keys_are_refused_naming_key_and_section(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "headscreen.toml"
    path.write_text("allow_any_caller = true\n" + text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert expected in str(info.value), str(info.value)


def test_an_unknown_nested_key_from_the_environment_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HEADSCREEN_DELIVERY__MAX_ATTEMPT", "4")
    with pytest.raises(ConfigError, match="unknown key 'max_attempt' in \\[delivery\\]"):
        load_settings(None, allow_any_caller=True, storage_dir=str(tmp_path))


def _section_models(model: type[BaseModel], seen: set[type]) -> Iterator[type[BaseModel]]:
    if model in seen:
        return
    seen.add(model)
    yield model
    for info in model.model_fields.values():
        for inner in _types_in(info.annotation):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from _section_models(inner, seen)


def _types_in(annotation) -> Iterator[object]:
    yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _types_in(arg)


def test_every_section_model_forbids_unknown_keys_and_only_selection_is_a_free_dict() -> None:
    models = list(_section_models(Settings, set()))
    assert len(models) >= 5
    for model in models:
        assert model.model_config.get("extra") == "forbid", f"{model.__name__} accepts unknown keys"
    free_dicts = [name for name, info in Settings.model_fields.items()
                  if any(getattr(t, "__origin__", None) is dict for t in _types_in(info.annotation))]
    assert free_dicts == ["selection"]  # checked key by key in Settings.selection_rules
