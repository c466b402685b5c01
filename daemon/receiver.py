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
nothing written) -> atomic write (0xA701) -> database row (0xA701) -> Success.
Success is answered only after the file is fsynced and the row committed. A bad
instance never ends the association. Only its identity (UIDs, SOP class) can refuse
an instance: any other recorded header value that does not decode or fit its VR is
left out of the row, and text is cut to its column (build_record).

Pixel data is never decoded: the header is parsed up to (7FE0,xxxx) and the rest
is only walked to check that it is complete; the bytes are stored as received.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import date
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
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
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.events import Event
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from daemon.errors import InputRejected
from daemon.storage import InstanceStore, InvalidUid, StorageFull, StoredInstance, check_uid
from db import api as db_api
from db.models import Series, Study
from db.types import InstanceRecord, RecordOutcome

logger = logging.getLogger(__name__)

STORAGE_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
)
_MODALITY_OF_CLASS = {CTImageStorage: "CT", EnhancedCTImageStorage: "CT", MRImageStorage: "MR",
                      EnhancedMRImageStorage: "MR"}
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
# Refusals before any A-ASSOCIATE exchange have no ACSE code; these lie outside its range.
CONNECTION_REFUSED_STATUS = 0xFF0001  # closed at once: address over its limit, or an idle one evicted
TLS_REFUSED_STATUS = 0xFF0002         # TLS handshake failed (no or untrusted certificate, plain DICOM)

# pynetdicom counts every connection thread, idle or not, against its own limit, which
# is how 17 silent sockets locked the port; we count requested associations ourselves
# (ConnectionGuard) and leave pynetdicom's check only as a far-off backstop.
_PYNETDICOM_ASSOCIATION_CEILING = 4096

_DB_ATTEMPTS = 6
_DB_BACKOFF_S = 0.02
_ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is LO

# Walking a data set by element lengths (see check_complete).
_PIXEL_GROUP = 0x7FE0
_ITEM_TAG = 0xFFFEE000
_SEQUENCE_DELIMITER_TAG = 0xFFFEE0DD
_ITEM_DELIMITER_TAG = 0xFFFEE00D
_UNDEFINED_LENGTH = 0xFFFFFFFF
_KNOWN_VRS = {vr.encode() for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL",
    "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US",
    "UT", "UV")}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


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
                    "values_truncated": dict(self._values_truncated)}


class CallerLike(Protocol):
    """Anything with an AE title and an optional host (daemon.config.AllowedCaller fits)."""

    ae_title: str
    host: str | None


CallerEntry = CallerLike | tuple[str, str | None] | str


@dataclass(frozen=True)
class AllowedCaller:
    ae_title: str
    host: str | None = None


@dataclass(frozen=True)
class TlsServerConfig:
    """DICOM over TLS on a second port (PS3.15 B.1); paths are PEM files."""

    cert: Path
    key: Path
    # CAs whose client certificates are trusted; without one no client certificate is asked for.
    ca: Path | None = None
    require_client_cert: bool = False
    # (calling AE title, client certificate subject CN) pairs; when given, a TLS caller
    # must present the certificate mapped to the AE title it calls with.
    caller_certificates: Sequence[tuple[str, str]] = ()
    port: int = 2762


@dataclass(frozen=True)
class ReceiverConfig:
    """What the receiver needs from the settings; the CLI maps Settings onto it."""

    ae_title: str
    storage_dir: Path
    bind_address: str = "0.0.0.0"
    port: int = 11112
    # AllowedCaller-like objects, (ae_title, host) pairs or bare AE titles.
    allowed_callers: Sequence[CallerEntry] = ()
    allow_any_caller: bool = False
    disk_min_free_mb: int = 2048
    # 4 MiB is above every SCU's send limit, so peers send their largest PDUs.
    maximum_pdu_size: int = 4 * 1024 * 1024
    maximum_associations: int = 16
    network_timeout_s: float = 60.0
    # fsync files and directories; False only for throw-away test stores.
    durable: bool = True
    # A connection must send its A-ASSOCIATE-RQ (and finish any TLS handshake) within
    # this; also the ACSE timeout. pynetdicom's 30 s let silent sockets hold slots.
    association_request_timeout_s: float = 10.0
    # Connections one address may hold at once; more are closed on accept.
    max_connections_per_address: int = 8
    # Connections that have not yet sent an A-ASSOCIATE-RQ; past this the oldest is closed.
    max_idle_connections: int = 32
    # Refusals are recorded once per kind as they happen, then counted per interval.
    refusal_log_interval_s: float = 60.0
    # Refuse an association whose Called AE Title is not ours (A-ASSOCIATE-RJ 1/1/7).
    check_called_ae_title: bool = False
    # Listen for plain DICOM on `port`; False with `tls` set means TLS only.
    plain: bool = True
    tls: TlsServerConfig | None = None


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


