"""Hash-grid encoding: tcnn geometry, hand-computed values, gradients, backends."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cryoformer.model import hash_grid_tcnn, hash_grid_triton
from cryoformer.model.hash_grid import (
    HashGridConfig,
    HashGridEncoding,
    coherent_prime_hash,
    level_geometry,
    resolve_backend,
)

MASK32 = 2**32 - 1


def make(config, params=None, dtype=torch.float32, **kwargs):
    enc = HashGridEncoding(config, backend="torch", dtype=dtype, **kwargs)
    if params is not None:
        with torch.no_grad():
            enc.params.copy_(torch.as_tensor(params, dtype=dtype))
    return enc


def entry_values(config, F=1):
    """Parameters whose value is ``10·entry + feature``, so an output names its corners."""
    n = level_geometry(config).n_entries
    return (10 * np.arange(n)[:, None] + np.arange(F)[None, :]).reshape(-1).astype(np.float64)


def reference_encode(x, params, config):
    """Plain re-statement of tcnn's kernel_grid (float64 weights), for random cross-checks."""
    lv, F = level_geometry(config), config.n_features_per_level
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    out = np.zeros((len(x), config.n_levels * F))
    for l in range(config.n_levels):
        pos = (x * lv.scales[l] + 0.5).astype(np.float32).astype(np.float64)  # one rounding: fmaf
        g = np.floor(pos)
        frac = pos - g
        g = g.astype(np.int64)
        for corner in range(8):
            c = np.array([(corner >> d) & 1 for d in range(3)])
            p = ((g + c) & MASK32).astype(np.uint64)  # tcnn's uint32 cast
            if lv.hashed[l]:
                idx = (p[:, 0] * np.uint64(1)) ^ (p[:, 1] * np.uint64(2654435761)) ^ (p[:, 2] * np.uint64(805459861))
            else:
                r = np.uint64(lv.resolutions[l])
                idx = p[:, 0] + p[:, 1] * r + p[:, 2] * r * r
            idx = (idx & np.uint64(MASK32)) % np.uint64(lv.sizes[l])
            w = np.prod(np.where(c == 1, frac, 1 - frac), axis=1)
            rows = (lv.offsets[l] + idx.astype(np.int64))[:, None] * F + np.arange(F)
            out[:, l * F : (l + 1) * F] += w[:, None] * params[rows]
    return out


# --- geometry -------------------------------------------------------------------------


def test_default_geometry_d128():
    """Default config with D = 128, derived by hand from tcnn's rules.

    b = (128/16)^(1/15) = 2^0.2; in float32 log2(b) = 0.19999997, so level l has
    scale = 2^(0.19999997·l)·16 − 1 (just under 16·2^(l/5) − 1; level 15: 126.99995) and
    res = ceil(scale) + 1. Entries = min(res³ rounded up to a multiple of 8, 2^15):
    16³=4096, 19³=6859→6864, 22³=10648, 25³=15625→15632, 28³=21952, 32³=32768 (still dense:
    res³ ≤ 2^15), from 37³ on hashed with 32768 entries each.
    """
    cfg = HashGridConfig().with_box_size(128)
    lv = level_geometry(cfg)
    assert math.isclose(cfg.per_level_scale, 2**0.2, rel_tol=1e-12)
    assert lv.resolutions == (16, 19, 22, 25, 28, 32, 37, 43, 49, 56, 64, 74, 85, 98, 112, 128)
    assert lv.sizes == (4096, 6864, 10648, 15632, 21952) + (32768,) * 11
    assert lv.hashed == (False,) * 6 + (True,) * 10
    assert lv.offsets[:4] == (0, 4096, 10960, 21608)
    assert lv.n_entries == 4096 + 6864 + 10648 + 15632 + 21952 + 11 * 32768 == 419640
    assert lv.scales[0] == 15.0 and abs(lv.scales[15] - 127) < 1e-4
    enc = HashGridEncoding(HashGridConfig(), backend="torch", box_size=128)
    assert enc.params.numel() == 2 * 419640 and enc.output_dim == 32
    assert float(enc.params.detach().abs().max()) <= 1e-4


