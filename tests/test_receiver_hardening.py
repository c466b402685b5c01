"""The DICOM port under abuse: idle sockets, one address hoarding connections, floods of
refused associations, the association limit and the Called AE Title check. Real sockets,
dcmtk echoscu and pynetdicom SCUs against a receiver on its own free port.

Idle sockets come from other loopback addresses (127.0.0.2 and up; Linux routes all of
127/8 to lo) so that, as in a hospital, the abuser and the PACS have different addresses.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from headscreen.daemon.connections import CONNECTION_REFUSED_STATUS, RefusalKey, RefusalLog
from headscreen.daemon.receiver import ASSOCIATION_LIMIT_STATUS, ASSOCIATION_REJECTED_STATUS, CALLED_AE_REJECTED_STATUS
from receiver_helpers import (
    SCP_AE,
    SCU_AE,
    Harness,
    associate_once_a_slot_frees,
    closed_by_peer,
    idle_sockets,
    start_harness,
)

GENEROUS_S = 30.0


def _echoscu(port: int, *, calling: str = SCU_AE, called: str = SCP_AE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-to", "20", "-ta", "20", "-aet", calling, "-aec", called,
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = start_harness(tmp_path)
    yield h
    h.close()


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.1"], ids=["other-address", "same-address"])
def test_echo_succeeds_while_twenty_idle_sockets_are_open(harness: Harness, source: str) -> None:
    idle = idle_sockets(harness.port, [source] * 20)
    try:
        started = time.monotonic()
        result = _echoscu(harness.port)  # from 127.0.0.1
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < GENEROUS_S
        # 8 per address: each connection past that closed the address's oldest idle one.
        assert all(closed_by_peer(sock, 5.0) for sock in idle[:12])
        evicted = 13 if source == "127.0.0.1" else 12  # the echo made room for itself too
        assert harness.receiver.stats.snapshot()["connections"] == {"evicted_idle": evicted}
    finally:
        for sock in idle:
            sock.close()


def test_idle_sockets_from_many_addresses_are_evicted_oldest_first(tmp_path: Path) -> None:
    h = start_harness(tmp_path, max_idle_connections=8)
    idle = idle_sockets(h.port, [f"127.0.1.{i}" for i in range(1, 21)])
    try:
        result = _echoscu(h.port)
        assert result.returncode == 0, result.stderr
        # The first 12 (and one more for the echo) made room for newer ones; the newest 7 wait.
        assert all(closed_by_peer(sock, 5.0) for sock in idle[:12])
        assert h.receiver.stats.snapshot()["connections"]["evicted_idle"] >= 12
        h.receiver.flush_refusals()
        evictions = [r for r in h.rejections() if "idle, to admit another: more than 8 connections without" in r.reason]
        assert evictions and all(r.status == CONNECTION_REFUSED_STATUS and r.calling_ae is None for r in evictions)
    finally:
        for sock in idle:
            sock.close()
        h.close()


def test_a_silent_connection_is_closed_after_the_request_timeout(tmp_path: Path) -> None:
    h = start_harness(tmp_path, association_request_timeout_s=1.0)
    (silent,) = idle_sockets(h.port, ["127.0.0.3"])
    stalled = socket.create_connection(("127.0.0.1", h.port))
    try:
        # A-ASSOCIATE-RQ header promising 1000 bytes, then nothing (a stalled PDU).
        stalled.sendall(bytes([0x01, 0x00]) + (1000).to_bytes(4, "big"))
        assert closed_by_peer(silent, GENEROUS_S)
        assert closed_by_peer(stalled, GENEROUS_S)
        assert _echoscu(h.port).returncode == 0
    finally:
        silent.close()
        stalled.close()
        h.close()


def test_three_hundred_refusals_write_a_bounded_number_of_rows(harness: Harness) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    established = rejected = 0
    for _ in range(300):
        assoc = ae.associate("127.0.0.1", harness.port, ae_title=SCP_AE)
        established += assoc.is_established
        rejected += assoc.is_rejected
    # None got in. The caller's side may read a few refusals as an abort: pynetdicom
    # closes the socket right after sending the A-ASSOCIATE-RJ, and under load the
    # close can overtake it. The receiver's own count (the row below) must be 300.
    assert established == 0
    assert rejected >= 290, rejected
    (first,) = harness.rejections()  # recorded as it happened; the rest only counted
    assert first.calling_ae == "INTRUDER" and first.status == ASSOCIATION_REJECTED_STATUS
    harness.receiver.flush_refusals()
    rows = harness.rejections()
    assert len(rows) == 2
    assert rows[1].reason.startswith("association refused 299 more times in the last")
    assert rows[1].calling_ae == "INTRUDER"
    assert _echoscu(harness.port).returncode == 0


def test_refusal_log_bounds_rows_for_many_kinds_and_restarts_each_interval() -> None:
    rows: list[tuple[str | None, str, int]] = []
    log = RefusalLog(lambda ae, reason, status: rows.append((ae, reason, status)), interval_s=3600, max_keys=4)
    for i in range(1000):
        log.refused(RefusalKey(f"10.0.{i // 250}.{i % 250}", f"AE{i % 7}", "calling AE title not in the allow-list",
                               ASSOCIATION_REJECTED_STATUS))
    log.flush()
    assert len(rows) == 4 + 1  # the first four kinds, and one overflow row for the other 996
    assert "996 more refusals" in rows[-1][1]
    key = RefusalKey("10.9.9.9", None, "more than 8 connections from this address", CONNECTION_REFUSED_STATUS)
    for _ in range(50):
        log.refused(key, defer=True)  # the accept loop's way: written by flush (or the log's thread)
    log.flush()
    assert rows[5:] == [(None, key.row_text(), CONNECTION_REFUSED_STATUS),
                        (None, rows[6][1], CONNECTION_REFUSED_STATUS)]
    assert rows[6][1].startswith("connection closed 49 more times in the last")
    log.refused(key)  # a new interval: recorded at once again
    assert rows[-1] == (None, key.row_text(), CONNECTION_REFUSED_STATUS)


def test_an_address_whose_connections_are_all_associated_gets_no_more(tmp_path: Path) -> None:
    h = start_harness(tmp_path, max_connections_per_address=2)
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", h.port, ae_title=SCP_AE) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        (extra,) = idle_sockets(h.port, ["127.0.0.1"])
        assert closed_by_peer(extra, GENEROUS_S)  # closed on accept: nothing idle to make room
        extra.close()
        # Recorded off the accept path by the refusal log's own thread: soon, not at once.
        deadline = time.monotonic() + GENEROUS_S
        while not h.rejections() and time.monotonic() < deadline:
            time.sleep(0.1)
        (row,) = h.rejections()
        assert row.status == CONNECTION_REFUSED_STATUS and row.calling_ae is None
        assert "more than 2 associated connections from this address (from 127.0.0.1)" in row.reason
        assert h.receiver.stats.snapshot()["connections"] == {"refused_address_limit": 1}
        assert all(a.send_c_echo().Status == 0x0000 for a in held)  # the held ones are untouched
    finally:
        for assoc in held:
            assoc.release()
        h.close()


def test_association_limit_counts_requested_associations_only(tmp_path: Path) -> None:
    h = start_harness(tmp_path, maximum_associations=2)
    idle = idle_sockets(h.port, ["127.0.0.5"] * 4)  # more idle sockets than the limit: no effect
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", h.port, ae_title=SCP_AE) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", h.port, ae_title=SCP_AE)
        assert third.is_rejected
        assert (third.acceptor.primitive.result, third.acceptor.primitive.result_source,
                third.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)
        (row,) = h.rejections()
        assert row.status == ASSOCIATION_LIMIT_STATUS and "association limit" in row.reason
        held.pop().release()
        fourth = associate_once_a_slot_frees(ae, h.port, GENEROUS_S)
        assert fourth.is_established
        fourth.release()
    finally:
        for assoc in held:
            assoc.release()
        for sock in idle:
            sock.close()
        h.close()


def test_called_ae_title_is_checked_only_when_asked(tmp_path: Path) -> None:
    lenient = start_harness(tmp_path / "lenient")
    try:
        assert _echoscu(lenient.port, called="SOMEONE_ELSE").returncode == 0  # the default, as before
    finally:
        lenient.close()
    strict = start_harness(tmp_path / "strict", check_called_ae_title=True)
    try:
        refused = _echoscu(strict.port, called="SOMEONE_ELSE")
        assert refused.returncode != 0
        assert "called ae title not recognized" in refused.stderr.lower(), refused.stderr
        (row,) = strict.rejections()
        assert row.status == CALLED_AE_REJECTED_STATUS and "called AE title" in row.reason
        assert _echoscu(strict.port).returncode == 0
    finally:
        strict.close()


def test_a_pacs_opening_one_short_association_after_another_is_never_limited(tmp_path: Path) -> None:
    # Ended associations free their place at once, though their threads still tear down.
    h = start_harness(tmp_path, max_connections_per_address=3, maximum_associations=2)
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(Verification)
    try:
        for _ in range(100):
            assoc = ae.associate("127.0.0.1", h.port, ae_title=SCP_AE)
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        assert h.rejections() == [] and h.receiver.stats.snapshot()["connections"] == {}
    finally:
        h.close()
