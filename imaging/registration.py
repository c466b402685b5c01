"""Affine registration of a head to the MNI atlas (rigid, then affine; Mattes MI).

The transform maps atlas (MNI, LPS) points to native scanner points, which is what
`sitk.Resample` needs to pull a native image into MNI space.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from headscreen.errors import InputRejected
from headscreen.imaging.concurrency import side_by_side, threads

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
    upside_down: bool = False        # the head's superior axis points down in the scanner frame
    stage_seconds: dict[str, float] | None = None  # search, rigid, affine


def head_mask(image: sitk.Image, threshold: float) -> sitk.Image:
    """Foreground (head) mask by a fixed intensity threshold, largest component."""
    mask = sitk.BinaryThreshold(image, lowerThreshold=float(threshold), upperThreshold=1e9)
    components = sitk.ConnectedComponent(mask)
    return sitk.Cast(sitk.RelabelComponent(components) == 1, sitk.sitkUInt8)


def _method(stage: dict[str, Any], settings: dict[str, Any], transform: sitk.Transform,
            fixed_mask: sitk.Image) -> sitk.ImageRegistrationMethod:
    """One level of a stage: Mattes MI, regular-step descent, fixed parameter scales.

    Every level runs on images shrunk beforehand: ITK's own pyramid re-samples the full
    2 mm images and their masks on every call (~0.3 s of set-up here, before any iteration).
    """
    method = sitk.ImageRegistrationMethod()
    if stage.get("metric", "mattes") == "correlation":
        method.SetMetricAsCorrelation()
    else:
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(settings["histogram_bins"]))
    method.SetMetricSamplingStrategy(method.REGULAR if stage.get("sampling") == "regular" else method.RANDOM)
    # A fixed number of samples per level: the cost of an iteration grows with them, the
    # precision of MI stops improving beyond a few thousand.
    in_mask = float(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask)))
    fraction = min(1.0, float(stage["samples"]) / max(in_mask, 1.0))
    method.SetMetricSamplingPercentage(fraction, int(settings["seed"]))
    method.SetMetricFixedMask(fixed_mask)
    # Gradients at the sampled points only: the default filters the whole images first.
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=float(stage["max_step_mm"]), minStep=float(stage["min_step_mm"]),
        numberOfIterations=int(stage["iterations"]), relaxationFactor=float(stage.get("relaxation", 0.6)),
        gradientMagnitudeTolerance=1e-12)
    method.SetOptimizerScales(_parameter_scales(transform))
    return method


class _Pyramid:
    """Atlas, moving image and metric mask shrunk to each level's spacing, made once."""

    def __init__(self, atlas: sitk.Image, moving: sitk.Image, atlas_mask: sitk.Image) -> None:
        self.atlas, self.moving, self.atlas_mask = atlas, moving, atlas_mask
        self.levels: dict[tuple, tuple[sitk.Image, sitk.Image, sitk.Image]] = {}
        self._lock = threading.Lock()  # registrations side by side share it

    def level(self, spacing_mm: float, clamp: list[float] | None = None) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
        key = (spacing_mm, tuple(clamp) if clamp else None)
        with self._lock:
            return self._level(key, spacing_mm, clamp)

    def _level(self, key: tuple, spacing_mm: float,
               clamp: list[float] | None) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
        if key not in self.levels:
            atlas, moving = _shrink(self.atlas, spacing_mm), _shrink(self.moving, spacing_mm)
            if clamp:
                atlas = sitk.Clamp(atlas, sitk.sitkFloat32, float(clamp[0]), float(clamp[1]))
                moving = sitk.Clamp(moving, sitk.sitkFloat32, float(clamp[0]), float(clamp[1]))
            mask = sitk.Resample(self.atlas_mask, atlas, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            self.levels[key] = (atlas, moving, mask)
        return self.levels[key]


def register_to_atlas(moving: sitk.Image, atlas: sitk.Image, atlas_mask: sitk.Image,
                      settings: dict[str, Any]) -> RegistrationResult:
    """Robust start, then rigid and affine registration of `moving` (native) to `atlas` (MNI).

    Both images should already be small (~2 mm). The start does not trust the head to
    be upright: every orientation hypothesis (as labelled, and turned 180 degrees about
    each axis) is tried with a coarse grid of tilts, each placed by the centroid of its
    cranium (the top of the head along that hypothesis' superior axis, so the amount of
    neck in the field of view does not matter). The best few are refined rigidly at
    ~4 mm and the winner affinely at ~2 mm. `atlas_mask` restricts the metric to the
    atlas head and a rim of air around it.
    """
    start = time.perf_counter()
    moving_head = head_mask(moving, float(settings["head_threshold"]))
    moving_points = _mask_points(moving_head)
    atlas_points = _atlas_points(atlas, float(settings.get("atlas_head_threshold", settings["head_threshold"])))
    if len(moving_points) < 50:
        raise RegistrationFailed("registration_failed: no head found above the intensity threshold")

    search = settings["search"]
    scorer = _CoarseScorer(atlas, moving, atlas_mask, float(search["spacing_mm"]), COARSE_BINS)
    cranium_depth = float(search["cranium_depth_mm"])
    atlas_centre = _cranium_centroid(atlas_points, np.eye(3), cranium_depth)

    def consider(name: str, matrices: list[np.ndarray]) -> list[tuple[float, _Pose, str]]:
        # The cranium is found along each candidate's own superior axis, so a steep pitch
        # still pairs the top of the head with the top of the atlas. All at once: the
        # numpy calls are the cost, not their arithmetic.
        if not matrices:  # no joint steps (joint_step 0)
            return []
        stacked = np.array(matrices)
        moving_centres = _cranium_centroids(moving_points, stacked, cranium_depth)
        scores = scorer.score_many(stacked, atlas_centre, moving_centres)
        # Poses, not ITK transforms yet: only the few refined below become transforms.
        return [(float(score), (matrix, moving_centre), name)
                for matrix, moving_centre, score in zip(matrices, moving_centres, scores, strict=True)]

    grid = search["tilts_deg"]

    def search_hypothesis(name: str, flip: np.ndarray) -> list[tuple[float, _Pose, str]]:
        # The head as labelled gets the full grid (pitch x yaw x roll: a one-axis-at-a-time
        # search missed combined roll and yaw on the real T1); the turned hypotheses only
        # need to be found when they are true, so pitch x yaw suffices for them.
        rolls = grid["roll"] if name == "as_labelled" else [0.0]
        yaws = grid["yaw"] if name == "as_labelled" else grid["yaw_turned"]
        angles = [(pitch, roll, yaw) for pitch in grid["pitch"] for yaw in yaws for roll in rolls]
        found = consider(name, [flip @ _euler(*tilt) for tilt in angles])
        best_angles = min(zip((score for score, _, _ in found), angles))[1]
        return found + consider(name, [flip @ _euler(*(b + d for b, d in zip(best_angles, step)))
                                       for step in _joint_steps(float(grid["joint_step"]))])

    # In hypothesis order, as one after another: ties then sort the same way.
    candidates = [candidate for found in side_by_side(
        [functools.partial(search_hypothesis, name, flip) for name, flip in _HYPOTHESES.items()])
        for candidate in found]
    candidates.sort(key=lambda c: c[0])
    searched = time.perf_counter()

    pyramid = _Pyramid(atlas, moving, atlas_mask)
    # Refine the best few overall and the best of every hypothesis: with heavy noise or a
    # steep tilt the coarse score can rank a wrong hypothesis first, the refined one not.
    shortlist = candidates[: int(search["refine_best"])]
    for name in _HYPOTHESES:
        leader = next(c for c in candidates if c[2] == name)
        if all(leader is not c for c in shortlist):
            shortlist.append(leader)
    # Every contender gets the coarse rigid level; only the winner goes on to the finer ones.
    rigid_stage = settings["rigid"]
    coarse_stage = {**rigid_stage, "levels_mm": rigid_stage["levels_mm"][:1]}
    fine_stage = {**rigid_stage, "levels_mm": rigid_stage["levels_mm"][1:]}
    at_once = threads()
    # Side by side (imaging.concurrency), each on its own: the same to the bit.
    moved = side_by_side([functools.partial(_optimise, pyramid, _rigid(atlas_centre, pose), coarse_stage, settings)
                          for _, pose, _ in shortlist], at_once)
    refined = [(metric, transform, name) for (transform, metric), (_, _, name) in zip(moved, shortlist)]
    refined.sort(key=lambda c: c[0])
    best = refined[0]

    def finish(rigid: sitk.Euler3DTransform) -> tuple[sitk.AffineTransform, float]:
        if fine_stage["levels_mm"]:
            rigid = _optimise(pyramid, rigid, fine_stage, settings)[0]
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        return _optimise(pyramid, affine, settings["affine"], settings)

    rigid_done = time.perf_counter()
    hypothesis = best[2]
    labelled = next((c for c in refined if c[2] == "as_labelled"), None)
    if hypothesis != "as_labelled" and labelled is not None:
        # Headers almost always say the right way round, and a skull alone is nearly
        # symmetric front to back: on realistic CT heads a back-to-front turn won the
        # coarse level by 0.3-3 % (11 of 136 healthy synthetic heads). A turn must also
        # win the full registration, whose last level weighs the soft tissue and brain.
        # The two finishes fill the threads: each runs its own levels one after another.
        (affine, metric), (labelled_affine, labelled_metric) = side_by_side(
            [lambda: finish(best[1]), lambda: finish(labelled[1])], at_once)
        if labelled_metric <= metric:
            affine, metric, hypothesis = labelled_affine, labelled_metric, "as_labelled"
    else:
        affine, metric = finish(best[1])

    matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
    rotation = _rotation_angle_deg(rotation_part(matrix))
    result = RegistrationResult(transform=affine, rotation_deg=rotation,
                                affine_scale=float(abs(np.linalg.det(matrix)) ** (1.0 / 3.0)),
                                metric=metric, seconds=time.perf_counter() - start,
                                upside_down=_superior_axis_down(matrix),
                                stage_seconds={"search": searched - start, "rigid": rigid_done - searched,
                                               "affine": time.perf_counter() - rigid_done})
    logger.debug("registered", extra={"action": "registered", "rotation_deg": rotation, "metric": metric,
                                      "hypothesis": hypothesis, "seconds": result.seconds})
    return result


# A start candidate: its rotation (atlas -> native) and the native point the atlas' cranium
# centre goes to.
_Pose = tuple[np.ndarray, np.ndarray]


def _rigid(atlas_centre: np.ndarray, pose: _Pose) -> sitk.Euler3DTransform:
    matrix, moving_centre = pose
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(atlas_centre))
    transform.SetMatrix(tuple(matrix.ravel()))
    transform.SetTranslation(tuple(moving_centre - atlas_centre))
    return transform


