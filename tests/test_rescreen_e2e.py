"""`headscreen rescreen` against a real Orthanc holding phantom studies, with `serve` running:
C-FIND by date range and modality, C-MOVE into the receiver, screening behind live
studies, stop and resume, skipping on a second run; QIDO-RS/WADO-RS with --record-only;
one-line errors.

The studies are small so the test stays short: most are 4-slice 64x64 CT series, which
the pipeline records as "not eligible" (too few slices) with an SR and a card, in about
half a second each; two are 40-slice series that are scored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from headscreen.daemon.orthanc import DICOMWEB_PLUGIN_ENV, Orthanc, dicomweb_plugin, free_port
from headscreen.db.models import RESCREEN_PRIORITY, Job, RescreenItem, RescreenRun, Result
from headscreen.imaging.phantoms import make_head, write_dicom_series
from serve_harness import REPO, Daemon, storescu, wait_until

pytestmark = pytest.mark.slow  # end to end with Orthanc and serve: `make test-fast` leaves it out

IN_RANGE = [date(2024, 3, d) for d in range(1, 25)]  # 24 CT studies to re-screen
ELIGIBLE = 2  # of which this many are scored (40 slices); the rest are 4-slice, not eligible
OUT_OF_RANGE = [date(2023, 12, 30), date(2024, 5, 2)]
SINCE, UNTIL = "2024-03-01", "2024-03-31"
# The CT bundle only: a worker warms up one bundle (tens of seconds on a loaded machine), not two.
CT_BUNDLE = next(p for p in sorted((REPO / "models").iterdir()) if p.name.startswith("ct-fanogan-compact-"))
CT_ONLY = f'bundles = ["{CT_BUNDLE}"]'


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict[str, list[list[Path]]]:
    """Phantom studies as files, by kind: in range (CT), out of range (CT), MR in range, live."""
    root = tmp_path_factory.mktemp("archive")
    ct = make_head("CT", age=55.0, seed=4)
    mr = make_head("MR", age=55.0, seed=4)

    def study(phantom, folder: str, day: date, slices: int = 4, size: int = 64, **extra) -> list[Path]:
        return write_dicom_series(phantom, root / folder, study_uid=generate_uid(), rows=size, cols=size,
                                  slices=slices, slice_thickness=4.0 if slices > 4 else 5.0, study_date=day,
                                  extra=extra or None)

    return {
        "in_range": [study(ct, f"in{i}", day, **({"slices": 40, "size": 96} if i < ELIGIBLE else {}))
                     for i, day in enumerate(IN_RANGE)],
        "out_of_range": [study(ct, f"out{i}", day) for i, day in enumerate(OUT_OF_RANGE)],
        "mr": [study(mr, f"mr{i}", date(2024, 3, 10 + i)) for i in range(2)],
        # Whole by content (ImagesInAcquisition), so the sweep queues them a second after arrival.
        "live": [study(ct, f"live{i}", date.today(), ImagesInAcquisition=4) for i in range(2)],
    }


def uid_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def rescreen_cmd(daemon: Daemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "headscreen", "-c", str(daemon.config), "rescreen", *args]


def rescreen(daemon: Daemon, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(rescreen_cmd(daemon, *args), capture_output=True, text=True, cwd=REPO, timeout=timeout)


def rows(daemon: Daemon, model):
    with daemon.sessions()() as session:
        return list(session.scalars(select(model).order_by(model.id)))


def pacs_with(tmp_path: Path, studies: list[list[Path]], receiver_port: int) -> Orthanc:
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"headscreen": ("HEADSCREEN", "127.0.0.1", receiver_port)})
    orthanc.start()
    for files in studies:
        for path in files:
            orthanc.upload(path)
    return orthanc


def worker(daemon: Daemon, log: Path) -> subprocess.Popen:
    """A `headscreen worker` on the daemon's queue (serve runs none: the test pauses it)."""
    return subprocess.Popen([sys.executable, "-m", "headscreen", "-c", str(daemon.config), "worker"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO)


def stop(process: subprocess.Popen, timeout: float = 60) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout)


