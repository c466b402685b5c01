"""Domain randomisation: heads that vary the way real scans vary, from label maps.

After SynthSeg (Billot et al., 2023) and SynthBA (Puglisi et al., 2024): a model
trained on one template's appearance learns that template, not heads. Each
synthetic head here draws its own anatomy (a smooth non-linear deformation, head
shape, skull thickness; atrophy with age comes from `phantoms`), its own tissue
intensities within physical ranges, and its own acquisition (resolution, slice
thickness, partial-volume blur, bias field, noise texture, CT streaks and beam
hardening, a head holder, partial coverage). The label maps are the ICBM152
tissue maps and the Colin27 outline (`imaging.templates`); the real T1 used to
test the models (`imaging.realscans`) is never a source.

Ranges and where they come from (typical adult values; each is a uniform draw):
- CT grey matter 34-44 HU, white matter 6-16 HU below grey, CSF 0-12 HU, scalp
  soft tissue 30-60 HU, subcutaneous fat -120 to -70 HU, cortical bone 1000-1800 HU,
  diploe 400-900 HU: the standard Hounsfield tables of neuroradiology texts
  (e.g. grey/white difference 5-15 HU on unenhanced head CT), and the real CT
  slices in pydicom's test data (measured by `bench/synthesis_realism.py`).
  Grey-white contrast reaches 16 HU because the template's smooth tissue maps halve
  it by partial volume (real slices measure 13-15 HU where synthetic heads gave 1-12).
  A scanner offset of +-8 HU on every tissue, air included (CT QA tolerates +-4-5 HU
  for water; a real slice's air reads -989 HU).
- CT noise 2.5-6 HU SD at 5 mm slices (the real 5 mm slices measure 2.7-3.4 HU),
  scaled by sqrt(5 mm / thickness) for thinner ones, with an in-plane correlation
  length of 0.3-1.3 mm (sharp to soft reconstruction kernels);
  streaks and posterior-fossa beam hardening (the Hounsfield bar between the
  petrous bones) of 4-20 HU.
- T1: white > grey > CSF, as on every T1 sequence; grey/white ratio 0.55-0.85,
  CSF/white 0.08-0.55 (partial volume with tissue in 2-3 mm voxels: the real T1
  measures 0.53), scalp 0.5-0.9 and fat 0.8-1.9 of white (the real T1's brightest
  extracranial tissue is 1.75x white), cortical bone 0-0.15 (no signal; real 0.15),
  diploe (marrow fat) 0.3-1.5. A multiplicative bias field of 5-30 % (receive-coil
  inhomogeneity, as N4 corrects), Rician noise 1-8 % of white (real 5-7 %).
- Resolution: in-plane 0.7-1.2 mm (finer grids only cost time: the model grid is
  2.3 mm), slice thickness 0.6-5 mm (thin CT, thick
  routine slices, 3D MR), partial-volume blur of the slice profile.
- Anatomy: displacement up to 2-6 mm SD on a 40 mm control grid, mirror-symmetric
  across the midline except for a one-sided part of 0.1-0.4 of the symmetric one
  (about 0.2-2.3 mm SD): a healthy brain's left-right differences (petalia, torque)
  are a few millimetres (Toga & Thompson, Nat Rev Neurosci 2003), far less than the
  differences between brains; an unconstrained field made synthetic heads more one-sided
  than the real T1 (`bench/real_scans.py`, term z_asym_focal); head axes
  scaled 0.86-0.98 each (the ICBM brain is 1.88 L, an adult's 1.1-1.6 L; the real
  T1's is 1.54 L); skull 4.5-7 mm with dense tables; the scalp trimmed by 2-7 mm,
  leaving at least 4 mm over the outer table (the template outline leaves 18-21 mm
  from brain to skin, the real T1 13 mm);
  partial coverage: the vertex cut from 5 mm into to 15 mm above the brain, the base
  from 15 mm below to 5 mm into it (the brain mask stays whole: it is the anatomy).
Measured against the real data by `bench/synthesis_realism.py`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from headscreen.imaging import templates

CONTROL_SPACING_MM = 40.0
RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "CT": {"gm": (34.0, 44.0), "gm_minus_wm": (6.0, 16.0), "csf": (0.0, 12.0), "scalp": (30.0, 60.0),
           "fat": (-120.0, -70.0), "skull_table": (1000.0, 1800.0), "skull_diploe": (400.0, 900.0),
           "offset": (-8.0, 8.0), "noise_at_5mm": (2.5, 6.0), "noise_corr_mm": (0.3, 1.3),
           "streak_hu": (4.0, 20.0), "beam_hardening_hu": (0.0, 12.0)},
    "MR": {"wm": (300.0, 1500.0), "gm_ratio": (0.55, 0.85), "csf_ratio": (0.08, 0.55),
           "scalp_ratio": (0.5, 0.9), "fat_ratio": (0.8, 1.9), "table_ratio": (0.0, 0.15),
           "diploe_ratio": (0.3, 1.5), "bias": (0.05, 0.30), "noise_ratio": (0.01, 0.08)},
}
ANATOMY = {"deformation_mm": (2.0, 6.0), "deformation_asymmetry": (0.1, 0.4), "axis_scale": (0.86, 0.98),
           "skull_mm": (4.5, 7.0),
           "inplane_mm": (0.7, 1.2), "slice_mm": (0.6, 5.0), "blur_mm": (0.0, 0.8), "scalp_trim_mm": (2.0, 7.0),
           # Coverage cuts, from the brain's top and bottom (positive: beyond the brain).
           "vertex_cut_mm": (-5.0, 15.0), "base_cut_mm": (-5.0, 15.0)}
NOISE_REFERENCE_SLICE_MM = 5.0  # CT noise is drawn at 5 mm and scales with 1/sqrt(thickness)
FAT_DEPTH_MM = (1.5, 5.0)  # subcutaneous fat lies between skin and the galea/muscle
MIN_SCALP_MM = 4.0  # the trim never thins the scalp over the outer table below this


@dataclass(frozen=True)
class Appearance:
    """Every random draw for one synthetic head (recorded for provenance)."""

    modality: str
    tissue: dict[str, float]        # intensity per tissue (HU, or T1 units)
    deformation_mm: float
    axis_scale: tuple[float, float, float]
    skull_mm: float
    spacing_mm: tuple[float, float, float]
    blur_mm: float
    noise: float                    # CT: HU SD; MR: Rician sigma
    noise_corr_mm: float            # CT only
    bias: float                     # MR: relative amplitude; CT: HU of low-frequency non-uniformity
    streak_hu: float
    beam_hardening_hu: float
    holder: bool
    cut_vertex_mm: float | None     # from the brain's top; None: the whole head is covered
    cut_base_mm: float | None       # from the brain's bottom
    scalp_trim_mm: float = 0.0
    deformation_asymmetry: float = 1.0  # one-sided share of the deformation (1: as symmetric as noise)

    def as_dict(self) -> dict:
        return asdict(self)


def draw(modality: str, rng: np.random.Generator) -> Appearance:
    """One head's appearance, uniform within the documented ranges."""
    if modality not in RANGES:
        raise ValueError(f"modality: expected 'CT' or 'MR', got {modality!r}")
    r = RANGES[modality]

    def u(name: str, table: dict = r) -> float:
        return float(rng.uniform(*table[name]))

    if modality == "CT":
        gm, offset = u("gm"), u("offset")
        tissue = {"air": -1000.0 + offset, "gm": gm + offset, "wm": gm - u("gm_minus_wm") + offset,
                  "csf": u("csf") + offset, "scalp": u("scalp") + offset, "fat": u("fat") + offset,
                  "skull_table": u("skull_table"), "skull_diploe": u("skull_diploe")}
        noise, corr, bias = u("noise_at_5mm"), u("noise_corr_mm"), float(rng.uniform(0.0, 4.0))
        streak, hardening = u("streak_hu") * float(rng.random() < 0.5), u("beam_hardening_hu")
        holder = bool(rng.random() < 0.7)
    else:
        wm = u("wm")
        tissue = {"air": 0.0, "wm": wm, "gm": wm * u("gm_ratio"), "csf": wm * u("csf_ratio"),
                  "scalp": wm * u("scalp_ratio"), "fat": wm * u("fat_ratio"), "skull_table": wm * u("table_ratio"),
                  "skull_diploe": wm * u("diploe_ratio")}
        noise, corr, bias = wm * u("noise_ratio"), 0.0, u("bias")
        streak, hardening, holder = 0.0, 0.0, False
    inplane = u("inplane_mm", ANATOMY)
    if rng.random() < 0.7:
        thick = u("slice_mm", ANATOMY)
    else:  # a 3D isotropic scan; below 1 mm it would only cost time at the 2.3 mm model grid
        inplane = thick = max(inplane, 1.0)
    if modality == "CT":  # thinner slices, fewer photons per voxel
        noise *= math.sqrt(NOISE_REFERENCE_SLICE_MM / thick)
    return Appearance(
        modality=modality, tissue=tissue, deformation_mm=u("deformation_mm", ANATOMY),
        axis_scale=tuple(float(v) for v in rng.uniform(*ANATOMY["axis_scale"], 3)),  # type: ignore[arg-type]
        skull_mm=u("skull_mm", ANATOMY), spacing_mm=(inplane, inplane, thick), blur_mm=u("blur_mm", ANATOMY),
        noise=noise, noise_corr_mm=corr, bias=bias, streak_hu=streak, beam_hardening_hu=hardening, holder=holder,
        cut_vertex_mm=u("vertex_cut_mm", ANATOMY) if rng.random() < 0.3 else None,
        cut_base_mm=u("base_cut_mm", ANATOMY) if rng.random() < 0.5 else None,
        scalp_trim_mm=u("scalp_trim_mm", ANATOMY),
        deformation_asymmetry=u("deformation_asymmetry", ANATOMY),  # drawn last: earlier draws keep their values
    )


