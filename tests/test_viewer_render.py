"""The returned objects as a reader sees them, in a real browser (issue 13 item 4).

OHIF is not built here (see docs/conformance.md, "Viewer check"); what is checked instead:
a positive result (SC overlays, SEG, TID 1500 SR) is stored in Orthanc and fetched back through
its DICOMweb plugin (QIDO-RS, WADO-RS), byte for byte what was sent; then, in headless Chromium
(Debian's, driven by Playwright):

- the SR as dcmtk's dsr2html renders it lists the anomaly score, percentile, predicted age and
  brain-age gap with the values the SR holds, and links the referenced segment into the SEG;
- the SEG's segment drawn on the source slice it references lands on the lesion, and nothing is
  drawn on a healthy slice.

Screenshots are kept in the test's tmp dir, and copied to $HEADSCREEN_TEST_ARTEFACTS when set.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page
from scipy import ndimage

from headscreen.daemon.orthanc import Orthanc, dicomweb_plugin, orthanc_available
from headscreen.daemon.pipeline import _build_results
from headscreen.export import codes
from headscreen.export.sc import choose_slices
from test_export import LESION, LESION_RADIUS, make_ct_series
from test_sr_conformance import POSITIVE_MR, SITE

pytestmark = pytest.mark.slow  # Orthanc, dcmtk and headless Chromium: `make test-fast` leaves it out

ARTEFACTS_ENV = "HEADSCREEN_TEST_ARTEFACTS"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
# The measurements a reader looks for, by concept code (export/codes.py).
MEASUREMENTS = (codes.ANOMALY_SCORE, codes.ANOMALY_PERCENTILE, codes.PREDICTED_BRAIN_AGE, codes.BRAIN_AGE_GAP)
HEALTHY_SLICE = 5  # far from the lesion (slice 25 of 40)


@dataclass
class Served:
    """What Orthanc serves back through DICOMweb, and what was sent."""
    sources: list[pydicom.Dataset]
    sent: dict[str, Path]        # kind -> file written by the pipeline
    served: dict[str, bytes]     # kind -> Part 10 bytes from WADO-RS
    study_uid: str
    qido_series: list[dict]


def _keep(shot: Path) -> None:
    folder = os.environ.get(ARTEFACTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(folder) / shot.name)


def _multipart_parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related WADO-RS response."""
    boundary = re.search(r'boundary="?([^";]+)"?', response.headers["content-type"]).group(1).encode()
    parts = []
    for chunk in response.content.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, body = chunk.partition(b"\r\n\r\n")
        parts.append(body[:-2] if body.endswith(b"\r\n") else body)
    return parts


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    if not orthanc_available() or dicomweb_plugin() is None:
        pytest.fail("Orthanc with its DICOMweb plugin missing: run tests/install-system-deps.sh", pytrace=False)
    out = tmp_path_factory.mktemp("results")
    sources, error = make_ct_series()
    # make_ct_series' map peaks at ~1 on the lesion: doubled, the SEG's 1.0 threshold cuts a sphere.
    objects = _build_results(sources, error * 2.0, POSITIVE_MR, choose_slices(error, 2), out / "objects", 1.0,
                             reference=SITE)
    sent = {o.kind if o.kind != "sc" else f"sc{i}": Path(o.path) for i, o in enumerate(objects)}
    assert {"seg", "sr"} <= set(sent) and sum(k.startswith("sc") for k in sent) == 2
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        for i, source in enumerate(sources):
            buffer = io.BytesIO()
            source.save_as(buffer, enforce_file_format=True)
            path = out / f"source-{i:03d}.dcm"
            path.write_bytes(buffer.getvalue())
            orthanc.upload(path)
        for path in sent.values():
            orthanc.upload(path)
        study_uid = str(sources[0].StudyInstanceUID)
        web = f"{orthanc.url}/dicom-web"
        with httpx.Client(timeout=60) as client:
            qido = client.get(f"{web}/studies/{study_uid}/series", headers={"Accept": "application/dicom+json"})
            qido.raise_for_status()
            served_bytes = {}
            for kind, path in sent.items():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                wado = client.get(f"{web}/studies/{study_uid}/series/{ds.SeriesInstanceUID}/instances/"
                                  f"{ds.SOPInstanceUID}",
                                  headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
                wado.raise_for_status()
                [served_bytes[kind]] = _multipart_parts(wado)
        yield Served(sources, sent, served_bytes, study_uid, qido.json())
    finally:
        orthanc.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1000, "height": 800}, device_scale_factor=1)
    try:
        yield context.new_page()
    finally:
        context.close()


