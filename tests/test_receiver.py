"""The DICOM receiver against real peers: dcmtk echoscu/storescu and pynetdicom SCUs,
a real SQLite database migrated with Alembic, and real files on disk."""

from __future__ import annotations

import logging
import math
import random
import socket
import subprocess
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon import receiver as receiver_module
from headscreen.daemon.callers import AllowedCaller
from headscreen.daemon.connections import (
    _DirectDataDUL,
    _presentation_data_values,
    _WaitingAssociationSocket,
)
from headscreen.daemon.receiver import ASSOCIATION_REJECTED_STATUS, ReceiverConfig, StoreStatus, start_receiver
from headscreen.daemon.store_requests import DirectStores, store_response_command
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.models import Instance, Study
from receiver_helpers import SCP_AE, SCU_AE, Harness, make_uid, start_harness, write_ct_series
from serve_harness import wait_until

ALLOWED = (AllowedCaller(SCU_AE), AllowedCaller("PACS_BOUND", host="10.9.9.9"))


def _start(tmp_path: Path, sessions: sessionmaker[Session] | None = None, **overrides: object) -> Harness:
    return start_harness(tmp_path, sessions, allowed=ALLOWED, **overrides)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = _start(tmp_path)
    yield h
    h.close()


@pytest.fixture
def any_db_harness(tmp_path: Path, db_sessions: sessionmaker[Session]) -> Iterator[Harness]:
    """The receiver on each database backend (SQLite file and PostgreSQL, from conftest)."""
    h = _start(tmp_path, db_sessions)
    yield h
    h.receiver.shutdown()


