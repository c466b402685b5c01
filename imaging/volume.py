"""A DICOM series as one 3D volume with its geometry, and the loader that builds it."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from headscreen.errors import InputRejected


def slice_normal(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit normal of a slice plane (row direction x column direction) from the six values
    of ImageOrientationPatient; the zero vector when the two directions are parallel or
    zero, so a degenerate header never looks like a real orientation. Raises ValueError or
    TypeError for values that are not numbers."""
    values = np.asarray([float(v) for v in orientation], dtype=float)
    if values.shape != (6,):
        raise ValueError(f"ImageOrientationPatient: expected 6 values, got {values.size}")
    normal = np.cross(values[:3], values[3:])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 1e-9 and np.isfinite(length) else np.zeros(3)


logger = logging.getLogger(__name__)

# Tolerances for slice geometry (fractions of the median slice spacing unless noted).
SPACING_TOLERANCE = 0.10
MISSING_SLICE_RATIO = 1.5
ORIENTATION_TOLERANCE = 1e-3
TILT_TOLERANCE_DEG = 0.5


class SeriesRejected(InputRejected):
    """The series cannot be made into one volume (mixed sizes, orientations, no pixels...)."""


@dataclass
class Volume:
    """A series on its native slice grid (LPS; axis 2 of `image` is the slice axis).

    `image` is float32, or int16 when every value is a whole number that fits (see
    `load_series`): read its voxels as numbers, not as a given pixel type.

    `slice_positions` holds each slice's ImagePositionPatient when it is known; it lets
    results go back onto slices whose grid is not regular (gaps, gantry tilt).
    """

    image: sitk.Image
    series_uid: str
    slice_sop_uids: list[str]
    modality: str
    qc_reasons: list[str] = field(default_factory=list)
    qc_metrics: dict[str, float] = field(default_factory=dict)
    slice_positions: np.ndarray | None = None
    frame_numbers: list[int] | None = None  # 1-based frame per slice for multi-frame objects
    # Set by `release_pixels`: the grid's size once `image` holds its geometry only.
    released_size: tuple[int, int, int] | None = None

    @classmethod
    def from_image(cls, image: sitk.Image, modality: str, series_uid: str = "synthetic",
                   slice_sop_uids: list[str] | None = None) -> Volume:
        """Wrap an in-memory image (phantoms, training) as a Volume."""
        if image.GetDimension() != 3:
            raise ValueError(f"image: expected 3D, got {image.GetDimension()}D")
        n_slices = image.GetSize()[2]
        if slice_sop_uids is None:
            slice_sop_uids = [f"{series_uid}.{k + 1}" for k in range(n_slices)]
        if len(slice_sop_uids) != n_slices:
            raise ValueError(f"slice_sop_uids: expected {n_slices} entries, got {len(slice_sop_uids)}")
        return cls(image=sitk.Cast(image, sitk.sitkFloat32), series_uid=series_uid,
                   slice_sop_uids=list(slice_sop_uids), modality=modality)

    @property
    def size(self) -> tuple[int, int, int]:
        """(columns, rows, slices) of the native grid (also after `release_pixels`)."""
        if self.released_size is not None:
            return self.released_size
        cols, rows, slices = self.image.GetSize()
        return (cols, rows, slices)

    @property
    def pixels_released(self) -> bool:
        return self.released_size is not None

    def release_pixels(self) -> None:
        """Drop the voxels and keep the geometry: once preprocessed, a job needs the native
        grid only to take maps back onto it, and a thin-slice CT's voxels are 300 MB.
        `image` is then a one-voxel image with the grid's origin, spacing and direction."""
        if self.released_size is not None:
            return
        size = self.size
        stub = sitk.Image([1, 1, 1], sitk.sitkFloat32)
        stub.SetOrigin(self.image.GetOrigin())
        stub.SetSpacing(self.image.GetSpacing())
        stub.SetDirection(self.image.GetDirection())
        self.image, self.released_size = stub, size

    @property
    def is_regular(self) -> bool:
        """True when every slice lies exactly on the image grid (no gaps, no tilt)."""
        if self.slice_positions is None:
            return True
        grid = np.array([self.image.TransformIndexToPhysicalPoint((0, 0, k))
                         for k in range(self.size[2])])
        return bool(np.allclose(grid, self.slice_positions, atol=1e-2))


@dataclass(frozen=True)
class _Frame:
    """One 2D image of a series with its geometry (a slice or a frame of a multi-frame object)."""

    sop_uid: str
    frame_number: int | None
    position: np.ndarray
    row_dir: np.ndarray   # direction of increasing column index (IOP[0:3])
    col_dir: np.ndarray   # direction of increasing row index (IOP[3:6])
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    shape: tuple[int, int]
    slope: float
    intercept: float
    assumed: bool = False  # geometry was missing and has been assumed