def _dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _numbers(sr: pydicom.Dataset) -> dict[str, tuple[str, str]]:
    """NUM items anywhere in the tree: concept code -> (value as stored, UCUM unit code)."""
    found = {}

    def walk(node):
        for item in node.get("ContentSequence", []):
            if item.ValueType == "NUM" and "MeasuredValueSequence" in item:
                value = item.MeasuredValueSequence[0]
                found[item.ConceptNameCodeSequence[0].CodeValue] = (
                    str(value.NumericValue), value.MeasurementUnitsCodeSequence[0].CodeValue)
            walk(item)

    walk(sr)
    return found


def _render_sr(sr_path: Path, html_path: Path, page: Page) -> str:
    run = subprocess.run(["dsr2html", str(sr_path), str(html_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    page.goto(html_path.as_uri())
    return re.sub(r"\s+", " ", page.inner_text("body"))


def test_orthanc_serves_back_through_dicomweb_what_was_sent(served: Served) -> None:
    for kind, path in served.sent.items():
        assert served.served[kind] == path.read_bytes(), kind
    # QIDO-RS lists the source series and each result series, by UID and modality.
    listed = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in served.qido_series}
    expected = {str(served.sources[0].SeriesInstanceUID): "CT"}
    for data in served.served.values():
        ds = _dataset(data)
        expected[str(ds.SeriesInstanceUID)] = ds.Modality
    assert listed == expected
    assert sorted(expected.values()) == ["CT", "OT", "SEG", "SR"]


def test_dsr2html_lists_the_measurements_and_links_the_seg(served: Served, page: Page, tmp_path: Path) -> None:
    sr_path = tmp_path / "sr-from-orthanc.dcm"
    sr_path.write_bytes(served.served["sr"])
    sr, seg = _dataset(served.served["sr"]), _dataset(served.served["seg"])
    assert sr.SOPClassUID == SR_CLASS and seg.SOPClassUID == SEG_CLASS
    text = _render_sr(sr_path, tmp_path / "sr.html", page)
    shot = tmp_path / "viewer-sr-dsr2html.png"
    page.screenshot(path=str(shot), full_page=True)
    _keep(shot)
    numbers = _numbers(sr)
    # Containers SEPARATE: every row reads "Name: value unit" (CONTINUOUS, highdicom's
    # default, printed the numbers without their names).
    assert sr.ContinuityOfContent == "SEPARATE"
    for code in MEASUREMENTS:
        value, unit = numbers[code.value]
        assert f"{code.meaning}: {value} {unit}" in text, (code.meaning, value, unit)
    # The summary line a reader sees first, with the score the SR holds.
    assert f"Anomaly score {numbers[codes.ANOMALY_SCORE.value][0]}" in text
    # "Referenced Segment" is a link into the SEG, segment 1, by SOP Class and Instance UID.
    links = [html.unescape(href) for href in page.locator("a[href*='segments=']").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))")]
    assert [link.split("image=", 1)[1] for link in links] == [f"{SEG_CLASS} {seg.SOPInstanceUID}&segments=1"
                                                            .replace(" ", "+")]
    assert "Referenced Segment: SG image" in text


# --------------------------------------------------------------------------- SEG on its source


def _seg_masks(seg: pydicom.Dataset) -> dict[str, np.ndarray]:
    """Source SOP Instance UID -> the segment's mask on it (frames of segment 1)."""
    frames = seg.PerFrameFunctionalGroupsSequence
    pixels = seg.pixel_array.reshape(len(frames), seg.Rows, seg.Columns).astype(bool)
    masks: dict[str, np.ndarray] = {}
    for frame, mask in zip(frames, pixels, strict=True):
        identification = frame.get("SegmentIdentificationSequence") or \
            seg.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
        assert identification[0].ReferencedSegmentNumber == 1
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        masks[uid] = masks.get(uid, np.zeros_like(mask)) | mask
    return masks


def _overlay_png(source: pydicom.Dataset, mask: np.ndarray) -> bytes:
    """Brain window grey, the segment blended in pure green (as tests/test_seg.py draws it)."""
    hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    grey = np.clip(hu / 80.0 * 255.0, 0, 255)
    rgb = np.stack([grey] * 3, axis=-1)
    rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array([0.0, 255.0, 0.0])
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _green(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return (rgb[..., 1] - np.maximum(rgb[..., 0], rgb[..., 2])) > 60


def test_the_seg_overlays_the_lesion_on_its_source_slice(served: Served, page: Page, tmp_path: Path) -> None:
    seg = _dataset(served.served["seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == served.sources[0].SeriesInstanceUID
    masks = _seg_masks(seg)
    by_uid = {str(s.SOPInstanceUID): s for s in served.sources}
    assert set(masks) <= set(by_uid)
    lesion_uid = max(masks, key=lambda uid: masks[uid].sum())
    lesion_index = served.sources.index(by_uid[lesion_uid])
    healthy = served.sources[HEALTHY_SLICE]
    assert abs(lesion_index - LESION[0]) <= 2
    assert str(healthy.SOPInstanceUID) not in masks
    panels = [("lesion", by_uid[lesion_uid], masks[lesion_uid]),
              ("healthy", healthy, np.zeros((healthy.Rows, healthy.Columns), dtype=bool))]
    figures = "".join(
        f'<figure><img id="{name}" src="data:image/png;base64,{base64.b64encode(_overlay_png(ds, mask)).decode()}">'
        f"<figcaption>{name}: slice {served.sources.index(ds) + 1} of {len(served.sources)}, "
        f"SEG segment 1 in green</figcaption></figure>"
        for name, ds, mask in panels)
    page_path = tmp_path / "seg-overlay.html"
    page_path.write_text("<!doctype html><html><body style='background:#000;color:#ddd;display:flex'>"
                         f"{figures}</body></html>")
    page.goto(page_path.as_uri())
    shot = tmp_path / "viewer-seg-overlay.png"
    page.screenshot(path=str(shot), full_page=True)
    _keep(shot)
    drawn = {}
    for name, _, _ in panels:
        element = tmp_path / f"{name}.png"
        page.locator(f"#{name}").screenshot(path=str(element))
        drawn[name] = _green(Image.open(element))
    lesion_mask = masks[lesion_uid]
    assert drawn["lesion"].shape == lesion_mask.shape
    # What the browser shows green is the segment, on the lesion of the source slice.
    assert drawn["lesion"].sum() >= 0.9 * lesion_mask.sum() > 0
    assert not (drawn["lesion"] & ~ndimage.binary_dilation(lesion_mask)).any()
    rows, cols = np.nonzero(drawn["lesion"])
    assert np.hypot(rows - LESION[1], cols - LESION[2]).max() <= 2 * LESION_RADIUS
    hu = by_uid[lesion_uid].pixel_array.astype(float)
    assert hu[drawn["lesion"]].mean() > hu[ndimage.binary_dilation(drawn["lesion"], iterations=8)
                                           & ~drawn["lesion"]].mean()
    assert not drawn["healthy"].any()
