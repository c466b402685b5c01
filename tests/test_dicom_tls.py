"""DICOM TLS both ways, against real peers: dcmtk storescu/storescp built with OpenSSL,
and Orthanc with DicomTlsEnabled. Certificates come from a throw-away CA made with the
openssl CLI (receiver_helpers.Pki); every peer runs on its own free port, by PID."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from headscreen.daemon.callers import AllowedCaller, TlsServerConfig
from headscreen.daemon.connections import TLS_REFUSED_STATUS
from headscreen.daemon.orthanc import free_port, stop_process
from headscreen.daemon.receiver import ASSOCIATION_REJECTED_STATUS
from headscreen.errors import TransientError
from headscreen.export.delivery import STATUS_SUCCESS, Destination, TlsClient, send
from receiver_helpers import SCP_AE, SCU_AE, Harness, Pki, TlsStorescp, start_harness, write_ct_series

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("ct"), 3, seed=21)


def _tls(pki: Pki, **overrides: object) -> TlsServerConfig:
    cert, key = pki.pair("server")
    options: dict[str, object] = {"cert": cert, "key": key, "ca": pki.ca, "require_client_cert": True, "port": 0,
                                  **overrides}
    return TlsServerConfig(**options)  # type: ignore[arg-type]


@pytest.fixture
def tls_harness(tmp_path: Path, pki: Pki) -> Iterator[Harness]:
    h = start_harness(tmp_path, tls=_tls(pki))
    yield h
    h.close()


def _storescu_tls(port: int, paths: list[Path], tls_args: list[str], calling: str = SCU_AE,
                  ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-to", "20", "-ta", "20", *tls_args, "-aet", calling, "-aec", SCP_AE,
                           "127.0.0.1", str(port), *map(str, paths)], capture_output=True, text=True, timeout=TIMEOUT_S)


def _wait_for_rejections(harness: Harness, count: int) -> list:
    deadline = time.monotonic() + TIMEOUT_S
    while len(rows := harness.rejections()) < count:
        assert time.monotonic() < deadline, f"{len(rows)} of {count} refusals recorded"
        time.sleep(0.1)
    return rows


def _with_cert(pki: Pki, name: str = "client") -> list[str]:
    cert, key = pki.pair(name)
    return ["+tls", str(key), str(cert), "-pw", "+cf", str(pki.ca)]


def test_storescu_over_tls_is_stored_and_plain_dicom_stays_available(tls_harness: Harness, pki: Pki,
                                                                     series: list[Path]) -> None:
    assert tls_harness.receiver.tls_port not in (None, tls_harness.port)
    result = _storescu_tls(tls_harness.receiver.tls_port, series, _with_cert(pki))  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series}
    assert {row.sop_instance_uid for row in tls_harness.instances()} == sent
    # The plain port serves too (sites that need plain DICOM keep it).
    plain = subprocess.run(["echoscu", "-aet", SCU_AE, "-aec", SCP_AE, "127.0.0.1", str(tls_harness.port)],
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    assert plain.returncode == 0, plain.stderr


def test_plain_association_to_the_tls_port_fails_and_is_recorded(tls_harness: Harness) -> None:
    port = tls_harness.receiver.tls_port
    result = subprocess.run(["echoscu", "-to", "20", "-ta", "20", "-aet", SCU_AE, "-aec", SCP_AE, "127.0.0.1",
                             str(port)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0
    # Recorded off the accept path by the refusal log's thread: soon, not necessarily yet.
    (row,) = _wait_for_rejections(tls_harness, 1)
    assert row.status == TLS_REFUSED_STATUS and row.reason.startswith("connection closed: TLS handshake failed")


def test_client_without_a_trusted_certificate_is_refused(tls_harness: Harness, pki: Pki,
                                                         series: list[Path]) -> None:
    port = tls_harness.receiver.tls_port
    anonymous = _storescu_tls(port, series, ["+tla", "+cf", str(pki.ca)])  # type: ignore[arg-type]
    assert anonymous.returncode != 0
    rogue = _storescu_tls(port, series, _with_cert(pki, "rogue"))  # type: ignore[arg-type]
    assert rogue.returncode != 0
    assert tls_harness.instances() == []
    rows = _wait_for_rejections(tls_harness, 2)
    assert all(r.status == TLS_REFUSED_STATUS and "TLS handshake failed" in r.reason for r in rows)
    assert tls_harness.receiver.stats.snapshot()["connections"]["tls_failed"] == 2


def test_client_certificate_must_be_the_one_mapped_to_the_calling_ae(tmp_path: Path, pki: Pki,
                                                                     series: list[Path]) -> None:
    h = start_harness(tmp_path, allowed=(AllowedCaller(SCU_AE), AllowedCaller("OTHER_SCU")),
                      tls=_tls(pki, caller_certificates=[(SCU_AE, "pacs.example"), ("OTHER_SCU", "other.example")]))
    try:
        port = h.receiver.tls_port
        assert _storescu_tls(port, series[:1], _with_cert(pki, "client")).returncode == 0  # type: ignore[arg-type]
        # A trusted certificate, but mapped to another AE title: A-ASSOCIATE-RJ, calling AE not recognised.
        swapped = _storescu_tls(port, series[:1], _with_cert(pki, "other"))  # type: ignore[arg-type]
        assert swapped.returncode != 0
        assert "calling ae title not recognized" in swapped.stderr.lower(), swapped.stderr
        (row,) = h.rejections()
        assert row.status == ASSOCIATION_REJECTED_STATUS and row.calling_ae == SCU_AE
        assert "client certificate not mapped" in row.reason
        assert len(h.instances()) == 1
    finally:
        h.close()


def test_a_silent_peer_on_the_tls_port_does_not_block_the_others(tmp_path: Path, pki: Pki,
                                                                 series: list[Path]) -> None:
    h = start_harness(tmp_path, tls=_tls(pki), association_request_timeout_s=30.0)
    silent = []
    try:
        for _ in range(3):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", h.receiver.tls_port))  # never starts the handshake
            silent.append(sock)
        started = time.monotonic()
        result = _storescu_tls(h.receiver.tls_port, series[:1], _with_cert(pki))  # type: ignore[arg-type]
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 25  # well inside the 30 s the silent ones may wait
    finally:
        for sock in silent:
            sock.close()
        h.close()


def test_tls_only_receiver_has_no_plain_port(tmp_path: Path, pki: Pki) -> None:
    h = start_harness(tmp_path, tls=_tls(pki), plain=False)
    try:
        assert h.port == h.receiver.tls_port
    finally:
        h.close()


# --- delivery over TLS ----------------------------------------------------------------------------


@pytest.fixture
def storescp(tmp_path: Path, pki: Pki) -> Iterator[TlsStorescp]:
    peer = TlsStorescp(tmp_path / "storescp", pki)
    yield peer
    peer.stop()


def test_delivery_to_dcmtk_storescp_over_tls(storescp: TlsStorescp, pki: Pki, series: list[Path]) -> None:
    cert, key = pki.pair("client")
    destination = Destination("tls-pacs", "RESULTS", "127.0.0.1", storescp.port,
                              tls=TlsClient(ca=pki.ca, cert=cert, key=key))
    statuses = send(destination, series, timeout=30)
    assert statuses == dict.fromkeys(series, STATUS_SUCCESS)
    assert {ds.SOPInstanceUID for ds in storescp.received()} == {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series}


def test_delivery_refuses_a_server_it_cannot_verify(storescp: TlsStorescp, pki: Pki, series: list[Path]) -> None:
    cert, key = pki.pair("client")
    untrusted = Destination("tls-pacs", "RESULTS", "127.0.0.1", storescp.port,
                            tls=TlsClient(ca=pki.rogue_ca, cert=cert, key=key))
    with pytest.raises(TransientError, match="over TLS"):
        send(untrusted, series[:1], timeout=30)
    misnamed = Destination("tls-pacs", "RESULTS", "127.0.0.1", storescp.port,
                           tls=TlsClient(ca=pki.ca, cert=cert, key=key, server_name="pacs.elsewhere"))
    with pytest.raises(TransientError, match="over TLS"):
        send(misnamed, series[:1], timeout=30)
    assert storescp.received() == []


# --- Orthanc with DicomTlsEnabled -------------------------------------------------------------------


class TlsOrthanc:
    """Orthanc whose DICOM port speaks TLS only (DicomTlsEnabled), requiring client certificates."""

    def __init__(self, folder: Path, pki: Pki, modalities: dict[str, dict[str, object]]) -> None:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        assert Path(binary).exists(), "Orthanc is missing: run tests/install-system-deps.sh"
        folder.mkdir(parents=True)
        self.folder = folder
        self.dicom_port, self.http_port = free_port(), free_port()
        cert, key = pki.pair("server")
        config = {
            "Name": "headscreen-tls-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "DicomAet": "ORTHANC", "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "DicomModalities": modalities,
            "DicomTlsEnabled": True, "DicomTlsCertificate": str(cert), "DicomTlsPrivateKey": str(key),
            "DicomTlsTrustedCertificates": str(pki.ca), "DicomTlsRemoteCertificateRequired": True,
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        log = (folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert self.process.poll() is None, (folder / "orthanc.log").read_text()[-2000:]
            try:
                self.request("GET", "/system")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "Orthanc did not start"
                time.sleep(0.2)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return json.loads(data) if data else None

    def instance_uids(self) -> set[str]:
        ids = self.request("GET", "/instances") or []
        return {self.request("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in ids}

    def stop(self) -> None:
        stop_process(self.process)


def test_orthanc_sends_to_us_over_tls_and_receives_our_delivery(tmp_path: Path, pki: Pki,
                                                                series: list[Path]) -> None:
    h = start_harness(tmp_path / "hs", allowed=(AllowedCaller("ORTHANC"),),
                      tls=_tls(pki, caller_certificates=[("ORTHANC", "localhost")]))
    # Orthanc presents its one certificate (CN=localhost) as server and as client.
    orthanc = TlsOrthanc(tmp_path / "orthanc", pki, {
        "headscreen": {"AET": SCP_AE, "Host": "127.0.0.1", "Port": h.receiver.tls_port, "UseDicomTls": True}})
    try:
        for path in series:
            orthanc.request("POST", "/instances", path.read_bytes(), "application/dicom")
        study = orthanc.request("GET", "/studies")[0]
        orthanc.request("POST", "/modalities/headscreen/store", json.dumps(
            {"Resources": [study], "Synchronous": True}).encode())
        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series}
        assert {row.sop_instance_uid for row in h.instances()} == sent

        orthanc.request("DELETE", f"/studies/{study}")
        cert, key = pki.pair("client")
        destination = Destination("orthanc", "ORTHANC", "127.0.0.1", orthanc.dicom_port,
                                  tls=TlsClient(ca=pki.ca, cert=cert, key=key))
        assert send(destination, series, calling_ae=SCP_AE, timeout=30) == dict.fromkeys(series, STATUS_SUCCESS)
        assert orthanc.instance_uids() == sent
    finally:
        orthanc.stop()
        h.close()


def test_another_receiver_process_serves_the_tls_port_too(tmp_path: Path, pki: Pki, series: list[Path]) -> None:
    """[receiver] processes = 2: the second process accepts on serve's TLS socket and does
    its own handshake (serve's own receiver is held, so every connection goes to it)."""
    from test_receiver_pool import PoolHarness

    pool = PoolHarness(tmp_path, tls=_tls(pki))
    try:
        pool.pause_own_accepting()
        result = _storescu_tls(pool.pool.tls_port, series, _with_cert(pki))  # type: ignore[arg-type]
        assert result.returncode == 0, result.stderr
        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series}
        assert {row.sop_instance_uid for row in pool.instances()} == sent
        assert (pool.storage_dir / ".journal-1").is_dir()
        anonymous = _storescu_tls(pool.pool.tls_port, series, ["+tla", "+cf", str(pki.ca)])  # type: ignore[arg-type]
        assert anonymous.returncode != 0
    finally:
        pool.close()
