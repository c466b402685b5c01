"""Benchmark: how realistic the domain-randomised heads (imaging/synthesis.py) are, judged
against the real scans reachable offline. Trains nothing, writes nothing unless --json.

    .venv/bin/python bench/synthesis_realism.py [--n 12] [--seed 0] [--json PATH]

(about 6 min at the default on two shared cores, nearly all of it building heads; --n 6
takes about half.)

Every measure below is one function applied in the same way to the real image, to N
randomised heads (`make_head(..., randomise=True)`, seeds seed..seed+N-1, ages drawn
20-85) and to 4 plain template phantoms (`randomise=False`: the old training data). Each
row prints the real value, the synthetic min / median / max, whether the real value lies
inside that range, and the same against the template phantoms' range.

MR T1 - the real whole-head T1 of Debian's insighttoolkit5-examples (`realscans.load_real_t1`,
2 x 2 x 3 mm coronal, 8-bit, background zeroed in the file) with its reference brain mask.
- Inside the brain mask: a 3-class Gaussian mixture (CSF / GM / WM) on the brain's
  intensities; GM/WM and CSF/WM ratios of the class means, the within-class coefficient of
  variation (texture + noise + bias), the WM low-frequency non-uniformity (WM intensity
  smoothed over 8 mm: half the 5-95 % range over its median; mostly bias field), the
  residual in WM (MAD of the 3x3x3 residual, as realscans.tissue_means: noise + fine
  texture) and the WM local SD in the most uniform 40 % of 3x3x3 windows (nearest to noise).
- Outside, over the vault only (above the brain's centroid: no face, sinuses or neck):
  the scalp (head voxels within 5 mm of the skin) median and 90th percentile (fat), the
  95th percentile of everything between brain and skin deeper than 2 mm (fat, marrow), and
  the skull's dark band (10th percentile within 8 mm outside the brain mask, deeper than 4
  mm from the skin), all relative to the WM class mean so that units cancel; and the
  median distance from the brain mask to the skin over the vault (mm), and its left-right
  gap over the lateral vault (more than 30 mm off the brain's midline).
- Synthetic heads are brought to the real T1's voxel volume first (a Gaussian of sigma
  0.28 x the target spacing, which divides white-noise variance as block averaging does,
  then nearest sampling on a 2 x 2 x 3 mm grid, 3 mm along the synthetic slice axis):
  noise, CV and texture are then per voxel of the same volume.
- Background (Rician: air mean / SD = 1.91, sigma = mean / sqrt(pi / 2)) on the synthetic
  heads at their native voxels; the real T1's background is all zeros (masked), so n/a.
- Noise power spectrum: per acquired slice (real: coronal 2 x 2 mm; synthetic: axial at
  native in-plane spacing), the high-pass residual (slice minus a 2 mm Gaussian-smoothed
  copy) inside homogeneous WM (the WM class eroded by 2 mm, then the 40 % of it with the
  lowest 5 mm-window SD), mean-removed and masked, periodogram summed over the central
  slices, radially binned in cycles/mm and normalised to unit power over the common band.

CT - no real head CT volume exists offline; pydicom's test data holds single slices. Used:
  J2K_pixelrep_mismatch.dcm (Hitachi Supria, kernel "11", 120 kV, 0.43 mm, 5 mm, gantry tilt
  -22 deg): a normal-appearing skull-base slice (temporal lobes, pons, cerebellum, orbits,
  sinuses, mastoids);
  693_UNCR.dcm (140 kV, "STANDARD", 0.48 mm, 5 mm): a supratentorial slice with bilateral
  chronic subdural collections and midline shift (its "parenchyma" includes the
  collections: HU and grey-white figures are marked as such), a head holder behind.
Not used: 693_J2KR.dcm (pixel-identical to 693_UNCR), 693_J2KI.dcm and 693_UNCI.dcm (the
same slice after 338:1 lossy JPEG 2000: texture destroyed), CT_small.dcm (a contrast-enhanced
spine/paravertebral crop, not a head), bad_sequence.dcm (neck, Siemens B30s).
Synthetic: per head the axial slice nearest the matching MNI level (z = -22 mm for the
skull-base slice, +20 mm for the supratentorial one). Regions, by one rule on every slice:
body = filled largest component above -400 HU; bone > 300 HU; cranium = inside the bone
ring (closed by 6 mm); parenchyma = cranium >= 5 mm from bone and air with a 2 mm median
of 10-60 HU; uniform = the 40 % of parenchyma with the lowest 5 mm-window SD; soft tissue =
body outside the ring, >= 2 mm from bone and air, median 0-100 HU; fat = median -150 to
-40 HU, >= 1.5 mm from air; air = in view, > 5 mm outside the body; skin to bone = median
distance from the body's edge to bone (where under 30 mm). Noise SD = median
5 mm-window SD over the uniform pixels; NPS as for MR on the uniform pixels (band 0.05-0.4
cycles/mm: the synthetic in-plane Nyquist is 0.42-0.71; the model grid, 2.3 mm, keeps only
< 0.22). HU rows also show the drawn ranges of imaging.synthesis.RANGES.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy import ndimage
from sklearn.mixture import GaussianMixture

from headscreen.imaging import realscans, synthesis
from headscreen.imaging.phantoms import Phantom, make_head

N_TEMPLATE = 4
REAL_T1_SPACING = (2.0, 2.0, 3.0)      # the real T1's voxel (x, y, z mm); synthetic heads are brought to it
HIGHPASS_MM = 2.0
WINDOW_MM = 5.0
UNIFORM_FRACTION = 0.40
MR_BAND = (0.05, 0.25)                 # cycles/mm: the real T1's in-plane Nyquist is 0.25
CT_BAND = (0.05, 0.40)                 # the coarsest synthetic in-plane grid (1.2 mm) has Nyquist 0.42
BIN_WIDTH = 0.025
MR_BAND_EDGES = (0.05, 0.10, 0.15, 0.20, 0.25)
CT_BAND_EDGES = (0.05, 0.10, 0.15, 0.22, 0.30, 0.40)
# Real CT slices: file, what it shows, the MNI z (mm) of the matching synthetic axial slice.
CT_SLICES = (
    ("J2K_pixelrep_mismatch.dcm", "skull base (normal-appearing)", -22.0),
    ("693_UNCR.dcm", "supratentorial (bilateral subdural collections)", 20.0),
)


# --------------------------------------------------------------------------- shared helpers


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def disk(radius_px: float) -> np.ndarray:
    r = max(1, int(math.ceil(radius_px)))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= radius_px * radius_px


def odd(n: float) -> int:
    return max(3, int(round(n)) | 1)


def local_sd(values: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    mean = ndimage.uniform_filter(values, size=size)
    return np.sqrt(np.maximum(ndimage.uniform_filter(values * values, size=size) - mean * mean, 0.0))


def highpass(slice2d: np.ndarray, spacing_yx: tuple[float, float]) -> np.ndarray:
    return slice2d - ndimage.gaussian_filter(slice2d, sigma=[HIGHPASS_MM / s for s in spacing_yx])


def periodogram(residual: np.ndarray, mask: np.ndarray, spacing_yx: tuple[float, float],
                band: tuple[float, float]) -> np.ndarray:
    """Power of the masked, mean-removed residual summed per radial bin (cycles/mm) of the band.
    The slices of one image share a shape, so their sums add."""
    edges = np.arange(band[0], band[1] + 1e-9, BIN_WIDTH)
    if mask.sum() < 50:
        return np.zeros(len(edges) - 1)
    r = np.where(mask, residual - residual[mask].mean(), 0.0)
    power = np.abs(np.fft.fft2(r)) ** 2 / mask.sum()
    fy = np.fft.fftfreq(r.shape[0], d=spacing_yx[0])
    fx = np.fft.fftfreq(r.shape[1], d=spacing_yx[1])
    radius = np.hypot(fy[:, None], fx[None, :])
    which = np.digitize(radius, edges) - 1
    inside = (which >= 0) & (which < len(edges) - 1)
    return np.bincount(which[inside], weights=power[inside], minlength=len(edges) - 1)[: len(edges) - 1]


def spectrum_summary(spectrum: np.ndarray, band: tuple[float, float], band_edges: tuple[float, ...]) -> dict:
    """Normalised radial NPS: fraction of band power per fine bin and per coarse band, mean frequency."""
    total = float(spectrum.sum())
    fine = spectrum / total if total > 0 else spectrum
    centres = np.arange(band[0], band[1] - 1e-9, BIN_WIDTH) + BIN_WIDTH / 2.0
    coarse = {}
    for lo, hi in zip(band_edges[:-1], band_edges[1:]):
        coarse[f"{lo:.2f}-{hi:.2f}"] = float(fine[(centres > lo) & (centres < hi)].sum())
    return {"fine": fine.tolist(), "bands": coarse, "f_mean": float((fine * centres).sum())}


def l1(a: list[float], b: list[float]) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def world(image: sitk.Image, axis: int) -> np.ndarray:
    """Physical coordinate `axis` (LPS: 0 patient left +, 2 superior +) of every voxel,
    array order (z, y, x)."""
    size = image.GetSize()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size[::-1]], indexing="ij")
    row = direction[axis] * spacing
    return (image.GetOrigin()[axis] + row[0] * i + row[1] * j + row[2] * k).astype(np.float32)


# --------------------------------------------------------------------------- MR


def to_real_voxels(image: sitk.Image, mask: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """A synthetic head at the real T1's voxel volume (see the module docstring)."""
    sigma = [0.282 * t for t in REAL_T1_SPACING]
    smooth = sitk.SmoothingRecursiveGaussian(image, sigma)
    size = [int(math.floor(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), REAL_T1_SPACING)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(REAL_T1_SPACING)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    values = sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    brain = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0) > 0.5
    return values, brain


