"""What a peer may hold before and while associated: admission of connections, the TLS
handshake in the connection's own thread, and refusals recorded at a bounded rate.

pynetdicom's server counts every connection thread against its limit and handshakes TLS
inside its accept loop; GuardedAssociationServer replaces both (see ConnectionGuard).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from headscreen.daemon.callers import normalise_host
from headscreen.daemon.store_requests import DirectStores, store_response_command

if TYPE_CHECKING:
    from headscreen.daemon.receiver import ReceiverStats

logger = logging.getLogger(__name__)

# Refusals before any A-ASSOCIATE exchange have no ACSE code; these lie outside its range.
CONNECTION_REFUSED_STATUS = 0xFF0001  # closed at once: address over its limit, or an idle one evicted
TLS_REFUSED_STATUS = 0xFF0002         # TLS handshake failed (no or untrusted certificate, plain DICOM)


@dataclass(frozen=True)
class RefusalKey:
    """What makes two refusals 'the same' for counting."""

    host: str | None
    calling_ae: str | None  # None: refused before any A-ASSOCIATE-RQ was read
    reason: str
    status: int

    @property
    def what(self) -> str:
        return "connection closed" if self.calling_ae is None else "association refused"

    @property
    def action(self) -> str:
        return "connection_closed" if self.calling_ae is None else "association_rejected"

    def row_text(self) -> str:
        return f"{self.what}: {self.reason} (from {self.host})"


class RefusalLog:
    """Association and connection refusals, recorded in the database at a bounded rate.

    The first refusal of each (address, calling AE, reason) in an interval is logged
    and recorded as it happens; repeats are counted and recorded as one row per key
    when the interval ends ("association refused 299 more times in the last 60 s:
    ..."). Past max_keys
    distinct keys in one interval the rest share one overflow count. A flood thus adds
    at most 2 x max_keys + 1 rows per interval, however fast it comes.
    """

    def __init__(self, record: Callable[[str | None, str, int], None], interval_s: float = 60.0,
                 max_keys: int = 32) -> None:
        self._record = record
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._repeats: dict[RefusalKey, int] = {}  # key -> refusals after its first, this interval
        self._overflow = 0
        self._deferred: list[RefusalKey] = []  # firsts noted in the accept loop; written by our thread
        self._window_start = time.monotonic()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="RefusalLog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def refused(self, key: RefusalKey, *, defer: bool = False) -> None:
        """Count one refusal; the first of its key this interval is recorded now (or, with
        `defer`, by the log's own thread: the accept loop must not wait on the database)."""
        with self._lock:
            if key in self._repeats:
                self._repeats[key] += 1
                return
            if len(self._repeats) >= self._max_keys:
                self._overflow += 1
                return
            self._repeats[key] = 0
            if defer:
                self._deferred.append(key)
                self._wake.set()
                return
        self._write_first(key)

    def flush(self) -> None:
        """Write the deferred firsts and the counted repeats, and start a new interval."""
        with self._lock:
            deferred, self._deferred = self._deferred, []
            repeats = {key: count for key, count in self._repeats.items() if count}
            overflow, self._overflow = self._overflow, 0
            self._repeats = {}
            now = time.monotonic()
            seconds, self._window_start = now - self._window_start, now
        for key in deferred:
            self._write_first(key)
        for key, count in repeats.items():
            logger.warning(f"{key.what} (repeats)", extra={
                "action": key.action, "calling_ae": key.calling_ae, "peer_host": key.host,
                "reason": key.reason, "count": count})
            self._record(key.calling_ae, f"{key.what} {count} more times in the last {seconds:.0f} s: "
                                         f"{key.reason} (from {key.host})", key.status)
        if overflow:
            logger.warning("refusals not itemised", extra={"action": "association_rejected", "count": overflow})
            self._record(None, f"{overflow} more refusals in the last {seconds:.0f} s from other addresses or "
                               f"AE titles (over {self._max_keys} kinds; not itemised)", CONNECTION_REFUSED_STATUS)

    def _write_first(self, key: RefusalKey) -> None:
        logger.warning(key.what, extra={"action": key.action, "calling_ae": key.calling_ae,
                                        "peer_host": key.host, "reason": key.reason})
        self._record(key.calling_ae, key.row_text(), key.status)

    def _run(self) -> None:
        deadline = time.monotonic() + self._interval_s
        while not self._stopping.is_set():
            self._wake.wait(max(0.0, deadline - time.monotonic()))
            self._wake.clear()
            try:
                if time.monotonic() >= deadline:
                    self.flush()
                    deadline = time.monotonic() + self._interval_s
                else:
                    with self._lock:
                        deferred, self._deferred = self._deferred, []
                    for key in deferred:
                        self._write_first(key)
            except Exception:  # the recorder logs its own failures; this thread must live on
                logger.exception("refusal log flush failed", extra={"action": "rejection_not_recorded"})


class Connection:
    """One accepted TCP connection, from accept until its association thread ends."""

    def __init__(self, address: str | None, sock: socket.socket, tls: bool) -> None:
        self.address = address
        self.sock = sock
        self.tls = tls
        self.opened = time.monotonic()
        self.assoc: Any = None
        self.handler_done = False
        self.requested = False  # its A-ASSOCIATE-RQ arrived
        self.accepted = False   # holds one of the association slots
        self.evicted = False
        self.peer_cn: str | None = None

    def alive(self) -> bool:
        """Whether it still counts against the limits."""
        if self.evicted:
            return False  # its socket is shut and its thread woken: ending now
        if not self.handler_done:
            return True
        assoc = self.assoc
        if assoc is None or not assoc.is_alive():
            return False
        # Released, aborted or rejected: its thread is only tearing down. Counting it
        # would refuse a PACS that opens one short association after another.
        return not (assoc.is_released or assoc.is_aborted or assoc.is_rejected)

    def idle(self) -> bool:
        return not self.requested and self.alive()

    def close(self) -> None:
        """Close the connection under its thread (called from the accept loop)."""
        try:
            # The base class's shutdown: SSLSocket.shutdown would also drop its SSL object
            # under the thread still using it.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass
        assoc = self.assoc
        if assoc is not None:
            # The acceptor waits up to the ACSE timeout for an A-ASSOCIATE-RQ; None ends
            # that wait now (pynetdicom treats it as the timeout), freeing the thread.
            assoc.dul.to_user_queue.put(None)


# A busier receiver process waits this long per connection it has more than the least busy one.
ACCEPT_DEFERRAL_STEP_S = 0.003
ACCEPT_DEFERRAL_MAX_S = 0.015


class SharedAssociationCount:
    """Associations and connections held by each receiver process of one `serve`
    (daemon.receiver_pool), in shared memory, so that `max_associations` and the
    per-address and idle limits bound them all together. Each process writes only its
    own slot and its own part of the connection table; the parent clears those of a
    process that died.

    The check and the count are made under an flock on `lock_path`, not a multiprocessing
    lock: the kernel releases an flock when its holder dies, so a process killed while
    holding it cannot stop every other process from admitting associations.
    """

    def __init__(self, slots: Any, index: int, lock_path: Path, opened: Any = None,
                 connections: Any = None) -> None:
        self._slots = slots  # multiprocessing RawArray('i', processes)
        self.index = index
        self.lock_path = lock_path
        # Connections each process has open (RawArray('i', processes)), for accept_deferral.
        self._opened = opened
        # Each process's open connections as connection_entry values, 0 for a free place
        # (RawArray('q', processes * capacity)), for the per-address and idle limits.
        self._connections = connections
        self._capacity = len(connections) // len(slots) if connections is not None else 0
        self._published: list[int] = []
        self._thread_lock = threading.Lock()  # an flock does not exclude threads sharing its file
        self._fd: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"slots": self._slots, "index": self.index, "lock_path": self.lock_path, "opened": self._opened,
                "connections": self._connections}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["slots"], state["index"], state["lock_path"], state["opened"],  # type: ignore[misc]
                      state["connections"])

    def note_open(self, connections: int) -> None:
        """How many connections this process has open (one writer per slot: no lock)."""
        if self._opened is not None:
            self._opened[self.index] = connections

    def accept_deferral(self) -> float:
        """Seconds to wait before accepting: all processes wake for each new connection and
        the first to call accept() gets it, so without this a burst of associations tends to
        land on one process while another has none. A process with more open connections
        than the least busy one waits a little, and usually finds the connection taken."""
        if self._opened is None:
            return 0.0
        counts = list(self._opened)
        excess = counts[self.index] - min(counts)
        return min(ACCEPT_DEFERRAL_STEP_S * excess, ACCEPT_DEFERRAL_MAX_S) if excess > 0 else 0.0

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._thread_lock:
            if self._fd is None:
                self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def held_elsewhere(self) -> int:
        """Under `lock()`: what the other processes hold."""
        return sum(held for i, held in enumerate(self._slots) if i != self.index)

    def publish(self, held: int) -> None:
        """Under `lock()`: what this process holds now."""
        self._slots[self.index] = held

    @property
    def published(self) -> int:
        return int(self._slots[self.index])

    def connections_elsewhere(self) -> list[int]:
        """Under `lock()`: the other processes' connections, as `connection_entry` values."""
        if self._connections is None:
            return []
        mine = range(self.index * self._capacity, (self.index + 1) * self._capacity)
        return [entry for i, entry in enumerate(self._connections[:]) if entry and i not in mine]

    def connections_changed(self, entries: list[int]) -> bool:
        return self._connections is not None and entries != self._published

    def publish_connections(self, entries: list[int]) -> None:
        """Under `lock()`: this process's connections. Past the table's capacity the rest
        are left out: the other processes then see fewer, and refuse nothing wrongly."""
        if self._connections is None:
            return
        kept = entries[:self._capacity]
        start = self.index * self._capacity
        self._connections[start:start + self._capacity] = kept + [0] * (self._capacity - len(kept))
        self._published = list(entries)

    def clear_process(self, index: int) -> None:
        """Under `lock()`: what a process that died held (the pool's parent calls this)."""
        self._slots[index] = 0
        if self._opened is not None:
            self._opened[index] = 0
        if self._connections is not None:
            start = index * self._capacity
            self._connections[start:start + self._capacity] = [0] * self._capacity


