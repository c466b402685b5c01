"""Studies named as the hospital names them: the receiver records the accession number and
patient ID of the first instance that has them (never in a log record), the study list
finds a study by either (or by the start of one, in any case, on SQLite and PostgreSQL),
and the overview's "needs attention" counts agree with the lists they link to. The
browser checks (layout, charts, clicks) are in test_web_console.py."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from headscreen.db import api
from headscreen.db.models import Study
from headscreen.db.types import StudyFilters
from receiver_helpers import SCP_AE, SCU_AE, start_harness, write_ct_series
from web_helpers import ADMIN, VIEWER, Console


def test_receiver_records_accession_number_and_patient_id_but_never_logs_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    files = write_ct_series(tmp_path / "in", 3, extra={"AccessionNumber": "ACC-5150", "PatientID": "MRN-0042"})
    harness = start_harness(tmp_path)
    try:
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", harness.port, ae_title=SCP_AE)
        assert assoc.is_established
        try:
            assert [assoc.send_c_store(path).Status for path in files] == [0, 0, 0]
        finally:
            assoc.release()
        with harness.sessions() as session:
            study = session.execute(select(Study)).scalar_one()
            assert (study.accession_number, study.patient_id, study.study_date) == ("ACC-5150", "MRN-0042",
                                                                                   "20240102")
    finally:
        harness.close()
    for secret in ("ACC-5150", "MRN-0042"):
        assert not [r for r in caplog.records if secret in r.getMessage() or secret in str(vars(r))], secret


def test_an_identifier_too_long_for_its_column_is_left_out_not_cut(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "in", 1, extra={"PatientID": "P" * 64 + "X", "AccessionNumber": "A-1"})
    harness = start_harness(tmp_path)
    try:
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", harness.port, ae_title=SCP_AE)
        try:
            assert assoc.send_c_store(files[0]).Status == 0
        finally:
            assoc.release()
        with harness.sessions() as session:
            study = session.execute(select(Study)).scalar_one()
            assert (study.accession_number, study.patient_id) == ("A-1", None)
    finally:
        harness.close()


def _identify(console: Console, uid: str, accession: str, patient: str) -> None:
    # The seed's instances carry no identifiers; set them as ingest would have.
    with console.sessions() as session, session.begin():
        study = session.execute(select(Study).where(Study.study_instance_uid == uid)).scalar_one()
        study.accession_number, study.patient_id = accession, patient


def test_search_by_accession_number_patient_id_or_uid(console_any_db: Console) -> None:
    s = console_any_db.seeded
    _identify(console_any_db, s.positive, "RAD-2026-0001", "mrn_77")
    _identify(console_any_db, s.negative, "RAD-2026-0002", "MRN%78")
    with console_any_db.sessions() as session:
        def found(term: str) -> set[str]:
            return {r.study_instance_uid for r in api.list_studies(session, StudyFilters(search=term))}
        assert found("RAD-2026-0001") == {s.positive}
        assert found("rad-2026-000") == {s.positive, s.negative}  # the start of one, in any case
        assert found("MRN_77") == {s.positive}
        assert found("mrn_") == {s.positive}  # "_" and "%" are themselves, not wildcards
        assert found("MRN%") == {s.negative}
        assert found(s.qc_failed[:-2]) == {s.qc_failed}
        assert found("nothing-like-this") == set()
        assert api.count_studies(session, StudyFilters(search="RAD-2026"))[0] == 2


def test_overview_counts_link_to_lists_of_the_same_studies(console: Console) -> None:
    client = console.client(ADMIN)
    page = client.get("/")
    assert page.status_code == 200
    links = dict(re.findall(r'id="attention-(\w+)" href="([^"]+)"><div class="num">\d+', page.text))
    counts = dict(re.findall(r'id="attention-(\w+)" href="[^"]+"><div class="num">(\d+)', page.text))
    assert set(links) == {"positives", "qc_failures", "calibrating", "dead"}
    assert links["dead"] == "/failures?show=dead" and links["calibrating"] == "/calibration?in_use=calibrating"
    api_client = console.client(VIEWER)
    for key in ("positives", "qc_failures"):
        query = links[key].split("?", 1)[1].replace("&amp;", "&")
        listed = api_client.get(f"/api/v1/studies?{query}").json()
        assert listed["total"] == int(counts[key]), key
    # The seed: one screen positive not reviewed; its QC failure is advisory (still eligible).
    assert (counts["positives"], counts["qc_failures"], counts["dead"]) == ("1", "0",
                                                                           str(len(console.seeded.dead_delivery_ids)))
    # The API's overview gives the same counts and links, for a monitoring system.
    body = api_client.get("/api/v1/overview").json()
    assert {a["key"]: (str(a["count"]), a["href"]) for a in body["attention"]} == {
        key: (counts[key], links[key].replace("&amp;", "&")) for key in links}
    positives = api_client.get("/api/v1/studies?screen=positive&reviewed=no").json()["studies"]
    assert [r["study_instance_uid"] for r in positives] == [console.seeded.positive]
    assert client.get("/failures?show=bogus").status_code == 422
    assert client.get("/calibration?in_use=bogus").status_code == 422
    dead_only = client.get("/failures?show=dead").text
    assert 'id="dead-deliveries"' in dead_only and 'id="failed-jobs"' not in dead_only


def test_a_search_term_never_goes_into_a_url(console: Console) -> None:
    """Proxies, browser history and Referer headers keep URLs: the term is posted and the lists
    carry a random handle for it."""
    s = console.seeded
    _identify(console, s.positive, "RAD-2026-0001", "mrn_77")
    client = console.client(VIEWER)
    made = client.post("/api/v1/searches", json={"q": " MRN_77 "})
    assert made.status_code == 200, made.text
    handle = made.json()["find"]
    assert "mrn" not in handle.lower() and len(handle) == 22
    listed = client.get(f"/api/v1/studies?find={handle}").json()
    assert [r["study_instance_uid"] for r in listed["studies"]] == [s.positive]
    assert s.positive in client.get(f"/api/v1/studies.csv?find={handle}").text
    # An old link with the term in it is refused, not answered with every study.
    assert client.get("/api/v1/studies?q=mrn_77").status_code == 422
    assert client.get("/api/v1/studies?find=" + "A" * 22).status_code == 410  # unknown or expired
    assert client.get("/api/v1/studies?find=not-a-handle").status_code == 422
    # Without the session's CSRF header a search is not made.
    bare = console.client(VIEWER)
    bare.headers.pop("X-CSRF-Token", None)
    assert bare.post("/api/v1/searches", json={"q": "mrn_77"}).status_code == 403

    # The console's filter form posts here and is sent on to the list with the handle.
    page = console.client(ADMIN)
    form = page.get("/studies").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    sent = page.post("/studies/search", data={"csrf_token": token, "back": "/review", "q": "RAD-2026-0001",
                                              "modality": "", "sort": "received", "order": "desc"},
                     follow_redirects=False)
    assert sent.status_code == 303
    target = sent.headers["location"]
    assert target.startswith("/review?") and "RAD" not in target and re.search(r"find=[\w-]{22}", target)
    assert page.get(target).status_code == 200
    assert page.post("/studies/search", data={"q": "RAD"}, follow_redirects=False).status_code == 403
