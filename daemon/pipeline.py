"""One screening job, from the stored instances to the DICOM result files.

The whole pipeline is visible in `run_job`: select a series, load it as a
volume, preprocess it as the bundle's manifest says, infer, take the error map
back to the native slices, and build the Secondary Capture overlays and the
Structured Report. Bad input never raises out of here: it becomes a result that
says the study was not eligible, and why, so silence is never mistaken for a
normal result. A blocking QC reason (imaging.qc.BLOCKING) makes the study not
eligible too: then no score, overlay or SEG goes out, only the SR and one plain
"NOT SCREENED" image. The percentile and screen result of an eligible study are
judged against the healthy reference of its scanner (daemon.reference): the
bundle's own, a site reference, or none yet ("calibrating": score only, no SEG).
A shadow bundle (daemon.shadow) goes through `score_shadow`: the same stages up to
the verdict, reusing the study's stages via SharedStages, and no DICOM object.

Input errors (headscreen.errors.is_input_error: a header value pydicom or highdicom cannot
decode or will not accept) are bad input too: an instance whose geometry or pixels do
not decode is left out of its series and counted (imaging.selection), the results are
built from sanitised copies of the source headers (export.sanitise), and anything that
still fails on a value ends as a not-eligible result (`not_screened_after_error`). The
not-eligible path reads only sanitised headers, so it cannot fail on a value either.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from headscreen.daemon.ages import chronological_age
from headscreen.daemon.reference import Calibrating, Reference, ReferencePolicy, scoring_identity, station_key
from headscreen.db.api import JobOutcome, JobTicket, OutputObject, ShadowOutcome
from headscreen.durable import atomic_write, fsync_directory, write_synced
from headscreen.errors import DECODE_ERRORS, InputRejected, TransientError, is_input_error
from headscreen.export.kos import build_rejection_note
from headscreen.export.model import AlgorithmInfo, ResultSummary
from headscreen.export.pm import build_parametric_map
from headscreen.export.sanitise import TYPE2, ReferenceCopies, reference_copies, sanitise_sources
from headscreen.export.sc import OverlayStyle, build_not_screened_image, build_overlay_series, choose_slices
from headscreen.export.seg import DEFAULT_THRESHOLD, IndexBox, build_segmentation, missing_for_seg
from headscreen.export.sr import ReferenceNote, build_report
from headscreen.figures import ResultFigures
from headscreen.imaging import concurrency
from headscreen.imaging.native_map import NativeMap
from headscreen.imaging.preprocess import Preprocessed, native_focus, preprocess, to_native_map, with_defaults
from headscreen.imaging.qc import blocking_reasons
from headscreen.imaging.selection import (
    EXCLUDED_UNREADABLE,
    SelectionRules,
    SeriesCandidate,
    exclusion_note,
    select_series,
    usable_files,
    usable_instances,
)
from headscreen.imaging.volume import Volume, load_series, read_header, release_pixels
from headscreen.inference import BundleRunner, Inference, map_unit_of
from headscreen.privacy import failure_reason, frames_only, scrub

log = logging.getLogger(__name__)

# A series that does not load: an input problem or pixels that do not decode.
_LOAD_ERRORS: tuple[type[BaseException], ...] = (InputRejected, *DECODE_ERRORS)

# The map reaches export in multiples of the bundle's healthy limit (headscreen.inference:
# positive z over the healthy 99.9th percentile of z, or error over the healthy 99th
# percentile), so one fixed scale means the same on every study: below 1 is within
# the healthy range and stays grey, 3 and above is full red.
OVERLAY_STYLE = OverlayStyle(error_lower=1.0, error_upper=3.0)

# Without a policy every score is judged against the bundle's own reference.
BUNDLE_REFERENCES = ReferencePolicy()

_FAMILY = {"f-anogan-3d": "3D f-AnoGAN (unsupervised anomaly detection)", "vae-3d-age": "3D VAE with brain-age head"}


@dataclass
class StudyFiles:
    """A study's stored instances: series UID -> absolute file paths."""

    study_instance_uid: str
    series: dict[str, list[Path]]


@dataclass
class Timer:
    """Seconds per pipeline stage, recorded with the result. Stages measured side by side
    overlap (reference_copies with choose_slices), so they do not add up to the job's time."""

    stages: dict[str, float] = field(default_factory=dict)

    def measure(self, name: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - start, 4)


@dataclass
class StudyRead:
    """A study's headers, series selection, chronological age and loaded volume: the same for
    every bundle of its modality (selection rules are per modality, not per bundle)."""

    headers: dict[str, list[Dataset]]
    verdicts: list[dict]
    chosen: str | None
    age: float | None = None
    age_source: str = ""
    volume: Volume | None = None
    load_error: str | None = None  # why the chosen series could not be loaded (InputRejected)
    notes: list[str] = field(default_factory=list)  # advisory QC reasons of reading (instances left out)

    @property
    def no_series_reason(self) -> str:
        if not self.verdicts:
            return "no images"
        return "no suitable series: " + "; ".join(v["reason"] for v in self.verdicts)


