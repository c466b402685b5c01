"""The returned objects in OHIF Viewer, in a real browser (issue 13 item 4).

A positive result (the source CT, two SC overlays, the SEG, the TID 1500 SR; dciodvfy passes the
SEG and SR first, and the same SR kind, eligible-positive, passes Pixelmed in
tests/test_sr_conformance.py) is stored in Orthanc; OHIF Viewer's prebuilt web app (@ohif/app, fetched
by tests/install-ohif.sh) is served with Orthanc's DICOMweb on one origin (web_helpers.OhifServer)
and opened in headless Chromium, WebGL2 on SwiftShader. Checked:

- the study list shows the study with its four series' modalities and 44 instances;
- segmentation mode: the SEG, opened from the study browser, is listed in the segmentation panel
  with its segment label, and OHIF draws it over the source CT on the lesion (the canvas pixels
  OHIF renders, mapped to image pixels with OHIF's own geometry) and nothing on a healthy slice;
- basic viewer, an eligible result without a SEG (a TID 1501 group): OHIF opens the SR without an
  error and reads every measurement of the group, placed at the anomaly map's maximum (the one NUM
  with a SCOORD: OHIF 3.13.2 needs a coordinate in every group, and drops a NUM whose children
  hold none); that its measurement panel does not list them is a strict xfail;
- basic viewer, the positive result with its SEG (a TID 1411 group that references the segment):
  OHIF reads the group's tracking identifier and UID; what it cannot show is pinned by strict
  xfails. TID 1411 allows no coordinate beside a Referenced Segment (rows 5, 7 and 10 exclude one
  another) and TID 1419 gives its NUMs no INFERRED FROM row, so the group has none, and OHIF
  3.13.2 throws on a group without one;
- a not-eligible result: nothing measured, nothing to locate; OHIF shows its error notification
  (strict xfail).

Screenshots are kept in the test's tmp dir, and copied to $HEADSCREEN_TEST_ARTEFACTS when set.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from scipy import ndimage

from headscreen.daemon.orthanc import Orthanc, dicomweb_plugin, orthanc_available
from headscreen.daemon.pipeline import _build_results
from headscreen.export import codes
from headscreen.export.sc import choose_slices
from headscreen.export.sr import build_report
from serve_harness import dciodvfy_errors
from test_export import make_ct_series
from test_sr_conformance import BUNDLE, KINDS, POSITIVE_MR, QC_BLOCKED, SITE
from web_helpers import OHIF_VERSION, OhifServer, ohif_dist

pytestmark = pytest.mark.slow  # Orthanc, OHIF and headless Chromium: `make test-fast` leaves it out

ARTEFACTS_ENV = "HEADSCREEN_TEST_ARTEFACTS"
# The measurements a reader looks for, by concept code (export/codes.py).
MEASUREMENTS = (codes.ANOMALY_SCORE, codes.ANOMALY_PERCENTILE, codes.PREDICTED_BRAIN_AGE, codes.BRAIN_AGE_GAP)
HEALTHY_SLICE = 5  # far from the lesion (slice 25 of 40)
LOAD_TIMEOUT_MS = 180_000  # OHIF's first start parses 17 MB of JavaScript; the machine is shared
ERROR_WAIT_MS = 30_000  # bounds the wait for an error that may not come (none once OHIF is fixed)
UID_PATTERN = re.compile(r"\d+(\.\d+){4,}")  # a DICOM UID, not an IPv4 address
SATURATION = 60  # the CT is grey (R = G = B): a pixel this far from grey is the overlay


@dataclass
class OtherStudy:
    name: str  # for screenshot names
    study_uid: str
    sources: list[pydicom.Dataset]
    sr: pydicom.Dataset
    display_sets: int  # the series OHIF makes of it


@dataclass
class OhifStudy:
    url: str  # OHIF's origin
    study_uid: str
    sources: list[pydicom.Dataset]
    seg: pydicom.Dataset
    sr: pydicom.Dataset
    negative: OtherStudy  # an eligible-negative result without a SEG: CT, SC overlays, SR
    ineligible: OtherStudy  # a not-eligible result: CT, SR


def _keep(shot: Path) -> None:
    folder = os.environ.get(ARTEFACTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(folder) / shot.name)


@pytest.fixture(scope="module")
def ohif(tmp_path_factory) -> Iterator[OhifStudy]:
    dist = ohif_dist()
    if not orthanc_available() or dicomweb_plugin() is None:
        pytest.fail("Orthanc with its DICOMweb plugin missing: run tests/install-system-deps.sh", pytrace=False)
    out = tmp_path_factory.mktemp("results")
    sources, error = make_ct_series()
    # As tests/test_viewer_render.py: the doubled map makes the SEG's 1.0 threshold cut a sphere.
    objects = _build_results(sources, error * 2.0, POSITIVE_MR, choose_slices(error, 2), out / "objects", 1.0,
                             reference=SITE)
    paths = {o.kind: Path(o.path) for o in objects}
    # Valid objects first, so that whatever OHIF shows wrongly is OHIF's reading of valid DICOM
    # (Pixelmed, ~60 s here, runs on this SR kind in tests/test_sr_conformance.py).
    for kind in ("seg", "sr"):
        assert dciodvfy_errors(paths[kind]) == [], kind
    # Two more studies: a negative result (no SEG: no region to reference) and a not-eligible one.
    negative_sources, negative_error = make_ct_series(seed=1)
    negative = [Path(o.path) for o in _build_results(
        negative_sources, negative_error, KINDS["eligible-negative"].summary, choose_slices(negative_error, 2),
        out / "negative", None, reference=BUNDLE)]
    ineligible_sources, _ = make_ct_series(seed=2)
    ineligible = out / "ineligible-sr.dcm"
    build_report(ineligible_sources, QC_BLOCKED, []).save_as(ineligible, enforce_file_format=True)
    [negative_sr] = [path for path in negative if path.name == "sr.dcm"]
    for path in (negative_sr, ineligible):
        assert dciodvfy_errors(path) == [], path.name
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        for name, series in (("source", sources), ("negative", negative_sources), ("ineligible", ineligible_sources)):
            for i, source in enumerate(series):
                path = out / f"{name}-{i:03d}.dcm"
                source.save_as(path, enforce_file_format=True)
                orthanc.upload(path)
        for path in [*(Path(o.path) for o in objects), *negative, ineligible]:
            orthanc.upload(path)
        with OhifServer(dist, orthanc.http_port) as server:
            yield OhifStudy(server.url, str(sources[0].StudyInstanceUID), sources,
                            pydicom.dcmread(paths["seg"]), pydicom.dcmread(paths["sr"]),
                            OtherStudy("negative", str(negative_sources[0].StudyInstanceUID), negative_sources,
                                       pydicom.dcmread(negative_sr), 3),
                            OtherStudy("ineligible", str(ineligible_sources[0].StudyInstanceUID), ineligible_sources,
                                       pydicom.dcmread(ineligible), 2))
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def context(webgl_browser: Browser) -> Iterator[BrowserContext]:
    # One context for the module: OHIF's files are cached after the first page.
    context = webgl_browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(LOAD_TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


def _failed_requests(page: Page) -> list[str]:
    """Filled with every response of status 400 or more the page gets (OHIF or DICOMweb), UIDs left out."""
    failed: list[str] = []
    page.on("response", lambda response: failed.append(
        f"{response.status} {UID_PATTERN.sub('<uid>', response.url.split('?')[0])}")
        if response.status >= 400 else None)
    return failed


def _no_error_shown(page: Page) -> None:
    assert page.get_by_text("Something went wrong").count() == 0, "OHIF shows an error notification"


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    page = context.new_page()
    failed = _failed_requests(page)
    try:
        yield page
        assert failed == []
    finally:
        page.close()


def _screenshot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path))
    _keep(path)


def _open_study(page: Page, url: str, study_uid: str, mode: str, display_sets: int = 4) -> None:
    """OHIF's `mode` route for the study, once OHIF knows its series (the positive study's four:
    CT, SC, SEG, SR)."""
    page.goto(f"{url}/{mode}?StudyInstanceUIDs={study_uid}")
    page.wait_for_function(f"() => window.services && "
                           f"services.displaySetService.getActiveDisplaySets().length === {display_sets}")


def test_headless_chromium_renders_webgl2(page: Page) -> None:
    """cornerstone3D needs WebGL2; without a GPU it runs on SwiftShader (WEBGL_CHROMIUM_ARGS)."""
    version = page.evaluate("() => { const gl = document.createElement('canvas').getContext('webgl2');"
                            " return gl ? gl.getParameter(gl.VERSION) : null; }")
    assert version is not None and version.startswith("WebGL 2.0")


def test_the_study_list_shows_the_study_and_its_result_series(ohif: OhifStudy, page: Page, tmp_path: Path) -> None:
    page.goto(f"{ohif.url}/")
    rows = page.locator("tbody tr", has=page.locator("td"))
    rows.filter(has_text="SEG").first.wait_for()
    _screenshot(page, tmp_path / "ohif-study-list.png")
    cells = [[c.strip() for c in row] for row in rows.evaluate_all(
        "rows => rows.map(r => Array.from(r.querySelectorAll('td')).map(td => td.innerText))")]
    studies = [row for row in cells if any("\\" in c and "SEG" in c for c in row)]
    assert len(studies) == 1
    [modalities] = [c for c in studies[0] if "\\" in c]
    assert sorted(modalities.split("\\")) == ["CT", "OT", "SEG", "SR"]
    assert [cell for cell in studies[0] if cell.isdigit()] == ["44"]  # 40 CT slices, 2 SCs, the SEG, the SR


# --------------------------------------------------------------------------- SEG over the CT

_CANVAS_JS = """async ([sopInstanceUid, imagePoints]) => {
  const viewport = cornerstone.getEnabledElementByViewportId('default').viewport;
  const index = viewport.getImageIds().findIndex(id => id.includes('/instances/' + sopInstanceUid + '/'));
  await viewport.setImageIdIndex(index);
  viewport.render();
  await new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  const imageId = viewport.getCurrentImageId();
  const toCanvas = p => viewport.worldToCanvas(cornerstone.utilities.imageToWorldCoords(imageId, p));
  return {index, shown: imageId.includes('/instances/' + sopInstanceUid + '/'),
          png: viewport.canvas.toDataURL('image/png'), corners: imagePoints.map(toCanvas),
          dpr: window.devicePixelRatio};
}"""


def _seg_masks(seg: pydicom.Dataset) -> dict[str, np.ndarray]:
    """Source SOP Instance UID -> segment 1's mask on it."""
    frames = seg.PerFrameFunctionalGroupsSequence
    pixels = seg.pixel_array.reshape(len(frames), seg.Rows, seg.Columns).astype(bool)
    return {str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID): mask
            for frame, mask in zip(frames, pixels, strict=True)}


