"""InstanceStore and header checks without a network: paths, atomicity, watermark, truncation."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from headscreen.daemon.callers import AllowedCaller, CallerPolicy
from headscreen.daemon.dataset_check import parse_header
from headscreen.daemon.instance_record import _along_normal, slice_position
from headscreen.daemon.storage import InstanceStore, InvalidUid, StorageFull, study_directory
from headscreen.db.group_commit import GroupCommit
from headscreen.db.types import InstanceRecord, RecordOutcome
from headscreen.errors import InputRejected
from headscreen.imaging.volume import slice_normal
from receiver_helpers import write_ct_series

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def test_write_lands_at_the_documented_path_with_the_exact_bytes(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    stored = store.write(STUDY, SERIES, SOP, b"DICM-bytes")
    assert stored.relative_path == f"{STUDY}/{SERIES}/{SOP}.dcm"
    assert stored.path == tmp_path / stored.relative_path
    assert stored.path.read_bytes() == b"DICM-bytes"
    assert stored.size_bytes == 10
    assert [p.name for p in stored.path.parent.iterdir()] == [f"{SOP}.dcm"]


def test_rewrite_of_the_same_sop_replaces_atomically(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    first = store.write(STUDY, SERIES, SOP, b"first")
    inode_reader = first.path.open("rb")  # a reader holding the old file keeps a whole file
    second = store.write(STUDY, SERIES, SOP, b"second version")
    assert second.path == first.path
    assert second.path.read_bytes() == b"second version"
    assert inode_reader.read() == b"first"
    inode_reader.close()
    assert len(list(second.path.parent.iterdir())) == 1


@pytest.mark.parametrize("bad", ["", "../../etc", "1.2.a", "1..2", ".1.2", "1.2/3", "1" * 65, "1.2\\3"])
def test_uids_that_are_not_digits_and_dots_are_refused(tmp_path: Path, bad: str) -> None:
    store = InstanceStore(tmp_path)
    with pytest.raises(InvalidUid):
        store.write(STUDY, SERIES, bad, b"x")
    assert list(tmp_path.iterdir()) == []


def test_trailing_space_padding_is_stripped(tmp_path: Path) -> None:
    stored = InstanceStore(tmp_path).write(STUDY + " ", SERIES + "\x00", SOP, b"x")
    assert stored.relative_path == f"{STUDY}/{SERIES}/{SOP}.dcm"


def test_watermark_refuses_before_anything_is_written(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_mb=1 << 40)
    with pytest.raises(StorageFull):
        store.write(STUDY, SERIES, SOP, b"x")
    assert list(tmp_path.iterdir()) == []


def test_watermark_counts_the_incoming_bytes(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    free = store.free_bytes()
    store.min_free_bytes = max(free - 1024 * 1024, 0)
    store.check_space(1024)
    with pytest.raises(StorageFull):
        store.check_space(64 * 1024 * 1024)


def test_failed_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = InstanceStore(tmp_path)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        store.write(STUDY, SERIES, SOP, b"x" * 100)
    assert list(tmp_path.rglob("*")) != []  # the directories exist
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_resend_removes_the_temporary_file_a_crash_left(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    first = store.write(STUDY, SERIES, SOP, b"x")
    stale = first.path.parent / f".{first.path.name}.tmp"
    stale.write_bytes(b"half a file from a killed process")
    store.write(STUDY, SERIES, SOP, b"whole")
    assert sorted(p.name for p in first.path.parent.iterdir()) == [first.path.name]
    assert first.path.read_bytes() == b"whole"


def test_concurrent_writes_of_one_sop_never_interleave(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, durable=False)
    payloads = [bytes([n]) * 200_000 for n in range(8)]
    threads = [threading.Thread(target=store.write, args=(STUDY, SERIES, SOP, p)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (only,) = (tmp_path / STUDY / SERIES).iterdir()
    assert only.read_bytes() in payloads


def test_removed_directory_is_recreated(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    first = store.write(STUDY, SERIES, SOP, b"x")
    first.path.unlink()
    first.path.parent.rmdir()  # as a retention clean-up would
    again = store.write(STUDY, SERIES, SOP + "1", b"y")
    assert again.path.read_bytes() == b"y"


# --- header parsing ---------------------------------------------------------------------------


def _body(path: Path) -> bytes:
    raw = path.read_bytes()
    meta_len = int(pydicom.dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)
    return raw[128 + 4 + 12 + meta_len:]


def test_header_parses_without_pixel_data_and_positions_are_projected(tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path, 1, seed=1)
    header = parse_header(_body(path), UID(ExplicitVRLittleEndian))
    assert "PixelData" not in header
    assert header.Modality == "CT"
    assert slice_position(header) == 0.0
    header.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: normal is -x
    header.ImagePositionPatient = [12.5, 0, 0]
    assert slice_position(header) == pytest.approx(-12.5)


def test_slice_position_is_the_projection_on_slice_normal() -> None:
    """The receiver's plain-float projection agrees with imaging.volume.slice_normal, the
    degenerate and non-finite cases included."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        row, col = rng.normal(size=3), rng.normal(size=3)
        orientation = [*(row / np.linalg.norm(row)), *(col / np.linalg.norm(col))]
        position = list(rng.normal(scale=200, size=3))
        expected = float(np.asarray(position) @ slice_normal(orientation))
        assert _along_normal(position, orientation) == pytest.approx(expected, rel=1e-12, abs=1e-9)
    assert _along_normal([1, 2, 3], [1, 0, 0, 1, 0, 0]) == 0.0  # parallel directions: the zero normal
    assert _along_normal([1, 2, 3], [0, 0, 0, 0, 0, 0]) == 0.0
    assert _along_normal([1, 2, 3], [1, 0, 0, math.nan, 1, 0]) == 0.0
    assert _along_normal([math.inf, 0, 0], [1, 0, 0, 0, 1, 0]) is None
    diagonal = [1 / math.sqrt(2), -1 / math.sqrt(2), 0, 1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]
    assert _along_normal([1.5e308, 1.5e308, 1.5e308], diagonal) is None  # the sum overflows
    assert _along_normal([1, 2], [1, 0, 0, 0, 1, 0]) is None
    assert _along_normal([1, 2, 3], [1, 0, 0, 0, 1]) is None
    assert _along_normal(["a", 2, 3], [1, 0, 0, 0, 1, 0]) is None
    assert _along_normal(5.0, [1, 0, 0, 0, 1, 0]) is None


