"""Multi-resolution hash-grid encoding with tiny-cuda-nn's exact semantics (docs/conventions.md, "The model").

The feature volume ``V_Θ`` of the paper is a 3-D multi-resolution hash grid as in
Instant-NGP, with the rules of tiny-cuda-nn's ``GridEncoding`` (``encodings/grid.h`` and
``common_device.h``) so a checkpoint moves between backends and tcnn:

- level ``l`` has ``scale = exp2(l·log2(b))·N_min − 1`` computed in float32 and
  ``resolution = ceil(scale) + 1``;
- it stores ``min(next_multiple(res³, 8), 2^T)`` entries; it is dense (index
  ``x + y·res + z·res²``) when ``res³`` fits in that, else hashed by
  ``x·1 ^ y·2654435761 ^ z·805459861`` (uint32, tcnn's default "CoherentPrime");
  either index is then taken modulo the level's entry count;
- ``pos = x·scale + 0.5`` (one float32 fma), corner = floor, trilinear weights;
- parameters: one flat vector, level-major, then entry, then feature; init U(−1e-4, 1e-4);
- output ``[N, L·F]``, level 0's features first.

Backends: ``torch`` (this file; runs everywhere), ``triton`` (``hash_grid_triton``),
``tinycudann`` (``hash_grid_tcnn``); ``auto`` picks the fastest one available. All are
differentiable once (w.r.t. parameters and points); double backward is not supported.

Float32 caveat: the level scales here use correctly rounded float32 ``log2``/``exp2``
(as glibc gives tcnn's host code); CUDA's ``exp2f`` may be an ulp off, which changes a
resolution only if a scale falls within ~1e-5 of an integer. The finest level's scale is
``D − 1`` up to such rounding, so its resolution can be ``D + 1`` (e.g. D = 64 gives 65).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from cryoformer.model import hash_grid_tcnn, hash_grid_triton

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "tinycudann")
PRIMES = (1, 2654435761, 805459861)  # tcnn coherent_prime_hash factors for x, y, z
MASK32 = 0xFFFFFFFF
_PAIR = {torch.float32: torch.complex64, torch.float64: torch.complex128}  # two features as one
_LOGGED: set = set()


def _f32(value: float) -> float:
    """Round to the nearest float32, as tcnn's host and device code see the number."""
    return float(np.float32(value))


@dataclasses.dataclass(frozen=True)
class HashGridConfig:
    """Hyper-parameters of the hash grid; names and defaults are tcnn's ``HashGrid`` ones.

    ``finest_resolution`` (voxels) defaults to the box size ``D`` given at build time
    (``with_box_size``); the growth factor ``per_level_scale`` is derived from it.
    """

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 15
    base_resolution: int = 16
    finest_resolution: int | None = None

    def __post_init__(self):
        if not 1 <= self.n_levels <= 128:  # tcnn's MAX_N_LEVELS
            raise ValueError(f"n_levels must be in 1..128, got {self.n_levels}")
        if self.n_features_per_level not in (1, 2, 4, 8):  # the ones tcnn compiles
            raise ValueError(f"n_features_per_level must be 1, 2, 4 or 8, got {self.n_features_per_level}")
        if not 3 <= self.log2_hashmap_size <= 30:  # keeps every index inside int32
            raise ValueError(f"log2_hashmap_size must be in 3..30, got {self.log2_hashmap_size}")
        if self.base_resolution < 1:
            raise ValueError(f"base_resolution must be >= 1, got {self.base_resolution}")
        if self.finest_resolution is not None and self.finest_resolution < self.base_resolution:
            raise ValueError("finest_resolution must be >= base_resolution")

    def with_box_size(self, box_size: int) -> "HashGridConfig":
        """This config with ``finest_resolution`` set to ``box_size`` if it was left unset."""
        if self.finest_resolution is not None:
            return self
        return dataclasses.replace(self, finest_resolution=int(box_size))

    @property
    def per_level_scale(self) -> float:
        """Growth factor ``b = exp(ln(N_max / N_min) / (L − 1))`` between levels (1 if L = 1)."""
        if self.finest_resolution is None:
            raise ValueError("finest_resolution is unset: call with_box_size(D) first")
        if self.n_levels == 1:
            return 1.0
        return math.exp(math.log(self.finest_resolution / self.base_resolution) / (self.n_levels - 1))

    @property
    def output_dim(self) -> int:
        """Width ``L·F`` of the encoding."""
        return self.n_levels * self.n_features_per_level

    def to_tcnn_dict(self) -> dict:
        """tiny-cuda-nn encoding config giving exactly this grid (hash and interpolation pinned)."""
        return {
            "otype": "HashGrid",
            "type": "Hash",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
            "interpolation": "Linear",
            "hash": "CoherentPrime",
        }


