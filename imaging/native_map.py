"""The model's map on the source slices, as the result builders read it.

A thin-slice CT's map is ~80 M voxels (315 MB of float32), while the overlays need a few
slices, the SEG the box where the map reaches its growth level, and the SR its peak.
`NativeMap` is what the builders in `headscreen.export` ask of it; `DenseMap` serves a
map already held as an array, and `headscreen.imaging.preprocess.ResampledMap`
resamples from the model grid only what is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

#: A box of native voxel indices, (low z, y, x) and (high z, y, x), both inclusive.
IndexBox = tuple[tuple[int, int, int], tuple[int, int, int]]
#: A bound on a box's values and how to read the box: its first index per axis, the map in it.
MapPart = tuple[float, Callable[[], tuple[tuple[int, ...], np.ndarray]]]

__all__ = ["IndexBox", "MapPart", "NativeMap", "DenseMap", "as_native_map", "choose_from_sums", "map_peak", "peak_of",
           "slice_sums_of"]


@runtime_checkable
class NativeMap(Protocol):
    """A map on the source slices, index [k, row, column] = slice k's pixel (row, column)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def slab(self, start: int, stop: int) -> np.ndarray:
        """float32 map of slices start..stop-1, full rows and columns."""
        ...

    def slice_sums(self) -> np.ndarray:
        """Per slice, the map summed (float64; NaN skipped; a slice holding an infinity is
        summed with its infinities skipped too). A resampled map may estimate it."""
        ...

    def sample(self, step: int) -> np.ndarray:
        """The map at every `step`-th index along each axis (map[::step, ::step, ::step])."""
        ...

    def at_least(self, level: float, seeded_by: float | None = None,
                 near: IndexBox | None = None
                 ) -> tuple[tuple[int, ...], np.ndarray] | None:
        """A box holding every voxel whose value is >= `level` (given `seeded_by`, only
        those connected through such voxels to one >= `seeded_by` or to one inside `near`):
        (its first index per axis, the map inside it); None when there is none (a map
        held whole may give all of itself instead)."""
        ...

    def parts_at_least(self, level: float) -> list[MapPart]:
        """Boxes that together hold every voxel whose value is >= `level`, as (bound, read),
        largest bound first: each such voxel lies in a part whose bound is at least its
        value, and `read()` gives that part's box (its first index per axis, the map inside
        it), read only then. A map held whole may give all of itself, bound infinite."""
        ...

    def full(self) -> np.ndarray:
        """The whole map as one float32 array."""
        ...


class DenseMap:
    """A map held as an array."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def slab(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.values[start:stop], dtype=np.float32)

    def slice_sums(self) -> np.ndarray:
        return slice_sums_of(self.values)

    def sample(self, step: int) -> np.ndarray:
        return self.values[(slice(None, None, step),) * self.values.ndim] if step > 1 else self.values

    def at_least(self, level: float, seeded_by: float | None = None,
                 near: IndexBox | None = None
                 ) -> tuple[tuple[int, ...], np.ndarray] | None:
        # The whole map is such a box; the caller's own scan finds the voxels.
        return (0,) * self.values.ndim, self.values

    def parts_at_least(self, level: float) -> list[MapPart]:
        return [(math.inf, lambda: ((0,) * self.values.ndim, self.values))]

    def full(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float32)


def as_native_map(native_map: NativeMap | np.ndarray) -> NativeMap:
    return native_map if isinstance(native_map, NativeMap) else DenseMap(native_map)


def slice_sums_of(values: np.ndarray) -> np.ndarray:
    """Summing first and repairing only the slices that hold a NaN or an infinity avoids a
    full copy of a native-resolution map."""
    n_slices = values.shape[0]
    per_slice = values.reshape(n_slices, -1).sum(axis=1, dtype=np.float64)
    for k in np.flatnonzero(~np.isfinite(per_slice)):
        per_slice[k] = np.nansum(np.where(np.isinf(values[k]), np.nan, values[k]))
    return per_slice


def choose_from_sums(per_slice: np.ndarray, count: int) -> list[int]:
    """``count`` consecutive slice indices centred on the slice of the largest sum (shifted
    inwards at the volume's ends)."""
    n_slices = len(per_slice)
    if count >= n_slices:
        return list(range(n_slices))
    peak = int(np.argmax(per_slice))
    start = min(max(peak - count // 2, 0), n_slices - count)
    return list(range(start, start + count))


def peak_of(values: np.ndarray) -> tuple[float, tuple[int, int, int]] | None:
    """The largest positive finite value of a (slices, rows, columns) array and its index,
    the first in slice, row, column order; None when no value is positive."""
    best, where = 0.0, None
    for k, plane in enumerate(values):  # slice by slice: no copy of a thin-slice CT's map
        finite = np.where(np.isfinite(plane), plane, -np.inf)
        index = int(np.argmax(finite))
        if finite.flat[index] > best:
            best, where = float(finite.flat[index]), (k, index)
    if where is None:
        return None
    k, index = where
    row, column = (int(i) for i in np.unravel_index(index, values.shape[1:]))
    return best, (k, row, column)


def map_peak(native_map: NativeMap | np.ndarray) -> tuple[float, tuple[int, int, int]] | None:
    """`peak_of` the whole map, reading only the boxes where it can lie: every `_PEAK_STEP`-th
    voxel bounds the peak from below, and the peak lies where the map reaches that bound, in a
    part whose bound is at least the best value found so far."""
    found_map = as_native_map(native_map)
    if isinstance(found_map, DenseMap):
        return peak_of(found_map.values)
    coarse = found_map.sample(_PEAK_STEP)
    positive = coarse[np.isfinite(coarse) & (coarse > 0)]
    # A hair below the sampled maximum: a voxel resampled on another grid may differ in
    # its last bits. With no positive sample, any positive value may be the peak.
    level = float(positive.max()) * (1 - 1e-4) if positive.size else float(np.finfo(np.float32).tiny)
    best: tuple[float, tuple[int, int, int]] | None = None
    for bound, read in found_map.parts_at_least(level):
        if best is not None and bound < best[0]:
            break  # no later part holds a value above its bound
        offset, box = read()
        peak = peak_of(box)
        if peak is None:
            continue
        value, index = peak
        k, row, column = (i + o for i, o in zip(index, offset, strict=True))
        # Equal values: the first in slice, row, column order, as peak_of takes.
        if best is None or value > best[0] or (value == best[0] and (k, row, column) < best[1]):
            best = value, (k, row, column)
    return best


_PEAK_STEP = 4
