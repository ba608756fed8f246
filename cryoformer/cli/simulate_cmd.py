"""``cryoformer simulate``: a particle dataset with ground truth."""

from __future__ import annotations

import argparse
import math

from cryoformer.errors import InputError
from cryoformer.io.guard import claim_output_dir
from cryoformer.simulation import sources
from cryoformer.simulation.simulate import CONTRASTS, CtfRanges, SimulationConfig, simulate_dataset

# The library's defaults are the command's: each is declared once, on the config.
_SIM = SimulationConfig()
_CTF = CtfRanges()


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "simulate",
        help="simulate particles with ground truth from maps, atomic models, a trajectory or the embedded molecule",
        description=(
            "Simulate a heterogeneous particle dataset. State maps come from --volumes, "
            "--atomic-model, --trajectory, or (default) the embedded hinged molecule. Writes "
            "particles.mrcs, poses.pkl and ctf.pkl (cryoDRGN), particles.star (RELION 3.1), "
            "gt/ (state label per particle, state maps, poses, motion map) and simulation.json."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--volumes", nargs="+", metavar="MRC", help="one .mrc map per state")
    src.add_argument("--atomic-model", nargs="+", metavar="PDB",
                     help="PDB/mmCIF files, one per state (or one multi-model file)")
    src.add_argument("--trajectory", nargs="+", metavar="FILE",
                     help="TOPOLOGY [TRAJECTORY] read with MDAnalysis (pip install 'cryoformer[sim]')")
    p.add_argument("-o", "--outdir", required=True, help="output directory")
    p.add_argument("-n", "--n-particles", type=int, default=_SIM.n_particles, help="number of images (default %(default)s)")
    p.add_argument("-D", "--box", type=int, default=64,
                   help="box size in pixels for atomic models, trajectory and the embedded molecule (default 64)")
    p.add_argument("--Apix", type=float, default=3.0,
                   help="pixel size in Å/px for atomic models, trajectory and the embedded molecule (default 3.0)")
    p.add_argument("--n-states", type=int, default=10,
                   help="states sampled from a trajectory / the embedded molecule (default 10)")
    p.add_argument("--hinges", type=int, choices=(1, 2), default=1,
                   help="embedded molecule only: 1 arm, or 2 arms on independent hinges (writes "
                        "gt/motion_domain_0.mrc and _1.mrc, each arm's own motion) (default 1)")
    p.add_argument("--selection", default="protein and not name H*", help="MDAnalysis atom selection")
    p.add_argument("--bfactor", type=float, default=20.0, help="B-factor in Å² for atomic densities (default 20)")
    p.add_argument("--snr", type=float, default=_SIM.snr,
                   help="signal-to-noise ratio = var(signal in particle)/var(noise) (default %(default)s; 'inf' = noise-free)")
    p.add_argument("--shift-range", type=float, default=_SIM.shift_range_px,
                   help="max |shift| per axis in pixels (default %(default)s)")
    p.add_argument("--no-ctf", action="store_true", help="do not apply a CTF")
    p.add_argument("--defocus-min", type=float, default=_CTF.defocus_min_angstrom,
                   help="min defocus in Å (default %(default)s)")
    p.add_argument("--defocus-max", type=float, default=_CTF.defocus_max_angstrom,
                   help="max defocus in Å (default %(default)s)")
    p.add_argument("--astigmatism-max", type=float, default=_CTF.astigmatism_max_angstrom,
                   help="max defocus U−V in Å (default %(default)s)")
    p.add_argument("--kv", type=float, default=_CTF.voltage_kv, help="voltage in kV (default %(default)s)")
    p.add_argument("--cs", type=float, default=_CTF.spherical_aberration_mm,
                   help="spherical aberration in mm (default %(default)s)")
    p.add_argument("-w", type=float, default=_CTF.amplitude_contrast,
                   help="amplitude contrast ratio (default %(default)s)")
    p.add_argument("--ps", type=float, default=_CTF.phase_shift_deg, help="phase shift in degrees (default %(default)s)")
    p.add_argument("--contrast", choices=CONTRASTS, default=_SIM.contrast,
                   help="relion: images = −(projection⊛CTF) like real RELION particles (default); "
                        "cryodrgn: images = projection⊛CTF")
    p.add_argument("--seed", type=int, default=_SIM.seed, help="random seed (default %(default)s)")
    p.add_argument("--chunk-size", type=int, default=_SIM.chunk_size,
                   help="images generated per step (default %(default)s)")
    return p


def config_from_args(args):
    """Frozen SimulationConfig from the parsed command line."""
    snr = None if math.isinf(args.snr) else args.snr
    ctf = None if args.no_ctf else CtfRanges(
        args.defocus_min, args.defocus_max, args.astigmatism_max, args.kv, args.cs, args.w, args.ps
    )
    try:
        return SimulationConfig(
            n_particles=args.n_particles, snr=snr, shift_range_px=args.shift_range, ctf=ctf,
            contrast=args.contrast, seed=args.seed, chunk_size=args.chunk_size,
        )
    except ValueError as err:
        raise InputError(None, "arguments", str(err)) from None


def state_maps_from_args(args):
    """The StateMaps chosen by the source options."""
    if args.volumes:
        return sources.maps_from_volumes(args.volumes)
    if args.atomic_model:
        return sources.maps_from_atomic_models(args.atomic_model, args.box, args.Apix, args.bfactor)
    if args.trajectory:
        if len(args.trajectory) > 2:
            raise InputError(None, "--trajectory", "expected TOPOLOGY [TRAJECTORY]")
        traj = args.trajectory[1] if len(args.trajectory) == 2 else None
        return sources.maps_from_trajectory(args.trajectory[0], traj, args.n_states, args.box, args.Apix,
                                            args.selection, args.bfactor)
    return sources.maps_from_hinged_molecule(args.n_states, args.box, args.Apix, getattr(args, "hinges", 1))


def run(args) -> int:
    inputs = list(args.volumes or []) + list(args.atomic_model or []) + list(args.trajectory or [])
    claim_output_dir(args.outdir, inputs, args.force, option="-o")
    config = config_from_args(args)
    maps = state_maps_from_args(args)
    result = simulate_dataset(maps.volumes, maps.pixel_size_angstrom, config, args.outdir,
                              motion_map=maps.motion_map, source_description=maps.description,
                              domain_motion_maps=maps.domain_motion_maps)
    snr = "noise-free" if result.measured_snr is None else f"measured SNR {result.measured_snr:.4g}"
    print(f"wrote {config.n_particles} particles ({maps.volumes.shape[0]} states, "
          f"D={maps.volumes.shape[-1]}, {maps.pixel_size_angstrom:g} Å/px, {snr}) to {args.outdir}")
    return 0
