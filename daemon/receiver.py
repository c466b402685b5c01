"""The DICOM receiver: a pynetdicom Storage SCP that stores and records head studies.

What it accepts (see docs/conformance.md, Part A for the full statement):

- Verification (C-ECHO).
- C-STORE of CT Image, Enhanced CT Image, MR Image and Enhanced MR Image Storage
  in Implicit/Explicit VR Little Endian, Deflated Explicit VR Little Endian,
  JPEG Baseline, JPEG Extended, JPEG Lossless (Process 14 and SV1), JPEG-LS
  (lossless and near-lossless), JPEG 2000 (lossless and lossy) and RLE Lossless.

Any other storage SOP class (Secondary Capture, presentation states, dose SRs,
raw data ...) is refused at association negotiation: its presentation context is
answered "abstract syntax not supported". We never run models on those objects,
and a Success status would tell the PACS we had stored something we had thrown
away; refusing the context is standard, costs the PACS no transfer, and its own
log then names the SOP class it could not send.

Callers are checked against an allow-list (AE title, optionally the host) when
the association is requested; an unknown caller gets A-ASSOCIATE-RJ (permanent,
"calling AE title not recognised"). Optionally the Called AE Title must be ours
(else "called AE title not recognised"), and over TLS the client certificate must
be the one mapped to the calling AE title.

Before a peer has associated it can hold little: each address may keep only a
few connections open (more are closed at once, before any thread is started),
connections that have not sent their A-ASSOCIATE-RQ are closed after a short
timeout, and when too many such idle connections are open the oldest is closed
to admit a new one. The association limit counts only associations that were
requested, so idle sockets cannot lock real callers out. Refusals are recorded
in the database at a bounded rate (RefusalLog): the first of each kind per
interval as it happens, the rest as one counted row.

The same SCP can listen for plain DICOM and for DICOM over TLS (a second port);
the TLS handshake runs in the connection's own thread with a timeout, never in
the accept loop.

Each C-STORE is handled in stages, each with its own named status:
header decode (0xC210) -> identifying UIDs (0xA900) -> disk watermark (0xA700,
nothing written) -> journal and atomic write (0xA701) -> database row (0xA701) -> Success.
Success is answered only after the instance is durable and recorded: one fdatasync
of the ingest journal (shared by concurrent associations; daemon/ingest_journal.py)
makes its bytes and its row durable (a restart replays the journal), its file is whole
under its recorded path, and then its database row is committed without a sync of its
own (group commit across associations). The row is committed only after the file is in
place and the journal entry is on disk, so the scheduler and the workers never see a
row without its bytes. With storage_backend = "postgresql" (daemon/blobstore.py) no file
and no journal entry is written: the instance's bytes are committed in the transaction of
its row, synchronously (PostgreSQL's WAL flush, shared by concurrent commits), before
Success (`uses_ingest_journal`).

A bad instance never ends the association. Only its identity
(UIDs, SOP class) can refuse an instance: any other recorded header value that does not
decode or fit its VR is left out of the row, and text is cut to its column (build_record).

Pixel data is never decoded: the header is parsed up to (7FE0,xxxx) and the rest
is only walked to check that it is complete; the bytes are stored as received.

This module is the SCP itself (configuration, start-up, the handlers and their stages).
Beside it: daemon/callers.py (allow-list, TLS context), daemon/connections.py (admission
before association, refusal log, event-driven waits in pynetdicom's reactors),
daemon/dataset_check.py (header decode, completeness walk), daemon/instance_record.py
(the database row), daemon/ingest_journal.py, db/group_commit.py.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.callers import CallerEntry, CallerPolicy, TlsServerConfig, normalise_host, server_ssl_context
from headscreen.daemon.config import ReceiverSection, Settings
from headscreen.daemon.connections import (
    Connection,
    ConnectionGuard,
    GuardedAssociationServer,
    RefusalKey,
    RefusalLog,
    SharedAssociationCount,
    set_timeout,
)
from headscreen.daemon.dataset_check import parse_header, part10_prefix
from headscreen.daemon.ingest_journal import IngestJournal, JournalEntry, recover
from headscreen.daemon.instance_record import build_record, command_sop_uid
from headscreen.daemon.storage import InstanceStore, InvalidUid, StorageFull, StoredInstance, sync_files
from headscreen.db import api as db_api
from headscreen.db import ingest as db_ingest
from headscreen.db.group_commit import GroupCommit
from headscreen.db.types import InstanceRecord, RecordOutcome
from headscreen.errors import InputRejected

logger = logging.getLogger(__name__)
STORAGE_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
)
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 B.2.3) this SCP answers."""

    SUCCESS = 0x0000
    # Refused: Out of Resources - disk below the watermark, nothing written.
    OUT_OF_RESOURCES = 0xA700
    # Refused: Out of Resources - the write or the database row failed; retryable.
    STORE_FAILED = 0xA701
    # Error: Data Set does not match SOP Class - identifying UIDs missing or invalid.
    DATASET_MISMATCH = 0xA900
    # Error: Cannot understand - the data set does not decode.
    CANNOT_UNDERSTAND = 0xC210


# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
_RJ_CALLING_AE = (0x01, 0x01, 0x03)   # permanent, service user, calling AE title not recognised
_RJ_CALLED_AE = (0x01, 0x01, 0x07)    # permanent, service user, called AE title not recognised
_RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded


def _rj_status(rsd: tuple[int, int, int]) -> int:
    return rsd[0] << 16 | rsd[1] << 8 | rsd[2]


# The DB's rejection row has a status; an association refusal has no DIMSE status,
# so it is recorded as the A-ASSOCIATE-RJ result/source/reason (0x010103 is 1/1/3).
ASSOCIATION_REJECTED_STATUS = _rj_status(_RJ_CALLING_AE)
CALLED_AE_REJECTED_STATUS = _rj_status(_RJ_CALLED_AE)
ASSOCIATION_LIMIT_STATUS = _rj_status(_RJ_LOCAL_LIMIT)

# pynetdicom counts every connection thread, idle or not, against its own limit, which
# is how 17 silent sockets locked the port; we count requested associations ourselves
# (ConnectionGuard) and leave pynetdicom's check only as a far-off backstop.
_PYNETDICOM_ASSOCIATION_CEILING = 4096

# The ingest journal's segments, below the storage root (never a UID: the debris sweep skips it).
# Receiver process k > 0 of a serve (daemon.receiver_pool) keeps its own, ".journal-k".
JOURNAL_DIR = ".journal"
_OTHER_JOURNAL = re.compile(r"^\.journal-([1-9][0-9]*)$")
_DB_ATTEMPTS = 6
_DB_BACKOFF_S = 0.02
_ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is LO


class ReceiverStats:
    """Counters for operations and benchmarks: instances stored, refusals by status,
    seconds spent per stage (summed over associations), database commits of
    instance rows (fewer than rows stored when group commit batches them), and the
    optional header values left out of or cut to fit a row, by keyword."""

    STAGES = ("decode", "write", "record")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored = 0
        self._refused: dict[str, int] = {}
        self._seconds = dict.fromkeys(self.STAGES, 0.0)
        self._row_commits = 0
        self._connections: dict[str, int] = {}
        self._values_dropped: dict[str, int] = {}
        self._values_truncated: dict[str, int] = {}
        # fdatasyncs of the ingest journal so far (set by start_receiver on durable stores).
        self.journal_syncs: Callable[[], int] = lambda: 0

    def add_stage(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] += seconds

    def add_row_commit(self) -> None:
        with self._lock:
            self._row_commits += 1

    def add_stored(self) -> None:
        with self._lock:
            self._stored += 1

    def add_refused(self, status: StoreStatus) -> None:
        with self._lock:
            key = f"0x{int(status):04X}"
            self._refused[key] = self._refused.get(key, 0) + 1

    def add_sanitised(self, dropped: Sequence[str], truncated: Sequence[str]) -> None:
        with self._lock:
            for counts, keywords in ((self._values_dropped, dropped), (self._values_truncated, truncated)):
                for keyword in keywords:
                    counts[keyword] = counts.get(keyword, 0) + 1

    def add_connection_event(self, kind: str) -> None:
        """Count a connection-level event: refused_address_limit, evicted_idle, tls_failed,
        association_refused, association_limit."""
        with self._lock:
            self._connections[kind] = self._connections.get(kind, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"stored": self._stored, "refused": dict(self._refused),
                    "stage_seconds": dict(self._seconds), "row_commits": self._row_commits,
                    "connections": dict(self._connections), "values_dropped": dict(self._values_dropped),
                    "values_truncated": dict(self._values_truncated), "journal_syncs": self.journal_syncs()}


def _default(model: Any, name: str) -> Any:
    """A setting's default from daemon.config, so it is written down in one place."""
    return model.model_fields[name].default


@dataclass(frozen=True)
class ReceiverConfig:
    """What the receiver needs from the settings; the CLI maps Settings onto it.
    Defaults are the settings' own (daemon.config)."""

    ae_title: str
    storage_dir: Path
    bind_address: str = _default(Settings, "bind_address")
    port: int = _default(Settings, "port")
    # AllowedCaller-like objects, (ae_title, host) pairs or bare AE titles.
    allowed_callers: Sequence[CallerEntry] = ()
    allow_any_caller: bool = False
    disk_min_free_mb: int = _default(Settings, "disk_min_free_mb")
    # 4 MiB is above every SCU's send limit, so peers send their largest PDUs.
    maximum_pdu_size: int = 4 * 1024 * 1024
    maximum_associations: int = _default(ReceiverSection, "max_associations")
    network_timeout_s: float = _default(ReceiverSection, "network_timeout_s")
    # fsync files and directories; False only for throw-away test stores.
    durable: bool = True
    # A connection must send its A-ASSOCIATE-RQ (and finish any TLS handshake) within
    # this; also the ACSE timeout. pynetdicom's 30 s let silent sockets hold slots.
    association_request_timeout_s: float = _default(ReceiverSection, "association_request_timeout_s")
    # Connections one address may hold at once; more are closed on accept.
    max_connections_per_address: int = _default(ReceiverSection, "max_connections_per_address")
    # Connections that have not yet sent an A-ASSOCIATE-RQ; past this the oldest is closed.
    max_idle_connections: int = _default(ReceiverSection, "max_idle_connections")
    # Refusals are recorded once per kind as they happen, then counted per interval.
    refusal_log_interval_s: float = _default(ReceiverSection, "refusal_log_interval_s")
    # Refuse an association whose Called AE Title is not ours (A-ASSOCIATE-RJ 1/1/7).
    check_called_ae_title: bool = _default(ReceiverSection, "check_called_ae_title")
    # Listen for plain DICOM on `port`; False with `tls` set means TLS only.
    plain: bool = _default(ReceiverSection, "plain_dicom")
    tls: TlsServerConfig | None = None
    # storage_backend = "postgresql": each instance's bytes are committed with its row
    # (daemon/blobstore.py) and no instance file is written; storage_dir keeps the journal.
    blobs_in_database: bool = False


