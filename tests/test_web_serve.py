"""`headscreen serve` runs the console beside the receiver, on the configured
localhost port, and stops it on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from daemon.orthanc import free_port
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
    subprocess.run([sys.executable, "-m", "daemon.cli", "-c", str(config), "users", "add", "ops", "--role", "viewer",
                    "--password-stdin"], input="ops-password-1\n", text=True, check=True, cwd=REPO)
    daemon.start()
    try:
        health = wait_until(lambda: _healthz(web_port), 30, 0.2, "console /healthz")
        assert set(health["checks"]) == {"process", "database", "storage", "workers"}
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
