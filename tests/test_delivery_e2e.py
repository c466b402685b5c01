"""Delivery with real peers: a destination that is down, one that never returns,
kill -9 mid-delivery, and DICOMweb STOW-RS against a real HTTP server.

Each daemon test starts `headscreen serve` as its own process (SQLite in a temp
folder, the shipped bundles) and a pynetdicom Storage SCP as the destination.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from headscreen.daemon.config import DestinationConfig
from headscreen.daemon.orthanc import DICOMWEB_PLUGIN_ENV, Orthanc, dicomweb_plugin, free_port
from headscreen.errors import TransientError
from headscreen.export.delivery import STATUS_SUCCESS, send_stow
from headscreen.export.sc import choose_slices
from headscreen.imaging.phantoms import Lesion, make_head, write_dicom_series
from receiver_helpers import Pki, TlsStorescp
from serve_harness import REPO, Daemon, RecordingSCP, storescu, wait_until

pytestmark = pytest.mark.slow  # end to end with real peers: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("ct")
    phantom = make_head("CT", age=51.0, seed=8,
                        lesion=Lesion(kind="hemorrhage", center_mm=(20.0, -5.0, 10.0), volume_ml=12.0))
    return write_dicom_series(phantom, folder, rows=256, cols=256, slices=90, slice_thickness=2.0,
                              series_description="HEAD 2.0 soft tissue")


@pytest.fixture
def short_lease(monkeypatch):
    # The delivery lease is 4 x timeout_s: 2 s keeps a crashed delivery's lease short.
    monkeypatch.setenv("HEADSCREEN_DELIVERY__TIMEOUT_S", "2")


def _objects(daemon: Daemon) -> dict[str, str]:
    """SOP Instance UID -> delivery state, for the current (not superseded) result."""
    return {obj.sop_instance_uid: delivery.state for delivery, obj in daemon.deliveries()}


def _failed_attempts(daemon: Daemon) -> int:
    return sum(d.attempts for d, _ in daemon.deliveries() if d.state != "delivered")


def _assert_each_once(daemon: Daemon, destination: RecordingSCP) -> None:
    objects = _objects(daemon)
    assert objects and set(objects.values()) == {"delivered"}
    assert set(destination.received) == set(objects)
    assert all(count == 1 for count in destination.received.values()), destination.received


def test_destination_down_then_back_gets_each_object_once(tmp_path, study):
    destination = RecordingSCP(tmp_path / "pacs")
    destination.stop()
    daemon = Daemon(tmp_path / "hs", destinations=[("pacs", destination.ae_title, destination.port)]).start()
    try:
        storescu(study, daemon.port)
        wait_until(lambda: _failed_attempts(daemon) >= 1, 50, 0.1, "a failed delivery attempt")
        destination.start()
        wait_until(daemon.all_delivered, 30, 0.2, "every object delivered")
        _assert_each_once(daemon, destination)
        kinds = {obj.kind for _, obj in daemon.deliveries()}
        assert kinds == {"sc", "seg", "sr"}  # the phantom lesion is above threshold: a SEG too
    finally:
        daemon.close()
        destination.stop()


def test_dead_letters_are_resent_once_by_the_cli(tmp_path, study):
    destination = RecordingSCP(tmp_path / "pacs")
    destination.stop()
    daemon = Daemon(tmp_path / "hs", destinations=[("pacs", destination.ae_title, destination.port)]).start()
    try:
        storescu(study, daemon.port)

        def all_dead() -> bool:
            states = set(_objects(daemon).values())
            return bool(daemon.results()) and states == {"dead"}

        wait_until(all_dead, 50, 0.2, "every delivery dead-lettered")
        assert all(d.attempts == 4 for d, _ in daemon.deliveries())
        destination.start()
        resend = subprocess.run([sys.executable, "-m", "headscreen", "-c", str(daemon.config), "resend"],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        assert resend.returncode == 0, resend.stderr
        assert f"{len(_objects(daemon))} dead-lettered deliveries queued again" in resend.stdout
        wait_until(daemon.all_delivered, 30, 0.2, "every object delivered after resend")
        _assert_each_once(daemon, destination)
    finally:
        daemon.close()
        destination.stop()


class SlowSCP(RecordingSCP):
    """A destination that stores each object, then takes a while to answer."""

    delay_s = 0.4

    def _store(self, event) -> int:
        status = super()._store(event)
        time.sleep(self.delay_s)  # the response is what we want the kill to overtake
        return status


def test_kill9_mid_delivery_loses_nothing_and_resends_at_most_the_one_in_flight(tmp_path, study, short_lease):
    destination = SlowSCP(tmp_path / "pacs")
    daemon = Daemon(tmp_path / "hs", destinations=[("pacs", destination.ae_title, destination.port)]).start()
    try:
        storescu(study, daemon.port)
        wait_until(lambda: sum(destination.received.values()) >= 3, 60, 0.05, "delivery under way")
        daemon.kill9()
        confirmed_before = {uid for uid, state in _objects(daemon).items() if state == "delivered"}
        received_before = set(destination.received)
        assert confirmed_before and len(confirmed_before) < len(_objects(daemon)), "kill did not land mid-delivery"
        daemon.start()
        wait_until(daemon.all_delivered, 40, 0.2, "every object delivered after restart")
        objects = _objects(daemon)
        assert set(destination.received) == set(objects)  # nothing lost
        twice = {uid for uid, count in destination.received.items() if count > 1}
        # A confirmed delivery is never re-sent; only the object whose response the
        # kill overtook may arrive again, with the identical SOP Instance UID.
        assert not twice & confirmed_before
        assert len(twice) <= 1 and twice <= received_before
        assert all(count <= 2 for count in destination.received.values())
    finally:
        daemon.close()
        destination.stop()


# --- DICOMweb STOW-RS ---------------------------------------------------------


class StowServer:
    """A real HTTP STOW-RS endpoint: parses the multipart body with the stdlib
    email parser and pydicom, and answers a PS3.18 DICOM JSON response."""

    def __init__(self, fail_uids: frozenset[str] = frozenset(), http_status: int | None = None) -> None:
        self.received: list[pydicom.Dataset] = []
        self.requests: list[dict[str, str]] = []
        self.fail_uids = fail_uids
        self.http_status = http_status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append(dict(self.headers))
                if server.http_status is not None:
                    self.send_response(server.http_status)
                    self.end_headers()
                    return
                self._answer(*server.store(self.headers["Content-Type"], body))

            def _answer(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web/studies"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def store(self, content_type: str, body: bytes) -> tuple[int, dict]:
        message = email.message_from_bytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
        )
        assert message.get_content_type() == "multipart/related"
        assert message.get_param("type") == "application/dicom"
        stored, failed = [], []
        for part in message.iter_parts():
            assert part.get_content_type() == "application/dicom"
            dataset = pydicom.dcmread(io.BytesIO(part.get_payload(decode=True)))
            uid = str(dataset.SOPInstanceUID)
            item = {"00081150": {"vr": "UI", "Value": [str(dataset.SOPClassUID)]},
                    "00081155": {"vr": "UI", "Value": [uid]}}
            if uid in self.fail_uids:
                failed.append({**item, "00081197": {"vr": "US", "Value": [0xA700]}})
            else:
                self.received.append(dataset)
                stored.append(item)
        response = {"00081199": {"vr": "SQ", "Value": stored}}
        if failed:
            response["00081198"] = {"vr": "SQ", "Value": failed}
        return (200 if not failed else 202 if stored else 409), response

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def result_files(tmp_path_factory) -> list[Path]:
    from headscreen.daemon.pipeline import _build_results
    from test_export import ct_summary, make_ct_series

    datasets, error = make_ct_series(seed=4)
    objects = _build_results(datasets, error * 2.0, ct_summary(), choose_slices(error, 3),
                             tmp_path_factory.mktemp("results"), 1.0)
    assert {o.kind for o in objects} == {"sc", "seg", "sr"}
    return [Path(o.path) for o in objects]


def test_stow_delivers_every_object(result_files):
    server = StowServer()
    try:
        statuses = send_stow(server.url, result_files, timeout=10, authorization="Bearer t0ken")
        assert statuses == {p: STATUS_SUCCESS for p in result_files}
        sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in result_files}
        assert {str(d.SOPInstanceUID) for d in server.received} == sent
        assert len(server.requests) == 1 and server.requests[0]["Authorization"] == "Bearer t0ken"
        assert "multipart/related" in server.requests[0]["Content-Type"]
    finally:
        server.close()


def test_stow_reports_per_instance_failures(result_files):
    refused = str(pydicom.dcmread(result_files[0]).SOPInstanceUID)
    server = StowServer(fail_uids=frozenset({refused}))
    try:
        statuses = send_stow(server.url, result_files, timeout=10)
        assert statuses[result_files[0]] == 0xA700
        assert all(statuses[p] == STATUS_SUCCESS for p in result_files[1:])
    finally:
        server.close()


def test_stow_server_errors_and_closed_ports_are_transient(result_files):
    server = StowServer(http_status=503)
    try:
        with pytest.raises(TransientError, match="HTTP 503"):
            send_stow(server.url, result_files, timeout=10)
    finally:
        server.close()
    with pytest.raises(TransientError):
        send_stow(server.url, result_files, timeout=2)


def test_destination_config_by_kind():
    assert DestinationConfig(name="p", ae_title="P", host="h", port=104).kind == "dimse"
    stow = DestinationConfig(name="w", kind="stow", url="https://pacs/dicom-web/studies")
    assert stow.url and stow.ae_title is None
    with pytest.raises(ValueError, match="needs url"):
        DestinationConfig(name="w", kind="stow")
    with pytest.raises(ValueError, match="needs ae_title"):
        DestinationConfig(name="p", host="h", port=104)


def test_stow_to_orthanc_dicomweb(tmp_path, result_files):
    """Orthanc's DICOMweb plugin (Debian orthanc-dicomweb) as a real STOW-RS peer."""
    assert dicomweb_plugin() is not None, (
        f"Orthanc's DICOMweb plugin is missing: run tests/install-system-deps.sh (or set {DICOMWEB_PLUGIN_ENV})"
    )
    with Orthanc(tmp_path / "orthanc") as orthanc:
        statuses = send_stow(orthanc.stow_url, result_files, timeout=30)
        assert statuses == {p: STATUS_SUCCESS for p in result_files}
        study_uid = str(pydicom.dcmread(result_files[0]).StudyInstanceUID)
        modalities = {s["MainDicomTags"].get("Modality") for s in orthanc.series_of_study(study_uid)}
        assert {"SEG", "SR"} <= modalities
        assert len(orthanc.get("/instances")) == len(result_files)