_ATLAS_POINTS: dict[tuple, np.ndarray] = {}
_ATLAS_POINTS_LOCK = threading.Lock()


def _atlas_points(atlas: sitk.Image, threshold: float) -> np.ndarray:
    """`_mask_points` of the atlas head: the same atlas every study, so found once per process
    (keyed by the atlas' geometry and voxels, so another atlas never gets these)."""
    voxels = sitk.GetArrayViewFromImage(atlas)
    key = (atlas.GetSize(), atlas.GetSpacing(), atlas.GetOrigin(), atlas.GetDirection(), threshold,
           hash(voxels.tobytes()))
    with _ATLAS_POINTS_LOCK:
        if key not in _ATLAS_POINTS:
            if len(_ATLAS_POINTS) >= 8:
                _ATLAS_POINTS.clear()
            points = _mask_points(head_mask(atlas, threshold))
            points.setflags(write=False)  # shared by every later registration
            _ATLAS_POINTS[key] = points
        return _ATLAS_POINTS[key]


# Orientation hypotheses (atlas axis -> native axis, LPS): as labelled, and the three
# 180-degree turns. A head stored upside down or back to front lands on one of these.
_HYPOTHESES: dict[str, np.ndarray] = {
    "as_labelled": np.eye(3),
    "turned_about_lr": np.diag([1.0, -1.0, -1.0]),
    "turned_about_ap": np.diag([-1.0, 1.0, -1.0]),
    "turned_about_si": np.diag([-1.0, -1.0, 1.0]),
}