class SharedStages:
    """The stages a study's bundles share within one job: headers, selection and the volume
    are read once; preprocessing runs once per set of preprocessing parameters, so a shadow
    bundle with the active bundle's parameters scores the very same model input."""

    def __init__(self, release_volume: bool = False) -> None:
        """`release_volume`: nothing preprocesses the volume a second time (no shadow bundle),
        so its voxels are dropped once preprocessed (imaging.volume.Volume.release_pixels)."""
        self._read: StudyRead | None = None
        self._prepared: dict[str, Preprocessed | InputRejected] = {}
        self._release_volume = release_volume

    def read(self, study: StudyFiles, rules: SelectionRules, timer: Timer,
             working_spacing_mm: float | None = None) -> StudyRead:
        """`working_spacing_mm`: the spacing the job's preprocessing shrinks the volume to;
        when nothing else preprocesses it, the series is decoded straight to that
        (load_series' shrink_to_mm), without the native voxels."""
        if self._read is None:
            self._read = _read_study(study, rules, timer,
                                     working_spacing_mm if self._release_volume else None)
        return self._read

    @property
    def last_read(self) -> StudyRead | None:
        """The study as read so far (None before the read is complete)."""
        return self._read

    def preprocess(self, volume: Volume, params: dict, timer: Timer) -> tuple[Preprocessed, bool]:
        """(preprocessed, reused); raises InputRejected again for parameters that rejected it."""
        key = json.dumps(params, sort_keys=True, default=str)
        reused = key in self._prepared
        if not reused:
            try:
                self._prepared[key] = timer.measure("preprocess", preprocess, volume, params)
            except InputRejected as exc:
                self._prepared[key] = exc
            if self._release_volume:
                volume.release_pixels()
        found = self._prepared[key]
        if isinstance(found, InputRejected):
            raise found
        return found, reused


def _read_study(study: StudyFiles, rules: SelectionRules, timer: Timer,
                shrink_to_mm: float | None = None) -> StudyRead:
    # Each file is parsed once: its pixel data stays in the file until the volume is built.
    headers = timer.measure("read_headers", _read_headers, study, True)
    # Once per series: selection counts what is left out, and the chosen series goes on without it.
    usable = {uid: usable_instances(h) for uid, h in headers.items() if h}
    candidates = [SeriesCandidate.from_datasets(headers[uid], found) for uid, found in usable.items()]
    selection = timer.measure("select", select_series, candidates, rules)
    for series_uid, datasets in headers.items():
        if series_uid != selection.chosen:
            _release_all(datasets)
    verdicts = [_verdict_dict(v) for v in selection.verdicts]
    read = StudyRead(headers, verdicts, selection.chosen)
    if selection.chosen is None:
        return read
    chosen = selection.chosen
    # Only the instances that decode go on (selection counted the others); a stored file
    # pydicom could not parse at all is left out too.
    stored = len(study.series.get(chosen, []))
    kept, excluded = usable[chosen][0], dict(usable[chosen][1])
    unparsed = stored - len(headers[chosen])
    if unparsed > 0:
        excluded = {EXCLUDED_UNREADABLE: unparsed, **excluded}
    headers[chosen] = kept
    first = kept[0]
    read.age, read.age_source = chronological_age(
        _text(first, "PatientAge"), _text(first, "PatientBirthDate"), _text(first, "StudyDate")
    )
    paths = [Path(ds.filename) for ds in kept]
    try:
        read.volume, read.load_error, unloadable = _load_volume(kept, paths, timer, shrink_to_mm)
    finally:
        _release_all(headers[chosen])  # what a failed load left (the instances left out too)
    if unloadable and read.volume is not None:
        loaded = set(read.volume.slice_sop_uids)
        headers[chosen] = [ds for ds in kept if _text(ds, "SOPInstanceUID") in loaded]
    for reason, count in unloadable.items():
        excluded[reason] = excluded.get(reason, 0) + count
    note = exclusion_note(excluded, stored)
    if note is not None:
        read.notes.append(note)
    return read


def _load_volume(headers: list[Dataset], paths: list[Path], timer: Timer,
                 shrink_to_mm: float | None = None) -> tuple[Volume | None, str | None, dict[str, int]]:
    """(volume, None, left out) or (None, why not, left out), from the headers read already
    (their pixel data is read now). When the series does not load, each file is checked and
    those whose pixels do not decode are left out before one more try."""
    try:
        return timer.measure("load_volume", load_series, headers, shrink_to_mm), None, {}
    except _LOAD_ERRORS as exc:
        failure: BaseException = exc
    try:
        good, bad = timer.measure("check_files", usable_files, paths)
    except OSError:
        raise TransientError("stored instance unreadable; storage not reachable?") from None
    if bad and good:
        try:
            return timer.measure("load_volume", load_series, good, shrink_to_mm), None, bad
        except _LOAD_ERRORS as exc:
            failure = exc
    if isinstance(failure, InputRejected):
        return None, scrub(str(failure)), bad  # our words, but they may quote a library's
    log.warning("series not loadable", extra={"error": failure_reason(failure)})
    return None, f"input_undecodable: the series could not be loaded ({type(failure).__name__})", bad


