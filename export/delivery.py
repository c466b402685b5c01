"""C-STORE of result files to one destination: a thin I/O layer.

Retries, backoff and dead-lettering live in db/ and the worker; this module
opens one association, sends every file, and reports the DIMSE status per file.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.presentation import PresentationContext

from daemon.errors import TransientError

__all__ = ["Destination", "send", "STATUS_SUCCESS", "STATUS_NO_CONTEXT"]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
#: Reported for a file whose SOP class / transfer syntax the peer accepted no
#: presentation context for (the standard "Refused: SOP Class not supported").
STATUS_NO_CONTEXT = 0x0122

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP we deliver results to."""

    name: str
    ae_title: str
    host: str
    port: int

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
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return _FileInfo(path, UID(ds.file_meta.MediaStorageSOPClassUID), UID(ds.file_meta.TransferSyntaxUID))
    except (OSError, InvalidDicomError, AttributeError) as exc:
        logger.error("result file unreadable, not sent", extra={"action": "delivery_skip", "path": str(path), "error": str(exc)})
        return None


def _contexts(files: Sequence[_FileInfo]) -> list[PresentationContext]:
    """One context per SOP class, offering each stored transfer syntax first and
    the uncompressed ones as fallback (pynetdicom converts between those)."""
    syntaxes: dict[UID, list[UID]] = {}
    for info in files:
        offered = syntaxes.setdefault(info.sop_class_uid, [])
        for ts in (info.transfer_syntax_uid, *_UNCOMPRESSED):
            if ts not in offered:
                offered.append(ts)
    if len(syntaxes) > _MAX_CONTEXTS:
        raise ValueError(f"send: argument 'paths' needs {len(syntaxes)} SOP classes, more than {_MAX_CONTEXTS} contexts")
    return [build_context(sop, tss) for sop, tss in syntaxes.items()]


def _enable_nodelay(event: evt.Event) -> None:
    # Small PDUs (the C-STORE command) otherwise wait on Nagle + delayed ACK.
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    payload = info.path if accepted == info.transfer_syntax_uid else dcmread(info.path)
    response = assoc.send_c_store(payload)
    if response is None or "Status" not in response:
        return None
    return int(response.Status)


def send(
    destination: Destination,
    paths: Sequence[Path],
    calling_ae: str = "HEADSCREEN",
    timeout: float = 30,
) -> dict[Path, int]:
    """C-STORE every file over one association.

    Returns the DIMSE status per file; a file missing from the result got no
    response (unreadable locally, or the association ended before its turn).
    Raises TransientError when no association could be established.
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
                 "host": destination.host, "port": destination.port}
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _enable_nodelay)],
    )
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        logger.warning("association %s", why, extra={"action": "delivery_assoc_failed", **log_extra})
        raise TransientError(
            f"association with {destination.ae_title}@{destination.host}:{destination.port} {why}"
        )
    statuses: dict[Path, int] = {}
    try:
        for info in infos:
            if not assoc.is_established:
                break
            status = _store_one(assoc, info)
            if status is not None:
                statuses[info.path] = status
    finally:
        if assoc.is_established:
            assoc.release()
    failed = sum(1 for s in statuses.values() if s != STATUS_SUCCESS)
    logger.info(
        "delivery finished",
        extra={"action": "delivery_sent", "files": len(infos), "confirmed": len(statuses), "not_success": failed, **log_extra},
    )
    return statuses
