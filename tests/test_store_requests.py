"""C-STORE requests assembled on the direct P-DATA path (daemon/store_requests.py), against
pynetdicom's own DIMSE provider fed the same presentation data values."""

from __future__ import annotations

import random
import struct
from io import BytesIO
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from headscreen.daemon.connections import drop_silent_log_handlers
from headscreen.daemon.store_requests import DirectStores, plain_store_request

_COMPARED = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
             "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID", "_context_id")


def _request(rng: random.Random, move: bool = False, data: bytes = b"") -> C_STORE:
    request = C_STORE()
    request.MessageID = rng.randrange(0, 1 << 16)
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
    request.Priority = rng.choice((0, 1, 2))
    if move:
        request.MoveOriginatorApplicationEntityTitle = "PACS MOVE"
        request.MoveOriginatorMessageID = rng.randrange(0, 1 << 16)
    request.DataSet = BytesIO(data)
    return request


def _values(request: C_STORE, context_id: int, max_pdu: int) -> list[list[tuple[int, bytes]]]:
    """The presentation data values of each P-DATA-TF PDU pynetdicom sends for `request`."""
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return [[(c, bytes(v)) for c, v in primitive.presentation_data_value_list]
            for primitive in message.encode_msg(context_id, max_pdu)]


def _command(values: list[list[tuple[int, bytes]]]) -> bytes:
    return values[0][0][1][1:]


def _acceptor() -> Association:
    assoc = Association(AE(), "acceptor")
    drop_silent_log_handlers(assoc)  # as the receiver does: they observe every DIMSE message
    return assoc


def _queued(assoc: Association) -> list[tuple[int, Any]]:
    queued = []
    while not assoc.dimse.msg_queue.empty():
        queued.append(assoc.dimse.msg_queue.get())
    return queued


def _by_pynetdicom(pdus: list[list[tuple[int, bytes]]]) -> tuple[Association, list[tuple[int, Any]]]:
    assoc = _acceptor()
    for pdu in pdus:
        DirectStores(assoc)._to_dimse(pdu)
    return assoc, _queued(assoc)


def _fed(pdus: list[list[tuple[int, bytes]]], assoc: Association | None = None) -> Association:
    """An acceptor whose direct path took `pdus`."""
    assoc = assoc or _acceptor()
    stores = DirectStores(assoc)
    for pdu in pdus:
        stores.take(pdu)
    return assoc


def _one_request_as_pynetdicom_makes(assoc: Association, pdus: list[list[tuple[int, bytes]]]) -> None:
    ours = _queued(assoc)
    _, theirs = _by_pynetdicom(pdus)
    assert len(ours) == len(theirs) == 1
    _same_request(ours[0][1], theirs[0][1])


def _same_request(ours: Any, theirs: Any) -> None:
    assert type(ours) is type(theirs) is C_STORE
    for name in _COMPARED:
        assert getattr(ours, name) == getattr(theirs, name), name
        assert type(getattr(ours, name)) is type(getattr(theirs, name)), name
    assert ours.DataSet.getvalue() == theirs.DataSet.getvalue()
    assert ours.DataSet.tell() == theirs.DataSet.tell()


@pytest.mark.parametrize("move", [False, True])
def test_plain_requests_are_read_as_pynetdicom_reads_them(move: bool) -> None:
    rng = random.Random(11 + move)
    for _ in range(25):
        pdus = _values(_request(rng, move, rng.randbytes(rng.randrange(2, 3000) * 2)), rng.choice((1, 3, 255)),
                       rng.choice((200, 4096, 16384)))
        assoc = _acceptor()
        stores = DirectStores(assoc)
        for index, pdu in enumerate(pdus):
            stores.take(pdu)
            assert stores.arriving == (index < len(pdus) - 1)  # assembled here, not by pynetdicom
            assert assoc.dimse.message is None
        ours = _queued(assoc)
        _, theirs = _by_pynetdicom(pdus)
        assert len(ours) == len(theirs) == 1
        assert ours[0][0] == theirs[0][0]
        _same_request(ours[0][1], theirs[0][1])


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, element, len(value)) + value


def _edited(command: bytes, element: int, value: bytes | None) -> bytes:
    """`command` with one element's value replaced (None: removed), or added at the end."""
    out, offset, found = [], 0, False
    while offset < len(command):
        _, tag, length = struct.unpack_from("<HHL", command, offset)
        body = command[offset + 8:offset + 8 + length]
        if tag == element:
            found = True
            if value is not None:
                out.append(_element(tag, value))
        else:
            out.append(_element(tag, body))
        offset += 8 + length
    if not found and value is not None:
        out.append(_element(element, value))
    return b"".join(out)


def test_anything_but_a_plain_request_is_left_to_pynetdicom() -> None:
    rng = random.Random(5)
    command = _command(_values(_request(rng, data=b"\x00\x00"), 1, 4096))
    assert plain_store_request(command, 1) is not None
    echo = C_ECHO_RQ()
    echo_primitive = C_ECHO()
    echo_primitive.MessageID = 1
    echo_primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo.primitive_to_message(echo_primitive)
    echo_command = next(echo.encode_msg(1, 4096)).presentation_data_value_list[0][1][1:]
    unusual = {
        "another element": command + _element(0x0900, b"\x00\x00"),
        "a repeated element": command + _element(0x0110, b"\x01\x00"),
        "an empty UID": _edited(command, 0x1000, b""),
        "a UID with letters": _edited(command, 0x1000, b"1.2.abc"),
        "two UIDs": _edited(command, 0x1000, b"1.2.3\\1.2.4\x00"),
        "a UID with a leading zero": _edited(command, 0x1000, b"1.02"),
        "a message ID of 4 bytes": _edited(command, 0x0110, b"\x01\x00\x00\x00"),
        "no message ID": _edited(command, 0x0110, None),
        "priority 3": _edited(command, 0x0700, b"\x03\x00"),
        "no data set": _edited(command, 0x0800, b"\x01\x01"),
        "an invalid move originator": command + _element(0x1030, b"  "),
        "a group length of 2 bytes": _edited(command, 0x0000, b"\x00\x00"),
        "a truncated element": command[:-3],
        "a truncated header": command + b"\x00\x00\x00",
        "another group": command + struct.pack("<HHL", 8, 0x16, 2) + b"12",
        "a C-ECHO-RQ": echo_command,
    }
    for why, bytes_ in unusual.items():
        assert plain_store_request(bytes_, 1) is None, why