def _viewport_canvas(page: Page, sop_uid: str, shape: tuple[int, int], shot: Path) -> dict[str, Any]:
    """OHIF's viewport canvas on that slice (what cornerstone drew: image and labelmap, no DOM text),
    with the canvas positions of the image's corners (0, 0) and (columns, rows)."""
    rows, cols = shape
    found = page.evaluate(_CANVAS_JS, [sop_uid, [[0.0, 0.0], [float(cols), float(rows)]]])
    assert found["index"] >= 0 and found["shown"]
    shot.write_bytes(base64.b64decode(found["png"].split(",", 1)[1]))
    _keep(shot)
    found["rgb"] = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    return found


def _coloured(rgb: np.ndarray) -> np.ndarray:
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > SATURATION


def test_the_seg_is_listed_and_drawn_over_the_lesion(ohif: OhifStudy, page: Page, tmp_path: Path) -> None:
    seg = ohif.seg
    segment_label = str(seg.SegmentSequence[0].SegmentLabel)
    _open_study(page, ohif.url, ohif.study_uid, "segmentation")
    page.get_by_text(str(seg.SeriesDescription)).first.dblclick()
    # OHIF previews the SEG on the CT and asks whether to open it, as a reader would be asked.
    page.get_by_role("button", name="Yes").click()
    page.wait_for_function("() => services.segmentationService.getSegmentations().length === 1")
    page.get_by_text(segment_label, exact=True).wait_for()  # the segmentation panel's row
    _screenshot(page, tmp_path / "ohif-seg.png")
    segmentations = page.evaluate("() => services.segmentationService.getSegmentations().map("
                                  "s => ({label: s.label, segments: Object.values(s.segments)"
                                  ".filter(Boolean).map(x => x.label)}))")
    _no_error_shown(page)
    assert segmentations == [{"label": str(seg.SeriesDescription), "segments": [segment_label]}]
    # Shown as a labelmap in the viewport that holds the CT (the source series the SEG references).
    shown = page.evaluate("() => services.segmentationService.getSegmentationRepresentations('default')"
                          ".map(r => ({type: r.type, visible: r.visible}))")
    assert shown == [{"type": "Labelmap", "visible": True}]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ohif.sources[0].SeriesInstanceUID

    masks = _seg_masks(seg)
    lesion_uid = max(masks, key=lambda uid: masks[uid].sum())
    mask = masks[lesion_uid]
    lesion = _viewport_canvas(page, lesion_uid, mask.shape, tmp_path / "ohif-seg-lesion-canvas.png")
    (x0, y0), (x1, y1) = (np.array(c) * lesion["dpr"] for c in lesion["corners"])
    scale = (x1 - x0) / mask.shape[1]
    assert scale > 1 and abs((y1 - y0) / mask.shape[0] - scale) < 0.01 * scale  # square pixels, no rotation
    drawn = _coloured(lesion["rgb"])
    ys, xs = np.nonzero(drawn)
    assert len(xs) > 0, "OHIF drew no overlay on the lesion slice"
    # Every coloured canvas pixel maps back into the segment (one image pixel of slack at its edge).
    image_rows = np.floor((ys + 0.5 - y0) / scale).astype(int)
    image_cols = np.floor((xs + 0.5 - x0) / scale).astype(int)
    inside = (image_rows >= 0) & (image_rows < mask.shape[0]) & (image_cols >= 0) & (image_cols < mask.shape[1])
    assert inside.all()
    assert ndimage.binary_dilation(mask)[image_rows, image_cols].all()
    # ... and the segment is covered: its area on the canvas, within a fifth.
    assert 0.8 < drawn.sum() / (mask.sum() * scale**2) < 1.2
    # Nothing on a healthy slice.
    healthy = ohif.sources[HEALTHY_SLICE]
    assert str(healthy.SOPInstanceUID) not in masks
    clear = _viewport_canvas(page, str(healthy.SOPInstanceUID), mask.shape, tmp_path / "ohif-seg-healthy-canvas.png")
    assert not _coloured(clear["rgb"]).any()


