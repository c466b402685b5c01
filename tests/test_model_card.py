"""Figures recorded into a bundle after training (bench/quality.py and bench/real_scans.py --record)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from headscreen.bundle import MANIFEST_NAME, load_bundle
from headscreen.model_training.model_card import record_metrics

ROOT = Path(__file__).resolve().parents[1]
CT_BUNDLE = next(p for p in sorted((ROOT / "models").iterdir()) if p.name.startswith("ct-fanogan-compact-"))

SUITE = {
    "command": "bench/quality.py --bundle models/x --cases 4 --normals 12 --record", "seed": 4242, "n_normal": 12,
    "normals_flagged_by_qc": 1,
    "per_type": {
        "infarct": {"n": 4, "system": {"auroc": {"value": 0.75, "ci95": [0.25, 1.0]}},
                    "model_only": {"auroc": {"value": 0.5, "ci95": [0.125, 0.875]}}, "qc_caught": 0},
        "truncated": {"n": 4, "system": {"n_abnormal": 4}, "model_only": {}, "qc_caught": 4},
    },
    "targets": [{"name": "hemorrhage >= 5 mL AUROC >= 0.95", "text": "system 0.900 [0.80, 1.00]: MISSED"}],
}


def test_recorded_suite_figures_reach_manifest_and_card_and_leave_the_model_files_alone(tmp_path: Path) -> None:
    bundle_dir = tmp_path / CT_BUNDLE.name
    shutil.copytree(CT_BUNDLE, bundle_dir)
    before = load_bundle(bundle_dir)

    record_metrics(bundle_dir, "synthetic_suite", SUITE)

    after = load_bundle(bundle_dir)  # verifies every listed file's hash
    assert after.manifest.metrics["synthetic_suite"] == SUITE
    assert after.manifest.calibration == before.manifest.calibration
    raw = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    assert raw["files"] == json.loads((CT_BUNDLE / MANIFEST_NAME).read_text())["files"]
    card = (bundle_dir / "MODEL_CARD.md").read_text()
    suite = card.split("## Measured on the synthetic anomaly suite (`bench/quality.py`)")[1].split("\n## ")[0]
    assert "| infarct | 4 | 0.750 [0.25, 1.00] | 0.500 [0.12, 0.88] | 0/4 |" in suite
    assert "| truncated | 4 | n/a | n/a | 4/4 |" in suite
    assert "12 healthy heads (1 refused by QC)" in suite
    assert "- Target hemorrhage >= 5 mL AUROC >= 0.95: system 0.900 [0.80, 1.00]: MISSED" in suite
    assert card.index("synthetic anomaly suite") < card.index("## Measured on real scans")


def test_a_card_without_suite_figures_says_they_were_not_recorded(tmp_path: Path) -> None:
    bundle_dir = tmp_path / CT_BUNDLE.name
    shutil.copytree(CT_BUNDLE, bundle_dir)
    raw = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    raw["metrics"].pop("synthetic_suite", None)
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(raw))

    record_metrics(bundle_dir, "other", {})

    card = (bundle_dir / "MODEL_CARD.md").read_text()
    assert "Not recorded for this bundle (`bench/quality.py --record`)." in card
