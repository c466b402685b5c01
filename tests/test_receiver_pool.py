"""Several receiver processes on one port (daemon/receiver_pool.py), against real peers:
dcmtk storescu and pynetdicom SCUs, a real SQLite file, real child processes.

Which process accepts a connection is the kernel's choice; to make a test about one
process, the other is held: serve's own receiver by stopping its accept loop, a child by
SIGSTOP. Held associations stay open meanwhile (the kernel keeps their sockets).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.callers import AllowedCaller
from headscreen.daemon.connections import (
    ACCEPT_DEFERRAL_MAX_S,
    ACCEPT_DEFERRAL_STEP_S,
    GuardedAssociationServer,
    SharedAssociationCount,
    address_key,
    connection_entry,
)
from headscreen.daemon.ingest_journal import IngestJournal
from headscreen.daemon.receiver import ASSOCIATION_LIMIT_STATUS, ReceiverConfig
from headscreen.daemon.receiver_pool import ReceiverPool, merge_snapshots, start_receivers
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from headscreen.db.models import IngestRejection, Instance
from receiver_helpers import (
    SCP_AE,
    SCU_AE,
    associate_once_a_slot_frees,
    closed_by_peer,
    idle_sockets,
    start_harness,
    write_ct_series,
)

GENEROUS_S = 60.0


def _config(storage: Path, **overrides: object) -> ReceiverConfig:
    options: dict[str, object] = {"allowed_callers": (AllowedCaller(SCU_AE),), "disk_min_free_mb": 0, **overrides}
    return ReceiverConfig(ae_title=SCP_AE, storage_dir=storage, bind_address="127.0.0.1", port=0,
                          **options)  # type: ignore[arg-type]


class PoolHarness:
    def __init__(self, tmp_path: Path, processes: int = 2, **overrides: object) -> None:
        self.url = f"sqlite:///{tmp_path / 'headscreen.db'}"
        upgrade(self.url)
        self.engine = make_engine(self.url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        self.storage_dir = tmp_path / "data"
        pool = start_receivers(_config(self.storage_dir, **overrides), self.sessions, processes=processes,
                               database_url=self.url)
        assert isinstance(pool, ReceiverPool)
        self.pool = pool
        self._closed = False

    @property
    def port(self) -> int:
        return self.pool.port

    def child_pid(self, index: int = 1) -> int:
        pid = self.pool.pids()[index]
        assert pid is not None
        return pid

    def pause_own_accepting(self) -> None:
        """Serve's own receiver stops accepting (its socket stays open for the children)."""
        for server in self._own_servers():
            socketserver.BaseServer.shutdown(server)  # the loop only: pynetdicom's would close the socket

    def resume_own_accepting(self) -> None:
        for server in self._own_servers():
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def associate_in_process_1(self, ae: AE, count: int) -> list[Any]:
        """`count` associations, all held by process 1 (serve's own receiver paused)."""
        self.pause_own_accepting()
        held = [ae.associate("127.0.0.1", self.port, ae_title=SCP_AE) for _ in range(count)]
        assert all(a.is_established for a in held)
        return held

    @contextmanager
    def only_own_accepting(self) -> Iterator[None]:
        """Process 1 stopped (SIGSTOP: it keeps what it holds and accepts nothing) and serve's
        own receiver accepting; process 1 goes on when the block ends."""
        os.kill(self.child_pid(), signal.SIGSTOP)
        try:
            self.resume_own_accepting()
            yield
        finally:
            os.kill(self.child_pid(), signal.SIGCONT)

    def _own_servers(self) -> list[GuardedAssociationServer]:
        return [s for s in self.pool.own._servers if isinstance(s, GuardedAssociationServer)]

    def instances(self) -> list[Instance]:
        with self.sessions() as session:
            return list(session.scalars(select(Instance)))

    def rejections(self) -> list[IngestRejection]:
        with self.sessions() as session:
            return list(session.scalars(select(IngestRejection)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.pool.shutdown()
        self.engine.dispose()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[PoolHarness]:
    harness = PoolHarness(tmp_path)
    yield harness
    harness.close()


def verification_ae() -> AE:
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(Verification)
    return ae


def _storescu(port: int, paths: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(["storescu", "-R", "-aet", SCU_AE, "-aec", SCP_AE, "127.0.0.1", str(port),
                             *map(str, paths)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stored_path(storage: Path, source: Path) -> Path:
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    return storage / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float = GENEROUS_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_study_over_four_associations_is_stored_whole_and_counted_once(pool: PoolHarness, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "in", 40)
    senders = [_storescu(pool.port, files[i::4]) for i in range(4)]
    for sender in senders:
        _, stderr = sender.communicate(timeout=300)
        assert sender.returncode == 0, stderr
    rows = pool.instances()
    assert len(rows) == len(files)
    for path in files:
        assert _same_instance(_stored_path(pool.storage_dir, path), path)
    pool.close()  # the last counts of every process arrive as it stops
    assert pool.pool.stats.snapshot()["stored"] == len(files)


def test_another_process_accepts_stores_and_journals_on_its_own(pool: PoolHarness, tmp_path: Path) -> None:
    assert pool.child_pid() != os.getpid()
    pool.pause_own_accepting()  # every connection now goes to process 1
    files = write_ct_series(tmp_path / "in", 6)
    sender = _storescu(pool.port, files)
    _, stderr = sender.communicate(timeout=300)
    assert sender.returncode == 0, stderr
    assert {r.sop_instance_uid for r in pool.instances()} == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert all(_stored_path(pool.storage_dir, p).is_file() for p in files)
    assert (pool.storage_dir / ".journal-1").is_dir()  # its own journal, not serve's
    _wait(lambda: pool.pool.stats.snapshot()["stored"] == len(files), "process 1 never reported its count")


def test_each_further_process_is_named_for_ps_and_top(pool: PoolHarness) -> None:
    assert Path(f"/proc/{pool.child_pid()}/comm").read_text().strip() == "hs-receiver-1"


def test_the_association_limit_counts_the_associations_of_every_process(tmp_path: Path) -> None:
    harness = PoolHarness(tmp_path, maximum_associations=2)
    ae, held = verification_ae(), []
    try:
        held = harness.associate_in_process_1(ae, 2)
        with harness.only_own_accepting():
            third = ae.associate("127.0.0.1", harness.port, ae_title=SCP_AE)
            assert third.is_rejected
            assert (third.acceptor.primitive.result_source, third.acceptor.primitive.diagnostic) == (0x03, 0x02)
            harness.pool.own.flush_refusals()
            assert [r.status for r in harness.rejections()] == [ASSOCIATION_LIMIT_STATUS]
        held.pop().release()
        # The slot process 1 freed is free in serve's own receiver too (shared count).
        fourth = associate_once_a_slot_frees(ae, harness.port, GENEROUS_S)
        assert fourth.is_established
        fourth.release()
    finally:
        for assoc in held:
            assoc.release()
        harness.close()


def test_the_per_address_limit_counts_the_connections_of_every_process(tmp_path: Path) -> None:
    harness = PoolHarness(tmp_path, max_connections_per_address=2, association_request_timeout_s=GENEROUS_S * 4)
    held = []
    try:
        held = harness.associate_in_process_1(verification_ae(), 2)
        with harness.only_own_accepting():
            (extra,) = idle_sockets(harness.port, ["127.0.0.1"])
            assert closed_by_peer(extra, GENEROUS_S)  # serve's receiver holds none, process 1 both
            extra.close()
            _wait(lambda: harness.pool.own.stats.snapshot()["connections"] == {"refused_address_limit": 1},
                  "the refusal was not counted")
            (other_address,) = idle_sockets(harness.port, ["127.0.0.2"])  # another address is not limited
            assert not closed_by_peer(other_address, 1.0)
            other_address.close()
    finally:
        for assoc in held:
            assoc.release()
        harness.close()


def test_the_idle_limit_counts_every_process_and_each_closes_only_its_own(tmp_path: Path) -> None:
    """Two idle connections in process 1 fill `max_idle_connections = 2`. Serve's own
    receiver, holding none, admits one more (it cannot close process 1's sockets); the
    next one there closes that one, its own oldest idle connection."""
    harness = PoolHarness(tmp_path, max_idle_connections=2, association_request_timeout_s=GENEROUS_S * 4)
    sockets = []
    try:
        harness.pause_own_accepting()
        sockets += idle_sockets(harness.port, ["127.0.0.5", "127.0.0.6"])
        _wait(lambda: harness.pool._opened[1] == 2, "process 1 did not accept both")
        with harness.only_own_accepting():
            (third,) = idle_sockets(harness.port, ["127.0.0.7"])
            sockets.append(third)
            _wait(lambda: harness.pool._opened[0] == 1, "serve's own receiver did not admit the third")
            (fourth,) = idle_sockets(harness.port, ["127.0.0.8"])
            sockets.append(fourth)
            assert closed_by_peer(third, GENEROUS_S)  # three idle in all: its own oldest made room
            assert not closed_by_peer(fourth, 1.0)
            assert harness.pool.own.stats.snapshot()["connections"] == {"evicted_idle": 1}
    finally:
        for sock in sockets:
            sock.close()
        harness.close()


def test_the_connection_table_keeps_each_process_s_part_and_forgets_a_dead_one(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    slots, opened, table = context.RawArray("i", 2), context.RawArray("i", 2), context.RawArray("q", 2 * 3)
    shares = [SharedAssociationCount(slots, i, tmp_path / "lock", opened, table) for i in range(2)]
    entries = [connection_entry(f"10.0.0.{n}", idle=n % 2 == 0) for n in range(5)]
    with shares[1].lock():
        shares[1].publish_connections(entries)
        assert shares[0].connections_elsewhere() == entries[:3]  # past its capacity: left out, never wrong
        assert shares[1].connections_elsewhere() == []
        shares[1].publish_connections(entries[:1])
        assert shares[0].connections_elsewhere() == entries[:1]
        shares[0].clear_process(1)
        assert shares[0].connections_elsewhere() == []
    assert connection_entry("10.0.0.1", idle=True) >> 1 == address_key("10.0.0.1") != address_key("10.0.0.2")
    assert 0 < address_key("") < 2 ** 62


def test_a_process_killed_is_started_again_and_replays_its_journal(pool: PoolHarness, tmp_path: Path) -> None:
    first = pool.child_pid()
    os.kill(first, signal.SIGKILL)
    _wait(lambda: not pool.pool.members[1].process.is_alive(), "process 1 did not die")
    # What a crash between the journal's sync and the row's commit leaves: a durable entry
    # (written here as process 1's journal would have), no row, no file.
    (source,) = write_ct_series(tmp_path / "in", 1)
    _journal_entry_without_row(pool.storage_dir / ".journal-1", source, pool.storage_dir)
    pool.pool.ensure()
    _wait(lambda: pool.pool.members[1].ready, "process 1 did not come back")
    assert pool.child_pid() != first
    (row,) = pool.instances()
    assert row.sop_instance_uid == str(pydicom.dcmread(source).SOPInstanceUID)
    assert _same_instance(pool.storage_dir / row.path, source)
    assert list((pool.storage_dir / ".journal-1").glob("*.journal")) == []
    # And it accepts again.
    pool.pause_own_accepting()
    more = write_ct_series(tmp_path / "more", 3, seed=7)
    sender = _storescu(pool.port, more)
    _, stderr = sender.communicate(timeout=300)
    assert sender.returncode == 0, stderr
    assert len(pool.instances()) == 4


def test_serve_s_own_receiver_replays_the_journal_of_a_process_no_longer_configured(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "in", 3)
    storage = tmp_path / "data"
    for path in files:
        _journal_entry_without_row(storage / ".journal-3", path, storage)
    harness = start_harness(tmp_path)  # one process: processes went from 4 to 1
    try:
        assert {r.sop_instance_uid for r in harness.instances()} == {
            str(pydicom.dcmread(p).SOPInstanceUID) for p in files}
        assert all(_same_instance(_stored_path(storage, p), p) for p in files)
        assert list((storage / ".journal-3").glob("*.journal")) == []
    finally:
        harness.close()


def test_the_other_processes_die_with_serve(tmp_path: Path) -> None:
    """kill -9 of serve must not leave a process accepting on its port alone."""
    url = f"sqlite:///{tmp_path / 'headscreen.db'}"
    upgrade(url)
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_receiver_pool import _config
        from headscreen.daemon.receiver_pool import start_receivers
        from headscreen.db.engine import make_engine, session_factory
        if __name__ == "__main__":
            pool = start_receivers(_config(Path({str(tmp_path / 'data')!r})),
                                   session_factory(make_engine({url!r})), processes=2, database_url={url!r})
            print(pool.port, pool.pids()[1], flush=True)
            time.sleep(600)
    """)
    (tmp_path / "serve_like.py").write_text(script)
    process = subprocess.Popen([sys.executable, str(tmp_path / "serve_like.py")], stdout=subprocess.PIPE,
                               text=True, cwd=tmp_path)
    try:
        assert process.stdout is not None
        port, child = map(int, process.stdout.readline().split())
        assert _alive(child)
        process.kill()
        process.wait(timeout=30)
        _wait(lambda: not _alive(child), "the other receiver process outlived serve")
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(Verification)
        assert not ae.associate("127.0.0.1", port, ae_title=SCP_AE).is_established
    finally:
        if process.poll() is None:
            process.kill()


def test_counters_of_every_process_are_summed() -> None:
    merged = merge_snapshots([
        {"stored": 2, "refused": {"0xA700": 1}, "stage_seconds": {"decode": 0.5}, "journal_syncs": 3},
        {"stored": 5, "refused": {"0xA700": 2, "0xC210": 1}, "stage_seconds": {"decode": 0.25}, "journal_syncs": 1},
    ])
    assert merged == {"stored": 7, "refused": {"0xA700": 3, "0xC210": 1}, "stage_seconds": {"decode": 0.75},
                      "journal_syncs": 4}


def _same_instance(stored: Path, sent: Path) -> bool:
    a, b = pydicom.dcmread(stored), pydicom.dcmread(sent)
    return bool(a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _journal_entry_without_row(directory: Path, source: Path, storage: Path) -> None:
    """A durable journal entry for `source`, as a receiver writes it before its file and row."""
    from headscreen.daemon.storage import InstanceStore
    from headscreen.db.types import InstanceRecord

    ds = pydicom.dcmread(source, stop_before_pixels=True)
    data = source.read_bytes()
    relative = InstanceStore(storage).relative_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                                    str(ds.SOPInstanceUID))
    record = InstanceRecord(study_instance_uid=str(ds.StudyInstanceUID),
                            series_instance_uid=str(ds.SeriesInstanceUID), sop_instance_uid=str(ds.SOPInstanceUID),
                            sop_class_uid=CTImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
                            path=relative.as_posix(), size_bytes=len(data), instance_number=int(ds.InstanceNumber),
                            modality="CT")
    journal = IngestJournal(directory, sync_files=lambda paths: None, sync_records=lambda: None,
                            idle_checkpoint_s=3600)
    journal.start()
    journal.wait_durable(journal.append(record, data))
    journal.close()  # the entry is not settled (no file, no row): its segment stays, as after a crash



def test_a_busier_process_defers_its_accept_to_a_less_busy_one(tmp_path: Path) -> None:
    opened = multiprocessing.get_context("spawn").RawArray("i", 3)
    shares = [SharedAssociationCount(opened, i, tmp_path / "lock", opened) for i in range(3)]
    shares[0].note_open(2)
    shares[1].note_open(1)
    shares[2].note_open(1)
    assert shares[1].accept_deferral() == shares[2].accept_deferral() == 0.0  # the least busy accept at once
    assert shares[0].accept_deferral() == pytest.approx(ACCEPT_DEFERRAL_STEP_S)
    shares[0].note_open(40)
    assert shares[0].accept_deferral() == ACCEPT_DEFERRAL_MAX_S  # bounded: a stuck peer delays it only a little
    assert SharedAssociationCount(opened, 0, tmp_path / "lock").accept_deferral() == 0.0  # one process: never

