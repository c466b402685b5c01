"""Secondary Capture overlays: the voxel error map in colour on the original slices.

Each output image is the source slice in a soft-tissue window (grey), the anomaly
map alpha-blended on top (transparent below the lower display bound, then
yellow -> red up to the upper bound) and a legend band underneath with the
scores, the colour scale and its unit, and the "AI-generated - not for primary
diagnosis" notice. The map is in multiples of the healthy limit (headscreen.inference):
with a normative model the positive z-map over the z that 99.9 % of healthy brain
voxels stay below, otherwise the voxel error over the healthy 99th percentile of
error (``map_unit`` "z" or "error"). No patient identity is burned in.

A study that is not eligible gets no overlay; `build_not_screened_image` makes
its one plain greyscale image instead ("NOT SCREENED: <reason>"), so a reader
who opens the study in the viewer sees that it was not screened and why.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import highdicom as hd
import highdicom.base_content as _hd_base_content
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from headscreen.export import codes
from headscreen.export.model import ResultSummary, finite_or_none, reference_header
from headscreen.export.sr import ReferenceNote
from headscreen.imaging.native_map import NativeMap, as_native_map, choose_from_sums
from headscreen.imaging.volume import native_pixels

__all__ = [
    "OverlayStyle",
    "build_overlay_series",
    "choose_slices",
    "render_overlay",
    "build_not_screened_image",
    "not_screened_headline",
    "SERIES_DESCRIPTION",
    "NOT_SCREENED_SERIES_DESCRIPTION",
    "NOT_SCREENED_NOTICE",
    "DISCLAIMER",
    "MAP_UNITS",
    "ordinal",
    "percentile_phrase",
]

logger = logging.getLogger(__name__)

# highdicom's SCImage.from_ref_dataset asks, for every image, whether the reference's SOP
# class has pixel data by walking the IOD tables: 1-8 ms a call, 24 calls per CT result.
# The answer depends on the UID alone, so it is memoised where highdicom looks it up.
if not hasattr(_hd_base_content.does_iod_have_pixel_data, "cache_info"):
    _hd_base_content.does_iod_have_pixel_data = functools.lru_cache(maxsize=64)(
        _hd_base_content.does_iod_have_pixel_data)

SERIES_DESCRIPTION = "AI anomaly map - NOT FOR PRIMARY DIAGNOSIS"
DISCLAIMER = "AI-generated - not for primary diagnosis"
NOT_SCREENED_SERIES_DESCRIPTION = "AI screening NOT DONE - NOT FOR DIAGNOSIS"
NOT_SCREENED_NOTICE = "Not for diagnosis"

#: What the map is and what one unit of it is, per kind of bundle: (short name, legend line).
MAP_UNITS = {
    "z": ("positive z-map", "Unit: positive z-score in multiples of the healthy limit, the z that 99.9% of "
                            "healthy brain voxels stay below"),
    "error": ("voxel error map", "Unit: voxel error in multiples of the healthy limit, the error that 99% of "
                                 "healthy voxels stay below"),
    # A bundle scored on left-right asymmetry (headscreen.scores.one_sided_z): what both sides share fades.
    "z_one_sided": ("one-sided positive z-map", "Unit: positive z-score less its mirror image's, in multiples of the "
                                                "healthy limit; alike on both sides fades"),
}

_YELLOW = np.array([255.0, 255.0, 0.0])
_RED = np.array([255.0, 0.0, 0.0])
_LEGEND_BACKGROUND = (0, 0, 0)
_LEGEND_TEXT = (235, 235, 235)
_LEGEND_ALERT = (255, 170, 60)


@dataclass(frozen=True)
class OverlayStyle:
    """Display parameters of the overlay series (all documented in docs/conformance.md).

    ``error_lower``/``error_upper`` fix the colour scale in error-map units; when
    ``None`` they are taken from this study's map at ``lower_percentile`` /
    ``upper_percentile``, so the colours are relative to the study and the legend
    prints the bounds used.
    """

    ct_window_center: float = 40.0
    ct_window_width: float = 80.0
    mr_percentiles: tuple[float, float] = (1.0, 99.5)
    error_lower: float | None = None
    error_upper: float | None = None
    lower_percentile: float = 99.0
    upper_percentile: float = 99.99
    alpha_range: tuple[float, float] = (0.35, 0.75)
    default_slice_count: int = 24
    min_render_width: int = 384
    copy_plane_geometry: bool = True

    def __post_init__(self) -> None:
        if self.ct_window_width <= 0:
            raise ValueError("OverlayStyle: argument 'ct_window_width' must be positive")
        if self.default_slice_count < 1:
            raise ValueError("OverlayStyle: argument 'default_slice_count' must be >= 1")
        lo, hi = self.alpha_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("OverlayStyle: argument 'alpha_range' must satisfy 0 <= lo <= hi <= 1")


def choose_slices(error_map: NativeMap | np.ndarray, count: int) -> list[int]:
    """``count`` consecutive slice indices centred on the slice whose summed error
    is largest (shifted inwards at the volume's ends)."""
    if count >= error_map.shape[0]:
        return list(range(error_map.shape[0]))
    return choose_from_sums(as_native_map(error_map).slice_sums(), count)


def _modality_values(ds: Dataset) -> np.ndarray:
    """Stored pixels -> modality units (HU for CT) via the rescale attributes."""
    native = native_pixels(ds)
    pixels = (native if native is not None else ds.pixel_array).astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return pixels * slope + intercept


def _display_window(modality: str, slices: list[np.ndarray], style: OverlayStyle) -> tuple[float, float]:
    if modality == "CT":
        half = style.ct_window_width / 2.0
        return style.ct_window_center - half, style.ct_window_center + half
    # MR has no absolute units: window on the intensities of the shown slices,
    # ignoring background so air does not drag the lower bound to zero.
    values = np.concatenate([s.ravel() for s in slices])
    foreground = values[values > 0]
    if foreground.size == 0:
        foreground = values
    lo, hi = np.percentile(foreground, style.mr_percentiles)
    return float(lo), float(max(hi, lo + 1e-6))


_BOUNDS_SAMPLE_VOXELS = 4_000_000


def _error_bounds(error_map: NativeMap, style: OverlayStyle) -> tuple[float, float]:
    if style.error_lower is not None and style.error_upper is not None and style.error_upper > style.error_lower:
        return style.error_lower, style.error_upper  # fixed (the pipeline's): the map is not read
    # Display bounds only: a regular subsample of a large map gives the same
    # percentiles to display precision at a fraction of the sort cost.
    step = max(1, round((math.prod(error_map.shape) / _BOUNDS_SAMPLE_VOXELS) ** (1 / 3)))
    sample = error_map.sample(step)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        raise ValueError("build_overlay_series: argument 'error_map_native' has no finite values")
    lower = style.error_lower if style.error_lower is not None else float(np.percentile(finite, style.lower_percentile))
    upper = style.error_upper if style.error_upper is not None else float(np.percentile(finite, style.upper_percentile))
    if upper <= lower:
        upper = lower + max(abs(lower) * 1e-3, 1e-6)
    return lower, upper


def render_overlay(
    values: np.ndarray,
    error: np.ndarray,
    window: tuple[float, float],
    error_bounds: tuple[float, float],
    style: OverlayStyle,
    inverted: bool = False,
) -> np.ndarray:
    """One slice as RGB uint8 (rows, cols, 3): windowed grey + yellow->red error.
    ``inverted`` renders MONOCHROME1 sources (low values bright) as displayed."""
    lo, hi = window
    grey = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    grey = (1.0 - grey if inverted else grey) * 255.0
    out = np.empty(grey.shape + (3,), dtype=np.uint8)
    out[...] = np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]
    # Only the coloured pixels (a few per cent of a slice) are blended, by flat index and
    # one channel at a time: (1 - alpha) * grey + alpha * (yellow -> red), in float64.
    e_lo, e_hi = error_bounds
    error = np.asarray(error)
    with np.errstate(invalid="ignore"):  # NaN > e_lo is False: never coloured
        shown = np.flatnonzero(error > e_lo)
    if shown.size == 0:
        return out
    level = np.clip((error.ravel()[shown] - e_lo) / (e_hi - e_lo), 0.0, 1.0)
    a_lo, a_hi = style.alpha_range
    alpha = a_lo + level * (a_hi - a_lo)
    kept = ((1.0 - alpha) * grey.ravel()[shown]).astype(np.float64)
    alpha = alpha.astype(np.float64)
    pixels = out.reshape(-1, 3)
    for channel in range(3):
        colour = _YELLOW[channel] + level * (_RED[channel] - _YELLOW[channel])
        pixels[shown, channel] = np.clip(np.rint(kept + alpha * colour), 0, 255).astype(np.uint8)
    return out


