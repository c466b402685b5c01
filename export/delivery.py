"""Sending result files to one destination: a thin I/O layer.

Retries, backoff and dead-lettering live in db/ and the worker; this module
sends every file once, over one DIMSE association (`send`) or one DICOMweb
STOW-RS request (`send_stow`), and reports a DIMSE-style status per file.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
import struct
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom._handlers import standard_pdu_sent_handler
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

from headscreen.errors import TransientError

__all__ = ["Destination", "TlsClient", "client_ssl_context", "prompt_connection", "send", "send_stow",
           "STATUS_SUCCESS", "STATUS_NO_CONTEXT", "STATUS_STOW_FAILED"]

logger = logging.getLogger(__name__)


class _StreamedFiles:
    """While held, send_c_store streams a file path's data set as stored, in PDU-sized
    reads, instead of parsing the file whole and encoding it again (pynetdicom's default;
    a result's overlays are tens of MB). pynetdicom has one process-wide switch for it,
    and a path whose syntax must be converted cannot be streamed, so it is on only while
    some send here is in progress (counted: sends may overlap) and off again after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._before = False

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._before = _config.STORE_SEND_CHUNKED_DATASET
                _config.STORE_SEND_CHUNKED_DATASET = True
            self._holders += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                _config.STORE_SEND_CHUNKED_DATASET = self._before


_streamed_files = _StreamedFiles()

STATUS_SUCCESS = 0x0000
#: Reported for a file whose SOP class / transfer syntax the peer accepted no
#: presentation context for (the standard "Refused: SOP Class not supported").
STATUS_NO_CONTEXT = 0x0122

#: A STOW-RS failure the response did not give a FailureReason for ("Processing failure").
STATUS_STOW_FAILED = 0x0110

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128


class TlsSettings(Protocol):
    """What TLS to a destination needs (daemon.config.DestinationTlsConfig fits)."""

    ca: Path | None
    cert: Path | None
    key: Path | None
    server_name: str | None
    check_hostname: bool


@dataclass(frozen=True)
class TlsClient:
    """DICOM TLS to a destination; PEM paths. No `ca`: the system's trust store."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    check_hostname: bool = True


def _no_passphrase() -> bytes:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key and hang.
    raise ValueError("the TLS private key is encrypted; use an unencrypted key readable only by the service user")


def client_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS 1.2 or later; the peer's certificate is always verified (its name unless check_hostname is off)."""
    context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(str(tls.cert), str(tls.key), password=_no_passphrase)
    return context


def client_tls_args(name: str, tls: TlsSettings | None, host: str | None) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for an association to a peer (None without TLS); a context
    that cannot be set up (unreadable certificate or key) is a TransientError."""
    if tls is None:
        return None
    try:
        context = client_ssl_context(tls)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise TransientError(f"TLS set-up for {name} failed: {exc}") from exc
    return context, tls.server_name or host or ""


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP we deliver results to; `tls` set: over DICOM TLS."""

    name: str
    ae_title: str
    host: str
    port: int
    # Not hashed: the settings object may be an unhashable pydantic model.
    tls: TlsSettings | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not self.ae_title or len(self.ae_title) > 16:
            raise ValueError(f"Destination: argument 'ae_title' must be 1-16 characters, got {self.ae_title!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"Destination: argument 'port' must be in 1..65535, got {self.port}")


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    sop_class_uid: UID
    transfer_syntax_uid: UID


def _inspect(path: Path) -> _FileInfo | None:
    """SOP class and stored transfer syntax from the file meta, or None if unreadable."""
    try:
        # The meta group only: a SEG's or SR's data set header is long (13 ms per CT result read whole).
        meta = read_file_meta_info(path)
        return _FileInfo(path, UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID))
    except (OSError, InvalidDicomError, AttributeError) as exc:
        logger.error("result file unreadable, not sent",
                     extra={"action": "delivery_skip", "path": str(path), "error": str(exc)})
        return None


def _contexts(files: Sequence[_FileInfo]) -> list[PresentationContext]:
    """One context per SOP class, offering each stored transfer syntax first and
    the uncompressed ones as fallback (pynetdicom converts between those)."""
    syntaxes: dict[UID, list[str | UID]] = {}
    for info in files:
        offered = syntaxes.setdefault(info.sop_class_uid, [])
        for ts in (info.transfer_syntax_uid, *_UNCOMPRESSED):
            if ts not in offered:
                offered.append(ts)
    if len(syntaxes) > _MAX_CONTEXTS:
        raise ValueError(f"send: argument 'paths' needs {len(syntaxes)} SOP classes, "
                         f"more than {_MAX_CONTEXTS} contexts")
    return [build_context(sop, tss) for sop, tss in syntaxes.items()]


def prompt_connection(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler of an association we request: our small PDUs (the C-STORE
    command) go out at once (TCP_NODELAY), and what arrives is acknowledged at once
    (`_PromptAckSocket`), so neither side's Nagle waits on the other's delayed ACK."""
    assoc_socket = event.assoc.dul.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if assoc_socket is not None and _TCP_QUICKACK is not None:
        assoc_socket.__class__ = _PromptAckSocket  # built by pynetdicom; only `recv` differs


def caller_takes_every_message(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler of an association we request: only the caller of send_*()
    takes DIMSE messages off the association's queue.

    pynetdicom's association thread also takes messages off that queue, to serve requests
    from the peer, and drops any that is not a request. Each send_*() pauses that thread
    first, but the pause is racy (it trusts a paused flag left set since the previous
    exchange), so under load the thread took a C-FIND's match before the caller could:
    a re-screen found 23 of 24 studies (pynetdicom issue #875; also a C-STORE response,
    then a resend after the DIMSE timeout). An association we request serves nothing: a
    C-MOVE's sub-operations come on their own association."""
    dimse = event.assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False):
        return take(block) if block else (None, None)

    dimse.get_msg = get_msg  # type: ignore[method-assign]  # only this association's


def requestor_handlers() -> list[EventHandlerType]:
    """The event handlers of every association we request."""
    return [(evt.EVT_CONN_OPEN, prompt_connection), (evt.EVT_CONN_OPEN, caller_takes_every_message),
            (evt.EVT_CONN_OPEN, send_stored_files_directly)]


def send_stored_files_directly(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler of an association we request: a C-STORE request of a file
    streamed as stored (`_StreamedFiles`) is framed into P-DATA PDUs here, and the caller
    writes them to the socket, many PDUs per write.

    pynetdicom queues one primitive per PDU for its DUL thread, which encodes and sends
    them one at a time; with the 16 KB PDUs that dcmtk and Orthanc accept by default, a CT
    result's 30 MB are about 1,900 of them, and that cost the worker 0.2-0.3 CPU-s per
    study (bench/delivery.py). The bytes on the wire are the same (tests/test_export.py).
    Anything else (another message, a data set in memory, TLS, a handler that watches the
    PDUs or bytes sent) goes through pynetdicom."""
    assoc = event.assoc
    dimse = assoc.dimse
    general = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        source = getattr(primitive, "_dataset_path", None)
        assoc_socket = assoc.dul.socket
        sock = _plain_socket(assoc_socket)
        if (assoc_socket is None or sock is None or source is None or not isinstance(primitive, C_STORE)
                or primitive.MessageIDBeingRespondedTo is not None or _sent_bytes_observed(assoc)):
            general(primitive, context_id)
            return
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        message.context_id = context_id
        command = encode(message.command_set, True, True)
        if command is None:  # pynetdicom's encoder failed: let pynetdicom report it
            general(primitive, context_id)
            return
        evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": message})  # as pynetdicom's send_msg does
        try:
            _write_store_request(sock, context_id, command, source, dimse.maximum_pdu_size, assoc.network_timeout)
        except OSError:
            # As pynetdicom's own send does: the DUL sees the connection closed (Evt17) and
            # ends the association; the caller's wait for a response ends at the DIMSE
            # timeout, as it does then.
            assoc_socket.event_queue.put("Evt17")

    dimse.send_msg = send_msg  # type: ignore[method-assign]  # only this association's


def _plain_socket(assoc_socket: AssociationSocket | None) -> socket.socket | None:
    """The association's TCP socket, or None under TLS (an SSL socket must not be written
    by one thread while the DUL thread reads it) or when there is none."""
    sock = assoc_socket.socket if assoc_socket is not None else None
    if sock is None or isinstance(sock, ssl.SSLSocket) or not hasattr(socket, "MSG_DONTWAIT"):
        return None
    return sock


def _sent_bytes_observed(assoc: Any) -> bool:
    """True when a handler watches the PDUs or bytes sent (pynetdicom's own PDU handler
    logs nothing for a P-DATA PDU), which the direct path does not report."""
    watching = [handler for handler, _ in assoc.get_handlers(evt.EVT_PDU_SENT)
                if handler is not standard_pdu_sent_handler]
    return bool(watching or assoc.get_handlers(evt.EVT_DATA_SENT))


# A P-DATA-TF PDU with one PDV: PDU type, reserved, PDU length; PDV item length, context
# ID, message control header (bit 0 a command, bit 1 the message's last fragment). The
# peer's maximum length is of what follows the first 6 bytes, so a fragment is that less
# the PDV's own 6, as in pynetdicom's encode_msg.
_PDV_PDU = struct.Struct(">BBIIBB")
# PDUs gathered per socket write.
_WRITE_BYTES = 256 * 1024


def _write_store_request(sock: socket.socket, context_id: int, command: bytes, source: tuple[Path, int],
                         max_pdu: int, timeout: float | None) -> None:
    """The command set, then the file's data set from `offset` to its end, as P-DATA PDUs
    of at most `max_pdu` (0: no limit), in writes of about `_WRITE_BYTES`."""
    path, offset = source
    out = bytearray()
    _append_fragments(out, context_id, memoryview(command), max_pdu, command=True, ends=True)
    with open(path, "rb") as stored:
        left = stored.seek(0, 2) - stored.seek(offset)
        fragment = _fragment_length(max_pdu, left)
        per_write = max(1, _WRITE_BYTES // fragment) * fragment  # whole fragments, as pynetdicom cuts them
        while True:
            chunk = stored.read(min(per_write, left))
            if not chunk and left:
                raise OSError("the result file ended early")
            left -= len(chunk)
            _append_fragments(out, context_id, memoryview(chunk), max_pdu, command=False, ends=left == 0)
            _send_all(sock, out, timeout)
            out.clear()
            if not left:
                return


def _fragment_length(max_pdu: int, payload_length: int) -> int:
    """The longest PDV value a PDU of `max_pdu` holds (0: no limit, the whole payload)."""
    return max_pdu - 6 if max_pdu else max(payload_length, 1)


def _append_fragments(out: bytearray, context_id: int, payload: memoryview, max_pdu: int, *, command: bool,
                      ends: bool) -> None:
    """`payload` as PDUs of one PDV each; when `ends`, its last fragment ends the message."""
    fragment = _fragment_length(max_pdu, len(payload))
    start = 0
    while True:
        piece = payload[start:start + fragment]
        start += fragment
        last = start >= len(payload)
        control = (0x01 if command else 0x00) | (0x02 if last and ends else 0x00)
        out += _PDV_PDU.pack(0x04, 0, len(piece) + 6, len(piece) + 2, context_id, control)
        out += piece
        if last:
            return


def _send_all(sock: socket.socket, data: bytearray, timeout: float | None) -> None:
    """Write all of `data` without blocking the socket, which the DUL thread reads; wait
    for room at most `timeout` seconds at a time (None: as long as it takes). OSError when
    the connection is gone, also when the DUL thread has closed the socket meanwhile."""
    view = memoryview(data)
    poller: select.poll | None = None
    wait_ms = None if timeout is None else int(timeout * 1000)
    while view:
        try:
            view = view[sock.send(view, socket.MSG_DONTWAIT):]
            continue
        except BlockingIOError:
            pass
        if poller is None:
            poller = select.poll()
            try:
                poller.register(sock, select.POLLOUT)
            except ValueError:  # closed: its descriptor is -1
                raise OSError("the association's socket is closed") from None
        if not poller.poll(wait_ms):
            raise TimeoutError("the peer took nothing for the network timeout")


# Linux only; elsewhere the peer's Nagle delay stays (as before).
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class _PromptAckSocket(AssociationSocket):
    """An AssociationSocket that acknowledges at once what it reads. A peer with Nagle's
    algorithm on (dcmtk's storescp and dcmtk-based PACS unless TCP_NODELAY=1 is set) holds
    a small segment of its response until what it sent before is acknowledged, and Linux
    delays that acknowledgement: measured, ~45 ms per object, over a second for one CT
    result's 26 (bench/delivery.py). Linux leaves quick acknowledgement by itself, so it
    is asked for before each read."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is not None and _TCP_QUICKACK is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:  # a socket closing under us: the read reports it
                pass
        return super().recv(nr_bytes)


def _accepted_syntax(assoc, sop_class_uid: UID) -> UID | None:
    for context in assoc.accepted_contexts:
        if context.abstract_syntax == sop_class_uid:
            return UID(context.transfer_syntax[0])
    return None


def _store_one(assoc, info: _FileInfo) -> int | None:
    accepted = _accepted_syntax(assoc, info.sop_class_uid)
    if accepted is None or (accepted != info.transfer_syntax_uid and info.transfer_syntax_uid not in _UNCOMPRESSED):
        logger.warning(
            "peer accepted no context for file",
            extra={"action": "delivery_no_context", "path": str(info.path), "sop_class": str(info.sop_class_uid),
                   "transfer_syntax": str(info.transfer_syntax_uid)},
        )
        return STATUS_NO_CONTEXT
    # Sending the path streams the file as stored; a dataset is needed only when
    # pynetdicom has to re-encode between the uncompressed syntaxes.
    if accepted == info.transfer_syntax_uid:
        with _streamed_files:
            response = assoc.send_c_store(info.path)
    else:
        response = assoc.send_c_store(dcmread(info.path))
    if response is None or "Status" not in response:
        return None
    return int(response.Status)


def send(
    destination: Destination,
    paths: Sequence[Path],
    calling_ae: str = "HEADSCREEN",
    timeout: float = 30,
    on_status: Callable[[Path, int], None] | None = None,
) -> dict[Path, int]:
    """C-STORE every file over one association.

    Returns the DIMSE status per file; a file missing from the result got no
    response (unreadable locally, or the association ended before its turn).
    ``on_status(path, status)`` is called as each response arrives, so the caller
    can record it before the next file goes out (a crash then loses at most the
    one in flight). Raises TransientError when no association could be established.
    """
    infos = [info for info in (_inspect(Path(p)) for p in paths) if info is not None]
    if not infos:
        return {}
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.requested_contexts = _contexts(infos)
    log_extra = {"destination": destination.name, "ae_title": destination.ae_title,
                 "host": destination.host, "port": destination.port, "tls": destination.tls is not None}
    tls_args = client_tls_args(destination.name, destination.tls, destination.host)
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title,
        evt_handlers=requestor_handlers(), tls_args=tls_args,
    )
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        # A failed TLS handshake (untrusted or misnamed certificate) also ends here; pynetdicom logs the cause.
        over = " over TLS" if tls_args else ""
        logger.warning("association %s", why, extra={"action": "delivery_assoc_failed", **log_extra})
        raise TransientError(
            f"association with {destination.ae_title}@{destination.host}:{destination.port}{over} {why}"
        )
    statuses: dict[Path, int] = {}
    try:
        for info in infos:
            if not assoc.is_established:
                break
            status = _store_one(assoc, info)
            if status is not None:
                statuses[info.path] = status
                if on_status is not None:
                    on_status(info.path, status)
    finally:
        if assoc.is_established:
            assoc.release()
    failed = sum(1 for s in statuses.values() if s != STATUS_SUCCESS)
    logger.info(
        "delivery finished",
        extra={"action": "delivery_sent", "files": len(infos), "confirmed": len(statuses), "not_success": failed,
               **log_extra},
    )
    return statuses


# DICOM JSON tags of the STOW-RS response (PS3.18 table 10.5.3-1).
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def _multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = f"headscreen-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _sop_instance_uid(path: Path) -> str | None:
    try:
        return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except (OSError, InvalidDicomError, AttributeError) as exc:
        logger.error("result file unreadable, not sent",
                     extra={"action": "delivery_skip", "path": str(path), "error": str(exc)})
        return None


def _status_by_uid(body: bytes) -> dict[str, int]:
    """SOP Instance UID -> status from a STOW-RS DICOM JSON response body."""
    try:
        response = json.loads(body) if body.strip() else {}
    except ValueError:
        return {}
    if isinstance(response, list):  # some servers wrap the dataset in an array
        response = response[0] if response else {}
    statuses: dict[str, int] = {}

    def items(tag: str) -> list[dict]:
        return (response.get(tag) or {}).get("Value") or []

    def first(item: dict, tag: str) -> Any:
        values = (item.get(tag) or {}).get("Value") or [None]
        return values[0]

    for item in items(_REFERENCED_SOP_SEQUENCE):
        uid = first(item, _REFERENCED_SOP_INSTANCE_UID)
        if uid:
            warning = first(item, _WARNING_REASON)
            statuses[str(uid)] = int(warning) if warning is not None else STATUS_SUCCESS
    for item in items(_FAILED_SOP_SEQUENCE):
        uid = first(item, _REFERENCED_SOP_INSTANCE_UID)
        if uid:
            reason = first(item, _FAILURE_REASON)
            statuses[str(uid)] = int(reason) if reason is not None else STATUS_STOW_FAILED
    return statuses


def send_stow(
    url: str,
    paths: Sequence[Path],
    timeout: float = 30,
    authorization: str | None = None,
) -> dict[Path, int]:
    """POST every file to a DICOMweb STOW-RS endpoint in one multipart/related request.

    Returns a DIMSE-style status per file from the response (ReferencedSOPSequence:
    0x0000 or its WarningReason; FailedSOPSequence: its FailureReason). A 200 with
    no body means every instance was stored. Raises TransientError when the
    server is unreachable or answers anything but 200/202/409.
    """
    files = {p: uid for p in map(Path, paths) if (uid := _sop_instance_uid(p)) is not None}
    if not files:
        return {}
    body, content_type = _multipart([p.read_bytes() for p in files])
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    log_extra = {"url": url, "files": len(files), "bytes": len(body)}
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            code, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, answer = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        logger.warning("STOW-RS request failed",
                       extra={"action": "delivery_stow_failed", "error": str(exc), **log_extra})
        raise TransientError(f"STOW-RS to {url} failed: {exc}") from exc
    if code not in (200, 202, 409):
        logger.warning("STOW-RS refused", extra={"action": "delivery_stow_failed", "http_status": code, **log_extra})
        raise TransientError(f"STOW-RS to {url} answered HTTP {code}")
    by_uid = _status_by_uid(answer)
    if code == 200 and not by_uid:
        by_uid = {uid: STATUS_SUCCESS for uid in files.values()}
    statuses = {path: by_uid[uid] for path, uid in files.items() if uid in by_uid}
    logger.info(
        "STOW-RS finished",
        extra={"action": "delivery_sent", "http_status": code, "confirmed": len(statuses),
               "not_success": sum(1 for s in statuses.values() if s != STATUS_SUCCESS), **log_extra},
    )
    return statuses