def receiver_options(section: Any) -> dict[str, Any]:
    """ReceiverConfig keyword arguments from the settings' [receiver] section
    (daemon.config.ReceiverSection), so serve.py needs one line for all of them."""
    tls = section.tls
    return {
        "maximum_associations": section.max_associations,
        "network_timeout_s": section.network_timeout_s,
        "association_request_timeout_s": section.association_request_timeout_s,
        "max_connections_per_address": section.max_connections_per_address,
        "max_idle_connections": section.max_idle_connections,
        "refusal_log_interval_s": section.refusal_log_interval_s,
        "check_called_ae_title": section.check_called_ae_title,
        "plain": section.plain_dicom,
        "tls": TlsServerConfig(
            cert=tls.cert, key=tls.key, ca=tls.ca, require_client_cert=tls.require_client_cert,
            caller_certificates=[(c.ae_title, c.subject_cn) for c in tls.caller_certificates], port=tls.port,
        ) if tls.enabled else None,
    }


class SentStudies:
    """The studies each open association has stored instances of, so that its A-RELEASE
    can stamp them (`Study.released_at`: db.sweep completes a whole study sooner once
    the associations that sent it are released)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_association: dict[int, set[str]] = {}

    def add(self, association: object, study_uid: str) -> None:
        with self._lock:
            self._by_association.setdefault(id(association), set()).add(study_uid)

    def pop(self, association: object) -> set[str]:
        with self._lock:
            return self._by_association.pop(id(association), set())


@dataclass
class StoreDeps:
    """What the C-STORE and association handlers need; bound to them at server start."""

    store: InstanceStore
    session_factory: sessionmaker[Session]
    policy: CallerPolicy
    db_attempts: int = _DB_ATTEMPTS
    # SQLite has one writer at a time and its busy handler sleeps in growing steps
    # (up to 100 ms); queueing our own threads on a lock hands over at once instead.
    write_lock: threading.Lock | None = None
    group_commit: GroupCommit[tuple[InstanceRecord, bytes | None]] | None = None
    stats: ReceiverStats = field(default_factory=ReceiverStats)
    # Durable stores: instances are made durable here first; files and rows follow unsynced.
    journal: IngestJournal | None = None
    # The bytes go into the database with the row (storage_backend = "postgresql"), not into a file.
    blobs_in_database: bool = False
    refusals: RefusalLog | None = None
    guard: ConnectionGuard | None = None
    # Set when the Called AE Title must be ours.
    called_ae_title: str | None = None
    # (calling AE, certificate CN) pairs a TLS caller must match; empty: any trusted certificate.
    caller_certificates: frozenset[tuple[str, str]] = frozenset()
    network_timeout_s: float = 60.0
    # The studies each open association has stored instances of (stamped at its release).
    sent_studies: SentStudies = field(default_factory=SentStudies)


def uses_ingest_journal(config: ReceiverConfig) -> bool:
    """Files need the journal: its one fdatasync makes bytes and row durable at once. Bytes
    in the database do not: the synchronous commit of the row and its bytes is one WAL
    flush, shared by concurrent commits, and a second copy in a journal only cost rate
    (bench/storage_backends.py: 149-158 against 172-177 inst/s with one association)."""
    return config.durable and not config.blobs_in_database


def journal_directory(storage_root: Path, process_index: int) -> Path:
    return storage_root / (JOURNAL_DIR if process_index == 0 else f"{JOURNAL_DIR}-{process_index}")


def _journals_to_recover(storage_root: Path, process_index: int) -> list[Path]:
    """Its own journal; the first process (serve's own, started before any other) also
    replays what every other receiver process left, including processes no longer configured."""
    own = [journal_directory(storage_root, process_index)]
    if process_index != 0 or not storage_root.is_dir():
        return own
    others = [(int(m.group(1)), p) for p in storage_root.iterdir() if (m := _OTHER_JOURNAL.match(p.name))]
    return own + [path for _, path in sorted(others)]


@dataclass(frozen=True)
class ProcessShare:
    """This receiver is one of several processes of one `serve` (daemon.receiver_pool): they
    accept on the same listening sockets and count their associations together."""

    index: int
    associations: SharedAssociationCount
    # The first process's listening sockets, in listener order (plain, then TLS); empty in it.
    listeners: tuple[socket.socket, ...] = ()


class Receiver:
    """A running SCP; ``shutdown()`` stops the servers and their associations."""

    def __init__(self, ae: AE, servers: Sequence[ThreadedAssociationServer], stats: ReceiverStats,
                 refusals: RefusalLog | None = None, guard: ConnectionGuard | None = None,
                 journal: IngestJournal | None = None) -> None:
        self._ae = ae
        self._servers = list(servers)
        self._refusals = refusals
        self._guard = guard
        self.journal = journal
        self.stats = stats

    @property
    def port(self) -> int:
        """The plain DICOM port (the TLS port when plain DICOM is off)."""
        return int(self._servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        for server in self._servers:
            if isinstance(server, GuardedAssociationServer) and server.tls_context is not None:
                return int(server.server_address[1])
        return None

    @property
    def ae(self) -> AE:
        return self._ae

    def publish_held(self) -> None:
        """Republish the associations held, for the other processes of a pool."""
        if self._guard is not None:
            self._guard.publish_held()

    def listening_sockets(self) -> tuple[socket.socket, ...]:
        """For the other receiver processes of a pool, which accept on them too."""
        return tuple(cast(socket.socket, server.socket) for server in self._servers)

    def flush_refusals(self) -> None:
        """Write the counted refusals now instead of at the end of the interval."""
        if self._refusals is not None:
            self._refusals.flush()

    def shutdown(self, wait_s: float = 5.0) -> None:
        """Stop accepting, close idle connections, abort associations, record counted refusals."""
        for server in self._servers:
            server.shutdown()
        # pynetdicom's AE.shutdown aborts every association thread, and an abort of one
        # still awaiting its request (or already closing) raises in its DUL thread: close
        # the idle ones and let the closing ones end first.
        if self._guard is not None:
            self._guard.close_idle()
        pending = [assoc for assoc in self._ae.active_associations if assoc.is_acceptor]
        for assoc in pending:
            if assoc.is_established:
                assoc.abort()
        deadline = time.monotonic() + wait_s
        for assoc in pending:
            assoc.join(max(0.0, deadline - time.monotonic()))
        self._ae.shutdown()
        if self.journal is not None:
            self.journal.close()  # checkpoints what is settled; the rest is replayed at the next start
        if self._refusals is not None:
            self._refusals.stop()  # writes what was still only counted

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def build_ae(config: ReceiverConfig) -> AE:
    """The application entity with our presentation contexts and limits."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_pdu_size = config.maximum_pdu_size
    ae.maximum_associations = max(_PYNETDICOM_ASSOCIATION_CEILING, config.maximum_associations)
    ae.network_timeout = config.network_timeout_s
    ae.acse_timeout = config.association_request_timeout_s
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


def start_receiver(config: ReceiverConfig, session_factory: sessionmaker[Session],
                   share: ProcessShare | None = None) -> Receiver:
    """Start the SCP in background threads and return it (``port`` 0 picks a free port).
    `share`: one of several receiver processes (daemon.receiver_pool)."""
    store = InstanceStore(config.storage_dir, config.disk_min_free_mb, durable=config.durable)
    policy = CallerPolicy(config.allowed_callers, config.allow_any_caller)
    if not config.allow_any_caller and not config.allowed_callers:
        logger.warning("no allowed callers configured: every association will be refused",
                       extra={"action": "receiver_config"})
    if not config.plain and config.tls is None:
        raise ValueError("ReceiverConfig: plain DICOM is off and no TLS is configured: nothing to listen on")
    tls_context = server_ssl_context(config.tls) if config.tls is not None else None
    deps = StoreDeps(store=store, session_factory=session_factory, policy=policy,
                     write_lock=threading.Lock() if _is_sqlite(session_factory) else None,
                     called_ae_title=config.ae_title.strip() if config.check_called_ae_title else None,
                     caller_certificates=frozenset(
                         (ae.strip(), cn) for ae, cn in (config.tls.caller_certificates if config.tls else ())),
                     network_timeout_s=config.network_timeout_s, blobs_in_database=config.blobs_in_database)
    if config.blobs_in_database and _is_sqlite(session_factory):
        raise ValueError("ReceiverConfig: instance bytes in the database need PostgreSQL")
    index = share.index if share is not None else 0
    if config.durable:
        # Before listening, and so before serve starts the scheduler and workers: a row
        # whose file a crash lost gets its bytes back before anything reads it. (Also with
        # the bytes in the database, which writes no journal now: an earlier version's.)
        for directory in _journals_to_recover(store.root, index):
            recover(directory, lambda entries: _replay(deps, entries))
    if uses_ingest_journal(config):
        deps.journal = IngestJournal(
            journal_directory(store.root, index), sync_files=lambda paths: sync_files(store.root, paths),
            sync_records=lambda: _with_db_retry(deps, db_ingest.make_commits_durable))
        deps.journal.start()
        journal = deps.journal
        deps.stats.journal_syncs = lambda: journal.syncs
    # Concurrent associations share one transaction, so one database commit, per batch.
    deps.group_commit = GroupCommit(
        commit=lambda items: _record_batch(deps, items),
        commit_one=lambda item: _record_one(deps, item),
    )
    deps.refusals = RefusalLog(
        lambda calling_ae, reason, status: _record_rejection(deps, calling_ae, reason, status, None),
        interval_s=config.refusal_log_interval_s)
    deps.guard = ConnectionGuard(per_address=config.max_connections_per_address,
                                 max_idle=config.max_idle_connections,
                                 max_associations=config.maximum_associations,
                                 refusals=deps.refusals, stats=deps.stats,
                                 shared=share.associations if share is not None else None)
    ae = build_ae(config)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, handle_connection_open),
        (evt.EVT_REQUESTED, handle_association_request, [deps]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [deps]),
        (evt.EVT_RELEASED, handle_released, [deps]),
        # An abort or a dropped connection is no sign that the sender is done.
        (evt.EVT_ABORTED, handle_ended, [deps]),
        (evt.EVT_CONN_CLOSE, handle_ended, [deps]),
    ]
    listeners: list[tuple[int, ssl.SSLContext | None]] = []
    if config.plain:
        listeners.append((config.port, None))
    if config.tls is not None:
        listeners.append((config.tls.port, tls_context))
    servers: list[ThreadedAssociationServer] = []
    adopted = share.listeners if share is not None else ()
    if adopted and len(adopted) != len(listeners):
        raise ValueError("ProcessShare: one listening socket per listener (plain, then TLS) is needed")
    try:
        for i, (port, context) in enumerate(listeners):
            servers.append(_start_server(ae, (config.bind_address, port), handlers, deps.guard, context,
                                         config.association_request_timeout_s,
                                         listening_socket=adopted[i] if adopted else None,
                                         shared_accept=share is not None))
    except BaseException:
        ae.shutdown()
        if deps.journal is not None:
            deps.journal.close()
        raise
    deps.refusals.start()
    receiver = Receiver(ae, servers, deps.stats, deps.refusals, deps.guard, deps.journal)
    logger.info("receiver listening", extra={"action": "receiver_start", "ae_title": config.ae_title,
                                             "port": receiver.port, "tls_port": receiver.tls_port,
                                             "storage_dir": str(store.root),
                                             "instance_bytes": "database" if config.blobs_in_database else "files"})
    return receiver


