"""tiny-cuda-nn backend of the hash grid: ``tcnn.Encoding`` fed with our parameter vector.

tinycudann is not on PyPI and raises ``OSError`` (``EnvironmentError``) at import without
CUDA, so it is imported lazily and any failure means "not available". The wrapped tcnn
module is given :class:`~cryoformer.model.hash_grid.HashGridEncoding`'s own ``params``
before every call, so there is one parameter vector, in tcnn's layout, whichever backend
runs; the tcnn module is deliberately not a registered submodule (its copy of the
parameters would otherwise appear twice in the state dict).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _import():
    try:
        import tinycudann  # optional heavy dependency (CUDA build), imported on first use
    except (ImportError, OSError):
        return None
    return tinycudann


def is_available() -> bool:
    """True when ``import tinycudann`` succeeds (it needs CUDA)."""
    return _import() is not None


class TcnnHashGrid:
    """Callable ``(x [N, 3], params [P]) -> [N, L·F]`` float32, running tcnn's kernels.

    Parameters
    ----------
    config : HashGridConfig
        With ``finest_resolution`` set; ``config.to_tcnn_dict()`` configures tcnn.
    n_params : int
        Length of our parameter vector; must equal tcnn's, or the layouts differ.
    dtype : torch.dtype, optional
        tcnn's compute precision; None lets tcnn choose (half on most GPUs).
    """

    def __init__(self, config, n_params: int, dtype: torch.dtype | None = None):
        tcnn = _import()
        if tcnn is None:
            raise RuntimeError("tinycudann is not importable")
        self.module = tcnn.Encoding(3, config.to_tcnn_dict(), dtype=dtype)
        if self.module.params.numel() != n_params or self.module.n_output_dims != config.output_dim:
            raise RuntimeError(
                f"tinycudann grid has {self.module.params.numel()} parameters and "
                f"{self.module.n_output_dims} outputs; ours {n_params} and {config.output_dim}: "
                "the level geometry disagrees with this tinycudann version"
            )

    def __call__(self, x: torch.Tensor, params: torch.nn.Parameter) -> torch.Tensor:
        # share our Parameter object: gradients flow to it through tcnn's autograd function
        self.module.params = params
        return self.module(x.float().contiguous()).float()
