"""Model bundles: a folder with ONNX file(s) and a manifest that describes them.

The trainer writes bundles (`write_bundle`); the daemon only reads them
(`load_bundle`) and refuses any bundle whose schema it does not know or whose
files do not match the sha256 recorded in the manifest. Torch-free on purpose.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from headscreen.durable import atomic_write
from headscreen.errors import BundleError
from headscreen.scores import DEFAULT_SEG_THRESHOLD, MASKED_TERMS, Normative

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Files a bundle keeps for training (fine-tuning, the learning curves) that serving never
# reads: a serving copy (the bundles packaged in the wheel) leaves them out. When present
# they are verified like the others.
TRAINING_ONLY_FILES = frozenset({"weights.pt", "training_metrics.csv"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    name: str = "image"
    shape: list[int] = Field(description="[channels, D, H, W] of one sample")


class OutputSpec(_Strict):
    error_map: str = "error_map"
    age: str | None = None


class ScoreSpec(_Strict):
    terms: dict[str, float] = Field(description="term -> weight: an ONNX output, or a masked term of headscreen.scores")
    age_gap_weight: float = 0.0
    definition: str = ""


class Calibration(_Strict):
    reference_scores: list[float]
    threshold: float
    specificity: float = 0.95
    error_map_scale: float = Field(gt=0, description="healthy voxel-error 99th percentile")
    n: int
    seg_threshold: float | None = Field(None, gt=0, description="SEG threshold in overlay units, calibrated "
                                        "on healthy scans; absent: scores.DEFAULT_SEG_THRESHOLD")
    seg_grow: float | None = Field(None, gt=0, le=1, description="SEG regions grow from voxels at the "
                                   "threshold through connected voxels at this fraction of it (export.seg); "
                                   "absent: 1, no growth")

    @field_validator("reference_scores")
    @classmethod
    def _sorted_and_nonempty(cls, scores: list[float]) -> list[float]:
        if not scores:
            raise ValueError("reference_scores must not be empty")
        return sorted(scores)


class NormativeSpec(_Strict):
    """The healthy per-voxel error model (headscreen.scores) that masked terms and the overlay use."""

    file: str = Field(description="npz with per-voxel mean, SD and support on the model grid")
    definition: str = ""


class AgeSpec(_Strict):
    supported: bool = False
    validation_mae: float | None = None


class Manifest(BaseModel):
    """The single source of a bundle's preprocessing, scoring and calibration."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    modality: Literal["CT", "MR"]
    method: Literal["f-anogan-3d", "vae-3d-age"]
    description: str = ""
    model_file: str = "model.onnx"
    input: InputSpec
    preprocessing: dict[str, Any]
    outputs: OutputSpec = OutputSpec()
    score: ScoreSpec
    calibration: Calibration
    age: AgeSpec = AgeSpec()
    normative: NormativeSpec | None = None
    training: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    files: dict[str, str] = {}

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def sha256(self) -> str:
        """The ONNX file's hash: what the results name as the algorithm's identity."""
        return self.manifest.files[self.manifest.model_file]

    @functools.cached_property
    def normative(self) -> Normative | None:
        spec = self.manifest.normative
        return None if spec is None else Normative.load(self.path / spec.file)

    def percentile(self, score: float) -> float:
        """Percent of healthy reference scores at or below `score`."""
        ref = self.manifest.calibration.reference_scores
        return 100.0 * bisect.bisect_right(ref, score) / len(ref)

    def screen_positive(self, score: float) -> bool:
        return score > self.manifest.calibration.threshold

    def seg_threshold(self, configured: float | None = None) -> float:
        """The SEG threshold: the site's configured one, else the bundle's calibrated one."""
        if configured is not None:
            return configured
        return self.manifest.calibration.seg_threshold or DEFAULT_SEG_THRESHOLD

    def seg_grow(self) -> float:
        """The fraction of the SEG threshold its regions grow to (calibrated with it)."""
        return self.manifest.calibration.seg_grow or 1.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bundle(directory: Path, manifest: Manifest) -> Path:
    """Record the hash of every file in `directory` and write the manifest."""
    directory = Path(directory)
    if not (directory / manifest.model_file).is_file():
        raise BundleError(f"model_file {manifest.model_file!r} is missing from {directory}")
    files = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".md")
    }
    final = manifest.model_copy(update={"files": files, "schema_version": SCHEMA_VERSION})
    path = directory / MANIFEST_NAME
    # The manifest is written last and whole: a bundle without one is not a bundle.
    atomic_write(path, (json.dumps(final.model_dump(mode="json"), indent=2) + "\n").encode())
    return path


def load_bundle(directory: Path) -> Bundle:
    """Read and verify a bundle; raise BundleError saying exactly what is wrong."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such bundle folder")
    try:
        raw = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{directory}: no {MANIFEST_NAME}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"{manifest_path}: unknown schema_version {version!r} (expected {SCHEMA_VERSION})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{manifest_path}: invalid manifest: {exc}") from None
    masked = set(manifest.score.terms) & set(MASKED_TERMS)
    if masked and manifest.normative is None:
        raise BundleError(f"{manifest_path}: score terms {sorted(masked)} need a normative section")
    if manifest.model_file not in manifest.files:
        raise BundleError(f"{manifest_path}: no hash recorded for {manifest.model_file}")
    for name, expected in manifest.files.items():
        file_path = directory / name
        if not file_path.is_file():
            if name in TRAINING_ONLY_FILES and name != manifest.model_file:
                log.debug("bundle without a training-only file", extra={"bundle": manifest.key, "file": name})
                continue
            raise BundleError(f"{directory}: file {name} listed in the manifest is missing")
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleError(f"{directory}: {name} does not match its sha256 (tampered or corrupt)")
    log.info("bundle loaded", extra={"bundle": manifest.key, "sha256": manifest.files[manifest.model_file]})
    return Bundle(path=directory, manifest=manifest)


def discover_bundles(root: Path) -> list[Path]:
    """Bundle folders directly under `root` (those holding a manifest)."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file()) if root.is_dir() else []
