"""Triton backend of the hash grid: fused forward and backward kernels (CUDA).

Same semantics as the torch reference (``hash_grid.py``) and tcnn: per level, position
``fma(x, scale, 0.5)``, floor and fraction, the 8 corners' entries (dense index or
coherent-prime hash, uint32 wrap, modulo the level size) and trilinear weights.

- forward: one program per (block of points, level), like tcnn's ``kernel_grid``, so a
  program touches one level's table only;
- backward: one program per block of points looping over the levels; ∂L/∂params by
  atomic adds (float32), ∂L/∂x accumulated in registers, each only when needed.

Triton is imported on first use (``_load``), so this module imports without it; the
kernels are plain functions compiled then, and ``tl`` and the helper's name are bound
at that moment. With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import os

import torch

tl = None  # triton.language, bound by _load()
_corner = None  # the jitted _corner_impl, bound by _load()
BLOCK = 128


def _corner_impl(gx, gy, gz, fx, fy, fz, cx: tl.constexpr, cy: tl.constexpr, cz: tl.constexpr, res, size, hashed):
    """Entry index (int64, within the level) and trilinear weight of one corner."""
    px = gx + cx
    py = gy + cy
    pz = gz + cz
    dense = px + py * res + pz * (res * res)  # uint32: wraps as tcnn's does
    h = px ^ (py * 2654435761).to(tl.uint32) ^ (pz * 805459861).to(tl.uint32)
    index = (tl.where(hashed, h, dense) % size).to(tl.int64)
    wx = fx * cx + (1.0 - fx) * (1 - cx)
    wy = fy * cy + (1.0 - fy) * (1 - cy)
    wz = fz * cz + (1.0 - fz) * (1 - cz)
    return index, wx, wy, wz


def _fwd_kernel(x_ptr, table_ptr, out_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr, hashed_ptr, n_points,
                N_LEVELS: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr):
    level = tl.program_id(1)
    pts = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    live = pts < n_points
    feat = tl.arange(0, F)
    scale = tl.load(scale_ptr + level)
    res = tl.load(res_ptr + level).to(tl.uint32)
    size = tl.load(size_ptr + level).to(tl.uint32)
    base = tl.load(offset_ptr + level)
    hashed = tl.load(hashed_ptr + level) != 0
    pos_x = tl.fma(tl.load(x_ptr + pts * 3, mask=live, other=0.0), scale, 0.5)
    pos_y = tl.fma(tl.load(x_ptr + pts * 3 + 1, mask=live, other=0.0), scale, 0.5)
    pos_z = tl.fma(tl.load(x_ptr + pts * 3 + 2, mask=live, other=0.0), scale, 0.5)
    gx = tl.floor(pos_x)
    gy = tl.floor(pos_y)
    gz = tl.floor(pos_z)
    fx, fy, fz = pos_x - gx, pos_y - gy, pos_z - gz
    # negative cells wrap to uint32, as tcnn's (uint32_t)(int) cast
    gx = gx.to(tl.int32).to(tl.uint32, bitcast=True)
    gy = gy.to(tl.int32).to(tl.uint32, bitcast=True)
    gz = gz.to(tl.int32).to(tl.uint32, bitcast=True)
    acc = tl.zeros((BLOCK, F), dtype=tl.float32)
    for corner in tl.static_range(8):
        index, wx, wy, wz = _corner(gx, gy, gz, fx, fy, fz, corner & 1, (corner >> 1) & 1, (corner >> 2) & 1,
                                    res, size, hashed)
        rows = ((base + index) * F)[:, None] + feat[None, :]  # [BLOCK, F]
        v = tl.load(table_ptr + rows, mask=live[:, None], other=0.0).to(tl.float32)
        acc += (wx * wy * wz)[:, None] * v
    out = (pts * (N_LEVELS * F) + level * F)[:, None] + feat[None, :]  # level-major columns
    tl.store(out_ptr + out, acc, mask=live[:, None])


def _bwd_kernel(x_ptr, table_ptr, dout_ptr, gtable_ptr, gx_ptr, scale_ptr, res_ptr, size_ptr, offset_ptr,
                hashed_ptr, n_points, N_LEVELS: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr,
                NEED_TABLE: tl.constexpr, NEED_X: tl.constexpr):
    pts = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    live = pts < n_points
    feat = tl.arange(0, F)
    x0 = tl.load(x_ptr + pts * 3, mask=live, other=0.0)
    x1 = tl.load(x_ptr + pts * 3 + 1, mask=live, other=0.0)
    x2 = tl.load(x_ptr + pts * 3 + 2, mask=live, other=0.0)
    dx0 = tl.zeros((BLOCK,), dtype=tl.float32)
    dx1 = tl.zeros((BLOCK,), dtype=tl.float32)
    dx2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for level in range(N_LEVELS):
        scale = tl.load(scale_ptr + level)
        res = tl.load(res_ptr + level).to(tl.uint32)
        size = tl.load(size_ptr + level).to(tl.uint32)
        base = tl.load(offset_ptr + level)
        hashed = tl.load(hashed_ptr + level) != 0
        pos_x = tl.fma(x0, scale, 0.5)
        pos_y = tl.fma(x1, scale, 0.5)
        pos_z = tl.fma(x2, scale, 0.5)
        gx = tl.floor(pos_x)
        gy = tl.floor(pos_y)
        gz = tl.floor(pos_z)
        fx, fy, fz = pos_x - gx, pos_y - gy, pos_z - gz
        gx = gx.to(tl.int32).to(tl.uint32, bitcast=True)
        gy = gy.to(tl.int32).to(tl.uint32, bitcast=True)
        gz = gz.to(tl.int32).to(tl.uint32, bitcast=True)
        d = tl.load(dout_ptr + (pts * (N_LEVELS * F) + level * F)[:, None] + feat[None, :],
                    mask=live[:, None], other=0.0).to(tl.float32)  # [BLOCK, F]
        dpx = tl.zeros((BLOCK,), dtype=tl.float32)
        dpy = tl.zeros((BLOCK,), dtype=tl.float32)
        dpz = tl.zeros((BLOCK,), dtype=tl.float32)
        for corner in tl.static_range(8):
            cx = corner & 1
            cy = (corner >> 1) & 1
            cz = (corner >> 2) & 1
            index, wx, wy, wz = _corner(gx, gy, gz, fx, fy, fz, cx, cy, cz, res, size, hashed)
            rows = ((base + index) * F)[:, None] + feat[None, :]
            if NEED_TABLE:
                tl.atomic_add(gtable_ptr + rows, (wx * wy * wz)[:, None] * d, mask=live[:, None])
            if NEED_X:
                v = tl.load(table_ptr + rows, mask=live[:, None], other=0.0).to(tl.float32)
                g = tl.sum(v * d, axis=1)  # [BLOCK]: ∂L/∂(corner value) summed over features
                # ∂w/∂f along an axis is ±(product of the other two weights)
                dpx += g * (2 * cx - 1) * wy * wz
                dpy += g * (2 * cy - 1) * wx * wz
                dpz += g * (2 * cz - 1) * wx * wy
        dx0 += dpx * scale  # dpos/dx = scale
        dx1 += dpy * scale
        dx2 += dpz * scale
    if NEED_X:
        tl.store(gx_ptr + pts * 3, dx0, mask=live)
        tl.store(gx_ptr + pts * 3 + 1, dx1, mask=live)
        tl.store(gx_ptr + pts * 3 + 2, dx2, mask=live)


@functools.lru_cache(maxsize=1)
def _load():
    """Import triton and compile-wrap the kernels; None if triton is missing."""
    global tl, _corner
    try:
        # optional heavy dependency, imported on first use (a missing one means no backend)
        import triton
        import triton.language
    except ImportError:
        return None
    tl = triton.language
    _corner = triton.jit(_corner_impl)
    return triton, triton.jit(_fwd_kernel), triton.jit(_bwd_kernel)


def is_available(device) -> bool:
    """True for a CUDA device with triton importable (or any device under TRITON_INTERPRET=1)."""
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _load() is not None


@functools.lru_cache(maxsize=8)
def _level_tensors(levels, device):
    """Per-level constants on ``device``: scale f32, res i32, size i32, offset i64, hashed i32."""
    return (
        torch.tensor(levels.scales, dtype=torch.float32, device=device),
        torch.tensor(levels.resolutions, dtype=torch.int32, device=device),
        torch.tensor(levels.sizes, dtype=torch.int32, device=device),
        torch.tensor(levels.offsets[:-1], dtype=torch.int64, device=device),
        torch.tensor(levels.hashed, dtype=torch.int32, device=device),
    )


class _TritonHashGrid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, levels, n_features):
        triton, fwd, _ = _load()
        n, L = x.shape[0], len(levels.sizes)
        consts = _level_tensors(levels, x.device)
        out = torch.empty((n, L * n_features), dtype=torch.float32, device=x.device)
        if n:
            fwd[(triton.cdiv(n, BLOCK), L)](x, table, out, *consts, n, N_LEVELS=L, F=n_features, BLOCK=BLOCK)
        ctx.save_for_backward(x, table)
        ctx.levels, ctx.n_features = levels, n_features
        return out

    @staticmethod
    def backward(ctx, dout):
        triton, _, bwd = _load()
        x, table = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[:2]
        n, L = x.shape[0], len(ctx.levels.sizes)
        gtable = torch.zeros(table.shape, dtype=torch.float32, device=x.device)  # atomics in float32
        gx = torch.zeros_like(x)
        if n and (need_x or need_table):
            bwd[(triton.cdiv(n, BLOCK),)](
                x, table, dout.float().contiguous(), gtable, gx, *_level_tensors(ctx.levels, x.device), n,
                N_LEVELS=L, F=ctx.n_features, BLOCK=BLOCK, NEED_TABLE=need_table, NEED_X=need_x,
            )
        return (gx if need_x else None), (gtable.to(table.dtype) if need_table else None), None, None


def encode(x: torch.Tensor, params: torch.Tensor, levels, config) -> torch.Tensor:
    """Hash-grid encoding by the Triton kernels: ``x [N, 3]`` -> ``[N, L·F]`` float32.

    Differentiable (first order) w.r.t. ``params`` and ``x``; ``levels`` is the
    ``HashGridLevels`` of ``config``.
    """
    return _TritonHashGrid.apply(x.float().contiguous(), params, levels, config.n_features_per_level)