def test_rescreen_a_date_range_behind_live_studies_stop_resume_and_skip(tmp_path, archive):
    port = free_port()
    pacs_studies = archive["in_range"] + archive["out_of_range"] + archive["mr"]
    orthanc = pacs_with(tmp_path, pacs_studies, port)
    daemon = Daemon(tmp_path / "hs", port=port, destinations=[("orthanc", orthanc.aet, orthanc.dicom_port)],
                    workers=0, extra=CT_ONLY)
    wanted = {uid_of(files) for files in archive["in_range"]}
    live = {uid_of(files) for files in archive["live"]}
    screening: subprocess.Popen | None = None
    try:
        daemon.start()
        screening = worker(daemon, tmp_path / "worker.log")
        args = ("--from", "orthanc", "--since", SINCE, "--until", UNTIL, "--modality", "CT", "--max-in-flight", "6")
        log = (tmp_path / "rescreen-1.log").open("w")
        first = subprocess.Popen(rescreen_cmd(daemon, *args), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        done = lambda: sum(i.state == "done" for i in rows(daemon, RescreenItem))  # noqa: E731
        wait_until(lambda: done() >= 5, 360, 0.2, "five re-screened studies")
        assert stop(first) == 130
        log.close()
        output = (tmp_path / "rescreen-1.log").read_text()
        assert "24 studies found on orthanc" in output and "--resume 1" in output, output
        run = rows(daemon, RescreenRun)[0]
        assert run.state == "stopped"
        items = rows(daemon, RescreenItem)
        # The query found exactly the CT studies of the range: not those outside it, not the MR ones.
        assert {i.study_instance_uid for i in items} == wanted
        assert any(i.state == "pending" for i in items), "the stop came after the last study"

        # The worker, paused once idle, lets the resumed run queue studies up to --max-in-flight;
        # live studies arrive; the worker, let go, takes the live ones first.
        wait_until(lambda: not [j for j in rows(daemon, Job) if j.state in ("queued", "running")], 360, 0.2,
                   "the worker idle")
        os.kill(screening.pid, signal.SIGSTOP)
        log = (tmp_path / "rescreen-2.log").open("w")
        second = subprocess.Popen(rescreen_cmd(daemon, *args), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        queued = lambda priority: [j for j in rows(daemon, Job)  # noqa: E731
                                   if j.priority == priority and j.state == "queued"]
        wait_until(lambda: len(queued(RESCREEN_PRIORITY)) >= 4, 360, 0.2, "re-screening jobs waiting in the queue")
        for files in archive["live"]:
            storescu(files, daemon.port)
        wait_until(lambda: len(queued(0)) == len(live), 240, 0.2, "the live studies' jobs")
        waiting = {j.id for j in queued(RESCREEN_PRIORITY)}
        os.kill(screening.pid, signal.SIGCONT)
        assert second.wait(240) == 0
        log.close()
        output = (tmp_path / "rescreen-2.log").read_text()
        assert "resuming rescreen run #1" in output, output
        assert "24/24 finished" in output, output

        jobs = rows_with_study(daemon)
        live_jobs = [j for j in jobs if j.study.study_instance_uid in live]
        archive_jobs = [j for j in jobs if j.study.study_instance_uid in wanted]
        assert {j.priority for j in live_jobs} == {0} and {j.rescreen_run_id for j in live_jobs} == {None}
        assert {j.priority for j in archive_jobs} == {RESCREEN_PRIORITY}
        assert {j.rescreen_run_id for j in archive_jobs} == {run.id}
        # Queued after the archive jobs that were waiting, claimed before every one of them.
        assert max(j.started_at for j in live_jobs) < min(j.started_at for j in archive_jobs if j.id in waiting)
        assert min(j.created_at for j in live_jobs) > max(j.created_at for j in archive_jobs if j.id in waiting)

        # Every study of the range: screened once (one current result), results sent back to the PACS.
        results = [r for r in rows(daemon, Result) if not r.superseded]
        by_study = [r.study_id for r in results]
        assert len(by_study) == len(set(by_study)) == len(wanted) + len(live)
        assert sum(r.eligible for r in results) == ELIGIBLE
        assert {i.state for i in rows(daemon, RescreenItem)} == {"done"}
        assert rows(daemon, RescreenRun)[0].state == "finished"
        wait_until(daemon.all_delivered, 360, 0.5, "results delivered to the PACS")
        assert stop(screening) == 0
        sent_back = orthanc.series_of_study(sorted(wanted)[0])
        assert "SR" in {s["MainDicomTags"].get("Modality") for s in sent_back}
        for files in archive["out_of_range"] + archive["mr"]:
            assert daemon.instance_count(uid_of(files)) == 0

        # A second run of the same query finds the same studies and skips them all: same bundle.
        jobs_before = len(rows(daemon, Job))
        again = rescreen(daemon, *args, "--no-progress")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "rescreen run #2: 24 studies found" in again.stdout
        assert "24/24 finished (24 skipped)" in again.stdout, again.stdout
        assert len(rows(daemon, Job)) == jobs_before
        listing = rescreen(daemon, "--list")
        assert listing.returncode == 0 and "#1" in listing.stdout and "#2" in listing.stdout
    finally:
        if screening is not None and screening.poll() is None:
            screening.kill()
        daemon.close()
        orthanc.stop()


def rows_with_study(daemon: Daemon) -> list[Job]:
    from sqlalchemy.orm import joinedload

    with daemon.sessions()() as session:
        return list(session.scalars(select(Job).options(joinedload(Job.study)).order_by(Job.id)))


def test_rescreen_from_a_dicomweb_node_records_only(tmp_path, archive, monkeypatch):
    assert dicomweb_plugin() is not None, (
        f"Orthanc's DICOMweb plugin is missing: run tests/install-system-deps.sh (or set {DICOMWEB_PLUGIN_ENV})")
    port = free_port()
    studies = archive["in_range"][ELIGIBLE:ELIGIBLE + 3]
    orthanc = pacs_with(tmp_path, studies, port)
    # The node is a DICOMweb one (kind "stow"); what WADO-RS returns goes in through the receiver
    # as our own AE title, which is therefore an allowed caller.
    monkeypatch.setenv("HEADSCREEN_DESTINATIONS", json.dumps(
        [{"name": "web-pacs", "kind": "stow", "url": orthanc.stow_url}]))
    daemon = Daemon(tmp_path / "hs", port=port, allowed=("STORESCU", "HEADSCREEN", "TESTSCU"), extra=CT_ONLY)
    try:
        daemon.start()
        done = rescreen(daemon, "--from", "web-pacs", "--since", SINCE, "--until", UNTIL, "--record-only")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "3 studies found on web-pacs" in done.stdout and "results recorded only" in done.stdout
        assert "3/3 finished (3 done)" in done.stdout, done.stdout
        assert {i.study_instance_uid for i in rows(daemon, RescreenItem)} == {uid_of(f) for f in studies}
        assert len([r for r in rows(daemon, Result) if not r.superseded]) == 3
        assert daemon.deliveries() == []  # recorded only: no delivery rows at all
    finally:
        daemon.close()
        orthanc.stop()


def test_rescreen_errors_are_one_line(tmp_path):
    closed = free_port()  # nothing listens there
    daemon = Daemon(tmp_path / "hs", destinations=[("down", "NOBODY", closed)])
    cases = [
        (("--from", "nope", "--since", SINCE), 2, "--from 'nope': no PACS node of that name"),
        (("--from", "down", "--since", "2024-02-30"), 2, "--since: '2024-02-30' is not a date"),
        (("--from", "down", "--since", UNTIL, "--until", SINCE), 2, "is after --until"),
        (("--from", "down", "--since", SINCE, "--until", UNTIL), 1, "PACS 'down' (127.0.0.1:"),
        (("--resume", "7",), 2, "--resume 7: no such rescreen run"),
    ]
    for args, code, message in cases:
        done = rescreen(daemon, *args, timeout=120)
        assert done.returncode == code, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not rows(daemon, RescreenRun)  # nothing was started
    # A run of the same query that another process works on (touched just now) is left alone.
    from headscreen.db import rescreen as runs

    with daemon.sessions()() as session:
        run_id = runs.create_run(session, runs.RescreenQuery("down", "dimse", "20240301", "20240331", None, False),
                                 None, 4, "test")
    done = rescreen(daemon, "--from", "down", "--since", SINCE, "--until", UNTIL, timeout=120)
    assert done.returncode == 2 and f"rescreen run #{run_id} is being worked on by another process" in done.stderr
