"""`headscreen demo`: the whole product on one machine, against a real PACS.

Starts Orthanc (when installed; otherwise a local pynetdicom Storage SCP) as
the hospital PACS, starts `headscreen serve` with SQLite in a work folder,
synthesizes a healthy and an abnormal head CT and a brain MR study from the
offline templates, sends them by C-STORE, waits for the results to arrive back,
prints a table per study and writes PNG previews of the overlays.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from PIL import Image
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select

from headscreen.daemon.orthanc import Orthanc, free_port, orthanc_available
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.models import Delivery, Result, ResultObject, Study
from headscreen.errors import HeadscreenError
from headscreen.export.delivery import requestor_handlers

if TYPE_CHECKING:  # at run time imaging is imported only where a study is synthesized
    from headscreen.imaging.phantoms import LesionKind

log = logging.getLogger(__name__)

SENDER_AE = "DEMO-SCU"


@dataclass(frozen=True)
class DemoCase:
    label: str
    modality: str
    age: float
    lesion_kind: LesionKind | None
    seed: int


CASES = (
    DemoCase("CT healthy", "CT", 46.0, None, 11),
    DemoCase("CT hemorrhage", "CT", 71.0, "hemorrhage", 12),
    DemoCase("MR brain", "MR", 63.0, None, 13),
)


def synthesize(case: DemoCase, out_dir: Path) -> tuple[str, list[Path]]:
    """A phantom study written as DICOM; returns (StudyInstanceUID, files)."""
    from headscreen.imaging.phantoms import Lesion, Pose, make_head, write_dicom_series

    lesion = Lesion(kind=case.lesion_kind, center_mm=(25.0, -10.0, 15.0), volume_ml=20.0) if case.lesion_kind else None
    phantom = make_head(case.modality, age=case.age, seed=case.seed,
                        pose=Pose(rotation_deg=(4.0, -3.0, 6.0), translation_mm=(5.0, -8.0, 10.0)), lesion=lesion)
    study_uid = pydicom.uid.generate_uid()
    if case.modality == "CT":
        paths = write_dicom_series(phantom, out_dir, study_uid=study_uid, rows=512, cols=512, slice_thickness=1.0,
                                   series_description="HEAD 1.0 H30s soft tissue")
    else:
        paths = write_dicom_series(phantom, out_dir, study_uid=study_uid, rows=256, cols=256, slice_thickness=1.0,
                                   series_description="3D T1 MPRAGE")
    return study_uid, paths


def send_files(paths: list[Path], port: int, called_ae: str) -> None:
    """C-STORE with dcmtk's storescu when present (a real third-party client)."""
    if shutil.which("storescu"):
        env = {**os.environ, "TCP_NODELAY": "1"}
        cmd = ["storescu", "-aet", SENDER_AE, "-aec", called_ae, "127.0.0.1", str(port), *map(str, paths)]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return
    ae = AE(ae_title=SENDER_AE)
    ae.requested_contexts = StoragePresentationContexts[:128]
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, evt_handlers=requestor_handlers())
    if not assoc.is_established:
        raise HeadscreenError("could not associate with headscreen")
    try:
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            if not status or status.Status != 0:
                raise HeadscreenError(f"C-STORE failed for {path.name}")
    finally:
        assoc.release()


class LocalStorageSCP:
    """Fallback destination when Orthanc is not installed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        ae = AE(ae_title="DEMO-PACS")
        ae.supported_contexts = StoragePresentationContexts
        server = ae.start_server(("127.0.0.1", self.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None  # block=False returns the running server
        self.server = server

    def _store(self, event) -> int:
        (self.folder / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def write_config(work: Path, port: int, destination: tuple[str, str, int]) -> Path:
    name, aet, dport = destination
    config = work / "headscreen.toml"
    config.write_text(
        f"""environment = "development"
ae_title = "HEADSCREEN"
bind_address = "127.0.0.1"
port = {port}
allowed_callers = [{{ ae_title = "{SENDER_AE}" }}, {{ ae_title = "ORTHANC" }}]
storage_dir = "{work / 'storage'}"
quiet_period_s = 20.0
whole_quiet_s = 2.0
workers = 2
disk_min_free_mb = 100
sweep_interval_s = 0.5
destinations = [{{ name = "{name}", ae_title = "{aet}", host = "127.0.0.1", port = {dport} }}]

