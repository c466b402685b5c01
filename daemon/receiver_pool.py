"""Several receiver processes on one port, so that ingest uses more than one core.

One receiver process is bound by Python's GIL to about one core: with four associations
at once it stored a 300-slice CT at 0.57-0.66x Orthanc's rate on two cores (bench/ingest.py). With `[receiver] processes
= N`, `serve` runs its own receiver (process 0) and N - 1 more processes, each a whole
receiver (daemon.receiver.start_receiver) with its own threads, ingest journal
(`.journal-k` below the storage root) and database connections. They accept on
serve's own listening sockets, handed to them at start (not SO_REUSEPORT, which would
let a stray second daemon on the same port take half of the connections): whichever
process is free first accepts a connection, and the others go back to waiting.

What holds across processes:
- an instance is acknowledged only once it is durable and recorded, as in one process
  (each process's journal, file and row, as daemon/receiver.py describes);
- after a crash, serve's own receiver replays every process's journal before it listens
  (and so before any other process or the workers start); a process that dies alone is
  started again and replays its own journal first;
- `max_associations`, `max_connections_per_address` and `max_idle_connections` count
  the connections of every process (shared memory; daemon.connections.ConnectionGuard);
- each process stops when serve stops, and dies with it when serve is killed (the
  kernel's parent-death signal), so no orphan keeps accepting on serve's port;
- /metrics and /healthz report the counters of every process together.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.connections import SharedAssociationCount
from headscreen.daemon.gc_policy import freeze_startup_objects
from headscreen.daemon.receiver import ProcessShare, Receiver, ReceiverConfig, start_receiver

logger = logging.getLogger(__name__)

# How often a process reports its counters and republishes the associations it holds.
REPORT_INTERVAL_S = 1.0
START_TIMEOUT_S = 120.0  # a process may first replay a large journal
STOP_TIMEOUT_S = 15.0
# Below the storage root, beside the journals: the flock the association count is kept under.
LOCK_FILE = ".receiver-processes.lock"
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
PROCESS_NAME_PREFIX = "hs-receiver-"  # the kernel keeps 15 bytes of a process name
CONNECTION_TABLE_MARGIN = 16


class PoolStartError(RuntimeError):
    """A receiver process could not start (its log says why)."""


@dataclass
class _Member:
    index: int
    process: multiprocessing.process.BaseProcess
    reports: Connection  # the read end of its own pipe: a process that dies mid-report spoils only that
    ready: bool = False
    retired: bool = False  # it ended; its pipe is closed by the reader thread, which may be waiting on it


class PoolStats:
    """The counters of every receiver process together (ReceiverStats.snapshot's shape)."""

    def __init__(self, own: Callable[[], dict[str, Any]]) -> None:
        self._own = own
        self._lock = threading.Lock()
        self._latest: dict[int, dict[str, Any]] = {}
        self._retired: list[dict[str, Any]] = []  # the last report of each process that ended

    def report(self, index: int, snapshot: dict[str, Any]) -> None:
        with self._lock:
            self._latest[index] = snapshot

    def retire(self, index: int) -> None:
        """The process ended: its counts stay in the totals, and its next incarnation starts from 0."""
        with self._lock:
            last = self._latest.pop(index, None)
            if last is not None:
                self._retired.append(last)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            parts = [self._own(), *self._latest.values(), *self._retired]
        return merge_snapshots(parts)


def merge_snapshots(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters summed key by key (numbers, and dicts of numbers)."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                into = total.setdefault(key, {})
                for name, count in value.items():
                    into[name] = into.get(name, 0) + count
            else:
                total[key] = total.get(key, 0) + value
    return total


class ReceiverPool:
    """serve's own receiver (process 0) plus `processes - 1` receiver processes on its
    sockets. Answers what daemon.receiver.Receiver answers to serve and its console.

    Nothing here is shared through a lock a killed process could hold: each process is
    stopped by SIGTERM, reports through a pipe of its own, and counts associations under
    an flock (daemon.connections.SharedAssociationCount).
    """

    def __init__(self, config: ReceiverConfig, session_factory: sessionmaker[Session], *, processes: int,
                 database_url: str, settings: Any = None) -> None:
        if processes < 2:
            raise ValueError("ReceiverPool: two processes or more (one is start_receiver alone)")
        self.config = config
        self.processes = processes
        self.database_url = database_url
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._slots = self._context.RawArray("i", processes)
        self._opened = self._context.RawArray("i", processes)
        self._connections = self._context.RawArray("q", processes * connection_table_capacity(config))
        config.storage_dir.mkdir(parents=True, exist_ok=True)
        self._lock_path = config.storage_dir / LOCK_FILE
        self._admin = self._share(0)  # for zeroing the slot of a process that died
        # First, and alone: its start replays every process's journal.
        self.own = start_receiver(config, session_factory, ProcessShare(0, self._share(0)))
        self.stats = PoolStats(self.own.stats.snapshot)
        self.members: dict[int, _Member] = {}
        self._retired: list[_Member] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._read_reports, name="ReceiverPoolReports", daemon=True)

    @property
    def port(self) -> int:
        return self.own.port

    @property
    def tls_port(self) -> int | None:
        return self.own.tls_port

    def start(self) -> None:
        """Start every other process and wait until each listens (PoolStartError if one cannot)."""
        for index in range(1, self.processes):
            self._spawn(index)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for member in list(self.members.values()):
            while not member.ready:
                if not member.process.is_alive():
                    raise PoolStartError(f"receiver process {member.index} exited with {member.process.exitcode} "
                                         "while starting; its log says why")
                if time.monotonic() > deadline:
                    raise PoolStartError(f"receiver process {member.index} did not start in {START_TIMEOUT_S:.0f} s")
                time.sleep(0.05)
        logger.info("receiver processes listening", extra={"action": "receiver_pool_start",
                                                           "processes": self.processes, "port": self.port})

    def ensure(self) -> None:
        """Start again a process that died (serve's loop calls this every second)."""
        for index, member in list(self.members.items()):
            if member.process.is_alive() or self._stopping.is_set():
                continue
            logger.warning("receiver process exited; starting a new one",
                           extra={"action": "receiver_process_restart", "receiver_process": index,
                                  "exitcode": member.process.exitcode})
            self._forget(member)
            self._spawn(index)

    def pids(self) -> dict[int, int | None]:
        return {index: member.process.pid for index, member in self.members.items()}

    def shutdown(self, wait_s: float = 5.0) -> None:
        """Stop the other processes (each as Receiver.shutdown does), then serve's own."""
        self._stopping.set()
        for member in self.members.values():
            if member.process.is_alive():
                member.process.terminate()  # SIGTERM: its receiver stops, reports, exits
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for member in self.members.values():
            member.process.join(max(0.0, deadline - time.monotonic()))
            if member.process.is_alive():
                logger.error("receiver process did not stop in time; killing it",
                             extra={"action": "receiver_process_kill", "receiver_process": member.index})
                member.process.kill()
                member.process.join()
        if self._reader.is_alive():
            self._reader.join()
        for member in list(self.members.values()):
            self._take_reports(member)  # the last counts it sent as it stopped
            self._forget(member)
        for member in self._retired:
            member.reports.close()
        self._retired.clear()
        self.own.shutdown(wait_s)

    def _share(self, index: int) -> SharedAssociationCount:
        return SharedAssociationCount(self._slots, index, self._lock_path, self._opened, self._connections)

    def _spawn(self, index: int) -> None:
        # From serve's main thread only: the parent-death signal fires when the spawning thread ends.
        reports, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=receiver_process_main,
            args=(self.config, index, self.database_url, self.settings, self.own.listening_sockets(),
                  self._share(index), sender, os.getpid()),
            name=f"headscreen-receiver-{index}", daemon=False)
        process.start()
        sender.close()  # the child holds the write end: EOF here once it is gone
        with self._lock:
            self.members[index] = _Member(index, process, reports)

    def _forget(self, member: _Member) -> None:
        with self._admin.lock():
            self._admin.clear_process(member.index)  # what it held ended with it
        self.stats.retire(member.index)
        with self._lock:
            member.retired = True
            self._retired.append(member)

    def _read_reports(self) -> None:
        while not self._stopping.is_set():
            try:
                self._read_reports_once()
            except Exception:
                logger.exception("receiver process reports not read; retried",
                                 extra={"action": "receiver_pool_reports_failed"})
                time.sleep(REPORT_INTERVAL_S)

    def _read_reports_once(self) -> None:
        with self._lock:
            for member in self._retired:
                member.reports.close()  # here, where no wait() is using it
            self._retired.clear()
            members = {m.reports: m for m in self.members.values() if not m.retired and not m.reports.closed}
        if members:
            for connection in multiprocessing.connection.wait(list(members), timeout=REPORT_INTERVAL_S):
                self._take_reports(members[connection])  # type: ignore[index]
        else:
            time.sleep(REPORT_INTERVAL_S)
        self.own.publish_held()

    def _take_reports(self, member: _Member) -> None:
        try:
            while not member.reports.closed and member.reports.poll():
                kind, snapshot = member.reports.recv()
                if kind == "ready":
                    member.ready = True
                if not member.retired:
                    self.stats.report(member.index, snapshot)
        except (EOFError, OSError):
            # It has exited (or died mid-report): nothing more comes; ensure() starts another.
            with self._lock:
                if not member.retired:
                    member.retired = True
                    self._retired.append(member)