def test_implicit_vr_header_parses(tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path, 1, seed=2)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out = tmp_path / "implicit.dcm"
    ds.save_as(out, implicit_vr=True, little_endian=True)
    header = parse_header(_body(out), UID(ImplicitVRLittleEndian))
    assert header.SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("cut", [1, 1000, 8191])
def test_truncated_native_pixel_data_is_detected(tmp_path: Path, cut: int) -> None:
    (path,) = write_ct_series(tmp_path, 1, seed=3)
    body = _body(path)
    with pytest.raises(InputRejected, match="truncated"):
        parse_header(body[:-cut], UID(ExplicitVRLittleEndian))


def test_truncated_encapsulated_pixel_data_is_detected(tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path, 1, seed=4)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    out = tmp_path / "rle.dcm"
    ds.save_as(out)
    body = _body(out)
    assert parse_header(body, UID(RLELossless)).SOPInstanceUID == ds.SOPInstanceUID
    with pytest.raises(InputRejected):
        parse_header(body[:-20], UID(RLELossless))


def test_empty_and_garbage_bodies_are_rejected() -> None:
    with pytest.raises(InputRejected):
        parse_header(b"", UID(ExplicitVRLittleEndian))


# --- caller policy ----------------------------------------------------------------------------


def test_caller_policy_matches_title_and_optional_host() -> None:
    policy = CallerPolicy([AllowedCaller("PACS"), AllowedCaller("MODALITY", host="10.0.0.7")], allow_any=False)
    assert policy.refusal("PACS", "192.168.1.1") is None
    assert policy.refusal("PACS  ", "::ffff:192.168.1.1") is None
    assert policy.refusal("MODALITY", "10.0.0.7") is None
    assert policy.refusal("MODALITY", "::ffff:10.0.0.7") is None
    assert "host" in (policy.refusal("MODALITY", "10.0.0.8") or "")
    assert "allow-list" in (policy.refusal("pacs", "10.0.0.7") or "")  # AE titles are case-sensitive
    assert CallerPolicy([], allow_any=False).refusal("PACS", "10.0.0.7") is not None
    assert CallerPolicy([], allow_any=True).refusal("ANY", None) is None
    # The settings layer may hand over (ae_title, host) pairs or bare titles.
    pairs = CallerPolicy([("PACS", None), ("CT1", "10.0.0.9"), "MR1"], allow_any=False)
    assert pairs.refusal("PACS", "1.2.3.4") is None
    assert pairs.refusal("MR1", "1.2.3.4") is None
    assert pairs.refusal("CT1", "10.0.0.9") is None
    assert pairs.refusal("CT1", "10.0.0.8") is not None
    with pytest.raises(ValueError, match="allowed_callers"):
        CallerPolicy([("", None)], allow_any=False)


