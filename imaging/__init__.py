"""headscreen imaging: torch-free image code shared by the daemon and the training package.

`imaging.preprocess` stays the module (call `imaging.preprocess.preprocess(volume, params)`);
re-exporting the function under the same name would hide the module.
"""

from headscreen.imaging import preprocess
from headscreen.imaging.phantoms import Lesion, Phantom, Pose, make_head, write_dicom_series
from headscreen.imaging.preprocess import ModelGrid, Preprocessed, default_params, to_native
from headscreen.imaging.selection import Preference, Selection, SelectionRules, SeriesCandidate, Verdict, select_series
from headscreen.imaging.volume import SeriesRejected, Volume, load_series

__all__ = [
    "Lesion", "ModelGrid", "Phantom", "Pose", "Preference", "Preprocessed", "Selection", "SelectionRules",
    "SeriesCandidate", "SeriesRejected", "Verdict", "Volume",
    "default_params", "load_series", "make_head", "preprocess", "select_series",
    "to_native", "write_dicom_series",
]
