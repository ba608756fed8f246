"""File input/output: particle stacks, maps, and pose/CTF metadata of RELION, cryoDRGN and cryoSPARC.

All readers validate what they read and raise :class:`cryoformer.errors.InputError` naming the
file (and field) at fault; all writers are atomic (:mod:`cryoformer.io.atomic`). Conventions
for poses and CTF are those of docs/conventions.md (see :mod:`cryoformer.metadata`).
"""

from cryoformer.io.atomic import atomic_open, atomic_path
from cryoformer.io.cryodrgn import read_ctf_pkl, read_poses_pkl, write_ctf_pkl, write_poses_pkl
from cryoformer.io.cryosparc import cs_image_locations, ctf_from_cs, poses_from_cs, read_cs, write_cs
from cryoformer.io.dispatch import load_ctf, load_poses
from cryoformer.io.mrc import read_volume, read_volume_stack, write_volume
from cryoformer.io.pairing import (PairedMetadata, RowMatch, load_paired_metadata, match_metadata_rows,
                                   match_rows)
from cryoformer.io.particles import ImageSource, StackWriter, open_particles, write_stack
from cryoformer.io.safe_pickle import load_pickle, save_pickle
from cryoformer.io.star import (
    RelionStar,
    ctf_from_star,
    image_locations,
    poses_from_star,
    read_star,
    star_pixel_size,
    write_star,
)
from cryoformer.io.validate import check_ctf, check_one_pixel_size, check_rotations, scan_images

__all__ = [
    "atomic_open", "atomic_path",
    "load_pickle", "save_pickle",
    "read_poses_pkl", "write_poses_pkl", "read_ctf_pkl", "write_ctf_pkl",
    "RelionStar", "read_star", "poses_from_star", "ctf_from_star", "write_star", "image_locations",
    "star_pixel_size",
    "read_cs", "poses_from_cs", "ctf_from_cs", "write_cs", "cs_image_locations",
    "read_volume", "read_volume_stack", "write_volume",
    "ImageSource", "open_particles", "StackWriter", "write_stack",
    "load_poses", "load_ctf",
    "RowMatch", "match_rows", "match_metadata_rows", "PairedMetadata", "load_paired_metadata",
    "check_rotations", "check_ctf", "check_one_pixel_size", "scan_images",
]
