"""Offline MNI templates and the tissue model shared by phantoms and registration.

Sources (bundled, no network): nilearn's ICBM152 2009 brain mask and GM/WM maps
(inside the nilearn wheel), and Colin27 for the whole-head outline and the registration
atlas: `imaging/data/ch2.nii.gz`, a byte-identical copy of Debian mricron-data's
/usr/share/mricron/templates/ch2.nii.gz (licence: imaging/data/README.md), packaged with
headscreen so that serving needs no Debian package. Everything is built lazily and cached
per process; nothing happens at import.

All images here live on one MNI grid in LPS with identity direction
(``BASE_ORIGIN_LPS``, 1 mm), padded below the ICBM field of view so that the
skull closes under the brainstem.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from headscreen.errors import ConfigError
from headscreen.imaging.skullstrip import fill_holes

logger = logging.getLogger(__name__)

# Colin27 (ch2.nii.gz): $HEADSCREEN_COLIN27 when set, else the packaged copy, else Debian's.
COLIN27_ENV = "HEADSCREEN_COLIN27"
PACKAGED_COLIN27 = Path(__file__).resolve().parent / "data" / "ch2.nii.gz"
DEBIAN_COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")
BOTTOM_PAD_MM = 24
SKULL_THICKNESS_MM = 7.0
HEAD_MARGIN_MM = 12.0
# Parenchyma erosion levels cached for the age model (mm of cortical/ventricular widening).
ATROPHY_LEVELS = 5

CT_HU = {"air": -1000.0, "scalp": 40.0, "skull_table": 1400.0, "skull_diploe": 700.0,
         "csf": 5.0, "gm": 40.0, "wm": 28.0}
MR_T1 = {"air": 0.0, "scalp": 350.0, "skull_table": 40.0, "skull_diploe": 250.0,
         "csf": 80.0, "gm": 420.0, "wm": 620.0}


@dataclass(frozen=True)
class TissueMaps:
    """Tissue fractions on the 1 mm MNI base grid, arrays in (z, y, x) order."""

    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray            # ICBM brain mask (bool): brain + CSF inside the inner table
    skull_depth: np.ndarray      # mm from the inner table inside the skull shell, -1 elsewhere
    head: np.ndarray             # bool: everything that is not air
    parenchyma_levels: tuple[np.ndarray, ...]  # GM+WM eroded by 0, 1, 2, ... mm
    reference: sitk.Image        # geometry carrier (uint8 zeros)


def nifti_to_sitk(img: nib.spatialimages.SpatialImage, dtype: type = np.float32) -> sitk.Image:
    """Convert a NIfTI image (RAS affine) to a SimpleITK image in LPS."""
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = ras_to_lps @ img.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.asarray(img.dataobj, dtype=dtype).transpose(2, 1, 0))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple((affine[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    return image


def _base_reference() -> sitk.Image:
    """The 1 mm MNI base grid: the ICBM 2009 field of view, identity LPS direction."""
    mask = _icbm("mask")
    size = list(mask.GetSize())
    ref = sitk.Image(size[0], size[1], size[2] + BOTTOM_PAD_MM, sitk.sitkUInt8)
    ref.SetSpacing((1.0, 1.0, 1.0))
    corner = np.array(mask.TransformIndexToPhysicalPoint((size[0] - 1, size[1] - 1, 0)))
    ref.SetOrigin((float(corner[0]), float(corner[1]), float(corner[2]) - BOTTOM_PAD_MM))
    return ref


@functools.cache
def _icbm(name: str) -> sitk.Image:
    """Load one nilearn ICBM152 2009 1 mm image (bundled with nilearn)."""
    from nilearn import datasets  # deferred: importing nilearn is slow

    loaders = {
        "mask": datasets.load_mni152_brain_mask,
        "gm": datasets.load_mni152_gm_template,
        "wm": datasets.load_mni152_wm_template,
        "t1": datasets.load_mni152_template,
    }
    if name not in loaders:
        raise ConfigError(f"name: unknown ICBM template {name!r}")
    return nifti_to_sitk(loaders[name](resolution=1))


def _on_base(image: sitk.Image, ref: sitk.Image) -> np.ndarray:
    resampled = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


@functools.lru_cache(maxsize=1)
def tissue_maps() -> TissueMaps:
    """Build the tissue model once per process (a few seconds)."""
    ref = _base_reference()
    brain = _on_base(_icbm("mask"), ref) > 0.5
    gm = np.clip(_on_base(_icbm("gm"), ref), 0.0, 1.0) * brain
    wm = np.clip(_on_base(_icbm("wm"), ref), 0.0, 1.0) * brain
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]

    distance_out = ndimage.distance_transform_edt(~brain).astype(np.float32)
    head = _colin_head(ref) | (distance_out <= HEAD_MARGIN_MM)
    shell = (distance_out > 0) & (distance_out <= SKULL_THICKNESS_MM) & head
    skull_depth = np.where(shell, distance_out, -1.0).astype(np.float32)

    levels = [gm + wm]
    for _ in range(ATROPHY_LEVELS - 1):
        levels.append(ndimage.grey_erosion(levels[-1], footprint=ndimage.generate_binary_structure(3, 1)))
    logger.info("tissue model built", extra={"action": "tissue_maps_built", "shape": brain.shape})
    return TissueMaps(gm=gm.astype(np.float32), wm=wm.astype(np.float32), brain=brain,
                      skull_depth=skull_depth, head=head,
                      parenchyma_levels=tuple(level.astype(np.float32) for level in levels),
                      reference=ref)


def colin27_path() -> Path:
    """The Colin27 T1 the templates are built from: the file $HEADSCREEN_COLIN27 names,
    else the copy packaged in imaging/data, else Debian mricron-data's (all three the same
    bytes on a standard install; tests/test_deploy.py checks that the results are)."""
    named = os.environ.get(COLIN27_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"{COLIN27_ENV}: {path} is not a file")
        return path
    for path in (PACKAGED_COLIN27, DEBIAN_COLIN27):
        if path.is_file():
            return path
    raise ConfigError(f"Colin27 template missing: neither {PACKAGED_COLIN27} (packaged with headscreen; "
                      f"reinstall it) nor {DEBIAN_COLIN27} (Debian mricron-data) exists")


def _colin_on_reference(ref: sitk.Image) -> np.ndarray:
    """Colin27 resampled (linear) to the base grid, as read from `colin27_path()`."""
    path = colin27_path()
    colin_nifti = nib.load(str(path))
    if not isinstance(colin_nifti, nib.spatialimages.SpatialImage):
        raise ConfigError(f"Colin27 template: {path} is not a NIfTI image")
    return _on_base(nifti_to_sitk(colin_nifti), ref)


def _colin_head(ref: sitk.Image) -> np.ndarray:
    """Whole-head mask (skin inward) from Colin27 resampled to the base grid."""
    colin = _colin_on_reference(ref)
    head = colin > 20.0
    labels, count = ndimage.label(head)
    if count > 1:
        sizes = ndimage.sum_labels(head, labels, index=np.arange(1, count + 1))
        head = labels == (int(np.argmax(sizes)) + 1)
    head = ndimage.binary_closing(head, iterations=2)
    # Fill per axial slice: the neck is open at the bottom so 3D filling misses it.
    head = fill_holes(head, in_planes=True)
    # Continue the neck below the ICBM field of view.
    head[:BOTTOM_PAD_MM] |= head[BOTTOM_PAD_MM][None]
    return head


def compose_intensity(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, skull_depth: np.ndarray,
                      head: np.ndarray, values: dict[str, float]) -> np.ndarray:
    """Mix tissue fractions into one intensity image (CT in HU or MR T1 in arbitrary units)."""
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    image = np.full(gm.shape, values["air"], dtype=np.float32)
    image[head] = values["scalp"]
    in_skull = skull_depth >= 0
    # Dense inner and outer tables with softer diploe between them.
    profile = np.abs(2.0 * skull_depth[in_skull] / SKULL_THICKNESS_MM - 1.0)
    image[in_skull] = values["skull_diploe"] + (values["skull_table"] - values["skull_diploe"]) * profile
    image[brain] = (csf * values["csf"] + gm * values["gm"] + wm * values["wm"])[brain]
    return image


def brain_bbox_lps() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Physical bounding box (LPS mm, voxel centres) of the template brain mask."""
    maps = tissue_maps()
    idx = np.argwhere(maps.brain)
    lo_zyx, hi_zyx = idx.min(axis=0), idx.max(axis=0)
    lo = maps.reference.TransformIndexToPhysicalPoint([int(v) for v in lo_zyx[::-1]])
    hi = maps.reference.TransformIndexToPhysicalPoint([int(v) for v in hi_zyx[::-1]])
    return tuple(lo), tuple(hi)


