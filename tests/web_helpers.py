"""Builders for the web console tests: a seeded database of studies in every state the
console shows, a real Secondary Capture file for previews, users, and app settings."""

from __future__ import annotations

import http.client
import os
import random
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, sync_playwright
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db_factories import BUNDLES, SC_STORAGE, SR_STORAGE, add_series, uid
from headscreen.daemon.config import Settings, load_settings
from headscreen.daemon.web import create_app
from headscreen.db import api
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import AuditEvent, Study
from headscreen.db.types import JobOutcome, OutputObject, RetryPolicy

ADMIN, VIEWER = ("alice", "admin-pass-1"), ("victor", "viewer-pass-1")
CSRF = "X-CSRF-Token"


@dataclass
class Seeded:
    positive: str  # CT, screen-positive, with a real SC overlay file
    negative: str  # CT, normal
    qc_failed: str  # MR, QC reason, large age gap
    failed_job: str
    dead_delivery: str
    receiving: str
    sc_sop_uid: str
    dead_delivery_ids: list[int] = field(default_factory=list)


def web_settings(tmp_path: Path, database_url: str, **web: object) -> Settings:
    return load_settings(None, storage_dir=str(tmp_path / "storage"), database_url=database_url,
                         allow_any_caller=True, environment="development", web={"port": 0, **web})