def run_job(
    ticket: JobTicket,
    study: StudyFiles,
    runner: BundleRunner,
    output_dir: Path,
    overlay_slices: int,
    rules: SelectionRules | None = None,
    seg_enabled: bool = True,
    seg_threshold: float | None = None,
    references: ReferencePolicy | None = None,
    shared: SharedStages | None = None,
    parametric_map_enabled: bool = False,
) -> JobOutcome:
    """`seg_threshold` None takes the bundle's calibrated one (Bundle.seg_threshold).
    `references` chooses the healthy reference per scanner (default: the bundle's own).
    `shared` keeps what shadow bundles of the study may reuse (see SharedStages).
    `parametric_map_enabled` adds the anomaly map as a Parametric Map (export.pm) to an
    eligible result judged against a reference (never while calibrating, as the SEG).
    An input error on the way gives a not-eligible result instead (`not_screened_after_error`)."""
    stages = shared if shared is not None else SharedStages(release_volume=True)
    try:
        return _screen(ticket, study, runner, output_dir, overlay_slices, rules, seg_enabled, seg_threshold,
                       references, stages, parametric_map_enabled)
    except Exception as exc:
        if not is_input_error(exc):
            raise
        return not_screened_after_error(ticket, study, runner, output_dir, exc, stages.last_read)