def _no_passphrase() -> bytes:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key and hang.
    raise ValueError("the TLS private key is encrypted; use an unencrypted key readable only by the service user")


def server_ssl_context(tls: TlsServerConfig) -> ssl.SSLContext:
    """The TLS context of the SCP: TLS 1.2 or later, client certificates verified against `ca`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key), password=_no_passphrase)
    if tls.ca is not None:
        context.load_verify_locations(cafile=str(tls.ca))
        # Optional: a certificate sent is still verified; only its absence is tolerated.
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert or tls.caller_certificates:
        raise ValueError("TlsServerConfig: client certificates need a 'ca' to verify them against")
    return context


class CallerPolicy:
    """Decides whether a (calling AE title, host) may open an association."""

    def __init__(self, allowed: Sequence[CallerEntry], allow_any: bool) -> None:
        self.allow_any = allow_any
        self._allowed = [_caller_key(entry) for entry in allowed]

    def refusal(self, calling_ae: str, host: str | None) -> str | None:
        """None if the caller is allowed, else the reason for refusing it."""
        if self.allow_any:
            return None
        peer = _normalise_host(host)
        title = calling_ae.strip()
        known_title = False
        for allowed_title, allowed_host in self._allowed:
            if allowed_title != title:
                continue
            known_title = True
            if allowed_host is None or allowed_host == peer:
                return None
        if known_title:
            return "calling AE title not allowed from this host"
        return "calling AE title not in the allow-list"


def _caller_key(entry: CallerEntry) -> tuple[str, str | None]:
    """(AE title, host) from an AllowedCaller-like object, an (ae_title, host) pair or a bare title."""
    if isinstance(entry, str):
        title, host = entry, None
    elif isinstance(entry, tuple | list):
        title, host = entry[0], (entry[1] if len(entry) > 1 else None)
    else:
        title, host = entry.ae_title, entry.host
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"allowed_callers: {entry!r} has no AE title")
    return title.strip(), _normalise_host(host)


def _normalise_host(host: str | None) -> str | None:
    if host is None:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


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
    group_commit: GroupCommit | None = None
    stats: ReceiverStats = field(default_factory=ReceiverStats)
    refusals: RefusalLog | None = None
    guard: ConnectionGuard | None = None
    # Set when the Called AE Title must be ours.
    called_ae_title: str | None = None
    # (calling AE, certificate CN) pairs a TLS caller must match; empty: any trusted certificate.
    caller_certificates: frozenset[tuple[str, str]] = frozenset()
    network_timeout_s: float = 60.0


class Receiver:
    """A running SCP; ``shutdown()`` stops the servers and their associations."""

    def __init__(self, ae: AE, servers: Sequence[ThreadedAssociationServer], stats: ReceiverStats,
                 refusals: RefusalLog | None = None, guard: ConnectionGuard | None = None) -> None:
        self._ae = ae
        self._servers = list(servers)
        self._refusals = refusals
        self._guard = guard
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


def start_receiver(config: ReceiverConfig, session_factory: sessionmaker[Session]) -> Receiver:
    """Start the SCP in background threads and return it (``port`` 0 picks a free port)."""
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
                     network_timeout_s=config.network_timeout_s)
    # Concurrent associations share one transaction, so one journal fsync, per batch.
    deps.group_commit = GroupCommit(
        commit=lambda records: _record_batch(deps, records),
        commit_one=lambda record: _record_one(deps, record),
    )
    deps.refusals = RefusalLog(
        lambda calling_ae, reason, status: _record_rejection(deps, calling_ae, reason, status, None),
        interval_s=config.refusal_log_interval_s)
    deps.guard = ConnectionGuard(per_address=config.max_connections_per_address,
                                 max_idle=config.max_idle_connections,
                                 max_associations=config.maximum_associations,
                                 refusals=deps.refusals, stats=deps.stats)
    ae = build_ae(config)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, handle_connection_open),
        (evt.EVT_REQUESTED, handle_association_request, [deps]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [deps]),
    ]
    listeners: list[tuple[int, ssl.SSLContext | None]] = []
    if config.plain:
        listeners.append((config.port, None))
    if config.tls is not None:
        listeners.append((config.tls.port, tls_context))
    servers: list[ThreadedAssociationServer] = []
    try:
        for port, context in listeners:
            servers.append(_start_server(ae, (config.bind_address, port), handlers, deps.guard, context,
                                         config.association_request_timeout_s))
    except BaseException:
        ae.shutdown()
        raise
    deps.refusals.start()
    receiver = Receiver(ae, servers, deps.stats, deps.refusals, deps.guard)
    logger.info("receiver listening", extra={"action": "receiver_start", "ae_title": config.ae_title,
                                             "port": receiver.port, "tls_port": receiver.tls_port,
                                             "storage_dir": str(store.root)})
    return receiver


def _start_server(ae: AE, address: tuple[str, int], handlers: list[Any], guard: ConnectionGuard,
                  tls_context: ssl.SSLContext | None, handshake_timeout_s: float) -> GuardedAssociationServer:
    """What AE.start_server(block=False) does, with our server class."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=GuardedAssociationServer,
                            guard=guard, tls_context=tls_context, handshake_timeout_s=handshake_timeout_s)
    thread = threading.Thread(target=make_target(server.serve_forever), name="AcceptorServer", daemon=True)
    thread.start()
    ae._servers.append(server)  # so AE.shutdown() stops it too
    return server