def tissue_classes(inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSF / GM / WM means and SDs by a 3-class Gaussian mixture (started at the 10/50/90th percentiles)."""
    rng = np.random.default_rng(0)
    sample = inside if inside.size <= 60000 else rng.choice(inside, 60000, replace=False)
    start = np.percentile(sample, [10.0, 50.0, 90.0]).reshape(-1, 1)
    gmm = GaussianMixture(3, means_init=start, random_state=0, max_iter=200).fit(sample.reshape(-1, 1))
    order = np.argsort(gmm.means_.ravel())
    return gmm.means_.ravel()[order], np.sqrt(gmm.covariances_.ravel()[order])


def mr_measures(image: sitk.Image, brain_image: sitk.Image, native: sitk.Image | None = None) -> dict:
    """Intensity measures at this grid; `native` (synthetic only) adds the background measures."""
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    brain = sitk.GetArrayFromImage(brain_image) > 0
    spacing_zyx = np.asarray(image.GetSpacing()[::-1])
    means, sds = tissue_classes(values[brain])
    csf, gm, wm = means
    out = {"gm_wm": gm / wm, "csf_wm": csf / wm, "cv_wm": sds[2] / wm, "cv_gm": sds[1] / gm, "gm": gm, "wm": wm}
    white = brain & (np.abs(values - wm) < 0.5 * (wm - gm))
    residual = (values - ndimage.uniform_filter(values, size=3))[white]
    mad = 1.4826 * float(np.median(np.abs(residual - np.median(residual)))) * math.sqrt(27.0 / 26.0)
    out["residual_noise_wm"] = mad / wm
    sd = local_sd(values, (3, 3, 3))[white]
    out["uniform_sd_wm"] = float(np.median(sd[sd <= np.percentile(sd, 100.0 * UNIFORM_FRACTION)])) / wm
    sigma = [8.0 / s for s in spacing_zyx]
    density = ndimage.gaussian_filter(white.astype(np.float64), sigma)
    smooth = ndimage.gaussian_filter(np.where(white, values, 0.0), sigma) / np.maximum(density, 1e-6)
    wm_lf = smooth[white & (density > 0.5)]
    lo, hi = np.percentile(wm_lf, [5.0, 95.0])
    out["wm_nonuniformity"] = 0.5 * (hi - lo) / float(np.median(wm_lf))

    head = ndimage.gaussian_filter(values, 1.0) > 0.2 * wm
    head = ndimage.binary_fill_holes(largest_component(head))
    for k in range(head.shape[0]):
        head[k] = ndimage.binary_fill_holes(head[k])
    z = world(image, 2)
    vault = z > float(z[brain].mean())
    from_brain = ndimage.distance_transform_edt(~brain, sampling=spacing_zyx)
    depth = ndimage.distance_transform_edt(head, sampling=spacing_zyx)
    scalp = head & ~brain & vault & (depth <= 5.0) & (from_brain > 3.0)
    band = head & ~brain & vault & (from_brain <= 8.0) & (depth > 4.0)
    out["scalp_p50_wm"] = float(np.percentile(values[scalp], 50.0)) / wm
    out["scalp_p90_wm"] = float(np.percentile(values[scalp], 90.0)) / wm
    out["skull_band_p10_wm"] = float(np.percentile(values[band], 10.0)) / wm
    # The brightest extracranial tissue (fat, marrow) wherever it lies between brain and skin.
    out["extracranial_p95_wm"] = float(np.percentile(values[head & ~brain & vault & (depth > 2.0)], 95.0)) / wm
    skin = head & ~ndimage.binary_erosion(head) & vault
    out["brain_to_skin_mm"] = float(np.median(from_brain[skin]))
    # Per side, over the lateral vault (more than 30 mm off the brain's midline): a scalp
    # trimmed thin on one side only makes healthy heads one-sided (see synthesis.scalp_trim).
    x = world(image, 0)
    x -= float(x[brain].mean())
    left, right = (float(np.median(from_brain[skin & (side * x > 30.0)])) for side in (1.0, -1.0))
    out["brain_to_skin_left_mm"], out["brain_to_skin_right_mm"] = left, right
    out["brain_to_skin_side_gap_mm"] = abs(left - right)
    out["voxel_ml"] = float(np.prod(image.GetSpacing())) / 1000.0
    if native is not None:
        out.update(background(native, image, head, wm))
    return {k: float(v) for k, v in out.items()}


def background(native: sitk.Image, coarse: sitk.Image, head: np.ndarray, wm: float) -> dict:
    """Air > 6 mm outside the head at the native voxels; exact zeros (slabs cut off by the
    partial-coverage draw, which get no noise) are left out."""
    outside = ~ndimage.binary_dilation(head, iterations=3)
    mask = sitk.GetImageFromArray(outside.astype(np.uint8))
    mask.CopyInformation(coarse)
    native_mask = sitk.Resample(mask, native, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    values = sitk.GetArrayViewFromImage(native)[sitk.GetArrayViewFromImage(native_mask) > 0]
    values = values[values != 0.0].astype(np.float64)
    if values.size < 1000:
        return {}
    mean, sd = float(values.mean()), float(values.std())
    return {"air_mean_over_sd": mean / sd if sd > 0 else float("nan"),
            "rician_sigma_wm": mean / math.sqrt(math.pi / 2.0) / wm,
            "native_voxel_ml": float(np.prod(native.GetSpacing())) / 1000.0}


def mr_spectrum(image: sitk.Image, brain_image: sitk.Image, gm: float, wm: float) -> dict:
    """Radial NPS of the high-pass residual in homogeneous WM, over the acquired slices (array axis 0)
    of the brain's central half (at most 24 of them); `gm`, `wm` the class means."""
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    brain = sitk.GetArrayFromImage(brain_image) > 0
    spacing_yx = (image.GetSpacing()[1], image.GetSpacing()[0])
    slices = np.flatnonzero(brain.any(axis=(1, 2)))
    lo, hi = slices[0] + len(slices) // 4, slices[-1] - len(slices) // 4
    total = np.zeros(len(np.arange(MR_BAND[0], MR_BAND[1] + 1e-9, BIN_WIDTH)) - 1)
    erode = disk(2.0 / min(spacing_yx))
    window = (odd(WINDOW_MM / spacing_yx[0]), odd(WINDOW_MM / spacing_yx[1]))
    for k in np.unique(np.linspace(lo, hi, 24).round().astype(int)):
        white = ndimage.binary_erosion(brain[k] & (np.abs(values[k] - wm) < 0.5 * (wm - gm)), erode)
        if white.sum() < 50:
            continue
        sd = local_sd(values[k], window)
        uniform = white & (sd <= np.percentile(sd[white], 100.0 * UNIFORM_FRACTION))
        total += periodogram(highpass(values[k], spacing_yx), uniform, spacing_yx, MR_BAND)
    return spectrum_summary(total, MR_BAND, MR_BAND_EDGES)


def measure_mr_head(phantom: Phantom) -> dict:
    coarse, brain = to_real_voxels(phantom.image, phantom.brain_mask)
    out = mr_measures(coarse, brain, native=phantom.image)
    out["nps"] = mr_spectrum(phantom.image, phantom.brain_mask, out["gm"], out["wm"])
    return out


def measure_real_mr() -> dict:
    real = realscans.load_real_t1()
    out = mr_measures(real.image, real.brain_mask)
    values = sitk.GetArrayViewFromImage(real.image)
    out["background_zero_fraction"] = float(np.mean(values == 0.0))
    out["nps"] = mr_spectrum(real.image, real.brain_mask, out["gm"], out["wm"])
    return out


# --------------------------------------------------------------------------- CT


def ct_measures(hu: np.ndarray, spacing_yx: tuple[float, float]) -> dict:
    """The CT measures of one axial slice (HU), by the region rules of the module docstring."""
    px = float(np.mean(spacing_yx))
    in_view = hu > -1500.0
    body = ndimage.binary_fill_holes(largest_component(ndimage.gaussian_filter(hu, 1.0 / px) > -400.0))
    bone = body & (hu > 300.0)
    ring = ndimage.binary_closing(bone, disk(6.0 / px))
    enclosed = ndimage.binary_fill_holes(ring)
    cranium = largest_component(enclosed & ~ring)
    from_bone = ndimage.distance_transform_edt(~bone) * px
    air = hu < -400.0
    from_air = ndimage.distance_transform_edt(~air) * px
    median = ndimage.median_filter(hu, size=odd(2.0 / px))
    window = odd(WINDOW_MM / px)
    sd = local_sd(hu, (window, window))
    parenchyma = cranium & (from_bone >= 5.0) & (from_air >= 5.0) & (median > 10.0) & (median < 60.0)
    soft = body & ~enclosed & (from_bone >= 2.0) & (from_air >= 2.0) & (median > 0.0) & (median < 100.0)
    fat = body & (median > -150.0) & (median < -40.0) & (from_air >= 1.5) & (from_bone >= 2.0)
    outside = in_view & (ndimage.distance_transform_edt(~body) * px > 5.0)
    skin = body & ~ndimage.binary_erosion(body)
    out: dict = {"pixel_mm": px}
    if bone.sum() >= 100:
        near = from_bone[skin]
        out["skin_to_bone_mm"] = float(np.median(near[near < 30.0])) if np.any(near < 30.0) else float("nan")
    if parenchyma.sum() < 200:
        return out
    uniform = parenchyma & (sd <= np.percentile(sd[parenchyma], 100.0 * UNIFORM_FRACTION))
    out["noise_sd"] = float(np.median(sd[uniform]))
    out["parenchyma_hu"] = float(np.median(hu[parenchyma]))
    means, _ = _two_classes(median[parenchyma])
    out["grey_white_hu"] = float(means[1] - means[0])
    for name, region in (("soft_hu", soft), ("fat_hu", fat), ("air_hu", outside)):
        if region.sum() >= 100:
            out[name] = float(np.median(hu[region]))
    if bone.sum() >= 100:
        out["bone_p90_hu"] = float(np.percentile(hu[bone], 90.0))
    out["nps"] = spectrum_summary(periodogram(highpass(hu, spacing_yx), uniform, spacing_yx, CT_BAND),
                                  CT_BAND, CT_BAND_EDGES)
    return out


def _two_classes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    sample = values if values.size <= 40000 else rng.choice(values, 40000, replace=False)
    start = np.percentile(sample, [25.0, 75.0]).reshape(-1, 1)
    gmm = GaussianMixture(2, means_init=start, random_state=0).fit(sample.reshape(-1, 1))
    order = np.argsort(gmm.means_.ravel())
    return gmm.means_.ravel()[order], np.sqrt(gmm.covariances_.ravel()[order])


def real_ct_slices() -> dict[str, dict]:
    found = {p.name: p for p in realscans.real_ct_slice_paths()}
    out = {}
    for name, what, _ in CT_SLICES:
        if name not in found:
            continue
        ds = pydicom.dcmread(found[name])
        hu = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0)
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
        out[name] = {"what": what, **ct_measures(hu, (row_mm, col_mm))}
    return out