def address_key(host: str | None) -> int:
    """A peer address as the shared connection table keeps it: 61 bits of a hash that is
    the same in every process (Python's own str hash is salted per process), never 0."""
    digest = hashlib.blake2b((host or "").encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & ((1 << 61) - 1)) | 1


def connection_entry(host: str | None, idle: bool) -> int:
    return address_key(host) << 1 | int(idle)


class ConnectionGuard:
    """What a peer may hold before and while associated, across the plain and TLS ports.

    - at most `per_address` connections per address: past it, a new connection
      closes that address's oldest idle one, or is itself closed on accept (before a
      thread is started) when all of them are associated;
    - at most `max_idle` connections that have not sent an A-ASSOCIATE-RQ; a new one
      closes the oldest of them (a real caller sends its request within milliseconds);
    - at most `max_associations` requested associations: idle sockets do not count.

    Closing the oldest idle connection, not refusing the new one, means a caller's
    own stale sockets (or an abuser's) never keep its fresh connection out.

    With several receiver processes (`shared`), every limit counts the connections of
    every process (a table in shared memory). A process closes only its own sockets, so
    when the idle connections that would make room are all in another process, the new
    connection is admitted anyway, and the other one ends at its association request
    timeout: past a limit, at most one connection more per other process, each idle
    when admitted.
    """

    def __init__(self, *, per_address: int, max_idle: int, max_associations: int,
                 refusals: RefusalLog | None, stats: ReceiverStats,
                 shared: SharedAssociationCount | None = None) -> None:
        self.per_address = per_address
        self.max_idle = max_idle
        self.max_associations = max_associations
        self.refusals = refusals
        self.stats = stats
        self.shared = shared
        self._lock = threading.Lock()
        self._connections: list[Connection] = []

    def admit(self, sock: socket.socket, address: str, *, tls: bool) -> Connection | None:
        host = normalise_host(address)
        evicted: Connection | None = None
        why = ""
        connection: Connection | None = None
        with self._shared_lock(), self._lock:
            self._connections = [c for c in self._connections if c.alive()]
            elsewhere = self.shared.connections_elsewhere() if self.shared is not None else []
            key = address_key(host)
            from_host_elsewhere = [entry for entry in elsewhere if entry >> 1 == key]
            mine = [c for c in self._connections if c.address == host]
            idle = [c for c in self._connections if c.idle()]
            over_address_limit = len(mine) + len(from_host_elsewhere) >= self.per_address
            if over_address_limit:
                mine_idle = [c for c in mine if c.idle()]
                if mine_idle:
                    evicted = min(mine_idle, key=lambda c: c.opened)
                    why = f"idle, to admit another: more than {self.per_address} connections from this address"
                elif any(entry & 1 for entry in from_host_elsewhere):
                    over_address_limit = False  # its idle one elsewhere ends at the request timeout
            elif len(idle) + sum(entry & 1 for entry in elsewhere) >= self.max_idle and idle:
                evicted = min(idle, key=lambda c: c.opened)
                why = f"idle, to admit another: more than {self.max_idle} connections without an association request"
            if not over_address_limit or evicted is not None:
                connection = Connection(host, sock, tls)
                self._connections.append(connection)
            if evicted is not None:
                evicted.evicted = True
            self._publish_connections()
        if connection is None:
            self.stats.add_connection_event("refused_address_limit")
            self._refused(RefusalKey(host, None, f"more than {self.per_address} associated connections from "
                                     "this address", CONNECTION_REFUSED_STATUS))
        if evicted is not None:
            evicted.close()
            self.stats.add_connection_event("evicted_idle")
            self._refused(RefusalKey(evicted.address, None, why, CONNECTION_REFUSED_STATUS))
        return connection

    def _publish_connections(self) -> None:
        """Under both locks: this process's live connections, for the other processes."""
        if self.shared is None:
            return
        live = [c for c in self._connections if c.alive()]
        self.shared.note_open(len(live))
        self.shared.publish_connections([connection_entry(c.address, c.idle()) for c in live])

    def close_idle(self) -> None:
        """Close every connection that has not requested an association (at shutdown)."""
        with self._lock:
            idle = [c for c in self._connections if c.idle()]
            for connection in idle:
                connection.evicted = True
        for connection in idle:
            connection.close()

    def take_association_slot(self, connection: Connection) -> bool:
        with self._shared_lock(), self._lock:
            held = sum(1 for c in self._connections if c.accepted and c is not connection and c.alive())
            elsewhere = self.shared.held_elsewhere() if self.shared is not None else 0
            if held + elsewhere >= self.max_associations:
                return False
            connection.accepted = True
            if self.shared is not None:
                self.shared.publish(held + 1)
                self._publish_connections()  # it has requested: no longer idle
            return True

    def publish_held(self) -> None:
        """Tell the other receiver processes what this one holds now (after an association
        ends, and periodically), so an ended association stops counting there too."""
        if self.shared is None:
            return
        with self._lock:
            self._connections = [c for c in self._connections if c.alive()]
            self.shared.note_open(len(self._connections))
            entries = [connection_entry(c.address, c.idle()) for c in self._connections]
            if self.shared.published == self._held() and not self.shared.connections_changed(entries):
                return  # nothing changed: no need for the cross-process lock
        with self.shared.lock(), self._lock:
            self.shared.publish(self._held())
            self._publish_connections()

    def _held(self) -> int:
        return sum(1 for c in self._connections if c.accepted and c.alive())

    def accept_deferral(self) -> float:
        return self.shared.accept_deferral() if self.shared is not None else 0.0

    def _shared_lock(self) -> contextlib.AbstractContextManager[None]:
        return self.shared.lock() if self.shared is not None else contextlib.nullcontext()

    def tls_failed(self, connection: Connection, reason: str) -> None:
        if connection.evicted:
            return  # recorded as the eviction
        self.stats.add_connection_event("tls_failed")
        self._refused(RefusalKey(connection.address, None, f"TLS handshake failed: {reason}", TLS_REFUSED_STATUS))

    def _refused(self, key: RefusalKey) -> None:
        if self.refusals is not None:
            self.refusals.refused(key, defer=True)