def _screen(
    ticket: JobTicket,
    study: StudyFiles,
    runner: BundleRunner,
    output_dir: Path,
    overlay_slices: int,
    rules: SelectionRules | None,
    seg_enabled: bool,
    seg_threshold: float | None,
    references: ReferencePolicy | None,
    stages: SharedStages,
    parametric_map_enabled: bool = False,
) -> JobOutcome:
    timer = Timer()
    manifest = runner.bundle.manifest
    read = stages.read(study, rules or SelectionRules.default_for(manifest.modality), timer,
                       float(with_defaults(manifest.preprocessing)["working_spacing_mm"]))
    headers, verdicts = read.headers, read.verdicts
    algorithm = _algorithm(runner)
    if read.chosen is None:
        return _ineligible(ticket, study, headers, read.no_series_reason, verdicts, algorithm, output_dir, timer)

    chosen = read.chosen
    first = headers[chosen][0]
    age, age_source = read.age, read.age_source
    if read.volume is None:
        return _ineligible(ticket, study, headers, read.load_error or "not loadable", verdicts, algorithm,
                           output_dir, timer, chosen, qc_reasons=read.notes)
    volume = read.volume
    try:
        prepared, _ = stages.preprocess(volume, manifest.preprocessing, timer)
    except InputRejected as exc:
        return _ineligible(ticket, study, headers, str(exc), verdicts, algorithm, output_dir, timer, chosen,
                           qc_reasons=[*read.notes, *volume.qc_reasons], qc_metrics=volume.qc_metrics,
                           slice_order=volume.slice_sop_uids)

    qc_reasons = list(dict.fromkeys([*read.notes, *volume.qc_reasons, *prepared.qc_reasons]))
    qc_metrics = {**volume.qc_metrics, **prepared.qc_metrics}
    # Decided before inference: the model never sees an untrustworthy input, so no
    # score can leak into a not-eligible result (and the time is saved).
    blocking = blocking_reasons(qc_reasons)
    if blocking:
        return _ineligible(ticket, study, headers, blocking, verdicts, algorithm, output_dir, timer, chosen,
                           qc_reasons=qc_reasons, qc_metrics=qc_metrics, slice_order=volume.slice_sop_uids)

    inference: Inference = timer.measure("infer", runner.run, prepared.model_input, age,
                                             brain_mask=prepared.brain_mask)
    qc_reasons = list(dict.fromkeys([*qc_reasons, *inference.notes]))
    blocking = blocking_reasons(qc_reasons)
    if blocking:  # a model note that says its own output cannot be trusted
        return _ineligible(ticket, study, headers, blocking, verdicts, algorithm, output_dir, timer, chosen,
                           qc_reasons=qc_reasons, qc_metrics=qc_metrics, slice_order=volume.slice_sop_uids)
    # Outside the brain the model input is a constant background, so residuals
    # there say nothing about the patient: only the brain is coloured.
    brain_error = np.where(prepared.brain_mask, inference.error_map, 0.0).astype(np.float32)
    # Resampled to the native slices only where it is read (imaging.preprocess.ResampledMap).
    native = timer.measure("to_native", to_native_map, brain_error, prepared, volume)

    # The percentile and screen result come from the reference of this scanner (the
    # bundle's own unless the site calibrated it); Inference keeps the bundle's.
    station = station_key(first)
    reference = timer.measure("reference", (references or BUNDLE_REFERENCES).choose, runner.bundle, station)
    if age is None:
        qc_reasons.append(f"chronological_age_{age_source}")
    figures = _screened(inference, reference, qc_reasons, qc_metrics, chosen)
    summary = ResultSummary(**figures.figures(), modality=manifest.modality, algorithm=algorithm)
    overlay_indices, copies_ahead = _overlay_slices_with_references(native, overlay_slices, volume,
                                                                    headers[chosen], timer)
    sources = timer.measure("read_pixels", _read_sources, headers[chosen], volume.slice_sop_uids, overlay_indices)
    # The results copy patient, study and equipment values: only ones that decode and validate.
    # Only the first slice and the overlay slices are copied from; the SEG and the SR place
    # or reference the others, which need their identity and geometry only.
    clean = timer.measure("sanitise", sanitise_sources, sources, {0, *overlay_indices}, copies_ahead)
    sources = clean.datasets
    note = ReferenceNote(kind=reference.kind, text=reference.describe(), legend=reference.legend())
    # No SEG or parametric map while calibrating: a region or map with no screen result
    # would read as a finding. Both are placed on the source geometry, which must be usable.
    calibrating = isinstance(reference, Calibrating)
    with_seg = seg_enabled and not calibrating
    with_pm = parametric_map_enabled and not calibrating
    missing = missing_for_seg(sources) if with_seg or with_pm else []
    if missing:
        if with_seg:
            qc_reasons.append(f"seg_not_built: the source series lacks a usable {', '.join(missing)}")
        if with_pm:
            log.info("parametric map not built: source geometry unusable",
                     extra={"job_id": ticket.job_id, "missing": missing})
        with_seg = with_pm = False
    if clean.note:
        qc_reasons.append(clean.note)
    summary = dataclasses.replace(summary, qc_reasons=list(dict.fromkeys(qc_reasons)))
    # A positive result's SEG also keeps what made it positive (export.seg.anomaly_mask).
    focus = native_focus(brain_error, prepared, volume) if with_seg and summary.screen_positive else None
    objects = timer.measure(
        "build_results", _build_results, sources, native, summary, overlay_indices, output_dir,
        runner.bundle.seg_threshold(seg_threshold) if with_seg else None, note,
        map_unit_of(manifest), with_pm, runner.bundle.seg_grow(), focus,
    )
    log.info(
        "job computed",
        extra={"job_id": ticket.job_id, "bundle": manifest.key, "score": inference.anomaly_score,
               "percentile": summary.percentile, "reference": reference.kind, "station": station,
               "timings": timer.stages},
    )
    outcome = _outcome(summary, verdicts, timer, objects)
    return dataclasses.replace(
        outcome, station_key=station, scoring_sha256=scoring_identity(runner.bundle), reference_kind=reference.kind,
        reference_id=reference.reference_id if isinstance(reference, Reference) else None,
    )


def _overlay_slices_with_references(native: NativeMap, overlay_slices: int, volume: Volume,
                                    series_headers: list[Dataset],
                                    timer: Timer) -> tuple[list[int], ReferenceCopies | None]:
    """The slices the overlays show and, beside them where this worker has a core to
    spare (imaging.concurrency), the reference-only copies that sanitising the sources
    needs next: pydicom work (GIL-bound) beside ITK's resampling for the slices' sums
    (which releases it). Only the headers are read, which the map does not touch.
    (clean_header silences warnings process-wide while it runs: the mapping gives none.)"""
    def chosen() -> list[int]:
        if overlay_slices == 0:
            return list(range(len(volume.slice_sop_uids)))
        return timer.measure("choose_slices", choose_slices, native, overlay_slices)

    if concurrency.threads() < 2:
        return chosen(), None
    ordered = _ordered_sources(series_headers, volume.slice_sop_uids)
    return concurrency.both(chosen, lambda: timer.measure("reference_copies", reference_copies, ordered))