def _dcmtk(tool: str, port: int, *args: str, calling: str = SCU_AE) -> subprocess.CompletedProcess[str]:
    command = [tool, "-aet", calling, "-aec", SCP_AE, *args, "127.0.0.1", str(port)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _storescu(port: int, paths: list[Path], calling: str = SCU_AE) -> subprocess.CompletedProcess[str]:
    # -R: propose only the contexts the files need, as a PACS forwarding a study does.
    return subprocess.run(["storescu", "-R", "-aet", calling, "-aec", SCP_AE, "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, timeout=120)


def _associate(port: int, *contexts: tuple[str, list[str]], calling: str = SCU_AE) -> Association:
    ae = AE(ae_title=calling)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    return assoc


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the file meta group, as it goes over the wire."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_len = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[128 + 4 + 12 + meta_len:]


# --- verification and allow-list --------------------------------------------------------------


def test_echoscu_succeeds_for_an_allowed_caller(harness: Harness) -> None:
    result = _dcmtk("echoscu", harness.port)
    assert result.returncode == 0, result.stderr


def test_unknown_caller_is_rejected_recorded_and_server_keeps_serving(harness: Harness,
                                                                      tmp_path: Path) -> None:
    refused = _dcmtk("echoscu", harness.port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stderr or "rejected" in refused.stderr.lower()

    paths = write_ct_series(tmp_path / "ct", 2, seed=3)
    store_refused = _storescu(harness.port, paths, calling="INTRUDER")
    assert store_refused.returncode != 0
    assert harness.stored_files() == []

    # The first refusal is recorded at once; the repeat is counted into one row per interval.
    (first,) = harness.rejections()
    assert first.calling_ae == "INTRUDER" and first.status == ASSOCIATION_REJECTED_STATUS
    assert "allow-list" in first.reason
    harness.receiver.flush_refusals()
    rejections = harness.rejections()
    assert [r.calling_ae for r in rejections] == ["INTRUDER", "INTRUDER"]
    assert all(r.status == ASSOCIATION_REJECTED_STATUS for r in rejections)
    assert "association refused 1 more times" in rejections[1].reason and "allow-list" in rejections[1].reason

    assert _dcmtk("echoscu", harness.port).returncode == 0


def test_known_title_from_the_wrong_host_is_rejected(harness: Harness) -> None:
    refused = _dcmtk("echoscu", harness.port, calling="PACS_BOUND")
    assert refused.returncode != 0
    (rejection,) = harness.rejections()
    assert rejection.calling_ae == "PACS_BOUND"
    assert "host" in rejection.reason


def test_empty_allow_list_rejects_everyone_unless_any_caller_is_allowed(tmp_path: Path) -> None:
    closed = _start(tmp_path / "closed", allowed_callers=())
    try:
        assert _dcmtk("echoscu", closed.port).returncode != 0
    finally:
        closed.close()
    open_ = _start(tmp_path / "open", allowed_callers=(), allow_any_caller=True)
    try:
        assert _dcmtk("echoscu", open_.port, calling="ANYONE").returncode == 0
    finally:
        open_.close()


# --- storing ---------------------------------------------------------------------------------


def test_storescu_series_is_stored_byte_exact_and_recorded(any_db_harness: Harness, tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", 5, seed=1)
    result = _storescu(any_db_harness.port, paths)
    assert result.returncode == 0, result.stderr

    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    rows = any_db_harness.instances()
    assert [r.sop_instance_uid for r in rows] == list(sent)
    for row in rows:
        stored = any_db_harness.storage_dir / row.path
        header = pydicom.dcmread(stored, stop_before_pixels=True)
        assert row.path == f"{header.StudyInstanceUID}/{header.SeriesInstanceUID}/{row.sop_instance_uid}.dcm"
        assert _dataset_bytes(stored) == _dataset_bytes(sent[row.sop_instance_uid])
        assert row.size_bytes == stored.stat().st_size
        assert row.transfer_syntax_uid == ExplicitVRLittleEndian
        assert row.images_in_acquisition == 5
    assert [r.slice_position for r in rows] == pytest.approx([0.0, 2.5, 5.0, 7.5, 10.0])
    assert not list(any_db_harness.storage_dir.rglob("*.tmp"))


def test_stored_file_meta_is_what_pynetdicom_writes(harness: Harness, tmp_path: Path) -> None:
    # The receiver packs the preamble and file meta itself (dataset_check.part10_prefix).
    paths = write_ct_series(tmp_path / "ct", 3, seed=11)
    result = _storescu(harness.port, paths)
    assert result.returncode == 0, result.stderr
    rows = harness.instances()
    assert len(rows) == 3
    for row in rows:
        stored = (harness.storage_dir / row.path).read_bytes()
        meta = create_file_meta(sop_class_uid=UID(row.sop_class_uid), sop_instance_uid=UID(row.sop_instance_uid),
                                transfer_syntax=UID(row.transfer_syntax_uid))
        expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
        assert stored[:len(expected)] == expected
        assert stored[len(expected):] == _dataset_bytes(harness.storage_dir / row.path)


@pytest.mark.parametrize(("status", "sop_instance", "message_id"), [
    (0x0000, "1.2.3.4", 1), (0xA700, "1.2.3.45", 65535),
    (0xB000, "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678", 7)])
def test_plain_store_responses_are_encoded_as_pynetdicom_encodes_them(status: int, sop_instance: str,
                                                                       message_id: int) -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = CTImageStorage
    response.AffectedSOPInstanceUID = sop_instance
    response.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    expected = [pdata.presentation_data_value_list for pdata in message.encode_msg(1, 16384)]
    command = store_response_command(response)
    assert command is not None
    assert expected == [[(1, b"\x03" + command)]]
    # A comment is left to pynetdicom.
    response.ErrorComment = "refused"
    assert store_response_command(response) is None


def test_resending_a_series_is_idempotent(any_db_harness: Harness, tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", 3, seed=2)
    assert _storescu(any_db_harness.port, paths).returncode == 0
    first = [(r.id, r.path, r.size_bytes) for r in any_db_harness.instances()]
    assert _storescu(any_db_harness.port, paths).returncode == 0
    assert [(r.id, r.path, r.size_bytes) for r in any_db_harness.instances()] == first
    assert len(any_db_harness.stored_files()) == 3
    assert any_db_harness.rejections() == []


@pytest.mark.parametrize("name, sop_class", [
    ("693_J2KR.dcm", None),                    # CT, JPEG 2000 lossless
    ("MR_small_RLE.dcm", None),                # MR, RLE lossless
    ("MR_small_jp2klossless.dcm", None),       # MR, JPEG 2000 lossless
    ("emri_small.dcm", None),                  # Enhanced MR, explicit VR
    ("JPEG-LL.dcm", CTImageStorage),           # JPEG lossless SV1, relabelled as CT
    ("JPEG2000.dcm", CTImageStorage),          # JPEG 2000 lossy, relabelled as CT
    ("JPEG-lossy.dcm", CTImageStorage),        # JPEG extended, relabelled as CT
    ("JPEGLSNearLossless_08.dcm", MRImageStorage),  # JPEG-LS near-lossless, relabelled as MR
])
def test_compressed_and_enhanced_instances_are_accepted(harness: Harness, tmp_path: Path,
                                                        name: str, sop_class: str | None) -> None:
    source = Path(get_testdata_file(name))  # type: ignore[arg-type]
    path = source
    if sop_class is not None:
        # The pixel data stays encapsulated exactly as in the test file; only the class changes.
        ds = pydicom.dcmread(source)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        rng = random.Random(name)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if keyword not in ds:
                setattr(ds, keyword, make_uid(rng))
        path = tmp_path / name
        ds.save_as(path)
    # dcmsend proposes each file's own transfer syntax first, as a PACS forward does.
    result = subprocess.run(["dcmsend", "-aet", SCU_AE, "-aec", SCP_AE, "127.0.0.1", str(harness.port),
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (row,) = harness.instances()
    sent = pydicom.dcmread(path)
    stored = pydicom.dcmread(harness.storage_dir / row.path)
    assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
    assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    # dcmsend re-encodes the header, but the compressed pixel data must arrive untouched.
    assert stored.PixelData == sent.PixelData
    assert stored.SOPInstanceUID == sent.SOPInstanceUID


def test_enhanced_mr_records_frames(harness: Harness) -> None:
    path = Path(get_testdata_file("emri_small.dcm"))  # type: ignore[arg-type]
    assert _storescu(harness.port, [path]).returncode == 0
    (row,) = harness.instances()
    assert row.sop_class_uid == EnhancedMRImageStorage
    assert row.number_of_frames == pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames


def test_deflated_instance_is_stored_as_received(harness: Harness, tmp_path: Path) -> None:
    (plain,) = write_ct_series(tmp_path / "ct", 1, seed=4)
    ds = pydicom.dcmread(plain)
    assoc = _associate(harness.port, (CTImageStorage, [DeflatedExplicitVRLittleEndian]))
    try:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == StoreStatus.SUCCESS
    (row,) = harness.instances()
    stored = pydicom.dcmread(harness.storage_dir / row.path)
    assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert stored.PixelData == pydicom.dcmread(plain).PixelData


def test_the_peers_first_transfer_syntax_is_accepted(harness: Harness) -> None:
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian])
    ae.add_requested_context(MRImageStorage, [ImplicitVRLittleEndian, JPEG2000Lossless])
    ae.add_requested_context(EnhancedMRImageStorage, [JPEGBaseline8Bit, RLELossless])
    assoc = ae.associate("127.0.0.1", harness.port, ae_title=SCP_AE)
    try:
        accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    assert accepted == {CTImageStorage: JPEG2000Lossless, MRImageStorage: ImplicitVRLittleEndian,
                        EnhancedMRImageStorage: JPEGBaseline8Bit}


def test_other_storage_classes_are_refused_at_negotiation(harness: Harness) -> None:
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", harness.port, ae_title=SCP_AE)
    try:
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == {CTImageStorage}
    assert rejected == {SecondaryCaptureImageStorage: 0x03}  # abstract syntax not supported

    sc_file = Path(get_testdata_file("SC_rgb.dcm"))  # type: ignore[arg-type]
    assert _storescu(harness.port, [sc_file]).returncode != 0
    assert harness.stored_files() == []


# --- bad input on a live association ---------------------------------------------------------


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # Send files byte-for-byte after their meta group, so a broken data set reaches the SCP.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _with_body(template: Path, body: bytes, out: Path) -> Path:
    raw = template.read_bytes()
    out.write_bytes(raw[:len(raw) - len(_dataset_bytes(template))] + body)
    return out


def test_garbage_and_truncated_data_sets_fail_but_the_association_carries_on(
        harness: Harness, tmp_path: Path, chunked_send: None) -> None:
    good, template, truncated_src = write_ct_series(tmp_path / "ct", 3, seed=5)
    garbage = _with_body(template, b"this is not DICOM at all\x00\xff" * 40, tmp_path / "garbage.dcm")
    body = _dataset_bytes(truncated_src)
    cut_in_pixels = _with_body(truncated_src, body[: len(body) - 1000], tmp_path / "cut_pixels.dcm")
    cut_in_header = _with_body(truncated_src, body[:300], tmp_path / "cut_header.dcm")

    assoc = _associate(harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
    try:
        statuses = {name: assoc.send_c_store(path) for name, path in
                    [("garbage", garbage), ("cut_pixels", cut_in_pixels),
                     ("cut_header", cut_in_header), ("good", good)]}
    finally:
        assoc.release()

    for name in ("garbage", "cut_pixels", "cut_header"):
        assert statuses[name].Status == StoreStatus.CANNOT_UNDERSTAND, name
        assert statuses[name].ErrorComment
    assert statuses["good"].Status == StoreStatus.SUCCESS
    assert [r.sop_instance_uid for r in harness.instances()] == [
        pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID]
    rejections = harness.rejections()
    assert [r.status for r in rejections] == [StoreStatus.CANNOT_UNDERSTAND] * 3
    assert all(r.reason and r.calling_ae == SCU_AE for r in rejections)
    assert len(harness.stored_files()) == 1
    stats = harness.receiver.stats.snapshot()
    assert stats["stored"] == 1
    assert stats["refused"] == {"0xC210": 3}


def test_missing_identifying_uid_is_refused_with_a900(harness: Harness, tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path / "ct", 1, seed=6)
    ds = pydicom.dcmread(path)
    del ds.StudyInstanceUID
    assoc = _associate(harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == StoreStatus.DATASET_MISMATCH
    assert "StudyInstanceUID" in status.ErrorComment
    assert harness.stored_files() == []
    (rejection,) = harness.rejections()
    assert rejection.sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom reads the bad UID leniently
def test_unusable_identity_is_refused_with_a900(harness: Harness, tmp_path: Path, chunked_send: None) -> None:
    source, other = write_ct_series(tmp_path / "ct", 2, seed=9)
    # A file whose meta names another SOP instance: the command and the data set disagree.
    mismatched = _with_body(other, _dataset_bytes(source), tmp_path / "mismatch.dcm")
    ds = pydicom.dcmread(source)
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SeriesInstanceUID = "1.2.3.abc"  # not digits and dots: could not be a safe file name
    bad_uid = tmp_path / "bad_uid.dcm"
    ds.save_as(bad_uid)
    assoc = _associate(harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
    try:
        statuses = [assoc.send_c_store(p) for p in (mismatched, bad_uid)]
    finally:
        assoc.release()
    assert [s.Status for s in statuses] == [StoreStatus.DATASET_MISMATCH] * 2
    assert "differs" in statuses[0].ErrorComment
    assert "SeriesInstanceUID" in statuses[1].ErrorComment
    assert harness.stored_files() == []
    assert len(harness.rejections()) == 2


def test_disk_below_watermark_refuses_with_a700_and_writes_nothing(tmp_path: Path) -> None:
    harness = _start(tmp_path, disk_min_free_mb=1 << 40)
    try:
        paths = write_ct_series(tmp_path / "ct", 2, seed=7)
        assoc = _associate(harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
        try:
            statuses = [assoc.send_c_store(p).Status for p in paths]
        finally:
            assoc.release()
        assert statuses == [StoreStatus.OUT_OF_RESOURCES] * 2
        assert harness.stored_files() == []
        assert [p for p in harness.storage_dir.iterdir() if p.is_dir()] == []
        assert harness.instances() == []
        assert [r.status for r in harness.rejections()] == [StoreStatus.OUT_OF_RESOURCES] * 2
        assert harness.receiver.stats.snapshot()["refused"] == {"0xA700": 2}
    finally:
        harness.close()


def test_database_failure_is_never_answered_success(tmp_path: Path) -> None:
    # A database without the schema: every write fails, as it would on a broken disk.
    sessions = session_factory(make_engine(f"sqlite:///{tmp_path / 'empty.db'}"))
    config = ReceiverConfig(ae_title=SCP_AE, storage_dir=tmp_path / "data", bind_address="127.0.0.1",
                            port=0, allowed_callers=ALLOWED, disk_min_free_mb=0)
    receiver = start_receiver(config, sessions)
    try:
        (path,) = write_ct_series(tmp_path / "ct", 1, seed=8)
        assoc = _associate(receiver.port, (CTImageStorage, [ExplicitVRLittleEndian]),
                           (Verification, [ImplicitVRLittleEndian]))
        try:
            status = assoc.send_c_store(path)
            echo = assoc.send_c_echo()
        finally:
            assoc.release()
        assert status.Status == StoreStatus.STORE_FAILED
        assert "database" in status.ErrorComment
        assert echo.Status == StoreStatus.SUCCESS
    finally:
        receiver.shutdown()


# --- concurrency -----------------------------------------------------------------------------


def test_concurrent_associations_all_succeed(any_db_harness: Harness, tmp_path: Path) -> None:
    series = [write_ct_series(tmp_path / f"ct{i}", 12, seed=20 + i) for i in range(3)]
    # Two associations share one study's series to race on creating the same study row.
    shared_study = pydicom.dcmread(series[0][0], stop_before_pixels=True).StudyInstanceUID
    for path in series[1]:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = shared_study
        ds.save_as(path)
    results: dict[int, list[int]] = {}

    def send(index: int) -> None:
        assoc = _associate(any_db_harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
        try:
            results[index] = [int(assoc.send_c_store(p).Status) for p in series[index]]
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {i: [StoreStatus.SUCCESS] * 12 for i in range(3)}
    with any_db_harness.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 36
    assert len(any_db_harness.stored_files()) == 36


def test_a_release_stamps_the_studies_its_association_sent_and_an_abort_does_not(
        any_db_harness: Harness, tmp_path: Path) -> None:
    released, aborted = (write_ct_series(tmp_path / name, 4, seed=seed) for name, seed in (("r", 31), ("a", 32)))

    def stamps(files: list[Path]) -> tuple[object, object]:
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        with any_db_harness.sessions() as session:
            row = session.execute(select(Study.released_at, Study.last_received_at)
                                  .where(Study.study_instance_uid == uid)).one()
        return row.released_at, row.last_received_at

    def no_association_left() -> bool:
        return not any_db_harness.receiver.ae.active_associations

    assoc = _associate(any_db_harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
    assert [int(assoc.send_c_store(p).Status) for p in released] == [StoreStatus.SUCCESS] * 4
    assert stamps(released)[0] is None  # still open: the sender may have more to send
    assoc.release()
    wait_until(lambda: stamps(released)[0] is not None, 60, 0.05, "the release recorded")
    released_at, last_received_at = stamps(released)
    assert released_at >= last_received_at  # type: ignore[operator]

    assoc = _associate(any_db_harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
    assert [int(assoc.send_c_store(p).Status) for p in aborted] == [StoreStatus.SUCCESS] * 4
    assoc.abort()
    wait_until(no_association_left, 60, 0.05, "the aborted association gone")
    assert stamps(aborted)[0] is None  # an abort says nothing about what is still to come


# --- logging ---------------------------------------------------------------------------------


def test_logs_carry_uids_but_no_patient_data(harness: Harness, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    good, bad = write_ct_series(tmp_path / "ct", 2, seed=11)
    ds = pydicom.dcmread(bad)
    del ds.StudyInstanceUID
    with caplog.at_level(logging.DEBUG, logger="headscreen"):
        assoc = _associate(harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
        try:
            statuses = [assoc.send_c_store(good).Status, assoc.send_c_store(ds).Status]
        finally:
            assoc.release()
        assert _dcmtk("echoscu", harness.port, calling="INTRUDER").returncode != 0
    assert statuses == [StoreStatus.SUCCESS, StoreStatus.DATASET_MISMATCH]
    records = [r for r in caplog.records if r.name.startswith("headscreen.")]
    assert {getattr(r, "action", None) for r in records} >= {"instance_stored", "store_rejected",
                                                             "association_rejected"}
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    assert ds.SOPInstanceUID in logged
    for phi in ("PHANTOM", "SYNTH0001", "19600101", "064Y", "Synthetic Hospital"):
        assert phi not in logged


def test_a_pdu_header_claiming_gigabytes_costs_only_what_arrives() -> None:
    """The PDU length is the peer's word, read before any check: the receiver's socket
    grows its buffer with the bytes that arrive, and returns them whole."""
    ours, peer = socket.socketpair()
    reader = object.__new__(_WaitingAssociationSocket)  # only its socket is needed to read
    reader.socket = ours
    payload = random.Random(7).randbytes(3 * 1024 * 1024 + 17)  # several buffer growths
    sender = threading.Thread(target=lambda: (peer.sendall(payload), peer.sendall(b"tail"), peer.close()))
    sender.start()
    try:
        assert bytes(reader.recv(len(payload))) == payload
        tracemalloc.start()
        assert bytes(reader.recv(0xFFFF_FFF0)) == b"tail"  # the peer closed: a short read
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 16 * 1024 * 1024, peak
    finally:
        sender.join(timeout=30)
        ours.close()


# --- P-DATA straight to DIMSE (connections._DirectDataDUL) -----------------------------------


def _p_data_pdu(*values: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF PDU as pynetdicom encodes it."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[context_id, value] for context_id, value in values]  # type: ignore[misc]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_p_data_values_are_read_as_pynetdicom_decodes_them() -> None:
    rng = random.Random(3)
    for values in ([(1, b"\x03" + rng.randbytes(80))],
                   [(1, b"\x00" + rng.randbytes(16_000)), (3, b"\x02" + rng.randbytes(5)), (1, b"\x01\x00")]):
        encoded = _p_data_pdu(*values)
        decoded = P_DATA_TF()
        decoded.decode(encoded)
        expected = [tuple(item) for item in decoded.to_primitive().presentation_data_value_list]
        assert _presentation_data_values(bytearray(encoded), len(encoded)) == expected == values
        # A buffer kept from a longer PDU: only its first `end` bytes are this one.
        assert _presentation_data_values(bytearray(encoded) + rng.randbytes(50), len(encoded)) == expected
    whole = _p_data_pdu((1, b"\x03" + rng.randbytes(40)))
    item_too_long = whole[:6] + (41 + 2).to_bytes(4, "big") + whole[10:]
    item_without_a_header = whole[:2] + (6).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x01" + b"\x00"
    short_tail = whole[:2] + (len(whole) - 6 + 3).to_bytes(4, "big") + whole[6:] + b"\x00\x00\x00"
    for malformed in (whole[:-1], item_too_long, item_without_a_header, short_tail):
        assert _presentation_data_values(bytearray(malformed), len(malformed)) is None


class _TakenValues:
    """Stands in for DirectStores: keeps what each PDU gave it."""

    def __init__(self) -> None:
        self.taken: list[list[tuple[int, bytes]]] = []

    def take(self, values: list[tuple[int, bytes]]) -> None:
        self.taken.append(values)


def test_the_kept_pdu_buffer_gives_each_pdu_its_own_values_and_is_not_kept_after_a_huge_one() -> None:
    ours, peer = socket.socketpair()
    reader = object.__new__(_WaitingAssociationSocket)  # only its socket is needed to read
    reader.socket = ours
    dul = object.__new__(_DirectDataDUL)  # only the direct read is exercised
    dul._pdu_buffer = bytearray()
    stores = _TakenValues()
    dul._stores = stores  # type: ignore[assignment]
    rng = random.Random(5)
    pdus = [((1, b"\x00" + rng.randbytes(100_000)), (1, b"\x02" + rng.randbytes(7))),
            ((3, b"\x03" + rng.randbytes(40)),),  # shorter: the buffer still holds the first's tail
            ((1, b"\x00" + rng.randbytes(2 * 1024 * 1024)),),  # over 1 MiB
            ((1, b"\x02" + rng.randbytes(9)),)]
    sender = threading.Thread(target=lambda: peer.sendall(b"".join(_p_data_pdu(*values) for values in pdus)))
    sender.start()
    try:
        kept_sizes = []
        for _ in pdus:
            assert dul._read_data_directly(reader)
            kept_sizes.append(len(dul._pdu_buffer))
        assert stores.taken == [list(values) for values in pdus]
        assert kept_sizes[0] == kept_sizes[1] >= 100_000 + 16  # kept from one PDU to the next
        assert kept_sizes[2] == 0  # the 2 MiB one's buffer was let go
        assert 0 < kept_sizes[3] < 1024
    finally:
        sender.join(timeout=30)
        ours.close()
        peer.close()


@pytest.mark.parametrize("send_pdu", [4096, 131072])
def test_small_and_large_pdus_store_byte_exact_on_the_direct_path(harness: Harness, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  send_pdu: int) -> None:
    direct = _DirectDataDUL._read_data_directly
    taken: list[bool] = []

    def counted(self: _DirectDataDUL, sock: _WaitingAssociationSocket) -> bool:
        taken.append(direct(self, sock))
        return taken[-1]

    monkeypatch.setattr(_DirectDataDUL, "_read_data_directly", counted)
    dispatch_request = DirectStores._dispatch
    assembled: list[str] = []

    def dispatched(self: DirectStores, arriving: Any) -> None:
        assembled.append(str(arriving.request.AffectedSOPInstanceUID))
        dispatch_request(self, arriving)

    monkeypatch.setattr(DirectStores, "_dispatch", dispatched)
    paths = write_ct_series(tmp_path / "ct", 3, seed=4)
    result = subprocess.run(["storescu", "-R", "--max-send-pdu", str(send_pdu), "-aet", SCU_AE, "-aec", SCP_AE,
                             "127.0.0.1", str(harness.port), *map(str, paths)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    rows = harness.instances()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sent)
    for row in rows:
        assert _dataset_bytes(harness.storage_dir / row.path) == _dataset_bytes(sent[row.sop_instance_uid])
    # Every data PDU went straight to DIMSE (at least this many arrive); pynetdicom read only
    # the A-RELEASE-RQ.
    assert taken.count(True) >= sum(math.ceil(len(_dataset_bytes(p)) / send_pdu) for p in paths)
    assert taken.count(False) <= 1
    assert sorted(assembled) == sorted(sent)  # each request assembled on the direct path too


def test_plain_stores_are_served_in_the_dul_thread_and_an_echo_by_the_reactor(
        harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decode = receiver_module._decode_stage
    served_in: list[threading.Thread] = []

    def recorded(event: Any) -> Any:
        served_in.append(threading.current_thread())
        return decode(event)

    monkeypatch.setattr(receiver_module, "_decode_stage", recorded)
    paths = write_ct_series(tmp_path / "ct", 3, seed=8)
    assoc = _associate(harness.port, (CTImageStorage, [ExplicitVRLittleEndian]),
                       (Verification, [ImplicitVRLittleEndian]))
    try:
        statuses = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in paths]
        assert assoc.send_c_echo().Status == 0x0000  # not a store: pynetdicom's reactor answers it
    finally:
        assoc.release()
    assert statuses == [0x0000] * 3
    assert len(harness.instances()) == 3
    assert len(served_in) == 3
    assert all(isinstance(thread, DULServiceProvider) for thread in served_in)


def test_a_handler_that_raises_on_the_direct_path_is_answered_0xc211_and_the_association_goes_on(
        harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decode = receiver_module._decode_stage
    calls: list[int] = []

    def first_raises(event: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the handler")
        return decode(event)

    monkeypatch.setattr(receiver_module, "_decode_stage", first_raises)
    paths = write_ct_series(tmp_path / "ct", 2, seed=9)
    assoc = _associate(harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
    try:
        statuses = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in paths]
        assert assoc.is_established
    finally:
        assoc.release()
    assert statuses == [0xC211, 0x0000]
    assert [row.sop_instance_uid for row in harness.instances()] == [pydicom.dcmread(paths[1]).SOPInstanceUID]


def test_the_network_timeout_does_not_run_while_an_instance_is_stored_on_the_direct_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom's reactor checks the timeout only between messages; served in the DUL
    # thread, a store that outlasts it must not have its association aborted under it.
    harness = start_harness(tmp_path, network_timeout_s=1.0)
    try:
        record = receiver_module._record_stage
        slow_once: list[int] = []

        def slow(*args: Any, **kwargs: Any) -> Any:
            if not slow_once:
                slow_once.append(1)
                threading.Event().wait(3.0)  # three network timeouts
            return record(*args, **kwargs)

        monkeypatch.setattr(receiver_module, "_record_stage", slow)
        paths = write_ct_series(tmp_path / "ct", 2, seed=10)
        result = _storescu(harness.port, paths)
        assert result.returncode == 0, result.stderr
        assert len(harness.instances()) == 2
    finally:
        harness.close()


def test_an_observer_of_each_pdu_gets_pynetdicoms_path(harness: Harness, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(_DirectDataDUL, "_read_data_directly", lambda *args: pytest.fail("direct path taken"))
    harness.receiver._servers[0].bind(evt.EVT_PDU_RECV, lambda event: seen.append(type(event.pdu).__name__))
    paths = write_ct_series(tmp_path / "ct", 2, seed=6)
    result = _storescu(harness.port, paths)
    assert result.returncode == 0, result.stderr
    assert len(harness.instances()) == 2
    assert seen.count("P_DATA_TF") >= 4  # a command and a data set PDU per instance at least


def test_a_malformed_p_data_pdu_aborts_as_pynetdicom_does(harness: Harness) -> None:
    assoc = _associate(harness.port, (CTImageStorage, [ExplicitVRLittleEndian]))
    whole = _p_data_pdu((int(assoc.accepted_contexts[0].context_id or 1), b"\x03\x00"))
    overrunning = whole[:6] + (500).to_bytes(4, "big") + whole[10:]
    assert assoc.dul.socket is not None
    assoc.dul.socket.send(overrunning)
    wait_until(lambda: assoc.is_aborted or not assoc.is_established, 30, 0.05, "the receiver's A-ABORT")
    assert _dcmtk("echoscu", harness.port).returncode == 0  # and it carries on serving
