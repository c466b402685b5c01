"""A local Orthanc, started as a real PACS for the demo and the end-to-end tests.

Orthanc is the hospital-side peer: it forwards studies to headscreen by C-STORE
and receives the results back. Only its REST API on localhost is used.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headscreen.errors import HeadscreenError

ORTHANC_BINARY = "Orthanc"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it is still running after `timeout_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Where Debian's orthanc-dicomweb puts the DICOMweb plugin; the environment
# variable points at another copy (e.g. one unpacked without root).
DICOMWEB_PLUGIN_ENV = "HEADSCREEN_ORTHANC_DICOMWEB"
_DICOMWEB_PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7",
)


def dicomweb_plugin() -> Path | None:
    """The Orthanc DICOMweb plugin library, when installed."""
    candidates = [os.environ.get(DICOMWEB_PLUGIN_ENV, ""), *_DICOMWEB_PLUGIN_PATHS]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def orthanc_available() -> bool:
    return shutil.which(ORTHANC_BINARY) is not None or Path("/usr/sbin/Orthanc").exists()


@dataclass
class Orthanc:
    """One Orthanc process with its own storage, on free ports, localhost only."""

    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    dicom_port: int = 0
    http_port: int = 0
    process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        binary = shutil.which(ORTHANC_BINARY) or "/usr/sbin/Orthanc"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        config = {
            "Name": "headscreen-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: list(spec) for name, spec in self.modalities.items()},
            "Plugins": [str(plugin)] if (plugin := dicomweb_plugin()) else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 2,
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        # Orthanc leaves Nagle on unless told; ~45 ms lost per instance otherwise.
        env = {**os.environ, "TCP_NODELAY": "1"}
        log = (self.workdir / "orthanc.log").open("wb")
        self.process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HeadscreenError(f"Orthanc exited with {self.process.returncode}; "
                                      f"see {self.workdir / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise HeadscreenError("Orthanc did not start in time")

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def stow_url(self) -> str:
        """The DICOMweb studies endpoint (served when the DICOMweb plugin is loaded)."""
        return f"{self.url}/dicom-web/studies"

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return json.loads(data) if data else None

    def get(self, path: str):
        return self._request("GET", path)

    def post(self, path: str, payload) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self._request("POST", path, body)

    def upload(self, path: Path) -> dict:
        return self._request("POST", "/instances", Path(path).read_bytes(), "application/dicom")

    def push_study(self, modality: str, orthanc_study_id: str) -> object:
        """C-STORE a whole study from Orthanc to one of its configured modalities."""
        return self.post(f"/modalities/{modality}/store", {"Resources": [orthanc_study_id], "Synchronous": True})

    def find_study(self, study_instance_uid: str) -> str | None:
        ids = self.post("/tools/lookup", study_instance_uid.encode())
        for item in ids or []:
            if item.get("Type") == "Study":
                return item["ID"]
        return None

    def series_of_study(self, study_instance_uid: str) -> list[dict]:
        study_id = self.find_study(study_instance_uid)
        if study_id is None:
            return []
        return self.get(f"/studies/{study_id}/series?expand") or []

    def instance_tags(self, instance_id: str) -> dict:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
