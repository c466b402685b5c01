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
    # A series decoded straight to a working spacing (`load_series`' shrink_to_mm): that
    # spacing and the block-averaged float32 image, `shrink` of the whole image to the
    # bit; `image` then holds the geometry only (as after `release_pixels`) ...
    shrunk: tuple[float, sitk.Image] | None = None
    # ... and these native slices are kept: `middle_slices()`, which the noise QC samples.
    kept_middle: np.ndarray | None = None

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

    def shrunk_to(self, spacing_mm: float) -> sitk.Image | None:
        """The image block-averaged to `spacing_mm` when the series was decoded that way."""
        if self.shrunk is not None and self.shrunk[0] == spacing_mm:
            return self.shrunk[1]
        return None

    def middle_slices(self) -> np.ndarray:
        """The (up to) five native slices about the middle of the series, as stored in `image`."""
        if self.kept_middle is not None:
            return self.kept_middle
        low, high = middle_range(self.size[2])
        return sitk.GetArrayViewFromImage(self.image)[low:high]

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


def load_series(sources: Sequence[Path | str | pydicom.Dataset], shrink_to_mm: float | None = None) -> Volume:
    """Read one DICOM series (single-frame slices or one enhanced multi-frame object).

    `sources` are file paths, or datasets read already (`read_header`): their pixel data
    is decoded into the volume and then released from them, so the series is read once.
    `shrink_to_mm`: when only a block average to this spacing will be read (a job's one
    preprocessing), a regular series of whole numbers is decoded a slab at a time straight
    into it (`Volume.shrunk`), without the native image (a thin-slice CT's 157 MB of int16,
    whose fresh pages alone took ~0.13 s a job); any other series is decoded whole.
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
        if shrink_to_mm is not None and _streamable(frames, geometry, datasets[0], shrink_to_mm):
            volume = _build_volume(frames, None, geometry, datasets[0])
            volume.shrunk, volume.kept_middle = _decoded_shrunk(frames, [datasets[i] for i in order],
                                                                volume.image, shrink_to_mm)
            return _loaded(volume, frames)
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
    return _loaded(_build_volume(frames, stack, geometry, datasets[0], image), frames)


def _loaded(volume: Volume, frames: list[_Frame]) -> Volume:
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
        array = _decoded_slice(ds, rows, cols)
        if stack.dtype == np.int16:
            if _fits_int16(array, frame):
                np.add(array, np.int32(int(frame.intercept)), out=stack[k], dtype=np.int32, casting="unsafe")
                continue
            image, stack = _as_float32(image, stack, k)
        _rescale_into(stack[k], array, frame)
    return image, stack


def _decoded_slice(ds: pydicom.Dataset, rows: int, cols: int) -> np.ndarray:
    """A slice's stored values; its pixel data is released from `ds` once decoded."""
    try:
        array = _pixel_array(ds)
    finally:
        release_pixels(ds)
    if array.ndim != 2:
        raise SeriesRejected(f"not_grayscale: pixel array of shape {array.shape}")
    if array.shape != (rows, cols):
        raise SeriesRejected(f"mixed_sizes: {(rows, cols)} and {array.shape} in one series")
    return array


def _fits_int16(array: np.ndarray, frame: _Frame) -> bool:
    """Whether a whole-number slice's rescaled values all fit int16."""
    intercept = int(frame.intercept)
    return array.dtype.kind in "iu" and (int(array.min()) + intercept >= _INT16.min
                                         and int(array.max()) + intercept <= _INT16.max)


def _rescale_into(out: np.ndarray, array: np.ndarray, frame: _Frame) -> None:
    """Stored values -> rescaled float32 values (slope, then intercept, each in float32)."""
    out[...] = array  # one cast, no temporaries
    if frame.slope != 1.0:
        out *= np.float32(frame.slope)
    if frame.intercept != 0.0:
        out += np.float32(frame.intercept)


