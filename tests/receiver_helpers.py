"""Synthetic DICOM for the receiver tests and the ingest bench (no patient data)."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.callers import AllowedCaller
from headscreen.daemon.orthanc import free_port, stop_process
from headscreen.daemon.receiver import Receiver, ReceiverConfig, start_receiver
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import IngestRejection, Instance

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's documented example root


def make_uid(rng: random.Random) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(rng.random())])


def ct_slice(study_uid: str, series_uid: str, sop_uid: str, index: int, count: int,
             pixels: np.ndarray, *, spacing_mm: float = 2.5) -> Dataset:
    """One axial CT slice with coherent geometry and synthetic demographics."""
    rows, cols = pixels.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(prefix=UID_ROOT, entropy_srcs=[study_uid, "frame"])
    ds.Modality = "CT"
    ds.PatientName = "PHANTOM^HEAD"
    ds.PatientID = "SYNTH0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientAge = "064Y"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "HEAD 2.5mm"
    ds.InstanceNumber = index + 1
    ds.ImagesInAcquisition = count
    ds.StationName = "CT01"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-0.5 * cols, -0.5 * rows, index * spacing_mm]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = spacing_mm
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def write_ct_series(out_dir: Path, count: int, *, rows: int = 64, cols: int = 64,
                    seed: int = 0, extra: dict[str, object] | None = None) -> list[Path]:
    """Write a synthetic CT series (one file per slice) and return the paths in slice order;
    `extra` sets attributes by keyword on every slice."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    study_uid, series_uid = make_uid(rng), make_uid(rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = noise.integers(-1000, 1500, size=(rows, cols), dtype=np.int16)
        ds = ct_slice(study_uid, series_uid, make_uid(rng), index, count, pixels)
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        path = out_dir / f"ct_{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- test certificates (openssl CLI; tests/install-system-deps.sh installs it) -----------------


class Pki:
    """A throw-away CA with a server certificate (localhost, 127.0.0.1), two client
    certificates it signed and one client certificate from an untrusted CA; PEM files."""

    def __init__(self, folder: Path) -> None:
        import shutil
        import subprocess

        if shutil.which("openssl") is None:
            raise AssertionError("openssl is missing: run tests/install-system-deps.sh")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=120, cwd=folder)

        def ca(name: str) -> None:
            run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
                "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN=headscreen test {name}",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")

        def leaf(name: str, cn: str, issuer: str, san: str) -> None:
            (folder / f"{name}.ext").write_text(
                f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                f"extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={san}\n")
            run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={cn}")
            run("x509", "-req", "-sha256", "-days", "2", "-in", f"{name}.csr", "-CA", f"{issuer}.crt",
                "-CAkey", f"{issuer}.key", "-CAcreateserial", "-out", f"{name}.crt", "-extfile", f"{name}.ext")

        ca("ca")
        ca("rogue_ca")
        leaf("server", "localhost", "ca", "DNS:localhost,IP:127.0.0.1")
        leaf("client", "pacs.example", "ca", "DNS:pacs.example")
        leaf("other", "other.example", "ca", "DNS:other.example")
        leaf("rogue", "pacs.example", "rogue_ca", "DNS:pacs.example")

    def pair(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of 'server', 'client', 'other' or 'rogue'."""
        return self.folder / f"{name}.crt", self.folder / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def rogue_ca(self) -> Path:
        return self.folder / "rogue_ca.crt"


# --- a receiver on a free port with its own SQLite database -------------------------------------

SCP_AE = "HEADSCREEN"
SCU_AE = "STORESCU"


@dataclass
class Harness:
    receiver: Receiver
    sessions: sessionmaker[Session]
    storage_dir: Path

    def close(self) -> None:
        self.receiver.shutdown()
        self.sessions.kw["bind"].dispose()

    @property
    def port(self) -> int:
        return self.receiver.port

    def instances(self) -> list[Instance]:
        with self.sessions() as session:
            return list(session.scalars(select(Instance).order_by(Instance.instance_number)))

    def rejections(self) -> list[IngestRejection]:
        with self.sessions() as session:
            return list(session.scalars(select(IngestRejection).order_by(IngestRejection.id)))

    def stored_files(self) -> list[Path]:
        return sorted(self.storage_dir.rglob("*.dcm"))


def start_harness(tmp_path: Path, sessions: sessionmaker[Session] | None = None, *,
                  allowed: tuple[AllowedCaller, ...] = (AllowedCaller(SCU_AE),), **overrides: object) -> Harness:
    """start_receiver on 127.0.0.1, free ports, no disk watermark; overrides go to ReceiverConfig."""
    if sessions is None:
        url = f"sqlite:///{tmp_path / 'headscreen.db'}"
        upgrade(url)
        sessions = session_factory(make_engine(url))
    options: dict[str, object] = {"allowed_callers": allowed, "disk_min_free_mb": 0, **overrides}
    config = ReceiverConfig(ae_title=SCP_AE, storage_dir=tmp_path / "data", bind_address="127.0.0.1",
                            port=0, **options)  # type: ignore[arg-type]
    return Harness(start_receiver(config, sessions), sessions, config.storage_dir)


class TlsStorescp:
    """dcmtk storescp with TLS on a free port, started and stopped by PID."""

    def __init__(self, folder: Path, pki: Pki) -> None:
        self.folder = folder
        self.out = folder / "received"
        self.out.mkdir(parents=True)
        self.port = free_port()
        cert, key = pki.pair("server")
        log = (folder / "storescp.log").open("wb")
        self.process = subprocess.Popen(
            ["storescp", "+tls", str(key), str(cert), "-pw", "+cf", str(pki.ca), "-aet", "RESULTS",
             "-od", str(self.out), str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not _listening(self.port):
            assert self.process.poll() is None, (folder / "storescp.log").read_text()
            assert time.monotonic() < deadline, "storescp did not start listening"
            time.sleep(0.1)

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.out.iterdir())]

    def stop(self) -> None:
        stop_process(self.process)


def _listening(port: int) -> bool:
    """Whether something listens on the port; looks at /proc so as not to open (and
    break) a TLS association with a bare probe."""
    hex_port = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(line.split()[1].endswith(hex_port) and line.split()[3] == "0A" for line in lines):
            return True
    return False


def idle_sockets(port: int, sources: list[str]) -> list[socket.socket]:
    """TCP connections to 127.0.0.1:port that never send a byte, one per source address given."""
    sockets = []
    for source in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True once the receiver has closed this connection (EOF or reset)."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def associate_once_a_slot_frees(ae: AE, port: int, timeout_s: float) -> Any:
    """Associate until the receiver stops refusing (a released slot is counted free again
    within moments, not at once); the association, which the caller releases."""
    deadline = time.monotonic() + timeout_s
    while (assoc := ae.associate("127.0.0.1", port, ae_title=SCP_AE)).is_rejected:
        assert time.monotonic() < deadline, "the released slot never came back"
        time.sleep(0.2)
    return assoc

