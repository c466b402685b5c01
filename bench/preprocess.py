"""Benchmark: preprocessing of a 300-slice 512x512 head CT (per stage and total seconds).

    .venv/bin/python bench/preprocess.py [--repeat 3] [--keep DIR]

Writes a posed phantom CT as DICOM (not timed as preprocessing), loads it with
`load_series` (timed separately), then times `preprocess` and `to_native`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from imaging import templates
from imaging.phantoms import Lesion, Pose, make_head, write_dicom_series
from imaging.preprocess import default_params, preprocess, to_native
from imaging.volume import load_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="write the DICOM series here and keep it")
    args = parser.parse_args()

    start = time.perf_counter()
    templates.tissue_maps()
    templates.atlas("CT", 2.0)
    warm = time.perf_counter() - start
    phantom = make_head("CT", age=64.0, seed=9, pose=Pose((8.0, -5.0, 10.0), (6.0, -12.0, 15.0)),
                        lesion=Lesion("hemorrhage", (28.0, -12.0, 18.0), 12.0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        start = time.perf_counter()
        paths = write_dicom_series(phantom, folder, rows=512, cols=512, slices=300, slice_thickness=0.6)
        write_s = time.perf_counter() - start
        report: dict[str, object] = {"cpu_count": os.cpu_count(), "template_warmup_s": round(warm, 3),
                                     "write_dicom_300x512x512_s": round(write_s, 3), "runs": []}
        params = default_params("CT")
        for _ in range(args.repeat):
            start = time.perf_counter()
            volume = load_series(paths)
            load_s = time.perf_counter() - start
            cpu = time.process_time()
            result = preprocess(volume, params)
            cpu = time.process_time() - cpu
            start = time.perf_counter()
            native = to_native(np.abs(result.model_input), result, volume)
            to_native_s = time.perf_counter() - start
            run = {"load_series_s": round(load_s, 3)}
            run.update({f"preprocess.{k}_s": round(v, 3) for k, v in result.timings.items()})
            run["preprocess_cpu_s"] = round(cpu, 3)
            run["load_average_1min"] = round(os.getloadavg()[0], 2)
            run["to_native_s"] = round(to_native_s, 3)
            run["qc_reasons"] = result.qc_reasons
            run["native_shape"] = list(native.shape)
            report["runs"].append(run)
        totals = [r["preprocess.total_s"] for r in report["runs"]]
        report["preprocess_total_s_median"] = float(np.median(totals))
    for run in report["runs"]:
        print("  ".join(f"{k}={v}" for k, v in run.items()))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