# Values larger than this (pixel data) are read from the file only when decoded, into the
# volume, and released at once: each file is read once, one slice's pixels held at a time.
DEFER_SIZE = 16 * 1024
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_header(path: Path | str) -> pydicom.Dataset:
    """A stored instance parsed once: the header now, the pixel data when it is decoded."""
    return pydicom.dcmread(path, defer_size=DEFER_SIZE)


def release_pixels(ds: pydicom.Dataset) -> None:
    """Drop a dataset's pixel data (and pydicom's decoded copy), leaving the header."""
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)


def load_series(sources: Sequence[Path | str | pydicom.Dataset]) -> Volume:
    """Read one DICOM series (single-frame slices or one enhanced multi-frame object).

    `sources` are file paths, or datasets read already (`read_header`): their pixel data
    is decoded into the volume and then released from them, so the series is read once.
    """
    if not sources:
        raise SeriesRejected("empty_series: no files given")
    datasets = [s if isinstance(s, pydicom.Dataset) else _read(Path(s)) for s in sources]
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise SeriesRejected(f"mixed_series: {len(series_uids)} SeriesInstanceUIDs among the files")
    if all(_is_single_frame(ds) for ds in datasets):
        frames = [_single_frame(ds) for ds in datasets]
        _check_consistent(frames)
        order, geometry = _slice_order(frames)
        frames = [frames[i] for i in order]
        image, stack = _decoded_image(frames, [datasets[i] for i in order])
    else:
        image = None
        frames, pixels = _frames_and_pixels(datasets)
        for ds in datasets:
            release_pixels(ds)
        _check_consistent(frames)
        order, geometry = _slice_order(frames)
        frames = [frames[i] for i in order]
        stack = _rescaled_stack(frames, [pixels[i] for i in order])
        del pixels
    first = datasets[0]
    volume = _build_volume(frames, stack, geometry, first, image)
    if any(frame.assumed for frame in frames):
        volume.qc_reasons.insert(0, "geometry_assumed: multi-frame object without plane position/orientation")
    logger.info("series loaded", extra={"action": "series_loaded", "series_uid": volume.series_uid,
                                        "slices": len(frames), "qc_reasons": volume.qc_reasons})
    return volume