def _start_server(ae: AE, address: tuple[str, int], handlers: list[Any], guard: ConnectionGuard,
                  tls_context: ssl.SSLContext | None, handshake_timeout_s: float, *,
                  listening_socket: socket.socket | None = None,
                  shared_accept: bool = False) -> GuardedAssociationServer:
    """What AE.start_server(block=False) does, with our server class."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=GuardedAssociationServer,
                            guard=guard, tls_context=tls_context, handshake_timeout_s=handshake_timeout_s,
                            listening_socket=listening_socket, shared_accept=shared_accept)
    assert isinstance(server, GuardedAssociationServer)
    thread = threading.Thread(target=make_target(server.serve_forever), name="AcceptorServer", daemon=True)
    thread.start()
    ae._servers.append(server)  # so AE.shutdown() stops it too
    return server


# --- handlers ---------------------------------------------------------------------------------


def handle_connection_open(event: Event) -> None:
    """Turn Nagle off: our small C-STORE-RSP PDUs must not wait for delayed ACKs."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            logger.debug("could not set TCP_NODELAY", exc_info=True)


def handle_association_request(event: Event, deps: StoreDeps) -> None:
    """Refuse with A-ASSOCIATE-RJ a caller outside the allow-list, one whose client
    certificate is not mapped to its AE title, one calling another AE title (when
    checked), and any beyond the association limit; record why at a bounded rate."""
    assoc = event.assoc
    connection: Connection | None = getattr(assoc, "headscreen_connection", None)
    if connection is not None:
        connection.requested = True  # no longer idle: never evicted from here on
    calling_ae = _calling_ae(event)
    host = normalise_host(assoc.requestor.address)
    refusal = _association_refusal(event, deps, connection, calling_ae, host)
    if refusal is None:
        if connection is not None:
            # Past the request, a stalled PDU may wait the full network timeout.
            set_timeout(connection.sock, deps.network_timeout_s)
        prefer_requestor_transfer_syntaxes(assoc)
        return
    rsd, reason = refusal
    deps.stats.add_connection_event("association_limit" if rsd == _RJ_LOCAL_LIMIT else "association_refused")
    key = RefusalKey(host, calling_ae, reason, _rj_status(rsd))
    if deps.refusals is not None:
        # The first of its kind is recorded before answering, so that row exists by the
        # time the peer sees the refusal; repeats are only counted (RefusalLog).
        deps.refusals.refused(key)
    else:
        _record_rejection(deps, calling_ae, key.row_text(), key.status, None)
    assoc.acse.send_reject(*rsd)
    # Wait until the A-ASSOCIATE-RJ has gone out; otherwise the socket may close first
    # and the peer sees an abort instead of the reason.
    assoc.kill()