# --- connections before association -------------------------------------------------------


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


class _Connection:
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
    """

    def __init__(self, *, per_address: int, max_idle: int, max_associations: int,
                 refusals: RefusalLog | None, stats: ReceiverStats) -> None:
        self.per_address = per_address
        self.max_idle = max_idle
        self.max_associations = max_associations
        self.refusals = refusals
        self.stats = stats
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []

    def admit(self, sock: socket.socket, address: str, *, tls: bool) -> _Connection | None:
        host = _normalise_host(address)
        evicted: _Connection | None = None
        why = ""
        connection: _Connection | None = None
        with self._lock:
            self._connections = [c for c in self._connections if c.alive()]
            mine = [c for c in self._connections if c.address == host]
            idle = [c for c in self._connections if c.idle()]
            if len(mine) >= self.per_address:
                mine_idle = [c for c in mine if c.idle()]
                if mine_idle:
                    evicted = min(mine_idle, key=lambda c: c.opened)
                    why = f"idle, to admit another: more than {self.per_address} connections from this address"
            elif len(idle) >= self.max_idle:
                evicted = min(idle, key=lambda c: c.opened)
                why = f"idle, to admit another: more than {self.max_idle} connections without an association request"
            if len(mine) < self.per_address or evicted is not None:
                connection = _Connection(host, sock, tls)
                self._connections.append(connection)
            if evicted is not None:
                evicted.evicted = True
        if connection is None:
            self.stats.add_connection_event("refused_address_limit")
            self._refused(RefusalKey(host, None, f"more than {self.per_address} associated connections from "
                                     "this address", CONNECTION_REFUSED_STATUS))
        if evicted is not None:
            evicted.close()
            self.stats.add_connection_event("evicted_idle")
            self._refused(RefusalKey(evicted.address, None, why, CONNECTION_REFUSED_STATUS))
        return connection

    def close_idle(self) -> None:
        """Close every connection that has not requested an association (at shutdown)."""
        with self._lock:
            idle = [c for c in self._connections if c.idle()]
            for connection in idle:
                connection.evicted = True
        for connection in idle:
            connection.close()

    def take_association_slot(self, connection: _Connection) -> bool:
        with self._lock:
            held = sum(1 for c in self._connections if c.accepted and c is not connection and c.alive())
            if held >= self.max_associations:
                return False
            connection.accepted = True
            return True

    def tls_failed(self, connection: _Connection, reason: str) -> None:
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
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's server with admission control (ConnectionGuard) and a TLS handshake
    that runs in the connection's thread under a timeout.

    pynetdicom's own TLS server handshakes inside the accept loop with no timeout, so a
    single silent peer on the TLS port would stop every other caller.
    """

    def __init__(self, ae: AE, address: tuple[str, int], ae_title: str, contexts: list[Any],
                 ssl_context: ssl.SSLContext | None = None, evt_handlers: list[Any] | None = None, *,
                 guard: ConnectionGuard, tls_context: ssl.SSLContext | None = None,
                 handshake_timeout_s: float = 10.0) -> None:
        self.guard = guard
        self.tls_context = tls_context
        self.handshake_timeout_s = handshake_timeout_s
        self._local = threading.local()
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers=evt_handlers,
                         request_handler=_GuardedRequestHandler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
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

    def current_connection(self) -> _Connection:
        return self._local.connection  # type: ignore[no-any-return]

    def _serve(self, request: socket.socket, client_address: Any, connection: _Connection) -> None:
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

    def _handshake(self, raw: socket.socket, connection: _Connection) -> ssl.SSLSocket | None:
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