def _read(path: Path) -> pydicom.Dataset:
    try:
        return read_header(path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise SeriesRejected(f"unreadable_file: {path.name}: {exc}") from exc


def _pixel_array(ds: pydicom.Dataset) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise SeriesRejected(f"no_pixel_data: SOP {ds.get('SOPInstanceUID', '?')}")
    try:
        native = native_pixels(ds)
        return native if native is not None else ds.pixel_array
    except Exception as exc:  # pydicom raises many types from its decoders
        raise SeriesRejected(f"pixel_decode_failed: {ds.file_meta.get('TransferSyntaxUID', '?')}: {exc}") from exc


_LITTLE_ENDIAN_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """The pixels of the commonest stored slice (uncompressed little endian, one frame of
    16-bit grey values) read straight from its bytes, as `ds.pixel_array` gives them
    (bits above BitsStored masked, or sign-extended) at a fraction of pydicom's cost per
    slice; None for anything else, which pydicom decodes."""
    meta = getattr(ds, "file_meta", None)
    try:
        if (meta is None or str(meta.get("TransferSyntaxUID", "")) not in _LITTLE_ENDIAN_NATIVE
                or "PixelData" not in ds or int(ds.get("NumberOfFrames") or 1) != 1
                or ds.get("SamplesPerPixel") != 1 or ds.get("BitsAllocated") != 16
                or ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2")):
            return None
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits, signed = int(ds.BitsStored), ds.get("PixelRepresentation")
    except Exception:  # a header value that does not read: pydicom's to judge
        return None
    if not 1 <= bits <= 16 or signed not in (0, 1) or ds.get("HighBit") != bits - 1:
        return None
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) != rows * cols * 2:
        return None
    stored = np.frombuffer(data, dtype="<u2").reshape(rows, cols)
    if bits < 16:
        stored = stored & np.uint16((1 << bits) - 1)
        if signed:
            sign = np.int32(1 << (bits - 1))
            return ((stored.astype(np.int32) ^ sign) - sign).astype(np.int16)
    return stored.view("<i2") if signed else stored


def _frames_and_pixels(datasets: list[pydicom.Dataset]) -> tuple[list[_Frame], list[np.ndarray]]:
    frames: list[_Frame] = []
    pixels: list[np.ndarray] = []
    for ds in datasets:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if "PerFrameFunctionalGroupsSequence" in ds:
            array = _pixel_array(ds)
            array = array.reshape((n_frames,) + array.shape[-2:])
            for index in range(n_frames):
                frames.append(_enhanced_frame(ds, index))
                pixels.append(array[index])
        elif n_frames > 1:
            array = _pixel_array(ds).reshape((n_frames,) + (int(ds.Rows), int(ds.Columns)))
            frames.extend(_assumed_frames(ds, n_frames))
            pixels.extend(array)
        else:
            frames.append(_single_frame(ds))
            pixels.append(_pixel_array(ds))
    for array in pixels:
        if array.ndim != 2:
            raise SeriesRejected(f"not_grayscale: pixel array of shape {array.shape}")
    return frames, pixels


def _is_single_frame(ds: pydicom.Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" not in ds and int(ds.get("NumberOfFrames", 1) or 1) <= 1


def _writable_array(image: sitk.Image) -> np.ndarray:
    """A writable numpy view of an image's buffer (SimpleITK offers a read-only one);
    valid while `image` lives."""
    view = sitk.GetArrayViewFromImage(image)  # makes the buffer the image's own
    address = view.__array_interface__["data"][0]
    buffer = (ctypes.c_byte * view.nbytes).from_address(address)
    return np.frombuffer(memoryview(buffer), dtype=view.dtype).reshape(view.shape)


_INT16 = np.iinfo(np.int16)


def _decoded_image(frames: list[_Frame], datasets: list[pydicom.Dataset]) -> tuple[sitk.Image, np.ndarray]:
    """Single-frame slices, in order, decoded one at a time straight into an image's own
    buffer (no second full-size copy), rescaled as `_rescaled_stack` does; each slice's
    pixel data is released once copied. The image is int16 while every rescaled value is
    a whole number that fits (a CT's HU, most MR), which halves a thin-slice CT's 300 MB
    of float32; it turns float32 at the first slice that does not fit."""
    rows, cols = frames[0].shape
    whole = all(frame.slope == 1.0 and float(frame.intercept).is_integer() for frame in frames)
    image = sitk.Image([cols, rows, len(frames)], sitk.sitkInt16 if whole else sitk.sitkFloat32)
    stack = _writable_array(image)
    for k, (frame, ds) in enumerate(zip(frames, datasets)):
        try:
            array = _pixel_array(ds)
        finally:
            release_pixels(ds)
        if array.ndim != 2:
            raise SeriesRejected(f"not_grayscale: pixel array of shape {array.shape}")
        if array.shape != (rows, cols):
            raise SeriesRejected(f"mixed_sizes: {(rows, cols)} and {array.shape} in one series")
        if stack.dtype == np.int16:
            intercept = int(frame.intercept)
            if array.dtype.kind in "iu" and (int(array.min()) + intercept >= _INT16.min
                                             and int(array.max()) + intercept <= _INT16.max):
                np.add(array, np.int32(intercept), out=stack[k], dtype=np.int32, casting="unsafe")
                continue
            image, stack = _as_float32(image, stack, k)
        stack[k] = array  # one cast, no temporaries
        if frame.slope != 1.0:
            stack[k] *= np.float32(frame.slope)
        if frame.intercept != 0.0:
            stack[k] += np.float32(frame.intercept)
    return image, stack


def _as_float32(image: sitk.Image, stack: np.ndarray, done: int) -> tuple[sitk.Image, np.ndarray]:
    """The int16 image so far as float32 (its first `done` slices copied), for the rest."""
    wider = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    wide_stack = _writable_array(wider)
    wide_stack[:done] = stack[:done]
    return wider, wide_stack


def _rescaled_stack(frames: list[_Frame], pixels: list[np.ndarray]) -> np.ndarray:
    """Stored values -> float32 (HU for CT) in one preallocated (slices, rows, cols) array."""
    stack = np.empty((len(pixels),) + pixels[0].shape, dtype=np.float32)
    for k, (frame, array) in enumerate(zip(frames, pixels)):
        stack[k] = array  # one cast, no temporaries
        if frame.slope != 1.0:
            stack[k] *= np.float32(frame.slope)
        if frame.intercept != 0.0:
            stack[k] += np.float32(frame.intercept)
    return stack


def _required(ds: pydicom.Dataset, keyword: str):
    value = ds.get(keyword)
    if value is None or value == "":
        raise SeriesRejected(f"missing_geometry: {keyword} absent in SOP {ds.get('SOPInstanceUID', '?')}")
    return value


def _single_frame(ds: pydicom.Dataset) -> _Frame:
    orientation = np.asarray([float(v) for v in _required(ds, "ImageOrientationPatient")])
    spacing = [float(v) for v in _required(ds, "PixelSpacing")]
    return _Frame(sop_uid=str(ds.SOPInstanceUID), frame_number=None,
                  position=np.asarray([float(v) for v in _required(ds, "ImagePositionPatient")]),
                  row_dir=orientation[:3], col_dir=orientation[3:], pixel_spacing=(spacing[0], spacing[1]),
                  shape=(int(ds.Rows), int(ds.Columns)),
                  slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
                  intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0))


def _group(ds: pydicom.Dataset, index: int, sequence: str) -> pydicom.Dataset | None:
    """A functional-group item: per-frame first, then shared."""
    for groups in (ds.PerFrameFunctionalGroupsSequence[index],
                   ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        items = groups.get(sequence) if groups is not None else None
        if items:
            return items[0]
    return None


def _enhanced_frame(ds: pydicom.Dataset, index: int) -> _Frame:
    position = _group(ds, index, "PlanePositionSequence")
    orientation = _group(ds, index, "PlaneOrientationSequence")
    measures = _group(ds, index, "PixelMeasuresSequence")
    if position is None or orientation is None or measures is None:
        raise SeriesRejected(f"missing_geometry: frame {index + 1} lacks plane position/orientation/pixel measures")
    transform = _group(ds, index, "PixelValueTransformationSequence")
    iop = np.asarray([float(v) for v in orientation.ImageOrientationPatient])
    spacing = [float(v) for v in measures.PixelSpacing]
    return _Frame(sop_uid=str(ds.SOPInstanceUID), frame_number=index + 1,
                  position=np.asarray([float(v) for v in position.ImagePositionPatient]),
                  row_dir=iop[:3], col_dir=iop[3:], pixel_spacing=(spacing[0], spacing[1]),
                  shape=(int(ds.Rows), int(ds.Columns)),
                  slope=float(transform.get("RescaleSlope", 1.0)) if transform is not None else 1.0,
                  intercept=float(transform.get("RescaleIntercept", 0.0)) if transform is not None else 0.0)


def _assumed_frames(ds: pydicom.Dataset, n_frames: int) -> list[_Frame]:
    """Frames of a multi-frame object that carries no plane geometry at all.

    Only legal for a malformed object; we assume axial frames, the stated pixel
    spacing (or 1 mm) and SpacingBetweenSlices (or SliceThickness, or 1 mm), and
    the volume carries the QC reason "geometry_assumed" so no result goes out unflagged.
    """
    spacing = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
    step = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0)
    return [_Frame(sop_uid=str(ds.SOPInstanceUID), frame_number=index + 1,
                   position=np.array([0.0, 0.0, index * step]), row_dir=np.array([1.0, 0.0, 0.0]),
                   col_dir=np.array([0.0, 1.0, 0.0]), pixel_spacing=(spacing[0], spacing[1]),
                   shape=(int(ds.Rows), int(ds.Columns)),
                   slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
                   intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0), assumed=True)
            for index in range(n_frames)]


