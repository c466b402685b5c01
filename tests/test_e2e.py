"""End to end, with real peers: dcmtk storescu, a Storage SCP destination, Orthanc.

Each test starts `headscreen serve` as its own process with SQLite in a temp
folder and the shipped model bundles.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from headscreen.daemon.orthanc import Orthanc
from headscreen.imaging.phantoms import Lesion, Pose, make_head, write_dicom_series
from serve_harness import Daemon, RecordingSCP, dciodvfy_errors, storescu, wait_until

pytestmark = pytest.mark.slow  # end to end with real peers (dcmtk, Orthanc): `make test-fast` leaves it out

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def big_ct(tmp_path_factory) -> list[Path]:
    """The 300-slice 512x512 head CT the foundation issue asks for."""
    folder = tmp_path_factory.mktemp("ct300")
    phantom = make_head("CT", age=58.0, seed=3,
                        pose=Pose(rotation_deg=(3.0, 0.0, -4.0), translation_mm=(4.0, 6.0, -5.0)),
                        lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=15.0))
    return write_dicom_series(phantom, folder, rows=512, cols=512, slices=300, slice_thickness=0.6,
                              series_description="HEAD 0.6 H30s soft tissue")


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("ct-small")
    phantom = make_head("CT", age=44.0, seed=5)
    return write_dicom_series(phantom, folder, rows=256, cols=256, slices=90, slice_thickness=2.0,
                              series_description="HEAD 2.0 soft tissue")


def check_results(datasets: list[pydicom.Dataset], source_study_uid: str) -> tuple[list, pydicom.Dataset]:
    sc = [d for d in datasets if d.SOPClassUID == SC_CLASS]
    sr = [d for d in datasets if d.SOPClassUID == SR_CLASS]
    assert sc and len(sr) == 1
    assert {d.StudyInstanceUID for d in datasets} == {source_study_uid}
    report = hd.sr.Comprehensive3DSR.from_dataset(sr[0])
    return sc, report


def test_storescu_300_slices_to_results(tmp_path, big_ct):
    destination = RecordingSCP(tmp_path / "pacs")
    daemon = Daemon(tmp_path / "hs", destinations=[("pacs", destination.ae_title, destination.port)]).start()
    try:
        started = time.monotonic()
        storescu(big_ct, daemon.port)
        elapsed = time.monotonic() - started
        study_uid = pydicom.dcmread(big_ct[0], stop_before_pixels=True).StudyInstanceUID
        # Every acknowledged instance is on disk and in the database.
        assert daemon.instance_count(study_uid) == 300
        stored = list((daemon.storage / study_uid).rglob("*.dcm"))
        assert len(stored) == 300
        wait_until(daemon.all_delivered, 180, what="results delivered")
        sc, report = check_results(destination.datasets(), study_uid)
        assert all(count == 1 for count in destination.received.values())
        result = daemon.results()[0]
        assert result.eligible and result.anomaly_score is not None
        print(f"\n300 slices sent in {elapsed:.1f} s; stage timings: {result.timings}")
        for path in sorted((tmp_path / "pacs").glob("*.dcm"))[:3] + [
            p for p in (tmp_path / "pacs").glob("*.dcm") if pydicom.dcmread(p).SOPClassUID == SR_CLASS
        ]:
            assert dciodvfy_errors(path) == [], path
    finally:
        daemon.close()
        destination.stop()


def test_orthanc_forwards_and_receives_results(tmp_path, small_ct):
    daemon = Daemon(tmp_path / "hs")
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"headscreen": ("HEADSCREEN", "127.0.0.1", daemon.port)})
    orthanc.start()
    try:
        daemon = Daemon(tmp_path / "hs", port=daemon.port, destinations=[("orthanc", orthanc.aet, orthanc.dicom_port)])
        daemon.start()
        for path in small_ct:
            orthanc.upload(path)
        study_uid = str(pydicom.dcmread(small_ct[0], stop_before_pixels=True).StudyInstanceUID)
        orthanc.push_study("headscreen", orthanc.find_study(study_uid))
        assert daemon.instance_count(study_uid) == len(small_ct)

        def result_series():
            series = orthanc.series_of_study(study_uid)
            modalities = Counter(s["MainDicomTags"].get("Modality") for s in series)
            return series if modalities.get("SR") and modalities.get("OT", 0) + modalities.get("CT", 0) >= 2 else None

        wait_until(result_series, 180, 1.0, "SC and SR back in Orthanc")
        wait_until(daemon.all_delivered, 30, what="deliveries recorded")
        instances = orthanc.get(f"/studies/{orthanc.find_study(study_uid)}/instances")
        datasets = [pydicom.dcmread(__import__("io").BytesIO(orthanc_file(orthanc, i["ID"]))) for i in instances]
        results = [d for d in datasets if d.SOPClassUID in (SC_CLASS, SR_CLASS, SEG_CLASS)]
        sc, report = check_results(results, study_uid)
        delivered = {obj.sop_instance_uid for _, obj in daemon.deliveries()}
        assert delivered == {str(d.SOPInstanceUID) for d in results}
    finally:
        daemon.close()
        orthanc.stop()


def orthanc_file(orthanc: Orthanc, instance_id: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"{orthanc.url}/instances/{instance_id}/file", timeout=60) as response:
        return response.read()


def test_kill9_serve_mid_transfer_loses_nothing_acknowledged(tmp_path, big_ct):
    daemon = Daemon(tmp_path / "hs", workers=0).start()
    study_uid = str(pydicom.dcmread(big_ct[0], stop_before_pixels=True).StudyInstanceUID)
    import subprocess

    log = (tmp_path / "storescu.log").open("w")
    sender = subprocess.Popen(
        ["storescu", "-v", "-aet", "STORESCU", "-aec", "HEADSCREEN", "127.0.0.1", str(daemon.port), *map(str, big_ct)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
    )
    wait_until(lambda: daemon.instance_count(study_uid) >= 60, 120, 0.05, "part of the study to arrive")
    daemon.kill9()
    sender.wait(60)
    log.close()
    acknowledged = acknowledged_files(tmp_path / "storescu.log")
    assert 0 < len(acknowledged) < 300
    daemon.start()
    try:
        # Every instance the SCP answered Success for is stored, readable and recorded.
        with daemon.sessions()() as session:
            from sqlalchemy import select

            from headscreen.db.models import Instance

            recorded = {i.sop_instance_uid: i.path for i in session.scalars(select(Instance))}
        for sop_uid in acknowledged:
            assert sop_uid in recorded
            pydicom.dcmread(daemon.storage / recorded[sop_uid])
        # The PACS re-sends the study; nothing is duplicated.
        storescu(big_ct, daemon.port)
        assert daemon.instance_count(study_uid) == 300
        assert len(list((daemon.storage / study_uid).rglob("*.dcm"))) == 300
        assert not list((daemon.storage).rglob("*.tmp"))
    finally:
        daemon.close()


def acknowledged_files(log_path: Path) -> set[str]:
    """SOP Instance UIDs of the files storescu saw a Success response for."""
    uids, current = set(), None
    for line in log_path.read_text(errors="replace").splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response" in line and "Success" in line and current:
            uids.add(str(pydicom.dcmread(current, stop_before_pixels=True).SOPInstanceUID))
            current = None
    return uids


def test_kill9_worker_mid_job_completes_once(tmp_path, small_ct):
    destination = RecordingSCP(tmp_path / "pacs")
    daemon = Daemon(tmp_path / "hs", destinations=[("pacs", destination.ae_title, destination.port)]).start()
    try:
        storescu(small_ct, daemon.port)
        running = wait_until(lambda: [j for j in daemon.jobs() if j.state == "running"], 120, 0.05, "a running job")
        job = running[0]
        worker_pid = int(job.lease_owner.split(":")[1])
        os.kill(worker_pid, signal.SIGKILL)
        wait_until(daemon.all_delivered, 180, what="the job to finish after the crash")
        jobs = daemon.jobs()
        assert len(jobs) == 1 and jobs[0].state == "done" and jobs[0].attempts >= 2
        assert len(daemon.results()) == 1
        assert destination.received and all(count == 1 for count in destination.received.values())
    finally:
        daemon.close()
        destination.stop()


def test_late_arrival_reopens_and_supersedes(tmp_path, small_ct):
    destination = RecordingSCP(tmp_path / "pacs")
    daemon = Daemon(tmp_path / "hs", destinations=[("pacs", destination.ae_title, destination.port)]).start()
    try:
        storescu(small_ct[:-1], daemon.port)
        wait_until(daemon.all_delivered, 180, what="first result delivered")
        first = daemon.results()
        assert len(first) == 1
        storescu(small_ct[-1:], daemon.port)  # the slice the PACS forwarded late
        wait_until(lambda: len(daemon.results()) == 2 and daemon.all_delivered(1), 180, what="second result")
        old, new = daemon.results()
        assert old.superseded and not new.superseded
        assert new.supersedes_result_id == old.id
        old_objects = {o.sop_instance_uid for _, o in daemon.deliveries() if o.result_id == old.id}
        new_objects = {o.sop_instance_uid for _, o in daemon.deliveries() if o.result_id == new.id}
        assert old_objects.isdisjoint(new_objects)  # new objects, not overwritten ones
        assert all(count == 1 for count in destination.received.values())
        # SIGTERM drains and exits cleanly.
        assert daemon.stop() == 0
    finally:
        daemon.close()
        destination.stop()