[web]
enabled = false  # the demo exits when done; `headscreen web` serves the console
"""
    )
    return config


def wait_for_echo(port: int, serve: subprocess.Popen, timeout_s: float = 60.0) -> None:
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context("1.2.840.10008.1.1")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise HeadscreenError(f"headscreen serve exited with {serve.returncode}")
        assoc = ae.associate("127.0.0.1", port, ae_title="HEADSCREEN")
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            return
        time.sleep(0.3)
    raise HeadscreenError("headscreen did not answer C-ECHO in time")


@dataclass
class StudyReport:
    label: str
    study_uid: str
    score: float | None = None
    percentile: float | None = None
    screen_positive: bool | None = None
    predicted_age: float | None = None
    chronological_age: float | None = None
    age_gap: float | None = None
    qc: str = ""
    seconds_to_delivery: float | None = None
    objects: list[str] | None = None
    done: bool = False


def poll_results(database_url: str, studies: dict[str, str], storage_dir: Path) -> list[StudyReport]:
    engine = make_engine(database_url)
    reports = []
    try:
        with session_factory(engine)() as session:
            for study_uid, label in studies.items():
                report = StudyReport(label, study_uid)
                study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
                result = None
                if study is not None:
                    result = session.scalar(
                        select(Result).where(Result.study_id == study.id, Result.superseded.is_(False))
                        .order_by(Result.id.desc())
                    )
                if result is not None:
                    objects = session.scalars(select(ResultObject).where(ResultObject.result_id == result.id)).all()
                    deliveries = session.scalars(
                        select(Delivery).where(Delivery.result_object_id.in_([o.id for o in objects]))
                    ).all()
                    delivered = [d for d in deliveries if d.state == "delivered"]
                    report.score, report.percentile = result.anomaly_score, result.percentile
                    report.screen_positive = result.screen_positive
                    report.predicted_age, report.chronological_age = result.predicted_age, result.chronological_age
                    report.age_gap = result.age_gap
                    report.qc = "; ".join(result.qc_reasons or []) or "none"
                    # Result paths are recorded relative to the storage root (daemon.blobstore).
                    report.objects = [str(storage_dir / o.path) for o in objects if o.kind == "sc"]
                    report.done = bool(deliveries) and len(delivered) == len(deliveries)
                    completed_at = study.completed_at if study is not None else None
                    if report.done and completed_at is not None:
                        last = max(_aware(d.delivered_at) for d in delivered if d.delivered_at is not None)
                        report.seconds_to_delivery = (last - _aware(completed_at)).total_seconds()
                reports.append(report)
    finally:
        engine.dispose()
    return reports


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def write_previews(report: StudyReport, folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = sorted(report.objects or [])
    if not paths:
        return []
    picks = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))]
    written = []
    slug = report.label.lower().replace(" ", "-")
    for index, path in enumerate(picks):
        pixels = pydicom.dcmread(path).pixel_array
        out = folder / f"{slug}-{index + 1}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(out)
        written.append(out)
    return written


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(reports: list[StudyReport]) -> None:
    print()
    print(f"{'study':<15} {'score':>9} {'pct':>6} {'screen':>7} {'pred age':>8} {'age':>6} {'gap':>6} "
          f"{'s to deliv':>10}  QC flags")
    for r in reports:
        screen = "-" if r.screen_positive is None else ("POS" if r.screen_positive else "neg")
        print(f"{r.label:<15} {_fmt(r.score, 4):>9} {_fmt(r.percentile):>6} {screen:>7} {_fmt(r.predicted_age):>8} "
              f"{_fmt(r.chronological_age):>6} {_fmt(r.age_gap):>6} {_fmt(r.seconds_to_delivery, 2):>10}  {r.qc}")
    print()


def run_demo(work: Path, timeout_s: float = 240.0) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    port = free_port()
    orthanc: Orthanc | None = None
    local: LocalStorageSCP | None = None
    if orthanc_available():
        orthanc = Orthanc(work / "orthanc", modalities={"headscreen": ("HEADSCREEN", "127.0.0.1", port)}).start()
        destination = ("orthanc", orthanc.aet, orthanc.dicom_port)
        print(f"PACS: Orthanc on DICOM port {orthanc.dicom_port}, web {orthanc.url}")
    else:
        local = LocalStorageSCP(work / "received")
        destination = ("local", "DEMO-PACS", local.port)
        print(f"PACS: Orthanc not installed; a local Storage SCP on port {local.port}")
    config = write_config(work, port, destination)
    serve_log = (work / "serve.log").open("wb")
    serve = subprocess.Popen([sys.executable, "-m", "headscreen", "-c", str(config), "serve"],
                             stdout=serve_log, stderr=subprocess.STDOUT)
    try:
        wait_for_echo(port, serve)
        print(f"headscreen listening on port {port} (log: {work / 'serve.log'})")
        studies: dict[str, str] = {}
        for case in CASES:
            started = time.monotonic()
            study_uid, paths = synthesize(case, work / "input" / case.label.replace(" ", "_"))
            print(f"synthesized {case.label}: {len(paths)} slices in {time.monotonic() - started:.1f} s")
            if orthanc is not None:
                # The hospital's flow: the study is in the PACS, which forwards it.
                for path in paths:
                    orthanc.upload(path)
                orthanc_id = orthanc.find_study(study_uid)
                if orthanc_id is None:
                    raise HeadscreenError(f"Orthanc does not list the study {case.label} just uploaded")
                orthanc.push_study("headscreen", orthanc_id)
                print(f"  Orthanc forwarded {case.label} to headscreen by C-STORE")
            else:
                send_files(paths, port, "HEADSCREEN")
                print(f"  sent {case.label} to headscreen with storescu")
            studies[study_uid] = case.label
        deadline = time.monotonic() + timeout_s
        reports = poll_results(_database_url(work), studies, work / "storage")
        while not all(r.done for r in reports) and time.monotonic() < deadline:
            if serve.poll() is not None:
                raise HeadscreenError(f"headscreen serve exited with {serve.returncode}; see serve.log")
            time.sleep(1.0)
            reports = poll_results(_database_url(work), studies, work / "storage")
        print_table(reports)
        for report in reports:
            for png in write_previews(report, work / "previews"):
                print(f"preview: {png}")
        if orthanc is not None:
            for report in reports:
                series = orthanc.series_of_study(report.study_uid)
                kinds = sorted({s["MainDicomTags"].get("Modality", "?") for s in series})
                print(f"Orthanc holds {report.label}: {len(series)} series ({', '.join(kinds)})")
        missing = [r.label for r in reports if not r.done]
        if missing:
            print(f"results not delivered within {timeout_s:.0f} s: {', '.join(missing)}", file=sys.stderr)
            return 1
        return 0
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
        if orthanc:
            orthanc.stop()
        if local:
            local.stop()


def _database_url(work: Path) -> str:
    return f"sqlite:///{work / 'storage' / 'headscreen.db'}"