# --------------------------------------------------------------------------- the SR


@dataclass
class SrInOhif:
    groups: list[dict[str, Any]]  # the SR display set's measurements, as OHIF parsed them
    tracked: int  # measurements in OHIF's measurement service (its measurement panel)
    panel: str  # the measurement panel's text
    errors: list[str]  # OHIF's error notifications while it opened the SR, with their details


# Records OHIF's error notifications (its React error boundary shows one when a component throws).
_WATCH_ERRORS_JS = """() => {
  window.headscreenErrors = [];
  new MutationObserver(() => {
    for (const node of document.querySelectorAll('li, [role=status], [role=alert]')) {
      const text = node.innerText || '';
      if (text.startsWith('Something went wrong') && !window.headscreenErrors.includes(text)) {
        window.headscreenErrors.push(text);
      }
    }
  }).observe(document.body, {childList: true, subtree: true});
}"""


def _error_details(page: Page, shot: Path) -> list[str]:
    """The title and first stack frame of OHIF's error notification, if one comes within
    ERROR_WAIT_MS (it follows the SR's loading by a moment); its details dialog is screenshotted."""
    show = page.get_by_text("Show Details", exact=True).first
    try:
        show.wait_for(timeout=ERROR_WAIT_MS)
    except PlaywrightTimeoutError:
        return []
    show.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    lines = [line.strip() for line in dialog.inner_text().splitlines() if line.strip()]
    _screenshot(page, shot)
    dialog.get_by_role("button", name="Close", exact=True).last.click()  # Escape does not close it
    dialog.wait_for(state="detached")
    return [" | ".join(lines[:2])]


