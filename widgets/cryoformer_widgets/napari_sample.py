"""Sample data of the napari plugin (npe2 ``sample_data``: File → Open Sample → cryoformer).

The embedded hinged molecule of :mod:`cryoformer.simulation.hinged` (the molecule of
``cryoformer simulate`` and of the tutorials' example dataset), rendered without any training,
download or dataset, and shown the way the Run explorer shows a decoded latent: the density, an
overlay inside the molecule, and the isosurface coloured by that overlay (paper Fig. 5). The
overlay is the ground-truth motion of each voxel when the arm swings through its whole range
(:func:`cryoformer.simulation.hinged.motion_map`, Å), i.e. what a flexible-region map of a
trained run should find: 0 on the body, up to the arm tip's chord on the arm.

The layers come from :mod:`.napari_layers`, so the sample shows exactly what a real run looks
like in the dock. A few seconds on one core (most of it importing the simulator).
"""

from __future__ import annotations

from typing import List

import numpy as np

from cryoformer.simulation.hinged import hinged_molecule_volume, motion_map

from .napari_layers import (SURFACE_NAME, VOLUME_NAME, DecodedLatent, LayerData, default_iso_level,
                            isosurface, latent_layers)

__all__ = ["hinged_example", "hinged_sample_layers", "SAMPLE_BOX_PX", "SAMPLE_PIXEL_SIZE_ANGSTROM",
           "SAMPLE_STATE", "MOTION_CHANNEL"]

SAMPLE_BOX_PX = 48                 # small enough to render in well under a second
SAMPLE_PIXEL_SIZE_ANGSTROM = 4.0   # the molecule fills 60 % of the 192 Å box
SAMPLE_STATE = 0.5                 # hinge half open: the arm's motion goes both ways from here
MOTION_CHANNEL = "arm_motion_angstrom"
_LABEL = "hinged molecule example (simulated, no training)"


def hinged_example(box_px: int = SAMPLE_BOX_PX,
                   pixel_size_angstrom: float = SAMPLE_PIXEL_SIZE_ANGSTROM) -> DecodedLatent:
    """The hinged molecule at :data:`SAMPLE_STATE` as a :class:`DecodedLatent`.

    Parameters
    ----------
    box_px : int
        Box edge ``D`` in voxels (even).
    pixel_size_angstrom : float
        Voxel edge in Å.

    Returns
    -------
    DecodedLatent
        ``volume`` ``[D, D, D]`` (Å⁻² potential), one channel :data:`MOTION_CHANNEL`
        ``[1, D, D, D]`` (Å of displacement between the closed and the open arm), the
        isosurface at Otsu's level; ``latent`` is empty (nothing was decoded).
    """
    if box_px < 8 or box_px % 2:
        raise ValueError(f"box_px must be even and >= 8, got {box_px}")
    if not pixel_size_angstrom > 0:
        raise ValueError(f"pixel_size_angstrom must be positive, got {pixel_size_angstrom}")
    volume = hinged_molecule_volume(SAMPLE_STATE, box_px, pixel_size_angstrom)       # [D, D, D]
    motion = motion_map(box_px, pixel_size_angstrom).astype(np.float32)[None]         # [1, D, D, D]
    level = default_iso_level(volume)
    vertices, faces = isosurface(volume, level)
    return DecodedLatent(np.zeros(0, np.float32), volume, motion, (MOTION_CHANNEL,), float(pixel_size_angstrom),
                         "angstrom", level, vertices, faces, _LABEL)


def hinged_sample_layers() -> List[LayerData]:
    """npe2 sample-data command: the density (isosurface rendering), the arm-motion overlay
    inside the molecule and the surface coloured by it, as napari layer data.

    Returns
    -------
    list of (data, kwargs, layer_type)
        Layers named ``"cryoformer volume"``, ``"attention arm_motion_angstrom"`` and
        ``"cryoformer surface"``, all at 4 Å per voxel (``units="angstrom"``).
    """
    layers = latent_layers(hinged_example(), surface_channel=MOTION_CHANNEL)
    for _data, kwargs, _kind in layers:
        if kwargs["name"] in (VOLUME_NAME, SURFACE_NAME):
            continue
        kwargs["metadata"]["cryoformer"]["unit_of_values"] = "angstrom"
    return layers
