"""`headscreen serve` runs the console beside the receiver, on the configured
localhost port, and stops it on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from headscreen.daemon.orthanc import free_port
from serve_harness import REPO, Daemon, wait_until


def _healthz(port: int) -> dict | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def test_serve_starts_the_console_and_stops_it(tmp_path: Path) -> None:
    web_port = free_port()
    daemon = Daemon(tmp_path / "hs", workers=0, web_port=web_port)
    config = daemon.config
    subprocess.run([sys.executable, "-m", "headscreen", "-c", str(config), "users", "add", "ops", "--role", "viewer",
                    "--password-stdin"], input="ops-password-1\n", text=True, check=True, cwd=REPO)
    daemon.start()
    try:
        health = wait_until(lambda: _healthz(web_port), 30, 0.2, "console /healthz")
        assert set(health["checks"]) == {"process", "database", "storage", "workers", "scheduler", "receiver"}
        anonymous = httpx.get(f"http://127.0.0.1:{web_port}/api/v1/studies", timeout=5)
        assert anonymous.status_code == 401
        login = httpx.post(f"http://127.0.0.1:{web_port}/api/v1/login",
                           json={"username": "ops", "password": "ops-password-1"}, timeout=5)
        assert login.status_code == 200
        studies = httpx.get(f"http://127.0.0.1:{web_port}/api/v1/studies", cookies=login.cookies, timeout=5)
        assert studies.json()["studies"] == []
    finally:
        assert daemon.stop() == 0
    assert _healthz(web_port) is None


def test_serve_health_metrics_and_json_logs(tmp_path: Path) -> None:
    """Readiness inside serve probes the receiver and the sweeps; /metrics carries the
    receiver's own counters; with log_format = "json" every line of the log is one object."""
    web_port = free_port()
    daemon = Daemon(tmp_path / "hs", workers=0, web_port=web_port, extra='log_format = "json"')
    daemon.start()
    base = f"http://127.0.0.1:{web_port}"
    try:
        health = wait_until(lambda: _healthz(web_port), 60, 0.2, "console /healthz")
        assert health["role"] == "serve" and health["checks"]["receiver"]["ok"] is True
        ready = wait_until(lambda: httpx.get(f"{base}/healthz/ready", timeout=10).json()["checks"]["scheduler"]
                           .get("last_sweep_at"), 60, 0.2, "a completeness sweep")
        assert datetime.fromisoformat(ready).tzinfo is not None
        assert httpx.get(f"{base}/healthz/live", timeout=10).status_code == 200
        text = httpx.get(f"{base}/metrics", timeout=10).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["headscreen_receiver_instances_stored"].type == "counter"
        assert families["headscreen_worker_processes"].type == "gauge"
        assert families["headscreen_studies"].type == "gauge"
    finally:
        assert daemon.stop() == 0
    lines = (daemon.workdir / "serve.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # a line that is not JSON fails here
    assert any(e["message"] == "headscreen serving" for e in events) and events[-1]["message"] == "stopped"
    assert all(datetime.fromisoformat(e["time"]).utcoffset() is not None for e in events)
