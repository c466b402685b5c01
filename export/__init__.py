"""headscreen export: DICOM result objects (SC overlays, SEG, TID 1500 SR) and their delivery."""

from headscreen.export.delivery import Destination, send, send_stow
from headscreen.export.model import AlgorithmInfo, ResultSummary
from headscreen.export.sc import OverlayStyle, build_overlay_series
from headscreen.export.seg import build_segmentation
from headscreen.export.sr import build_report

__all__ = [
    "AlgorithmInfo",
    "Destination",
    "OverlayStyle",
    "ResultSummary",
    "build_overlay_series",
    "build_segmentation",
    "build_report",
    "send",
    "send_stow",
]
