"""Overlay previews: a Secondary Capture result rendered to PNG on request."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
from fastapi import HTTPException
from PIL import Image

from headscreen.daemon.blobstore import open_store
from headscreen.daemon.web.context import WebContext
from headscreen.db import api
from headscreen.db.types import StudyDetail
from headscreen.errors import TransientError

logger = logging.getLogger(__name__)

MAX_PREVIEWS = 6


def sc_objects(ctx: WebContext, detail: StudyDetail) -> list[tuple[int, str]]:
    """(result id, SOP Instance UID) of the SC overlays of the current results, a few spread evenly."""
    out: list[tuple[int, str]] = []
    with ctx.db() as session:
        for result in detail.results:
            if result.superseded:
                continue
            scs = [o for o in api.get_result_objects(session, result.result_id) if o.kind == "sc"]
            step = max(1, len(scs) // MAX_PREVIEWS)
            out.extend((result.result_id, o.sop_instance_uid) for o in scs[::step][:MAX_PREVIEWS])
    return out


def _resolve(ctx: WebContext, stored: str) -> Path:
    path = Path(stored)
    if not path.is_absolute():
        path = ctx.settings.storage_dir / path
    path = path.resolve()
    root = Path(ctx.settings.storage_dir).resolve()
    if not path.is_relative_to(root):
        # Result paths come from our own workers; one outside storage is refused, not served.
        raise HTTPException(status_code=404, detail="no such preview")
    return path


def _source(ctx: WebContext, stored: str) -> Path | io.BytesIO:
    """The stored result object: its file, or its bytes from the database (postgresql
    backend: a result another machine produced is previewed all the same)."""
    store = open_store(ctx.settings, ctx.sessions)
    if not store.in_database:
        return _resolve(ctx, stored)
    return io.BytesIO(store.read_bytes(stored))


def render_png(ctx: WebContext, detail: StudyDetail, sop_uid: str, max_size: int = 512) -> bytes:
    result_ids = {r.result_id for r in detail.results}
    with ctx.db() as session:
        found = [o for rid in result_ids for o in api.get_result_objects(session, rid)
                 if o.sop_instance_uid == sop_uid and o.kind == "sc"]
    if not found:
        raise HTTPException(status_code=404, detail="no such preview")
    try:
        dataset = pydicom.dcmread(_source(ctx, found[0].path))
        pixels = dataset.pixel_array
    except (OSError, ValueError, AttributeError, TransientError) as exc:
        logger.warning("preview unreadable", extra={"action": "preview_failed", "sop_uid": sop_uid,
                                                    "error": type(exc).__name__})
        raise HTTPException(status_code=404, detail="preview unavailable") from None
    image = _to_image(np.asarray(pixels), str(dataset.get("PhotometricInterpretation", "")))
    image.thumbnail((max_size, max_size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _to_image(pixels: np.ndarray, photometric: str) -> Image.Image:
    if pixels.ndim == 4 or (pixels.ndim == 3 and photometric not in ("RGB", "YBR_FULL")):
        pixels = pixels[len(pixels) // 2]  # multi-frame: the middle frame
    if pixels.ndim == 3:
        return Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low or 1.0) * 255.0
    if photometric == "MONOCHROME1":
        scaled = 255.0 - scaled
    return Image.fromarray(scaled.astype(np.uint8), mode="L")