def _association_refusal(event: Event, deps: StoreDeps, connection: Connection | None, calling_ae: str,
                         host: str | None) -> tuple[tuple[int, int, int], str] | None:
    """(A-ASSOCIATE-RJ result/source/reason, why) or None to accept."""
    reason = deps.policy.refusal(calling_ae, host)
    if reason is not None:
        return _RJ_CALLING_AE, reason
    if connection is not None and connection.tls and deps.caller_certificates:
        if (calling_ae, connection.peer_cn) not in deps.caller_certificates:
            return _RJ_CALLING_AE, "client certificate not mapped to this calling AE title"
    if deps.called_ae_title is not None:
        called = _called_ae(event)
        if called != deps.called_ae_title:
            return _RJ_CALLED_AE, "called AE title is not ours"
    if deps.guard is not None and connection is not None and not deps.guard.take_association_slot(connection):
        return _RJ_LOCAL_LIMIT, "association limit reached"
    return None


def prefer_requestor_transfer_syntaxes(assoc: Any) -> None:
    """Make this association accept the transfer syntax the peer proposed first.

    pynetdicom picks the first of the *acceptor's* syntaxes that the peer offers.
    A PACS proposes the syntax its file is in first; taking that one means it
    never has to transcode: a decoder it lacks would fail the transfer, and an
    offered lossy encoding is only used when the data already is lossy.
    """
    proposed: dict[str, list[str]] = {}
    for context in assoc.requestor.primitive.presentation_context_definition_list:
        order = proposed.setdefault(str(context.abstract_syntax), [])
        order.extend(str(ts) for ts in context.transfer_syntax if str(ts) not in order)
    contexts = []
    for supported in assoc.acceptor.supported_contexts:
        ours = [str(ts) for ts in supported.transfer_syntax]
        theirs = [ts for ts in proposed.get(str(supported.abstract_syntax), []) if ts in ours]
        ordered = theirs + [ts for ts in ours if ts not in theirs]
        contexts.append(build_context(supported.abstract_syntax, ordered))
    assoc.acceptor.supported_contexts = contexts