def test_float32_rounding_can_add_a_vertex():
    # D = 64: log2(b) rounds up to 0.13333337, so level 15's scale is 63.00002 -> res 65, as tcnn
    assert level_geometry(HashGridConfig(finest_resolution=64)).resolutions[-1] == 65


def test_config_validation_and_tcnn_dict():
    with pytest.raises(ValueError):
        HashGridConfig().per_level_scale  # finest resolution unset
    with pytest.raises(ValueError):
        HashGridConfig(n_features_per_level=3)
    d = HashGridConfig(finest_resolution=256).to_tcnn_dict()
    assert d["otype"] == "HashGrid" and d["hash"] == "CoherentPrime" and d["interpolation"] == "Linear"
    assert (d["n_levels"], d["n_features_per_level"], d["log2_hashmap_size"], d["base_resolution"]) == (16, 2, 15, 16)
    assert math.isclose(d["per_level_scale"], 16 ** (1 / 15))
    assert HashGridConfig(n_levels=1, finest_resolution=16).per_level_scale == 1.0


def test_hash_against_hand_computed_uint32():
    # y·2654435761 and z·805459861 modulo 2^32, then XOR with x:
    # 2·2654435761 = 5308871522 − 2^32 = 1013904226; 3·805459861 = 2416379583
    assert (2 * 2654435761) % 2**32 == 1013904226
    coords = torch.tensor([[1, 2, 3], [0, 1, 0], [0, 0, 1], [7, 0, 0], [-1, -1, -1]])
    expected = [
        1 ^ 1013904226 ^ 2416379583,  # = 2892625372
        2654435761,
        805459861,
        7,
        # −1 wraps to 2^32 − 1: (2^32 − 1)·p ≡ 2^32 − p, i.e. 1640531535 and 3489507435
        4294967295 ^ 1640531535 ^ 3489507435,
    ]
    assert coherent_prime_hash(coords).tolist() == expected
    assert expected[0] == 2892625372


# --- hand-computed values -------------------------------------------------------------

DENSE = HashGridConfig(n_levels=1, n_features_per_level=1, base_resolution=5, finest_resolution=5)


def test_dense_level_vertex_interior_and_boundaries():
    """base_resolution 5: scale 4, res 5, 125 entries padded to 128, dense."""
    lv = level_geometry(DENSE)
    assert (lv.scales, lv.resolutions, lv.sizes, lv.hashed) == ((4.0,), (5,), (128,), (False,))
    enc = make(DENSE, np.arange(128.0))  # value = entry index
    x = torch.tensor(
        [
            [0.125, 0.375, 0.625],  # pos = 4x + 0.5 = (1, 2, 3) exactly: a vertex
            [0.0, 0.0, 0.0],  # pos 0.5: the 8 entries cx + 5cy + 25cz, c ∈ {0,1}
            [1.0, 1.0, 1.0],  # pos 4.5: corners 4 and 5; 5 runs past the row and wraps
            [0.25, 0.125, 0.125],  # pos (1.5, 1, 1): halfway between entries 31 and 32
        ]
    )
    out = enc(x)[:, 0].tolist()
    assert out[0] == 1 + 2 * 5 + 3 * 25  # 86: that vertex's parameter, exactly
    assert out[1] == (0 + 1 + 5 + 6 + 25 + 26 + 30 + 31) / 8  # 15.5
    # entries c_x + 5c_y + 25c_z mod 128 for c ∈ {4, 5}³:
    # 124, 125, 129→1, 130→2, 149→21, 150→22, 154→26, 155→27
    assert out[2] == pytest.approx((124 + 125 + 1 + 2 + 21 + 22 + 26 + 27) / 8)  # 43.5
    assert out[3] == pytest.approx(31.5)