# HU of a real head CT, for the CT registration target (typical adult values: grey
# matter 35-45, white matter 20-30, CSF 0-15, cortical bone 1000-1800, diploe 400-900,
# fat -100 to -60, muscle and skin 40-60).
CT_ATLAS_HU = {"air": -1000.0, "csf": 8.0, "gm": 38.0, "wm": 27.0, "bone": 1200.0, "diploe": 650.0,
               "fat": -90.0, "soft": 45.0}
# Bone lies within this distance of the brain (beyond it a dark T1 voxel is air or an eye).
CT_ATLAS_BONE_MM = 14.0


@functools.lru_cache(maxsize=8)
def atlas(modality: str, spacing_mm: float = 2.0) -> sitk.Image:
    """Registration target in MNI space, built to look like a real scan of the modality.

    MR: Colin27 itself, a real whole-head T1 (scalp, skull, face and neck included).
    CT: a head CT made from the same real head: the brain from the ICBM tissue maps at
    grey/white/CSF HU, the rest of Colin27 classified by its T1 signal (dark near the
    brain = bone, bright near the brain = diploe, bright beyond = fat, else soft tissue).
    A flat brain inside a ring of bone (what the phantoms are) is a poor target for a
    real head: the face, the skull base and the scalp carry most of the alignment.
    """
    maps = tissue_maps()
    colin = colin27_on_base()
    if modality == "MR":
        image = colin
    elif modality == "CT":
        image = _ct_from_colin(colin, maps)
    else:
        raise ConfigError(f"modality: expected 'CT' or 'MR', got {modality!r}")
    return resample_to_spacing(_as_base_image(image), spacing_mm, intensity_table(modality)["air"])


