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
"calling AE title not recognised") and the refusal is recorded in the database.

Each C-STORE is handled in stages, each with its own named status:
header decode (0xC210) -> identifying UIDs (0xA900) -> disk watermark (0xA700,
nothing written) -> atomic write (0xA701) -> database row (0xA701) -> Success.
Success is answered only after the file is fsynced and the row committed. A bad
instance never ends the association.

Pixel data is never decoded: the header is parsed up to (7FE0,xxxx) and the rest
is only walked to check that it is complete; the bytes are stored as received.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
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
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from daemon.errors import InputRejected
from daemon.storage import InstanceStore, InvalidUid, StorageFull, StoredInstance, check_uid
from db import api as db_api
from db.types import InstanceRecord, RecordOutcome

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


# The DB's rejection row has a status; an association refusal has no DIMSE status,
# so it is recorded with this value (the A-ASSOCIATE-RJ result/source/reason 1/1/3).
ASSOCIATION_REJECTED_STATUS = 0x010103

_REJECT_PERMANENT = 0x01
_REJECT_SOURCE_SERVICE_USER = 0x01
_REJECT_CALLING_AE_NOT_RECOGNISED = 0x03

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
    seconds spent per stage (summed over associations) and database commits of
    instance rows (fewer than rows stored when group commit batches them)."""

    STAGES = ("decode", "write", "record")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored = 0
        self._refused: dict[str, int] = {}
        self._seconds = dict.fromkeys(self.STAGES, 0.0)
        self._row_commits = 0

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

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"stored": self._stored, "refused": dict(self._refused),
                    "stage_seconds": dict(self._seconds), "row_commits": self._row_commits}


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


class Receiver:
    """A running SCP; ``shutdown()`` stops the server and its associations."""

    def __init__(self, ae: AE, server: ThreadedAssociationServer, stats: ReceiverStats) -> None:
        self._ae = ae
        self._server = server
        self.stats = stats

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def ae(self) -> AE:
        return self._ae

    def shutdown(self) -> None:
        self._ae.shutdown()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def build_ae(config: ReceiverConfig) -> AE:
    """The application entity with our presentation contexts and limits."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_pdu_size = config.maximum_pdu_size
    ae.maximum_associations = config.maximum_associations
    ae.network_timeout = config.network_timeout_s
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
    deps = StoreDeps(store=store, session_factory=session_factory, policy=policy,
                     write_lock=threading.Lock() if _is_sqlite(session_factory) else None)
    # Concurrent associations share one transaction, so one journal fsync, per batch.
    deps.group_commit = GroupCommit(
        commit=lambda records: _record_batch(deps, records),
        commit_one=lambda record: _record_one(deps, record),
    )
    ae = build_ae(config)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, handle_connection_open),
        (evt.EVT_REQUESTED, handle_association_request, [deps]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [deps]),
    ]
    server = ae.start_server((config.bind_address, config.port), block=False, evt_handlers=handlers)
    if server is None:  # pragma: no cover - block=False always returns the server
        raise RuntimeError("pynetdicom did not return a server")
    receiver = Receiver(ae, server, deps.stats)
    logger.info("receiver listening", extra={"action": "receiver_start", "ae_title": config.ae_title,
                                             "port": receiver.port, "storage_dir": str(store.root)})
    return receiver


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
    """Refuse callers outside the allow-list with A-ASSOCIATE-RJ and record why."""
    requestor = event.assoc.requestor
    calling_ae = _calling_ae(event)
    host = requestor.address
    reason = deps.policy.refusal(calling_ae, host)
    if reason is None:
        prefer_requestor_transfer_syntaxes(event.assoc)
        return
    logger.warning("association refused", extra={"action": "association_rejected",
                                                   "calling_ae": calling_ae, "peer_host": host,
                                                   "reason": reason})
    # Recorded before answering, so the row exists by the time the peer sees the refusal.
    _record_rejection(deps, calling_ae, f"association refused: {reason} (from {host})",
                      ASSOCIATION_REJECTED_STATUS, None)
    event.assoc.acse.send_reject(
        _REJECT_PERMANENT, _REJECT_SOURCE_SERVICE_USER, _REJECT_CALLING_AE_NOT_RECOGNISED
    )
    # Wait until the A-ASSOCIATE-RJ has gone out; otherwise the socket may close first
    # and the peer sees an abort instead of the reason.
    event.assoc.kill()


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
        record = _identify_stage(event, header, deps.store, size_bytes=len(part10))
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


def _identify_stage(event: Event, header: Dataset, store: InstanceStore, *, size_bytes: int) -> InstanceRecord:
    """The DB row; 0xA900 when the identifying UIDs are unusable, 0xC210 if an element won't decode."""
    command_sop_uid = _command_sop_uid(event)
    try:
        return build_record(header, event, _calling_ae(event), store, size_bytes=size_bytes)
    except InvalidUid as exc:
        raise _Refused(StoreStatus.DATASET_MISMATCH, str(exc), command_sop_uid) from exc
    except Exception as exc:  # a lazily decoded element failed to convert
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
                 *, size_bytes: int) -> InstanceRecord:
    """The DB row for an instance; raises ``InvalidUid`` when its identity is unusable."""
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
    number_of_frames = _int_or_none(header.get("NumberOfFrames"))
    return InstanceRecord(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        path=relative.as_posix(),
        size_bytes=size_bytes,
        modality=_text_or_none(header.get("Modality")),
        series_number=_int_or_none(header.get("SeriesNumber")),
        series_description=_text_or_none(header.get("SeriesDescription")),
        instance_number=_int_or_none(header.get("InstanceNumber")),
        slice_position=slice_position(header),
        images_in_acquisition=_int_or_none(header.get("ImagesInAcquisition")),
        number_of_frames=number_of_frames,
        study_date=_text_or_none(header.get("StudyDate")),
        patient_age=_text_or_none(header.get("PatientAge")),
        patient_birth_date=_text_or_none(header.get("PatientBirthDate")),
        station_name=_text_or_none(header.get("StationName")),
        institution=_text_or_none(header.get("InstitutionName")),
        calling_ae=calling_ae,
    )


def slice_position(header: Dataset) -> float | None:
    """ImagePositionPatient projected on the slice normal (row x column direction)."""
    position = header.get("ImagePositionPatient")
    orientation = header.get("ImageOrientationPatient")
    if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
        return None
    try:
        rx, ry, rz, cx, cy, cz = (float(v) for v in orientation)
        px, py, pz = (float(v) for v in position)
    except (TypeError, ValueError):
        return None
    nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
    return px * nx + py * ny + pz * nz


def _int_or_none(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _text_or_none(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# --- outcomes ---------------------------------------------------------------------------------


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
