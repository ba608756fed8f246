"""Write the inputs of the reference data set (deterministic): a test volume, RELION STAR
files in the formats of RELION 3.0 / 3.1 / 5, and a cryoSPARC ``.cs`` file.

All files describe the same 20 particles (same Euler angles, origins in pixels, defoci,
astigmatism angles, phase shifts); the optics (voltage, Cs, amplitude contrast, pixel size)
differ between files as each format allows. ``truth.npz`` keeps the values used, so tests can
check parsers against the numbers that went in, not only against cryoDRGN.

Usage: python make_inputs.py OUTDIR
Needs numpy and mrcfile (and scipy for the axis-angle conversion).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import mrcfile
import numpy as np
from scipy.spatial.transform import Rotation

SEED = 20240611
N = 20
D = 32
APIX = 2.0


# --------------------------------------------------------------------------- volume
def make_volume() -> np.ndarray:
    """Asymmetric sum of Gaussian blobs, ``[z, y, x]``, centre voxel ``D//2``.

    Blob centres are given as (x, y, z) in pixels from the centre; all blobs lie well inside
    the sphere of radius D/2 so projections are not clipped by any renderer.
    """
    blobs = [
        # (x, y, z), sigma_px, amplitude
        ((0.0, 0.0, 0.0), 3.0, 1.0),
        ((6.0, -2.0, 1.0), 2.0, 0.9),
        ((-4.0, 5.0, -3.0), 1.7, 0.8),
        ((1.0, -7.0, 4.0), 1.5, 0.6),
        ((-2.0, 1.0, 8.0), 2.2, 0.5),
        ((3.0, 4.0, -6.0), 1.6, 0.7),
    ]
    c = np.arange(D, dtype=np.float64) - D // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((D, D, D), dtype=np.float64)
    for (bx, by, bz), sigma, amp in blobs:
        r2 = (x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2
        vol += amp * np.exp(-r2 / (2.0 * sigma**2))
    return vol.astype(np.float32)


# --------------------------------------------------------------------------- particles
def make_particles(rng: np.random.Generator) -> dict:
    rot = rng.uniform(-180.0, 180.0, N)
    tilt = np.degrees(np.arccos(rng.uniform(-1.0, 1.0, N)))
    psi = rng.uniform(-180.0, 180.0, N)
    origin_px = rng.uniform(-3.0, 3.0, (N, 2))
    dfu = rng.uniform(8000.0, 25000.0, N)
    dfv = dfu - rng.uniform(200.0, 4000.0, N)
    dfang = rng.uniform(-180.0, 180.0, N)
    phase = rng.uniform(0.0, 120.0, N)
    # per-particle optics for the RELION 3.0 file (3.0 has no optics groups)
    kv30 = rng.choice([200.0, 300.0], N)
    cs30 = rng.choice([0.01, 1.4, 2.7], N)
    w30 = rng.choice([0.07, 0.1], N)
    # optics group of each particle in the two-group file
    group2 = np.where(rng.uniform(size=N) < 0.5, 1, 2)
    group2[:2] = (1, 2)  # both groups are used whatever the seed
    bfac = rng.uniform(0.0, 150.0, N)
    coords = rng.uniform(100.0, 3900.0, (N, 2))
    mic = rng.integers(1, 4, N)
    return dict(
        rot=rot, tilt=tilt, psi=psi, origin_px=origin_px, dfu=dfu, dfv=dfv, dfang=dfang,
        phase=phase, kv30=kv30, cs30=cs30, w30=w30, group2=group2, bfac=bfac,
        coords=coords, mic=mic,
    )


# --------------------------------------------------------------------------- STAR writing
def _fmt(v) -> str:
    """A value as RELION 3.1 writes it (checked against relion_star_handler's output):
    integers and floats right-aligned in 12 characters, floats with 6 decimals, or 5 when
    negative (so that the sign fits)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)):
        return f"{int(v):12d}"
    v = float(v)
    return f"{v:12.5f}" if v < 0 else f"{v:12.6f}"


def star_block(name: str, columns: list[str], rows: list[list], version: str | None) -> str:
    out = []
    if version is not None:
        out += ["", f"# version {version}", ""]
    else:
        out += [""]
    out += [f"data_{name}", "", "loop_ "]
    out += [f"_{c} #{i + 1} " for i, c in enumerate(columns)]
    for row in rows:
        out.append(" ".join(_fmt(v) for v in row) + " ")
    out += [" ", ""]
    return "\n".join(out)