def measure_ct_head(phantom: Phantom) -> dict[str, dict]:
    """Per real slice, the measures of this head's axial slice at the matching MNI level."""
    values = sitk.GetArrayViewFromImage(phantom.image)
    spacing_yx = (phantom.image.GetSpacing()[1], phantom.image.GetSpacing()[0])
    out = {}
    for name, _, z_mni in CT_SLICES:
        point = phantom.mni_to_native.TransformPoint((0.0, 0.0, z_mni))
        k = int(round(phantom.image.TransformPhysicalPointToContinuousIndex(point)[2]))
        if 0 <= k < values.shape[0] and np.any(values[k] > -400.0):
            out[name] = ct_measures(values[k].astype(np.float64), spacing_yx)
    return out


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    name: str
    real: float | None
    synthetic: list[float]
    template: list[float]
    drawn: str = ""
    note: str = ""

    @staticmethod
    def verdict(value: float | None, pool: list[float]) -> str:
        if value is None or not pool or not math.isfinite(value):
            return "n/a"
        lo, hi = min(pool), max(pool)
        if lo <= value <= hi:
            return "inside"
        return "OUTSIDE (below)" if value < lo else "OUTSIDE (above)"

    def as_dict(self) -> dict:
        s, t = self.synthetic, self.template
        return {"measure": self.name, "real": self.real,
                "synthetic": {"min": min(s), "median": float(np.median(s)), "max": max(s), "n": len(s)} if s else None,
                "template": {"min": min(t), "max": max(t), "n": len(t)} if t else None,
                "verdict": self.verdict(self.real, s), "template_verdict": self.verdict(self.real, t),
                "drawn_range": self.drawn, "note": self.note}