def _fmt(value: float | None, spec: str, absent: str = "not available") -> str:
    value = finite_or_none(value)
    return absent if value is None else format(value, spec)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th ... 11th, 12th, 13th ... 21st, 22nd, 23rd ... 111th."""
    if n < 0:
        raise ValueError(f"ordinal: argument 'n' must be >= 0, got {n}")
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def percentile_phrase(value: float) -> str:
    """'80th percentile' for a whole number (at one decimal), else 'percentile 79.2':
    an ordinal suffix on a decimal ('79.2th') is not English."""
    rounded = round(float(value), 1)
    if rounded == int(rounded):
        return f"{ordinal(int(rounded))} percentile"
    return f"percentile {rounded:.1f}"


def _legend_lines(summary: ResultSummary, error_bounds: tuple[float, float], slice_label: str,
                  reference: ReferenceNote | None = None, map_unit: str = "z") -> list[tuple[str, bool]]:
    """(text, is_alert) lines of the legend, ASCII only."""
    algo = summary.algorithm
    lines: list[tuple[str, bool]] = [(DISCLAIMER.upper(), True)]
    lines.append((f"{algo.manufacturer} {algo.family}: {algo.name} {algo.version}", False))
    percentile = finite_or_none(summary.percentile)
    pct = "" if percentile is None else f" ({percentile_phrase(percentile)} of healthy reference)"
    if finite_or_none(summary.anomaly_score) is None:
        lines.append(("No anomaly score: the model gave no valid number", True))
    else:
        # Significant digits, not decimals: an MR bundle's scores are ~1e-5 (".3f" read 0.000).
        lines.append((f"Anomaly score {_fmt(summary.anomaly_score, '.4g')}{pct}", False))
    if reference is not None and reference.calibrating:
        # In place of a screen result: why there is none.
        lines.append((reference.legend_text, True))
    elif summary.screen_positive is None:
        lines.append(("No screen result: absence of findings is NOT implied", True))
    else:
        verdict = "POSITIVE" if summary.screen_positive else "negative"
        lines.append((f"Screen result: {verdict} at threshold {_fmt(summary.threshold, '.4g')}",
                      summary.screen_positive))
    if reference is not None and not reference.calibrating:
        lines.append((reference.legend_text, False))
    age_gap = finite_or_none(summary.age_gap)
    offset = finite_or_none(summary.age_offset)
    corrected = "" if offset is None else f" after this scanner's {-offset:+.1f} y correction"
    if age_gap is None:
        lines.append(("Brain-age gap: not available", False))
    else:
        lines.append(
            (
                f"Brain-age gap {age_gap:+.1f} y (predicted {_fmt(summary.predicted_age, '.1f')}{corrected},"
                f" chronological {_fmt(summary.chronological_age, '.1f')})",
                False,
            )
        )
    if summary.qc_reasons:
        lines.append(("QC: " + "; ".join(summary.qc_reasons), True))
    lo, hi = error_bounds
    lines.append((f"Colour: {lo:.3g} (yellow) to {hi:.3g} (red), uncoloured below {lo:.3g}  {slice_label}", False))
    lines.append((MAP_UNITS[map_unit][1], False))
    return lines


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, draw: ImageDraw.ImageDraw,
          width: int) -> list[str]:
    words, lines, current = text.split(" "), [], ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines


def _add_legend(image_rgb: np.ndarray, lines: list[tuple[str, bool]], per_slice: int = 0,
                reuse_lines: bool = True) -> np.ndarray:
    """Append a black band under the image with the legend text and a colour bar. Only the
    last `per_slice` lines differ from slice to slice: the band with the others is drawn
    once per series (`_legend_start`) and copied, the same pixels as drawing it each time.
    `reuse_lines`: each of those lines is pasted from a strip drawn once (`_line_strip`):
    most repeat from slice to slice (the unit line; the colour line but its slice label)."""
    width = image_rgb.shape[1]
    font_px, margin, line_h = _legend_layout(width)
    shared = tuple(lines[:len(lines) - per_slice])
    wrapped_shared = [part for text, alert in shared for part in _wrapped(text, alert, font_px, width - 2 * margin)]
    wrapped_own = [part for text, alert in lines[len(shared):]
                   for part in _wrapped(text, alert, font_px, width - 2 * margin)]
    bar_h = max(6, font_px // 2)
    band_h = 2 * margin + line_h * (len(wrapped_shared) + len(wrapped_own)) + bar_h + margin
    band = _legend_start(width, band_h, tuple(wrapped_shared)).copy()
    draw = ImageDraw.Draw(band)
    font = _legend_font(font_px)
    y = margin + line_h * len(wrapped_shared)
    # A strip covers its line's rows only: every line must keep its glyphs there, the last
    # shared one too (its glyphs would otherwise reach into rows a strip covers).
    pasted = reuse_lines and all(_inside_line(text, font_px) for text, _ in [*wrapped_shared[-1:], *wrapped_own])
    for text, alert in wrapped_own:
        if pasted:
            band.paste(_line_strip(text, alert, width), (0, y))
        else:
            draw.text((margin, y), text, fill=_LEGEND_ALERT if alert else _LEGEND_TEXT, font=font)
        y += line_h
    bar_w = width - 2 * margin
    ramp = np.linspace(0.0, 1.0, bar_w)[:, None]
    bar = (_YELLOW + ramp * (_RED - _YELLOW)).astype(np.uint8)[None, :, :].repeat(bar_h, axis=0)
    band.paste(Image.fromarray(bar, "RGB"), (margin, y + margin // 2))
    return np.concatenate([image_rgb, np.asarray(band)], axis=0)


def _legend_layout(width: int) -> tuple[int, int, int]:
    """(font size, margin, line height) in pixels of the legend under an image `width` wide."""
    font_px = max(11, width // 32)
    return font_px, *_legend_layout_for_font(font_px)


@functools.lru_cache(maxsize=8)
def _legend_font(font_px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=font_px)


@functools.lru_cache(maxsize=256)
def _wrapped(text: str, alert: bool, font_px: int, width: int) -> tuple[tuple[str, bool], ...]:
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return tuple((part, alert) for part in _wrap(text, _legend_font(font_px), measure, width))


@functools.lru_cache(maxsize=256)
def _inside_line(text: str, font_px: int) -> bool:
    """The line's glyphs, drawn at a line's top, stay within its rows."""
    _, top, _, bottom = _legend_font(font_px).getbbox(text)
    return top >= 0 and bottom <= _legend_layout_for_font(font_px)[1]


def _legend_layout_for_font(font_px: int) -> tuple[int, int]:
    """(margin, line height) of a legend drawn at `font_px` (see `_legend_layout`)."""
    return max(4, font_px // 2), int(font_px * 1.3)


@functools.lru_cache(maxsize=32)
def _line_strip(text: str, alert: bool, width: int) -> Image.Image:
    """One legend line on a strip of background one line high, drawn where `_add_legend`
    draws it: pasted, the same pixels as drawing the line on the band (`_inside_line`)."""
    font_px, margin, line_h = _legend_layout(width)
    strip = Image.new("RGB", (width, line_h), _LEGEND_BACKGROUND)
    ImageDraw.Draw(strip).text((margin, 0), text, fill=_LEGEND_ALERT if alert else _LEGEND_TEXT,
                               font=_legend_font(font_px))
    return strip


@functools.lru_cache(maxsize=4)
def _legend_start(width: int, band_h: int, wrapped: tuple[tuple[str, bool], ...]) -> Image.Image:
    """A legend band of `band_h` rows with `wrapped` drawn from the top (copy before use)."""
    font_px, margin, line_h = _legend_layout(width)
    band = Image.new("RGB", (width, band_h), _LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(band)
    font = _legend_font(font_px)
    y = margin
    for text, alert in wrapped:
        draw.text((margin, y), text, fill=_LEGEND_ALERT if alert else _LEGEND_TEXT, font=font)
        y += line_h
    return band


def _patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Dominant patient-axis letters of the row and column directions (LPS)."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return ("L", "P")  # axial default; only used for display hints
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def letter(vec: Sequence[float]) -> str:
        axis = int(np.argmax(np.abs(vec)))
        return letters[axis][0] if vec[axis] > 0 else letters[axis][1]

    return letter([float(v) for v in iop[:3]]), letter([float(v) for v in iop[3:]])


def _check_inputs(
    source_datasets: Sequence[Dataset], error_map: NativeMap, slice_indices: Sequence[int] | None
) -> None:
    if len(source_datasets) == 0:
        raise ValueError("build_overlay_series: argument 'source_datasets' is empty")
    if len(error_map.shape) != 3:
        raise ValueError(f"build_overlay_series: argument 'error_map_native' must be 3-D, got shape {error_map.shape}")
    if error_map.shape[0] != len(source_datasets):
        raise ValueError(
            "build_overlay_series: argument 'error_map_native' has "
            f"{error_map.shape[0]} slices but 'source_datasets' has {len(source_datasets)}"
        )
    rows, cols = int(source_datasets[0].Rows), int(source_datasets[0].Columns)
    if error_map.shape[1:] != (rows, cols):
        raise ValueError(
            f"build_overlay_series: argument 'error_map_native' slice shape {error_map.shape[1:]} "
            f"does not match the source images ({rows}, {cols})"
        )
    studies = {ds.StudyInstanceUID for ds in source_datasets}
    if len(studies) != 1:
        raise ValueError("build_overlay_series: argument 'source_datasets' spans more than one study")
    if slice_indices is not None:
        if len(slice_indices) == 0:
            raise ValueError("build_overlay_series: argument 'slice_indices' is empty")
        bad = [k for k in slice_indices if not 0 <= k < len(source_datasets)]
        if bad:
            raise ValueError(f"build_overlay_series: argument 'slice_indices' out of range: {bad}")


def _upscale(array: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def _plane_geometry(source: Dataset, factor: int) -> dict[str, object]:
    """Image plane attributes of the source slice, adjusted for pixel upscaling:
    the first pixel's centre moves back by (factor-1)/(2*factor) of a source pixel."""
    needed = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID")
    if not all(hasattr(source, k) for k in needed):
        return {}
    row_dir = np.array([float(v) for v in source.ImageOrientationPatient[:3]])
    col_dir = np.array([float(v) for v in source.ImageOrientationPatient[3:]])
    row_spacing, col_spacing = (float(v) for v in source.PixelSpacing)
    shift = (factor - 1) / (2.0 * factor)
    position = np.array([float(v) for v in source.ImagePositionPatient]) - shift * (
        row_dir * col_spacing + col_dir * row_spacing
    )
    return {
        "FrameOfReferenceUID": source.FrameOfReferenceUID,
        "ImagePositionPatient": [float(f"{v:.6f}") for v in position],
        "ImageOrientationPatient": [float(v) for v in source.ImageOrientationPatient],
    }