def score_shadow(
    study: StudyFiles,
    runner: BundleRunner,
    shared: SharedStages,
    rules: SelectionRules | None = None,
    references: ReferencePolicy | None = None,
) -> ShadowOutcome:
    """What a shadow bundle makes of a study the active bundle has screened: the stages of
    `run_job` up to the verdict (QC gate, inference, its own healthy reference), sharing
    what `shared` already holds, and no DICOM object at all. Not eligible is a verdict
    too; anything else raises, for the worker to record as the shadow's failure."""
    timer = Timer()
    manifest = runner.bundle.manifest
    read = shared.read(study, rules or SelectionRules.default_for(manifest.modality), timer)
    common: dict[str, Any] = dict(bundle_name=manifest.name, bundle_version=manifest.version,
                                  scoring_sha256=scoring_identity(runner.bundle))

    def not_eligible(reasons: str | list[str], qc_reasons: Sequence[str] = (), station: str | None = None,
                     reused: bool = False) -> ShadowOutcome:
        reasons = list(dict.fromkeys([reasons] if isinstance(reasons, str) else reasons))
        return ShadowOutcome(**common, eligible=False, ineligible_reason="; ".join(reasons),
                             qc_reasons=list(dict.fromkeys([*reasons, *qc_reasons])), station_key=station,
                             chronological_age=read.age, shared_preprocessing=reused, timings=timer.stages)

    if read.chosen is None:
        return not_eligible(read.no_series_reason)
    station = station_key(read.headers[read.chosen][0])
    if read.volume is None:
        return not_eligible(read.load_error or "not loadable", station=station)
    volume = read.volume
    try:
        prepared, reused = shared.preprocess(volume, manifest.preprocessing, timer)
    except InputRejected as exc:
        return not_eligible(str(exc), volume.qc_reasons, station)
    qc_reasons = list(dict.fromkeys([*volume.qc_reasons, *prepared.qc_reasons]))
    blocking = blocking_reasons(qc_reasons)
    if blocking:
        return not_eligible(blocking, qc_reasons, station, reused)
    inference: Inference = timer.measure("infer", runner.run, prepared.model_input, read.age,
                                         brain_mask=prepared.brain_mask)
    qc_reasons = list(dict.fromkeys([*qc_reasons, *inference.notes]))
    blocking = blocking_reasons(qc_reasons)
    if blocking:
        return not_eligible(blocking, qc_reasons, station, reused)
    reference = timer.measure("reference", (references or BUNDLE_REFERENCES).choose, runner.bundle, station)
    if read.age is None:
        qc_reasons.append(f"chronological_age_{read.age_source}")
    return ShadowOutcome(
        **common, **_screened(inference, reference, qc_reasons).figures(),
        terms={k: float(v) for k, v in inference.terms.items()}, station_key=station,
        reference_kind=reference.kind,
        reference_id=reference.reference_id if isinstance(reference, Reference) else None,
        shared_preprocessing=reused, timings=timer.stages,
    )


def _screened(inference: Inference, reference: Reference | Calibrating, qc_reasons: list[str],
              qc_metrics: dict[str, float] | None = None, selected_series_uid: str | None = None) -> ResultFigures:
    """The figures of an eligible study: the model's, judged against `reference`, its brain
    age less the scanner's bias where the site reference holds one (the score keeps the
    model's own gap: the reference's scores were computed with it)."""
    percentile, screen_positive, threshold = _judged(inference.anomaly_score, reference)
    predicted, gap, offset = inference.predicted_age, inference.age_gap, None
    if predicted is not None and isinstance(reference, Reference) and reference.age_offset is not None:
        offset = reference.age_offset
        predicted -= offset
        gap = None if inference.chronological_age is None else predicted - inference.chronological_age
    return ResultFigures(
        eligible=True, anomaly_score=inference.anomaly_score, percentile=percentile,
        screen_positive=screen_positive, threshold=threshold, predicted_age=predicted,
        chronological_age=inference.chronological_age, age_gap=gap, age_offset=offset, qc_reasons=qc_reasons,
        qc_metrics=dict(qc_metrics or {}), selected_series_uid=selected_series_uid,
    )


def _judged(score: float, reference: Reference | Calibrating) -> tuple[float | None, bool | None, float | None]:
    """(percentile, screen positive, threshold) of a score against its reference; all None
    while calibrating, and no verdict on a score that is not a number (never "negative")."""
    if isinstance(reference, Calibrating):
        return None, None, None
    if not math.isfinite(score):
        return None, None, reference.threshold
    return reference.percentile(score), reference.positive(score), reference.threshold