def _check_consistent(frames: list[_Frame]) -> None:
    """Every frame as the first in size, orientation and pixel spacing; the first frame
    that differs is reported, by the first of those it fails. All frames compared at once
    (np.isclose as np.allclose tests each pair): 300 allclose calls were ~30 ms a CT."""
    first = frames[0]
    same_shape = np.array([frame.shape == first.shape for frame in frames])
    same_orientation = np.logical_and(
        np.isclose([frame.row_dir for frame in frames], first.row_dir, atol=ORIENTATION_TOLERANCE).all(axis=1),
        np.isclose([frame.col_dir for frame in frames], first.col_dir, atol=ORIENTATION_TOLERANCE).all(axis=1))
    same_spacing = np.isclose([frame.pixel_spacing for frame in frames], first.pixel_spacing, rtol=1e-3).all(axis=1)
    differing = np.flatnonzero(~(same_shape & same_orientation & same_spacing))
    if not len(differing):
        return
    k = int(differing[0])
    if not same_shape[k]:
        raise SeriesRejected(f"mixed_sizes: {first.shape} and {frames[k].shape} in one series")
    if not same_orientation[k]:
        raise SeriesRejected("mixed_orientations: slices with different ImageOrientationPatient")
    raise SeriesRejected(f"mixed_pixel_spacing: {first.pixel_spacing} and {frames[k].pixel_spacing}")


