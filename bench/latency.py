"""Seconds from study completeness to results delivered, for a 300-slice head CT and a brain MR.

Starts `headscreen serve` (SQLite, shipped bundles, one worker) and a PACS as the
destination (a real Orthanc by default, with TCP_NODELAY=1; --destination orthanc-nagle:
Orthanc as dcmtk leaves it, Nagle's algorithm on, as many PACS run; --destination pynetdicom:
the test harness's Python Storage SCP, which takes a CT result 1.3-1.8x as long as Orthanc,
bench/delivery.py),
sends each study with dcmtk's storescu, and prints per run:
- completeness -> last object delivered (the study's completed_at to the last delivered_at);
- last instance acknowledged -> last object delivered (last_received_at to the last
  delivered_at: the quiet wait of completeness included);
- where the time goes: completeness -> job started (pick-up), the job, job finished -> first
  and last object delivered; the pipeline's stage timings, the worker's CPU-seconds and
  its peak RSS over the run.
Targets (issue 14): CT <= 3 s, MR <= 2 s from completeness, <= 6 s from the last
acknowledgement, worker peak <= 1 GB. Not a test.

    .venv/bin/python bench/latency.py [--runs 2] [--modality CT MR] [--whole-quiet S] [--test-timing]
                                      [--destination orthanc|orthanc-nagle|pynetdicom]

serve runs with the shipped defaults for the settings that make waits (whole_quiet_s 5,
sweep_interval_s 1, quiet_period_s 60; --whole-quiet S sets whole_quiet_s), which are
what the targets are about; --test-timing uses the test harness's shorter ones instead
(whole_quiet_s 1, sweeps every 0.25 s), whose "last ack" figure is NOT the product's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pydicom  # noqa: E402
from ingest import orthanc  # noqa: E402
from proc_cpu import cpu_split  # noqa: E402
from sqlalchemy import select  # noqa: E402
from throughput import children, is_worker, peak_rss_mb, reset_peak  # noqa: E402

from headscreen.db.models import Study  # noqa: E402
from headscreen.imaging.phantoms import Lesion, Pose, make_head, write_dicom_series  # noqa: E402
from serve_harness import Daemon, RecordingSCP, storescu, wait_until  # noqa: E402

SERIES = {
    "CT": dict(rows=512, cols=512, slices=300, slice_thickness=0.6),
    "MR": dict(rows=256, cols=256, slices=176, slice_thickness=1.0),
}


def _phantom(modality: str):
    if modality == "CT":
        return make_head("CT", age=62.0, seed=21,
                         pose=Pose(rotation_deg=(2.0, -3.0, 5.0), translation_mm=(3.0, -4.0, 6.0)),
                         lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=15.0))
    return make_head("MR", age=55.0, seed=22,
                     lesion=Lesion(kind="tumour", center_mm=(25.0, -10.0, 15.0), volume_ml=20.0))


@contextmanager
def _destination(kind: str, work: Path) -> Iterator[tuple[str, int]]:
    """(AE title, port) of a started destination, stopped on exit."""
    if kind in ("orthanc", "orthanc-nagle"):
        with orthanc(work, nagle=kind == "orthanc-nagle") as (port, ae_title, _storage, _stats):
            yield ae_title, port
        return
    scp = RecordingSCP(work / "pacs")
    try:
        yield scp.ae_title, scp.port
    finally:
        scp.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--modality", nargs="+", default=["CT", "MR"], choices=sorted(SERIES))
    parser.add_argument("--test-timing", action="store_true",
                        help="the test harness's short waits instead of the shipped defaults")
    parser.add_argument("--whole-quiet", type=float, default=5.0, help="whole_quiet_s (not with --test-timing)")
    parser.add_argument("--destination", choices=("orthanc", "orthanc-nagle", "pynetdicom"), default="orthanc",
                        help="where the results go: a real Orthanc (the PACS; with Nagle's algorithm on, as "
                             "dcmtk leaves it) or the harness's Python SCP")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, _destination(args.destination, Path(tmp)) as (ae_title, port):
        root = Path(tmp)
        daemon = Daemon(root / "hs", destinations=[("pacs", ae_title, port)])
        if not args.test_timing:
            daemon.use_shipped_timing(args.whole_quiet)
        print("timing: " + ("the test harness's (whole_quiet_s 1, sweeps every 0.25 s)" if args.test_timing
                            else f"shipped defaults, whole_quiet_s {args.whole_quiet:g}")
              + f"; results delivered to {args.destination}")
        daemon.start()
        try:
            assert daemon.process is not None
            wait_until(lambda: "worker started" in (daemon.workdir / "serve.log").read_text(errors="replace"),
                       300, 0.5, "worker warm")
            worker = next(p for p in children(daemon.process.pid) if is_worker(p))
            results = 0
            for modality in args.modality:
                phantom = _phantom(modality)
                for run in range(args.runs):
                    files = write_dicom_series(phantom, root / f"{modality}-{run}", **SERIES[modality])
                    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                    reset_peak(worker)
                    cpu = cpu_split(worker)
                    started = time.monotonic()
                    storescu(files, daemon.port)
                    sent = time.monotonic() - started
                    results += 1
                    wait_until(lambda: daemon.all_delivered(results), 300, 0.05, "delivery")  # noqa: B023
                    with daemon.sessions()() as session:
                        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
                        completed, last_ack = study.completed_at, study.last_received_at
                    result = [r for r in daemon.results() if r.study_id == study.id][-1]
                    job = [j for j in daemon.jobs() if j.study_id == study.id][-1]
                    delivered_times = sorted(d.delivered_at for d, o in daemon.deliveries() if o.result_id == result.id)
                    objects = len(delivered_times)
                    delivered = delivered_times[-1]
                    spans = (f"pick-up {(job.started_at - completed).total_seconds():.2f}, "
                             f"job {(job.finished_at - job.started_at).total_seconds():.2f}, "
                             f"first delivery {(delivered_times[0] - job.finished_at).total_seconds():.2f}, "
                             f"all {(delivered - job.finished_at).total_seconds():.2f}")
                    user, system = (after - before for after, before in zip(cpu_split(worker), cpu))
                    stages = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
                    print(f"{modality} run {run + 1}: sent {len(files)} slices in {sent:.1f} s; "
                          f"completeness -> delivered {(delivered - completed).total_seconds():.2f} s, "
                          f"last ack -> delivered {(delivered - last_ack).total_seconds():.2f} s ({objects} objects); "
                          f"worker CPU {user + system:.2f} s (user {user:.2f}, system {system:.2f}), "
                          f"peak RSS {peak_rss_mb(worker):.0f} MB; "
                          f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}\n"
                          f"  spans (s): {spans}\n  stages (s): {stages}")
        finally:
            daemon.close()


if __name__ == "__main__":
    main()