def handle_echo(event: Event) -> int:
    return int(StoreStatus.SUCCESS)


def handle_store(event: Event, deps: StoreDeps) -> Dataset | int:
    """Store one instance: decode, identify, write, record; each stage has its own status."""
    stats = deps.stats
    try:
        started = time.perf_counter()
        part10, header = _decode_stage(event)
        record = _identify_stage(event, header, deps.store, size_bytes=len(part10), stats=stats)
        decoded = time.perf_counter()
        stats.add_stage("decode", decoded - started)
        stored, entry = _write_stage(deps, record, part10)
        written = time.perf_counter()
        stats.add_stage("write", written - decoded)
        try:
            _stored(record, _record_stage(deps, record, part10 if deps.blobs_in_database else None))
        finally:
            if entry is not None and deps.journal is not None:
                deps.journal.settle(entry, stored)  # its segment may go at the next checkpoint
        stats.add_stage("record", time.perf_counter() - written)
    except _Refused as refused:
        stats.add_refused(refused.status)
        return _refuse(deps, event, refused)
    stats.add_stored()
    deps.sent_studies.add(event.assoc, record.study_instance_uid)
    return int(StoreStatus.SUCCESS)  # a bare status skips encoding a response data set


def handle_released(event: Event, deps: StoreDeps) -> None:
    """An orderly A-RELEASE: the sender says it has sent what it meant to, so the studies
    it stored may complete after `released_quiet_s` instead of `whole_quiet_s` (db.sweep).
    Not recorded (logged): they wait the longer quiet period, as before."""
    studies = deps.sent_studies.pop(event.assoc)
    if not studies:
        return
    try:
        _with_db_retry(deps, lambda session: db_api.record_association_released(session, studies))
    except Exception as exc:
        logger.warning("could not record an association's release; its studies wait whole_quiet_s",
                       extra={"action": "release_not_recorded", "studies": len(studies),
                              "error": type(exc).__name__})


def handle_ended(event: Event, deps: StoreDeps) -> None:
    """An abort or a closed connection: forget the association's studies, stamp none."""
    deps.sent_studies.pop(event.assoc)
    if deps.guard is not None:
        deps.guard.publish_held()  # its slot is free for the other receiver processes too


def _stored(record: InstanceRecord, outcome: RecordOutcome) -> None:
    if outcome.study_reopened:
        logger.info("late instance reopened a complete study", extra={
            "action": "study_reopened", "study_instance_uid": record.study_instance_uid})
    logger.debug("instance stored", extra={
        "action": "instance_stored", "sop_instance_uid": record.sop_instance_uid,
        "study_instance_uid": record.study_instance_uid, "new_row": outcome.created,
        "study_reopened": outcome.study_reopened, "size_bytes": record.size_bytes})


