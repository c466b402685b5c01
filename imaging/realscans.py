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

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from daemon.errors import ConfigError
from imaging.phantoms import Phantom, Pose
from imaging.templates import nifti_to_sitk

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


def load_real_t1() -> RealHead:
    """The real T1 with its reference brain mask (install Debian's insighttoolkit5-examples)."""
    if not real_t1_available():
        raise ConfigError(f"REAL_T1: {REAL_T1} missing (install Debian package insighttoolkit5-examples)")
    image = nifti_to_sitk(nib.load(str(REAL_T1))) * T1_SCALE
    brain = nifti_to_sitk(nib.load(str(REAL_T1_BRAIN)), dtype=np.uint8) > 0
    labels = nifti_to_sitk(nib.load(str(REAL_T1_LABELS)), dtype=np.uint8)
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
