"""Real scans reachable offline, for tests and benchmarks (never for training).

- A real whole-head T1 MR (skull, face and neck included) with its reference brain
  mask and k-means tissue labels, from Debian's `insighttoolkit5-examples`
  (128 x 128 x 62 coronal slices at 2 x 2 x 3 mm).
- Real head CT slices from pydicom's test files (real HU texture, geometry, JPEG 2000).

The T1 is the only real MR here, so it stays out of every training set: it is how
the imaging stage and the models are judged on a real head. Helpers re-pose it by a
known rigid transform, mirror it, and wrap it as a `Phantom` so that
`imaging.phantoms.write_dicom_series` writes it as a DICOM series like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from headscreen.errors import ConfigError
from headscreen.imaging.phantoms import Phantom, Pose
from headscreen.imaging.templates import nifti_to_sitk

ITK_EXAMPLES_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
REAL_T1 = ITK_EXAMPLES_DATA / "KmeansTest_T1UCharRaw.nii.gz"
REAL_T1_BRAIN = ITK_EXAMPLES_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"
REAL_T1_LABELS = ITK_EXAMPLES_DATA / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz"
# Real head CT slices in pydicom's test data (single slices: texture and geometry only).
REAL_CT_SLICES = ("J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm", "693_UNCR.dcm")
# The T1 is stored as 8-bit values; scale to the range of a scanner's 12-bit T1.
T1_SCALE = 8.0


@dataclass(frozen=True)
class RealHead:
    image: sitk.Image        # float32, LPS
    brain_mask: sitk.Image   # uint8, same grid: the reference brain mask
    labels: sitk.Image       # uint8, same grid: k-means tissue classes (0 outside the head)


def real_t1_available() -> bool:
    return REAL_T1.exists() and REAL_T1_BRAIN.exists()


def _nifti(path: Path) -> nib.Nifti1Image:
    return cast(nib.Nifti1Image, nib.load(str(path)))  # nibabel's load is typed as any image format


def load_real_t1() -> RealHead:
    """The real T1 with its reference brain mask (install Debian's insighttoolkit5-examples)."""
    if not real_t1_available():
        raise ConfigError(f"REAL_T1: {REAL_T1} missing (install Debian package insighttoolkit5-examples)")
    image = nifti_to_sitk(_nifti(REAL_T1)) * T1_SCALE
    brain = nifti_to_sitk(_nifti(REAL_T1_BRAIN), dtype=np.uint8) > 0
    labels = nifti_to_sitk(_nifti(REAL_T1_LABELS), dtype=np.uint8)
    return RealHead(image=sitk.Cast(image, sitk.sitkFloat32), brain_mask=sitk.Cast(brain, sitk.sitkUInt8),
                    labels=sitk.Cast(labels, sitk.sitkUInt8))


def head_centre(image: sitk.Image) -> np.ndarray:
    """Centre of the image's field of view (LPS mm): the pivot of re-posing and mirroring."""
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()]))


def pose_matrix(image: sitk.Image, pose: Pose) -> np.ndarray:
    """4x4 map from the scan's points to the re-posed scan's points (rotation about the centre)."""
    euler = sitk.Euler3DTransform()
    euler.SetRotation(*(math.radians(a) for a in pose.rotation_deg))
    rotation = np.asarray(euler.GetMatrix()).reshape(3, 3)
    centre = head_centre(image)
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre - rotation @ centre + np.asarray(pose.translation_mm, dtype=float)
    return out


def repose(image: sitk.Image, pose: Pose, nearest: bool = False, margin_mm: float = 40.0) -> sitk.Image:
    """The head moved by `pose` inside a field of view enlarged by `margin_mm` each side."""
    return _apply(image, pose_matrix(image, pose), nearest, margin_mm)


def mirror(image: sitk.Image, axes: str, nearest: bool = False) -> sitk.Image:
    """The head mirrored about its centre along 'x' (left-right), 'z' (upside down) or both,
    with the header geometry unchanged: what a mislabelled or flipped series looks like."""
    signs = np.array([-1.0 if axis in axes else 1.0 for axis in "xyz"])
    centre = head_centre(image)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(signs)
    matrix[:3, 3] = centre - signs * centre
    return _apply(image, matrix, nearest, 0.0)