def _ineligible(
    ticket: JobTicket,
    study: StudyFiles,
    headers: dict[str, list[Dataset]],
    reasons: str | list[str],
    verdicts: list[dict],
    algorithm: AlgorithmInfo,
    output_dir: Path,
    timer: Timer,
    chosen: str | None = None,
    *,
    qc_reasons: Sequence[str] = (),
    qc_metrics: dict[str, float] | None = None,
    slice_order: list[str] | None = None,
) -> JobOutcome:
    """A study we could not screen still gets an SR that says so and why, and one plain
    "NOT SCREENED" image a reader sees in the viewer; never a score, an overlay or a SEG.

    `reasons` are why it is not eligible; `qc_reasons` may add advisory ones. Only the
    SR is essential: trouble with the image is logged and the SR goes out without it.
    Everything here reads sanitised copies of the headers (export.sanitise), so no header
    value can make it fail; the report falls back to one minimal header, then to no image.
    """
    reasons = list(dict.fromkeys([reasons] if isinstance(reasons, str) else reasons))
    ineligible_reason = "; ".join(reasons)
    log.info("study not eligible", extra={"job_id": ticket.job_id, "reason": ineligible_reason})
    series_uid = chosen or next((uid for uid, h in headers.items() if h), None)
    clean = sanitise_sources(headers[series_uid]) if series_uid is not None else None
    notes = [clean.note] if clean is not None and clean.note else []
    common: dict[str, Any] = dict(eligible=False, ineligible_reason=ineligible_reason,
                                  ineligible_reasons=tuple(reasons),
                                  qc_reasons=list(dict.fromkeys([*reasons, *qc_reasons, *notes])),
                                  qc_metrics=dict(qc_metrics or {}), algorithm=algorithm)
    if clean is None:
        return _outcome(ResultSummary(modality="OT", **common), verdicts, timer, [])
    series_headers = _in_slice_order(clean.datasets, slice_order)
    summary = ResultSummary(modality=algorithm_modality(series_headers[0]), selected_series_uid=chosen, **common)
    station = station_key(series_headers[0])
    objects: list[OutputObject] = []
    sc = None
    try:
        # Pixels only from the series chosen for screening: another series (a dose
        # sheet, a scout) may carry burnt-in text of its own.
        sc = timer.measure("build_not_screened", _not_screened_image, series_headers, summary, chosen is not None)
        objects.append(_write(sc, output_dir / "sc-0001.dcm", "sc"))
    except Exception as exc:  # the SR below still says "not eligible"
        log.warning("not-screened image failed", extra={"job_id": ticket.job_id, "error": type(exc).__name__})
        sc = None
    with_sc = [sc] if sc is not None else []
    # One odd instance must not silence the study: then the report is on one minimal
    # header (UIDs and the sanitised patient/study values), and at last without the image.
    minimal = _minimal_header(series_headers[0], summary.modality)
    attempts = [(series_headers, with_sc), ([minimal], with_sc), ([minimal], [])]
    for n, (sources, evidence) in enumerate(attempts, start=1):
        try:
            sr = build_report(sources, summary, evidence)
            break
        except Exception as exc:
            if n == len(attempts):
                raise
            log.warning("not-eligible report retried on less", extra={"job_id": ticket.job_id,
                                                                        "error": failure_reason(exc)})
    if sc is not None and not evidence:
        # The report could not list the image: it is not sent either.
        (output_dir / "sc-0001.dcm").unlink(missing_ok=True)
        objects = []
    objects.append(_write(sr, output_dir / "sr.dcm", "sr"))
    # The scanner is recorded even without a score: the console counts per station.
    return dataclasses.replace(_outcome(summary, verdicts, timer, objects), station_key=station)


def not_screened_after_error(
    ticket: JobTicket,
    study: StudyFiles,
    runner: BundleRunner,
    output_dir: Path,
    exc: BaseException,
    read: StudyRead | None = None,
) -> JobOutcome:
    """The not-eligible result of a study whose input raised an input error (see
    headscreen.errors.is_input_error): the reason names the kind of error, never its message
    (pydicom and highdicom quote the value). `read` is what was read before; without it
    the headers are read again (a storage error then still raises TransientError)."""
    kind = type(exc).__name__
    reason = (scrub(f"input_rejected: {exc}") if isinstance(exc, InputRejected)
              else f"input_undecodable: a value of the stored instances does not decode or is not valid ({kind})")
    log.warning("input error: the study is reported not eligible, not retried",
                extra={"job_id": ticket.job_id, "error": failure_reason(exc),
                       "error_trace": frames_only((type(exc), exc, exc.__traceback__))})
    timer = Timer()
    if read is None:
        headers, verdicts, chosen, notes = _read_headers(study), [], None, []
    else:
        headers, verdicts, chosen, notes = read.headers, read.verdicts, read.chosen, read.notes
    # Whatever this attempt wrote before the error is not part of its result.
    if output_dir.is_dir():
        for path in [*output_dir.glob("*.dcm"), *output_dir.glob("*.tmp")]:
            path.unlink(missing_ok=True)
    return _ineligible(ticket, study, headers, reason, verdicts, _algorithm(runner), output_dir, timer, chosen,
                       qc_reasons=notes)


def rejection_note(rejected: Sequence[Path], runner: BundleRunner, output_dir: Path) -> OutputObject:
    """The IOCM rejection note (export.kos) listing the stored result files `rejected`, the
    objects of the results a new one supersedes, written beside the new result's files."""
    headers = []
    for path in rejected:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except OSError:
            raise TransientError("a superseded result file is unreadable; storage not reachable?") from None
    return _write(build_rejection_note(headers, _algorithm(runner)), output_dir / "kos.dcm", "kos")


_PIXEL_DESCRIPTION = ("Rows", "Columns", "SamplesPerPixel", "PixelRepresentation")


