"""The explorer at 500 000 particles, driven from Python: everything drawn, selections over all
particles (against an independent points-in-polygon), continuous colouring, NaN, the first view,
and the static picture a saved notebook shows."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("anywidget")

from cryoformer.metadata import CTF_COLUMNS  # noqa: E402
from cryoformer.trainer import load_run  # noqa: E402
from cryoformer_widgets import LatentExplorer, RunSession  # noqa: E402
from cryoformer_widgets.particle_values import ParticleMetadata, colour_levels  # noqa: E402

N = 500_000
CENTRES = np.array([[-2.0, 0.0, 1.0], [0.0, 2.0, -1.0], [2.0, 0.0, 0.0]], np.float32)


def big_latents(seed: int = 0):
    """(latents [N, 3], cluster [N], defocus_angstrom [N]): three groups, defocus rising with z0,
    and 20 far outliers."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 3, N)
    z = (CENTRES[cluster] + 0.4 * rng.normal(size=(N, 3))).astype(np.float32)
    z[:20] = 1000.0
    defocus = (15000.0 + 2000.0 * z[:, 0]).astype(np.float32)
    defocus[:20] = 15000.0
    return z, cluster, defocus


def ctf_for(defocus):
    ctf = np.zeros((defocus.size, len(CTF_COLUMNS)), np.float32)
    ctf[:, 0], ctf[:, 1], ctf[:, 5], ctf[:, 6], ctf[:, 7] = 32, 6.0, 300, 2.7, 0.1
    ctf[:, 2], ctf[:, 3] = defocus + 100, defocus - 100
    return ctf


def ray_casting(xy, polygon):
    """Even–odd rule, one edge at a time: an implementation independent of matplotlib's."""
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    inside = np.zeros(len(xy), bool)
    poly = np.asarray(polygon, np.float64)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < xc)
    return np.nonzero(inside)[0]


@pytest.fixture(scope="module")
def big(spread_run, tmp_path_factory):
    z, cluster, defocus = big_latents()
    t0 = time.perf_counter()
    session = RunSession.from_latents(load_run(spread_run), z, kmeans_labels=cluster,
                                      metadata=ParticleMetadata(ctf=ctf_for(defocus)))
    ex = LatentExplorer(session, output_dir=str(tmp_path_factory.mktemp("out")), select=None)
    build_s = time.perf_counter() - t0
    yield ex, z, defocus, build_s
    ex.close()


def test_all_500k_drawn_and_the_first_view_ignores_outliers(big):
    ex, z, _, build_s = big
    print(f"building a 500 000-particle explorer: {build_s:.2f} s")
    assert build_s < 20
    assert ex.n_particles == ex.n_drawn == N
    np.testing.assert_array_equal(np.frombuffer(ex.point_rows, np.int32), np.arange(N))
    xy = ex.state.pca.projections[:, :2]
    np.testing.assert_array_equal(np.frombuffer(ex.points, np.float32).reshape(N, 2), xy)
    x0, x1, y0, y1 = ex.home_view
    assert ex.view == ex.home_view
    bulk = xy[20:]
    assert x0 < np.percentile(bulk[:, 0], 1) and x1 > np.percentile(bulk[:, 0], 99)
    assert x1 - x0 < 2 * np.ptp(bulk[:, 0])  # the 20 points at z = 1000 do not stretch it
    assert np.abs(xy[:20]).max() > 100 * max(abs(x0), abs(x1))


def test_selection_over_all_500k_particles(big):
    ex, *_ = big
    ex.axis_x, ex.axis_y = "z0", "z1"
    poly = [[-3.0, -1.5], [1.0, -2.0], [2.5, 2.5], [-0.5, 3.0], [-1.0, 0.5]]
    t0 = time.perf_counter()
    rows = ex.select_polygon(poly)
    took = time.perf_counter() - t0
    print(f"lasso over 500 000 particles: {took:.3f} s, {rows.size} selected")
    want = ray_casting(ex.state.coords(("z0", "z1")), poly)
    np.testing.assert_array_equal(rows, want)
    assert 50_000 < rows.size < N - 50_000 and took < 3.0
    assert int(np.frombuffer(ex.point_selected, np.uint8).sum()) == rows.size == ex.n_selected
    ex.clear_selection()
    ex.axis_x, ex.axis_y = "PC1", "PC2"


def test_colour_by_defocus_and_by_a_user_array_with_nan(big):
    ex, z, defocus, _ = big
    assert "defocus_angstrom" in ex.label_sets and "astigmatism_angstrom" in ex.label_sets
    ex.color_by = "defocus_angstrom"
    assert ex.error == "" and ex.legend == []
    cb = ex.colorbar
    assert cb["vmin"] == pytest.approx(np.percentile(defocus, 1), rel=1e-5)
    assert cb["vmax"] == pytest.approx(np.percentile(defocus, 99), rel=1e-5)
    levels = np.frombuffer(ex.point_colors, np.uint8)
    np.testing.assert_array_equal(levels, colour_levels(defocus, cb["vmin"], cb["vmax"]))
    assert len(ex.palette) == 256 and len(np.unique(levels)) > 200
    score = z[:, 1].astype(np.float64)
    score[::7] = np.nan
    ex.add_values("score", score)
    ex.color_by = "score"
    levels = np.frombuffer(ex.point_colors, np.uint8)
    assert np.all(levels[::7] == 255) and ex.palette[255] == ex.colorbar["missing"]
    assert ex.colorbar["n_missing"] == len(score[::7])
    ex.add_values("parity", np.arange(N) % 2)  # integers: categories with a legend
    ex.color_by = "parity"
    assert ex.colorbar == {} and [d["count"] for d in ex.legend] == [N // 2, N // 2]
    with pytest.raises(ValueError, match="particle 3 is inf"):
        ex.add_values("bad", np.where(np.arange(N) == 3, np.inf, 0.0))
    ex.color_by = "kmeans"


def test_static_picture_in_the_display_bundle(big):
    ex, *_ = big
    ex.color_by = "defocus_angstrom"
    bundle = ex._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle  # anywidget: (data, metadata)
    assert "application/vnd.jupyter.widget-view+json" in data
    t0 = time.perf_counter()
    png = ex.snapshot_png()
    print(f"static picture of 500 000 particles: {time.perf_counter() - t0:.2f} s")
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["image/png"]))).convert("RGB"))
    assert png.startswith(b"\x89PNG")
    assert img.shape[0] >= 400 and img.shape[1] >= 400
    plot = img[10:380, 42:410].reshape(-1, 3).astype(int)
    coloured = plot[(plot.max(1) - plot.min(1)) > 40]  # saturated pixels: the scatter, not text or grey
    assert coloured.shape[0] > 2000
    hues = {tuple(c // 32) for c in coloured}
    assert len(hues) > 10, "the picture should show the defocus colour ramp"
    ex.color_by = "kmeans"