def write_sc(path: Path, seed: int = 0) -> str:
    """A small RGB Secondary Capture like the worker's overlays; returns its SOP Instance UID."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[..., 0] = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    pixels[16:48, 16:48, 1] = 200
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SC_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "OT", 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _outcome(objects: list[OutputObject], series_uid: str, **overrides: object) -> JobOutcome:
    fields: dict[str, object] = {
        "eligible": True, "ineligible_reason": None, "anomaly_score": 0.05, "percentile": 40.0,
        "screen_positive": False, "threshold": 0.08, "predicted_age": None, "chronological_age": 54.0,
        "age_gap": None, "qc_reasons": [], "qc_metrics": {"brain_volume_ml": 1180.0, "head_dice": 0.99},
        "selected_series_uid": series_uid,
        "series_verdicts": [{"series_uid": series_uid, "accepted": True, "reason": "axial head", "rank": 1.0}],
        "timings": {"load_s": 0.4, "preprocess_s": 2.1, "inference_s": 0.8}, "objects": objects,
    }
    fields.update(overrides)
    return JobOutcome(**fields)  # type: ignore[arg-type]


def _study(session: Session, now: datetime, modality: str, station: str) -> tuple[str, str, int]:
    study = uid()
    series = add_series(session, study, 2, now=now, modality=modality, station_name=station)
    done = api.sweep_completeness(session, now + timedelta(minutes=5), 60, 10, BUNDLES)
    assert len(done) == 1
    return study, series, done[0]


def _finish(session: Session, now: datetime, objects: list[OutputObject], series: str, **overrides: object) -> int:
    ticket = api.claim_job(session, "w1", 600, now + timedelta(minutes=6))
    assert ticket is not None
    result_id = api.finish_job(session, ticket.job_id, "w1", _outcome(objects, series, **overrides), ["pacs"],
                               now=now + timedelta(minutes=7))
    assert result_id is not None
    return result_id


def seed(session: Session, storage: Path, now: datetime) -> Seeded:
    """Six studies in the states the console shows; every change goes through db.api."""
    random.seed(7)
    base = now - timedelta(hours=3)

    positive, series, _ = _study(session, base, "CT", "CT-NORTH")
    sc_path = storage / "results" / positive / "sc-1.dcm"
    sc_uid = write_sc(sc_path)
    sr_uid = uid()
    _finish(session, base, [OutputObject(sc_uid, SC_STORAGE, "sc", str(sc_path)),
                            OutputObject(sr_uid, SR_STORAGE, "sr", f"results/{positive}/sr.dcm")], series,
            anomaly_score=0.31, percentile=99.4, screen_positive=True)

    negative, series, _ = _study(session, base + timedelta(minutes=10), "CT", "CT-SOUTH")
    _finish(session, base + timedelta(minutes=10), [], series, anomaly_score=0.04, percentile=41.0)

    qc_failed, series, _ = _study(session, base + timedelta(minutes=20), "MR", "MR-EAST")
    _finish(session, base + timedelta(minutes=20), [], series, anomaly_score=0.5, percentile=88.0,
            predicted_age=67.0, chronological_age=55.0, age_gap=12.0,
            qc_reasons=["registration_failed"], qc_metrics={"head_similarity": 0.1})

    failed_job, _, _ = _study(session, base + timedelta(minutes=30), "CT", "CT-NORTH")
    ticket = api.claim_job(session, "w1", 600, base + timedelta(minutes=36))
    assert ticket is not None
    api.fail_job(session, ticket.job_id, "w1", "preprocess: no brain found", retryable=False,
                 now=base + timedelta(minutes=37))

    dead, series, _ = _study(session, base + timedelta(minutes=40), "CT", "CT-SOUTH")
    dead_result = _finish(session, base + timedelta(minutes=40),
                          [OutputObject(uid(), SR_STORAGE, "sr", "results/x/sr.dcm")], series,
                          anomaly_score=0.06, percentile=55.0)
    tickets = api.claim_deliveries(session, base + timedelta(minutes=48), 10, 60, result_id=dead_result)
    dead_ids = []
    for t in tickets:
        api.mark_delivery_failed(session, t.delivery_id, "association rejected", status=0xA700,
                                 policy=RetryPolicy(max_attempts=1), now=base + timedelta(minutes=49))
        dead_ids.append(t.delivery_id)

    receiving = uid()
    add_series(session, receiving, 1, now=now - timedelta(seconds=5), modality="CT", station_name="CT-NORTH")
    return Seeded(positive, negative, qc_failed, failed_job, dead, receiving, sc_uid, dead_ids)


def add_users(session: Session) -> None:
    api.create_user(session, ADMIN[0], ADMIN[1], "admin", actor="test")
    api.create_user(session, VIEWER[0], VIEWER[1], "viewer", actor="test")


@dataclass
class Console:
    settings: Settings
    sessions: sessionmaker[Session]
    seeded: Seeded

    def app(self) -> FastAPI:
        return create_app(self.settings, self.sessions, BUNDLES)

    def client(self, user: tuple[str, str] | None = None, app: FastAPI | None = None,
               address: str = "testclient", base_url: str = "http://testserver") -> TestClient:
        """A client of `app` (a fresh app, with fresh log-in throttling, when None) from `address`."""
        client = TestClient(app or self.app(), base_url=base_url, follow_redirects=False, client=(address, 50000))
        if user is not None:
            response = client.post("/api/v1/login", json={"username": user[0], "password": user[1]})
            assert response.status_code == 200, response.text
            client.headers[CSRF] = response.json()["csrf_token"]
        return client

    def audit_count(self) -> int:
        with self.sessions() as session:
            return int(session.execute(select(func.count(AuditEvent.id))).scalar_one())

    def audit_rows(self, action: str) -> list[AuditEvent]:
        with self.sessions() as session:
            return list(session.execute(select(AuditEvent).where(AuditEvent.action == action)
                                        .order_by(AuditEvent.id)).scalars())

    def study(self, uid: str) -> Study:
        with self.sessions() as session:
            return session.execute(select(Study).where(Study.study_instance_uid == uid)).scalar_one()


def open_console(tmp_path: Path, url: str, **web: object) -> Iterator[Console]:
    """A seeded console database with both users; `web` overrides [web] settings."""
    engine = make_engine(url)
    settings = web_settings(tmp_path, url, **web)
    sessions = session_factory(engine)
    with sessions() as session:
        seeded = seed(session, settings.storage_dir, api.utcnow())
        add_users(session)
    yield Console(settings, sessions, seeded)
    engine.dispose()


# Fixtures: a test module takes them by importing them.
@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    """A seeded console on a fresh SQLite file."""
    url = f"sqlite:///{tmp_path / 'db' / 'headscreen.sqlite'}"
    upgrade(url)
    yield from open_console(tmp_path, url)


@pytest.fixture
def console_any_db(tmp_path: Path, db_url: str) -> Iterator[Console]:
    """The same console on SQLite and on PostgreSQL."""
    yield from open_console(tmp_path, db_url)


_CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


def login_form_token(client: TestClient) -> str:
    """GET /login as a browser would: sets the form's cookie, returns its hidden token."""
    page = client.get("/login")
    assert page.status_code == 200
    match = _CSRF_FIELD.search(page.text)
    assert match, "login form without a CSRF field"
    return match.group(1)