def fmt(v: float | None, digits: int) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def print_rows(title: str, rows: list[Row], digits: int) -> None:
    print(f"\n{title}")
    print(f"  {'measure':<38}{'real':>9}  {'synthetic min / med / max':>27}  {'verdict':<16}"
          f"{'template min / max':>19}  {'verdict':<16}{'drawn range'}")
    for r in rows:
        s = r.synthetic
        syn = f"{fmt(min(s), digits)} / {fmt(float(np.median(s)), digits)} / {fmt(max(s), digits)}" if s else "n/a"
        tpl = f"{fmt(min(r.template), digits)} / {fmt(max(r.template), digits)}" if r.template else "n/a"
        print(f"  {r.name:<38}{fmt(r.real, digits):>9}  {syn:>27}  {Row.verdict(r.real, s):<16}"
              f"{tpl:>19}  {Row.verdict(r.real, r.template):<16}{r.drawn}")
        if r.note:
            print(f"  {'':<38}  ({r.note})")


def pick(records: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in records if key in r and math.isfinite(float(r[key]))]


def nps_rows(real: dict | None, synthetic: list[dict], template: list[dict], band_edges: tuple[float, ...],
             prefix: str) -> list[Row]:
    rows = []
    for lo, hi in zip(band_edges[:-1], band_edges[1:]):
        key = f"{lo:.2f}-{hi:.2f}"
        rows.append(Row(f"{prefix} NPS share {key} c/mm", real["bands"][key] if real else None,
                        [s["bands"][key] for s in synthetic], [t["bands"][key] for t in template]))
    rows.append(Row(f"{prefix} NPS mean frequency (c/mm)", real["f_mean"] if real else None,
                    [s["f_mean"] for s in synthetic], [t["f_mean"] for t in template]))
    if synthetic:
        centre = np.median([s["fine"] for s in synthetic], axis=0).tolist()
        spread = [l1(s["fine"], centre) for s in synthetic]
        rows.append(Row(f"{prefix} NPS L1 to synthetic median", l1(real["fine"], centre) if real else None,
                        spread, [l1(t["fine"], centre) for t in template],
                        note="L1 of normalised spectra, 0-2; synthetic column: each head's own distance"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="randomised heads per modality")
    parser.add_argument("--seed", type=int, default=0, help="first head seed (ages are drawn from it too)")
    parser.add_argument("--json", type=Path, help="write every measure and row here")
    args = parser.parse_args()
    began = time.monotonic()
    seeds = [args.seed + i for i in range(args.n)]
    ages = np.random.default_rng(args.seed).uniform(20.0, 85.0, args.n)
    t_ages = ages[:N_TEMPLATE] if args.n >= N_TEMPLATE else np.linspace(30.0, 75.0, N_TEMPLATE)
    print(f"synthesis realism: {args.n} randomised heads per modality (seeds {seeds[0]}-{seeds[-1]}), "
          f"{N_TEMPLATE} template phantoms; command: bench/synthesis_realism.py --n {args.n} --seed {args.seed}")

    real_mr = measure_real_mr()
    mr_syn, mr_tpl, looks = [], [], []
    for seed, age in zip(seeds, ages):
        phantom = make_head("MR", float(age), seed, randomise=True)
        mr_syn.append(measure_mr_head(phantom))
        looks.append(phantom.metadata["appearance"])
    for i, age in enumerate(t_ages):
        mr_tpl.append(measure_mr_head(make_head("MR", float(age), args.seed + i)))
    t_mr = time.monotonic() - began

    real_ct = real_ct_slices()
    ct_syn: list[dict] = []
    ct_tpl: list[dict] = []
    ct_looks = []
    for seed, age in zip(seeds, ages):
        phantom = make_head("CT", float(age), seed, randomise=True)
        ct_syn.append(measure_ct_head(phantom))
        ct_looks.append(phantom.metadata["appearance"])
    for i, age in enumerate(t_ages):
        ct_tpl.append(measure_ct_head(make_head("CT", float(age), args.seed + i)))
    t_ct = time.monotonic() - began - t_mr

    r = synthesis.RANGES
    mr_keys = (
        ("gm_wm", "GM / WM (class means)", f"{r['MR']['gm_ratio'][0]}-{r['MR']['gm_ratio'][1]}", ""),
        ("csf_wm", "CSF / WM", f"{r['MR']['csf_ratio'][0]}-{r['MR']['csf_ratio'][1]}", ""),
        ("cv_wm", "WM CV (texture + noise + bias)", "", ""),
        ("cv_gm", "GM CV", "", ""),
        ("wm_nonuniformity", "WM non-uniformity (8 mm, half 5-95%)", f"bias {r['MR']['bias'][0]}-{r['MR']['bias'][1]}",
         ""),
        ("residual_noise_wm", "WM residual (MAD 3x3x3) / WM", "", "noise + fine texture per 12 uL voxel"),
        ("uniform_sd_wm", "WM local SD, most uniform 40% / WM", "", "3x3x3 windows; closest to noise alone"),
        ("scalp_p50_wm", "scalp median / WM", f"scalp {r['MR']['scalp_ratio'][0]}-{r['MR']['scalp_ratio'][1]}", ""),
        ("scalp_p90_wm", "scalp p90 (fat) / WM", f"fat {r['MR']['fat_ratio'][0]}-{r['MR']['fat_ratio'][1]}", ""),
        ("extracranial_p95_wm", "extracranial p95 (fat, marrow) / WM",
         f"fat {r['MR']['fat_ratio'][1]}, diploe {r['MR']['diploe_ratio'][1]} max", ""),
        ("skull_band_p10_wm", "skull dark band p10 / WM",
         f"table {r['MR']['table_ratio'][0]}-{r['MR']['table_ratio'][1]}", ""),
        ("brain_to_skin_mm", "brain mask to skin, vault (mm)", "skull 4.5-7 + Colin27 scalp", ""),
        ("brain_to_skin_side_gap_mm", "left - right brain-to-skin, lateral vault (|mm|)", "scalp >= 4 mm",
         "a one-sided scalp makes a healthy head one-sided"),
    )
    mr_rows = [Row(label, real_mr.get(key), pick(mr_syn, key), pick(mr_tpl, key), drawn, note)
               for key, label, drawn, note in mr_keys]
    mr_rows.append(Row("air mean / SD (Rayleigh 1.91)", None, pick(mr_syn, "air_mean_over_sd"),
                       pick(mr_tpl, "air_mean_over_sd"), note="real background is all zeros (masked in the file)"))
    mr_rows.append(Row("Rician sigma / WM (native voxel)", None, pick(mr_syn, "rician_sigma_wm"),
                       pick(mr_tpl, "rician_sigma_wm"),
                       f"{r['MR']['noise_ratio'][0]}-{r['MR']['noise_ratio'][1]}"))
    mr_nps = nps_rows(real_mr["nps"], [s["nps"] for s in mr_syn], [t["nps"] for t in mr_tpl], MR_BAND_EDGES, "MR")

    ctr = r["CT"]
    drawn_ct = {"noise_sd": f"{ctr['noise_at_5mm'][0]}-{ctr['noise_at_5mm'][1]} at 5 mm slices, x sqrt(5 / mm)",
                "parenchyma_hu": f"wm {ctr['gm'][0] - ctr['gm_minus_wm'][1] + ctr['offset'][0]:g}"
                                 f" - gm {ctr['gm'][1] + ctr['offset'][1]:g}",
                "grey_white_hu": f"{ctr['gm_minus_wm'][0]}-{ctr['gm_minus_wm'][1]}",
                "soft_hu": f"scalp {ctr['scalp'][0]}-{ctr['scalp'][1]}",
                "fat_hu": f"{ctr['fat'][0]}-{ctr['fat'][1]}",
                "bone_p90_hu": f"table {ctr['skull_table'][0]}-{ctr['skull_table'][1]}",
                "air_hu": "-1000 (no offset)", "skin_to_bone_mm": "", "pixel_mm": "0.7-1.2 in-plane"}
    labels = {"noise_sd": "noise SD, uniform parenchyma (HU)", "parenchyma_hu": "parenchyma median (HU)",
              "grey_white_hu": "grey-white contrast, 2-class GMM (HU)", "soft_hu": "soft tissue outside skull (HU)",
              "fat_hu": "fat (HU)", "bone_p90_hu": "bone p90 (HU)", "air_hu": "air outside head (HU)",
              "skin_to_bone_mm": "skin to bone, median (mm)", "pixel_mm": "pixel (mm)"}
    ct_blocks: list[tuple[str, list[Row], list[Row]]] = []
    for name, what, z_mni in CT_SLICES:
        real = real_ct.get(name, {})
        syn = [h[name] for h in ct_syn if name in h]
        tpl = [h[name] for h in ct_tpl if name in h]
        rows = []
        for key, label in labels.items():
            note = "real includes the subdural collections" if name.startswith("693") and key in (
                "parenchyma_hu", "grey_white_hu") else ""
            note = {"pixel_mm": "coarser by design: the model grid is 2.3 mm",
                    "air_hu": "the drawn offset moves brain tissues only"}.get(key, note)
            rows.append(Row(label, real.get(key), pick(syn, key), pick(tpl, key), drawn_ct[key], note))
        nps = nps_rows(real.get("nps"), [s["nps"] for s in syn if "nps" in s], [t["nps"] for t in tpl if "nps" in t],
                       CT_BAND_EDGES, "CT")
        ct_blocks.append((f"-- {name}: {what}; synthetic slice at MNI z {z_mni:+.0f} mm (n={len(syn)})", rows, nps))

    print(f"\n== MR T1: real = insighttoolkit5-examples T1 (2 x 2 x 3 mm, 8-bit); synthetic and template at "
          f"the same voxel volume, background at native voxels ({t_mr:.0f} s)")
    print_rows("-- intensities relative to the WM class mean", mr_rows, 3)
    print_rows(f"-- noise power spectrum, high-pass residual in homogeneous WM, band {MR_BAND[0]}-{MR_BAND[1]} c/mm "
               "(real coronal 2 mm; synthetic axial native)", mr_nps, 3)
    print(f"\n== CT: real = pydicom single slices; synthetic = the axial slice at the matching MNI level "
          f"({t_ct:.0f} s)")
    for title, rows, nps in ct_blocks:
        print_rows(title, rows, 2)
        print_rows(f"   noise power spectrum in uniform parenchyma, band {CT_BAND[0]}-{CT_BAND[1]} c/mm", nps, 3)
    spacing = [lk["spacing_mm"] for lk in ct_looks]
    print(f"\nsynthetic CT drawn: slice thickness {min(s[2] for s in spacing):.1f}-"
          f"{max(s[2] for s in spacing):.1f} mm, "
          f"noise {min(lk['noise'] for lk in ct_looks):.1f}-{max(lk['noise'] for lk in ct_looks):.1f} HU, "
          f"correlation {min(lk['noise_corr_mm'] for lk in ct_looks):.2f}-"
          f"{max(lk['noise_corr_mm'] for lk in ct_looks):.2f} mm; real slices are 5 mm thick")
    print(f"total {time.monotonic() - began:.0f} s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "n": args.n, "seed": args.seed, "ages": ages.tolist(),
            "mr": {"rows": [x.as_dict() for x in mr_rows + mr_nps], "real": real_mr, "synthetic": mr_syn,
                   "template": mr_tpl, "appearance": looks},
            "ct": {"rows": {title: [x.as_dict() for x in rows + nps] for title, rows, nps in ct_blocks},
                   "real": real_ct, "synthetic": ct_syn, "template": ct_tpl, "appearance": ct_looks},
            "seconds": time.monotonic() - began,
        }, indent=1, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
