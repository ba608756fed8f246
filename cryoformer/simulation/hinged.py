"""The embedded default test object: a procedurally generated two-domain hinged molecule.

No download, deterministic given a seed. A rigid *body* (an ellipsoid with an off-axis knob, so
no pose is ambiguous) carries an *arm* (a cylinder ending in an off-centre "hand") attached at a
hinge on the body surface. The motion parameter ``t ∈ [0, 1]`` rotates the arm rigidly about
a fixed hinge axis through the pivot by ``θ(t) = θ₀ + t·(θ₁ − θ₀)`` (default 0 → 45°); the body
never moves. With ``n_hinges=2`` a second arm of the same shape hangs from the opposite side of
the body on its own hinge and moves with its own parameter ``t₂`` (independent of ``t``), so
the molecule has two independently moving domains. All domains are poly-alanine pseudo-chains
(N, CA, C, O, CB per residue): the CA trace is a persistent random walk of 3.8 Å steps that
prefers the least crowded of several candidate steps, so it fills each domain at roughly
protein-like density with chain-like texture.

Geometry is in Å in a frame whose origin is the centre of the bounding box swept by the molecule
over the whole motion, so every state shares one frame and the body stays put.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import gemmi
import numpy as np

from cryoformer.simulation.density import DEFAULT_BFACTOR_ANGSTROM2, atoms_to_volume, displacement_map

_ATOMS = (("N", "N"), ("CA", "C"), ("C", "C"), ("O", "O"), ("CB", "C"))  # (name, element)
_CA_STEP = 3.8  # Å, consecutive CA distance in proteins
_CELL = 2.0  # Å, crowding-grid cell
MotionParameter = Union[float, Sequence[float]]  # t, or (t₁, t₂) with two hinges


@dataclass(frozen=True)
class HingedMoleculeConfig:
    """Shape and motion of the hinged molecule (lengths in Å, angles in degrees).

    Attributes
    ----------
    body_semi_axes_angstrom : (float, float, float)
        Semi-axes (x, y, z) of the body ellipsoid.
    knob_radius_angstrom : float
        Radius of the sphere bulging from the body's lower-front-left surface (breaks symmetry).
    arm_length_angstrom, arm_radius_angstrom : float
        The arm cylinder, starting at the pivot.
    hand_radius_angstrom : float
        Sphere at the arm's tip, set off sideways so the arm has no rotational symmetry.
    arm_closed_angle_deg : float
        Arm direction at θ = 0, measured from the body's surface normal at the hinge about the
        hinge axis (negative: leaning over the body's +x shoulder).
    hinge_angle_range_deg : (float, float)
        ``(θ₀, θ₁)``: arm rotation at ``t = 0`` and ``t = 1``.
    hinge_axis : (float, float, float)
        Direction of the hinge axis (normalised internally); slightly tilted from z so the
        motion is not confined to a plane of the box.
    n_atoms : int or None
        Total atom count (rounded to whole 5-atom residues, split between the domains by
        volume); ``None`` packs one residue per ``residue_volume_angstrom3``, so the count grows
        with the size and the density stays protein-like when the molecule is rescaled.
    residue_volume_angstrom3 : float
        Volume per residue when ``n_atoms`` is None (proteins: ~130 Å³ with side chains).
    box_fill : float or None
        When rendering into a box (:func:`hinged_molecule_volume` and friends) scale all lengths
        so the swept molecule's diameter is ``box_fill × D × pixel_size_angstrom``
        (see :meth:`fitted`); ``None`` renders the sizes above as given.
    seed : int
        Seed of the pseudo-chains.
    n_hinges : int
        1 (one arm) or 2 (a second, independently moving arm on the opposite side).
    second_hinge_direction : (float, float, float)
        Direction from the body centre to the second hinge (used when ``n_hinges == 2``).
    second_hinge_axis : (float, float, float)
        Hinge axis of the second arm (normalised internally).
    """

    body_semi_axes_angstrom: Tuple[float, float, float] = (34.0, 25.0, 21.0)
    knob_radius_angstrom: float = 12.0
    arm_length_angstrom: float = 42.0
    arm_radius_angstrom: float = 11.5
    hand_radius_angstrom: float = 15.0
    arm_closed_angle_deg: float = -62.0
    hinge_angle_range_deg: Tuple[float, float] = (0.0, 45.0)
    hinge_axis: Tuple[float, float, float] = (0.15, -0.1, 1.0)
    n_atoms: Optional[int] = None
    residue_volume_angstrom3: float = 120.0
    box_fill: Optional[float] = 0.6
    seed: int = 0
    n_hinges: int = 1
    second_hinge_direction: Tuple[float, float, float] = (-0.5, -0.85, -0.15)
    second_hinge_axis: Tuple[float, float, float] = (-0.1, 0.2, 1.0)

    def __post_init__(self) -> None:
        if self.n_hinges not in (1, 2):
            raise ValueError(f"n_hinges must be 1 or 2, got {self.n_hinges}")

    def scaled(self, factor: float) -> "HingedMoleculeConfig":
        """The same molecule with every length multiplied by ``factor`` (``box_fill`` kept)."""
        f = float(factor)
        return dataclasses.replace(
            self,
            body_semi_axes_angstrom=tuple(f * v for v in self.body_semi_axes_angstrom),
            knob_radius_angstrom=f * self.knob_radius_angstrom,
            arm_length_angstrom=f * self.arm_length_angstrom,
            arm_radius_angstrom=f * self.arm_radius_angstrom,
            hand_radius_angstrom=f * self.hand_radius_angstrom,
        )

    def fitted(self, D: int, pixel_size_angstrom: float) -> "HingedMoleculeConfig":
        """The config actually rendered in a ``D³`` box of ``pixel_size_angstrom``.

        With ``box_fill`` set: lengths scaled so the largest distance of an atom from the
        centre, over the motion, is ``box_fill · D · pixel_size_angstrom / 2``; ``box_fill`` is
        then ``None``. Without: ``self``. Use it to write the exact rendered atoms to a file.
        """
        if self.box_fill is None:
            return self
        target = 0.5 * self.box_fill * D * pixel_size_angstrom
        return dataclasses.replace(self.scaled(target / swept_radius(self)), box_fill=None)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """3×3 matrix rotating by ``angle_rad`` about unit ``axis`` (right-hand rule, Rodrigues)."""
    x, y, z = axis
    K = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + np.sin(angle_rad) * K + (1.0 - np.cos(angle_rad)) * K @ K


def _ellipsoid_surface(semi_axes: np.ndarray, direction) -> np.ndarray:
    """Point of the ellipsoid surface along ``direction`` from its centre."""
    d = _unit(direction)
    return d / np.sqrt(np.sum((d / semi_axes) ** 2))


class _ArmShape:
    """One arm: a cylinder from a pivot just outside the body, ending in an off-centre hand,
    rotating about its hinge axis through the pivot."""

    def __init__(self, cfg: HingedMoleculeConfig, semi: np.ndarray, hinge_direction, hinge_axis):
        hinge = _ellipsoid_surface(semi, hinge_direction)
        normal = _unit(hinge / semi ** 2)  # outward normal of the ellipsoid at the hinge
        self.axis = _unit(hinge_axis)
        # Pivot just outside the surface so the arm's base does not sit inside the body.
        self.pivot = hinge + 0.25 * cfg.arm_radius_angstrom * normal
        n_perp = _unit(normal - self.axis * (normal @ self.axis))
        self.arm_dir = _rotation(self.axis, np.deg2rad(cfg.arm_closed_angle_deg)) @ n_perp
        self.arm_len, self.arm_r = cfg.arm_length_angstrom, cfg.arm_radius_angstrom
        self.hand_r = cfg.hand_radius_angstrom
        side = _unit(np.cross(self.arm_dir, self.axis))
        self.hand_c = (self.pivot + (self.arm_len + 0.5 * self.hand_r) * self.arm_dir
                       + 0.35 * self.hand_r * (self.axis + side))
        lo, hi = np.deg2rad(cfg.hinge_angle_range_deg)
        self.extremes = (_rotation(self.axis, lo), _rotation(self.axis, hi))

    def rotate(self, points: np.ndarray, angle_rad: float) -> np.ndarray:
        """``points [n, 3]`` (Å) rotated by ``angle_rad`` about the hinge."""
        return (points - self.pivot) @ _rotation(self.axis, angle_rad).T + self.pivot


class _Shapes:
    """Inside-tests of the domains in the body frame (body centred at the origin)."""

    def __init__(self, cfg: HingedMoleculeConfig):
        self.semi = np.asarray(cfg.body_semi_axes_angstrom, dtype=np.float64)
        self.knob_r = cfg.knob_radius_angstrom
        self.knob_c = _ellipsoid_surface(self.semi, (-0.55, -0.45, 0.70))
        self.arms = [_ArmShape(cfg, self.semi, (0.55, 0.83, 0.0), cfg.hinge_axis)]
        if cfg.n_hinges == 2:
            self.arms.append(_ArmShape(cfg, self.semi, cfg.second_hinge_direction,
                                       cfg.second_hinge_axis))

    def body(self, p: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """``[n]`` bool: ``p [n, 3]`` inside the body grown by ``margin`` Å (approximately)."""
        scaled = (p / (self.semi + margin)) ** 2
        in_knob = np.linalg.norm(p - self.knob_c, axis=-1) < self.knob_r + margin
        return (scaled.sum(-1) < 1.0) | in_knob

    def arm_inside(self, index: int):
        """Inside-test of arm ``index``: ``p [n, 3]`` → ``[n]`` bool, inside the arm at θ = 0
        and clear of the body at both motion extremes."""
        a = self.arms[index]

        def inside(p: np.ndarray) -> np.ndarray:
            rel = p - a.pivot
            along = rel @ a.arm_dir
            radial = np.linalg.norm(rel - along[:, None] * a.arm_dir, axis=-1)
            in_cyl = (along > 0) & (along < a.arm_len) & (radial < a.arm_r)
            in_hand = np.linalg.norm(p - a.hand_c, axis=-1) < a.hand_r
            ok = in_cyl | in_hand
            for rot in a.extremes:  # keep a 1 Å gap from the body wherever the arm swings
                ok &= ~self.body(rel @ rot.T + a.pivot, margin=1.0)
            return ok
        return inside

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """A box holding all domains at θ = 0 (used for sampling and the crowding grid)."""
        lo, hi = -self.semi - self.knob_r, self.semi + self.knob_r
        for a in self.arms:
            reach = a.arm_len + 2.5 * a.hand_r
            lo, hi = np.minimum(lo, a.pivot - reach), np.maximum(hi, a.pivot + reach)
        return lo, hi


def _fill_chain(inside, n_res: int, lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator,
                n_candidates: int = 12, persistence: float = 1.5) -> np.ndarray:
    """CA trace ``[n_res, 3]`` of a random walk inside a domain, steering to uncrowded space."""
    shape = np.ceil((hi - lo) / _CELL).astype(int) + 1
    crowd = np.zeros(shape, dtype=np.float64)  # blurred count of CAs already placed
    r = int(np.ceil(6.0 / _CELL))
    g = np.arange(-r, r + 1) * _CELL
    d2 = g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2
    # Broad term: spread over the domain; sharp term: avoid CA–CA clashes (< ~3.5 Å).
    stamp = np.exp(-d2 / 18.0) + 4.0 * np.exp(-d2 / 4.5)

    def cell(p):
        return np.clip(((p - lo) / _CELL).astype(int), 0, shape - 1)

    def place(p):
        c = cell(p[None])[0]
        s = [slice(max(0, k - r), min(n, k + r + 1)) for k, n in zip(c, shape)]
        t = [slice(sk.start - (k - r), sk.stop - (k - r)) for sk, k in zip(s, c)]
        crowd[tuple(s)] += stamp[tuple(t)]

    tries = rng.uniform(lo, hi, size=(4096, 3))
    interior = tries[inside(tries)]
    if len(interior) == 0:
        raise ValueError("a domain of the hinged molecule is empty; check the config's sizes")
    ca = np.empty((n_res, 3))
    ca[0] = interior[0]
    place(ca[0])
    direction = _unit(rng.normal(size=3))
    for i in range(1, n_res):
        cand_dir = _unit(persistence * direction + rng.normal(size=(n_candidates, 3)))
        cand = ca[i - 1] + _CA_STEP * cand_dir
        ok = inside(cand)
        if not ok.any():  # cornered: head for a random interior point instead
            cand_dir = _unit(interior[rng.integers(len(interior), size=n_candidates)] - ca[i - 1])
            cand = ca[i - 1] + _CA_STEP * cand_dir
            ok = np.ones(n_candidates, dtype=bool)
        c = cell(cand)
        score = crowd[c[:, 0], c[:, 1], c[:, 2]] + rng.uniform(0.0, 0.3, n_candidates)
        score[~ok] = np.inf
        k = int(np.argmin(score))
        ca[i], direction = cand[k], cand_dir[k]
        place(ca[i])
    return ca


def _decorate(ca: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poly-alanine atoms ``[n_res·5, 3]`` (N, CA, C, O, CB) around a CA trace, bond-length-ish."""
    prev = np.vstack([2 * ca[0] - ca[1], ca[:-1]])
    nxt = np.vstack([ca[1:], 2 * ca[-1] - ca[-2]])
    u = _unit(nxt - prev)  # [n, 3] chain tangent
    v = _unit(np.cross(u, rng.normal(size=ca.shape)))  # random perpendicular
    w = np.cross(u, v)
    to_n = _unit(-0.57 * u + 0.82 * v)
    to_c = _unit(0.57 * u + 0.82 * v)
    c = ca + 1.52 * to_c
    atoms = np.stack([
        ca + 1.46 * to_n,  # N
        ca,  # CA
        c,  # C
        c + 1.23 * _unit(0.3 * u + 0.95 * w),  # O on the carbonyl C
        ca + 1.53 * _unit(-0.33 * v - 0.94 * w),  # CB on the other side
    ], axis=1)  # [n, 5, 3]
    return atoms.reshape(-1, 3)


@functools.lru_cache(maxsize=16)
def _geometry(cfg: HingedMoleculeConfig):
    """Atoms at θ = 0 in the body frame: the body ``[nb, 3]``, a tuple of arms ``[na, 3]``,
    the shapes that move them and the frame centre (cached)."""
    shapes = _Shapes(cfg)
    rng = np.random.default_rng(cfg.seed)
    lo, hi = shapes.bounds()
    # Domain volumes by Monte Carlo, to split residues (seeded, so deterministic).
    probe = np.random.default_rng(cfg.seed + 1).uniform(lo, hi, size=(200_000, 3))
    cube = float(np.prod(hi - lo))
    v_body = cube * shapes.body(probe).mean()
    v_arms = [cube * shapes.arm_inside(h)(probe).mean() for h in range(len(shapes.arms))]
    if cfg.n_atoms is None:
        n_body = max(2, int(round(v_body / cfg.residue_volume_angstrom3)))
        n_arms = [max(2, int(round(v / cfg.residue_volume_angstrom3))) for v in v_arms]
    else:
        n_res = max(4, cfg.n_atoms // len(_ATOMS))
        n_arms = [max(2, int(round(n_res * v / (v_body + sum(v_arms))))) for v in v_arms]
        n_body = n_res - sum(n_arms)
    body = _decorate(_fill_chain(shapes.body, n_body, lo, hi, rng), rng)
    arms = tuple(_decorate(_fill_chain(shapes.arm_inside(h), n, lo, hi, rng), rng)
                 for h, n in enumerate(n_arms))
    # One frame for all states: centre of the box swept by the atoms at θ₀, mid and θ₁.
    angles = np.deg2rad(cfg.hinge_angle_range_deg)
    swept = [body] + [shape.rotate(arm, a) for shape, arm in zip(shapes.arms, arms)
                      for a in (angles[0], angles.mean(), angles[1])]
    allpos = np.vstack(swept)
    centre = 0.5 * (allpos.min(0) + allpos.max(0))
    for arr in (body,) + arms:
        arr.setflags(write=False)
    return shapes, body, arms, centre


def _angle(t: float, cfg: HingedMoleculeConfig) -> float:
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"motion parameter t must be in [0, 1], got {t}")
    lo, hi = np.deg2rad(cfg.hinge_angle_range_deg)
    return float(lo + t * (hi - lo))


def _motion_parameters(t: MotionParameter, n_hinges: int) -> Tuple[float, ...]:
    """One motion parameter per hinge: a number is used for every hinge."""
    ts = np.atleast_1d(np.asarray(t, dtype=np.float64)).reshape(-1)
    if ts.size == 1:
        ts = np.repeat(ts, n_hinges)
    if ts.size != n_hinges:
        raise ValueError(f"expected 1 or {n_hinges} motion parameters, got {ts.size}")
    return tuple(float(v) for v in ts)


def swept_radius(config: HingedMoleculeConfig) -> float:
    """Largest distance (Å) of an atom from the frame centre over the motion (unscaled sizes)."""
    shapes, body, arms, centre = _geometry(dataclasses.replace(config, box_fill=None))
    radii = [np.linalg.norm(body - centre, axis=1).max()]
    for shape, arm in zip(shapes.arms, arms):
        for t in np.linspace(0.0, 1.0, 9):
            moved = shape.rotate(arm, _angle(t, config))
            radii.append(np.linalg.norm(moved - centre, axis=1).max())
    return float(max(radii))


def hinged_molecule_atoms(t: MotionParameter, config: Optional[HingedMoleculeConfig] = None
                          ) -> Tuple[np.ndarray, List[str]]:
    """Atoms of the molecule at motion parameter ``t``.

    Parameters
    ----------
    t : float or sequence of float
        Motion parameter in ``[0, 1]``; with two hinges a pair ``(t₁, t₂)``, one per arm (a
        single number moves both arms together).
    config : HingedMoleculeConfig, optional
        Sizes are used as given (``box_fill`` is ignored here; pass ``config.fitted(D, apix)``
        for the atoms a volume function renders).

    Returns
    -------
    positions : np.ndarray
        ``[N, 3]`` float64 ``(x, y, z)`` in Å, centred on the swept bounding box. Body atoms
        come first, then the arms' atoms (first arm, then second), in the same order for every
        ``t``.
    elements : list of str, length N
    """
    cfg = dataclasses.replace(config or HingedMoleculeConfig(), box_fill=None)
    shapes, body, arms, centre = _geometry(cfg)
    ts = _motion_parameters(t, cfg.n_hinges)
    moved = [shape.rotate(arm, _angle(th, cfg)) for shape, arm, th in zip(shapes.arms, arms, ts)]
    pos = np.vstack([body] + moved) - centre
    elements = [el for _, el in _ATOMS] * (pos.shape[0] // len(_ATOMS))
    return pos, elements


def domain_atom_labels(config: Optional[HingedMoleculeConfig] = None) -> np.ndarray:
    """``[N]`` int: 0 for body atoms, ``h + 1`` for the atoms of arm ``h`` (positions' order)."""
    cfg = dataclasses.replace(config or HingedMoleculeConfig(), box_fill=None)
    _, body, arms, _ = _geometry(cfg)
    return np.concatenate([np.zeros(len(body), np.int64)]
                          + [np.full(len(arm), h + 1, np.int64) for h, arm in enumerate(arms)])


def arm_atom_mask(config: Optional[HingedMoleculeConfig] = None) -> np.ndarray:
    """``[N]`` bool, True for the atoms of the moving arm(s) (same order as the positions)."""
    return domain_atom_labels(config) > 0


def hinged_state_times(n_states: int, n_hinges: int = 1) -> np.ndarray:
    """Motion parameters of ``n_states`` states.

    One hinge: evenly spaced ``[n_states]``, ``k/(n−1)`` (``[0.]`` when n = 1). Two hinges:
    ``[n_states, 2]``, the full ``m × m`` grid of ``m`` evenly spaced settings per arm
    (``n_states = m²``, state ``k`` = ``(k // m, k % m)``), so across states the two arms
    move independently (zero correlation).
    """
    if n_states < 1:
        raise ValueError("n_states must be >= 1")
    if n_hinges not in (1, 2):
        raise ValueError(f"n_hinges must be 1 or 2, got {n_hinges}")
    if n_hinges == 1:
        return np.linspace(0.0, 1.0, n_states) if n_states > 1 else np.zeros(1)
    m = int(round(np.sqrt(n_states)))
    if m < 2 or m * m != n_states:
        raise ValueError(f"two hinges need a square number of states (4, 9, 16, …), got {n_states}")
    t = np.linspace(0.0, 1.0, m)
    return np.stack([np.repeat(t, m), np.tile(t, m)], axis=1)


def hinged_molecule_volume(t: MotionParameter, D: int, pixel_size_angstrom: float,
                           config: Optional[HingedMoleculeConfig] = None,
                           bfactor_angstrom2: float = DEFAULT_BFACTOR_ANGSTROM2) -> np.ndarray:
    """Potential map ``[D, D, D]`` float32 (``[z, y, x]``, Å⁻²) of the molecule at ``t``
    (a number, or one per hinge)."""
    cfg = (config or HingedMoleculeConfig()).fitted(D, pixel_size_angstrom)
    pos, el = hinged_molecule_atoms(t, cfg)
    return atoms_to_volume(pos, el, D, pixel_size_angstrom, bfactor_angstrom2=bfactor_angstrom2)


def hinged_state_volumes(n_states: int, D: int, pixel_size_angstrom: float,
                         config: Optional[HingedMoleculeConfig] = None,
                         bfactor_angstrom2: float = DEFAULT_BFACTOR_ANGSTROM2) -> np.ndarray:
    """Maps ``[n_states, D, D, D]`` float32 at ``t = hinged_state_times(n_states, n_hinges)``."""
    n_hinges = (config or HingedMoleculeConfig()).n_hinges
    return np.stack([hinged_molecule_volume(t, D, pixel_size_angstrom, config, bfactor_angstrom2)
                     for t in hinged_state_times(n_states, n_hinges)])


def motion_map(D: int, pixel_size_angstrom: float, config: Optional[HingedMoleculeConfig] = None,
               t0: MotionParameter = 0.0, t1: MotionParameter = 1.0,
               bfactor_angstrom2: float = DEFAULT_BFACTOR_ANGSTROM2) -> np.ndarray:
    """Ground-truth per-voxel displacement (Å) between the states ``t0`` and ``t1`` (numbers,
    or one per hinge; the default moves every arm through its whole range).

    ``[D, D, D]`` float32, ``[z, y, x]``: the density-weighted mean atom displacement of
    :func:`cryoformer.simulation.density.displacement_map` — up to the arm tip's chord on the
    arm, exactly 0 on the body away from the arm, 0 outside the molecule.
    """
    cfg = (config or HingedMoleculeConfig()).fitted(D, pixel_size_angstrom)
    pa, el = hinged_molecule_atoms(t0, cfg)
    pb, _ = hinged_molecule_atoms(t1, cfg)
    return displacement_map(pa, pb, el, D, pixel_size_angstrom, bfactor_angstrom2=bfactor_angstrom2)


def domain_motion_maps(D: int, pixel_size_angstrom: float,
                       config: Optional[HingedMoleculeConfig] = None,
                       bfactor_angstrom2: float = DEFAULT_BFACTOR_ANGSTROM2) -> np.ndarray:
    """Ground-truth motion of each arm alone: ``[n_hinges, D, D, D]`` float32 (Å).

    Map ``h`` is :func:`motion_map` between arm ``h`` at ``t = 0`` and at ``t = 1`` with every
    other arm held at ``t = 0``: the region that domain moves through, and nothing else.
    """
    cfg = (config or HingedMoleculeConfig()).fitted(D, pixel_size_angstrom)
    maps = []
    for h in range(cfg.n_hinges):
        t1 = np.zeros(cfg.n_hinges)
        t1[h] = 1.0
        maps.append(motion_map(D, pixel_size_angstrom, cfg, np.zeros(cfg.n_hinges), t1, bfactor_angstrom2))
    return np.stack(maps).astype(np.float32)


def hinged_molecule_structure(ts: Sequence[MotionParameter],
                              config: Optional[HingedMoleculeConfig] = None):
    """A ``gemmi.Structure`` with one model per ``t`` (chain A body, chain B the arm, chain C
    the second arm with two hinges; poly-ALA).

    Write it with ``st.write_pdb(path)`` or ``st.make_mmcif_document().write_file(path)``;
    it reads back as a multi-frame trajectory in MDAnalysis.
    """
    cfg = dataclasses.replace(config or HingedMoleculeConfig(), box_fill=None)
    domain = domain_atom_labels(cfg)
    st = gemmi.Structure()
    st.name = "hinged"
    for m, t in enumerate(ts):
        pos, els = hinged_molecule_atoms(t, cfg)
        model = gemmi.Model(m + 1)
        for chain_name, sel in ((name, domain == h) for h, name in enumerate("ABC"[:cfg.n_hinges + 1])):
            chain = gemmi.Chain(chain_name)
            xyz = pos[sel].reshape(-1, len(_ATOMS), 3)
            for r, res_xyz in enumerate(xyz):
                res = gemmi.Residue()
                res.name, res.seqid = "ALA", gemmi.SeqId(r + 1, " ")
                res.entity_type = gemmi.EntityType.Polymer
                for (name, el), p in zip(_ATOMS, res_xyz):
                    atom = gemmi.Atom()
                    atom.name, atom.element = name, gemmi.Element(el)
                    atom.pos, atom.occ, atom.b_iso = gemmi.Position(*p), 1.0, 20.0
                    res.add_atom(atom)
                chain.add_residue(res)
            model.add_chain(chain)
        st.add_model(model)
    st.setup_entities()
    return st