@functools.lru_cache(maxsize=1)
def scalp_depth() -> np.ndarray:
    """mm from the skin inward, inside the head (once per process)."""
    return ndimage.distance_transform_edt(templates.tissue_maps().head).astype(np.float32)


@functools.lru_cache(maxsize=1)
def brain_distance() -> np.ndarray:
    """mm from the brain outward (once per process): the skull's inner table is at 0."""
    return ndimage.distance_transform_edt(~templates.tissue_maps().brain).astype(np.float32)


def scalp_trim(appearance: Appearance) -> np.ndarray:
    """mm of scalp trimmed at each voxel: the drawn trim, but never leaving less than
    MIN_SCALP_MM over the outer table. The template's scalp is 1.5-2.6 mm thinner on one
    side, and a full trim there put the skin on the bone, which no real head has (the real
    T1 keeps 10 mm from brain to skin there)."""
    depth = scalp_depth()
    # Scalp thickness through this voxel: to the skin plus to the outer table.
    thickness = depth + brain_distance() - appearance.skull_mm
    return np.clip(np.minimum(appearance.scalp_trim_mm, thickness - MIN_SCALP_MM), 0.0, None)


def compose(gm: np.ndarray, wm: np.ndarray, appearance: Appearance, fat_depth_mm: tuple[float, float]) -> np.ndarray:
    """Tissue fractions -> intensities on the MNI base grid, with this head's values and skull."""
    maps = templates.tissue_maps()
    values = appearance.tissue
    image = np.full(gm.shape, values["air"], dtype=np.float32)
    depth = scalp_depth()
    trim = scalp_trim(appearance)
    image[maps.head & (depth > trim)] = values["scalp"]
    fat = (maps.head & (depth >= trim + fat_depth_mm[0]) & (depth < trim + fat_depth_mm[1])
           & (maps.skull_depth < 0) & ~maps.brain)
    image[fat] = values["fat"]
    # A thinner skull than the template's leaves soft tissue where the outer table was.
    in_skull = (maps.skull_depth >= 0) & (maps.skull_depth < appearance.skull_mm)
    # Dense inner and outer tables take most of the skull; diploe only its middle.
    profile = np.sqrt(np.abs(2.0 * maps.skull_depth[in_skull] / appearance.skull_mm - 1.0))
    image[in_skull] = values["skull_diploe"] + (values["skull_table"] - values["skull_diploe"]) * profile
    csf = np.clip(maps.brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    image[maps.brain] = (csf * values["csf"] + gm * values["gm"] + wm * values["wm"])[maps.brain]
    return image


def deformation(appearance: Appearance, rng: np.random.Generator) -> sitk.Transform:
    """A smooth random displacement on the MNI base grid (a coarse field, linearly
    interpolated): mostly mirror-symmetric across the midline, as healthy heads are, with
    a one-sided part of `appearance.deformation_asymmetry` of the symmetric one."""
    ref = templates.tissue_maps().reference
    size = [int(math.ceil(s * sp / CONTROL_SPACING_MM)) + 3 for s, sp in zip(ref.GetSize(), ref.GetSpacing())]
    field = ndimage.gaussian_filter(rng.normal(0.0, 1.0, size=(*size[::-1], 3)), sigma=(0.7, 0.7, 0.7, 0.0))
    # Mirror across x = 0 (the MNI midline): x-displacements change sign, y and z do not.
    mirrored = field[:, :, ::-1, :] * np.array([-1.0, 1.0, 1.0])
    symmetric, one_sided = (field + mirrored) / 2.0, (field - mirrored) / 2.0
    field = (symmetric / max(float(symmetric.std()), 1e-6)
             + appearance.deformation_asymmetry * one_sided / max(float(one_sided.std()), 1e-6))
    field *= appearance.deformation_mm / max(float(field.std()), 1e-6)
    image = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    image.SetSpacing((CONTROL_SPACING_MM,) * 3)
    # Control points symmetric about x = 0, so the mirror above is the anatomical one.
    origin = [o - CONTROL_SPACING_MM for o in ref.GetOrigin()]
    origin[0] = -(size[0] - 1) / 2.0 * CONTROL_SPACING_MM
    image.SetOrigin(tuple(origin))
    transform = sitk.DisplacementFieldTransform(image)
    transform.SetInterpolator(sitk.sitkLinear)
    return transform


def shape_transform(appearance: Appearance, center: tuple[float, float, float]) -> sitk.AffineTransform:
    """Per-axis head scaling about the head centre (broad, long or tall heads)."""
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(np.diag(appearance.axis_scale).ravel()))
    affine.SetCenter(center)
    return affine


def smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    """A low-frequency random field in [-1, 1] (bias fields, non-uniformity)."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells, cells))
    # Cubic up to a quarter of the grid, then linear: the field is smooth anyway and a
    # cubic zoom of the whole grid cost a third of a head's build time.
    middle = [max(cells, n // 4) for n in shape]
    field = ndimage.zoom(coarse, [m / cells for m in middle], order=3, mode="nearest")
    field = ndimage.zoom(field, [n / f for n, f in zip(shape, field.shape)], order=1, mode="nearest")
    field = field[: shape[0], : shape[1], : shape[2]]
    pad = [(0, max(0, n - f)) for n, f in zip(shape, field.shape)]
    field = np.pad(field, pad, mode="edge")
    return np.clip(field / max(float(np.abs(field).max()), 1e-6), -1.0, 1.0).astype(np.float32)


def acquire_and_sample(fine: sitk.Image, final: sitk.Image, appearance: Appearance, rng: np.random.Generator,
                       brain_rows: tuple[int, int] | None = None) -> sitk.Image:
    """Scanner effects: the slice profile and partial-volume blur on a fine grid, then
    sampling at the slice spacing, then on the final grid non-uniformity, CT beam
    hardening and streaks, a head holder, partial coverage (cut relative to the
    brain's lowest and highest slice, `brain_rows`), and last the textured noise,
    so cut slices are as noisy as any air."""
    sigma_mm = [max(appearance.blur_mm, 0.01), max(appearance.blur_mm, 0.01),
                max(appearance.spacing_mm[2] / 2.355, 0.01)]
    blurred = sitk.SmoothingRecursiveGaussian(fine, [float(s) for s in sigma_mm])
    image = sitk.Resample(blurred, final, sitk.Transform(), sitk.sitkLinear, appearance.tissue["air"], sitk.sitkFloat32)
    spacing = np.asarray(image.GetSpacing())
    values = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    ct = appearance.modality == "CT"
    air = appearance.tissue["air"]
    head = values > (air + (300.0 if ct else 0.05 * appearance.tissue["wm"]))
    if ct:
        values += appearance.bias * smooth_field(values.shape, rng) * head
        _beam_hardening(values, head, appearance, rng, (float(spacing[2]), float(spacing[1]), float(spacing[0])))
        _streaks(values, head, appearance, rng)
        if appearance.holder:
            _head_holder(values, head, spacing, rng)
        _cut_coverage(values, brain_rows, spacing, appearance, air)
        values += _correlated_noise(values.shape, spacing, appearance, rng)
    else:
        values *= 1.0 + appearance.bias * smooth_field(values.shape, rng)
        _cut_coverage(values, brain_rows, spacing, appearance, air)
        real = values + rng.normal(0.0, appearance.noise, values.shape).astype(np.float32)
        imaginary = rng.normal(0.0, appearance.noise, values.shape).astype(np.float32)
        values = np.sqrt(real * real + imaginary * imaginary)
    out = sitk.GetImageFromArray(values.astype(np.float32))
    out.CopyInformation(image)
    return out


def _correlated_noise(shape: tuple[int, ...], spacing: np.ndarray, appearance: Appearance,
                      rng: np.random.Generator) -> np.ndarray:
    """In-plane correlated noise of the given brain SD: filtered back-projection noise
    has little power at the lowest frequencies and a kernel-shaped fall-off above."""
    white = rng.normal(0.0, 1.0, shape).astype(np.float32)
    sigma_px = appearance.noise_corr_mm / spacing[:2][::-1]
    smooth = ndimage.gaussian_filter(white, sigma=(0.0, *sigma_px))
    ramp = smooth - ndimage.gaussian_filter(smooth, sigma=(0.0, *(4.0 * sigma_px)))
    return (ramp * (appearance.noise / max(float(ramp.std()), 1e-6))).astype(np.float32)


BEAM_HARDENING_REACH_MM = (3.0, 6.0, 6.0)  # (z, y, x): how far the dark band reaches from dense bone


def _beam_hardening(values: np.ndarray, head: np.ndarray, appearance: Appearance, rng: np.random.Generator,
                    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
    """Darker brain next to dense bone in the lower third of the head (posterior fossa)."""
    if appearance.beam_hardening_hu <= 0:
        return
    rows = np.flatnonzero(head.any(axis=(1, 2)))
    if rows.size == 0:
        return
    low = rows[0] + (rows[-1] - rows[0]) // 3
    bone = values > 600.0
    sigma_voxels = np.asarray(BEAM_HARDENING_REACH_MM) / np.asarray(spacing_zyx)
    near = ndimage.gaussian_filter(bone[: low + 1].astype(np.float32), sigma=tuple(sigma_voxels))
    values[: low + 1] -= appearance.beam_hardening_hu * np.clip(near * 2.0, 0.0, 1.0) * ~bone[: low + 1]


def _streaks(values: np.ndarray, head: np.ndarray, appearance: Appearance, rng: np.random.Generator) -> None:
    """Thin bright/dark lines through a few slices (photon starvation, motion)."""
    if appearance.streak_hu <= 0:
        return
    n_z, n_y, n_x = values.shape
    yy, xx = np.mgrid[0:n_y, 0:n_x].astype(np.float32)
    for k in rng.choice(n_z, size=min(n_z, int(rng.integers(3, 12))), replace=False):
        angle = float(rng.uniform(0.0, math.pi))
        cy, cx = n_y / 2.0 + rng.normal(0, n_y / 10), n_x / 2.0 + rng.normal(0, n_x / 10)
        distance = np.abs((yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        values[k] += sign * appearance.streak_hu * np.exp(-0.5 * (distance / 1.5) ** 2) * head[k]


def _head_holder(values: np.ndarray, head: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> None:
    """A curved carbon-fibre or foam rest behind the occiput (posterior is +y in LPS rows)."""
    columns = np.flatnonzero(head.any(axis=(0, 2)))
    if columns.size == 0:
        return
    back = columns[-1]
    gap = int(round(rng.uniform(2.0, 8.0) / spacing[1]))
    thickness = max(1, int(round(rng.uniform(3.0, 8.0) / spacing[1])))
    hu = float(rng.uniform(-300.0, 150.0))
    n_z, n_y, n_x = values.shape
    xx = np.arange(n_x) - n_x / 2.0
    curve = ((xx * spacing[0]) ** 2 / 400.0 / spacing[1]).astype(int)  # a shallow cradle
    for x in range(n_x):
        y0 = back + gap - curve[x]
        y1 = min(n_y, y0 + thickness)
        if 0 <= y0 < n_y:
            column = values[:, y0:y1, x]
            values[:, y0:y1, x] = np.where(column < -500.0, hu, column)


def _cut_coverage(values: np.ndarray, brain_rows: tuple[int, int] | None, spacing: np.ndarray,
                  appearance: Appearance, air: float) -> None:
    """Slices beyond the scanned range become air. Cuts count from the brain's first
    and last slice (positive: beyond the brain, negative: into it)."""
    if brain_rows is None:
        return
    bottom, top = brain_rows
    if appearance.cut_base_mm is not None:
        values[: max(0, bottom - int(round(appearance.cut_base_mm / spacing[2])))] = air
    if appearance.cut_vertex_mm is not None:
        values[max(0, top + 1 + int(round(appearance.cut_vertex_mm / spacing[2]))):] = air