def _minimal_header(header: Dataset, modality: str) -> Dataset:
    """Only what a report needs of its source: the identifying UIDs and the (sanitised)
    Type 2 patient/study attributes. highdicom accepts a source image by its Modality and
    pixel description, which the report does not copy: absent ones are stood in for."""
    minimal = Dataset()
    for keyword in ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                    "SeriesInstanceUID", "Modality", *_PIXEL_DESCRIPTION, *TYPE2):
        if keyword in header:
            minimal.add(header.get_item(keyword))
    if not minimal.get("Modality"):
        minimal.Modality = modality
    if not any(keyword in minimal for keyword in _PIXEL_DESCRIPTION):
        minimal.SamplesPerPixel = 1
    return minimal


def _in_slice_order(series_headers: list[Dataset], slice_order: list[str] | None) -> list[Dataset]:
    """The headers in the volume's slice order when it is known, else by instance number."""
    if slice_order:
        by_uid = {_text(ds, "SOPInstanceUID") or "": ds for ds in series_headers}
        ordered = [by_uid[uid] for uid in slice_order if uid in by_uid]
        if len(ordered) == len(series_headers):
            return ordered

    def instance_number(ds: Dataset) -> int:
        try:
            return int(ds.get("InstanceNumber") or 0)
        except Exception:  # an undecodable number sorts first
            return 0

    return sorted(series_headers, key=instance_number)


def _not_screened_image(series_headers: list[Dataset], summary: ResultSummary, with_pixels: bool) -> Dataset:
    """The plain SC of a not-eligible study: the middle slice in grey when allowed, else a text card."""
    middle = series_headers[len(series_headers) // 2]
    source = middle
    if with_pixels and getattr(middle, "filename", None):
        try:
            # Sanitised like the headers, with the same patient/study values as the report.
            source = sanitise_sources([series_headers[0], pydicom.dcmread(middle.filename)]).datasets[1]
        except Exception as exc:  # unreadable now: the text card still goes out
            log.info("middle slice unreadable for the not-screened image", extra={"error": type(exc).__name__})
    return build_not_screened_image(source, summary)


def _outcome(summary: ResultSummary, verdicts: list[dict], timer: Timer, objects: list[OutputObject]) -> JobOutcome:
    """What the database records of a job: the summary the DICOM objects carry."""
    figures = summary.figures()
    # Stored as JSON: numpy numbers from the QC become plain floats.
    figures["qc_metrics"] = {k: float(v) for k, v in figures["qc_metrics"].items()}
    return JobOutcome(
        **figures,
        series_verdicts=verdicts,
        timings=timer.stages,
        objects=objects,
    )


def algorithm_modality(dataset: Dataset) -> str:
    return str(getattr(dataset, "Modality", "") or "OT")


def _algorithm(runner: BundleRunner) -> AlgorithmInfo:
    manifest = runner.bundle.manifest
    return AlgorithmInfo(
        name=manifest.name,
        version=manifest.version,
        family=_FAMILY.get(manifest.method, manifest.method),
        sha256=runner.bundle.sha256,
    )


def _read_headers(study: StudyFiles, deferred_pixels: bool = False) -> dict[str, list[Dataset]]:
    """Each stored instance's header, by series; with `deferred_pixels` each also keeps its
    pixel data unread in the file (imaging.volume.read_header) for the volume to decode,
    and the caller releases what is not decoded (`_release_all`)."""
    headers: dict[str, list[Dataset]] = {}
    for series_uid, paths in study.series.items():
        datasets: list[Dataset] = []
        for path in paths:
            try:
                datasets.append(read_header(path) if deferred_pixels
                                else pydicom.dcmread(path, stop_before_pixels=True))
            except OSError as exc:
                # A stored file that is missing or unreadable is storage trouble (a mount
                # not there, a disk error), never "no images": retried, then failed loudly.
                raise TransientError(f"stored instance unreadable ({type(exc).__name__}); storage not reachable?") \
                    from None
            except Exception as exc:  # a stored file pydicom cannot parse: skip it, say why
                log.warning("unparseable stored instance", extra={"path": str(path), "error": type(exc).__name__})
        headers[series_uid] = datasets
    return headers


def _release_all(datasets: Sequence[Dataset]) -> None:
    for ds in datasets:
        release_pixels(ds)


def _read_sources(headers: list[Dataset], slice_sop_uids: list[str], pixel_slices: list[int]) -> list[Dataset]:
    """Source datasets in the volume's slice order (index k = slice k).

    Only the overlay slices need pixels; the SR and the SEG need headers only,
    which were read already, so a thin-slice CT is not read a third time.
    """
    ordered = _ordered_sources(headers, slice_sop_uids)
    for k in sorted(set(pixel_slices)):
        ordered[k] = pydicom.dcmread(ordered[k].filename)
    return ordered


def _ordered_sources(headers: list[Dataset], slice_sop_uids: list[str]) -> list[Dataset]:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in headers}
    return [by_uid[uid] for uid in slice_sop_uids]