# OHIF's own race on a busy machine: the SR is opened while the CT's stack viewport is still
# being set up, cornerstone destroys and re-creates it, and OHIF's handler holds the old one.
_VIEWPORT_RACE = "StackViewport._throwIfDestroyed"


def _sr_in_ohif(context: BrowserContext, url: str, study_uid: str, display_sets: int, sr: pydicom.Dataset,
                shots: Path, prefix: str = "ohif-sr") -> SrInOhif:
    """The SR as OHIF opens it; opened once more in a new page if the first try hit the
    viewport race (any other error, or the race twice, stays in the result)."""
    first = _sr_in_ohif_once(context, url, study_uid, display_sets, sr, shots, prefix)
    if not any(_VIEWPORT_RACE in error for error in first.errors):
        return first
    return _sr_in_ohif_once(context, url, study_uid, display_sets, sr, shots, f"{prefix}-again")


def _sr_in_ohif_once(context: BrowserContext, url: str, study_uid: str, display_sets: int, sr: pydicom.Dataset,
                     shots: Path, prefix: str) -> SrInOhif:
    """The basic viewer with the SR opened from the study browser and the measurement panel shown."""
    page = context.new_page()
    failed = _failed_requests(page)
    try:
        _open_study(page, url, study_uid, "viewer", display_sets)
        page.evaluate(_WATCH_ERRORS_JS)
        page.get_by_text(str(sr.SeriesDescription)).first.dblclick()
        page.wait_for_function("() => services.displaySetService.getActiveDisplaySets()"
                               ".some(d => d.Modality === 'SR' && d.isLoaded)")
        details = _error_details(page, shots / f"{prefix}-error.png")
        page.locator("[data-cy=trackedMeasurements-btn]").click()
        panel = page.locator("[data-cy=trackedMeasurements-panel]").first
        panel.wait_for()
        _screenshot(page, shots / f"{prefix}.png")
        groups = page.evaluate("() => services.displaySetService.getActiveDisplaySets()"
                               ".find(d => d.Modality === 'SR').measurements.map(m => ({"
                               "trackingIdentifier: m.TrackingIdentifier, trackingUid: m.TrackingUniqueIdentifier,"
                               " labels: m.labels, loaded: m.loaded, coords: m.coords.map(c => ({"
                               "graphicType: c.GraphicType, graphicData: Array.from(c.GraphicData),"
                               " sop: c.ReferencedSOPSequence && c.ReferencedSOPSequence.ReferencedSOPInstanceUID}))"
                               "}))")
        tracked = page.evaluate("() => services.measurementService.getMeasurements().length")
        errors = page.evaluate("() => window.headscreenErrors") + details
        assert failed == []
        return SrInOhif(groups, tracked, panel.inner_text(), errors)
    finally:
        page.close()