def _apply(image: sitk.Image, matrix: np.ndarray, nearest: bool, margin_mm: float) -> sitk.Image:
    inverse = np.linalg.inv(matrix)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in inverse[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in inverse[:3, 3]))
    pad = [int(math.ceil(margin_mm / s)) for s in image.GetSpacing()]
    grid = sitk.ConstantPad(image, pad, pad, 0) if margin_mm > 0 else image
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    pixel = image.GetPixelID() if nearest else sitk.sitkFloat32
    return sitk.Resample(image, grid, transform, interpolator, 0.0, pixel)


def as_phantom(image: sitk.Image, brain_mask: sitk.Image | None = None, modality: str = "MR",
               age: float = 40.0) -> Phantom:
    """Wrap a real (or re-posed) volume so write_dicom_series can write it as a series."""
    mask = brain_mask if brain_mask is not None else sitk.Cast(image * 0, sitk.sitkUInt8)
    return Phantom(image=sitk.Cast(image, sitk.sitkFloat32), brain_mask=sitk.Cast(mask, sitk.sitkUInt8),
                   lesion_mask=sitk.Cast(mask * 0, sitk.sitkUInt8), age=age, modality=modality, pose=Pose(),
                   scale=1.0, mni_to_native=sitk.AffineTransform(3))


def real_ct_slice_paths() -> list[Path]:
    """The real head CT slices from pydicom's test files (pydicom-data holds some of them)."""
    from pydicom.data import get_testdata_file

    paths = []
    for name in REAL_CT_SLICES:
        found = get_testdata_file(name)
        if found:
            paths.append(Path(str(found)))
    return paths


# --------------------------------------------------------------------------- lesions in the real T1
#
# The real T1 is healthy; the real-scan protocol (bench/real_scans.py) also needs it with
# known findings. `insert_lesion` paints one into the scan's own native grid, inside its
# reference brain mask, at T1 levels set from the scan's own tissue means, so a model is
# judged on real anatomy, real noise and a real intensity scale around the lesion.

LESION_KINDS = ("hemorrhage", "subdural", "infarct", "tumour")
LESION_LABEL = 1   # the lesion itself (tumour: its core): the part `volume_ml` asks for
OEDEMA_LABEL = 2   # tumour only: the oedema around the core


@dataclass(frozen=True)
class TissueMeans:
    """Mean T1 of CSF, grey and white matter inside the brain mask, and the scan's noise."""

    csf: float
    gm: float
    wm: float
    noise_sigma: float


@dataclass(frozen=True)
class T1Level:
    """A lesion's T1 level, `fraction` of the way from tissue `low` to tissue `high`
    (beyond `high` when > 1), with why."""

    low: str
    high: str
    fraction: float
    reason: str

    def value(self, means: TissueMeans) -> float:
        low, high = getattr(means, self.low), getattr(means, self.high)
        return low + self.fraction * (high - low)


T1_LEVELS: dict[str, T1Level] = {
    "hemorrhage": T1Level("gm", "wm", 1.8, "subacute blood: methaemoglobin shortens T1, brighter than white matter"),
    "subdural": T1Level("gm", "wm", 1.6, "subacute subdural blood: methaemoglobin, bright, a little diluted by CSF"),
    "infarct": T1Level("csf", "gm", 0.4, "subacute-chronic infarct: oedema, then gliosis, between CSF and grey matter"),
    "tumour": T1Level("csf", "gm", 0.5, "glioma core without contrast: water-rich, hypointense, between CSF and GM"),
    "oedema": T1Level("csf", "gm", 0.8, "vasogenic oedema: extracellular water in white matter, slightly below GM"),
}
# Brightening lesions replace every voxel (blood displaces tissue and CSF alike); darkening
# ones only lower a voxel, so sulcal CSF inside an infarct or oedema stays as dark as it was.
_BRIGHT = frozenset({"hemorrhage", "subdural"})
_EDGE_SIGMA_MM = 1.0       # partial volume at the lesion's edge
_TEXTURE_FRACTION = 0.04   # smooth heterogeneity, as a fraction of the lesion-to-GM contrast