def image_name(i: int) -> str:
    return f"{i + 1:06d}@Extract/job007/particles_D32.mrcs"


def mic_name(m: int) -> str:
    return f"MotionCorr/job002/Movies/mic_{m:03d}.mrc"


def relion30(p: dict) -> str:
    """RELION 3.0: one ``data_`` block, origins in pixels, pixel size from detector/mag."""
    cols = [
        "rlnCoordinateX", "rlnCoordinateY", "rlnImageName", "rlnMicrographName",
        "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
        "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMagnification",
        "rlnDetectorPixelSize", "rlnCtfFigureOfMerit", "rlnPhaseShift", "rlnCtfBfactor",
        "rlnCtfScalefactor", "rlnGroupNumber", "rlnAngleRot", "rlnAngleTilt",
        "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnClassNumber", "rlnNormCorrection",
        "rlnRandomSubset", "rlnLogLikeliContribution", "rlnMaxValueProbDistribution",
        "rlnNrOfSignificantSamples",
    ]
    rows = []
    for i in range(N):
        rows.append([
            p["coords"][i, 0], p["coords"][i, 1], image_name(i), mic_name(p["mic"][i]),
            p["dfu"][i], p["dfv"][i], p["dfang"][i], p["kv30"][i], p["cs30"][i],
            p["w30"][i], 25000.0, 5.0, 0.12, p["phase"][i], 0.0, 1.0, int(p["mic"][i]),
            p["rot"][i], p["tilt"][i], p["psi"][i], p["origin_px"][i, 0],
            p["origin_px"][i, 1], 1, 1.0, i % 2 + 1, 51234.5, 0.85, 1,
        ])
    return star_block("", cols, rows, version=None)


OPTICS31 = [
    "rlnOpticsGroupName", "rlnOpticsGroup", "rlnMtfFileName",
    "rlnMicrographOriginalPixelSize", "rlnVoltage", "rlnSphericalAberration",
    "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality",
]

PARTICLES31 = [
    "rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber", "rlnAutopickFigureOfMerit",
    "rlnImageName", "rlnMicrographName", "rlnOpticsGroup", "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor",
    "rlnCtfScalefactor", "rlnPhaseShift", "rlnGroupNumber", "rlnAngleRot", "rlnAngleTilt",
    "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnNormCorrection",
    "rlnLogLikeliContribution", "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples",
    "rlnRandomSubset",
]


def particle_rows31(p: dict, group: np.ndarray, apix_of_group: dict, bfac=None) -> list:
    rows = []
    for i in range(N):
        g = int(group[i])
        a = apix_of_group[g]
        rows.append([
            p["coords"][i, 0], p["coords"][i, 1], 1, 0.45, image_name(i),
            mic_name(p["mic"][i]), g, 4.1, 0.12, p["dfu"][i], p["dfv"][i], p["dfang"][i],
            0.0 if bfac is None else bfac[i], 1.0, p["phase"][i], int(p["mic"][i]),
            p["rot"][i], p["tilt"][i], p["psi"][i], p["origin_px"][i, 0] * a,
            p["origin_px"][i, 1] * a, 1.0, 51234.5, 0.85, 1, i % 2 + 1,
        ])
    return rows


def relion31(p: dict, particles_first: bool = False) -> str:
    optics = star_block(
        "optics", OPTICS31,
        [["opticsGroup1", 1, "mtf_k3_300kV.star", 1.0, 300.0, 2.7, 0.1, APIX, D, 2]],
        version="30001",
    )
    group = np.ones(N, dtype=int)
    parts = star_block("particles", PARTICLES31, particle_rows31(p, group, {1: APIX}),
                       version="30001")
    return parts + optics if particles_first else optics + parts


OPTICS_TWO = {
    1: dict(name="opticsGroup1", mtf="mtf_k3_300kV.star", orig=1.0, kv=300.0, cs=2.7,
            w=0.1, apix=2.0),
    2: dict(name="opticsGroup2", mtf="mtf_falcon4_200kV.star", orig=0.8, kv=200.0, cs=1.4,
            w=0.07, apix=1.6),
}


def relion31_two_optics(p: dict) -> str:
    rows = [[o["name"], g, o["mtf"], o["orig"], o["kv"], o["cs"], o["w"], o["apix"], D, 2]
            for g, o in OPTICS_TWO.items()]
    optics = star_block("optics", OPTICS31, rows, version="30001")
    apix = {g: o["apix"] for g, o in OPTICS_TWO.items()}
    parts = star_block("particles", PARTICLES31, particle_rows31(p, p["group2"], apix),
                       version="30001")
    return optics + parts