@pytest.fixture(scope="module")
def sr_in_ohif(ohif: OhifStudy, context: BrowserContext, tmp_path_factory) -> SrInOhif:
    """The positive result's SR (a TID 1411 group referencing the SEG's segment)."""
    return _sr_in_ohif(context, ohif.url, ohif.study_uid, 4, ohif.sr, tmp_path_factory.mktemp("ohif-sr"))


@pytest.fixture(scope="module")
def negative_sr_in_ohif(ohif: OhifStudy, context: BrowserContext, tmp_path_factory) -> SrInOhif:
    """The negative result's SR (a TID 1501 group, no SEG)."""
    study = ohif.negative
    return _sr_in_ohif(context, ohif.url, study.study_uid, study.display_sets, study.sr,
                       tmp_path_factory.mktemp("ohif-sr-negative"), "ohif-sr-negative")


@pytest.fixture(scope="module")
def ineligible_sr_in_ohif(ohif: OhifStudy, context: BrowserContext, tmp_path_factory) -> SrInOhif:
    """The not-eligible result's SR (a group with no NUM)."""
    study = ohif.ineligible
    return _sr_in_ohif(context, ohif.url, study.study_uid, study.display_sets, study.sr,
                       tmp_path_factory.mktemp("ohif-sr-ineligible"), "ohif-sr-ineligible")