def tissue_means(head: RealHead) -> TissueMeans:
    """CSF / GM / WM means by 3-class k-means of the brain's intensities (1D, started at
    the 10th / 50th / 90th percentiles, so deterministic); noise from white matter residuals."""
    values = sitk.GetArrayViewFromImage(head.image)
    brain = sitk.GetArrayViewFromImage(head.brain_mask) > 0
    inside = values[brain].astype(np.float64)
    centres = np.percentile(inside, [10.0, 50.0, 90.0])
    for _ in range(50):
        labels = np.argmin(np.abs(inside[:, None] - centres[None, :]), axis=1)
        updated = np.array([inside[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(3)])
        if np.allclose(updated, centres, atol=1e-3):
            break
        centres = updated
    csf, gm, wm = (float(v) for v in np.sort(centres))
    white = brain & (np.abs(values - wm) < 0.5 * (wm - gm))
    residual = (values - ndimage.uniform_filter(values.astype(np.float64), size=3))[white]
    # MAD of a 3x3x3 residual; 27/26 undoes the voxel's own share in the local mean.
    sigma = 1.4826 * float(np.median(np.abs(residual - np.median(residual)))) * math.sqrt(27.0 / 26.0)
    return TissueMeans(csf=csf, gm=gm, wm=wm, noise_sigma=sigma)


def insert_lesion(head: RealHead, kind: str, volume_ml: float, seed: int,
                  means: TissueMeans | None = None) -> tuple[sitk.Image, sitk.Image]:
    """The real T1 with one lesion painted in, and the lesion's mask, on the scan's grid.

    kind: 'hemorrhage' (intraparenchymal, an irregular blob in deep brain of one hemisphere),
    'subdural' (a crescent over the convexity, tapering at its ends), 'infarct' (a cortical
    and subcortical wedge, apex towards the ventricle), 'tumour' (an irregular core of
    `volume_ml` with a rim of oedema that follows white matter). Every voxel of the mask
    lies inside the reference brain mask: the mask reaches the inner table of the skull, so
    its outer shell is the intracranial space a subdural collection takes from the brain
    (the brain pushed inwards; no other mass effect is modelled). The mask holds
    LESION_LABEL (exactly `volume_ml`, to one voxel) and, for a tumour, OEDEMA_LABEL.
    Deterministic for (head, kind, volume_ml, seed).
    """
    if kind not in LESION_KINDS:
        raise ValueError(f"kind: expected one of {LESION_KINDS}, got {kind!r}")
    grid = _BrainGrid.of(head)
    n_voxels = int(round(float(volume_ml) / grid.voxel_ml))
    if not 0 < n_voxels <= 0.2 * grid.brain.sum():
        raise ValueError(f"volume_ml: expected more than one voxel and at most a fifth of the brain "
                         f"({0.2 * grid.brain.sum() * grid.voxel_ml:.0f} mL), got {volume_ml}")
    means = means or tissue_means(head)
    rng = np.random.default_rng([int(seed), LESION_KINDS.index(kind)])
    labels = np.zeros(grid.brain.shape, dtype=np.uint8)
    values = sitk.GetArrayFromImage(head.image).astype(np.float32)
    if kind == "subdural":
        region = _crescent(grid, n_voxels, rng)
    elif kind == "infarct":
        region = _wedge(grid, n_voxels, rng)
    else:
        region = _blob(grid, n_voxels, rng, margin_mm=10.0 if kind == "tumour" else 4.0)
    if kind == "tumour":
        oedema = _oedema(grid, region, values, means, rng)
        labels[oedema] = OEDEMA_LABEL
        values = _paint(values, oedema, "oedema", grid, means, rng)
    labels[region] = LESION_LABEL
    values = _paint(values, region, kind, grid, means, rng)
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(head.image)
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(head.image)
    return image, mask


@dataclass(frozen=True)
class _BrainGrid:
    brain: np.ndarray       # bool (z, y, x)
    points: np.ndarray      # (z, y, x, 3) LPS mm of every voxel
    centre: np.ndarray      # brain centroid, LPS mm
    depth: np.ndarray       # mm from the outside of the brain mask (0 outside)
    spacing_zyx: np.ndarray
    voxel_ml: float

    @classmethod
    def of(cls, head: RealHead) -> _BrainGrid:
        image = head.image
        brain = sitk.GetArrayFromImage(head.brain_mask) > 0
        index = np.indices(brain.shape, dtype=np.float64)[::-1]  # x, y, z index grids
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        scaled = np.stack([index[a] * image.GetSpacing()[a] for a in range(3)], axis=-1)
        points = scaled @ direction.T + np.asarray(image.GetOrigin())
        spacing = np.asarray(image.GetSpacing()[::-1], dtype=float)
        return cls(brain=brain, points=points, centre=points[brain].mean(axis=0),
                   depth=ndimage.distance_transform_edt(brain, sampling=spacing), spacing_zyx=spacing,
                   voxel_ml=float(np.prod(image.GetSpacing())) / 1000.0)

    def angle_from(self, direction: np.ndarray, stretch: np.ndarray | None = None) -> np.ndarray:
        """Angle (radians) of each voxel about the brain centroid from `direction` (LPS),
        offsets first scaled by `stretch` (so a cap can reach further along one axis)."""
        offsets = self.points - self.centre
        if stretch is not None:
            offsets = offsets * stretch
        cosine = offsets @ direction / (np.linalg.norm(offsets, axis=-1) + 1e-6)
        return np.arccos(np.clip(cosine, -1.0, 1.0))

    def smooth_noise(self, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
        """Unit-variance Gaussian noise smoothed over `sigma_mm`."""
        field = ndimage.gaussian_filter(rng.normal(0.0, 1.0, self.brain.shape), sigma=sigma_mm / self.spacing_zyx)
        return field / (field.std() + 1e-9)


def _smallest(rank: np.ndarray, candidates: np.ndarray, n_voxels: int) -> np.ndarray:
    """The `n_voxels` candidates of smallest rank: an exact volume whatever the shape."""
    index = np.flatnonzero(candidates.ravel())
    keep = index[np.argsort(rank.ravel()[index], kind="stable")[:n_voxels]]
    out = np.zeros(candidates.size, dtype=bool)
    out[keep] = True
    return out.reshape(candidates.shape)


def _lateral(rng: np.random.Generator, ap: tuple[float, float], up: tuple[float, float]) -> np.ndarray:
    """A unit LPS direction towards one side, tilted front/back and up by random amounts."""
    vector = np.array([rng.choice([-1.0, 1.0]), rng.uniform(*ap), rng.uniform(*up)])
    return vector / np.linalg.norm(vector)


def _blob(grid: _BrainGrid, n_voxels: int, rng: np.random.Generator, margin_mm: float) -> np.ndarray:
    """An irregular ellipsoid (axes 0.75-1.3, randomly turned, bumpy surface) in one hemisphere,
    centred deep enough that it stays in the brain."""
    radius = (3.0 * n_voxels * grid.voxel_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    off_midline = np.abs(grid.points[..., 0] - grid.centre[0]) >= 12.0
    near_centre = np.linalg.norm(grid.points - grid.centre, axis=-1) <= 50.0
    candidates = np.zeros(0, dtype=int)
    for slack in (1.0, 0.75, 0.5, 0.0):  # deep enough if possible, else as deep as the brain allows
        fits = grid.brain & off_midline & near_centre & (grid.depth >= slack * radius + margin_mm)
        candidates = np.flatnonzero(fits.ravel())
        if len(candidates):
            break
    if not len(candidates):
        candidates = np.flatnonzero(grid.brain.ravel())
    centre = grid.points.reshape(-1, 3)[candidates[rng.integers(len(candidates))]]
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = rng.uniform(0.75, 1.3, 3)
    offsets = (grid.points - centre) @ rotation / (axes / np.cbrt(np.prod(axes)))
    bumps = grid.smooth_noise(rng, sigma_mm=max(radius / 2.0, 2.0)) * 0.15 * radius
    return _smallest(np.linalg.norm(offsets, axis=-1) - bumps, grid.brain, n_voxels)


def _crescent(grid: _BrainGrid, n_voxels: int, rng: np.random.Generator) -> np.ndarray:
    """The outermost shell of the brain mask under a cap over the lateral convexity, thickest
    at the cap's centre and tapering to its rim (a crescent in every slice); the cap reaches
    further front-to-back, along which a subdural spreads, and is sized for a 6-8 mm mean thickness
    on a sphere (thicker in practice: the brain is not a sphere and the cap tapers)."""
    direction = _lateral(rng, ap=(-0.3, 0.3), up=(0.4, 0.9))
    stretch = np.array([1.0, 0.75, 1.0])
    mean_thickness_mm = rng.uniform(6.0, 8.0)
    radius = (3.0 * grid.brain.sum() * grid.voxel_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    area_mm2 = n_voxels * grid.voxel_ml * 1000.0 / mean_thickness_mm
    cap = math.acos(max(-1.0, 1.0 - area_mm2 / (2.0 * math.pi * radius ** 2)))
    cap = float(np.clip(cap, math.radians(25.0), math.radians(80.0)))
    angle = grid.angle_from(direction, stretch)
    taper = np.sqrt(np.maximum(1.0 - (angle / cap) ** 2, 1e-3))
    return _smallest(grid.depth / taper, grid.brain & (angle < cap), n_voxels)


def _wedge(grid: _BrainGrid, n_voxels: int, rng: np.random.Generator) -> np.ndarray:
    """A cone with its base on the lateral cortex and its apex deep (a territorial infarct:
    cortex and the white matter beneath), the base's edge made irregular."""
    direction = _lateral(rng, ap=(-0.5, 0.5), up=(-0.1, 0.5))
    cap = math.radians(rng.uniform(22.0, 30.0))
    angle = grid.angle_from(direction) * (1.0 + 0.12 * grid.smooth_noise(rng, sigma_mm=8.0))
    within = grid.brain & (angle < cap)
    return _smallest(grid.depth / np.maximum(1.0 - angle / cap, 1e-3), within, n_voxels)


def _oedema(grid: _BrainGrid, core: np.ndarray, values: np.ndarray, means: TissueMeans,
            rng: np.random.Generator) -> np.ndarray:
    """Brain within 6-10 mm (bumpy) of the core where the smoothed scan is white matter:
    vasogenic oedema spreads along white matter and spares the cortex."""
    rim_mm = rng.uniform(6.0, 10.0)
    outside = ndimage.distance_transform_edt(~core, sampling=grid.spacing_zyx)
    reach = rim_mm * (1.0 + 0.3 * grid.smooth_noise(rng, sigma_mm=6.0))
    smoothed = ndimage.gaussian_filter(values, sigma=1.0 / grid.spacing_zyx)
    white = smoothed >= 0.5 * (means.gm + means.wm)
    return grid.brain & ~core & white & (outside <= reach)


def _paint(values: np.ndarray, region: np.ndarray, kind: str, grid: _BrainGrid, means: TissueMeans,
           rng: np.random.Generator) -> np.ndarray:
    """`region` set to the kind's T1 level with smooth texture and the scan's own noise and
    8-bit steps; its edge blends into the neighbours (partial volume) but never leaves the brain."""
    level = T1_LEVELS[kind].value(means)
    texture = _TEXTURE_FRACTION * abs(level - means.gm) * grid.smooth_noise(rng, sigma_mm=3.0)
    target = level + texture + rng.normal(0.0, means.noise_sigma, values.shape)
    edge = ndimage.gaussian_filter(region.astype(np.float32), sigma=_EDGE_SIGMA_MM / grid.spacing_zyx)
    weight = np.where(edge >= 0.05, np.maximum(region, edge), region) * grid.brain
    bright = kind in _BRIGHT
    if not bright:
        target = np.minimum(values, target)
    blended = values + weight * (target - values)
    # Back onto the scan's 8-bit steps, rounding towards the documented direction.
    steps = np.ceil(blended / T1_SCALE) if bright else np.floor(blended / T1_SCALE)
    return np.where(weight > 0, steps * T1_SCALE, values).astype(np.float32)
