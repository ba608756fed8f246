"""cryoformer-widgets: the interactive layer (Jupyter widgets, napari plugin) over cryoformer.

Jupyter (``pip install 'cryoformer-widgets[jupyter]'``)
    ``LatentExplorer(run_dir)``: every particle's latent (PCs, UMAP or latent dimensions) with
    zoom, pan and density, coloured by clusters or any per-particle value (defocus, angles,
    pose change, …); K-means centres, lasso/box selection and export, volumes decoded on
    demand (slices and isosurface), PC traversal.
    ``TrajectoryView(run_dir, clusters=(a, b))``: the maps along a path between two clusters,
    particles or latents, played as WebGL surfaces and exported as ``cryoformer traverse`` does;
    ``VolumeView(volume)``: one map as a surface.
    ``PoseRefinementView(run_dir)``: input vs refined vs true poses per epoch (paper Fig. 6).
Without a GUI
    ``RunSession`` (alias ``ExplorerState``): the one run session both front ends show (latents,
    PCA, K-means, selection, decoding); ``ParticleMetadata``: per-particle values read from
    the run's metadata; ``DecodeWorker`` / ``VolumeCache`` (background decoding
    with an LRU cache), ``PoseHistory`` (poses and errors across epochs).
napari
    The plugin is found through the ``napari.manifest`` entry point (``napari.yaml``): the run
    explorer dock, the latent-space dock, an MRC reader/writer and sample data.

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
    "ParticleMetadata": "particle_values",
    "TrajectoryView": "trajectory_view",
    "VolumeView": "trajectory_view",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
