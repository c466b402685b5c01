"""`headscreen rescreen`: screen a PACS archive's studies of a date range, behind live work.

The PACS is one of the configured `destinations` (the node results go to is the node
studies come from): a DIMSE node is asked by C-FIND (Study Root, study level) and
sends each study by C-MOVE to our own AE title, so the study enters through the
receiver as a forwarded one would; a DICOMweb node (kind "stow") is asked by QIDO-RS
and read by WADO-RS, and what it returns is stored through the receiver by C-STORE.
Either way the study is recorded, completed and queued by the same code as a live
study, only its jobs wait behind live ones (db.models.RESCREEN_PRIORITY) and carry the
run, which says whether results are sent (`--record-only`: recorded, never sent).

The run and each study's state are in the database (db.rescreen): Ctrl-C or SIGTERM
stops between two steps (a retrieve under way is aborted and done again on resume),
and running the same query again, or `--resume ID`, carries on where it stopped.
Studies already screened by the bundle that would screen them now (same name, version
and manifest sha256) are skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Protocol

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.config import DestinationConfig, Settings
from headscreen.db import rescreen as store
from headscreen.db.models import RescreenItemState, RescreenRunState
from headscreen.db.rescreen import FoundStudy, RescreenQuery
from headscreen.db.types import BundleRef
from headscreen.errors import HeadscreenError, TransientError

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_PENDING = (0xFF00, 0xFF01)
STATUS_CANCEL = 0xFE00
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
# A failed retrieve is tried this many times, RETRY_DELAY_S x attempt apart, before the study
# fails: a PACS busy for a moment (or one still closing the association a stop cut) recovers.
RETRIEVE_ATTEMPTS = 3
RETRY_DELAY_S = 5.0


class Stopped(Exception):
    """The run was asked to stop (Ctrl-C, SIGTERM) while a retrieve was under way."""


class StopFlag(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def parse_date(text: str, option: str) -> str:
    """YYYY-MM-DD or YYYYMMDD as DICOM's YYYYMMDD; a usage error naming the option otherwise."""
    cleaned = text.strip()
    for form in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(cleaned, form).date().strftime("%Y%m%d")
        except ValueError:
            continue
    raise HeadscreenError(f"{option}: {text!r} is not a date (YYYY-MM-DD)")


def checked_range(since: str, until: str | None) -> tuple[str, str]:
    first = parse_date(since, "--since")
    last = parse_date(until, "--until") if until else date.today().strftime("%Y%m%d")
    if first > last:
        raise HeadscreenError(f"--since {since} is after --until {until or 'today'}")
    return first, last


def node_named(settings: Settings, name: str) -> DestinationConfig:
    for node in settings.destinations:
        if node.name == name:
            return node
    known = ", ".join(d.name for d in settings.destinations) or "none"
    raise HeadscreenError(f"--from {name!r}: no PACS node of that name in `destinations` (configured: {known})")


class Source(Protocol):
    kind: str
    name: str

    def find(self, since: str, until: str, modality: str | None) -> list[FoundStudy]: ...

    def retrieve(self, study_uid: str, stop: StopFlag) -> str | None:
        """Bring the whole study to the receiver; None when done, else why not (the item fails)."""
        ...


def source_for(settings: Settings, node: DestinationConfig, timeout_s: float = 30.0) -> Source:
    if node.kind == "stow":
        return DicomwebSource(settings, node, timeout_s)
    return DimseSource(settings, node, timeout_s)