@dataclasses.dataclass(frozen=True)
class HashGridLevels:
    """Per-level geometry derived from a config by tcnn's rules (see ``level_geometry``)."""

    scales: tuple[float, ...]  # float32 values, grid cells per unit input
    resolutions: tuple[int, ...]  # vertices per axis
    sizes: tuple[int, ...]  # table entries of the level (each holds F features)
    offsets: tuple[int, ...]  # first entry of each level, plus the total at the end
    hashed: tuple[bool, ...]

    @property
    def n_entries(self) -> int:
        return self.offsets[-1]


def level_geometry(config: HashGridConfig) -> HashGridLevels:
    """Scale, resolution, entry count, offset and hashing of each level, as tcnn derives them.

    tcnn computes ``exp2f(l · log2f(b)) · N_min − 1`` in float32, so every step is rounded
    to float32 here; ``b`` itself reaches tcnn as a float32 (JSON number read as float).
    """
    log2_b = _f32(math.log2(_f32(config.per_level_scale)))
    scales, resolutions, sizes, offsets, hashed = [], [], [], [0], []
    for level in range(config.n_levels):
        scale = _f32(_f32(_f32(2.0 ** _f32(level * log2_b)) * config.base_resolution) - 1.0)
        res = math.ceil(scale) + 1
        dense = min(res**3, 2**31 - 1)  # tcnn caps at UINT32_MAX / 2
        size = min(-(-dense // 8) * 8, 2**config.log2_hashmap_size)  # aligned to 8, then capped
        scales.append(scale)
        resolutions.append(res)
        sizes.append(size)
        offsets.append(offsets[-1] + size)
        hashed.append(size < res**3)  # tcnn: hash when hashmap_size < res³ (the dense stride)
    return HashGridLevels(tuple(scales), tuple(resolutions), tuple(sizes), tuple(offsets), tuple(hashed))


def coherent_prime_hash(coords: torch.Tensor) -> torch.Tensor:
    """tcnn's spatial hash of integer vertex coordinates, as uint32 values held in int64.

    Parameters
    ----------
    coords : Tensor, integer, shape ``[..., 3]``
        Vertex coordinates (x, y, z); negative values wrap as tcnn's uint32 cast does.

    Returns
    -------
    Tensor, int64, shape ``[...]``, values in ``[0, 2^32)``.
    """
    c = coords.long() & MASK32
    # int64 products may wrap past 2^63, which leaves the low 32 bits (all we keep) intact
    h = (c[..., 0] * PRIMES[0]) ^ (c[..., 1] * PRIMES[1]) ^ (c[..., 2] * PRIMES[2])
    return h & MASK32


# ---------------------------------------------------------------------------------------
# torch backend. Levels and the 8 corners are vectorised; points go in chunks of ~2k so a
# chunk's tensors stay in cache. Layout in a chunk: [level, corner z, corner y, corner x,
# point, feature]. Every intermediate lives in a per-call workspace reused by all chunks:
# fresh MB-sized tensors go back to the OS on free and page-fault in again on every chunk,
# which made the forward 2× slower on the (virtualised) machine this was tuned on.


class _TorchMeta:
    """Per-(device, dtype) constants: level scales and, per run of dense/hashed levels,
    offsets, resolutions and sizes shaped to broadcast against ``[l, 2, 2, 2, n]``."""

    def __init__(self, levels: HashGridLevels, config: HashGridConfig, device, dtype):
        self.n_levels, self.n_features = config.n_levels, config.n_features_per_level
        self.mask = 2**config.log2_hashmap_size - 1
        self.scales = torch.tensor(levels.scales, dtype=dtype, device=device)[:, None]  # [L, 1]
        self.scales64 = self.scales.double()
        self.int32_ok = 2 * levels.n_entries < 2**31  # all indices, offsets included, fit int32
        self.runs = []  # (start, stop, hashed, {index dtype: (offset, res, res², size)})
        start = 0
        for level in range(1, config.n_levels + 1):
            if level == config.n_levels or levels.hashed[level] != levels.hashed[start]:
                consts = {}
                for idtype in (torch.int32, torch.int64):
                    col = lambda v: torch.tensor(v[start:level], dtype=idtype, device=device)
                    res = col(levels.resolutions)[:, None]  # [l, 1]: against [l, n] terms
                    offset = col(levels.offsets).view(-1, 1, 1, 1, 1)
                    size = col(levels.sizes).view(-1, 1, 1, 1, 1)
                    consts[idtype] = (offset, res, res * res, size, size + offset)
                self.runs.append((start, level, levels.hashed[start], consts))
                start = level


class _Workspace:
    """Named flat buffers handed out as contiguous views of the requested shape."""

    def __init__(self, device):
        self.device, self.buffers = device, {}

    def __call__(self, name, shape, dtype):
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(shape)


def _corner_rows(ws, gi, meta, in_range):
    """Table entry of every corner: ``[L, 2, 2, 2, n]`` from cells ``gi [3, L, n]``."""
    L, n = gi.shape[1:]
    rows = ws("rows", (L, 2, 2, 2, n), gi.dtype)
    int32 = gi.dtype == torch.int32
    p1 = PRIMES[1] - 2**32 if int32 else PRIMES[1]  # same low 32 bits; int32 products wrap
    for k, (start, stop, hashed, consts) in enumerate(meta.runs):
        offset, res, res2, size, limit = consts[gi.dtype]
        g, out, l = gi[:, start:stop], rows[start:stop], stop - start
        t = ws(f"t{k}", (3, l, 2, n), gi.dtype)  # per-axis terms of the low and high corner
        yz = ws(f"yz{k}", (l, 2, 2, n), gi.dtype)
        t[0, :, 0] = g[0]
        factors = (p1, PRIMES[2]) if hashed else (res, res2)
        for axis, factor in ((1, factors[0]), (2, factors[1])):
            torch.mul(g[axis], factor, out=t[axis, :, 0])
            torch.add(t[axis, :, 0], factor, out=t[axis, :, 1])
        if hashed:
            torch.add(g[0], 1, out=t[0, :, 1])
            torch.bitwise_xor(t[2][:, :, None], t[1][:, None], out=yz)
            torch.bitwise_xor(yz[:, :, :, None], t[0][:, None, None], out=out)
            out &= meta.mask  # hashed levels hold exactly 2^T entries: & is the uint32 modulo
            out += offset
        else:
            if in_range:  # offset added early, to the small x term
                t[0, :, 0] += offset.view(-1, 1)
            torch.add(t[0, :, 0], 1, out=t[0, :, 1])
            torch.add(t[2][:, :, None], t[1][:, None], out=yz)
            torch.add(yz[:, :, :, None], t[0][:, None, None], out=out)
            if in_range:  # x in [0, 1] keeps the index below 2·size: one subtraction is the modulo
                wrapped = torch.ge(out, limit, out=ws(f"w{k}", out.shape, torch.bool))
                out -= torch.mul(wrapped, size, out=ws(f"s{k}", out.shape, gi.dtype))
            else:  # uint32 wrap of negative or large coordinates, then tcnn's modulo
                out &= MASK32
                out.remainder_(size)
                out += offset
    return rows.view(-1)


def _chunk_corners(ws, x, table, meta, in_range, gather=True):
    """Rows of the 8 corners, their values ``[L, 2, 2, 2, n, F]`` (if ``gather``) and the
    fractional positions ``[3, L, n, F]`` (broadcast over features: torch.lerp is ~20×
    slower with a broadcast weight than with a contiguous one)."""
    L, F, n = meta.n_levels, meta.n_features, x.shape[0]
    xt = x.t()[:, None, :]  # [3, 1, n]
    pos = ws("pos", (3, L, n), x.dtype)
    if x.dtype == torch.float32:  # float64, then one rounding: tcnn's fmaf(scale, x, 0.5f)
        p64 = ws("p64", (3, L, n), torch.float64)
        torch.mul(ws("x64", (3, 1, n), torch.float64).copy_(xt), meta.scales64, out=p64).add_(0.5)
        pos.copy_(p64)
    else:
        torch.mul(xt, meta.scales, out=pos).add_(0.5)
    cell = torch.floor(pos, out=ws("cell", (3, L, n), x.dtype))
    frac = ws("frac", (3, L, n, F), x.dtype)
    torch.sub(pos, cell, out=pos)
    if F == 2 and x.dtype in _PAIR:  # interleaving as a complex number: 3× faster than a copy
        torch.complex(pos, pos, out=frac.view(_PAIR[x.dtype]).view(3, L, n))
    else:
        frac.copy_(pos[..., None].expand(3, L, n, F))
    gi = ws("gi", (3, L, n), torch.int32 if in_range and meta.int32_ok else torch.int64)
    rows = _corner_rows(ws, gi.copy_(cell), meta, in_range)
    if not gather:
        return rows, None, frac, pos
    width = table.element_size() * F
    as_int = {4: torch.int32, 8: torch.int64}.get(width)
    if as_int is not None:  # an entry's F features moved as one integer: one gather per corner
        v = torch.index_select(table.view(as_int), 0, rows, out=ws("v", (rows.numel(),), as_int))
    else:
        v = torch.index_select(table.view(-1, F), 0, rows, out=ws("v", (rows.numel(), F), table.dtype))
    return rows, v.view(table.dtype).view(L, 2, 2, 2, n, F), frac, pos


def _chunk_forward(ws, x, table, meta, in_range):
    """Trilinear blend of the corner values: ``[L, n, F]``."""
    L, F, n = meta.n_levels, meta.n_features, x.shape[0]
    _, v, (fx, fy, fz), _ = _chunk_corners(ws, x, table, meta, in_range)
    dt = x.dtype
    a = torch.lerp(v[:, :, :, 0], v[:, :, :, 1], fx[:, None, None], out=ws("a1", (L, 2, 2, n, F), dt))  # along x
    b = torch.lerp(a[:, :, 0], a[:, :, 1], fy[:, None], out=ws("a2", (L, 2, n, F), dt))  # along y
    return torch.lerp(b[:, 0], b[:, 1], fz, out=ws("a3", (L, n, F), dt))  # along z


def _chunk_backward(ws, x, table, dout, meta, in_range, grad_table, need_x):
    """Add ∂L/∂table into ``grad_table`` (if given); return ∂L/∂x ``[3, n]`` if ``need_x``."""
    L, F, n, dt = meta.n_levels, meta.n_features, x.shape[0], x.dtype
    rows, v, (fx, fy, fz), frac1 = _chunk_corners(ws, x, table, meta, in_range, gather=need_x)
    d = ws("d", (L, n, F), dt)
    d.copy_(dout.reshape(n, L, F).transpose(0, 1))
    if grad_table is not None:  # corner weight × dout, split one axis at a time: w·d, (1 − w)·d
        src = ws("src", (L, 2, 2, 2, n, F), dt)
        dz, dzy = ws("dz", (L, 2, n, F), dt), ws("dzy", (L, 2, 2, n, F), dt)
        for whole, part, f in ((d, dz, fz), (dz, dzy, fy[:, None]), (dzy, src, fx[:, None, None])):
            hi, lo = part.select(part.dim() - 3, 1), part.select(part.dim() - 3, 0)
            torch.mul(whole, f, out=hi)
            torch.sub(whole, hi, out=lo)
        if F == 2 and dt in _PAIR:  # complex addition is the two feature additions
            grad_table.view(_PAIR[dt]).index_add_(0, rows, src.view(-1).view(_PAIR[dt]))
        else:
            grad_table.view(-1, F).index_add_(0, rows, src.view(-1, F))
    if not need_x:
        return None
    # ∂L/∂(corner value) summed over features, g = Σ_f v_f·d_f: [L, 2, 2, 2, n]
    g = ws("g", (L, 2, 2, 2, n), dt)
    if F == 2 and dt in _PAIR:  # Re(v·conj(d)): 6× faster than a sum over a length-2 axis
        vc = v.reshape(-1).view(_PAIR[dt]).view(L, 2, 2, 2, n)
        dc = d.view(-1).view(_PAIR[dt]).view(L, 1, 1, 1, n)
        g.copy_(torch.mul(vc, dc.conj(), out=ws("vd", (L, 2, 2, 2, n), _PAIR[dt])).real)
    else:
        torch.mul(v[..., 0], d[:, None, None, None, :, 0], out=g)
        for f in range(1, F):
            g.addcmul_(v[..., f], d[:, None, None, None, :, f])
    # derivatives of the trilinear blend along x, y, z (lerps of corner differences)
    fx, fy, fz = frac1
    gp = ws("gp", (3, L, n), dt)
    diff = torch.sub(g[:, :, :, 1], g[:, :, :, 0], out=ws("dg", (L, 2, 2, n), dt))
    t = torch.lerp(diff[:, :, 0], diff[:, :, 1], fy[:, None], out=ws("t", (L, 2, n), dt))
    torch.lerp(t[:, 0], t[:, 1], fz, out=gp[0])
    ax = torch.lerp(g[:, :, :, 0], g[:, :, :, 1], fx[:, None, None], out=diff)
    torch.sub(ax[:, :, 1], ax[:, :, 0], out=t)
    torch.lerp(t[:, 0], t[:, 1], fz, out=gp[1])
    torch.lerp(ax[:, :, 0], ax[:, :, 1], fy[:, None], out=t)
    torch.sub(t[:, 1], t[:, 0], out=gp[2])
    return torch.sum(gp.mul_(meta.scales), 1, out=ws("gx", (3, n), dt))  # dpos/dx = scale


def _in_range(x: torch.Tensor) -> bool:
    """True when all of ``x`` lies in [0, 1] (NaN fails), which allows the int32 fast path."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool((lo >= 0) & (hi <= 1))


class _TorchHashGrid(torch.autograd.Function):
    """Chunked forward; backward recomputes the corners rather than keep ``[N, 8·L]`` rows."""

    @staticmethod
    def forward(ctx, x, table, meta, chunk_size):
        n, L, F = x.shape[0], meta.n_levels, meta.n_features
        in_range, ws = _in_range(x), _Workspace(x.device)
        out = torch.empty((n, L, F), dtype=table.dtype, device=x.device)
        for s in range(0, n, chunk_size):
            blend = _chunk_forward(ws, x[s : s + chunk_size], table, meta, in_range)  # [L, n, F]
            out[s : s + chunk_size] = blend.transpose(0, 1)
        ctx.save_for_backward(x, table)
        ctx.meta, ctx.chunk_size, ctx.in_range = meta, chunk_size, in_range
        return out.view(n, L * F)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, table = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[:2]
        grad_table = torch.zeros_like(table) if need_table else None
        grad_x = torch.empty_like(x) if need_x else None
        # backward keeps about twice the live data per point: half-size chunks stay in cache
        ws, step = _Workspace(x.device), max(1, ctx.chunk_size // 2)
        for s in range(0, x.shape[0], step):
            gx = _chunk_backward(ws, x[s : s + step], table, dout[s : s + step], ctx.meta, ctx.in_range,
                                 grad_table, need_x)
            if need_x:
                grad_x[s : s + step] = gx.t()
        return grad_x, grad_table, None, None


# ---------------------------------------------------------------------------------------


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that runs for ``requested`` on ``device``; ``auto``: tcnn > triton > torch."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown hash-grid backend {requested!r}; choose from {BACKENDS}")
    device = torch.device(device)
    if requested == "tinycudann" and not (device.type == "cuda" and hash_grid_tcnn.is_available()):
        raise RuntimeError("backend 'tinycudann' needs a CUDA device and an importable tinycudann")
    if requested == "triton" and not hash_grid_triton.is_available(device):
        raise RuntimeError("backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    if requested != "auto":
        return requested
    if device.type == "cuda" and hash_grid_tcnn.is_available():
        return "tinycudann"
    if device.type == "cuda" and hash_grid_triton.is_available(device):
        return "triton"
    return "torch"


class HashGridEncoding(nn.Module):
    """Trainable multi-resolution hash grid ``[N, 3] -> [N, L·F]`` (tcnn semantics).

    Parameters
    ----------
    config : HashGridConfig
        Grid hyper-parameters; ``finest_resolution`` must be set or ``box_size`` given.
    backend : {"auto", "torch", "triton", "tinycudann"}
        Implementation; ``auto`` picks, per input device, tinycudann, then triton on CUDA,
        else torch, and logs its choice once. All share the parameter layout.
    box_size : int, optional
        Box size ``D`` (voxels); the finest resolution when the config leaves it unset.
    generator : torch.Generator, optional
        Source of the U(−1e-4, 1e-4) initialisation.
    device, dtype
        Of the parameter vector (float32 by default; float64 runs on the torch backend).
    chunk_size : int
        Points per chunk of the torch backend; 2048 keeps a chunk's working set in cache.

    Attributes
    ----------
    params : nn.Parameter, shape ``[n_entries · F]``
        Level-major, then entry, then feature: tcnn's layout, so checkpoints interchange.
    """

    def __init__(self, config: HashGridConfig, backend: str = "auto", *, box_size: int | None = None,
                 generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                 chunk_size: int = 2048):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown hash-grid backend {backend!r}; choose from {BACKENDS}")
        self.config = config.with_box_size(box_size) if box_size is not None else config
        self.levels = level_geometry(self.config)
        self.backend = backend
        self.chunk_size = int(chunk_size)
        n_params = self.levels.n_entries * self.config.n_features_per_level
        self.params = nn.Parameter(torch.empty(n_params, device=device, dtype=dtype))
        with torch.no_grad():
            self.params.uniform_(-1e-4, 1e-4, generator=generator)
        self._meta: dict = {}  # (device, dtype) -> constants; kept out of the state dict
        self._tcnn: dict = {}  # device -> tinycudann wrapper, not a registered submodule

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def extra_repr(self) -> str:
        c = self.config
        return (f"levels={c.n_levels}, features={c.n_features_per_level}, log2_T={c.log2_hashmap_size}, "
                f"resolution={c.base_resolution}..{c.finest_resolution}, backend={self.backend}")

    def active_backend(self, device) -> str:
        """Backend used for inputs on ``device`` (``auto`` keeps float64 parameters on torch)."""
        if self.params.dtype == torch.float64 and self.backend == "auto":
            return "torch"
        chosen = resolve_backend(self.backend, device)
        key = (self.backend, chosen, torch.device(device).type)
        if key not in _LOGGED:
            _LOGGED.add(key)
            logger.info("hash grid: backend %r on %s -> %s", self.backend, key[2], chosen)
        return chosen

    def _torch_meta(self, device, dtype) -> _TorchMeta:
        key = (torch.device(device), dtype)
        if key not in self._meta:
            self._meta[key] = _TorchMeta(self.levels, self.config, device, dtype)
        return self._meta[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points.

        Parameters
        ----------
        x : Tensor, shape ``[..., 3]``
            Coordinates (x, y, z) in [0, 1] (outside, tcnn's wrap-around indexing applies).

        Returns
        -------
        Tensor, shape ``[..., L·F]``, the parameters' dtype (float32): level 0's features first.
        """
        if x.shape[-1] != 3:
            raise ValueError(f"expected points of shape [..., 3], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, 3)
        backend = self.active_backend(flat.device)
        if backend == "tinycudann":
            if flat.device not in self._tcnn:
                self._tcnn[flat.device] = hash_grid_tcnn.TcnnHashGrid(self.config, self.params.numel())
            out = self._tcnn[flat.device](flat, self.params)
        elif backend == "triton":
            out = hash_grid_triton.encode(flat, self.params, self.levels, self.config)
        else:
            flat = flat.to(self.params.dtype).contiguous()
            meta = self._torch_meta(flat.device, flat.dtype)
            out = _TorchHashGrid.apply(flat, self.params, meta, self.chunk_size)
        return out.reshape(*lead, self.output_dim)