HEAD_RADIUS_MM = 80.0


def _parameter_scales(transform: sitk.Transform) -> list[float]:
    """Optimizer scales giving each parameter about the same physical effect on a head:
    a radian of rotation, or a unit of a matrix element, moves the head's edge ~80 mm."""
    lever = HEAD_RADIUS_MM ** 2
    if isinstance(transform, sitk.Euler3DTransform):
        return [lever] * 3 + [1.0] * 3
    if isinstance(transform, sitk.AffineTransform):
        return [lever] * 9 + [1.0] * 3
    raise TypeError(f"transform: unsupported type {type(transform).__name__}")


def _joint_steps(step: float) -> list[tuple[float, float, float]]:
    """Offsets of a 3 x 3 x 3 grid about a point, the point itself left out."""
    offsets = (-step, 0.0, step)
    return [(a, b, c) for a in offsets for b in offsets for c in offsets if (a, b, c) != (0.0, 0.0, 0.0)]


@functools.lru_cache(maxsize=4096)
def _euler(pitch: float, roll: float, yaw: float) -> np.ndarray:
    """Rotation matrix from angles in degrees about L-R (pitch), A-P (roll) and S-I (yaw).
    Cached (read-only): every study searches the same grid of tilts."""
    euler = sitk.Euler3DTransform()
    euler.SetRotation(math.radians(pitch), math.radians(roll), math.radians(yaw))
    matrix = np.asarray(euler.GetMatrix()).reshape(3, 3)
    matrix.setflags(write=False)
    return matrix