@dataclass(frozen=True)
class _Geometry:
    normal: np.ndarray
    distances: np.ndarray  # sorted positions along the normal
    spacing: float         # median spacing between slices
    qc_reasons: list[str]
    qc_metrics: dict[str, float]
    tilt_deg: float


def _slice_order(frames: list[_Frame]) -> tuple[np.ndarray, _Geometry]:
    """Sort slices along the normal (not by InstanceNumber) and measure the spacing."""
    normal = slice_normal(np.concatenate([frames[0].row_dir, frames[0].col_dir]))
    distances = np.array([frame.position @ normal for frame in frames])
    order = np.argsort(distances, kind="stable")
    distances = distances[order]
    reasons: list[str] = []
    metrics: dict[str, float] = {"n_slices": float(len(frames))}
    if len(frames) == 1:
        return order, _Geometry(normal, distances, 0.0, ["single_slice: the series has one image"], metrics, 0.0)
    steps = np.diff(distances)
    if np.any(steps < 1e-3):
        raise SeriesRejected(f"duplicate_slice_positions: {int(np.sum(steps < 1e-3))} slices share a position")
    spacing = float(np.median(steps))
    metrics["slice_spacing_mm"] = spacing
    metrics["slice_spacing_cv"] = float(np.std(steps) / np.mean(steps))
    gaps = steps > MISSING_SLICE_RATIO * spacing
    missing = int(np.sum(np.rint(steps[gaps] / spacing) - 1))
    metrics["missing_slices"] = float(missing)
    if missing:
        reasons.append(f"missing_slices: {missing} slice(s) missing in {int(gaps.sum())} gap(s) "
                       f"(spacing {spacing:.3g} mm)")
    uneven = ~gaps & (np.abs(steps - spacing) > SPACING_TOLERANCE * spacing)
    if uneven.any():
        reasons.append(f"uneven_slice_spacing: {int(uneven.sum())} step(s) deviate more than "
                       f"{SPACING_TOLERANCE:.0%} from {spacing:.3g} mm")
    stack = frames[order[-1]].position - frames[order[0]].position
    tilt = float(np.degrees(np.arccos(np.clip(abs(stack @ normal) / np.linalg.norm(stack), -1.0, 1.0))))
    metrics["gantry_tilt_deg"] = tilt
    if tilt > TILT_TOLERANCE_DEG:
        reasons.append(f"gantry_tilt: {tilt:.1f} deg (resampled to an orthogonal grid)")
    return order, _Geometry(normal, distances, spacing, reasons, metrics, tilt)


def _build_volume(frames: list[_Frame], stack: np.ndarray, geometry: _Geometry, first: pydicom.Dataset,
                  image: sitk.Image | None = None) -> Volume:
    """`image`, when given, is the image whose buffer `stack` is."""
    row_spacing, col_spacing = frames[0].pixel_spacing
    positions = np.array([frame.position for frame in frames])
    if geometry.tilt_deg > TILT_TOLERANCE_DEG:
        stack = _deshear(stack.astype(np.float32, copy=False), positions, frames[0], geometry)
        image = None
    z_spacing = geometry.spacing or float(first.get("SliceThickness", 1.0) or 1.0)
    if image is None:
        image = sitk.GetImageFromArray(stack)
    image.SetSpacing((col_spacing, row_spacing, z_spacing))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    direction = np.column_stack([frames[0].row_dir, frames[0].col_dir, geometry.normal])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    frame_numbers = [f.frame_number for f in frames]
    return Volume(image=image, series_uid=str(first.SeriesInstanceUID),
                  slice_sop_uids=[frame.sop_uid for frame in frames], modality=str(first.get("Modality", "")),
                  qc_reasons=list(geometry.qc_reasons), qc_metrics=dict(geometry.qc_metrics),
                  slice_positions=positions,
                  frame_numbers=None if frame_numbers[0] is None else [int(n or 0) for n in frame_numbers])


def _deshear(stack: np.ndarray, positions: np.ndarray, frame: _Frame, geometry: _Geometry) -> np.ndarray:
    """Shift each tilted slice in-plane so all slices sit on one orthogonal grid."""
    from scipy import ndimage  # only needed for tilted series

    row_spacing, col_spacing = frame.pixel_spacing
    out = np.empty_like(stack)
    background = float(stack.min())
    for k in range(stack.shape[0]):
        offset = positions[k] - positions[0] - (geometry.distances[k] - geometry.distances[0]) * geometry.normal
        shift_rows = float(offset @ frame.col_dir) / row_spacing
        shift_cols = float(offset @ frame.row_dir) / col_spacing
        out[k] = ndimage.shift(stack[k], (shift_rows, shift_cols), order=1, mode="constant", cval=background)
    return out
