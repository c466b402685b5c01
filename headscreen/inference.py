"""ONNX Runtime inference driven by a bundle's manifest (one session per bundle)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from headscreen.bundle import Bundle, Manifest
from headscreen.errors import BundleError
from headscreen.scores import MASKED_TERMS, masked_terms, uses_asymmetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inference:
    anomaly_score: float
    terms: dict[str, float]
    percentile: float
    screen_positive: bool
    threshold: float
    predicted_age: float | None
    chronological_age: float | None
    age_gap: float | None
    # Model grid (D, H, W), in units of the healthy limit: with a normative model the
    # positive z inside the scored brain over the healthy 99.9th percentile of z,
    # otherwise the raw error over the healthy 99th percentile of error.
    error_map: np.ndarray
    notes: tuple[str, ...] = ()
    # The network's own error map on the model grid, before any normative model (benchmarks
    # read it to see how strongly the network itself sees a finding).
    raw_error: np.ndarray | None = None


PLAUSIBLE_AGE_YEARS = (0.0, 120.0)


def map_unit_of(manifest: Manifest) -> str:
    """What the error map sent to export is (export.sc MAP_UNITS): the raw error without a
    normative model, the one-sided z when the score weighs asymmetry, else the z."""
    if manifest.normative is None:
        return "error"
    return "z_one_sided" if uses_asymmetry(manifest.score.terms) else "z"


def pick_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, CPU otherwise."""
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or available


class BundleRunner:
    """Loads a bundle's ONNX graph once and turns model input into scores."""

    def __init__(self, bundle: Bundle, intra_op_threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        self.bundle = bundle
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or min(4, os.cpu_count() or 1)
        # Idle pool threads sleep instead of spinning: they share the cores with the receiver
        # (a 2-thread MR run: 52 instead of 73 ms of CPU, the same wall time).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Without the arena the activations are freed after each run (~40 MB per bundle
        # held otherwise, for a run of a few hundredths of a second).
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(
            str(bundle.model_path), sess_options=options, providers=providers or pick_providers()
        )
        self._check_outputs()

    def _check_outputs(self) -> None:
        manifest = self.bundle.manifest
        names = {o.name for o in self.session.get_outputs()}
        wanted = {manifest.outputs.error_map, *(t for t in manifest.score.terms if t not in MASKED_TERMS)}
        if manifest.outputs.age:
            wanted.add(manifest.outputs.age)
        missing = wanted - names
        if missing:
            raise BundleError(f"{manifest.key}: ONNX graph lacks outputs {sorted(missing)}")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, model_input: np.ndarray, chronological_age: float | None,
            brain_mask: np.ndarray | None = None) -> Inference:
        """Score one preprocessed volume. `brain_mask` (model grid) is the case's own
        brain; a bundle with a normative model scores only inside it."""
        manifest = self.bundle.manifest
        expected = tuple(manifest.input.shape[1:])
        if model_input.shape != expected:
            raise BundleError(f"{manifest.key}: model input {model_input.shape} != manifest grid {expected}")
        batch = np.ascontiguousarray(model_input, dtype=np.float32)[None, None]
        names = [o.name for o in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(names, {manifest.input.name: batch})))

        terms = {name: float(value.reshape(-1)[0]) for name, value in outputs.items()
                 if name not in (manifest.outputs.error_map, manifest.outputs.age)}
        raw_error = outputs[manifest.outputs.error_map][0, 0]
        normative = self.bundle.normative
        if normative is not None:
            mask = normative.support if brain_mask is None else brain_mask
            try:
                masked, error_map = masked_terms(raw_error, mask, normative,
                                                 one_sided=uses_asymmetry(manifest.score.terms))
            except ValueError as exc:
                raise BundleError(f"{manifest.key}: {exc}") from None
            terms.update(masked)
        else:
            error_map = raw_error / manifest.calibration.error_map_scale
        score = sum(weight * terms[name] for name, weight in manifest.score.terms.items())
        predicted_age = float(outputs[manifest.outputs.age].reshape(-1)[0]) if manifest.outputs.age else None
        age_gap = None
        notes: list[str] = []
        if predicted_age is not None and chronological_age is not None:
            age_gap = predicted_age - chronological_age
            score += manifest.score.age_gap_weight * abs(age_gap)
        elif predicted_age is not None and manifest.score.age_gap_weight:
            notes.append("chronological age absent: anomaly score excludes the age-gap term")
        if predicted_age is not None and not PLAUSIBLE_AGE_YEARS[0] <= predicted_age <= PLAUSIBLE_AGE_YEARS[1]:
            # A scan unlike anything in training (a large lesion, artefacts) can drive the
            # age head anywhere; the score keeps the gap, the report shows no impossible age.
            notes.append(f"brain_age_implausible: estimate {predicted_age:.0f} years outside "
                         f"{PLAUSIBLE_AGE_YEARS[0]:g}-{PLAUSIBLE_AGE_YEARS[1]:g}, not reported")
            predicted_age, age_gap = None, None

        return Inference(
            anomaly_score=float(score),
            terms=terms,
            percentile=self.bundle.percentile(score),
            screen_positive=self.bundle.screen_positive(score),
            threshold=manifest.calibration.threshold,
            predicted_age=predicted_age,
            chronological_age=chronological_age,
            age_gap=age_gap,
            error_map=error_map.astype(np.float32),
            notes=tuple(notes),
            raw_error=raw_error,
        )
