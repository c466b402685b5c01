"""Benchmark: headscreen's SimpleITK registration against ANTsPy on the same real head.

    .venv/bin/pip install antspyx   # optional, not a dependency of headscreen
    .venv/bin/python bench/registration_compare.py

The real T1 (Debian insighttoolkit5-examples) as acquired and re-posed by known rigid
transforms (up to 30 degrees, 40 mm) is registered to the MR atlas (Colin27, 2 mm) by
both. Printed per pose and method: seconds (wall, CPU), and the agreement of the
re-posed registration, taken back by the known pose, with the as-acquired one (mean and
max mm over the real brain's voxels, degrees). ANTsPy runs `ants.registration` with
type_of_transform="Affine" (its rigid then affine, Mattes MI, 4-level pyramid) after
its own centre-of-mass start. `--initializer` adds `ants.affine_initializer`'s rotation
search (the closest ANTs counterpart of headscreen's orientation search; slow here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import SimpleITK as sitk

from headscreen.imaging import realscans, templates
from headscreen.imaging.phantoms import Pose
from headscreen.imaging.preprocess import _registration_settings, default_params, shrink
from headscreen.imaging.registration import affine_to_matrix, register_to_atlas, rotation_part

POSES = [Pose((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)), Pose((10.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
         Pose((0.0, 0.0, 20.0), (20.0, -10.0, 5.0)), Pose((30.0, 0.0, 0.0), (0.0, 20.0, -20.0)),
         Pose((-25.0, 10.0, 15.0), (-30.0, 25.0, 10.0)), Pose((0.0, -20.0, -25.0), (40.0, 0.0, 0.0)),
         Pose((15.0, 15.0, -15.0), (10.0, -40.0, 20.0))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--initializer", action="store_true")
    args = parser.parse_args()
    try:
        import ants
    except ImportError:
        raise SystemExit("antspyx is not installed: .venv/bin/pip install antspyx") from None
    real = realscans.load_real_t1()
    atlas = templates.atlas("MR", 2.0)
    metric_mask = templates.atlas_metric_mask(2.0)
    params = default_params("MR")
    results: dict[str, list] = {"simpleitk": [], "ants_affine": []}
    if args.initializer:
        results["ants_affine_initializer"] = []
    with tempfile.TemporaryDirectory() as tmp:
        atlas_path = os.path.join(tmp, "atlas.nii.gz")
        sitk.WriteImage(atlas, atlas_path)
        fixed = ants.image_read(atlas_path)
        for k, pose in enumerate(POSES):
            working = shrink(realscans.repose(real.image, pose), 2.0)
            unpose = np.linalg.inv(realscans.pose_matrix(real.image, pose))
            wall, cpu = time.perf_counter(), time.process_time()
            result = register_to_atlas(working, atlas, metric_mask, _registration_settings(params, working))
            results["simpleitk"].append((unpose @ affine_to_matrix(result.transform),
                                         time.perf_counter() - wall, time.process_time() - cpu))
            moving_path = os.path.join(tmp, f"moving-{k}.nii.gz")
            sitk.WriteImage(working, moving_path)
            moving = ants.image_read(moving_path)
            for name in [n for n in results if n.startswith("ants")]:
                wall, cpu = time.perf_counter(), time.process_time()
                kwargs = {}
                if name == "ants_affine_initializer":
                    init = ants.affine_initializer(fixed, moving, search_factor=20, radian_fraction=0.2,
                                                   use_principal_axis=False, local_search_iterations=10,
                                                   txfn=os.path.join(tmp, f"init-{k}.mat"))
                    kwargs["initial_transform"] = init
                reg = ants.registration(fixed, moving, type_of_transform="Affine", **kwargs)
                matrix = _ants_fixed_to_moving(ants.read_transform(reg["fwdtransforms"][0]))
                results[name].append((unpose @ matrix, time.perf_counter() - wall, time.process_time() - cpu))
    for name, rows in results.items():
        reference = rows[0][0]
        for (matrix, wall, cpu), pose in zip(rows, POSES):
            print(json.dumps({"method": name, "pose_deg": pose.rotation_deg, "pose_mm": pose.translation_mm,
                              "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                              **_agreement(matrix, reference, real.brain_mask)}))


def _ants_fixed_to_moving(transform) -> np.ndarray:
    """ANTs' forward transform maps fixed (atlas) points to moving points, like ours."""
    params = np.asarray(transform.parameters, dtype=float)
    centre = np.asarray(transform.fixed_parameters, dtype=float)
    matrix = params[:9].reshape(3, 3)
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = params[9:12] + centre - matrix @ centre
    return out


def _agreement(estimate: np.ndarray, reference: np.ndarray, brain: sitk.Image) -> dict:
    index = np.argwhere(sitk.GetArrayViewFromImage(brain) > 0)[::50, ::-1].astype(float)
    direction = np.asarray(brain.GetDirection()).reshape(3, 3)
    native = (index * np.asarray(brain.GetSpacing())) @ direction.T + np.asarray(brain.GetOrigin())
    points = np.c_[native, np.ones(len(native))] @ np.linalg.inv(reference).T
    errors = np.linalg.norm((points @ estimate.T - points @ reference.T)[:, :3], axis=1)
    relative = rotation_part(estimate[:3, :3]) @ rotation_part(reference[:3, :3]).T
    angle = math.degrees(math.acos(np.clip((np.trace(relative) - 1.0) / 2.0, -1.0, 1.0)))
    return {"vs_as_acquired_mean_mm": round(float(errors.mean()), 2),
            "vs_as_acquired_max_mm": round(float(errors.max()), 2), "vs_as_acquired_deg": round(angle, 2)}


if __name__ == "__main__":
    main()