def test_study_directory_matches_where_instances_are_written(tmp_path: Path) -> None:
    stored = InstanceStore(tmp_path).write(STUDY, SERIES, SOP, b"x")
    assert stored.path.parent.parent == study_directory(tmp_path, STUDY)
    with pytest.raises(InvalidUid):
        study_directory(tmp_path, "../..")


# --- group commit -----------------------------------------------------------------------------


def _record(n: int) -> InstanceRecord:
    return InstanceRecord(study_instance_uid="1.2", series_instance_uid="1.2.3", sop_instance_uid=f"1.2.3.{n}",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                          path=f"1.2/1.2.3/1.2.3.{n}.dcm", size_bytes=n)


def test_group_commit_batches_concurrent_rows_and_isolates_a_bad_one() -> None:
    waiting = 6
    first_batch_entered = threading.Event()
    release_first_batch = threading.Event()
    batches: list[list[int]] = []

    def commit(records: list[InstanceRecord]) -> list[RecordOutcome]:
        batches.append([r.size_bytes for r in records])
        if len(batches) == 1:
            first_batch_entered.set()
            release_first_batch.wait(timeout=30)  # hold the lead while the others queue up
        if any(r.size_bytes == 3 for r in records):
            raise RuntimeError("row 3 is bad")
        return [RecordOutcome(created=True, study_reopened=False, study_id=r.size_bytes) for r in records]

    def commit_one(record: InstanceRecord) -> RecordOutcome:
        return commit([record])[0]

    group = GroupCommit(commit, commit_one)
    results: dict[int, object] = {}

    def submit(n: int) -> None:
        try:
            results[n] = group.submit(_record(n)).study_id
        except RuntimeError as exc:
            results[n] = str(exc)

    leader = threading.Thread(target=submit, args=(0,))
    leader.start()
    assert first_batch_entered.wait(timeout=30)
    others = [threading.Thread(target=submit, args=(n,)) for n in range(1, waiting + 1)]
    for thread in others:
        thread.start()
    # Submitters block inside submit() with no event to await, so watch the queue fill (bounded).
    deadline = time.monotonic() + 30
    while len(group._queue) < waiting and time.monotonic() < deadline:  # noqa: SLF001
        threading.Event().wait(0.001)
    release_first_batch.set()
    for thread in [leader, *others]:
        thread.join(timeout=30)

    assert results == {0: 0, 1: 1, 2: 2, 3: "row 3 is bad", 4: 4, 5: 5, 6: 6}
    assert batches[0] == [0]
    assert batches[1] == [1, 2, 3, 4, 5, 6]  # everything queued behind the lead went in one batch
    assert sorted(b[0] for b in batches[2:]) == [1, 2, 3, 4, 5, 6]  # then row by row after the failure
