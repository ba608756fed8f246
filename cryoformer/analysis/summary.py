"""One-page summaries of an analysis: a PNG figure and an HTML page (matplotlib Agg only).

The figure shows the latent scatter on PC1/PC2 and, when it was computed, on the UMAP, both
coloured by K-means cluster (centres numbered), the explained variance of the PCs, and, for each
cluster volume, its central slice and its projection along z, so the conformations can be
compared at a glance without a 3-D viewer.
"""

from __future__ import annotations

import base64
import html
import os
from typing import Dict, Optional, Sequence

import numpy as np

from cryoformer.errors import PathLike
from cryoformer.io.atomic import atomic_open, atomic_path

__all__ = ["plot_explained_variance", "plot_summary", "write_summary_html"]


def _figure(width_in: float, height_in: float):
    # Imported here, not at the top: importing matplotlib sets up its cache directory and warns on
    # stderr where that is not writable, and every command loads this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike, dpi: int = 100) -> None:
    ext = os.path.splitext(os.fspath(path))[1] or ".png"
    with atomic_path(path, suffix=ext) as tmp:
        fig.savefig(tmp, format=ext.lstrip("."), dpi=dpi)


def plot_explained_variance(ratio: np.ndarray, path: PathLike) -> None:
    """Bar chart of the explained-variance ratio per PC, with the cumulative curve."""
    ratio = np.asarray(ratio, dtype=float)
    fig = _figure(5.0, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    pcs = np.arange(1, ratio.size + 1)
    ax.bar(pcs, ratio, color="tab:blue", label="per PC")
    ax.plot(pcs, np.cumsum(ratio), "o-", color="tab:orange", label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("fraction of latent variance")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(pcs)
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def _scatter(ax, xy: np.ndarray, labels: np.ndarray, centers_xy: np.ndarray, xlabel: str, ylabel: str,
             title: str) -> None:
    """Particles ``xy`` ``[N, ≥1]`` coloured by ``labels`` ``[N]``, numbered centres ``[K, ≥1]``."""
    import matplotlib  # at first use, as in _figure (always called first)

    k = int(labels.max()) + 1 if labels.size else 0
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    y = xy[:, 1] if xy.shape[1] > 1 else np.zeros(len(xy))
    ax.scatter(xy[:, 0], y, c=[cmap(l % cmap.N) for l in labels], s=3, alpha=0.5, linewidths=0)
    for i, c in enumerate(centers_xy):
        cy = c[1] if c.size > 1 else 0.0
        ax.scatter([c[0]], [cy], c=[cmap(i % cmap.N)], s=60, edgecolors="black", zorder=3)
        ax.annotate(str(i), (c[0], cy), fontsize=8, ha="center", va="center", zorder=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plot_summary(path: PathLike, pc: np.ndarray, labels: np.ndarray, centers_pc: np.ndarray,
                 explained_variance_ratio: np.ndarray, volumes: Sequence[np.ndarray],
                 title: str = "cryoformer analysis", umap: Optional[np.ndarray] = None,
                 centers_umap: Optional[np.ndarray] = None) -> None:
    """Draw the one-page summary.

    Parameters
    ----------
    path : path
        ``.png`` (or any matplotlib format by extension).
    pc : np.ndarray
        ``[N, ≥1]`` PC coordinates of the particles.
    labels : np.ndarray
        ``[N]`` cluster of each particle.
    centers_pc : np.ndarray
        ``[K, ≥1]`` PC coordinates of the cluster centres.
    explained_variance_ratio : np.ndarray
        ``[p]``.
    volumes : sequence of np.ndarray
        ``K`` volumes ``[D, D, D]`` (cluster volumes, in cluster order).
    title : str
    umap : np.ndarray, optional
        ``[N, 2]`` UMAP coordinates of the particles, drawn beside the PCA scatter.
    centers_umap : np.ndarray, optional
        ``[K, 2]`` UMAP coordinates of the cluster centres (with ``umap``).
    """
    k = len(volumes)
    ncol = max(1, min(k, 5))
    width = max(ncol, 3)
    nrow_vol = 2 * int(np.ceil(k / ncol))  # slice row + projection row per line of clusters
    fig = _figure(3.0 * width, 4.2 + 2.2 * nrow_vol)
    grid = fig.add_gridspec(1 + nrow_vol, width, height_ratios=[2.0] + [1.0] * nrow_vol)
    ratio = np.asarray(explained_variance_ratio)
    # Top row: PCA scatter (and UMAP beside it, sharing the columns left of the variance bars).
    pca_cols = width - 1 if umap is None else (width - 1) // 2
    _scatter(fig.add_subplot(grid[0, :pca_cols]), pc, labels, centers_pc,
             f"PC1 ({100 * ratio[0]:.0f}% of variance)",
             f"PC2 ({100 * ratio[1]:.0f}%)" if ratio.size > 1 else "PC2 (n/a)",
             "PCA, coloured by K-means cluster")
    if umap is not None:
        centers = np.zeros((0, 2)) if centers_umap is None else np.asarray(centers_umap)
        _scatter(fig.add_subplot(grid[0, pca_cols:width - 1]), np.asarray(umap), labels, centers,
                 "UMAP1", "UMAP2", "UMAP, coloured by K-means cluster")
    ax = fig.add_subplot(grid[0, width - 1])
    ax.bar(np.arange(1, ratio.size + 1), ratio)
    ax.set_xlabel("PC")
    ax.set_title("explained variance")
    for i, vol in enumerate(volumes):
        r, c = 1 + 2 * (i // ncol), i % ncol
        D = vol.shape[0]
        for j, (img, what) in enumerate(((vol[D // 2], "slice z=D/2"), (vol.sum(axis=0), "sum along z"))):
            a = fig.add_subplot(grid[r + j, c])
            a.imshow(img, cmap="gray", origin="lower")
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(f"cluster {i}: {what}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, dpi=80)


def write_summary_html(path: PathLike, png_path: PathLike, info: Dict[str, object],
                       cluster_sizes: Sequence[int], files: Optional[Dict[str, str]] = None) -> None:
    """A self-contained HTML page: the summary PNG (embedded), run facts, cluster sizes, files."""
    with open(png_path, "rb") as fh:
        png = base64.b64encode(fh.read()).decode("ascii")
    esc = html.escape
    facts = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in info.items())
    sizes = "".join(f"<tr><td>{i}</td><td>{n}</td></tr>" for i, n in enumerate(cluster_sizes))
    links = "".join(f'<li><a href="{esc(v)}">{esc(v)}</a> — {esc(k)}</li>'
                    for k, v in (files or {}).items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cryoformer analysis</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}</style>
</head><body>
<h1>cryoformer analysis</h1>
<table>{facts}</table>
<h2>Latent space and cluster volumes</h2>
<img alt="summary" style="max-width:100%" src="data:image/png;base64,{png}">
<h2>Cluster sizes (particles)</h2>
<table><tr><th>cluster</th><th>particles</th></tr>{sizes}</table>
<h2>Files</h2><ul>{links}</ul>
</body></html>
"""
    with atomic_open(path, "w") as fh:
        fh.write(page)