def shrink_factors(spacing: Sequence[float], spacing_mm: float) -> list[int]:
    """Whole-voxel block sizes (x, y, z) that bring a grid's spacing closest to `spacing_mm`."""
    return [max(1, int(round(spacing_mm / s))) for s in spacing]


def middle_range(n_slices: int) -> tuple[int, int]:
    """The (up to) five slices about the middle of a series: [low, high)."""
    middle = n_slices // 2
    return max(0, middle - 2), min(n_slices, middle + 3)


def evenly_spaced(grid: sitk.Image, positions: np.ndarray | None) -> bool:
    """Whether every slice position lies on `grid`'s slice axis at its spacing (within 5 %):
    no gap to fill in before the image is resampled."""
    if positions is None or len(positions) < 2:
        return True
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    distances = (positions - np.asarray(grid.GetOrigin())) @ direction[:, 2]
    step = float(grid.GetSpacing()[2])
    return bool(np.allclose(distances, np.arange(len(distances)) * step, atol=0.05 * step))


class BlockShrinker:
    """`sitk.BinShrink` of a (columns, rows, slices) image on `grid`'s geometry to float32,
    fed a slab of whole blocks at a time: the same voxels as shrinking the whole image cast
    to float32 (a block is averaged from its own slices only), with no full-size float32
    copy. The slices past the last whole block are left out, as BinShrink leaves them."""

    def __init__(self, grid: sitk.Image, size: Sequence[int], factors: list[int]) -> None:
        self.grid, self.factors = grid, factors
        self.depth = factors[2]
        self.used_slices = (int(size[2]) // self.depth) * self.depth
        self.slab_slices = max(1, SHRINK_SLAB_VOXELS // (int(size[0]) * int(size[1]) * self.depth)) * self.depth
        self._parts: list[sitk.Image] = []

    def add(self, first_slice: int, voxels: np.ndarray) -> None:
        """The next slab: slices [first_slice, first_slice + len(voxels)), whole blocks."""
        # Copied in its own type and cast by ITK: one float32 copy fewer than numpy's astype.
        self.add_image(first_slice, sitk.GetImageFromArray(voxels))

    def add_image(self, first_slice: int, slab: sitk.Image) -> None:
        """`add` of a slab already in an image (placed here; its buffer may be reused after)."""
        slab.SetOrigin(self.grid.TransformIndexToPhysicalPoint((0, 0, int(first_slice))))
        slab.SetSpacing(self.grid.GetSpacing())
        slab.SetDirection(self.grid.GetDirection())
        if slab.GetPixelID() != sitk.sitkFloat32:
            slab = sitk.Cast(slab, sitk.sitkFloat32)
        self._parts.append(sitk.BinShrink(slab, self.factors))

    def image(self) -> sitk.Image:
        first = self._parts[0]
        out = np.empty((self.used_slices // self.depth,) + sitk.GetArrayViewFromImage(first).shape[1:],
                       dtype=np.float32)
        done = 0
        for part in self._parts:
            view = sitk.GetArrayViewFromImage(part)
            out[done:done + len(view)] = view
            done += len(view)
        self._parts = []
        shrunk = sitk.GetImageFromArray(out)
        shrunk.SetOrigin(first.GetOrigin())
        shrunk.SetSpacing(first.GetSpacing())
        shrunk.SetDirection(first.GetDirection())
        return shrunk


SHRINK_SLAB_VOXELS = 4_000_000


def _streamable(frames: list[_Frame], geometry: _Geometry, first: pydicom.Dataset, spacing_mm: float) -> bool:
    """Whether `load_series` can decode the series straight into its block average: whole
    numbers (the int16 image it replaces), no tilt or gap to resample, a block at least."""
    if not all(frame.slope == 1.0 and float(frame.intercept).is_integer() for frame in frames):
        return False
    if geometry.tilt_deg > TILT_TOLERANCE_DEG:
        return False
    grid = _grid(frames, geometry, first)
    factors = shrink_factors(grid.GetSpacing(), spacing_mm)
    return (factors != [1, 1, 1] and len(frames) >= factors[2]
            and evenly_spaced(grid, np.array([frame.position for frame in frames])))


def _decoded_shrunk(frames: list[_Frame], datasets: list[pydicom.Dataset], grid: sitk.Image,
                    spacing_mm: float) -> tuple[tuple[float, sitk.Image], np.ndarray]:
    """((spacing_mm, the series block-averaged to it), its middle slices), decoding one
    slab at a time: the values `_decoded_image` gives, and `shrink` of its image, to the bit.
    The middle slices are int16 as that image would be, unless a slice did not fit."""
    rows, cols = frames[0].shape
    shrinker = BlockShrinker(grid, (cols, rows, len(frames)), shrink_factors(grid.GetSpacing(), spacing_mm))
    # One slab image, decoded into again and again: no fresh pages or copy per slab.
    slab_image = sitk.Image([cols, rows, shrinker.slab_slices], sitk.sitkFloat32)
    slab = _writable_array(slab_image)
    spare = np.empty((rows, cols), dtype=np.float32)  # a slice past the last whole block
    low, high = middle_range(len(frames))
    middle = np.empty((high - low, rows, cols), dtype=np.float32)
    all_fit = True
    for k, (frame, ds) in enumerate(zip(frames, datasets)):
        array = _decoded_slice(ds, rows, cols)
        start = k - k % shrinker.slab_slices
        row = slab[k - start] if k < shrinker.used_slices else spare
        if _fits_int16(array, frame):
            np.add(array, np.int32(int(frame.intercept)), out=row, dtype=np.int32, casting="unsafe")
        else:
            all_fit = False
            _rescale_into(row, array, frame)
        if low <= k < high:
            middle[k - low] = row
        if k < shrinker.used_slices and k + 1 - start == shrinker.slab_slices:
            shrinker.add_image(start, slab_image)
        elif k + 1 == shrinker.used_slices:  # the last slab, shorter
            shrinker.add(start, slab[:k + 1 - start])
    return (spacing_mm, shrinker.image()), (middle.astype(np.int16) if all_fit else middle)


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
        _rescale_into(stack[k], array, frame)
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


def _grid(frames: list[_Frame], geometry: _Geometry, first: pydicom.Dataset) -> sitk.Image:
    """A one-voxel image with the volume's origin, spacing and direction (its grid)."""
    grid = sitk.Image([1, 1, 1], sitk.sitkFloat32)
    _place(grid, frames, geometry, first)
    return grid


def _place(image: sitk.Image, frames: list[_Frame], geometry: _Geometry, first: pydicom.Dataset) -> None:
    row_spacing, col_spacing = frames[0].pixel_spacing
    z_spacing = geometry.spacing or float(first.get("SliceThickness", 1.0) or 1.0)
    image.SetSpacing((col_spacing, row_spacing, z_spacing))
    image.SetOrigin(tuple(float(v) for v in frames[0].position))
    direction = np.column_stack([frames[0].row_dir, frames[0].col_dir, geometry.normal])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))


def _build_volume(frames: list[_Frame], stack: np.ndarray | None, geometry: _Geometry, first: pydicom.Dataset,
                  image: sitk.Image | None = None) -> Volume:
    """`image`, when given, is the image whose buffer `stack` is; with no `stack`, the
    volume holds its grid only (`image` one voxel, as after `Volume.release_pixels`)."""
    positions = np.array([frame.position for frame in frames])
    released_size = None
    if stack is None:
        image = sitk.Image([1, 1, 1], sitk.sitkFloat32)
        released_size = (frames[0].shape[1], frames[0].shape[0], len(frames))
    else:
        if geometry.tilt_deg > TILT_TOLERANCE_DEG:
            stack = _deshear(stack.astype(np.float32, copy=False), positions, frames[0], geometry)
            image = None
        if image is None:
            image = sitk.GetImageFromArray(stack)
    _place(image, frames, geometry, first)
    frame_numbers = [f.frame_number for f in frames]
    return Volume(image=image, series_uid=str(first.SeriesInstanceUID), released_size=released_size,
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
