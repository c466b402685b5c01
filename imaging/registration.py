"""Affine registration of a head to the MNI atlas (rigid, then affine; Mattes MI).

The transform maps atlas (MNI, LPS) points to native scanner points, which is what
`sitk.Resample` needs to pull a native image into MNI space.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from daemon.errors import InputRejected

logger = logging.getLogger(__name__)


class RegistrationFailed(InputRejected):
    """The optimiser could not align the head with the atlas (no head, empty overlap)."""


@dataclass(frozen=True)
class RegistrationResult:
    transform: sitk.AffineTransform  # MNI -> native
    rotation_deg: float              # rotation angle of the final affine's rotation part
    affine_scale: float              # cube root of the affine determinant
    metric: float                    # final Mattes MI (more negative is better)
    seconds: float


def head_mask(image: sitk.Image, threshold: float) -> sitk.Image:
    """Foreground (head) mask by a fixed intensity threshold, largest component."""
    mask = sitk.BinaryThreshold(image, lowerThreshold=float(threshold), upperThreshold=1e9)
    components = sitk.ConnectedComponent(mask)
    return sitk.Cast(sitk.RelabelComponent(components) == 1, sitk.sitkUInt8)


def _centroid(mask: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.HasLabel(1):
        raise RegistrationFailed("registration_failed: no head found above the intensity threshold")
    return np.asarray(stats.GetCentroid(1))


def _configure(method: sitk.ImageRegistrationMethod, stage: dict[str, Any], settings: dict[str, Any]) -> None:
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(settings["histogram_bins"]))
    strategy = method.REGULAR if settings.get("sampling", "random") == "regular" else method.RANDOM
    method.SetMetricSamplingStrategy(strategy)
    fraction = float(stage.get("sampling_fraction", settings["sampling_fraction"]))
    method.SetMetricSamplingPercentage(fraction, int(settings["seed"]))
    method.SetInterpolator(sitk.sitkLinear)
    if stage.get("optimizer") == "regular_step":
        # Fast near the optimum (used for refinement stages that start close).
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=float(stage["max_step_mm"]), minStep=float(stage.get("min_step_mm", 0.01)),
            numberOfIterations=int(stage["iterations"]), relaxationFactor=float(stage.get("relaxation", 0.7)))
    else:
        # Plain gradient descent with the step re-estimated every iteration proved far more
        # robust to the noisy sampled MI than regular-step descent (which halts on noise).
        method.SetOptimizerAsGradientDescent(
            learningRate=1.0, numberOfIterations=int(stage["iterations"]),
            convergenceMinimumValue=float(stage["convergence_value"]),
            convergenceWindowSize=int(stage["convergence_window"]),
            estimateLearningRate=method.Once if stage.get("estimate_learning_rate") == "once" else method.EachIteration,
            maximumStepSizeInPhysicalUnits=float(stage["max_step_mm"]))
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([int(f) for f in stage["shrink_factors"]])
    method.SetSmoothingSigmasPerLevel([float(s) for s in stage["smoothing_sigmas_mm"]])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()


def register_to_atlas(moving: sitk.Image, atlas: sitk.Image, atlas_mask: sitk.Image,
                      settings: dict[str, Any]) -> RegistrationResult:
    """Rigid then affine registration of `moving` (native) to `atlas` (MNI).

    Both images should already be small (~2 mm); pyramids inside go to ~4 mm.
    `atlas_mask` restricts the metric to the atlas head so air does not dominate.
    """
    start = time.perf_counter()
    threshold = float(settings["head_threshold"])
    moving_centroid = _centroid(head_mask(moving, threshold))
    atlas_centroid = _centroid(head_mask(atlas, threshold))

    clamp = settings.get("intensity_clamp")
    if clamp is not None:
        # Spread the MI histogram over brain tissues rather than air/soft/bone only.
        atlas = sitk.Clamp(atlas, sitk.sitkFloat32, float(clamp[0]), float(clamp[1]))
        moving = sitk.Clamp(moving, sitk.sitkFloat32, float(clamp[0]), float(clamp[1]))

    rigid, rigid_metric = _rigid(atlas, moving, atlas_mask, settings, atlas_centroid, moving_centroid, (0.0, 0.0, 0.0))
    # A poor optimum usually means a start too far from the truth (head flexed or turned
    # a lot): try a few other starting rotations and keep the best.
    if rigid_metric > float(settings["restart_if_metric_above"]):
        for angles in settings["restart_rotations_deg"]:
            candidate, metric = _rigid(atlas, moving, atlas_mask, settings, atlas_centroid, moving_centroid,
                                       (float(angles[0]), float(angles[1]), float(angles[2])))
            if metric < rigid_metric:
                rigid, rigid_metric = candidate, metric
            if rigid_metric <= float(settings["restart_if_metric_above"]):
                break

    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    method = sitk.ImageRegistrationMethod()
    _configure(method, settings["affine"], settings)
    method.SetMetricFixedMask(atlas_mask)
    method.SetInitialTransform(affine, inPlace=True)
    method.Execute(atlas, moving)
    metric = float(method.GetMetricValue())

    matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
    rotation = _rotation_angle_deg(rotation_part(matrix))
    result = RegistrationResult(transform=affine, rotation_deg=rotation,
                                affine_scale=float(abs(np.linalg.det(matrix)) ** (1.0 / 3.0)),
                                metric=metric, seconds=time.perf_counter() - start)
    logger.debug("registered", extra={"action": "registered", "rotation_deg": rotation,
                                      "metric": metric, "seconds": result.seconds})
    return result


def _rigid(atlas: sitk.Image, moving: sitk.Image, atlas_mask: sitk.Image, settings: dict[str, Any],
           atlas_centroid: np.ndarray, moving_centroid: np.ndarray,
           start_deg: tuple[float, float, float]) -> tuple[sitk.Euler3DTransform, float]:
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(tuple(atlas_centroid))
    rigid.SetRotation(*(math.radians(a) for a in start_deg))
    rigid.SetTranslation(tuple(moving_centroid - atlas_centroid))
    method = sitk.ImageRegistrationMethod()
    _configure(method, settings["rigid"], settings)
    method.SetMetricFixedMask(atlas_mask)
    method.SetInitialTransform(rigid, inPlace=True)
    method.Execute(atlas, moving)
    return rigid, float(method.GetMetricValue())


def rotation_part(matrix: np.ndarray) -> np.ndarray:
    """The closest rotation to a 3x3 matrix (polar decomposition)."""
    u, _, vt = np.linalg.svd(matrix)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:  # keep it proper; a reflection is not a head pose
        u[:, -1] *= -1.0
        rotation = u @ vt
    return rotation


def _rotation_angle_deg(matrix: np.ndarray) -> float:
    cos_angle = np.clip((np.trace(matrix) - 1.0) / 2.0, -1.0, 1.0)
    return float(math.degrees(math.acos(cos_angle)))


def affine_to_matrix(transform: sitk.AffineTransform) -> np.ndarray:
    """The 4x4 homogeneous matrix of an sitk affine (centre folded into the offset)."""
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    center = np.asarray(transform.GetCenter())
    translation = np.asarray(transform.GetTranslation())
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = translation + center - matrix @ center
    return out


def matrix_to_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(float(v) for v in matrix[:3, :3].ravel()))
    affine.SetTranslation(tuple(float(v) for v in matrix[:3, 3]))
    return affine