def _modalities(value: Any) -> tuple[str, ...]:
    """ModalitiesInStudy as a tuple ("CT", "SR"); a str, a pydicom MultiValue or absent."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    split = [part.strip().upper() for item in items for part in str(item).split("\\")]
    return tuple(dict.fromkeys(m for m in split if m))


def _found(identifier: Dataset, modality: str | None) -> FoundStudy | None:
    uid = str(identifier.get("StudyInstanceUID", "") or "").strip()
    if not uid:
        return None
    modalities = _modalities(identifier.get("ModalitiesInStudy"))
    if modality is not None and modalities and modality not in modalities:
        return None  # a PACS that does not match on ModalitiesInStudy
    study_date = str(identifier.get("StudyDate", "") or "").strip() or None
    return FoundStudy(uid, modalities, study_date)


# What is retrieved of a study: its CT and MR series (the receiver takes image storage only,
# and a PACS that cannot send one instance of a move may fail it whole: our own SR and SC
# results, sent back earlier, are in the same study).
IMAGE_MODALITIES = ("CT", "MR")


class DimseSource:
    """C-FIND and C-MOVE (Study Root) against a DIMSE node, as our own AE title; the PACS
    must know that AE title's host and port (it sends the study there). A study is moved
    series by series, its CT and MR series only."""

    kind = "dimse"

    def __init__(self, settings: Settings, node: DestinationConfig, timeout_s: float) -> None:
        self.name = node.name
        self.node = node
        self.calling_ae = settings.ae_title
        self.move_destination = settings.ae_title
        self.timeout_s = timeout_s

    def _associate(self, *contexts: str):
        from pynetdicom import AE

        from headscreen.export.delivery import client_tls_args, requestor_handlers

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.network_timeout = self.timeout_s
        ae.dimse_timeout = max(self.timeout_s, 600.0)  # a C-MOVE answers once per instance sent
        for context in contexts:
            ae.add_requested_context(context)
        tls_args = client_tls_args(self.name, self.node.tls, self.node.host)
        assoc = ae.associate(self.node.host or "", self.node.port or 0, ae_title=self.node.ae_title or "",
                             tls_args=tls_args, evt_handlers=requestor_handlers())
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "did not answer"
            raise TransientError(f"PACS {self.name!r} ({self.node.host}:{self.node.port}, AE {self.node.ae_title}) "
                                 f"{why}")
        return assoc

    def _find(self, assoc, query: Dataset) -> list[Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

        answers = []
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise TransientError(f"PACS {self.name!r}: the C-FIND got no answer (timed out or aborted)")
            if code in STATUS_PENDING:
                if identifier is not None:
                    answers.append(identifier)
            elif code != STATUS_SUCCESS:
                raise TransientError(f"PACS {self.name!r} refused the C-FIND: status 0x{code:04X}")
        return answers

    def find(self, since: str, until: str, modality: str | None) -> list[FoundStudy]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

        assoc = self._associate(StudyRootQueryRetrieveInformationModelFind)
        answers: list[Dataset] = []
        try:
            # One day per C-FIND: many PACS cap the matches of one query (often at 500 or 1000)
            # without saying so, and a year of head CT is far more than that.
            for day in _days(since, until):
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = ""
                query.StudyDate = day
                query.ModalitiesInStudy = modality or ""
                answers += self._find(assoc, query)
        finally:
            assoc.release()
        found: dict[str, FoundStudy] = {}
        for identifier in answers:
            study = _found(identifier, modality)
            if study is not None:
                found.setdefault(study.study_instance_uid, study)
        return list(found.values())

    def retrieve(self, study_uid: str, stop: StopFlag) -> str | None:
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
        )

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        assoc = self._associate(StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove)
        failures = []
        try:
            series = [str(d.SeriesInstanceUID) for d in self._find(assoc, query)
                      if str(d.get("Modality", "")).upper() in IMAGE_MODALITIES and d.get("SeriesInstanceUID")]
            if not series:
                return "the PACS has no CT or MR series in this study"
            for series_uid in series:
                move = Dataset()
                move.QueryRetrieveLevel = "SERIES"
                move.StudyInstanceUID = study_uid
                move.SeriesInstanceUID = series_uid
                final: Dataset | None = None
                for status, _ in assoc.send_c_move(move, self.move_destination,
                                                   StudyRootQueryRetrieveInformationModelMove):
                    if stop.is_set():
                        assoc.abort()  # the PACS stops sending; resume retrieves the study again
                        raise Stopped()
                    if getattr(status, "Status", None) not in STATUS_PENDING:
                        final = status
                failure = _move_outcome(final, self.move_destination)
                if failure is not None:
                    failures.append(failure)
        finally:
            if assoc.is_established:
                assoc.release()
        return "; ".join(dict.fromkeys(failures)) or None


def _days(since: str, until: str) -> list[str]:
    """Every date from `since` to `until` (YYYYMMDD, inclusive)."""
    first, last = (datetime.strptime(d, "%Y%m%d").date() for d in (since, until))
    return [(first + timedelta(days=n)).strftime("%Y%m%d") for n in range((last - first).days + 1)]


def _move_outcome(final: Dataset | None, move_destination: str) -> str | None:
    code = getattr(final, "Status", None)
    if final is None or code is None:
        raise TransientError("the C-MOVE got no final answer (timed out or aborted)")
    completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    if code == STATUS_SUCCESS and not failed:
        return None
    if code == STATUS_MOVE_DESTINATION_UNKNOWN:
        raise HeadscreenError(f"the PACS does not know our AE title {move_destination!r} as a C-MOVE destination: "
                              "add it there with this host and the receiver's port")
    if failed and not completed:
        return (f"the PACS could not send any of {failed} instances to {move_destination} "
                "(is `headscreen serve` running, and does the PACS have its host and port?)")
    return f"C-MOVE ended with status 0x{code:04X}: {completed} instances sent, {failed} failed"


class DicomwebSource:
    """QIDO-RS and WADO-RS (dicomweb-client) against a DICOMweb node; what WADO-RS returns
    (the study's CT and MR series) is stored through our own receiver by C-STORE, as our own
    AE title, so that must be one of `allowed_callers`."""

    kind = "dicomweb"

    def __init__(self, settings: Settings, node: DestinationConfig, timeout_s: float) -> None:
        self.name = node.name
        url = (node.url or "").rstrip("/")
        self.base_url = url[: -len("/studies")] if url.endswith("/studies") else url
        self.authorization = node.authorization
        self.calling_ae = settings.ae_title
        host = settings.bind_address
        self.receiver = ("127.0.0.1" if host in ("0.0.0.0", "::") else host, settings.port, settings.ae_title)
        self.timeout_s = timeout_s

    def _client(self):
        from dicomweb_client.api import DICOMwebClient

        headers = {"Authorization": self.authorization} if self.authorization else None
        return DICOMwebClient(self.base_url, headers=headers, timeout=self.timeout_s)

    def _unreachable(self, what: str, exc: Exception) -> TransientError:
        import requests

        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return TransientError(f"PACS {self.name!r}: {what} answered HTTP {exc.response.status_code}")
        return TransientError(f"PACS {self.name!r}: {what} failed ({type(exc).__name__}); is {self.base_url} "
                              "reachable?")

    def find(self, since: str, until: str, modality: str | None) -> list[FoundStudy]:
        import requests

        filters: dict[str, Any] = {"StudyDate": f"{since}-{until}"}
        if modality:
            filters["ModalitiesInStudy"] = modality
        try:
            answers = self._client().search_for_studies(
                search_filters=filters, fields=["StudyInstanceUID", "StudyDate", "ModalitiesInStudy"],
                get_remaining=True)
        except (requests.RequestException, OSError) as exc:
            raise self._unreachable("QIDO-RS", exc) from None
        found: dict[str, FoundStudy] = {}
        for answer in answers:
            study = _found(Dataset.from_json(answer), modality)
            if study is not None:
                found.setdefault(study.study_instance_uid, study)
        return list(found.values())

    def retrieve(self, study_uid: str, stop: StopFlag) -> str | None:
        import requests
        from pynetdicom import AE

        from headscreen.daemon.receiver import STORAGE_CLASSES, TRANSFER_SYNTAXES
        from headscreen.export.delivery import requestor_handlers

        client = self._client()
        try:
            series = [str(d.SeriesInstanceUID) for d in map(Dataset.from_json, client.search_for_series(
                study_uid, fields=["SeriesInstanceUID", "Modality"], get_remaining=True))
                if str(d.get("Modality", "")).upper() in IMAGE_MODALITIES and d.get("SeriesInstanceUID")]
        except (requests.RequestException, OSError) as exc:
            raise self._unreachable("QIDO-RS", exc) from None
        if not series:
            return "the PACS has no CT or MR series in this study"
        host, port, called = self.receiver
        ae = AE(ae_title=self.calling_ae)
        for sop_class in STORAGE_CLASSES:
            ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
        assoc = ae.associate(host, port, ae_title=called, evt_handlers=requestor_handlers())
        if not assoc.is_established:
            raise HeadscreenError(f"the receiver at {host}:{port} did not take the association from our AE title "
                                  f"{self.calling_ae!r}: is `headscreen serve` running, and is {self.calling_ae!r} "
                                  "in allowed_callers? (DICOMweb retrieves are stored through it)")
        sent = failed = 0
        try:
            for series_uid in series:
                for dataset in client.iter_series(study_uid, series_uid):
                    if stop.is_set():
                        assoc.abort()
                        raise Stopped()
                    status = assoc.send_c_store(dataset)
                    code = getattr(status, "Status", None)
                    if code is not None and (code == STATUS_SUCCESS or code >> 12 == 0xB):
                        sent += 1
                    else:
                        failed += 1
        except (requests.RequestException, OSError) as exc:
            raise self._unreachable("WADO-RS", exc) from None
        finally:
            if assoc.is_established:
                assoc.release()
        if failed:
            return f"the receiver refused {failed} of {sent + failed} instances"
        return None if sent else "WADO-RS returned no instance"


@dataclass
class Progress:
    """What the terminal shows: tqdm on a terminal only (nothing in a log file or pipe)."""

    total: int
    enabled: bool = True

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="study", desc="rescreen", disable=None if self.enabled else True,
                        dynamic_ncols=True)

    def show(self, counts: dict[str, int]) -> None:
        finished = sum(counts.get(s, 0) for s in ("done", "skipped", "failed"))
        self.bar.total = sum(counts.values())
        self.bar.n = finished
        self.bar.set_postfix({k: counts.get(k, 0) for k in ("retrieving", "queued", "done", "skipped", "failed")},
                             refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class Rescreen:
    """Works through one run until every study is finished or it is asked to stop."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], run_id: int, source: Source,
                 bundles: Callable[[], Sequence[BundleRef]], stop: StopFlag, per_hour: float | None,
                 max_in_flight: int, actor: str, poll_s: float = 1.0,
                 on_progress: Callable[[dict[str, int]], None] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.run_id = run_id
        self.source = source
        self.bundles = bundles
        self.stop = stop
        self.interval_s = 3600.0 / per_hour if per_hour else 0.0
        self.max_in_flight = max_in_flight
        self.actor = actor
        self.poll_s = poll_s
        self.on_progress = on_progress
        self._last_start: float | None = None
        self._busy: set[int] = set()
        self._retry: dict[int, tuple[float, store.PendingItem]] = {}  # item id -> (when, item)
        self._attempts: dict[int, int] = {}

    def counts(self) -> dict[str, int]:
        with self.sessions() as session:
            return store.item_counts(session, self.run_id)

    def run(self) -> dict[str, int]:
        """Until finished (the run is marked so) or stopped (marked stopped; resumable). Any
        error on the way also leaves the run stopped, for a later resume."""
        with self.sessions() as session:
            # Retrieves a stop cut short are done first; they stay "retrieving" meanwhile, so
            # what they already brought is still queued behind live studies.
            for item in store.items_in(session, self.run_id, RescreenItemState.RETRIEVING):
                self._retry[item.item_id] = (0.0, item)
        state = RescreenRunState.STOPPED
        try:
            while True:
                with self.sessions() as session:
                    store.refresh_items(session, self.run_id)
                    store.touch_run(session, self.run_id)
                counts = self.counts()
                if self.on_progress is not None:
                    self.on_progress(counts)
                if self.stop.is_set():
                    return counts
                if not any(counts.get(str(s), 0) for s in store.OPEN_ITEM_STATES):
                    state = RescreenRunState.FINISHED
                    return counts
                in_flight = sum(counts.get(str(s), 0) for s in store.IN_FLIGHT_STATES) - len(self._retry)
                if in_flight < self.max_in_flight and self._rate_allows() and self._step():
                    continue
                self.stop.wait(self.poll_s)
                self._busy.clear()  # a study busy a moment ago may be free now
        finally:
            with self.sessions() as session:
                store.set_run_state(session, self.run_id, state, self.actor)

    def _rate_allows(self) -> bool:
        return self._last_start is None or time.monotonic() - self._last_start >= self.interval_s

    def _step(self) -> bool:
        """Retrieve a study whose retry is due, or take the next pending one: skip it, or
        retrieve and queue it. False when there was nothing to do now."""
        due = [item for when, item in self._retry.values() if when <= time.monotonic()]
        if due:
            del self._retry[due[0].item_id]
            return self._retrieve(due[0])
        with self.sessions() as session:
            pending = [p for p in store.next_pending(session, self.run_id, len(self._busy) + 1)
                       if p.item_id not in self._busy]
        if not pending:
            return False
        item = pending[0]
        bundles = store.bundles_for(item.modalities or self._local_modalities(item), self.bundles())
        if not bundles:
            self._mark(item, RescreenItemState.SKIPPED, "no configured bundle screens its modalities")
            return True
        with self.sessions() as session:
            state = store.screening_state(session, item.study_instance_uid, bundles)
        if state == "screened":
            self._mark(item, RescreenItemState.SKIPPED, "already screened by " + ", ".join(b.key for b in bundles))
            return True
        if state == "busy":
            self._busy.add(item.item_id)  # live work on it now: look again later
            return True
        with self.sessions() as session:
            if not store.mark_item(session, item.item_id, RescreenItemState.RETRIEVING,
                                   expect=RescreenItemState.PENDING):
                return True
        return self._retrieve(item)

    def _retrieve(self, item: store.PendingItem) -> bool:
        self._last_start = time.monotonic()
        extra = {"action": "rescreen_retrieve", "run_id": self.run_id, "study_uid": item.study_instance_uid}
        try:
            failure = self.source.retrieve(item.study_instance_uid, _Beating(self.stop, self._touch))
        except Stopped:
            log.info("retrieve stopped; it is done again on resume", extra=extra)
            return True
        except TransientError as exc:
            failure = str(exc)
        if failure is not None:
            attempts = self._attempts.get(item.item_id, 0) + 1
            self._attempts[item.item_id] = attempts
            if attempts < RETRIEVE_ATTEMPTS:
                # Still "retrieving": what arrived stays behind live studies.
                self._retry[item.item_id] = (time.monotonic() + RETRY_DELAY_S * attempts, item)
                log.warning("retrieve failed; trying again", extra={**extra, "error": failure, "attempt": attempts})
            else:
                log.warning("retrieve failed", extra={**extra, "error": failure, "attempt": attempts})
                self._mark(item, RescreenItemState.FAILED, failure)
            return True
        with self.sessions() as session:
            jobs = store.queue_retrieved(session, item.item_id, self.bundles(), self.actor,
                                         max_attempts=self.settings.job_max_attempts)
        log.info("study retrieved and queued", extra={**extra, "jobs": len(jobs),
                                                      "seconds": round(time.monotonic() - self._last_start, 2)})
        return True

    def _touch(self) -> None:
        with self.sessions() as session:
            store.touch_run(session, self.run_id)

    def _local_modalities(self, item: store.PendingItem) -> tuple[str, ...]:
        # A PACS that leaves ModalitiesInStudy empty: judge by what the query asked for.
        with self.sessions() as session:
            run = store.get_run(session, self.run_id)
        return (run.modality,) if run is not None and run.modality else ("CT", "MR")

    def _mark(self, item: store.PendingItem, state: RescreenItemState, detail: str | None) -> None:
        with self.sessions() as session:
            store.mark_item(session, item.item_id, state, detail)


class _Beating:
    """The stop flag as a retrieve sees it; asking it also tells the database, at most every
    10 s, that the run is alive (the console flags a running run that went silent)."""

    def __init__(self, stop: StopFlag, beat: Callable[[], None], every_s: float = 10.0) -> None:
        self.stop, self.beat, self.every_s = stop, beat, every_s
        self.last = time.monotonic()

    def is_set(self) -> bool:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.beat()
        return self.stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.stop.wait(timeout)


@dataclass
class SignalStop:
    """Ctrl-C and SIGTERM set the flag (the run stops between two steps); a second Ctrl-C
    interrupts at once."""

    event: threading.Event

    def __enter__(self) -> SignalStop:
        import signal

        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, _frame: Any) -> None:
            if signum == signal.SIGINT and self.event.is_set():
                raise KeyboardInterrupt
            self.event.set()

        for signum in self._previous:
            signal.signal(signum, handler)
        return self

    def __exit__(self, *_: object) -> None:
        import signal

        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def by_date(studies: Sequence[FoundStudy]) -> list[FoundStudy]:
    """Oldest study first, so a run works through the archive in order."""
    return sorted(studies, key=lambda s: (s.study_date or "", s.study_instance_uid))


__all__ = ["DicomwebSource", "DimseSource", "Progress", "Rescreen", "RescreenQuery", "SignalStop", "Stopped",
           "by_date", "checked_range", "node_named", "parse_date", "source_for"]