def connection_table_capacity(config: ReceiverConfig) -> int:
    """Places per process in the shared connection table: every idle connection and
    association the limits allow, and a margin for associations that are ending."""
    return config.max_idle_connections + config.maximum_associations + CONNECTION_TABLE_MARGIN


def start_receivers(config: ReceiverConfig, session_factory: sessionmaker[Session], *, processes: int,
                    database_url: str, settings: Any = None) -> Receiver | ReceiverPool:
    """One receiver in this process, or a pool of `processes` (this one first)."""
    if processes <= 1:
        return start_receiver(config, session_factory)
    pool = ReceiverPool(config, session_factory, processes=processes, database_url=database_url,
                        settings=settings)
    try:
        pool.start()
    except BaseException:
        pool.shutdown()
        raise
    return pool


def receiver_process_main(config: ReceiverConfig, index: int, database_url: str, settings: Any,
                          listeners: tuple[Any, ...], associations: SharedAssociationCount, reports: Connection,
                          parent_pid: int) -> None:
    """Entry point of receiver process `index` (> 0) of a pool."""
    _die_with_parent(parent_pid, index)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if settings is not None:
        from headscreen.daemon.logs import configure_logging
        from headscreen.privacy import withhold_values_in_logs

        configure_logging(settings)
        withhold_values_in_logs()
    from headscreen.db.engine import make_engine, session_factory

    engine = make_engine(database_url, application_name=f"headscreen receiver {index}")
    try:
        receiver = start_receiver(config, session_factory(engine),
                                  ProcessShare(index, associations, tuple(listeners)))
        freeze_startup_objects()
        try:
            reports.send(("ready", receiver.stats.snapshot()))
            while not stop.wait(REPORT_INTERVAL_S):
                receiver.publish_held()
                reports.send(("report", receiver.stats.snapshot()))
        finally:
            receiver.shutdown()
            reports.send(("report", receiver.stats.snapshot()))
            reports.close()
    finally:
        engine.dispose()


def _die_with_parent(parent_pid: int, index: int) -> None:
    """SIGKILL this process when serve dies, so it never accepts on serve's port alone.
    Also names it (`hs-receiver-k` in ps, top and /proc/PID/comm) for admins and benches."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("could not ask to die with serve", extra={"action": "receiver_process_pdeathsig"})
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(f"{PROCESS_NAME_PREFIX}{index}".encode()), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)  # serve died before the request took effect