def _set_timeout(sock: socket.socket, seconds: float) -> None:
    try:
        sock.settimeout(seconds)
    except OSError:
        pass  # already closed


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
    connection: _Connection | None = getattr(assoc, "headscreen_connection", None)
    if connection is not None:
        connection.requested = True  # no longer idle: never evicted from here on
    calling_ae = _calling_ae(event)
    host = _normalise_host(assoc.requestor.address)
    refusal = _association_refusal(event, deps, connection, calling_ae, host)
    if refusal is None:
        if connection is not None:
            # Past the request, a stalled PDU may wait the full network timeout.
            _set_timeout(connection.sock, deps.network_timeout_s)
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


def _association_refusal(event: Event, deps: StoreDeps, connection: _Connection | None, calling_ae: str,
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
        stored = _write_stage(deps.store, record, part10)
        written = time.perf_counter()
        stats.add_stage("write", written - decoded)
        outcome = _record_stage(deps, record)
        stats.add_stage("record", time.perf_counter() - written)
    except _Refused as refused:
        stats.add_refused(refused.status)
        return _refuse(deps, event, refused)
    stats.add_stored()
    logger.debug("instance stored", extra={
        "action": "instance_stored", "sop_instance_uid": record.sop_instance_uid,
        "study_instance_uid": record.study_instance_uid, "new_row": outcome.created,
        "study_reopened": outcome.study_reopened, "size_bytes": stored.size_bytes})
    return int(StoreStatus.SUCCESS)  # a bare status skips encoding a response data set


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
    command_sop_uid = _command_sop_uid(event)
    try:
        header = parse_header(event.encoded_dataset(include_meta=False), UID(event.context.transfer_syntax))
        return event.encoded_dataset(), header
    except InputRejected as exc:
        raise _Refused(StoreStatus.CANNOT_UNDERSTAND, str(exc), command_sop_uid) from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        logger.exception("C-STORE data set does not decode",
                         extra={"action": "store_rejected", "sop_instance_uid": command_sop_uid})
        raise _Refused(StoreStatus.CANNOT_UNDERSTAND, f"data set does not decode: {type(exc).__name__}",
                       command_sop_uid, logged=True) from exc


def _identify_stage(event: Event, header: Dataset, store: InstanceStore, *, size_bytes: int,
                    stats: ReceiverStats | None = None) -> InstanceRecord:
    """The DB row; 0xA900 when the identifying UIDs are unusable, 0xC210 if one of them won't
    decode (any other header value is optional: left out when bad, see build_record)."""
    command_sop_uid = _command_sop_uid(event)
    try:
        return build_record(header, event, _calling_ae(event), store, size_bytes=size_bytes, stats=stats)
    except InvalidUid as exc:
        raise _Refused(StoreStatus.DATASET_MISMATCH, str(exc), command_sop_uid) from exc
    except Exception as exc:  # an identifying element failed to convert
        logger.exception("C-STORE header element does not decode",
                         extra={"action": "store_rejected", "sop_instance_uid": command_sop_uid})
        raise _Refused(StoreStatus.CANNOT_UNDERSTAND, f"header element does not decode: {type(exc).__name__}",
                       command_sop_uid, logged=True) from exc


def _write_stage(store: InstanceStore, record: InstanceRecord, part10: bytes) -> StoredInstance:
    """The durable file; 0xA700 below the disk watermark (nothing written), 0xA701 on I/O errors."""
    try:
        return store.write(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid, part10)
    except StorageFull as exc:
        raise _Refused(StoreStatus.OUT_OF_RESOURCES, str(exc), record.sop_instance_uid) from exc
    except OSError as exc:
        logger.exception("C-STORE write failed",
                         extra={"action": "store_failed", "sop_instance_uid": record.sop_instance_uid})
        raise _Refused(StoreStatus.STORE_FAILED, f"write failed: {exc.strerror or type(exc).__name__}",
                       record.sop_instance_uid, logged=True) from exc


def _record_stage(deps: StoreDeps, record: InstanceRecord) -> RecordOutcome:
    """The committed DB row; 0xA701 if it cannot be committed (the file stays; a re-send fixes it)."""
    try:
        outcome = _record_instance(deps, record)
    except Exception as exc:
        logger.exception("C-STORE database record failed",
                         extra={"action": "store_failed", "sop_instance_uid": record.sop_instance_uid})
        raise _Refused(StoreStatus.STORE_FAILED, f"database record failed: {type(exc).__name__}",
                       record.sop_instance_uid, logged=True) from exc
    if outcome.study_reopened:
        logger.info("late instance reopened a complete study", extra={
            "action": "study_reopened", "study_instance_uid": record.study_instance_uid})
    return outcome


def _command_sop_uid(event: Event) -> str:
    return str(getattr(event.request, "AffectedSOPInstanceUID", None) or "").strip()


# --- header decoding --------------------------------------------------------------------------


def parse_header(encoded: bytes, transfer_syntax: UID) -> Dataset:
    """Decode the data set up to pixel data and check the rest is complete.

    Raises ``InputRejected`` for an empty, truncated or malformed data set.
    """
    if not encoded:
        raise InputRejected("empty data set")
    if transfer_syntax.is_deflated:
        try:
            encoded = zlib.decompress(encoded, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise InputRejected(f"deflated data set does not inflate: {exc}") from exc
    implicit = bool(transfer_syntax.is_implicit_VR)
    _check_plausible_start(encoded, implicit)
    check_complete(encoded, implicit)
    try:
        header = read_dataset(BytesIO(encoded), implicit, True, stop_when=_at_pixel_group)
    except (EOFError, struct.error) as exc:
        raise InputRejected("data set is truncated in its header") from exc
    if len(header) == 0:
        raise InputRejected("data set has no elements before pixel data")
    return header


def _check_plausible_start(encoded: bytes, implicit: bool) -> None:
    """Every storage IOD has SOP Class UID (0008,0016), so a data set starts in group 0008."""
    if len(encoded) < 8:
        raise InputRejected("data set is shorter than one element")
    (group,) = struct.unpack_from("<H", encoded, 0)
    if group != 0x0008:
        raise InputRejected(f"not a DICOM data set: first element is in group {group:04X}, not 0008")
    if not implicit and encoded[4:6] not in _KNOWN_VRS:
        raise InputRejected("not an explicit VR data set: first element has no valid VR")


def _at_pixel_group(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group >= _PIXEL_GROUP


def check_complete(encoded: bytes, implicit: bool) -> None:
    """Walk every element by its length (never decoding values) to catch truncation.

    pydicom stops quietly at a short read, so a cut-off data set would otherwise
    look valid; this walk is what guarantees a stored file is whole.
    """
    buffer = memoryview(encoded)
    end = _walk_dataset(buffer, 0, len(buffer), implicit, in_item=False)
    if end != len(buffer):
        raise InputRejected("data set is truncated")


def _walk_dataset(buffer: memoryview, position: int, end: int, implicit: bool, *, in_item: bool) -> int:
    while position < end:
        tag, vr, length, position = _element_header(buffer, position, implicit)
        if tag == _ITEM_DELIMITER_TAG and in_item:
            return position
        if length != _UNDEFINED_LENGTH:
            position += length
            if position > end:
                raise InputRejected(f"data set is truncated in element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        elif (tag >> 16) == _PIXEL_GROUP:
            position = _skip_fragments(buffer, position, end)
        else:
            # Undefined-length SQ (or UN holding an implicit VR sequence).
            position = _walk_sequence(buffer, position, end, implicit or vr == b"UN")
    if in_item:
        raise InputRejected("data set is truncated inside a sequence item")
    return position


def _walk_sequence(buffer: memoryview, position: int, end: int, implicit: bool) -> int:
    while True:
        if position + 8 > end:
            raise InputRejected("data set is truncated inside a sequence")
        tag, length = _item_header(buffer, position)
        position += 8
        if tag == _SEQUENCE_DELIMITER_TAG:
            return position
        if tag != _ITEM_TAG:
            raise InputRejected("sequence is malformed")
        if length == _UNDEFINED_LENGTH:
            position = _walk_dataset(buffer, position, end, implicit, in_item=True)
        else:
            position += length
            if position > end:
                raise InputRejected("data set is truncated inside a sequence item")


def _item_header(buffer: memoryview, position: int) -> tuple[int, int]:
    group, element, length = struct.unpack_from("<HHL", buffer, position)
    return group << 16 | element, length


def _element_header(buffer: memoryview, position: int, implicit: bool) -> tuple[int, bytes, int, int]:
    if position + 8 > len(buffer):
        raise InputRejected("data set ends inside an element header")
    group, element = struct.unpack_from("<HH", buffer, position)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from("<L", buffer, position + 4)
        return tag, b"", length, position + 8
    vr = bytes(buffer[position + 4:position + 6])
    if vr in _LONG_VRS:
        if position + 12 > len(buffer):
            raise InputRejected("data set ends inside an element header")
        (length,) = struct.unpack_from("<L", buffer, position + 8)
        return tag, vr, length, position + 12
    (length,) = struct.unpack_from("<H", buffer, position + 6)
    return tag, vr, length, position + 8


def _skip_fragments(buffer: memoryview, position: int, end: int) -> int:
    """Skip encapsulated pixel data items up to the sequence delimiter."""
    while True:
        if position + 8 > end:
            raise InputRejected("encapsulated pixel data is truncated")
        tag, length = _item_header(buffer, position)
        position += 8
        if tag == _SEQUENCE_DELIMITER_TAG:
            return position
        if tag != _ITEM_TAG or length == _UNDEFINED_LENGTH:
            raise InputRejected("encapsulated pixel data is malformed")
        position += length
        if position > end:
            raise InputRejected("encapsulated pixel data is truncated")


# --- record building --------------------------------------------------------------------------


def build_record(header: Dataset, event: Event, calling_ae: str, store: InstanceStore,
                 *, size_bytes: int, stats: ReceiverStats | None = None) -> InstanceRecord:
    """The DB row for an instance; raises ``InvalidUid`` when its identity is unusable.

    Only the identity (Study, Series and SOP Instance UID, SOP Class) may refuse an
    instance. Every other value is optional: one that does not decode or is not valid
    for its VR is left out (None) and text is cleaned and cut to its column, so the
    database always takes the row; what was left out or cut is logged by keyword.
    """
    study_uid = check_uid("StudyInstanceUID", header.get("StudyInstanceUID"))
    series_uid = check_uid("SeriesInstanceUID", header.get("SeriesInstanceUID"))
    sop_uid = check_uid("SOPInstanceUID", header.get("SOPInstanceUID"))
    sop_class = check_uid("SOPClassUID", header.get("SOPClassUID"))
    command_sop_uid = _command_sop_uid(event)
    command_class = str(event.request.AffectedSOPClassUID or "").strip()
    if sop_uid != command_sop_uid:
        raise InvalidUid("SOPInstanceUID differs from the C-STORE request's Affected SOP Instance UID")
    if sop_class != command_class:
        raise InvalidUid("SOPClassUID differs from the C-STORE request's Affected SOP Class UID")
    relative = store.relative_path(study_uid, series_uid, sop_uid)
    values = _OptionalValues(header)
    record = InstanceRecord(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        path=relative.as_posix(),
        size_bytes=size_bytes,
        # Jobs are matched to bundles by modality: the SOP class stands in for a bad one.
        modality=values.code("Modality", _MODALITY_LEN) or _MODALITY_OF_CLASS.get(sop_class),
        series_number=values.integer("SeriesNumber"),
        series_description=values.text("SeriesDescription", _SERIES_DESCRIPTION_LEN),
        instance_number=values.integer("InstanceNumber"),
        slice_position=values.slice_position(),
        images_in_acquisition=values.integer("ImagesInAcquisition"),
        number_of_frames=values.integer("NumberOfFrames"),
        study_date=values.date("StudyDate"),
        patient_age=values.age("PatientAge"),
        patient_birth_date=values.date("PatientBirthDate"),
        station_name=values.text("StationName", _STATION_NAME_LEN),
        institution=values.text("InstitutionName", _INSTITUTION_LEN),
        calling_ae=calling_ae,
    )
    if values.dropped or values.truncated:
        # Keywords only: the values are patient data.
        logger.debug("header values left out of or cut to fit the instance's row", extra={
            "action": "header_values_dropped", "sop_instance_uid": sop_uid,
            "dropped": values.dropped, "truncated": values.truncated})
        if stats is not None:
            stats.add_sanitised(values.dropped, values.truncated)
    return record


def _column_length(column: Any) -> int:
    return int(column.property.columns[0].type.length)


# The columns the optional values fill (PostgreSQL refuses a longer value; SQLite keeps it).
_MODALITY_LEN = _column_length(Study.modality)
_SERIES_DESCRIPTION_LEN = _column_length(Series.series_description)
_STATION_NAME_LEN = _column_length(Study.station_name)
_INSTITUTION_LEN = _column_length(Study.institution)
# Integer columns are 32-bit on PostgreSQL.
_INT_COLUMN = range(-(2 ** 31), 2 ** 31)
_DA = re.compile(r"\d{8}")
_AS = re.compile(r"\d{3}[DWMY]")
# C0 and C1 controls, NUL padding among them: no column or screen wants them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What bytes the character set could not decode become: the value is not known.
_UNDECODED = "\ufffd"


class _OptionalValues:
    """Reads the optional header values of one instance; never raises on them. Notes by
    keyword (never the value) what was left out (`dropped`) or cut to fit (`truncated`)."""

    def __init__(self, header: Dataset) -> None:
        self.header = header
        self.dropped: list[str] = []
        self.truncated: list[str] = []

    def _read(self, keyword: str) -> Any:
        try:
            return self.header.get(keyword)
        except Exception:  # unknown VR, a value that does not convert for its VR...
            self._drop(keyword)
            return None

    def _drop(self, keyword: str) -> None:
        self.dropped.append(keyword)

    def _string(self, keyword: str) -> str | None:
        """The value as read; None when absent, dropped when not text or not decoded."""
        value = self._read(keyword)
        if value is None:
            return None
        if isinstance(value, MultiValue) and all(isinstance(v, str) for v in value):
            value = "\\".join(value)  # a backslash read as a value separator
        elif not isinstance(value, str):
            value = getattr(value, "original_string", None)  # DA/TM objects keep what was read
            if not isinstance(value, str):
                self._drop(keyword)
                return None
        if _UNDECODED in value:
            self._drop(keyword)
            return None
        return value

    def _text(self, keyword: str) -> str | None:
        """Free text without control characters; None when that leaves nothing."""
        value = self._string(keyword)
        return None if value is None else (_CONTROL.sub("", value).strip() or None)

    def _formatted(self, keyword: str) -> str | None:
        """A value of a formatted VR (DA, AS): only padding is taken off, a control
        character inside leaves it invalid."""
        value = self._string(keyword)
        return None if value is None else (value.strip(" \x00") or None)

    def text(self, keyword: str, length: int) -> str | None:
        text = self._text(keyword)
        if text is not None and len(text) > length:
            self.truncated.append(keyword)
            text = text[:length].rstrip()
        return text

    def code(self, keyword: str, length: int) -> str | None:
        """A code string is left out when too long: a cut code would be another code."""
        text = self._text(keyword)
        if text is not None and len(text) > length:
            self._drop(keyword)
            return None
        return text

    def date(self, keyword: str) -> str | None:
        """DA: eight digits that form a real date."""
        text = self._formatted(keyword)
        if text is None:
            return None
        if _DA.fullmatch(text):
            try:
                date(int(text[:4]), int(text[4:6]), int(text[6:]))
                return text
            except ValueError:
                pass
        self._drop(keyword)
        return None

    def age(self, keyword: str) -> str | None:
        """AS: three digits and D, W, M or Y."""
        text = self._formatted(keyword)
        if text is None:
            return None
        if _AS.fullmatch(text.upper()):
            return text.upper()
        self._drop(keyword)
        return None

    def integer(self, keyword: str) -> int | None:
        value = self._read(keyword)
        if value is None or value == "":
            return None
        try:
            if isinstance(value, (bytes, bytearray)):
                raise TypeError("not a number")
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            self._drop(keyword)
            return None
        if number not in _INT_COLUMN:
            self._drop(keyword)
            return None
        return number

    def slice_position(self) -> float | None:
        position = self._read("ImagePositionPatient")
        orientation = self._read("ImageOrientationPatient")
        if position is None or orientation is None:
            return None
        along = _along_normal(position, orientation)
        if along is None:
            self._drop("ImagePositionPatient")  # with the orientation: one derived value
        return along


def slice_position(header: Dataset) -> float | None:
    """ImagePositionPatient projected on the slice normal (row x column direction)."""
    position = header.get("ImagePositionPatient")
    orientation = header.get("ImageOrientationPatient")
    if position is None or orientation is None:
        return None
    return _along_normal(position, orientation)


def _along_normal(position: Any, orientation: Any) -> float | None:
    """None unless three and six finite numbers give a finite position."""
    try:
        if len(position) != 3 or len(orientation) != 6:
            return None
        rx, ry, rz, cx, cy, cz = (float(v) for v in orientation)
        px, py, pz = (float(v) for v in position)
    except (TypeError, ValueError):
        return None
    nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
    along = px * nx + py * ny + pz * nz
    return along if math.isfinite(along) else None


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


def _record_rejection(deps: StoreDeps, calling_ae: str, reason: str, status: int,
                      sop_uid: str | None, sop_class: str | None = None) -> None:
    try:
        _with_db_retry(deps, lambda session: db_api.record_rejection(
            session, calling_ae, reason, status, sop_instance_uid=sop_uid, sop_class_uid=sop_class))
    except Exception:
        logger.exception("could not record a rejection", extra={"action": "rejection_not_recorded",
                                                                "sop_instance_uid": sop_uid})


def _record_instance(deps: StoreDeps, record: InstanceRecord) -> RecordOutcome:
    if deps.group_commit is None:
        return _record_one(deps, record)
    return deps.group_commit.submit(record)


def _record_batch(deps: StoreDeps, records: list[InstanceRecord]) -> list[RecordOutcome]:
    """Commit several instances' rows in one transaction (db.api.record_instances)."""
    if len(records) == 1:
        return [_record_one(deps, records[0])]
    outcomes = list(_with_db_retry(deps, lambda session: db_api.record_instances(session, records)))
    deps.stats.add_row_commit()
    return outcomes


def _record_one(deps: StoreDeps, record: InstanceRecord) -> RecordOutcome:
    outcome: RecordOutcome = _with_db_retry(deps, lambda session: db_api.record_instance(session, record))
    deps.stats.add_row_commit()
    return outcome


class _Pending:
    __slots__ = ("record", "wake", "outcome", "error", "lead")

    def __init__(self, record: InstanceRecord) -> None:
        self.record = record
        self.wake = threading.Event()  # set when the row is settled or this waiter must lead
        self.outcome: RecordOutcome | None = None
        self.error: BaseException | None = None
        self.lead = False

    def result(self) -> RecordOutcome:
        if self.error is not None:
            raise self.error
        if self.outcome is None:
            raise RuntimeError("group commit finished without an outcome")
        return self.outcome


class GroupCommit:
    """Group commit for instance rows arriving on concurrent associations.

    Each handler submits its row and blocks until that row is committed. The first
    handler to find no commit running leads: it commits everything queued so far
    in one go and hands the lead to the oldest waiter if more arrived meanwhile.
    A lone association is never delayed; concurrent ones share one commit (and one
    fsync of the database journal) when the database offers a batch call. A failed
    batch is retried row by row, so one bad row fails only its own C-STORE.
    """

    def __init__(self, commit: Callable[[list[InstanceRecord]], list[RecordOutcome]],
                 commit_one: Callable[[InstanceRecord], RecordOutcome], max_batch: int = 32) -> None:
        self._commit = commit
        self._commit_one = commit_one
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._leading = False

    def submit(self, record: InstanceRecord) -> RecordOutcome:
        pending = _Pending(record)
        with self._lock:
            self._queue.append(pending)
            if not self._leading:
                self._leading = True
                pending.lead = True
        if not pending.lead:
            pending.wake.wait()
        if pending.lead:
            # A leader is always the oldest queued row, so its own row is in its batch.
            self._lead_one_batch()
        return pending.result()

    def _lead_one_batch(self) -> None:
        with self._lock:
            batch = self._queue[:self._max_batch]
            del self._queue[:self._max_batch]
        try:
            self._settle(batch)
        finally:
            with self._lock:
                if self._queue:
                    successor = self._queue[0]
                    successor.lead = True
                    successor.wake.set()
                else:
                    self._leading = False

    def _settle(self, batch: list[_Pending]) -> None:
        try:
            outcomes = self._commit([p.record for p in batch])
        except Exception:
            if len(batch) == 1:
                self._settle_one(batch[0])
                return
            logger.warning("batch commit failed; committing rows one by one",
                           extra={"action": "group_commit_fallback", "rows": len(batch)}, exc_info=True)
            for pending in batch:
                self._settle_one(pending)
            return
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.outcome = outcome
            pending.wake.set()

    def _settle_one(self, pending: _Pending) -> None:
        try:
            pending.outcome = self._commit_one(pending.record)
        except BaseException as exc:  # handed to the submitting handler, which answers 0xA701
            pending.error = exc
        pending.wake.set()


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
    text = str(exc.orig if hasattr(exc, "orig") else exc).lower()
    return "locked" in text or "busy" in text or "deadlock" in text or "serialize" in text