def _source_reference(source: Dataset, with_purpose: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if with_purpose:
        purpose = Dataset()
        purpose.CodeValue = "121322"
        purpose.CodingSchemeDesignator = "DCM"
        purpose.CodeMeaning = "Source image for image processing operation"
        item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def build_overlay_series(
    source_datasets: list[Dataset],
    error_map_native: NativeMap | np.ndarray,
    summary: ResultSummary,
    slice_indices: Sequence[int] | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 9001,
    *,
    max_slices: int | None = None,
    style: OverlayStyle | None = None,
    reference: ReferenceNote | None = None,
    map_unit: str = "z",
    sink: Callable[[Dataset], Dataset] | None = None,
) -> list[Dataset]:
    """One RGB Secondary Capture image per chosen slice (see module docstring).

    ``source_datasets[k]`` must be the slice of ``error_map_native[k]``. With
    ``slice_indices=None`` the ``max_slices`` (default ``style.default_slice_count``)
    consecutive slices centred on the slice with the largest summed error are rendered.
    ``reference`` adds the healthy reference to the legend, or says the scanner is
    calibrating in place of a screen result. ``map_unit`` says what the map's unit is
    (a key of MAP_UNITS: "z" for a bundle with a normative model, else "error").
    ``sink`` takes each image as soon as it is built, in order, and returns what the list
    holds of it (the caller may write it and keep the header only: one image in memory).
    """
    if map_unit not in MAP_UNITS:
        raise ValueError(f"build_overlay_series: argument 'map_unit' must be one of {', '.join(MAP_UNITS)}")
    if not summary.eligible:
        # A result that cannot be trusted gets no colour: see build_not_screened_image.
        raise ValueError("build_overlay_series: argument 'summary' is not eligible; use build_not_screened_image")
    if reference is not None:
        reference.check(summary, "build_overlay_series")
    style = style or OverlayStyle()
    if max_slices is not None and max_slices < 1:
        raise ValueError(f"build_overlay_series: argument 'max_slices' must be >= 1, got {max_slices}")
    error_map = as_native_map(error_map_native)
    _check_inputs(source_datasets, error_map, slice_indices)
    count = max_slices or style.default_slice_count
    indices = list(slice_indices) if slice_indices is not None else choose_slices(error_map, count)
    series_uid = series_instance_uid or hd.UID()
    values = {k: _modality_values(source_datasets[k]) for k in indices}
    window = _display_window(summary.modality, list(values.values()), style)
    bounds = _error_bounds(error_map, style)
    planes = _planes(error_map, indices)
    factor = max(1, math.ceil(style.min_render_width / int(source_datasets[0].Columns)))
    images = []
    for position, k in enumerate(indices):
        image = _build_one(source_datasets[k], values[k], planes[k], k, len(source_datasets), position + 1,
                           series_uid, series_number, summary, window, bounds, factor, style, reference, map_unit)
        images.append(image if sink is None else sink(image))
    logger.info(
        "built overlay series",
        extra={"action": "sc_built", "series_uid": series_uid, "images": len(images),
               "slices": f"{indices[0]}..{indices[-1]}", "error_bounds": bounds},
    )
    return images


def _planes(error_map: NativeMap, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """The map's slices at `indices`, each run of consecutive ones read as one slab."""
    planes: dict[int, np.ndarray] = {}
    wanted = np.array(sorted(set(indices)))
    for run in np.split(wanted, np.flatnonzero(np.diff(wanted) != 1) + 1):
        planes.update(zip((int(k) for k in run), error_map.slab(int(run[0]), int(run[-1]) + 1), strict=True))
    return planes


def _build_one(
    source: Dataset,
    values: np.ndarray,
    error: np.ndarray,
    slice_index: int,
    n_slices: int,
    instance_number: int,
    series_uid: str,
    series_number: int,
    summary: ResultSummary,
    window: tuple[float, float],
    bounds: tuple[float, float],
    factor: int,
    style: OverlayStyle,
    reference: ReferenceNote | None = None,
    map_unit: str = "z",
) -> Dataset:
    inverted = getattr(source, "PhotometricInterpretation", "") == "MONOCHROME1"
    rgb = _upscale(render_overlay(values, error, window, bounds, style, inverted), factor)
    label = f"slice {slice_index + 1}/{n_slices}"
    # The slice label is in the colour line, the second last; the unit line follows it.
    pixels = _add_legend(rgb, _legend_lines(summary, bounds, label, reference, map_unit), per_slice=2)
    spacing = None
    if hasattr(source, "PixelSpacing"):
        spacing = tuple(float(v) / factor for v in source.PixelSpacing)
    algo = summary.algorithm
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=algo.manufacturer,
        pixel_spacing=spacing,  # type: ignore[arg-type]  # highdicom annotates it tuple[int, int]; it is mm
        patient_orientation=_patient_orientation(source),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=algo.name[:64],
        software_versions=algo.version[:64],
    )
    sc.ConversionType = "WSD"
    # A head is an unpaired body part: Laterality (Type 2C) stays absent, which
    # dciodvfy accepts once the body part is stated.
    sc.BodyPartExamined = getattr(source, "BodyPartExamined", None) or "HEAD"

    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    # Calibrating: said in the header too, for viewers that show Image Comments.
    sc.ImageComments = (f"{DISCLAIMER} - {reference.legend_text}" if reference is not None and reference.calibrating
                        else DISCLAIMER)
    sc.DerivationDescription = (
        f"{algo.family} {MAP_UNITS[map_unit][0]} ({algo.name} {algo.version}) in multiples of the healthy limit, "
        "alpha-blended on the source slice"
    )[:1024]
    sc.SecondaryCaptureDeviceManufacturer = algo.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = algo.name[:64]
    sc.SecondaryCaptureDeviceSoftwareVersions = algo.version[:64]
    sc.SourceImageSequence = DicomSequence([_source_reference(source, with_purpose=True)])
    sc.ReferencedImageSequence = DicomSequence([_source_reference(source, with_purpose=False)])
    if style.copy_plane_geometry:
        for keyword, value in _plane_geometry(source, factor).items():
            setattr(sc, keyword, value)
    return sc


# --------------------------------------------------------------------------- not screened

_CARD_ROWS = 256
# A reason prefix of our own making (lower-case words): safe to burn in, never free text.
_PLAIN_PREFIX = re.compile(r"[a-z][a-z0-9_ ]{0,47}")


def _short_reason(reason: str) -> str:
    """What a reader takes in at a glance, in our own words only (never header text):
    the code meaning of a known QC prefix, else the prefix itself when it is a plain token."""
    code = codes.qc_reason_code(reason)
    if code.value != codes.QC_OTHER_VALUE:
        return code.meaning
    prefix = reason.split(":", 1)[0].strip()
    if _PLAIN_PREFIX.fullmatch(prefix):
        return prefix.replace("_", " ")
    return "the series could not be analysed"


def not_screened_headline(summary: ResultSummary) -> str:
    """'NOT SCREENED: <short reason>' for a not-eligible summary."""
    return f"NOT SCREENED: {_short_reason(summary.reasons_not_eligible()[0])}"


def _not_screened_lines(summary: ResultSummary) -> list[tuple[str, bool]]:
    algo = summary.algorithm
    reasons = summary.reasons_not_eligible()
    lines = [(not_screened_headline(summary), True)]
    if len(reasons) > 1:
        lines.append((f"and {len(reasons) - 1} more reason(s): see the AI screening report", True))
    lines.append((f"{NOT_SCREENED_NOTICE}. No screening result was produced; absence of findings is NOT implied.",
                  False))
    lines.append((f"{DISCLAIMER.upper()}: {algo.manufacturer} {algo.name} {algo.version}", False))
    return lines


def _grey_band(width: int, lines: list[tuple[str, bool]], min_rows: int = 0) -> np.ndarray:
    """A black band with the lines, uint8 (rows, width): the first (the headline) large
    and white, alerts white, the rest light grey; centred vertically in `min_rows`."""
    font_px = max(11, width // 32)
    fonts = [ImageFont.load_default(size=round(font_px * 1.6)), ImageFont.load_default(size=font_px)]
    margin = max(4, font_px // 2)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    wrapped = []  # (text, fill, font, line height)
    for index, (text, alert) in enumerate(lines):
        font = fonts[0] if index == 0 else fonts[1]
        size = font.size if hasattr(font, "size") else font_px
        for part in _wrap(text, font, measure, width - 2 * margin):
            wrapped.append((part, 255 if alert else 200, font, int(size * 1.3)))
    text_rows = sum(line_h for *_, line_h in wrapped)
    rows = max(min_rows, 2 * margin + text_rows)
    band = Image.new("L", (width, rows), 0)
    draw = ImageDraw.Draw(band)
    y = max(margin, (rows - text_rows) // 2)
    for text, fill, font, line_h in wrapped:
        draw.text((margin, y), text, fill=fill, font=font)
        y += line_h
    return np.asarray(band)


def _grey_slice(source: Dataset, modality: str, style: OverlayStyle) -> tuple[np.ndarray, int] | None:
    """The slice windowed to uint8 and upscaled like the overlays, with the factor;
    None when its pixels cannot be had (headers only, an undecodable syntax, colour)."""
    try:
        values = _modality_values(source)
        if values.ndim != 2:
            return None
        lo, hi = _display_window(modality, [values], style)
        grey = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
        if getattr(source, "PhotometricInterpretation", "") == "MONOCHROME1":
            grey = 1.0 - grey
        factor = max(1, math.ceil(style.min_render_width / values.shape[1]))
        return _upscale(np.rint(grey * 255.0).astype(np.uint8), factor), factor
    except Exception as exc:  # any pixel trouble: the plain card still says "not screened"
        logger.info("not-screened image without source pixels", extra={"action": "sc_not_screened_card",
                                                                         "error": type(exc).__name__})
        return None


def _safe_patient_orientation(source: Dataset) -> tuple[str, str]:
    try:
        return _patient_orientation(source)
    except (TypeError, ValueError):  # a malformed orientation must not cost the image
        return ("L", "P")


def build_not_screened_image(
    source: Dataset,
    summary: ResultSummary,
    series_instance_uid: str | None = None,
    series_number: int = 9001,
    *,
    style: OverlayStyle | None = None,
) -> Dataset:
    """The one plain greyscale Secondary Capture of a not-eligible study.

    ``source`` is a slice of the study (the middle slice of the chosen series);
    its pixels, when it has decodable ones, are shown in grey above the text
    band, otherwise the image is a text card. Only patient/study identity is
    taken from it; the burnt-in text is our own words (no patient data).
    """
    if summary.eligible:
        raise ValueError("build_not_screened_image: argument 'summary' is eligible; use build_overlay_series")
    style = style or OverlayStyle()
    lines = _not_screened_lines(summary)
    shown = _grey_slice(source, summary.modality, style)
    if shown is None:
        pixels = _grey_band(style.min_render_width, lines, min_rows=_CARD_ROWS)
    else:
        picture, _ = shown
        pixels = np.concatenate([picture, _grey_band(picture.shape[1], lines)], axis=0)
    algo = summary.algorithm
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference_header(source),
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=algo.manufacturer,
        patient_orientation=_safe_patient_orientation(source),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=NOT_SCREENED_SERIES_DESCRIPTION,
        manufacturer_model_name=algo.name[:64],
        software_versions=algo.version[:64],
    )
    sc.ConversionType = "WSD"
    sc.BodyPartExamined = str(getattr(source, "BodyPartExamined", "") or "HEAD")[:16]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.ImageComments = f"{not_screened_headline(summary)} - {NOT_SCREENED_NOTICE}"[:10240]
    sc.DerivationDescription = (
        f"Study not eligible for {algo.family} screening ({algo.name} {algo.version}): no result computed; "
        + ("source slice shown in grey" if shown is not None else "text only")
    )[:1024]
    sc.SecondaryCaptureDeviceManufacturer = algo.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = algo.name[:64]
    sc.SecondaryCaptureDeviceSoftwareVersions = algo.version[:64]
    if shown is not None:
        sc.SourceImageSequence = DicomSequence([_source_reference(source, with_purpose=True)])
        sc.ReferencedImageSequence = DicomSequence([_source_reference(source, with_purpose=False)])
    logger.info("built not-screened image",
                extra={"action": "sc_not_screened", "with_source_pixels": shown is not None})
    return sc
