"""An in-process Worker on a real database, with the model and the pipeline stood in for:
what the worker does around `run_job` (lease, heartbeat, finish, fail, deliver, logs)
is tested without ONNX or imaging. `record_stored_files` records real files as the
receiver would, for a worker that reads them (the not-eligible report of an input error,
or the real pipeline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

import headscreen.daemon.worker
from db_factories import BUNDLES, CT_BUNDLE, complete_study
from headscreen.daemon.config import Settings, load_settings
from headscreen.daemon.instance_record import slice_position
from headscreen.daemon.worker import Worker
from headscreen.db import api
from headscreen.db.types import BundleRef, InstanceRecord, JobOutcome, OutputObject

RunJob = Callable[..., Any]


def worker_settings(tmp_path: Path, database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "storage_dir": str(tmp_path / "storage"), "database_url": database_url, "allow_any_caller": True,
        "environment": "development", "heartbeat_s": 0.02, "lease_s": 30.0, "web": {"port": 0},
    }
    values.update(overrides)
    return load_settings(None, **values)


def fake_runner() -> SimpleNamespace:
    manifest = SimpleNamespace(name=CT_BUNDLE.name, version=CT_BUNDLE.version, modality="CT", key="ct-fake")
    return SimpleNamespace(bundle=SimpleNamespace(manifest=manifest))


def reporting_runner() -> SimpleNamespace:
    """A stand-in CT runner a not-eligible report can name (a bundle hash and method)."""
    runner = fake_runner()
    runner.bundle.sha256 = "0" * 64
    runner.bundle.manifest.method = "f-anogan-3d"
    return runner


def make_worker(monkeypatch: pytest.MonkeyPatch, settings: Settings, sessions: sessionmaker[Session],
                run_job: RunJob, worker_id: str = "test-worker", runner: SimpleNamespace | None = None) -> Worker:
    """A Worker whose only bundle is a stand-in CT runner (`fake_runner` unless `runner`),
    and whose pipeline is `run_job`."""
    runners = {(CT_BUNDLE.name, CT_BUNDLE.version): runner or fake_runner()}
    monkeypatch.setattr(headscreen.daemon.worker, "load_runners", lambda _settings: runners)
    monkeypatch.setattr(headscreen.daemon.worker, "run_job", run_job)
    return Worker(settings, sessions, worker_id=worker_id)


def queued_ct_study(session: Session) -> tuple[str, int]:
    """A completed CT study whose job is claimable now; returns (study uid, study id)."""
    return complete_study(session, now=api.utcnow() - timedelta(hours=2))


def _lenient(ds: pydicom.Dataset, read: Callable[[pydicom.Dataset], Any]) -> Any:
    """A record field as the receiver keeps it: None when the value does not decode."""
    try:
        return read(ds)
    except Exception:
        return None


def record_stored_files(session: Session, storage_dir: Path, files: Sequence[Path],
                        bundles: Sequence[BundleRef] = BUNDLES) -> tuple[str, int]:
    """Record files under `storage_dir` as the receiver would and complete their study (one
    study), whose job for each of `bundles` is claimable now; returns (study uid, study id)."""
    records = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        records.append(InstanceRecord(
            study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=Path(path).relative_to(storage_dir).as_posix(), size_bytes=Path(path).stat().st_size,
            modality=_lenient(ds, lambda d: str(d.Modality)), series_number=_lenient(ds, lambda d: int(d.SeriesNumber)),
            instance_number=_lenient(ds, lambda d: int(d.InstanceNumber)),
            slice_position=_lenient(ds, slice_position), calling_ae="PACS"))
    received = api.utcnow() - timedelta(hours=2)
    api.record_instances(session, records, now=received)
    done = api.sweep_completeness(session, received + timedelta(seconds=3600), 60, 10, list(bundles))
    assert len(done) == 1
    return records[0].study_instance_uid, done[0]


class ReadsEverything:
    """A stand-in pipeline: reads every instance file it is given (what the real one does
    first), then writes one result object (a CT image, which any SCP stores) into output_dir."""

    def __init__(self) -> None:
        self.read: dict[str, bytes] = {}
        self.paths: list[Path] = []

    def __call__(self, ticket: Any, study: Any, runner: Any, output_dir: Path, *_: Any, **__: Any) -> JobOutcome:
        for paths in study.series.values():
            for path in paths:
                self.paths.append(Path(path))
                dataset = pydicom.dcmread(path)
                self.read[str(dataset.SOPInstanceUID)] = dataset.PixelData
        result = dataset.copy()
        result.SOPInstanceUID = generate_uid()
        result.file_meta.MediaStorageSOPInstanceUID = result.SOPInstanceUID
        result.SeriesInstanceUID = generate_uid()
        output_dir.mkdir(parents=True, exist_ok=True)
        result.save_as(output_dir / "sc-0001.dcm", enforce_file_format=True)
        obj = OutputObject(str(result.SOPInstanceUID), str(result.SOPClassUID), "sc", str(output_dir / "sc-0001.dcm"))
        return JobOutcome(eligible=True, ineligible_reason=None, anomaly_score=1.0, percentile=50.0,
                          screen_positive=False, threshold=2.0, predicted_age=None, chronological_age=64.0,
                          age_gap=None, qc_reasons=[], qc_metrics={}, selected_series_uid=None,
                          series_verdicts=[], timings={}, objects=[obj])