def _sr_group(sr: pydicom.Dataset) -> tuple[str, str, dict[str, str]]:
    """The SR's measurement group: Tracking Identifier, its UID, and code meaning -> OHIF's label
    text for every NUM (value to two decimals, then the UCUM code)."""
    [group] = [row for container in sr.ContentSequence for row in container.get("ContentSequence", [])
               if row.ConceptNameCodeSequence[0].CodeValue == "125007"]  # DCM Measurement Group
    tracking, uid, numbers = "", "", {}
    for item in group.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if name.CodeValue == "112039":
            tracking = str(item.TextValue)
        elif name.CodeValue == "112040":
            uid = str(item.UID)
        elif item.ValueType == "NUM":
            value = item.MeasuredValueSequence[0]
            numbers[str(name.CodeMeaning)] = (f"{float(value.NumericValue):.2f} "
                                              f"{value.MeasurementUnitsCodeSequence[0].CodeValue}")
    return tracking, uid, numbers


def _peak(sr: pydicom.Dataset) -> tuple[str, list[float]]:
    """The SR's one SCOORD (the anomaly map's maximum): the SOP Instance UID it is on, its point."""
    def items(node: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
        for item in node.get("ContentSequence", []):
            yield item
            yield from items(item)

    [scoord] = [item for item in items(sr) if item.ValueType == "SCOORD"]
    return (str(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
            [float(v) for v in scoord.GraphicData])


def test_ohif_reads_the_sr_measurement_group(ohif: OhifStudy, sr_in_ohif: SrInOhif) -> None:
    tracking, uid, numbers = _sr_group(ohif.sr)
    [group] = sr_in_ohif.groups
    assert (group["trackingIdentifier"], group["trackingUid"]) == (tracking, uid)
    assert group["coords"] == []  # TID 1411 by Referenced Segment: no coordinates
    # Each label OHIF did read is a NUM of the group with its value and unit.
    assert group["labels"], "OHIF read no measurement of the group"
    for label in group["labels"]:
        assert numbers[label["label"]] == label["value"]


_TID_1411_NOTE = ("our positive result's group is TID 1411 defined by its Referenced Segment (the SEG), which "
                  "excludes an Image Region or Volume Surface coordinate (TID 1411 rows 5, 7, 10), and its NUMs "
                  "(TID 1419) have no INFERRED FROM row: no coordinate can be given")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    f"OHIF {OHIF_VERSION} (extension cornerstone-dicom-sr, _checkIfCanAddMeasurementsToDisplaySet) reads "
    "measurement.coords[0].ReferencedSOPSequence for every measurement group: TypeError, its error boundary "
    f"shows 'Something went wrong' and the SR viewport stays black; {_TID_1411_NOTE}"))
def test_ohif_opens_the_sr_without_an_error(sr_in_ohif: SrInOhif) -> None:
    assert sr_in_ohif.errors == []


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    f"OHIF {OHIF_VERSION} (extension cornerstone-dicom-sr, _processNonGeometricallyDefinedMeasurement) takes "
    "a NUM's children for the SCOORD it was inferred from and drops the NUM when none is; a TID 1411 group has "
    "no group-level algorithm row, so each NUM carries its TID 4019 identification (HAS CONCEPT MOD) and only "
    "Subject Age is read"))
