"""The ingest journal (daemon/ingest_journal.py): one fdatasync per acknowledged instance,
replay after a crash, and the receiver's promise that Success means durable and recorded.

The kill -9 test runs a real `headscreen serve` (SQLite and PostgreSQL), kills its
process group in the middle of a C-STORE stream and checks, after a restart, that every
acknowledged instance has its row and its exact bytes under the recorded path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import delete, select

import headscreen.daemon.ingest_journal as journal_module
from headscreen.daemon.ingest_journal import IngestJournal, recover
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.models import Instance
from headscreen.db.types import InstanceRecord
from receiver_helpers import SCU_AE, start_harness, write_ct_series
from serve_harness import Daemon, have, wait_until


def _record(sop: str, path: str = "") -> InstanceRecord:
    return InstanceRecord(study_instance_uid="1.2", series_instance_uid="1.2.3", sop_instance_uid=sop,
                          sop_class_uid=CTImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
                          path=path or f"1.2/1.2.3/{sop}.dcm", size_bytes=3, instance_number=1)


class _Calls:
    def __init__(self) -> None:
        self.files: list[list[Path]] = []
        self.records = 0

    def sync_files(self, paths: list[Path]) -> None:
        self.files.append(list(paths))

    def sync_records(self) -> None:
        self.records += 1


def test_entries_are_durable_then_checkpointed_and_the_segment_removed(tmp_path: Path) -> None:
    calls = _Calls()
    journal = IngestJournal(tmp_path / "j", sync_files=calls.sync_files, sync_records=calls.sync_records,
                            idle_checkpoint_s=3600)
    journal.start()
    try:
        entries = [journal.append(_record(f"1.2.3.{i}"), b"abc") for i in range(5)]
        for entry in entries:
            journal.wait_durable(entry)
        assert journal.syncs >= 1
        segment = next((tmp_path / "j").glob("*.journal"))
        assert segment.stat().st_size > 5 * 3
        # Unsettled entries (file or row not done) keep their segment.
        assert journal.checkpoint(idle_s=0.0) == 0
        assert calls.records == 0
        for i, entry in enumerate(entries):
            journal.settle(entry, tmp_path / f"{i}.dcm")
        assert journal.checkpoint(idle_s=0.0) == 1
        assert calls.files == [[tmp_path / f"{i}.dcm" for i in range(5)]]
        assert calls.records == 1
        assert not segment.exists()
    finally:
        journal.close()


def test_recover_replays_in_order_and_stops_at_a_torn_entry(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = IngestJournal(directory, sync_files=lambda paths: None, sync_records=lambda: None,
                            segment_bytes=64)  # every entry in a segment of its own
    journal.start()
    for i in range(4):
        journal.wait_durable(journal.append(_record(f"1.2.3.{i}"), f"bytes-{i}".encode()))
    journal._stop.set()  # a crash: the threads stop, nothing is checkpointed
    segments = sorted(directory.glob("*.journal"))
    assert len(segments) == 4
    # The crash cut the last append short: that entry was never acknowledged.
    with open(segments[-1], "r+b") as stream:
        stream.truncate(segments[-1].stat().st_size - 2)
    applied: list[tuple[str, bytes]] = []
    count = recover(directory, lambda entries: applied.extend((r.sop_instance_uid, d) for r, d in entries))
    assert applied == [(f"1.2.3.{i}", f"bytes-{i}".encode()) for i in range(3)]
    assert (count.segments, count.entries, count.torn) == (4, 3, 1)
    assert list(directory.glob("*.journal")) == []


def test_a_failed_replay_keeps_the_segments_for_the_next_start(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = IngestJournal(directory, sync_files=lambda paths: None, sync_records=lambda: None)
    journal.start()
    journal.wait_durable(journal.append(_record("1.2.3.9"), b"x"))
    journal._stop.set()

    def fail(entries: object) -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError):
        recover(directory, fail)
    assert len(list(directory.glob("*.journal"))) == 1


def test_success_is_answered_only_after_the_journal_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each acknowledged instance lies within what an fdatasync had covered when the
    response arrived; an SCP that answered before syncing fails this."""
    synced_upto: dict[int, int] = {}
    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        size = os.fstat(fd).st_size  # every byte up to here is on disk when the call returns
        real_fdatasync(fd)
        synced_upto[os.fstat(fd).st_ino] = max(synced_upto.get(os.fstat(fd).st_ino, 0), size)

    monkeypatch.setattr(journal_module.os, "fdatasync", recording_fdatasync)
    monkeypatch.setattr(IngestJournal, "checkpoint", lambda self, idle_s=None: 0)  # keep the segment to look at
    harness = start_harness(tmp_path)
    try:
        files = write_ct_series(tmp_path / "in", 6)
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", harness.port, ae_title="HEADSCREEN")
        assert assoc.is_established
        try:
            for path in files:
                status = assoc.send_c_store(pydicom.dcmread(path))
                assert status.Status == 0x0000
                # One association: the entry just acknowledged is the last one in the segment.
                segment = max((harness.storage_dir / ".journal").glob("*.journal"))
                stat = segment.stat()
                assert synced_upto.get(stat.st_ino, 0) >= stat.st_size
                # Its file is whole under its path and its row committed before Success.
                dataset = pydicom.dcmread(path, stop_before_pixels=True)
                stored = (harness.storage_dir / str(dataset.StudyInstanceUID) / str(dataset.SeriesInstanceUID)
                          / f"{dataset.SOPInstanceUID}.dcm")
                assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(path).PixelData
                assert len(harness.instances()) == files.index(path) + 1
        finally:
            assoc.release()
        assert len(harness.instances()) == len(files)
    finally:
        harness.close()