def _build_results(
    sources: list[Dataset],
    native_map: NativeMap,
    summary: ResultSummary,
    overlay_indices: list[int],
    output_dir: Path,
    seg_threshold: float | None = DEFAULT_THRESHOLD,
    reference: ReferenceNote | None = None,
    map_unit: str = "z",
    parametric_map: bool = False,
    seg_grow: float = 1.0,
    seg_focus: IndexBox | None = None,
) -> list[OutputObject]:
    """SC overlays, the SEG (None threshold: SEG disabled; empty mask: no SEG; its regions
    grown to `seg_grow` x the threshold, and those reaching into `seg_focus`,
    export.seg.anomaly_mask), the
    Parametric Map of the same map when `parametric_map`, the SR. The SEG and the map come
    before the SR, which references the SEG's segment and lists both in its evidence.
    Each object goes to a temporary file as soon as it is built (an overlay image is then
    kept as its header only); all are renamed into place once every one is built, so a
    build that fails leaves no result file behind."""
    staged = _StagedFiles(output_dir)
    try:
        sc_datasets = build_overlay_series(sources, native_map, summary, slice_indices=overlay_indices,
                                           style=OVERLAY_STYLE, reference=reference, map_unit=map_unit,
                                           sink=lambda ds: staged.add(ds, f"sc-{len(staged) + 1:04d}.dcm", "sc"))
        seg = (build_segmentation(sources, native_map, summary, seg_threshold, grow=seg_grow, focus=seg_focus)
               if seg_threshold is not None else None)
        if seg is not None:
            staged.add(seg, "seg.dcm", "seg")
        pm = build_parametric_map(sources, native_map, summary, map_unit) if parametric_map else None
        if pm is not None:
            staged.add(pm, "pm.dcm", "pm")
        sr = build_report(sources, summary, sc_datasets, reference=reference, segmentation=seg, parametric_map=pm,
                          anomaly_map=native_map, map_unit=map_unit)
        staged.add(sr, "sr.dcm", "sr")
        staged.written()
    except BaseException:
        staged.discard()
        raise
    return staged.commit()


class _StagedFiles:
    """Result files written under temporary names (each fdatasync'ed) and renamed into place
    together; the directory is synced once for the set, so all are durable before run_job
    returns, and so before any delivery of them is recorded. The writes and syncs run on a
    writer thread (they release the GIL), so the next object is built meanwhile; `written`
    waits for them and raises the first error."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.objects: list[OutputObject] = []
        self._temporary: list[tuple[Path, Path]] = []
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future[None]] = []

    def __len__(self) -> int:
        return len(self.objects)

    def add(self, dataset: Dataset, name: str, kind: str) -> Dataset:
        """Write `dataset`; returns it, without its pixel data (no longer needed in memory)."""
        path = self.folder / name
        tmp = path.with_name(f".{name}.tmp")
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._temporary.append((tmp, path))
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="result-writer")
        self._writes.append(self._writer.submit(write_synced, tmp, buffer.getbuffer()))
        del buffer
        self.objects.append(OutputObject(sop_instance_uid=str(dataset.SOPInstanceUID),
                                         sop_class_uid=str(dataset.SOPClassUID), kind=kind, path=str(path)))
        if kind == "sc":
            release_pixels(dataset)
        return dataset

    def written(self) -> None:
        """Wait until every file is written and synced; the first write error, if any."""
        writes, self._writes = self._writes, []
        try:
            for write in writes:
                write.result()
        finally:
            for write in writes:
                write.cancel()
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def discard(self) -> None:
        try:
            self.written()
        except Exception:
            pass  # the error that made the build fail is the one raised
        for tmp, _ in self._temporary:
            tmp.unlink(missing_ok=True)

    def commit(self) -> list[OutputObject]:
        for tmp, path in self._temporary:
            os.replace(tmp, path)
        fsync_directory(self.folder)
        return self.objects


def _write(dataset: Dataset, path: Path, kind: str) -> OutputObject:
    """Write atomically: a crash never leaves a half-written result to deliver."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    atomic_write(path, buffer.getvalue())
    return OutputObject(
        sop_instance_uid=str(dataset.SOPInstanceUID),
        sop_class_uid=str(dataset.SOPClassUID),
        kind=kind,
        path=str(path),
    )


def _verdict_dict(verdict) -> dict:
    return {"series_uid": verdict.series_uid, "accepted": verdict.accepted, "reason": verdict.reason,
            "rank": float(verdict.rank)}


def _text(dataset: Dataset, keyword: str) -> str | None:
    try:
        value = dataset.get(keyword)
    except Exception:  # a value that does not decode counts as absent
        return None
    return str(value) if value not in (None, "") else None
