"""Every response reaches the caller on an association we request (pynetdicom issue #875).

pynetdicom's association thread takes messages off the DIMSE queue to serve the peer's
requests; its pause before each send_*() trusts a flag left set by the previous exchange.
When that thread wakes late and the caller is slower still to read (a busy machine), it
takes the next exchange's first response and drops it. These tests delay both on purpose,
so the race is certain rather than rare: without `caller_takes_every_message` a re-screen
misses the studies of every day but the first, and a delivery waits out its DIMSE timeout.
"""

from __future__ import annotations

import threading
import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from headscreen.daemon.config import DestinationConfig, Settings
from headscreen.daemon.orthanc import free_port
from headscreen.daemon.rescreen import DimseSource
from headscreen.export.delivery import STATUS_SUCCESS, Destination, send
from receiver_helpers import write_ct_series
from serve_harness import RecordingSCP

DAYS = [f"202403{day:02d}" for day in range(1, 9)]


class SlowToWake(threading.Event):
    """The association thread's checkpoint, waking 20 ms late: a thread the scheduler put off."""

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        time.sleep(0.02)
        return woke


@pytest.fixture
def slow_requestor_thread(monkeypatch):
    init = Association.__init__
    get_msg = DIMSEServiceProvider.get_msg

    def slowed(self, ae, mode):
        init(self, ae, mode)
        if mode == "requestor":
            self._reactor_checkpoint = SlowToWake()
            self._reactor_checkpoint.set()

    def read_late(self, block: bool = False):
        if block:  # the caller, reading its next response 60 ms after it arrived
            time.sleep(0.06)
        return get_msg(self, block)

    monkeypatch.setattr(Association, "__init__", slowed)
    monkeypatch.setattr(DIMSEServiceProvider, "get_msg", read_late)


@pytest.fixture
def find_scp():
    """A Study Root C-FIND SCP with one study per day."""
    studies = {day: generate_uid() for day in DAYS}

    def answer(event):
        day = str(event.identifier.StudyDate)
        if day in studies:
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.StudyInstanceUID = studies[day]
            match.StudyDate = day
            match.ModalitiesInStudy = "CT"
            yield 0xFF00, match

    ae = AE(ae_title="FINDSCP")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, answer)])
    try:
        yield port, studies
    finally:
        server.shutdown()


def test_a_rescreen_query_gets_every_days_match_however_late_the_association_thread_wakes(
        find_scp, slow_requestor_thread):
    port, studies = find_scp
    node = DestinationConfig(name="pacs", ae_title="FINDSCP", host="127.0.0.1", port=port)
    source = DimseSource(Settings(allow_any_caller=True), node, timeout_s=10)

    found = source.find(DAYS[0], DAYS[-1], "CT")

    assert sorted(s.study_instance_uid for s in found) == sorted(studies.values())
    assert {s.study_date for s in found} == set(DAYS)


def test_a_delivery_gets_every_status_however_late_the_association_thread_wakes(tmp_path, slow_requestor_thread):
    destination = RecordingSCP(tmp_path / "received")
    paths = write_ct_series(tmp_path / "series", 6)
    try:
        # A response the association thread took would leave its file without a status
        # once the 5 s DIMSE timeout ends the association.
        statuses = send(Destination("results", destination.ae_title, "127.0.0.1", destination.port), paths,
                        timeout=5)
    finally:
        destination.stop()

    assert statuses == {path: STATUS_SUCCESS for path in paths}
    assert sum(destination.received.values()) == len(paths)
