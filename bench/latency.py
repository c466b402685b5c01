"""Seconds from study completeness to results delivered, for a 300-slice head CT.

Starts `headscreen serve` (SQLite, shipped bundles, one worker) and a Storage
SCP as the destination, sends the study with dcmtk's storescu, and prints the
time from the study's completed_at to the last delivery, with the pipeline's
stage timings. Target: at most 5 s on a 2-core machine. Not a test.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pydicom  # noqa: E402
from sqlalchemy import select  # noqa: E402

from db.models import Study  # noqa: E402
from imaging.phantoms import Lesion, Pose, make_head, write_dicom_series  # noqa: E402
from serve_harness import Daemon, RecordingSCP, storescu, wait_until  # noqa: E402


def main(runs: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        phantom = make_head("CT", age=62.0, seed=21,
                            pose=Pose(rotation_deg=(2.0, -3.0, 5.0), translation_mm=(3.0, -4.0, 6.0)),
                            lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=15.0))
        destination = RecordingSCP(root / "pacs")
        daemon = Daemon(root / "hs", destinations=[("pacs", destination.ae_title, destination.port)]).start()
        try:
            for run in range(runs):
                files = write_dicom_series(phantom, root / f"ct-{run}", rows=512, cols=512, slices=300,
                                           slice_thickness=0.6)
                study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                started = time.monotonic()
                storescu(files, daemon.port)
                sent = time.monotonic() - started
                wait_until(lambda: daemon.all_delivered(run + 1), 300, 0.1, "delivery")  # noqa: B023 (called at once)
                with daemon.sessions()() as session:
                    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
                    completed = study.completed_at
                result = [r for r in daemon.results() if r.study_id == study.id][-1]
                delivered = [d.delivered_at for d, o in daemon.deliveries() if o.result_id == result.id]
                latency = (max(delivered) - completed).total_seconds()
                stages = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
                print(f"run {run + 1}: sent 300 slices in {sent:.1f} s; completeness -> delivered {latency:.2f} s "
                      f"({len(delivered)} objects)\n  stages (s): {stages}")
        finally:
            daemon.close()
            destination.stop()


if __name__ == "__main__":
    main()