def test_rows_and_files_lost_after_acknowledgement_come_back_from_the_journal(
        tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a power cut may take after Success (the unsynced file and the relaxed commit)
    is restored at the next start, before the receiver listens."""
    monkeypatch.setattr(IngestJournal, "checkpoint", lambda self, idle_s=None: 0)  # the crash came first
    files = write_ct_series(tmp_path / "in", 5)
    sessions = session_factory(make_engine(db_url))
    harness = start_harness(tmp_path, sessions)
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", harness.port, ae_title="HEADSCREEN")
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.release()
    harness.receiver.shutdown()
    acked = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in files}
    rows = harness.instances()
    assert {r.sop_instance_uid for r in rows} == set(acked)
    # The power cut: two rows never reached the disk, one file is truncated, one is gone.
    with sessions() as session:
        session.execute(delete(Instance).where(Instance.sop_instance_uid.in_([r.sop_instance_uid for r in rows[:2]])))
        session.commit()
    (harness.storage_dir / rows[2].path).write_bytes(b"")
    (harness.storage_dir / rows[3].path).unlink()
    assert list((harness.storage_dir / ".journal").glob("*.journal"))
    monkeypatch.undo()

    restarted = start_harness(tmp_path, sessions)
    try:
        recovered = restarted.instances()
        assert {r.sop_instance_uid for r in recovered} == set(acked)
        for row in recovered:
            stored = restarted.storage_dir / row.path
            dataset = pydicom.dcmread(stored)
            assert dataset.SOPInstanceUID == row.sop_instance_uid
            assert dataset.PixelData == pydicom.dcmread(acked[row.sop_instance_uid]).PixelData
            assert stored.stat().st_size == row.size_bytes
        assert list((restarted.storage_dir / ".journal").glob("*.journal")) == []
    finally:
        restarted.close()


def _send_until_killed(files: list[Path], port: int, kill_after: int, kill: threading.Event) -> dict[str, Path]:
    """C-STORE one by one; ask for the kill after `kill_after` acknowledgements. Returns the
    acknowledged SOP Instance UIDs (Success only)."""
    acked: dict[str, Path] = {}
    ae = AE(ae_title="TESTSCU")
    ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="HEADSCREEN")
    assert assoc.is_established
    try:
        for path in files:
            dataset = pydicom.dcmread(path)
            try:
                status = assoc.send_c_store(dataset)
            except (RuntimeError, OSError):
                break
            if not assoc.is_established or status is None or "Status" not in status:
                break
            if status.Status == 0x0000:
                acked[str(dataset.SOPInstanceUID)] = path
            if len(acked) == kill_after:
                kill.set()
    finally:
        if assoc.is_established:
            assoc.abort()
    return acked


@pytest.mark.slow
def test_kill9_during_ingest_loses_no_acknowledged_instance(tmp_path: Path, db_url: str) -> None:
    for tool in ("echoscu",):
        if not have(tool):
            pytest.fail(f"{tool} (dcmtk) missing: run tests/install-system-deps.sh")
    files = write_ct_series(tmp_path / "in", 60, rows=128, cols=128)
    daemon = Daemon(tmp_path / "serve", database_url=db_url, workers=0)
    daemon.start()
    kill = threading.Event()
    killer = threading.Thread(target=lambda: kill.wait(300) and daemon.kill9())
    killer.start()
    try:
        acked = _send_until_killed(files, daemon.port, kill_after=25, kill=kill)
        killer.join()
        assert 25 <= len(acked) < len(files)  # killed in the middle of the stream
        daemon.start()  # replays the journal before listening
        with daemon.sessions()() as session:
            rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
        lost = [uid for uid in acked if uid not in rows]
        assert lost == []
        for uid, source in acked.items():
            stored = daemon.storage / rows[uid].path
            dataset = pydicom.dcmread(stored)
            assert dataset.SOPInstanceUID == uid
            assert dataset.PixelData == pydicom.dcmread(source).PixelData
        wait_until(lambda: not list((daemon.storage / ".journal").glob("*.journal")), 60, what="journal checkpoint")
    finally:
        kill.set()
        killer.join()
        daemon.close()


@pytest.mark.slow
def test_kill9_of_serve_with_two_receiver_processes_loses_no_acknowledged_instance(
        tmp_path: Path, db_url: str) -> None:
    """[receiver] processes = 2: four associations at once, so both processes store; serve's
    process group is killed mid-stream; the restart replays both processes' journals."""
    files = write_ct_series(tmp_path / "in", 120, rows=128, cols=128)
    daemon = Daemon(tmp_path / "serve", database_url=db_url, workers=0, extra="[receiver]\nprocesses = 2\n")
    daemon.start()  # answers C-ECHO once its own receiver listens; the second process follows
    log = daemon.workdir / "serve.log"
    wait_until(lambda: "action=receiver_pool_start processes=2" in log.read_text(), 120, what="both processes")
    kill = threading.Event()
    killer = threading.Thread(target=lambda: kill.wait(300) and daemon.kill9())
    killer.start()
    acked: dict[str, Path] = {}
    senders = [threading.Thread(target=lambda part=files[i::4]: acked.update(
        _send_until_killed(part, daemon.port, kill_after=10, kill=kill))) for i in range(4)]
    try:
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        killer.join()
        assert 10 <= len(acked) < len(files)
        daemon.start()  # serve's own receiver replays every process's journal before listening
        with daemon.sessions()() as session:
            rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
        assert [uid for uid in acked if uid not in rows] == []
        for uid, source in acked.items():
            dataset = pydicom.dcmread(daemon.storage / rows[uid].path)
            assert dataset.SOPInstanceUID == uid
            assert dataset.PixelData == pydicom.dcmread(source).PixelData
        wait_until(lambda: not list(daemon.storage.glob(".journal*/*.journal")), 60, what="journal checkpoints")
    finally:
        kill.set()
        killer.join()
        daemon.close()


def test_an_entry_checksummed_by_zlib_is_replayed_and_one_with_a_flipped_byte_is_torn(tmp_path: Path) -> None:
    # The journal's CRC-32 must stay zlib's: a journal left by an earlier version replays.
    directory = tmp_path / "j"
    directory.mkdir()
    record = _record("1.2.3.7")
    meta = json.dumps(dataclasses.asdict(record), separators=(",", ":")).encode()
    data = os.urandom(64 * 1024)
    entry = journal_module._HEADER.pack(journal_module._MAGIC, len(meta), len(data),
                                        zlib.crc32(data, zlib.crc32(meta))) + meta + data
    flipped = bytearray(entry)
    flipped[-100] ^= 0x01
    (directory / "000000000001.journal").write_bytes(entry)
    (directory / "000000000002.journal").write_bytes(bytes(flipped))
    applied: list[tuple[InstanceRecord, bytes]] = []
    count = recover(directory, applied.extend)
    assert applied == [(record, data)]
    assert (count.entries, count.torn) == (1, 1)
