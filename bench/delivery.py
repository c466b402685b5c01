"""Delivery: one result's objects sent the worker's way into dcmtk storescp, Orthanc and a pynetdicom SCP.

Builds the result of one 300-slice 512 x 512 head CT with a hemorrhage in this process
(`daemon.pipeline.run_job` with the shipped CT bundle: the SC overlays, the SEG and the SR,
as the worker writes them), then sends those files over one association with
`export.delivery.send`, the function the worker's delivery uses, into each destination,
--repeats times, in alternating order. Prints per destination the best and the median
seconds, MB/s and the ratio to storescp and to Orthanc of the same run.

    .venv/bin/python bench/delivery.py [--repeats 5]

Why: from completeness to the last object delivered (issue 14), the delivery of a CT
result is 0.6-0.8 s of bench/latency.py's figure; this says how much of that is the
destination. The anchors run with TCP_NODELAY=1; the "Nagle on" rows run storescp and
Orthanc as dcmtk's default leaves them (as many PACS run), once as the worker sends
(acknowledging each read at once, export.delivery._PromptAckSocket) and once without that.
The "PDUs via pynetdicom" rows send as before `send_stored_files_directly`: each PDU queued
for pynetdicom's DUL thread. The sender's CPU column is this process's CPU during the send.
A benchmark, not a test: it prints figures and asserts only that every object was stored.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pydicom  # noqa: E402
from ingest import orthanc, storescp  # noqa: E402

from headscreen.bundle import load_bundle  # noqa: E402
from headscreen.daemon.config import Settings, shipped_bundles  # noqa: E402
from headscreen.daemon.pipeline import StudyFiles, run_job  # noqa: E402
from headscreen.db import api  # noqa: E402
from headscreen.export import delivery  # noqa: E402
from headscreen.export.delivery import STATUS_SUCCESS, Destination, send  # noqa: E402
from headscreen.imaging.phantoms import Lesion, Pose, make_head, write_dicom_series  # noqa: E402
from headscreen.inference import BundleRunner  # noqa: E402
from serve_harness import RecordingSCP  # noqa: E402

OVERLAY_SLICES = Settings.model_fields["overlay_slices"].default  # what the worker sends by default


def build_result(folder: Path) -> tuple[list[Path], list[str]]:
    """The files of one CT result, as run_job writes them, and their kinds."""
    bundle = next(b for b in map(load_bundle, shipped_bundles()) if b.manifest.modality == "CT")
    head = make_head("CT", age=62.0, seed=21,
                     pose=Pose(rotation_deg=(2.0, -3.0, 5.0), translation_mm=(3.0, -4.0, 6.0)),
                     lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=15.0))
    files = write_dicom_series(head, folder / "series", rows=512, cols=512, slices=300, slice_thickness=0.6)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    ticket = api.JobTicket(job_id=0, study_id=0, study_instance_uid=study_uid, bundle_name=bundle.manifest.name,
                           bundle_version=bundle.manifest.version, generation=0, attempt=1)
    outcome = run_job(ticket, StudyFiles(study_uid, {series_uid: files}), BundleRunner(bundle),
                      folder / "results", OVERLAY_SLICES)
    return [Path(o.path) for o in outcome.objects], [o.kind for o in outcome.objects]


@contextmanager
def recording_scp(work: Path) -> Iterator[tuple[int, str]]:
    scp = RecordingSCP(work / "pynetdicom")
    try:
        yield scp.port, scp.ae_title
    finally:
        scp.stop()


def _anchor(factory: Callable, nagle: bool = False, quick_ack: bool = True,
            direct: bool = True) -> Callable[[Path], object]:
    """ingest's targets yield (port, AE, folder, stats); keep the port and AE. `quick_ack`
    False sends without acknowledging each read at once (as before it was added); `direct`
    False leaves each PDU to pynetdicom's DUL thread (as before send_stored_files_directly)."""
    @contextmanager
    def started(work: Path) -> Iterator[tuple[int, str]]:
        saved_quick_ack, saved_handlers = delivery._TCP_QUICKACK, delivery.requestor_handlers
        if not quick_ack:
            delivery._TCP_QUICKACK = None
        if not direct:
            handlers = [h for h in saved_handlers() if h[1] is not delivery.send_stored_files_directly]
            delivery.requestor_handlers = lambda: handlers
        try:
            with factory(work, nagle=nagle) as (port, ae_title, _folder, _stats):
                yield port, ae_title
        finally:
            delivery._TCP_QUICKACK, delivery.requestor_handlers = saved_quick_ack, saved_handlers
    return started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    targets = {"storescp": _anchor(storescp), "orthanc": _anchor(orthanc), "pynetdicom SCP": recording_scp,
               "storescp, PDUs via pynetdicom": _anchor(storescp, direct=False),
               "orthanc, PDUs via pynetdicom": _anchor(orthanc, direct=False),
               "storescp, Nagle on": _anchor(storescp, nagle=True),
               "storescp, Nagle on, no quick ACK": _anchor(storescp, nagle=True, quick_ack=False),
               "orthanc, Nagle on": _anchor(orthanc, nagle=True),
               "orthanc, Nagle on, no quick ACK": _anchor(orthanc, nagle=True, quick_ack=False)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths, kinds = build_result(root / "job")
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        counted = ", ".join(f"{kinds.count(kind)} {kind}" for kind in sorted(set(kinds)))
        print(f"result: {len(paths)} objects ({counted}), {megabytes:.1f} MB; "
              f"{args.repeats} sends per destination, alternating")
        seconds: dict[str, list[float]] = {name: [] for name in targets}
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        for repeat in range(args.repeats):
            for name, target in (targets.items() if repeat % 2 == 0 else reversed(targets.items())):
                work = root / f"{re.sub('[^A-Za-z0-9]+', '-', name)}-{repeat}"
                work.mkdir()
                with target(work) as (port, ae_title):
                    started, cpu_started = time.perf_counter(), time.process_time()
                    statuses = send(Destination(name, ae_title, "127.0.0.1", port), paths)
                    seconds[name].append(time.perf_counter() - started)
                    cpu[name].append(time.process_time() - cpu_started)
                if len(statuses) != len(paths) or any(s != STATUS_SUCCESS for s in statuses.values()):
                    raise SystemExit(f"{name}: not every object was stored: {statuses}")
    best = {name: min(values) for name, values in seconds.items()}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{'destination':<32} {'best s':>7} {'median s':>9} {'MB/s':>7} {'x storescp':>11} {'x orthanc':>10} "
          f"{'sender CPU s':>13}")
    for name in targets:
        print(f"{name:<32} {best[name]:>7.3f} {median[name]:>9.3f} {megabytes / best[name]:>7.1f} "
              f"{median[name] / median['storescp']:>11.2f} {median[name] / median['orthanc']:>10.2f} "
              f"{statistics.median(cpu[name]):>13.3f}")
    print("(ratios are of median seconds: above 1 is slower than the anchor; the sender's CPU is this"
          " process's, median, and holds the pynetdicom SCP's own for that destination)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