def test_a_request_pynetdicom_refuses_is_refused_as_before() -> None:
    rng = random.Random(8)
    pdus = _values(_request(rng, data=b"\x00\x00" * 10), 1, 4096)
    command = _command(pdus)
    bad_priority = [(1, b"\x03" + _edited(command, 0x0700, b"\x07\x00"))]
    assoc = _acceptor()
    DirectStores(assoc).take(bad_priority)  # pynetdicom's: it decides what such a request is
    _, theirs = _by_pynetdicom([bad_priority])
    assert [(c, type(p)) for c, p in _queued(assoc)] == [(c, type(p)) for c, p in theirs]
    assert assoc.dimse.message is not None  # its message waits for the data set, as pynetdicom's does


def test_a_request_handed_over_midway_ends_as_pynetdicom_ends_it() -> None:
    rng = random.Random(9)
    pdus = _values(_request(rng, data=rng.randbytes(20_000)), 5, 4096)
    assert len(pdus) > 4
    assoc = _acceptor()
    stores = DirectStores(assoc)
    for pdu in pdus[:3]:
        stores.take(pdu)
    assert stores.arriving and assoc.dimse.message is None
    stores.hand_over()  # pynetdicom's path reads the next PDU
    assert not stores.arriving and assoc.dimse.message is not None
    for pdu in pdus[3:]:
        stores._to_dimse(pdu)
    _one_request_as_pynetdicom_makes(assoc, pdus)


def test_a_command_amid_a_data_set_is_replayed_to_pynetdicom() -> None:
    rng = random.Random(10)
    pdus = _values(_request(rng, data=rng.randbytes(10_000)), 1, 4096)
    stray = [(1, b"\x03" + _command(pdus))]
    sequence = pdus[:2] + [stray] + pdus[2:]
    assoc = _fed(sequence)
    reference, theirs = _by_pynetdicom(sequence)
    ours = _queued(assoc)
    assert [(c, type(p)) for c, p in ours] == [(c, type(p)) for c, p in theirs]
    for (_, mine), (_, other) in zip(ours, theirs, strict=True):
        assert mine.DataSet.getvalue() == other.DataSet.getvalue()
    assert (assoc.dimse.message is None) == (reference.dimse.message is None)


def test_values_after_the_end_of_a_request_in_its_pdu_are_dropped_as_pynetdicom_drops_them() -> None:
    rng = random.Random(12)
    first, second = (_values(_request(rng, data=rng.randbytes(100)), 1, 4096) for _ in range(2))
    assert len(first) == len(second) == 2
    joined = [first[0], first[1] + second[0], second[1]]  # the second command shares a PDU
    _one_request_as_pynetdicom_makes(_fed(joined), joined)


def test_an_observer_of_dimse_messages_gets_pynetdicoms_message() -> None:
    rng = random.Random(13)
    pdus = _values(_request(rng, data=rng.randbytes(1000)), 1, 4096)
    assoc = _acceptor()
    seen: list[str] = []
    assoc.bind(evt.EVT_DIMSE_RECV, lambda event: seen.append(type(event.message).__name__))
    _fed(pdus, assoc)
    assert seen == ["C_STORE_RQ"]
    assert len(_queued(assoc)) == 1


def _established(*contexts: tuple[int, str]) -> Association:
    """An acceptor as negotiation leaves it, with these (context ID, SOP class) accepted."""
    assoc = _acceptor()
    for context_id, sop_class in contexts:
        context = build_context(sop_class)
        context.context_id = context_id
        assoc._accepted_cx[context_id] = context
    assoc.is_established = True
    return assoc


def test_only_a_storage_request_on_its_own_accepted_context_is_served_on_the_direct_path() -> None:
    rng = random.Random(14)
    request = _request(rng)
    request._context_id = 1
    served = _established((1, CTImageStorage))
    assert DirectStores(served)._storage_context(request) is served._accepted_cx[1]

    not_established = _established((1, CTImageStorage))
    not_established.is_established = False
    releasing = _established((1, CTImageStorage))
    releasing._sent_release = True
    for assoc in (not_established, releasing, _established((3, CTImageStorage)), _established((1, MRImageStorage))):
        assert DirectStores(assoc)._storage_context(request) is None  # the reactor's: it judges these

    not_storage = _request(rng)
    not_storage.AffectedSOPClassUID = Verification
    not_storage._context_id = 1
    assert DirectStores(_established((1, Verification)))._storage_context(not_storage) is None


def test_a_request_the_direct_path_does_not_serve_is_queued_for_the_reactor() -> None:
    rng = random.Random(15)
    pdus = _values(_request(rng, data=rng.randbytes(1000)), 3, 4096)
    assoc = _fed(pdus, _established((1, CTImageStorage)))  # context 3 was never accepted
    _one_request_as_pynetdicom_makes(assoc, pdus)
