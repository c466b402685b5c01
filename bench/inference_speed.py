"""Benchmark: the daemon's inference stage per volume, on ONNX Runtime's CPU and CUDA providers.

    .venv/bin/python bench/inference_speed.py [--bundle models/ct-...] [--runs 20] [--threads 4]

For each bundle (default: the shipped ones) and each provider this onnxruntime build
offers (CPU; CUDA with onnxruntime-gpu and a GPU), prints the session's start-up,
the first run (CUDA: cuDNN's algorithm search) and the median and 90th percentile of
the next runs, as the worker does them: headscreen.inference.BundleRunner.run, i.e.
the ONNX graph plus the normative z-map and masked terms on the CPU, and the graph
alone. Speed does not depend on content, so the input is random on the bundle's grid.
The rest of a job (reading, registration, results) runs on the CPU whatever the
provider: bench/latency.py measures it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from headscreen.bundle import load_bundle  # noqa: E402
from headscreen.inference import BundleRunner  # noqa: E402

SHIPPED = sorted(p.parent for p in (ROOT / "models").glob("*/manifest.json"))


def _timed(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def _summary(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return f"median {1000 * statistics.median(ordered):7.1f} ms, p90 {1000 * p90:7.1f} ms"


def measure(bundle_dir: Path, provider: str, runs: int, threads: int) -> None:
    bundle = load_bundle(bundle_dir)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    started = time.perf_counter()
    runner = BundleRunner(bundle, intra_op_threads=threads, providers=providers)
    startup = time.perf_counter() - started
    used = runner.providers[0]
    if used != provider:
        print(f"{bundle.manifest.key}: {provider} asked for, session runs on {used}: skipped")
        return
    grid = tuple(bundle.manifest.input.shape[1:])
    volume = np.random.default_rng(0).uniform(-1.0, 1.0, grid).astype(np.float32)
    normative = bundle.normative
    brain = normative.support if normative is not None else None
    first = _timed(lambda: runner.run(volume, 60.0, brain))
    full = [_timed(lambda: runner.run(volume, 60.0, brain)) for _ in range(runs)]
    names = [o.name for o in runner.session.get_outputs()]
    feed = {bundle.manifest.input.name: volume[None, None]}
    graph = [_timed(lambda: runner.session.run(names, feed)) for _ in range(runs)]
    print(f"{bundle.manifest.key:32s} {used.replace('ExecutionProvider', ''):5s} grid {'x'.join(map(str, grid))}: "
          f"session {startup:5.2f} s, first run {first:6.3f} s; per volume {_summary(full)} "
          f"(graph alone {_summary(graph)})", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", help="default: every bundle under models/")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU provider threads (default: the worker's, min(4, cores))")
    args = p.parse_args()
    if hasattr(ort, "preload_dlls"):
        try:  # onnxruntime-gpu: load the CUDA/cuDNN libraries pip put beside it
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 (a CPU build or a machine without them: CPU figures only)
            print(f"onnxruntime.preload_dlls: {exc}")
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__} ({ort.get_device()}), providers {available}")
    for bundle_dir in args.bundle or SHIPPED:
        for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            if provider in available:
                measure(bundle_dir, provider, args.runs, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
