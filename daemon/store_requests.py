"""C-STORE requests assembled on the receiver's direct P-DATA path (connections._DirectDataDUL),
and the command set of a plain C-STORE response encoded for it.

pynetdicom makes its message object of every P-DATA value: the command set decoded into a
pydicom data set and then copied element by element into a C_STORE primitive, the data
set written fragment by fragment into a growing BytesIO. For the plain request a storage
SCU sends, that is about 0.5 ms of the receiver's CPU per instance. Here the command set is
read with pydicom's own value converters, each value goes through the primitive's own
setter as pynetdicom's `message_to_primitive` sets it, and the data set is joined once.
A request for a storage SOP class on its own accepted context is then served right there,
in the association's DUL thread, by pynetdicom's Storage service class, instead of being
queued for the association's reactor thread.

Anything else goes to pynetdicom's DIMSE provider, which judges it as before: a command
set with any other element, a repeated or empty one, a value of the wrong size, a UID or
AE title that is not plainly valid, a request without a data set, a command in several
fragments, or a command fragment amid a data set (the request's values so far are then
replayed to pynetdicom, as they arrived).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.uid import UID
from pydicom.values import convert_AE_string, convert_UI
from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

_ELEMENT_HEADER = struct.Struct("<HHL")  # implicit VR little endian: group, element, length

_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED_TO = 0x0120
_PRIORITY = 0x0700
_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_AFFECTED_SOP_INSTANCE = 0x1000
_MOVE_ORIGINATOR_AE = 0x1030
_MOVE_ORIGINATOR_ID = 0x1031
_REQUIRED = frozenset({_GROUP_LENGTH, _AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID, _PRIORITY,
                       _DATA_SET_TYPE, _AFFECTED_SOP_INSTANCE})
_ALLOWED = _REQUIRED | {_MOVE_ORIGINATOR_AE, _MOVE_ORIGINATOR_ID}
_UNSIGNED_SHORTS = (_COMMAND_FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE, _MOVE_ORIGINATOR_ID)
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_PRIORITIES = (0, 1, 2)  # medium, high, low

# A conformant UID (PS3.5 9.1: no leading zeros), as pydicom converts it without a warning.
_UID_BYTES = re.compile(rb"(?=[0-9.]{1,64}\x00?$)(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\x00?")

_COMMAND = 0x01  # message control header: a command fragment (else data set)
_LAST = 0x02     # ... and the last one


def plain_store_request(command: bytes, context_id: int) -> C_STORE | None:
    """The C_STORE primitive pynetdicom's `message_to_primitive` makes of this command set
    (implicit VR little endian), without its data set; None unless it is a C-STORE-RQ that
    holds each of the request's elements once, with a value of its VR's size, a plainly
    valid UID or AE title, a known priority, and says a data set follows."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(command):
        if offset + _ELEMENT_HEADER.size > len(command):
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(command, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0 or element not in _ALLOWED or element in values or length == 0 or offset + length > len(command):
            return None
        values[element] = command[offset:offset + length]
        offset += length
    if not _REQUIRED <= values.keys() or len(values[_GROUP_LENGTH]) != 4:
        return None
    if any(len(values[element]) != 2 for element in _UNSIGNED_SHORTS if element in values):
        return None
    number = {element: int.from_bytes(values[element], "little") for element in _UNSIGNED_SHORTS if element in values}
    if (number[_COMMAND_FIELD] != _C_STORE_RQ or number[_DATA_SET_TYPE] == _NO_DATA_SET
            or number[_PRIORITY] not in _PRIORITIES):
        return None
    # Only a conformant UID is converted here: pydicom warns of anything else as it converts.
    if not all(_UID_BYTES.fullmatch(values[element]) for element in (_AFFECTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE)):
        return None
    sop_class = convert_UI(values[_AFFECTED_SOP_CLASS], True)
    sop_instance = convert_UI(values[_AFFECTED_SOP_INSTANCE], True)
    if not (isinstance(sop_class, UID) and isinstance(sop_instance, UID)
            and _plain_uid(sop_class) and _plain_uid(sop_instance)):
        return None
    move_originator: str | None = None
    if _MOVE_ORIGINATOR_AE in values:
        try:
            title = convert_AE_string(values[_MOVE_ORIGINATOR_AE], True)
        except UnicodeDecodeError:
            return None
        if not (isinstance(title, str) and title and _config.VALIDATORS["AE"](title)[0]):
            return None
        move_originator = title
    request = C_STORE()
    # In the order of the command set's tags, as message_to_primitive sets them.
    request.AffectedSOPClassUID = sop_class
    request.MessageID = number[_MESSAGE_ID]
    request.Priority = number[_PRIORITY]
    request.AffectedSOPInstanceUID = sop_instance
    if move_originator is not None:
        request.MoveOriginatorApplicationEntityTitle = move_originator
    if _MOVE_ORIGINATOR_ID in number:
        request.MoveOriginatorMessageID = number[_MOVE_ORIGINATOR_ID]
    request._context_id = context_id
    return request


def _plain_uid(value: UID) -> bool:
    """A UID that pynetdicom accepts without a word (valid and conformant)."""
    return value.is_valid and _config.VALIDATORS["UI"](value)[0]


@dataclass
class _Arriving:
    request: C_STORE
    values: list[tuple[int, bytes]] = field(default_factory=list)  # as received, the command first


class DirectStores:
    """The C-STORE requests of one association's direct P-DATA path: each plain request is
    assembled here and served here (or queued for the association's reactor as
    pynetdicom's DIMSE provider queues its own); every other value goes to that provider."""

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._arriving: _Arriving | None = None

    @property
    def arriving(self) -> bool:
        """A request's data set is still arriving here."""
        return self._arriving is not None

    def take(self, values: list[tuple[int, bytes]]) -> None:
        """The presentation data values of one P-DATA-TF PDU, in order."""
        for index, (context_id, value) in enumerate(values):
            arriving = self._arriving
            if arriving is None:
                request = self._plain_request(context_id, value)
                if request is None:
                    self._to_dimse(values[index:])
                    return
                self._arriving = _Arriving(request, [(context_id, value)])
                continue
            if value[0] & _COMMAND:
                self.hand_over(values[index:])
                return
            arriving.values.append((context_id, value))
            if value[0] & _LAST:
                self._arriving = None
                self._dispatch(arriving)
                return  # pynetdicom, too, reads nothing more of a PDU that ends a message

    def hand_over(self, more: list[tuple[int, bytes]] | None = None) -> None:
        """Give a request still arriving to pynetdicom's provider, its values replayed in
        order (then `more`), so that it carries on as if it had had them all along."""
        arriving, self._arriving = self._arriving, None
        replay = (arriving.values if arriving is not None else []) + (more or [])
        if replay:
            self._to_dimse(replay)

    def _plain_request(self, context_id: int, value: bytes) -> C_STORE | None:
        dimse = self._assoc.dimse
        if (value[0] & (_COMMAND | _LAST) != _COMMAND | _LAST or dimse.message is not None
                or _config.STORE_RECV_CHUNKED_DATASET or self._assoc.get_handlers(evt.EVT_DIMSE_RECV)):
            return None
        return plain_store_request(value[1:], context_id)

    def _dispatch(self, arriving: _Arriving) -> None:
        data_set = BytesIO(b"".join(memoryview(value)[1:] for _, value in arriving.values[1:]))
        data_set.seek(0, 2)  # where pynetdicom's writes leave it
        request = arriving.request
        request.DataSet = data_set
        context = self._storage_context(request)
        if context is None:
            self._assoc.dimse.msg_queue.put((request._context_id, request))
        else:
            self._serve(request, context)

    def _storage_context(self, request: C_STORE) -> Any:
        """The accepted presentation context of a request that pynetdicom's reactor would
        hand to its Storage service class without a word; None for anything else (the
        reactor then judges it as before: a release under way, an unknown context, a SOP
        class another service or an extended negotiation claims)."""
        assoc = self._assoc
        context = assoc._accepted_cx.get(request._context_id)
        sop_class = request.AffectedSOPClassUID
        if (not assoc.is_established or assoc._sent_release or context is None or sop_class is None
                or context.abstract_syntax != sop_class or sop_class in assoc.acceptor.accepted_common_extended
                or _config.UNRESTRICTED_STORAGE_SERVICE or uid_to_service_class(sop_class) is not StorageServiceClass):
            return None
        return context

    def _serve(self, request: C_STORE, context: Any) -> None:
        """Run the Storage SCP here, in the DUL thread, as the reactor would: its response is
        queued for this thread, which sends it as soon as this returns. The reactor's two
        wake-ups per instance (message in, response out) were a fifth of the wall time of
        one association. The network timeout does not run meanwhile, as it does not while
        the reactor is busy; exceptions in the handler are answered by the service class."""
        idle_timer = self._assoc.dul._idle_timer
        timeout = idle_timer.timeout
        idle_timer.timeout = None  # expired is False while None
        try:
            StorageServiceClass(self._assoc).SCP(request, context)
        finally:
            idle_timer.timeout = timeout
            idle_timer.restart()

    def _to_dimse(self, values: list[tuple[int, bytes]]) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list = []
        primitive.presentation_data_value_list.extend(values)  # tuples, as to_primitive's
        self._assoc.dimse.receive_primitive(primitive)


def store_response_command(primitive: Any) -> bytes | None:
    """The C-STORE-RSP command set (implicit VR little endian) of a response that carries
    only its status, or None for anything else."""
    if (type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None
            or not isinstance(primitive.Status, int) or primitive.AffectedSOPClassUID is None
            or primitive.AffectedSOPInstanceUID is None or primitive.OffendingElement is not None
            or primitive.ErrorComment is not None):
        return None
    try:
        sop_class = _ui(primitive.AffectedSOPClassUID)
        sop_instance = _ui(primitive.AffectedSOPInstanceUID)
    except UnicodeEncodeError:
        return None
    elements = b"".join((
        _command_element(_AFFECTED_SOP_CLASS, sop_class),
        _command_element(_COMMAND_FIELD, struct.pack("<H", _C_STORE_RSP)),
        _command_element(_MESSAGE_ID_RESPONDED_TO, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _command_element(_DATA_SET_TYPE, struct.pack("<H", _NO_DATA_SET)),
        _command_element(_STATUS, struct.pack("<H", primitive.Status)),
        _command_element(_AFFECTED_SOP_INSTANCE, sop_instance),
    ))
    return _command_element(_GROUP_LENGTH, struct.pack("<L", len(elements))) + elements


def _ui(value: str) -> bytes:
    encoded = str(value).encode("ascii")
    return encoded + b"\x00" if len(encoded) % 2 else encoded


def _command_element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value