RELION5_APIX = 1.8


def relion5(p: dict) -> str:
    """RELION 5 style: ``# version 50001``, premultiplied flag, extra columns, B-factors."""
    optics_cols = OPTICS31 + ["rlnCtfDataAreCtfPremultiplied"]
    optics = star_block(
        "optics", optics_cols,
        [["opticsGroup1", 1, "mtf_k3_CDS_300kV_FL2.star", 0.9, 300.0, 2.7, 0.07,
          RELION5_APIX, D, 2, 0]],
        version="50001",
    )
    # Prior columns whose names start like the real ones catch parsers that match prefixes.
    cols = PARTICLES31 + [
        "rlnAngleRotPrior", "rlnAngleTiltPrior", "rlnAnglePsiPrior", "rlnOriginXPriorAngst",
        "rlnOriginYPriorAngst", "rlnImageOriginalName",
    ]
    rows = particle_rows31(p, np.ones(N, dtype=int), {1: RELION5_APIX}, bfac=p["bfac"])
    for i, row in enumerate(rows):
        row += [-95.5, 22.9, -69.4, 1.25, -0.75,
                f"{i + 1:06d}@Extract/job005/Movies/mic_orig.mrcs"]
    parts = star_block("particles", cols, rows, version="50001")
    return optics + parts


# --------------------------------------------------------------------------- cryoSPARC
CS_DTYPE = [
    ("uid", "<u8"),
    ("blob/path", "S40"),
    ("blob/idx", "<u4"),
    ("blob/shape", "<u4", (2,)),
    ("blob/psize_A", "<f4"),
    ("blob/sign", "<f4"),
    ("blob/import_sig", "<u8"),
    ("ctf/type", "S9"),
    ("ctf/exp_group_id", "<u4"),
    ("ctf/accel_kv", "<f4"),
    ("ctf/cs_mm", "<f4"),
    ("ctf/amp_contrast", "<f4"),
    ("ctf/df1_A", "<f4"),
    ("ctf/df2_A", "<f4"),
    ("ctf/df_angle_rad", "<f4"),
    ("ctf/phase_shift_rad", "<f4"),
    ("ctf/scale", "<f4"),
    ("ctf/scale_const", "<f4"),
    ("ctf/shift_A", "<f4", (2,)),
    ("ctf/tilt_A", "<f4", (2,)),
    ("ctf/trefoil_A", "<f4", (2,)),
    ("ctf/tetra_A", "<f4", (4,)),
    ("ctf/anisomag", "<f4", (4,)),
    ("ctf/bfactor", "<f4"),
    ("alignments3D/split", "<u4"),
    ("alignments3D/shift", "<f4", (2,)),
    ("alignments3D/pose", "<f4", (3,)),
    ("alignments3D/psize_A", "<f4"),
    ("alignments3D/error", "<f4"),
    ("alignments3D/error_min", "<f4"),
    ("alignments3D/resid_pow", "<f4"),
    ("alignments3D/slice_pow", "<f4"),
    ("alignments3D/image_pow", "<f4"),
    ("alignments3D/cross_cor", "<f4"),
    ("alignments3D/alpha", "<f4"),
    ("alignments3D/alpha_min", "<f4"),
    ("alignments3D/weight", "<f4"),
    ("alignments3D/pose_ess", "<f4"),
    ("alignments3D/shift_ess", "<f4"),
    ("alignments3D/class_posterior", "<f4"),
    ("alignments3D/class", "<u4"),
    ("alignments3D/class_ess", "<f4"),
]

CS_OPTICS = dict(kv=300.0, cs=2.7, w=0.1)


def relion_matrices(rot, tilt, psi) -> np.ndarray:
    """RELION's Euler_angles2matrix (ZYZ), written out element by element."""
    a, b, g = np.radians(rot), np.radians(tilt), np.radians(psi)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty((len(a), 3, 3))
    A[:, 0, 0] = cg * cc - sg * sa
    A[:, 0, 1] = cg * cs + sg * ca
    A[:, 0, 2] = -cg * sb
    A[:, 1, 0] = -sg * cc - cg * sa
    A[:, 1, 1] = -sg * cs + cg * ca
    A[:, 1, 2] = sg * sb
    A[:, 2, 0] = sc
    A[:, 2, 1] = ss
    A[:, 2, 2] = cb
    return A