@functools.lru_cache(maxsize=1)
def colin27_on_base() -> np.ndarray:
    """Colin27 on the base grid (z, y, x), air 0, the padded neck continued from its last slice."""
    colin = _colin_on_reference(tissue_maps().reference)
    colin[:BOTTOM_PAD_MM] = colin[BOTTOM_PAD_MM][None]
    colin.setflags(write=False)
    return colin


def _ct_from_colin(colin: np.ndarray, maps: TissueMaps) -> np.ndarray:
    hu = CT_ATLAS_HU
    wm_signal = float(np.median(colin[maps.wm > 0.9]))
    ratio = colin / wm_signal
    distance = ndimage.distance_transform_edt(~maps.brain).astype(np.float32)
    near_brain = distance <= CT_ATLAS_BONE_MM
    image = np.full(colin.shape, hu["air"], dtype=np.float32)
    image[maps.head] = hu["soft"]
    image[maps.head & (ratio > 0.85)] = hu["fat"]
    image[maps.head & near_brain & (ratio < 0.35)] = hu["bone"]
    image[maps.head & near_brain & (ratio >= 0.85)] = hu["diploe"]
    csf = np.clip(maps.brain.astype(np.float32) - maps.gm - maps.wm, 0.0, 1.0)
    image[maps.brain] = (csf * hu["csf"] + maps.gm * hu["gm"] + maps.wm * hu["wm"])[maps.brain]
    # Partial volume at 1 mm, as a reconstruction kernel gives.
    return ndimage.gaussian_filter(image, 0.6)


@functools.lru_cache(maxsize=8)
def atlas_metric_mask(spacing_mm: float = 2.0) -> sitk.Image:
    """Where registration measures similarity: the atlas head and an 8 mm rim of air,
    so the head's outline counts as much as what is inside it."""
    maps = tissue_maps()
    outside = ndimage.distance_transform_edt(~maps.head)
    mask = resample_to_spacing(_as_base_image((outside <= 8.0).astype(np.float32)), spacing_mm, 0.0)
    return sitk.Cast(mask > 0.5, sitk.sitkUInt8)


@functools.lru_cache(maxsize=8)
def atlas_brain_mask(spacing_mm: float = 2.0) -> sitk.Image:
    """Template brain mask (uint8) on the atlas grid of the given spacing."""
    maps = tissue_maps()
    mask = resample_to_spacing(_as_base_image(maps.brain.astype(np.float32)), spacing_mm, 0.0)
    return sitk.Cast(mask > 0.5, sitk.sitkUInt8)