def test_ohif_reads_every_measurement_of_the_sr(ohif: OhifStudy, sr_in_ohif: SrInOhif) -> None:
    _, _, numbers = _sr_group(ohif.sr)
    [group] = sr_in_ohif.groups
    read = {label["label"]: label["value"] for label in group["labels"]}
    for code in MEASUREMENTS:
        assert read.get(code.meaning) == numbers[code.meaning], code.meaning


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    f"OHIF {OHIF_VERSION} lists in its measurement panel only measurements it can draw (SCOORD/SCOORD3D on an "
    f"image); {_TID_1411_NOTE}, so the panel reads 'Measurements (0)'"))
def test_ohif_lists_the_sr_measurements_in_its_panel(sr_in_ohif: SrInOhif) -> None:
    assert sr_in_ohif.tracked > 0
    for code in MEASUREMENTS:
        assert code.meaning in sr_in_ohif.panel


# A negative result: every number OHIF should show (no brain age for this CT bundle).
NEGATIVE_MEASUREMENTS = (codes.ANOMALY_SCORE, codes.ANOMALY_PERCENTILE, codes.OPERATING_THRESHOLD,
                         codes.CHRONOLOGICAL_AGE, codes.MAP_QUANTITY["z"])


def test_ohif_opens_a_negative_sr_without_an_error(negative_sr_in_ohif: SrInOhif) -> None:
    assert negative_sr_in_ohif.errors == []


def test_ohif_reads_every_measurement_of_a_negative_sr_at_the_map_maximum(
        ohif: OhifStudy, negative_sr_in_ohif: SrInOhif) -> None:
    sr = ohif.negative.sr
    tracking, uid, numbers = _sr_group(sr)
    [group] = negative_sr_in_ohif.groups
    assert (group["trackingIdentifier"], group["trackingUid"]) == (tracking, uid)
    read = {label["label"]: label["value"] for label in group["labels"]}
    assert read == numbers  # every NUM of the group, with its value and unit
    assert {code.meaning for code in NEGATIVE_MEASUREMENTS} == set(read)
    # Placed on the source slice where the map peaks, at the point the SR gives.
    sop, point = _peak(sr)
    assert group["loaded"] and group["coords"] == [{"graphicType": "POINT", "graphicData": point, "sop": sop}]
    sop_uids = [str(s.SOPInstanceUID) for s in ohif.negative.sources]
    assert sop in sop_uids


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    f"OHIF {OHIF_VERSION}'s measurement panel lists the measurement service's entries, which an SR's groups "
    "become only when OHIF rehydrates it into its own tools; isRehydratable (cornerstone-dicom-sr) wants a "
    "Tracking Identifier of cornerstone's tools or a group-level graphic type it has an adapter for, and a "
    "group whose coordinates are a NUM's INFERRED FROM has neither: 'Measurements (0)'"))
def test_ohif_lists_a_negative_srs_measurements_in_its_panel(negative_sr_in_ohif: SrInOhif) -> None:
    assert negative_sr_in_ohif.tracked > 0
    for code in NEGATIVE_MEASUREMENTS:
        assert code.meaning in negative_sr_in_ohif.panel, code.meaning


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    f"OHIF {OHIF_VERSION} throws on an SR with nothing to locate: a group without coordinates fails in "
    "_checkIfCanAddMeasurementsToDisplaySet (coords[0]), and an SR without any group in its SR viewport "
    "(_getViewportReferencedDisplaySetData destructures measurements[0]); a not-eligible study has no "
    "measurement and no location that would be true"))
def test_ohif_opens_a_not_eligible_sr_without_an_error(ineligible_sr_in_ohif: SrInOhif) -> None:
    assert ineligible_sr_in_ohif.errors == []


def test_ohif_reads_the_not_eligible_srs_group_and_nothing_else(ineligible_sr_in_ohif: SrInOhif) -> None:
    [group] = ineligible_sr_in_ohif.groups
    assert group["labels"] == [] and group["coords"] == []
    assert ineligible_sr_in_ohif.tracked == 0
