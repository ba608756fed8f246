"""What only a CUDA GPU can check: a bf16-autocast training step against fp32 and a 128³ decode
on the GPU against the CPU (``gpu`` marker: skipped, visibly, without one; run by
``bench/gpu_acceptance.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoformer.model import CryoFormer
from cryoformer.trainer import default_model_config

from test_trainer_helpers import tiny_model_config


def _batch(box: int, n: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, box, box, generator=g)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g))
    rotations = q * torch.det(q)[:, None, None]  # proper rotations
    shifts = torch.zeros(n, 2)
    return images.to(device), rotations.to(device), shifts.to(device)


@pytest.mark.gpu
def test_bf16_autocast_step_matches_fp32():
    """One training step's loss and gradients under bf16 autocast agree with fp32 (the trainer
    trains with autocast on CUDA unless --no-amp)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = CryoFormer(tiny_model_config(box=32)).cuda()
    images, rotations, shifts = _batch(32, 8, "cuda")
    grads, losses = [], []
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(images, rotations, shifts)
        loss = ((out["pred_images"].float() - images) ** 2).mean()
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    cosine = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
    assert cosine > 0.98


@pytest.mark.gpu
def test_decode_128_on_cuda_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = CryoFormer(default_model_config(64, preset="n512", zdim=8)).eval()
    z = np.random.default_rng(0).standard_normal(8).astype(np.float32)
    with torch.no_grad():
        cpu = model.decode_volume(z, D=128)
        gpu = model.cuda().decode_volume(z, D=128).cpu()
    assert cpu.shape == (128, 128, 128)
    rel = float((gpu - cpu).norm() / cpu.norm())
    assert rel < 1e-3