def test_serve_delivers_to_a_stow_destination(tmp_path, study, monkeypatch):
    """`headscreen serve` with a kind = "stow" destination (given via the environment)."""
    server = StowServer()
    monkeypatch.setenv("HEADSCREEN_DESTINATIONS", json.dumps([{"name": "web", "kind": "stow", "url": server.url}]))
    daemon = Daemon(tmp_path / "hs").start()
    try:
        storescu(study, daemon.port)
        wait_until(daemon.all_delivered, 50, 0.2, "every object delivered by STOW-RS")
        objects = _objects(daemon)
        received = [str(d.SOPInstanceUID) for d in server.received]
        assert sorted(received) == sorted(objects)  # each exactly once
        assert {delivery.destination for delivery, _ in daemon.deliveries()} == {"web"}
    finally:
        daemon.close()
        server.close()


# --- DICOM TLS both ways ------------------------------------------------------


def test_serve_receives_and_delivers_over_dicom_tls(tmp_path, study, monkeypatch):
    """`headscreen serve` with [receiver.tls] (client certificates required) and a TLS
    destination: dcmtk storescu +tls sends the study, dcmtk storescp +tls gets the results."""
    pki = Pki(tmp_path / "pki")
    destination = TlsStorescp(tmp_path / "pacs", pki)
    server_cert, server_key = pki.pair("server")
    client_cert, client_key = pki.pair("client")
    monkeypatch.setenv("HEADSCREEN_DESTINATIONS", json.dumps([{
        "name": "tls-pacs", "ae_title": "RESULTS", "host": "127.0.0.1", "port": destination.port,
        "tls": {"ca": str(pki.ca), "cert": str(client_cert), "key": str(client_key)}}]))
    tls_port = free_port()
    daemon = Daemon(tmp_path / "hs", extra=(
        f'[receiver.tls]\nenabled = true\nport = {tls_port}\ncert = "{server_cert}"\nkey = "{server_key}"\n'
        f'ca = "{pki.ca}"\nrequire_client_cert = true\n'
        'caller_certificates = [{ ae_title = "STORESCU", subject_cn = "pacs.example" }]\n')).start()
    try:
        storescu(study, tls_port, extra=("+tls", str(client_key), str(client_cert), "-pw", "+cf", str(pki.ca)))
        wait_until(daemon.all_delivered, 90, 0.2, "every object delivered over TLS")
        objects = _objects(daemon)
        assert sorted(str(d.SOPInstanceUID) for d in destination.received()) == sorted(objects)
        assert {delivery.destination for delivery, _ in daemon.deliveries()} == {"tls-pacs"}
        assert daemon.instance_count() == len(study)
    finally:
        daemon.close()
        destination.stop()
