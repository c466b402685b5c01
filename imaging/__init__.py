"""headscreen imaging: torch-free image code shared by the daemon and the training package."""

from imaging.phantoms import Lesion, Phantom, Pose, make_head
from imaging.preprocess import ModelGrid, Preprocessed, default_params, preprocess, to_native
from imaging.volume import Volume

__all__ = [
    "Lesion", "ModelGrid", "Phantom", "Pose", "Preprocessed", "Volume",
    "default_params", "make_head", "preprocess", "to_native",
]