def _mask_points(mask: sitk.Image) -> np.ndarray:
    """Physical (LPS) points of a mask's voxels, subsampled to at most ~8k."""
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(float)
    if len(index) > 8000:
        index = index[:: len(index) // 8000 + 1]
    direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    return (index * np.asarray(mask.GetSpacing())) @ direction.T + np.asarray(mask.GetOrigin())


def _cranium_centroid(points: np.ndarray, atlas_to_native: np.ndarray, depth_mm: float) -> np.ndarray:
    """Centroid of the head's top `depth_mm` along the superior axis a candidate pose gives."""
    up = atlas_to_native @ np.array([0.0, 0.0, 1.0])
    height = points @ up
    top = np.percentile(height, 99.5)
    return points[height > top - depth_mm].mean(axis=0)


def _cranium_centroids(points: np.ndarray, atlas_to_native: np.ndarray, depth_mm: float) -> np.ndarray:
    """`_cranium_centroid` of each of a stack of candidate poses (K, 3, 3): (K, 3)."""
    ups = atlas_to_native[:, :, 2]  # each pose's superior axis
    heights = np.stack([points @ up for up in ups])  # as `_cranium_centroid` computes them
    tops = np.percentile(heights, 99.5, axis=1)
    top = heights > tops[:, None] - depth_mm
    # Summed point after point as `_cranium_centroid`'s mean sums them (rows in order), the
    # same to the bit: a running sum adds strictly in order, and over contiguous columns
    # it costs a third of summing each pose's selected rows.
    columns = np.ascontiguousarray(points.T)
    sums = np.array([np.cumsum(np.compress(chosen, columns, axis=1), axis=1)[:, -1] if chosen.any()
                     else np.zeros(3) for chosen in top])
    return sums / top.sum(axis=1)[:, None]


def _shrink(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    factors = [max(1, int(round(spacing_mm / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors)


COARSE_POINTS = 2500
COARSE_BINS = 16


class _CoarseScorer:
    """Negative mutual information of a candidate pose on ~8 mm grids, in numpy.

    Hundreds of candidates are scored; ITK's metric costs ~13 ms a call here (set-up
    each time), sampling fixed points with map_coordinates well under 1 ms.
    """

    def __init__(self, atlas: sitk.Image, moving: sitk.Image, atlas_mask: sitk.Image, spacing_mm: float,
                 bins: int) -> None:
        coarse_atlas = _shrink(atlas, spacing_mm)
        mask = sitk.Resample(atlas_mask, coarse_atlas, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
        if len(index) > COARSE_POINTS:  # an even subset: the cost is per point, the ranking holds
            index = index[np.linspace(0, len(index) - 1, COARSE_POINTS).astype(int)]
        self.atlas_values = sitk.GetArrayViewFromImage(coarse_atlas)[tuple(index.T)].astype(np.float32)
        direction = np.asarray(coarse_atlas.GetDirection()).reshape(3, 3)
        self.points = (index[:, ::-1] * np.asarray(coarse_atlas.GetSpacing())) @ direction.T \
            + np.asarray(coarse_atlas.GetOrigin())
        coarse_moving = _shrink(moving, spacing_mm)
        self.moving = sitk.GetArrayFromImage(coarse_moving)
        self.moving_origin = np.asarray(coarse_moving.GetOrigin())
        moving_direction = np.asarray(coarse_moving.GetDirection()).reshape(3, 3)
        self.physical_to_index = np.linalg.inv(moving_direction * np.asarray(coarse_moving.GetSpacing()))
        self.bins = bins
        self.atlas_bins = _quantise(self.atlas_values, bins)
        low = float(np.percentile(self.moving, 1.0))
        self.moving_background = low

    def score(self, matrix: np.ndarray, atlas_centre: np.ndarray, moving_centre: np.ndarray) -> float:
        native = (self.points - atlas_centre) @ matrix.T + moving_centre
        index_xyz = (native - self.moving_origin) @ self.physical_to_index.T
        values = ndimage.map_coordinates(self.moving, index_xyz[:, ::-1].T, order=1, mode="constant",
                                         cval=self.moving_background)
        joint = np.bincount(self.atlas_bins * self.bins + _quantise(values, self.bins),
                            minlength=self.bins * self.bins).reshape(self.bins, self.bins)
        return _negative_mutual_information(joint)

    def score_many(self, matrices: np.ndarray, atlas_centre: np.ndarray, moving_centres: np.ndarray) -> np.ndarray:
        """`score` of each of a stack of candidate poses (K, 3, 3) with their centres (K, 3)."""
        count, bins = len(matrices), self.bins
        native = (self.points - atlas_centre) @ matrices.transpose(0, 2, 1) + moving_centres[:, None, :]
        index_xyz = (native - self.moving_origin) @ self.physical_to_index.T
        values = ndimage.map_coordinates(self.moving, index_xyz[..., ::-1].reshape(-1, 3).T, order=1,
                                         mode="constant", cval=self.moving_background).reshape(count, -1)
        cells = (np.arange(count)[:, None] * bins + self.atlas_bins) * bins + _quantise_rows(values, bins)
        joints = np.bincount(cells.ravel(), minlength=count * bins * bins).reshape(count, bins, bins)
        return np.array([_negative_mutual_information(joint) for joint in joints])


def _negative_mutual_information(counts: np.ndarray) -> float:
    """Of a joint histogram (atlas bins x moving bins)."""
    joint = counts.astype(np.float64)
    joint /= joint.sum()
    pa, pm = joint.sum(axis=1), joint.sum(axis=0)
    nonzero = joint > 0
    return -float(np.sum(joint[nonzero] * np.log(joint[nonzero] / np.outer(pa, pm)[nonzero])))


def _quantise_rows(values: np.ndarray, bins: int) -> np.ndarray:
    """`_quantise` of each row."""
    low, high = np.percentile(values, [0.5, 99.5], axis=1)[:, :, None]
    scaled = (np.clip(values, low, high) - low) / np.maximum(high - low, 1e-6)
    return np.minimum((scaled * bins).astype(np.int64), bins - 1)


def _quantise(values: np.ndarray, bins: int) -> np.ndarray:
    low, high = np.percentile(values, [0.5, 99.5])
    scaled = (np.clip(values, low, high) - low) / max(float(high - low), 1e-6)
    return np.minimum((scaled * bins).astype(np.int64), bins - 1)


def _superior_axis_down(matrix: np.ndarray) -> bool:
    """True when the atlas' superior axis points below the horizontal in the scanner frame."""
    up = rotation_part(matrix) @ np.array([0.0, 0.0, 1.0])
    return bool(up[2] < 0.0)


_T = TypeVar("_T", bound=sitk.Transform)


def _optimise(pyramid: _Pyramid, transform: _T, stage: dict[str, Any],
              settings: dict[str, Any]) -> tuple[_T, float]:
    """Run a stage coarse to fine over its levels; returns the moved transform and final metric."""
    current = transform.__class__(transform)
    metric = float("inf")
    levels = len(stage["levels_mm"])
    metrics = stage.get("metric_per_level") or [stage.get("metric", "mattes")] * levels
    samples = stage.get("samples_per_level") or [stage["samples"]] * levels
    for spacing, metric_name, sample_count in zip(stage["levels_mm"], metrics, samples):
        level_stage = {**stage, "metric": metric_name, "samples": sample_count}
        images = pyramid.level(float(spacing), stage.get("clamp") if metric_name == "correlation" else None)
        before = transform.__class__(current)
        start_metric, metric = _run_level(level_stage, settings, current, images)
        if start_metric is not None and not metric <= start_metric:
            # The optimiser made it worse (it can step out of a good basin on a head
            # unlike the atlas): keep where this level started.
            current, metric = before, start_metric
    return current, metric


def _run_level(stage: dict[str, Any], settings: dict[str, Any], transform: sitk.Transform,
               images: tuple[sitk.Image, sitk.Image, sitk.Image]) -> tuple[float | None, float]:
    """Optimise `transform` in place; returns the metric where it started and where it
    ended, both on the level's own samples. ITK reports each iteration after its step with
    the value from before it, so the first report holds the start's value, with no
    evaluation of its own (a separate MetricEvaluate sets the metric up again and reads
    every voxel in the mask). The start is None when the optimiser took no step, and so
    left the transform where it was."""
    atlas, moving, mask = images
    method = _method(stage, settings, transform, mask)
    method.SetInitialTransform(transform, inPlace=True)
    first: list[float] = []
    method.AddCommand(sitk.sitkIterationEvent,
                      lambda: None if first else first.append(method.GetMetricValue()))
    try:
        method.Execute(atlas, moving)
    finally:
        method.RemoveAllCommands()  # the command refers to the method: break the cycle
    return (first[0] if first else None), float(method.GetMetricValue())


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