# The skull check (imaging.qc.skull_coverage) looks for bone along rays from the template
# brain's centre through the vault, rather than counting bone voxels in a fixed shell: a
# real skull is not where the template's is to the millimetre (head shape and skull
# thickness vary beyond what an affine registration undoes), and thin bone on thick slices
# is smeared below any voxel threshold but still peaks along a ray that crosses it.
SKULL_RAYS = 2000  # directions on the whole sphere (Fibonacci lattice); ~1040 point at the vault
SKULL_RAY_WINDOW_MM = (-10.0, 25.0)  # searched from the template brain's edge: inward, outward
SKULL_RAY_STEP_MM = 1.0
SKULL_CAP_DEG = 15.0  # a bone flap is judged over caps of this half-angle (about a 4 cm disc at the skull)


@dataclass(frozen=True)
class SkullRays:
    """Where the skull check samples, on the atlas grid of one spacing."""

    points: np.ndarray     # (rays, samples, 3) continuous (z, y, x) voxel indices, inside to outside
    directions: np.ndarray  # (rays, 3) unit (z, y, x); z is superior
    caps: np.ndarray        # (rays, rays) bool: ray j lies within SKULL_CAP_DEG of ray i


def _fibonacci_sphere(n: int) -> np.ndarray:
    """Near-evenly spread unit vectors (z, y, x)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    r, phi = np.sqrt(1.0 - z * z), np.pi * (1.0 + 5 ** 0.5) * i
    return np.stack([z, r * np.sin(phi), r * np.cos(phi)], axis=1)


def skull_ray_offsets_mm() -> np.ndarray:
    """Where each ray's samples lie, in mm from the template brain's edge (outward positive)."""
    return np.arange(SKULL_RAY_WINDOW_MM[0], SKULL_RAY_WINDOW_MM[1] + 1e-6, SKULL_RAY_STEP_MM)


@functools.lru_cache(maxsize=8)
def skull_rays(spacing_mm: float = 2.0) -> SkullRays:
    """Rays from the template brain's centre through the vault (at or above the horizontal:
    the skull base has foramina and sinuses, and its coverage depends on the field of view),
    each sampled from 10 mm inside the template brain's edge to 25 mm outside it."""
    brain = sitk.GetArrayViewFromImage(atlas_brain_mask(spacing_mm)).astype(bool)
    centre = np.array(ndimage.center_of_mass(brain))
    directions = _fibonacci_sphere(SKULL_RAYS)
    directions = directions[directions[:, 0] >= -0.05]
    # The brain's edge along each ray: its outermost sample inside the template brain.
    radii = np.arange(0.0, 0.5 * max(brain.shape) * spacing_mm, 0.5)
    along = centre + directions[:, None, :] * (radii[None, :, None] / spacing_mm)
    inside = ndimage.map_coordinates(brain.astype(np.float32), along.transpose(2, 0, 1), order=0) > 0.5
    edge_mm = radii[inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)]
    offsets = skull_ray_offsets_mm()
    points = centre + directions[:, None, :] * ((edge_mm[:, None] + offsets[None, :])[..., None] / spacing_mm)
    caps = directions @ directions.T >= np.cos(np.radians(SKULL_CAP_DEG))
    for array in (points, directions, caps):
        array.setflags(write=False)
    return SkullRays(points=points, directions=directions, caps=caps)


def intensity_table(modality: str) -> dict[str, float]:
    if modality == "CT":
        return CT_HU
    if modality == "MR":
        return MR_T1
    raise ConfigError(f"modality: expected 'CT' or 'MR', got {modality!r}")


def _as_base_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    image.CopyInformation(tissue_maps().reference)
    return image


def resample_to_spacing(image: sitk.Image, spacing_mm: float, default: float) -> sitk.Image:
    """Block-average (integer factors) or resample an image to isotropic spacing."""
    spacing = np.array(image.GetSpacing())
    factors = spacing_mm / spacing
    if np.allclose(factors, np.round(factors)) and np.all(factors >= 1):
        return sitk.BinShrink(image, [int(round(f)) for f in factors])
    size = [int(np.ceil(n * s / spacing_mm)) for n, s in zip(image.GetSize(), spacing)]
    sigma = [max(0.0, (spacing_mm - s) / 2.0) for s in spacing]
    smoothed = sitk.SmoothingRecursiveGaussian(image, sigma) if max(sigma) > 0 else image
    return sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         (spacing_mm,) * 3, image.GetDirection(), default, sitk.sitkFloat32)