def test_hashed_level_vertex():
    """log2 T = 5: res³ = 125 > 32 entries, so the level is hashed; index = hash mod 32."""
    cfg = HashGridConfig(n_levels=1, n_features_per_level=2, log2_hashmap_size=5, base_resolution=5, finest_resolution=5)
    lv = level_geometry(cfg)
    assert lv.sizes == (32,) and lv.hashed == (True,)
    enc = make(cfg, entry_values(cfg, F=2))
    out = enc(torch.tensor([[0.125, 0.375, 0.625], [0.375, 0.125, 0.125]]))
    # (1, 2, 3): 2892625372 mod 32 = 28 (its low 5 bits 11100)
    assert out[0].tolist() == [280.0, 281.0]
    # (2, 1, 1): low 5 bits of 2, 2654435761 (0x9E3779B1) and 805459861 (0x30025795):
    # 00010 ^ 10001 ^ 10101 = 00110 = 6
    assert (2 ^ 2654435761 ^ 805459861) % 32 == 6
    assert out[1].tolist() == [60.0, 61.0]


def test_output_is_level_major():
    cfg = HashGridConfig(n_levels=3, n_features_per_level=2, base_resolution=2, finest_resolution=8)
    lv = level_geometry(cfg)
    params = np.concatenate([np.tile([10.0 * l, 10.0 * l + 1], lv.sizes[l]) for l in range(3)])
    out = make(cfg, params)(torch.rand(4, 3))
    assert out.shape == (4, 6)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1, 10, 11, 20, 21]]).expand(4, 6))


# --- cross-checks, gradients ----------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=9, base_resolution=3, finest_resolution=20),
        HashGridConfig(n_levels=3, n_features_per_level=1, log2_hashmap_size=8, base_resolution=4, finest_resolution=9),
        HashGridConfig(n_levels=2, n_features_per_level=4, log2_hashmap_size=6, base_resolution=2, finest_resolution=7),
    ],
)
@pytest.mark.parametrize("lo_hi", [(0.0, 1.0), (-0.6, 1.7)])  # the second takes the int64 wrap path
def test_matches_reference_on_random_points(cfg, lo_hi):
    gen = torch.Generator().manual_seed(0)
    enc = HashGridEncoding(cfg, backend="torch", chunk_size=64)
    with torch.no_grad():
        enc.params.uniform_(-1, 1, generator=gen)
    assert any(level_geometry(cfg).hashed) and not all(level_geometry(cfg).hashed)
    x = torch.rand(300, 3, generator=gen) * (lo_hi[1] - lo_hi[0]) + lo_hi[0]
    x[:3] = torch.tensor([[0.0, 0, 0], [1, 1, 1], [0, 1, 0.5]])
    expected = reference_encode(x.numpy(), enc.params.detach().numpy().astype(np.float64), cfg)
    np.testing.assert_allclose(enc(x).detach().numpy(), expected, rtol=0, atol=2e-6)


