"""The SEG of the shipped CT bundle on phantoms (issue 13): a healthy head marks under 1 mL,
a 20 mL hemorrhage is found with Dice >= 0.5. Evidence about phantoms only: the real-scan
protocol (bench/real_scans.py, tests/test_real_scans.py) judges real heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from headscreen.bundle import load_bundle
from headscreen.export.seg import IndexBox, anomaly_mask
from headscreen.imaging.phantoms import Lesion, Pose, make_head
from headscreen.imaging.preprocess import native_focus, preprocess, to_native, with_defaults
from headscreen.imaging.skullstrip import dice
from headscreen.imaging.volume import Volume
from headscreen.inference import BundleRunner

MODELS = Path(__file__).resolve().parents[1] / "models"
POSE = Pose((4.0, -3.0, 5.0), (3.0, -2.0, 4.0))


@pytest.fixture(scope="module")
def ct_runner() -> BundleRunner:
    return BundleRunner(load_bundle(next(p for p in sorted(MODELS.iterdir()) if p.name.startswith("ct-"))))


def _seg_of(runner: BundleRunner, lesion: Lesion | None, seed: int
            ) -> tuple[np.ndarray, np.ndarray, float, IndexBox | None]:
    """The SEG mask the daemon would send (pipeline: brain-masked map, bundle threshold and
    growth, regions >= 0.5 mL, and a positive result's focus), the true lesion on the same
    grid, the voxel volume in mL and the focus (None unless positive)."""
    head = make_head("CT", age=55.0, seed=seed, pose=POSE, lesion=lesion, randomise=True)
    volume = Volume.from_image(head.image, "CT")
    prepared = preprocess(volume, with_defaults(runner.bundle.manifest.preprocessing))
    assert not prepared.qc_reasons, prepared.qc_reasons
    inference = runner.run(prepared.model_input, 55.0, brain_mask=prepared.brain_mask)
    brain_error = np.where(prepared.brain_mask, inference.error_map, 0.0).astype(np.float32)
    voxel_ml = float(np.prod(volume.image.GetSpacing())) / 1000.0
    focus = native_focus(brain_error, prepared, volume) if inference.screen_positive else None
    seg = anomaly_mask(to_native(brain_error, prepared, volume), runner.bundle.seg_threshold(), voxel_ml,
                       grow=runner.bundle.seg_grow(), focus=focus)
    return seg, sitk.GetArrayFromImage(head.lesion_mask) > 0, voxel_ml, focus


def test_a_healthy_phantom_gets_an_empty_or_tiny_seg(ct_runner: BundleRunner) -> None:
    seg, _, voxel_ml, focus = _seg_of(ct_runner, None, seed=1)
    assert focus is None  # screen negative
    print(f"healthy phantom SEG {float(seg.sum()) * voxel_ml:.2f} mL")
    assert float(seg.sum()) * voxel_ml < 1.0


def test_a_20_ml_hemorrhage_phantom_is_segmented(ct_runner: BundleRunner) -> None:
    seg, truth, voxel_ml, focus = _seg_of(ct_runner, Lesion("hemorrhage", volume_ml=20.0), seed=2)
    # Positive, and its focal maximum lies on the lesion.
    assert focus is not None
    (z0, y0, x0), (z1, y1, x1) = focus
    assert truth[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1].any(), focus
    assert truth.sum() * voxel_ml == pytest.approx(20.0, rel=0.25)
    print(f"20 mL hemorrhage phantom SEG {float(seg.sum()) * voxel_ml:.2f} mL, Dice {dice(seg, truth):.2f}")
    assert dice(seg, truth) >= 0.5, (float(seg.sum()) * voxel_ml, dice(seg, truth))
