"""``cryoformer downsample``: Fourier-crop a particle stack to a smaller box, in chunks."""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from cryoformer.errors import InputError
from cryoformer.io.guard import claim_output_file
from cryoformer.io.particles import StackWriter, open_particles
from cryoformer.physics.fourier import fourier_crop


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "downsample",
        help="downsample particle images by Fourier cropping (chunked; stacks larger than RAM work)",
        description=(
            "Crop the centred Fourier transform of every image to D×D and transform back. The pixel "
            "size grows by old_D/D; pixel values keep their mean (a constant image stays constant). "
            "Images are read memory-mapped and written in chunks."
        ),
    )
    p.add_argument("input", help="particles: .mrcs/.mrc, .txt list of stacks, RELION .star or cryoSPARC .cs")
    p.add_argument("-D", type=int, required=True, dest="box", help="new box size in pixels (even)")
    p.add_argument("--datadir", help="directory to find the stacks named in a .star/.cs")
    p.add_argument("-b", "--chunk-size", type=int, default=1000, help="images per chunk (default 1000)")
    p.add_argument("-o", "--out", required=True, help="output stack (.mrcs)")
    return p


def run(args) -> int:
    if args.box % 2 or args.box < 2:
        raise InputError(None, "-D", f"new box size must be even and >= 2, got {args.box}")
    if args.chunk_size < 1:
        raise InputError(None, "--chunk-size", f"must be a positive number of images, got {args.chunk_size}")
    source = open_particles(args.input, datadir=args.datadir)
    # The stacks a .star/.cs/.txt names are inputs too: `-o` must not land on one of them.
    claim_output_file(args.out, [args.input] + list(source.files), args.force, option="-o")
    D = source.box_size
    if args.box > D:
        raise InputError(args.input, "box size", f"images are {D}×{D}; cannot downsample to {args.box}")
    apix = source.pixel_size_angstrom * D / args.box
    n = len(source)
    with StackWriter(args.out, n, args.box, apix) as writer:
        # disable=None: a bar on a terminal only, not in logs and pipes
        with tqdm(total=n, desc="downsample", unit="img", disable=None) as bar:
            for start, chunk in source.chunks(args.chunk_size):
                small = fourier_crop(torch.from_numpy(chunk), args.box)  # [n, box, box]
                writer.write(small.numpy(), start)
                bar.update(chunk.shape[0])
    print(f"wrote {n} images {D}→{args.box} px ({apix:.4g} Å/px) to {args.out}")
    return 0