def test_gradcheck_params_and_inputs_float64():
    cfg = HashGridConfig(n_levels=2, n_features_per_level=2, log2_hashmap_size=5, base_resolution=2, finest_resolution=5)
    assert level_geometry(cfg).hashed == (False, True)
    enc = make(cfg, dtype=torch.float64, chunk_size=3)
    with torch.no_grad():
        enc.params.uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    x = (torch.rand(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05)
    x.requires_grad_(True)
    params = enc.params.detach().clone().requires_grad_(True)

    def fn(x, p):
        return torch.func.functional_call(enc, {"params": p}, (x,))

    assert torch.autograd.gradcheck(fn, (x, params), eps=1e-6, atol=1e-6)


def test_float32_gradients_match_float64():
    cfg = HashGridConfig(n_levels=3, log2_hashmap_size=8, base_resolution=4, finest_resolution=16)
    enc32 = make(cfg, chunk_size=50)
    with torch.no_grad():
        enc32.params.uniform_(-1, 1, generator=torch.Generator().manual_seed(3))
    enc64 = make(cfg, enc32.params.detach().double(), dtype=torch.float64)
    x = torch.rand(120, 3, generator=torch.Generator().manual_seed(4)) * 0.98 + 0.01
    w = torch.randn(120, 6, generator=torch.Generator().manual_seed(5))
    grads = []
    for enc, dtype in ((enc32, torch.float32), (enc64, torch.float64)):
        xi = x.detach().to(dtype).requires_grad_(True)
        (enc(xi) * w.to(dtype)).sum().backward()
        grads.append((xi.grad.double(), enc.params.grad.double()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


def test_leading_dims_state_dict_and_empty_input():
    enc = HashGridEncoding(HashGridConfig(n_levels=2, finest_resolution=20), backend="torch")
    assert list(enc.state_dict()) == ["params"]
    assert enc(torch.rand(2, 5, 3)).shape == (2, 5, 4)
    assert enc(torch.zeros(0, 3)).shape == (0, 4)
    with pytest.raises(ValueError):
        enc(torch.rand(4, 2))


# --- backends -------------------------------------------------------------------------


def test_backend_resolution_on_cpu():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError):
        resolve_backend("cuda-magic", "cpu")
    with pytest.raises(RuntimeError):
        resolve_backend("tinycudann", "cpu")
    assert hash_grid_tcnn.is_available() in (True, False)  # import failure is caught, not raised


def _parity(backend, device, atol, tcnn_dtype=None):
    """Same checkpoint in the torch backend and ``backend``: outputs and both gradients agree."""
    cfg = HashGridConfig().with_box_size(96)
    ref = HashGridEncoding(cfg, backend="torch", device=device)
    with torch.no_grad():
        ref.params.uniform_(-1, 1)
    other = HashGridEncoding(cfg, backend=backend, device=device)
    other.load_state_dict(ref.state_dict())  # one layout: the checkpoint moves across
    if tcnn_dtype is not None:
        other._tcnn[torch.device(device)] = hash_grid_tcnn.TcnnHashGrid(cfg, other.params.numel(), dtype=tcnn_dtype)
    x = torch.rand(4096, 3, device=device)
    x[:2] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], device=device)
    w = torch.randn(4096, cfg.output_dim, device=device)
    outs, grads = [], []
    for enc in (ref, other):
        xi = x.clone().requires_grad_(True)
        out = enc(xi)
        (out * w).sum().backward()
        outs.append(out.detach().float())
        grads.append((xi.grad, enc.params.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=atol)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-2, atol=atol * 10)
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-2, atol=atol * 1e3)


@pytest.mark.gpu
def test_triton_matches_torch_on_gpu():
    if not hash_grid_triton.is_available(torch.device("cuda")):
        pytest.skip("triton not importable")
    _parity("triton", "cuda", atol=1e-5)


@pytest.mark.gpu
def test_tinycudann_matches_torch_on_gpu():
    if not hash_grid_tcnn.is_available():
        pytest.skip("tinycudann not importable")
    _parity("tinycudann", "cuda", atol=1e-5, tcnn_dtype=torch.float32)  # tcnn in float32: same numbers
    _parity("tinycudann", "cuda", atol=5e-3)  # tcnn's default half precision


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernel_in_interpreter_matches_torch():
    """Runs the Triton kernels on CPU with TRITON_INTERPRET=1 (set before triton imports)."""
    code = (
        "import torch\n"
        "from tests.test_hash_grid import _interpreter_parity\n"
        "_interpreter_parity()\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _interpreter_parity():
    cfg = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, finest_resolution=16)
    assert hash_grid_triton.is_available(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    ref = HashGridEncoding(cfg, backend="torch")
    with torch.no_grad():
        ref.params.uniform_(-1, 1, generator=gen)
    tri = HashGridEncoding(cfg, backend="triton")
    tri.load_state_dict(ref.state_dict())
    x = torch.rand(40, 3, generator=gen)
    x[:2] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    w = torch.randn(40, cfg.output_dim, generator=gen)
    res = []
    for enc in (ref, tri):
        xi = x.clone().requires_grad_(True)
        out = enc(xi)
        (out * w).sum().backward()
        res.append((out.detach(), xi.grad, enc.params.grad))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(res[1][2], res[0][2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-4, atol=1e-4)