class _Refused(Exception):
    """A stage's verdict: answer `status` and record `reason` for this instance."""

    def __init__(self, status: StoreStatus, reason: str, sop_uid: str, *, logged: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.sop_uid = sop_uid
        self.logged = logged


def _decode_stage(event: Event) -> tuple[bytes, Dataset]:
    """The Part 10 bytes to store and the decoded header; 0xC210 if it does not decode."""
    command_uid = command_sop_uid(event)
    try:
        dataset = event.encoded_dataset(include_meta=False)
        transfer_syntax = UID(event.context.transfer_syntax)
        header = parse_header(dataset, transfer_syntax)
        request = cast(C_STORE, event.request)  # EVT_C_STORE's
        prefix = part10_prefix(str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
                               transfer_syntax)
        return prefix + dataset, header
    except InputRejected as exc:
        raise _Refused(StoreStatus.CANNOT_UNDERSTAND, str(exc), command_uid) from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        logger.exception("C-STORE data set does not decode",
                         extra={"action": "store_rejected", "sop_instance_uid": command_uid})
        raise _Refused(StoreStatus.CANNOT_UNDERSTAND, f"data set does not decode: {type(exc).__name__}",
                       command_uid, logged=True) from exc


def _identify_stage(event: Event, header: Dataset, store: InstanceStore, *, size_bytes: int,
                    stats: ReceiverStats | None = None) -> InstanceRecord:
    """The DB row; 0xA900 when the identifying UIDs are unusable, 0xC210 if one of them won't
    decode (any other header value is optional: left out when bad, see build_record)."""
    command_uid = command_sop_uid(event)
    try:
        return build_record(header, event, _calling_ae(event), store, size_bytes=size_bytes, stats=stats)
    except InvalidUid as exc:
        raise _Refused(StoreStatus.DATASET_MISMATCH, str(exc), command_uid) from exc
    except Exception as exc:  # an identifying element failed to convert
        logger.exception("C-STORE header element does not decode",
                         extra={"action": "store_rejected", "sop_instance_uid": command_uid})
        raise _Refused(StoreStatus.CANNOT_UNDERSTAND, f"header element does not decode: {type(exc).__name__}",
                       command_uid, logged=True) from exc


def _write_stage(deps: StoreDeps, record: InstanceRecord,
                 part10: bytes) -> tuple[Path | None, JournalEntry | None]:
    """The durable instance and its file (None when the bytes go into the database with the
    row); 0xA700 below the disk watermark (nothing written), 0xA701 on I/O errors. With the
    journal: the entry is appended, the file written while the journal syncs, and this
    returns once the entry is durable (the caller settles it)."""
    store, journal = deps.store, deps.journal
    try:
        if journal is None:
            if deps.blobs_in_database:
                # Nothing is written here, but a full disk beside the database refuses cleanly
                # (0xA700) instead of failing its commit, as when the journal's copy came here.
                store.check_space(len(part10))
                return None, None
            return store.write(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid,
                               part10).path, None
        store.check_space(len(part10) * (1 if deps.blobs_in_database else 2))  # the journal's copy (and the file)
        entry = journal.append(record, part10)
        stored: StoredInstance | None = None
        try:
            if not deps.blobs_in_database:
                stored = store.write(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid,
                                     part10, sync=False, space_checked=True)
            journal.wait_durable(entry)
        except BaseException:
            journal.settle(entry, stored.path if stored is not None else None)
            raise
        return (stored.path if stored is not None else None), entry
    except StorageFull as exc:
        raise _Refused(StoreStatus.OUT_OF_RESOURCES, str(exc), record.sop_instance_uid) from exc
    except OSError as exc:
        logger.exception("C-STORE write failed",
                         extra={"action": "store_failed", "sop_instance_uid": record.sop_instance_uid})
        raise _Refused(StoreStatus.STORE_FAILED, f"write failed: {exc.strerror or type(exc).__name__}",
                       record.sop_instance_uid, logged=True) from exc


def _record_stage(deps: StoreDeps, record: InstanceRecord, payload: bytes | None) -> RecordOutcome:
    """The committed DB row (with the instance's bytes when `payload` is given); 0xA701 if it
    cannot be committed (the file stays; a re-send fixes it)."""
    try:
        outcome = _record_instance(deps, record, payload)
    except Exception as exc:
        logger.exception("C-STORE database record failed",
                         extra={"action": "store_failed", "sop_instance_uid": record.sop_instance_uid})
        raise _Refused(StoreStatus.STORE_FAILED, f"database record failed: {type(exc).__name__}",
                       record.sop_instance_uid, logged=True) from exc
    return outcome


# --- outcomes ---------------------------------------------------------------------------------


def _called_ae(event: Event) -> str:
    primitive = getattr(event.assoc.requestor, "primitive", None)
    title = getattr(primitive, "called_ae_title", None) or ""
    return (title.decode("ascii", "replace") if isinstance(title, bytes) else str(title)).strip()


def _calling_ae(event: Event) -> str:
    requestor = event.assoc.requestor
    # At EVT_REQUESTED only the A-ASSOCIATE primitive carries the title yet.
    primitive = getattr(requestor, "primitive", None)
    title = getattr(primitive, "calling_ae_title", None) or requestor.ae_title
    return (title.decode("ascii", "replace") if isinstance(title, bytes) else str(title)).strip()


def _status(status: StoreStatus, comment: str | None = None) -> Dataset:
    response = Dataset()
    response.Status = int(status)
    if comment:
        response.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return response


def _refuse(deps: StoreDeps, event: Event, refused: _Refused) -> Dataset:
    """Record and answer a refused instance; the association carries on."""
    if not refused.logged:
        logger.warning("C-STORE refused", extra={"action": "store_rejected", "sop_instance_uid": refused.sop_uid,
                                                 "status": f"0x{int(refused.status):04X}", "reason": refused.reason})
    sop_class = str(event.request.AffectedSOPClassUID or "") or None
    _record_rejection(deps, _calling_ae(event), refused.reason, int(refused.status), refused.sop_uid or None,
                      sop_class)
    return _status(refused.status, refused.reason)


def _record_rejection(deps: StoreDeps, calling_ae: str | None, reason: str, status: int,
                      sop_uid: str | None, sop_class: str | None = None) -> None:
    try:
        _with_db_retry(deps, lambda session: db_api.record_rejection(
            session, calling_ae, reason, status, sop_instance_uid=sop_uid, sop_class_uid=sop_class))
    except Exception:
        logger.exception("could not record a rejection", extra={"action": "rejection_not_recorded",
                                                                "sop_instance_uid": sop_uid})


def _record_instance(deps: StoreDeps, record: InstanceRecord, payload: bytes | None = None) -> RecordOutcome:
    if deps.group_commit is None:
        return _record_one(deps, (record, payload))
    return deps.group_commit.submit((record, payload))


def _record_batch(deps: StoreDeps, items: list[tuple[InstanceRecord, bytes | None]]) -> list[RecordOutcome]:
    """Commit several instances' rows (and bytes) in one transaction (db.api.record_instances);
    the commit does not wait for the disk when the journal already holds them durably."""
    if len(items) == 1:
        return [_record_one(deps, items[0])]
    durable = deps.journal is None
    records = [record for record, _ in items]
    payloads = _payloads(items)
    outcomes = list(_with_db_retry(deps, lambda session: db_api.record_instances(
        session, records, durable=durable, payloads=payloads)))
    deps.stats.add_row_commit()
    return outcomes


def _record_one(deps: StoreDeps, item: tuple[InstanceRecord, bytes | None]) -> RecordOutcome:
    durable = deps.journal is None
    record, payload = item
    outcome: RecordOutcome = _with_db_retry(deps, lambda session: db_api.record_instance(
        session, record, durable=durable, payload=payload))
    deps.stats.add_row_commit()
    return outcome


def _payloads(items: list[tuple[InstanceRecord, bytes | None]]) -> list[bytes] | None:
    """The instances' bytes when they go into the database, else None."""
    payloads = [payload for _, payload in items if payload is not None]
    if not payloads:
        return None
    if len(payloads) != len(items):
        raise ValueError("instances with and without their bytes in one batch")
    return payloads


def _replay(deps: StoreDeps, entries: list[tuple[InstanceRecord, bytes]]) -> None:
    """Recovery (daemon.ingest_journal.recover): each file written and fsynced (or, with
    the bytes in the database, stored with its row), then the rows recorded with a durable
    commit, in journal order. A row that cannot be recorded even on its own is logged and
    left out (its instance was refused when it arrived, never acknowledged)."""
    in_database = deps.blobs_in_database
    if not in_database:
        for record, data in entries:
            # The same path build_record recorded (both come from InstanceStore.relative_path).
            deps.store.write(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid,
                             data, sync=True, space_checked=True)
    records = [record for record, _ in entries]
    payloads = [data for _, data in entries] if in_database else None
    try:
        _with_db_retry(deps, lambda session: db_api.record_instances(session, records, payloads=payloads))
        return
    except Exception:
        logger.warning("journal replay: batch not recorded; recording rows one by one",
                       extra={"action": "journal_replay_fallback", "rows": len(records)}, exc_info=True)
    for record, data in entries:
        try:
            _replay_one(deps, record, data if in_database else None)
        except Exception:
            logger.exception("journal replay: row not recorded", extra={
                "action": "journal_replay_failed", "sop_instance_uid": record.sop_instance_uid})


def _replay_one(deps: StoreDeps, record: InstanceRecord, payload: bytes | None) -> RecordOutcome:
    outcome: RecordOutcome = _with_db_retry(deps, lambda session: db_api.record_instance(session, record,
                                                                                          payload=payload))
    return outcome


def _with_db_retry(deps: StoreDeps, work: Callable[[Session], Any]) -> Any:
    """One session per call (db.api functions commit their own short transaction);
    retried when SQLite is locked or a concurrent insert won the race."""
    for attempt in range(1, deps.db_attempts + 1):
        try:
            with deps.write_lock or nullcontext(), deps.session_factory() as session:
                return work(session)
        except (OperationalError, IntegrityError) as exc:
            if attempt == deps.db_attempts or not _is_retryable(exc):
                raise
            logger.info("database busy, retrying", extra={"action": "db_retry", "attempt": attempt})
            time.sleep(_DB_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _is_sqlite(session_factory: sessionmaker[Session]) -> bool:
    bind = session_factory.kw.get("bind")
    return bind is not None and bind.dialect.name == "sqlite"


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, IntegrityError):
        return True  # two associations created the same study/series; the retry finds it
    if getattr(exc, "connection_invalidated", False):
        return True  # a pooled connection lost unpinged (db.engine.PING_WHEN_IDLE_S): the retry gets another
    text = str(exc.orig if hasattr(exc, "orig") else exc).lower()
    return "locked" in text or "busy" in text or "deadlock" in text or "serialize" in text
