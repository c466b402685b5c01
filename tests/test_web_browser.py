"""The console in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
log in, filter the list, open a study, flag it, find the flag in the review queue and
the audit trail. Screenshots go to /tmp/web-shots/ for a person to look at."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from db_factories import BUNDLES
from headscreen.daemon.web import WebServer, start_web_server
from headscreen.db import api
from headscreen.db.engine import make_engine, session_factory
from headscreen.db.migrate import upgrade
from web_helpers import ADMIN, Seeded, add_users, seed, web_settings

pytestmark = pytest.mark.slow  # headless Chromium: `make test-fast` leaves it out

SHOTS = Path("/tmp/web-shots")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, Seeded]]:
    url = f"sqlite:///{tmp_path / 'db' / 'headscreen.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    settings = web_settings(tmp_path, url)
    with sessions() as session:
        seeded = seed(session, settings.storage_dir, api.utcnow())
        add_users(session)
    server: WebServer = start_web_server(settings, sessions, BUNDLES)
    try:
        yield f"http://127.0.0.1:{server.port}", seeded
    finally:
        server.shutdown()
        engine.dispose()


def _shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_admin_flags_a_study_and_finds_it_in_the_review_queue(browser: Browser, live: tuple[str, Seeded]) -> None:
    base, seeded = live
    shutil.rmtree(SHOTS, ignore_errors=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(15_000)

    page.goto(f"{base}/studies")
    expect(page).to_have_url(re.compile(r"/login\?next=/studies$"))
    page.fill("input[name=username]", ADMIN[0])
    page.fill("input[name=password]", "wrong-password")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("Wrong user name or password")
    page.fill("input[name=username]", ADMIN[0])
    page.fill("input[name=password]", ADMIN[1])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{base}/studies")
    expect(page.locator("#study-table tbody tr")).to_have_count(6)
    page.goto(f"{base}/")
    expect(page.locator("svg.chart")).to_have_count(2)
    _shot(page, "01-overview")

    page.goto(f"{base}/studies")
    page.select_option("select[name=modality]", "CT")
    page.fill("input[name=min_percentile]", "90")
    page.click("#filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"modality=CT.*min_percentile=90"))
    rows = page.locator("#study-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("99.4")
    _shot(page, "02-studies-filtered")

    page.click(f"a[href='/studies/{seeded.positive}']")
    expect(page.locator("#study-uid")).to_contain_text(seeded.positive)
    preview = page.locator(".previews img").first
    expect(preview).to_be_visible()
    # Visible is not loaded: wait for the image itself (generously, the machine may be busy).
    image = preview.element_handle()
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image, timeout=60_000)
    assert page.evaluate("(img) => img.naturalWidth", image) == 64
    page.fill("#comment", "possible subdural, please check")
    page.click("#review-form button[value=flag]")
    expect(page.locator("#flag-state")).to_contain_text("possible subdural, please check")
    audit_row = page.locator("#audit tbody tr").first
    expect(audit_row).to_contain_text("flag_set")
    expect(audit_row).to_contain_text(ADMIN[0])
    _shot(page, "03-study-flagged")

    page.click("nav >> text=Review queue")
    flagged_row = page.locator("#study-table tbody tr", has=page.locator(f"a[href='/studies/{seeded.positive}']"))
    expect(flagged_row).to_contain_text("possible subdural")
    expect(page.locator("#study-table tbody tr")).to_have_count(2)  # the flagged positive and the QC failure
    _shot(page, "04-review-queue")

    page.goto(f"{base}/failures")
    expect(page.locator("#failed-jobs")).to_contain_text("no brain found")
    expect(page.locator("#dead-deliveries")).to_contain_text("association rejected")
    _shot(page, "05-failures")
    page.goto(f"{base}/drift")
    _shot(page, "06-drift")
    page.goto(f"{base}/studies/{seeded.qc_failed}")
    _shot(page, "07-study-qc-failed")
    page.close()