# Headless Chromium (Debian package) for the browser tests: one per test module.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _chromium(args: list[str]) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: run tests/install-system-deps.sh (Debian chromium)", pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from _chromium(CHROMIUM_ARGS)


# ------------------------------------------------------------------ OHIF Viewer (tests/test_viewer_ohif.py)

# cornerstone3D (OHIF's renderer) needs WebGL2: with no GPU, Chromium's ANGLE runs it on
# SwiftShader, its CPU Vulkan; --enable-unsafe-swiftshader keeps that allowed for WebGL.
WEBGL_CHROMIUM_ARGS = [a for a in CHROMIUM_ARGS if a != "--disable-gpu"] + [
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]

# OHIF's prebuilt web app, fetched by tests/install-ohif.sh (the same version and folder).
OHIF_VERSION = "3.13.2"
OHIF_DIR_ENV = "HEADSCREEN_OHIF_DIR"
OHIF_CONFIG = Path(__file__).parent / "ohif" / "app-config.js"


def ohif_dist() -> Path:
    """The `dist/` of @ohif/app as tests/install-ohif.sh unpacked it; fails the test when absent."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = Path(os.environ.get(OHIF_DIR_ENV) or cache / "headscreen-test" / f"ohif-{OHIF_VERSION}")
    if not (folder / ".complete").is_file() or not (folder / "dist" / "index.html").is_file():
        pytest.fail(f"OHIF Viewer {OHIF_VERSION} missing in {folder}: run tests/install-ohif.sh "
                    "(tests/install-system-deps.sh runs it)", pytrace=False)
    return folder / "dist"


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
               "proxy-authorization", "proxy-authenticate", "content-length"}


class _OhifHandler(SimpleHTTPRequestHandler):
    """OHIF's files, our app-config.js, /dicom-web/ passed to Orthanc, index.html for the app's routes."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json"}
    config: Path
    orthanc_port: int

    def log_message(self, format: str, *args: object) -> None:
        pass  # URLs carry study UIDs; the test reports what matters

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web/"):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, "text/javascript", self.config.read_bytes())
        else:
            if not Path(self.translate_path(self.path)).is_file():
                self.path = "/index.html"  # a route of the single-page app (/viewer, /segmentation)
            super().do_GET()

    def _send(self, status: int, content_type: str, body: bytes,
              headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _proxy(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.orthanc_port, timeout=120)
        try:
            connection.request("GET", self.path, headers={k: v for k, v in self.headers.items()
                                                          if k.lower() not in _HOP_BY_HOP})
            response = connection.getresponse()
            body = response.read()
            headers = [(k, v) for k, v in response.getheaders()
                       if k.lower() not in _HOP_BY_HOP and k.lower() != "content-type"]
            self._send(response.status, response.getheader("Content-Type", "application/octet-stream"), body,
                       headers)
        finally:
            connection.close()


class OhifServer:
    """OHIF's dist and Orthanc's DICOMweb on one origin (no CORS), on a free localhost port.

    The standard library's threaded HTTP server is enough: static files plus one GET proxy."""

    def __init__(self, dist: Path, orthanc_port: int, config: Path = OHIF_CONFIG) -> None:
        handler = type("Handler", (_OhifHandler,), {"config": config, "orthanc_port": orthanc_port})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(dist)))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="ohif-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> OhifServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def webgl_browser() -> Iterator[Browser]:
    """Headless Chromium with WebGL2 on SwiftShader (no GPU needed), for OHIF."""
    yield from _chromium(WEBGL_CHROMIUM_ARGS)
