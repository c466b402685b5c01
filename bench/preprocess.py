"""Benchmark: preprocessing seconds per stage and QC metrics, on phantoms and on a real head.

    .venv/bin/python bench/preprocess.py [--repeat 3] [--quick] [--threads N]

Cases (each read from DICOM with `load_series`, not timed as preprocessing):
- a 300-slice 512 x 512 CT phantom (0.6 mm slices), posed;
- the real whole-head T1 (Debian insighttoolkit5-examples) as acquired, re-posed by
  known rigid transforms (up to 30 degrees, 40 mm), resampled to a 1 mm 3D sagittal T1,
  and mirrored upside down;
- noise, a chest and a cylinder sent as CT (must be refused as not a head).

For the real T1 it prints the brain Dice against its reference mask (native grid) and
the registration's agreement with the as-acquired registration (mean / max mm over
brain points, degrees). Figures are medians over --repeat runs; the load average is
printed beside them because this machine is shared. `--threads 1` runs registration's
independent steps and QC one after another, as a worker does that shares the cores;
the outputs are the same to the bit either way, only the seconds differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from headscreen.imaging import concurrency, qc, realscans, templates
from headscreen.imaging.phantoms import Pose, make_head, make_non_head, write_dicom_series
from headscreen.imaging.preprocess import Preprocessed, default_params, preprocess
from headscreen.imaging.registration import affine_to_matrix, rotation_part
from headscreen.imaging.skullstrip import dice
from headscreen.imaging.volume import Volume, load_series

REAL_POSES = [Pose((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)), Pose((10.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
              Pose((0.0, 0.0, 20.0), (20.0, -10.0, 5.0)), Pose((30.0, 0.0, 0.0), (0.0, 20.0, -20.0)),
              Pose((-25.0, 10.0, 15.0), (-30.0, 25.0, 10.0)), Pose((0.0, -20.0, -25.0), (40.0, 0.0, 0.0)),
              Pose((15.0, 15.0, -15.0), (10.0, -40.0, 20.0))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run, fewer poses")
    parser.add_argument("--threads", type=int, default=concurrency.threads(),
                        help="steps run side by side (imaging.concurrency; 1: one after another, as a "
                             "worker that shares the cores); default %(default)s")
    args = parser.parse_args()
    concurrency.set_threads(args.threads)
    repeat = 1 if args.quick else args.repeat
    start = time.perf_counter()
    for modality in ("CT", "MR"):
        templates.atlas(modality, 2.0)
    templates.atlas_metric_mask(2.0)  # built once per process, as a worker does at its first study
    print(f"cpu_count={os.cpu_count()} threads={concurrency.threads()} "
          f"template_warmup_s={time.perf_counter() - start:.2f}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ct = make_head("CT", age=64.0, seed=9, pose=Pose((8.0, -5.0, 10.0), (6.0, -12.0, 15.0)))
        paths = write_dicom_series(ct, folder / "ct300", rows=512, cols=512, slices=300, slice_thickness=0.6)
        rows.append(_case("CT phantom 300x512x512", load_series(paths), repeat))

        real = realscans.load_real_t1()
        poses = REAL_POSES[:3] if args.quick else REAL_POSES
        reference: np.ndarray | None = None
        for k, pose in enumerate(poses):
            image = realscans.repose(real.image, pose)
            mask = realscans.repose(real.brain_mask, pose, nearest=True)
            series = write_dicom_series(realscans.as_phantom(image, mask), folder / f"t1-{k}",
                                        rows=160, cols=160, slice_thickness=2.0)
            volume = load_series(series)
            label = ("real T1 as acquired" if k == 0
                     else f"real T1 posed {pose.rotation_deg} deg {pose.translation_mm} mm")
            row = _case(label, volume, repeat)
            result: Preprocessed = row.pop("_result")
            truth_mask = sitk.Resample(mask, volume.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            row["brain_dice_native"] = round(_native_dice(result, volume, truth_mask), 3)
            unposed = np.linalg.inv(realscans.pose_matrix(real.image, pose)) @ affine_to_matrix(result.transform)
            if reference is None:
                reference = unposed
            else:
                row.update(_agreement(unposed, reference, real.brain_mask, result))
            rows.append(row)
        rows.append(_case("real T1 1 mm 3D sagittal", Volume.from_image(_sagittal_1mm(real.image), "MR"), repeat))
        upside = realscans.mirror(real.image, "z")
        series = write_dicom_series(realscans.as_phantom(upside), folder / "t1-flip", rows=160, cols=160,
                                    slice_thickness=2.0)
        rows.append(_case("real T1 upside down", load_series(series), 1))
        for kind in ("noise", "chest", "cylinder"):
            rows.append(_case(f"CT {kind}", Volume.from_image(make_non_head(kind, "CT").image, "CT"), 1))
    for row in rows:
        row.pop("_result", None)
        print(json.dumps(row), flush=True)


def _case(label: str, volume: Volume, repeat: int) -> dict:
    runs, result = [], None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = preprocess(volume, default_params(volume.modality))
        runs.append({**result.timings, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu})
    assert result is not None
    median = {stage: round(float(np.median([run[stage] for run in runs])), 3) for stage in runs[0]}
    blocking = qc.blocking_reasons(result.qc_reasons)
    return {"case": label, "size": list(volume.image.GetSize()), "seconds": median,
            "load_average_1min": round(os.getloadavg()[0], 2),
            "qc": {k: round(v, 3) for k, v in result.qc_metrics.items()},
            "eligible": not blocking, "reasons": [r.split(":")[0] for r in result.qc_reasons], "_result": result}


def _native_dice(result: Preprocessed, volume: Volume, truth: sitk.Image) -> float:
    """Dice of the brain extraction (at the resolution it was made) on the native grid."""
    assert result.brain_extraction is not None
    mask = sitk.Cast(result.brain_extraction, sitk.sitkFloat32)
    native = sitk.Resample(mask, volume.image, result.transform.GetInverse(), sitk.sitkLinear, 0.0)
    return dice(sitk.GetArrayViewFromImage(native) > 0.5, sitk.GetArrayViewFromImage(truth) > 0)


def _agreement(estimate: np.ndarray, reference: np.ndarray, brain: sitk.Image, result: Preprocessed) -> dict:
    """How far the re-posed registration (taken back by the known pose) is from the as-acquired one,
    over the real brain's voxels mapped to MNI."""
    index = np.argwhere(sitk.GetArrayViewFromImage(brain) > 0)[::50, ::-1].astype(float)
    direction = np.asarray(brain.GetDirection()).reshape(3, 3)
    native = (index * np.asarray(brain.GetSpacing())) @ direction.T + np.asarray(brain.GetOrigin())
    to_mni = np.linalg.inv(reference)
    points = np.c_[native, np.ones(len(native))] @ to_mni.T
    moved = points @ estimate.T - points @ reference.T
    errors = np.linalg.norm(moved[:, :3], axis=1)
    relative = rotation_part(estimate[:3, :3]) @ rotation_part(reference[:3, :3]).T
    angle = math.degrees(math.acos(np.clip((np.trace(relative) - 1.0) / 2.0, -1.0, 1.0)))
    return {"vs_as_acquired_mean_mm": round(float(errors.mean()), 2),
            "vs_as_acquired_max_mm": round(float(errors.max()), 2), "vs_as_acquired_deg": round(angle, 2)}


def _sagittal_1mm(image: sitk.Image) -> sitk.Image:
    """The real T1 on a 1 mm sagittal grid (176 x 256 x 256), as a 3D T1 is acquired."""
    direction = np.column_stack([[0, -1, 0], [0, 0, -1], [1, 0, 0]]).astype(float)
    size = np.array([256, 256, 176])
    grid = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    grid.SetDirection(tuple(direction.ravel()))
    grid.SetOrigin(tuple(realscans.head_centre(image) - direction @ (size / 2.0)))
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


if __name__ == "__main__":
    main()
