"""cryoformer-widgets: the interactive layer (Jupyter widgets, napari plugin) over cryoformer.

Jupyter (``pip install 'cryoformer-widgets[jupyter]'``)
    ``LatentExplorer(run_dir)``: PCA scatter of the latents, K-means centres, lasso/box
    selection and export, volumes decoded on demand (slices and isosurface), PC traversal.
    ``PoseRefinementView(run_dir)``: input vs refined vs true poses per epoch (paper Fig. 6).
Without a GUI
    ``RunSession`` (alias ``ExplorerState``): the one run session both front ends show (latents,
    PCA, K-means, selection, decoding); ``DecodeWorker`` / ``VolumeCache`` (background decoding
    with an LRU cache), ``PoseHistory`` (poses and errors across epochs).
napari
    The plugin is found through the ``napari.manifest`` entry point (``napari.yaml``).

Names are imported on first use, so ``import cryoformer_widgets`` needs neither Jupyter nor
napari/Qt.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "LatentExplorer": "latent_explorer",
    "PoseRefinementView": "pose_view",
    "RunSession": "session",
    "ExplorerState": "session",
    "DecodeWorker": "decode_worker",
    "VolumeCache": "decode_worker",
    "PoseHistory": "pose_data",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
