"""A tiny CryoFormer overfits images of two known states.

Two volumes share a fixed Gaussian blob and differ by a second blob at ``y = +3`` or
``y = −3`` px; 8 projections of each at known random poses (``physics.project``) are fitted
with poses given (no orientation encoder). Besides the loss falling ≥ 25× (well below the
plateau of one average volume, ≈ 0.15 of the first loss), the latent must carry the state:
rendering an image with the other state's mean latent must fit far worse than with its own.
"""

from __future__ import annotations

import torch

from cryoformer.model import CryoFormer, ModelConfig
from cryoformer.model.hash_grid import HashGridConfig
from cryoformer.physics.projector import project
from cryoformer.physics.rotations import random_rotations

D = 16
N_PER_STATE = 8


def blob_volume(centres, sigma=1.5):
    c = torch.arange(D, dtype=torch.float32) - D // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(D, D, D)
    for x, y, z in centres:
        vol += torch.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * sigma ** 2))
    return vol


def test_tiny_model_overfits_two_states():
    torch.manual_seed(0)
    vol_a = blob_volume([(-3, 0, 0), (3, 3, 0)])
    vol_b = blob_volume([(-3, 0, 0), (3, -3, 0)])
    rot = random_rotations(2 * N_PER_STATE, generator=torch.Generator().manual_seed(3))
    images = torch.cat([project(vol_a, rot[:N_PER_STATE]), project(vol_b, rot[N_PER_STATE:])])
    zero_loss = images.square().mean().item()  # loss of predicting empty images

    cfg = ModelConfig(box_size=D, zdim=2, token_dim=8, n_spatial_tokens=4,
                      n_deformation_tokens=4, blocks_per_axis=4, encoder_hidden=64,
                      encoder_layers=2, density_head_hidden=16, get_query="block",
                      hash_backend="torch",
                      hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=12,
                                               base_resolution=4))
    model = CryoFormer(cfg)
    # The image encoder learns 20× slower than the rest. Adam moves every weight by about lr
    # per step whatever its gradient, and the encoder's first layer sums 256 pixels. At one
    # rate for all, on some seeds and CPU kernel paths the latent stopped carrying the state
    # and the loss sat for hundreds of steps on the plateau of one average volume (≈ 0.15 of
    # the first loss): at 1e-2 the first step killed half of the encoder's ReLUs and its output
    # grew a hundredfold; at 2e-3 all but a few of its ReLUs died within 40 steps.
    encoder = [p for n, p in model.named_parameters() if n.startswith("deformation_encoder.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("deformation_encoder.")]
    opt = torch.optim.Adam([{"params": encoder, "lr": 5e-4}, {"params": rest}], lr=1e-2)
    # Ops this small are dominated by thread synchronisation: on the shared 2-core machine
    # one thread runs a step in ~0.06 s where two threads took up to 0.4 s under load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = []
        for _ in range(200):
            pred = model(images, rot)["pred_images"]
            loss = (pred - images).square().mean()  # paper eq. 7 (mean instead of sum)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)

    # Over 8 seeds of weights and poses × AVX-512/AVX2/default kernels, oneDNN off, MKL's
    # compatible path, 1 and 2 threads (56 runs): final ≤ 0.0132 of the first loss and of
    # zero_loss (this seed: ≤ 0.0044); swapped ≥ 47× own (this seed: ≥ 92×).
    final = min(losses[-5:])
    assert final <= 0.04 * losses[0], (losses[0], final)
    assert final <= 0.04 * zero_loss, (zero_loss, final)

    model.eval()
    with torch.no_grad():
        z = model.encode(images)["z"]
        z_mean = torch.stack([z[:N_PER_STATE].mean(0), z[N_PER_STATE:].mean(0)])  # [2, zdim]
        state = torch.arange(2).repeat_interleave(N_PER_STATE)

        def fit(latents):
            sites = model.renderer.sites(rot)
            density = model.field(model.density_head, model.query_table(latents), sites)
            pred = model.renderer(density, sites, rot)
            return (pred - images).square().mean().item()

        own = fit(z)
        swapped = fit(z_mean[1 - state])
        assert swapped > 15 * own, (own, swapped)
        assert fit(z_mean[state]) < swapped
