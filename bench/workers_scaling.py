"""Studies per hour against the number of worker processes, on PostgreSQL, per storage backend.

The deployment of docs/deployment.md on one machine: `headscreen serve` with workers = 0
(the receiver), and 1, 2, 3 separate `headscreen worker` processes claiming from one
PostgreSQL queue (a throw-away database per run). Storage backends:
- filesystem: every worker's storage_dir is the receiver's (the shared mount, here one folder);
- postgresql: every worker has an empty storage folder of its own; the bytes go through the database.

N head CT studies (one phantom with a hemorrhage, a new UID set per study) are sent back to
back with dcmtk's storescu once every worker is warm; the result destination is a dcmtk
storescp. For each run it prints studies/h from the first instance sent to the last result
delivered, CPU-seconds per study of the receiver and of the workers together, the workers'
peak RSS, and the load average (the machine may be shared: read the figures beside it).

    .venv/bin/python bench/workers_scaling.py [--studies 6] [--workers 1 2 3]
        [--backends filesystem postgresql] [--slices 300] [--size 512]
        [--admin-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

With more workers than cores the figures show the cores, not the queue: on a 2-core machine
3 workers share 2 cores. A benchmark, not a test: it prints and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pydicom.uid import generate_uid  # noqa: E402
from throughput import peak_rss_mb, reset_peak, send_timed, storescp  # noqa: E402
from throwaway_db import throwaway_postgres  # noqa: E402

from headscreen.imaging.phantoms import Lesion, Pose, make_head, write_dicom_series  # noqa: E402
from serve_harness import REPO, Daemon, wait_until  # noqa: E402


def make_studies(root: Path, count: int, slices: int, size: int) -> list[list[Path]]:
    phantom = make_head("CT", age=62.0, seed=21,
                        pose=Pose(rotation_deg=(2.0, -3.0, 5.0), translation_mm=(3.0, -4.0, 6.0)),
                        lesion=Lesion(kind="hemorrhage", center_mm=(25.0, -10.0, 15.0), volume_ml=15.0))
    thickness = round(180.0 / slices, 2)  # the same head coverage whatever the slice count
    return [write_dicom_series(phantom, root / f"study-{n}", study_uid=generate_uid(), series_uid=generate_uid(),
                               rows=size, cols=size, slices=slices, slice_thickness=thickness)
            for n in range(count)]


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def run(studies: list[list[Path]], root: Path, backend: str, workers: int, url: str) -> None:
    label = f"{backend}-w{workers}"
    with ExitStack() as stack:
        port, destination = stack.enter_context(storescp(root / f"pacs-{label}"))
        daemon = Daemon(root / f"hs-{label}", destinations=[("pacs", "RESULTS", port)], workers=0,
                        database_url=url, extra=f'storage_backend = "{backend}"\n').start()
        stack.callback(daemon.close)
        assert daemon.process is not None
        processes = []
        for index in range(workers):
            config = daemon.config
            if backend != "filesystem":  # no shared folder: a storage folder of its own
                config = daemon.workdir / f"worker-{index}.toml"
                config.write_text(daemon.config.read_text().replace(
                    f'storage_dir = "{daemon.storage}"', f'storage_dir = "{daemon.workdir / f"worker-{index}"}"'))
            log = (daemon.workdir / f"worker-{index}.log").open("ab")
            process = subprocess.Popen([sys.executable, "-m", "headscreen", "-c", str(config), "worker",
                                        "--index", str(index)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(_stop, process)
            processes.append(process)
        wait_until(lambda: all("worker started" in (daemon.workdir / f"worker-{i}.log").read_text(errors="replace")
                               for i in range(workers)), 600, 0.5, "workers warm")
        for process in processes:
            reset_peak(process.pid)
        pids = {"receiver": daemon.process.pid, **{f"worker{i}": p.pid for i, p in enumerate(processes)}}
        seconds, cpu = send_timed(daemon, studies, pids, 3600)
        done_by = [sum(1 for j in daemon.jobs() if j.lease_owner and j.lease_owner.endswith(f":{p.pid}:w{i}"))
                   for i, p in enumerate(processes)]
        peaks = [peak_rss_mb(p.pid) for p in processes]
        per_study = len(studies)
        worker_cpu = sum(v for k, v in cpu.items() if k.startswith("worker")) / per_study
        print(f"{label}: {len(studies)} studies in {seconds:.1f} s = {len(studies) / seconds * 3600:,.0f} studies/h; "
              f"CPU-s per study: receiver {cpu['receiver'] / per_study:.2f}, workers {worker_cpu:.2f}; "
              f"jobs per worker {done_by}; worker peak RSS {', '.join(f'{p:.0f}' for p in peaks)} MB; "
              f"load {load()}", flush=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # SIGTERM: drains
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--backends", nargs="+", default=["filesystem", "postgresql"],
                        choices=["filesystem", "postgresql"])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; {args.studies} CT studies of {args.slices} slices {args.size}x{args.size}; "
          f"load {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        studies = make_studies(root / "studies", args.studies, args.slices, args.size)
        for backend in args.backends:
            for workers in args.workers:
                with throwaway_postgres(args.admin_url, "hs_scaling") as url:
                    run(studies, root, backend, workers, url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