class _GuardedRequestHandler(RequestHandler):
    server: GuardedAssociationServer

    def handle(self) -> None:
        # As RequestHandler.handle, with the association tied to its connection first:
        # its A-ASSOCIATE-RQ may arrive the moment the thread starts.
        assoc = self._create_association()
        connection = self.server.current_connection()
        connection.assoc = assoc
        assoc.headscreen_connection = connection  # type: ignore[attr-defined]
        wait_for_events(assoc)
        drop_silent_log_handlers(assoc)
        send_store_responses_directly(assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


# --- event-driven waiting in pynetdicom's reactors ----------------------------------------------
#
# pynetdicom 3.0 polls: its DUL thread checks the socket with select(timeout=0) and sleeps
# 1 ms when idle, and the acceptor's reactor sleeps 1 ms and polls its message queue. Every
# PDU and every C-STORE response waits up to a millisecond, and the idle loops of each
# association spin about 1,000 times a second, competing for the GIL and the two cores
# (a third of the receiver's CPU samples under py-spy). pynetdicom offers no setting for
# this (its own comment says "TODO: try and make this event based"), so, per association
# and before its threads start, we make both waits block until something happens:
# - the DUL waits in select() on its socket and on a wake-up pipe that every primitive
#   queued for sending writes to (its loop delay is 0; the wait is in `ready`);
# - the reactor's non-blocking poll of its message queue waits for the next message or
#   any primitive for the user (release, abort) instead of returning at once.
# Both waits are bounded (_IDLE_WAIT_S), so timers, kills and shutdown are still seen
# promptly; nothing else in pynetdicom changes (only attributes of this association).
_IDLE_WAIT_S = 0.05


class _Waker:
    """A pipe whose read end select() can watch; writing a byte wakes the waiter."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        # Closed when the association is collected, never while a thread may still use them.
        weakref.finalize(self, _close_fds, self.read_fd, self.write_fd)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is already pending

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class _WakingQueue(queue.Queue[Any]):
    """A queue whose put() also runs `on_put` (wakes whoever waits for it)."""

    def __init__(self, on_put: Callable[[], None]) -> None:
        super().__init__()
        self._on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


class _ReactorInbox(_WakingQueue):
    """The DIMSE message queue: a non-blocking get (the reactor's poll) waits up to
    _IDLE_WAIT_S for a message or a primitive for the user; a blocking get is unchanged."""

    def __init__(self, arrived: threading.Event) -> None:
        super().__init__(arrived.set)
        self._arrived = arrived

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            return super().get(block, timeout)
        self._arrived.wait(_IDLE_WAIT_S)
        self._arrived.clear()  # before the get: an item put after it sets the event again
        return super().get(block=False)


_FIRST_READ_BYTES = 1 << 20


class _WaitingAssociationSocket(AssociationSocket):
    """AssociationSocket whose `ready` blocks until data arrives or a primitive is queued,
    and whose `recv` reads into one buffer as much as the socket holds."""

    _waker: _Waker

    _pushed_back: bytes = b""

    def push_back(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read ahead (by _DirectDataDUL) that the next recv returns first."""
        self._pushed_back = bytes(data) + self._pushed_back

    def recv(self, nr_bytes: int) -> bytearray:
        """As pynetdicom's recv (up to `nr_bytes`, fewer when the peer closes), without
        its 4 KiB reads: a 512x512 slice took about 130 recv() calls, each a new bytes
        object copied once more into the PDU's buffer."""
        buffer = bytearray()
        del buffer[self.recv_into(buffer, 0, nr_bytes):]
        return buffer

    def recv_into(self, buffer: bytearray, offset: int, nr_bytes: int) -> int:
        """Read up to `nr_bytes` (fewer when the peer closes) into `buffer` from `offset`,
        growing it as needed; returns where they end. The socket writes into the buffer
        itself, so a buffer kept from one PDU to the next costs neither an allocation
        nor a copy."""
        end = offset + nr_bytes
        if self._pushed_back:
            head, self._pushed_back = self._pushed_back[:nr_bytes], self._pushed_back[nr_bytes:]
            buffer[offset:offset + len(head)] = head
            offset += len(head)
        sock = self.socket
        while offset < end:
            assert sock is not None  # pynetdicom reads only from an open socket
            if offset == len(buffer):
                # The length comes from the peer's PDU header, before any check: the buffer
                # grows only when full and more is to come, by 1 MiB or its own size,
                # whichever is larger, so a header claiming 4 GiB costs nothing.
                buffer.extend(bytes(min(end - offset, max(len(buffer), _FIRST_READ_BYTES))))
            with memoryview(buffer) as view:
                count = sock.recv_into(view[offset:min(end, len(buffer))])
            if not count:
                break  # the peer closed: pynetdicom reports the PDU as short
            offset += count
        return offset

    def readable_now(self) -> bool:
        """Bytes wait to be read (without blocking)."""
        sock = self.socket
        if self._pushed_back:
            return True
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    @property
    def ready(self) -> bool:
        if self._pushed_back:
            return True
        sock = self.socket
        if sock is None or self._is_connected is False:
            time.sleep(0.001)  # pynetdicom's own loop delay: the DUL winds down meanwhile
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes select() cannot see (pynetdicom #528)
        # Events still queued for the state machine must not wait for the network.
        wait = 0.0 if not self.event_queue.empty() else _IDLE_WAIT_S
        try:
            readable, _, _ = select.select([sock.fileno(), self._waker.read_fd], [], [], wait)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport closed, as pynetdicom's `ready` does
            return False
        if self._waker.read_fd in readable:
            self._waker.drain()
        return sock.fileno() in readable


_P_DATA_TF = 0x04
# Events whose observers need pynetdicom's own objects for each PDU.
_PER_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION)


class _DirectDataDUL(DULServiceProvider):
    """The acceptor's DUL: a P-DATA-TF PDU of an established association (Sta6, nothing
    else queued for the state machine) goes straight to DIMSE, as pynetdicom's action
    DT-2 sends it there, without the PDU objects, the event queue and the state table on
    the way. That is most of pynetdicom's CPU per PDU, and a 512x512 slice comes in 5 PDUs
    (dcmtk's 128 KiB) to 33 (16 KiB, common in PACS). Any other PDU, a malformed one, or
    an observer bound to a per-PDU event takes pynetdicom's own path: the bytes read ahead
    are pushed back for it to read again. A plain C-STORE request is assembled on the way
    (daemon.store_requests), without pynetdicom's message object, and served in this
    thread; its response goes out as soon as the loop turns."""

    _stores: DirectStores  # set by wait_for_events
    _pdu_buffer: bytearray  # set by wait_for_events

    def _read_pdu_data(self) -> None:
        sock = cast(_WaitingAssociationSocket, self.socket)
        while self._direct_data_applies():
            if not self._read_data_directly(sock):
                break
            # Stay while a message is arriving and its next PDU is already here: a turn of
            # the reactor's loop per PDU costs more than the PDU (its idle sleep gives up
            # the GIL). A whole message goes back to the loop, so its response goes out.
            if (self.assoc.dimse.message is None and not self._stores.arriving) or not sock.readable_now():
                return
        # pynetdicom's path reads the next PDU: a request arriving here continues there.
        self._stores.hand_over()
        super()._read_pdu_data()

    def _direct_data_applies(self) -> bool:
        return (self.state_machine.current_state == "Sta6" and self.event_queue.empty()
                and self._recv_pdu.empty() and not any(self.assoc.get_handlers(e) for e in _PER_PDU_EVENTS))

    def _read_data_directly(self, sock: _WaitingAssociationSocket) -> bool:
        """True when a P-DATA-TF PDU went to DIMSE; otherwise what was read is pushed back."""
        buffer = self._pdu_buffer  # kept for the next PDU: its values are copied out of it
        end = 0
        try:
            end = sock.recv_into(buffer, 0, 6)
            if end == 6 and buffer[0] == _P_DATA_TF:
                end = sock.recv_into(buffer, 6, int.from_bytes(buffer[2:6], "big"))
                values = _presentation_data_values(buffer, end)
                if values is not None:
                    self._stores.take(values)
                    return True
        except (OSError, TimeoutError):
            pass  # pynetdicom reads again and reports the closed connection its own way
        finally:
            if len(buffer) > _FIRST_READ_BYTES:
                # A PDU larger than senders commonly send (dcmtk's are 128 KiB): its
                # buffer is not kept for the life of the association.
                self._pdu_buffer = bytearray()
        with memoryview(buffer) as view:
            sock.push_back(view[:end])
        return False


def _presentation_data_values(buffer: bytearray, end: int) -> list[tuple[int, bytes]] | None:
    """(context ID, value) of each item of a whole P-DATA-TF PDU (buffer[:end]), as
    pynetdicom's P_DATA_TF.to_primitive gives them; None when the PDU is short or an item
    does not fit (pynetdicom then decodes it and reports the error)."""
    if end < 6 or end != 6 + int.from_bytes(buffer[2:6], "big"):
        return None
    values = []
    offset = 6
    with memoryview(buffer) as view:
        while offset < end:
            if offset + 4 > end:
                return None
            item_length = int.from_bytes(view[offset:offset + 4], "big")
            item_end = offset + 4 + item_length
            if item_length < 2 or item_end > end:  # a context ID and a message control header at least
                return None
            values.append((buffer[offset + 4], bytes(view[offset + 5:item_end])))
            offset = item_end
    return values


def wait_for_events(assoc: Any) -> None:
    """Make this acceptor's DUL and reactor wait on events instead of polling (see above),
    and its P-DATA PDUs go to DIMSE directly (_DirectDataDUL). Call before the
    association's threads start."""
    dul = assoc.dul
    dul.__class__ = _DirectDataDUL  # built by pynetdicom; only _read_pdu_data differs
    dul._stores = DirectStores(assoc)
    dul._pdu_buffer = bytearray()
    waker = _Waker()
    dul.socket.__class__ = _WaitingAssociationSocket  # built by pynetdicom; `ready` and `recv` differ
    dul.socket._waker = waker
    dul.to_provider_queue = _WakingQueue(waker.wake)
    dul._run_loop_delay = 0  # the DUL's idle wait is the select() in `ready`
    arrived = threading.Event()
    dul.to_user_queue = _WakingQueue(arrived.set)
    assoc.dimse.msg_queue = _ReactorInbox(arrived)


# pynetdicom binds these to every association; they only log (at INFO and DEBUG), but they
# format each PDU and DIMSE message first: about 0.35 ms of the receiver's CPU per instance.
_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def drop_silent_log_handlers(assoc: Any) -> None:
    """Unbind pynetdicom's logging handlers from this association when the pynetdicom
    logger would discard what they log (daemon.logs keeps it at WARNING); whoever turns
    that logger up to INFO or DEBUG before an association starts still gets them."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    for event, handler in _STANDARD_LOG_HANDLERS:
        assoc.unbind(event, handler)


def send_store_responses_directly(assoc: Any) -> None:
    """Send this association's plain C-STORE responses (a status, no comment) encoded
    here: pynetdicom builds a pydicom data set for each command set and encodes it twice
    (once to learn its group length), about 0.4 ms of CPU per instance. The bytes are
    the same (tests/test_receiver.py); anything else, or a handler bound to
    EVT_DIMSE_SENT (it needs pynetdicom's message object), goes through pynetdicom."""
    dimse = assoc.dimse
    general = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        command = store_response_command(primitive)
        max_pdu = dimse.maximum_pdu_size
        if (command is None or assoc.get_handlers(evt.EVT_DIMSE_SENT)
                or (max_pdu and len(command) > max_pdu - 6)):  # pynetdicom would fragment it
            general(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
        dimse.dul.send_pdu(pdata)

    dimse.send_msg = send_msg


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's server with admission control (ConnectionGuard) and a TLS handshake
    that runs in the connection's thread under a timeout.

    pynetdicom's own TLS server handshakes inside the accept loop with no timeout, so a
    single silent peer on the TLS port would stop every other caller.
    """

    def __init__(self, ae: AE, address: tuple[str, int], ae_title: str, contexts: list[Any],
                 ssl_context: ssl.SSLContext | None = None, evt_handlers: list[Any] | None = None, *,
                 guard: ConnectionGuard, tls_context: ssl.SSLContext | None = None,
                 handshake_timeout_s: float = 10.0, listening_socket: socket.socket | None = None,
                 shared_accept: bool = False) -> None:
        self.guard = guard
        self.tls_context = tls_context
        self.handshake_timeout_s = handshake_timeout_s
        self._local = threading.local()
        # Set: accept on this socket, another receiver process's (daemon.receiver_pool).
        self._adopted = listening_socket
        # Several processes accept on one socket: a process that loses the race for a
        # connection must go back to its loop at once, not wait in accept() for the next.
        self._shared_accept = shared_accept or listening_socket is not None
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers=evt_handlers,
                         request_handler=_GuardedRequestHandler)

    def server_bind(self) -> None:
        if self._adopted is None:
            super().server_bind()
        else:
            cast(socket.socket, self.socket).close()
            self.socket = self._adopted
            self.server_address = self.socket.getsockname()
        if self._shared_accept:
            # accept() then raises BlockingIOError, which the loop ignores.
            cast(socket.socket, self.socket).setblocking(False)

    def server_activate(self) -> None:
        if self._adopted is None:
            super().server_activate()  # an adopted socket already listens

    def server_close(self) -> None:
        if self._shared_accept:
            cast(socket.socket, self.socket).close()  # shutdown(), as pynetdicom's does, would stop it in every process
        else:
            super().server_close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None  # the listening socket, open while the server runs
        if self._shared_accept and (deferral := self.guard.accept_deferral()) > 0:
            time.sleep(deferral)  # let a less busy receiver process take it (BlockingIOError if one did)
        client, address = self.socket.accept()
        # Accepted sockets block forever by default: a peer stalling mid-PDU would pin its
        # thread. The timeout is raised to network_timeout_s once the association is requested.
        client.settimeout(self.handshake_timeout_s)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        connection = self.guard.admit(request, str(client_address[0]), tls=self.tls_context is not None)
        if connection is None:
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=make_target(lambda: self._serve(request, client_address, connection)),
                                  name="HeadscreenConnection", daemon=True)
        thread.start()

    def current_connection(self) -> Connection:
        return self._local.connection

    def _serve(self, request: socket.socket, client_address: Any, connection: Connection) -> None:
        sock: socket.socket | None = request
        try:
            if self.tls_context is not None:
                sock = self._handshake(request, connection)
            if sock is None:
                return
            self._local.connection = connection
            self.finish_request(sock, client_address)  # runs _GuardedRequestHandler.handle
        except Exception:
            logger.exception("connection handler failed", extra={"action": "connection_error"})
            if sock is not None:
                self.shutdown_request(sock)
        finally:
            self._local.connection = None
            connection.handler_done = True

    def _handshake(self, raw: socket.socket, connection: Connection) -> ssl.SSLSocket | None:
        assert self.tls_context is not None
        wrapped: ssl.SSLSocket | None = None
        try:
            wrapped = self.tls_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            connection.sock = wrapped
            wrapped.do_handshake()  # under the accepted socket's timeout
        except (ssl.SSLError, OSError) as exc:
            self.guard.tls_failed(connection, _tls_failure(exc, self.handshake_timeout_s))
            self.shutdown_request(wrapped if wrapped is not None else raw)
            return None
        connection.peer_cn = _subject_cn(wrapped.getpeercert())
        return wrapped


def _tls_failure(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no handshake within {timeout_s:g} s"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or type(exc).__name__).lower().replace("_", " ")
    return "connection closed during the handshake"


def _subject_cn(certificate: dict[str, Any] | None) -> str | None:
    """The subject commonName of a verified peer certificate (getpeercert() form)."""
    for rdn in (certificate or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def set_timeout(sock: socket.socket, seconds: float) -> None:
    try:
        sock.settimeout(seconds)
    except OSError:
        pass  # already closed