def cryosparc_bytes(p: dict, rng: np.random.Generator) -> bytes:
    arr = np.zeros(N, dtype=CS_DTYPE)
    R = relion_matrices(p["rot"], p["tilt"], p["psi"])
    # cryoDRGN's parse_pose_csparc gives R = expmap(pose)^T, so pose = log(R^T).
    pose = Rotation.from_matrix(np.transpose(R, (0, 2, 1))).as_rotvec()
    arr["uid"] = rng.integers(1, 2**63 - 1, N, dtype=np.int64).astype(np.uint64)
    arr["blob/path"] = b"J12/imported/particles_D32.mrcs"
    arr["blob/idx"] = np.arange(N)
    arr["blob/shape"] = (D, D)
    arr["blob/psize_A"] = APIX
    arr["blob/sign"] = 1.0
    arr["blob/import_sig"] = 1234567890123456789
    arr["ctf/type"] = b"imported"
    arr["ctf/exp_group_id"] = 1
    arr["ctf/accel_kv"] = CS_OPTICS["kv"]
    arr["ctf/cs_mm"] = CS_OPTICS["cs"]
    arr["ctf/amp_contrast"] = CS_OPTICS["w"]
    arr["ctf/df1_A"] = p["dfu"]
    arr["ctf/df2_A"] = p["dfv"]
    arr["ctf/df_angle_rad"] = np.radians(p["dfang"])
    arr["ctf/phase_shift_rad"] = np.radians(p["phase"])
    arr["ctf/scale"] = 1.0
    arr["ctf/scale_const"] = 0.0
    arr["ctf/bfactor"] = p["bfac"]
    arr["alignments3D/split"] = np.arange(N) % 2
    arr["alignments3D/shift"] = p["origin_px"]
    arr["alignments3D/pose"] = pose
    arr["alignments3D/psize_A"] = APIX
    arr["alignments3D/error"] = 21034.5
    arr["alignments3D/error_min"] = 21030.1
    arr["alignments3D/resid_pow"] = 20998.0
    arr["alignments3D/slice_pow"] = 36.4
    arr["alignments3D/image_pow"] = 21010.2
    arr["alignments3D/cross_cor"] = 48.1
    arr["alignments3D/alpha"] = 1.0
    arr["alignments3D/alpha_min"] = 0.0
    arr["alignments3D/weight"] = 1.0
    arr["alignments3D/pose_ess"] = 1.0
    arr["alignments3D/shift_ess"] = 1.0
    arr["alignments3D/class_posterior"] = 1.0
    arr["alignments3D/class"] = 0
    arr["alignments3D/class_ess"] = 1.0
    buf = io.BytesIO()
    np.save(buf, arr)  # cryoSPARC .cs files are np.save'd structured arrays
    return buf.getvalue()


# --------------------------------------------------------------------------- main
def main(outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    vol = make_volume()
    with mrcfile.new(out / "volume_D32.mrc", overwrite=True) as mrc:
        mrc.set_data(vol)
        mrc.voxel_size = APIX
        mrc.header.label[0] = b"cryoformer reference volume (scripts/reference/make_inputs.py)"  # no timestamp: stable bytes

    p = make_particles(rng)
    files = {
        "relion30.star": relion30(p),
        "relion31.star": relion31(p),
        "relion31_particles_first.star": relion31(p, particles_first=True),
        "relion31_two_optics.star": relion31_two_optics(p),
        "relion5.star": relion5(p),
    }
    for name, text in files.items():
        (out / name).write_text(text)
    (out / "cryosparc.cs").write_bytes(cryosparc_bytes(p, rng))

    R = relion_matrices(p["rot"], p["tilt"], p["psi"])
    np.savez(
        out / "truth.npz",
        rotations=R.astype(np.float64),
        euler_deg=np.stack([p["rot"], p["tilt"], p["psi"]], 1),
        shifts_px=p["origin_px"],
        defocus_u=p["dfu"], defocus_v=p["dfv"], astigmatism_angle_deg=p["dfang"],
        phase_shift_deg=p["phase"], voltage30=p["kv30"], cs30=p["cs30"], w30=p["w30"],
        group_two_optics=p["group2"], bfactor_relion5=p["bfac"],
        box_size=D, pixel_size=APIX, pixel_size_relion5=RELION5_APIX,
    )
    print(f"wrote inputs to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/reference")
