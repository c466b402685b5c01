"""headscreen imaging: torch-free image code shared by the daemon and the training package.

`imaging.preprocess` stays the module (call `imaging.preprocess.preprocess(volume, params)`);
re-exporting the function under the same name would hide the module.
"""

from imaging import preprocess
from imaging.phantoms import Lesion, Phantom, Pose, make_head
from imaging.preprocess import ModelGrid, Preprocessed, default_params, to_native
from imaging.volume import Volume

__all__ = [
    "Lesion", "ModelGrid", "Phantom", "Pose", "Preprocessed", "Volume",
    "default_params", "make_head", "preprocess", "to_native",
]
