"""napari plugin logic without a display: layer data for a decoded latent (through the shared
run session) and the MRC reader/writer, checked against ``napari.components.ViewerModel``.
The latent choices themselves are the session's (test_session.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

napari = pytest.importorskip("napari")
pytest.importorskip("skimage")

import npe2  # noqa: E402
from napari.components import ViewerModel  # noqa: E402

from scipy.ndimage import binary_dilation  # noqa: E402

from cryoformer.analysis import attention_stack  # noqa: E402

from cryoformer.errors import InputError  # noqa: E402
from cryoformer.io.mrc import read_volume, write_volume  # noqa: E402
from cryoformer.io.particles import write_stack  # noqa: E402
from cryoformer_widgets.napari_io import get_reader, read_mrc, write_mrc  # noqa: E402
from cryoformer_widgets.napari_layers import (FLEX_NAME, REGIONS_NAME, SURFACE_NAME, VOLUME_NAME,  # noqa: E402
                                              DecodedLatent, FlexibleRegionMap, add_or_update,
                                              attention_layer_name, compute_flexible_regions,
                                              decode_latent, isosurface, latent_layers,
                                              layers_for_latent, surface_layer)
from cryoformer_widgets.session import RunSession  # noqa: E402


@pytest.fixture(scope="module")
def plugins():
    """Discover installed npe2 plugins: a bare ViewerModel does not (a Qt viewer does)."""
    pm = npe2.PluginManager.instance()
    pm.discover()
    assert "cryoformer-widgets" in pm  # the entry point of widgets/pyproject.toml is installed
    return pm


@pytest.fixture(scope="module")
def session(tiny_run):
    """The shared tiny run (tests/widgets/conftest.py: box 16 at 12 Å/px, zdim 3, stack rows 4…39)."""
    st = RunSession(tiny_run, k=3, device="cpu")
    yield st
    st.close()


# ---------------------------------------------------------------- layers
def test_layers_in_a_viewer_model(session):
    run = session.run
    z, label = session.from_cluster(1)
    layers = layers_for_latent(session, z, D=32, channels=["query_c0", "weight_k1", 2], visible=["query_c0"],
                               surface_channel="query_c1", label=label)
    viewer = ViewerModel()
    added = add_or_update(viewer, layers)
    names = [layer.name for layer in viewer.layers]
    assert names == [VOLUME_NAME, attention_layer_name("query_c0"), attention_layer_name("weight_k1"),
                     attention_layer_name("query_c2"), SURFACE_NAME]
    voxel = run.pixel_size_angstrom * run.box_size / 32  # 12 Å at box 16 → 6 Å at D=32
    assert voxel == pytest.approx(6.0)
    for layer in added:
        np.testing.assert_allclose(layer.scale, [voxel] * 3)
        assert [str(u) for u in layer.units] == ["angstrom"] * 3
    vol, attn_c0, attn_k1, attn_c2, surface = added
    with torch.no_grad():
        np.testing.assert_allclose(vol.data, run.model.decode_volume(z, 32).numpy(), atol=1e-6)
    stack = attention_stack(run.model, z, 32)
    # The overlay is the channel inside the molecule (the isosurface's inside grown by one voxel)
    # and its lower contrast limit, drawn black, outside; weights follow the C queries.
    level = vol.metadata["cryoformer"]["iso_level"]
    inside = binary_dilation(vol.data >= level, iterations=1)
    assert 0 < inside.sum() < inside.size
    np.testing.assert_allclose(attn_k1.data[inside], stack[8 + 1][inside], atol=1e-6)
    lo, hi = attn_k1.contrast_limits
    np.testing.assert_allclose([lo, hi], np.percentile(stack[8 + 1][inside], [1.0, 99.5]), rtol=1e-5, atol=1e-7)
    assert np.all(attn_k1.data[~inside] == np.float32(lo))
    assert vol.rendering == "iso" and vol.iso_threshold == pytest.approx(vol.metadata["cryoformer"]["iso_level"])
    assert vol.metadata["cryoformer"]["label"] == label
    assert {attn_c0.blending, attn_k1.blending, attn_c2.blending} == {"additive"}
    assert len({attn_c0.colormap.name, attn_k1.colormap.name, attn_c2.colormap.name}) == 3
    assert (attn_c0.visible, attn_k1.visible, attn_c2.visible) == (True, False, False)
    assert type(surface).__name__ == "Surface" and surface.metadata["cryoformer"]["channel"] == "query_c1"


def test_flexible_region_map_beside_the_attention_channels(session):
    from cryoformer.analysis import flex_score

    flex = compute_flexible_regions(session, D=16)
    # The overlay is the library's default flexible-region map, on the session's voxel size.
    np.testing.assert_array_equal(flex.score, flex_score(session.run.model, session.latents, 16))
    assert flex.labels.shape == (16, 16, 16) and flex.labels.min() >= 0
    assert flex.voxel_size == pytest.approx(session.voxel_size(16)[0])
    dec = decode_latent(session, session.from_cluster(0)[0], D=16)
    viewer = ViewerModel()
    added = add_or_update(viewer, latent_layers(dec, channels=["query_c0"], surface_channel=None, flex=flex))
    assert [layer.name for layer in viewer.layers] == [VOLUME_NAME, FLEX_NAME, REGIONS_NAME,
                                                       attention_layer_name("query_c0")]
    score, regions = added[1], added[2]
    assert type(regions).__name__ == "Labels" and score.blending == "additive"
    np.testing.assert_array_equal(regions.data, flex.labels)
    for layer in added:
        np.testing.assert_allclose(layer.scale, [dec.voxel_size] * 3)
    # Re-adding updates the same layers in place (the dock does this on every decode).
    moved = FlexibleRegionMap(flex.score * 0.5, flex.labels, flex.voxel_size, flex.unit)
    again = add_or_update(viewer, latent_layers(dec, channels=["query_c0"], surface_channel=None, flex=moved))
    assert again[1] is score and again[2] is regions and len(viewer.layers) == 4
    np.testing.assert_allclose(score.data, flex.score * 0.5)


def _on_edges(verts: np.ndarray) -> np.ndarray:
    """Vertices on a voxel edge (≥ two integral coordinates). Lewiner's marching cubes also puts
    a few vertices inside cubes, to resolve ambiguous cases."""
    return np.sum(np.abs(verts - np.round(verts)) > 1e-4, axis=1) <= 1


def _edge_interpolation(channel: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Independent reference: at a vertex on a voxel edge the field is the linear blend of that
    edge's two voxels."""
    out = np.empty(len(verts))
    for i, v in enumerate(verts.astype(np.float64)):
        frac = np.abs(v - np.round(v))
        axis = int(np.argmax(frac))
        lo = np.round(v).astype(int)
        lo[axis] = int(np.floor(v[axis]))
        hi = lo.copy()
        hi[axis] = min(lo[axis] + 1, channel.shape[axis] - 1)
        t = v[axis] - lo[axis]
        out[i] = (1 - t) * channel[tuple(lo)] + t * channel[tuple(hi)]
    return out


def test_surface_values_are_attention_at_the_vertices(session):
    dec = decode_latent(session, session.from_cluster(0)[0])
    assert len(dec.vertices) > 100 and dec.faces.max() < len(dec.vertices)
    edge = _on_edges(dec.vertices)
    assert edge.mean() > 0.95
    # The vertices lie on the density's isosurface …
    np.testing.assert_allclose(_edge_interpolation(dec.volume, dec.vertices[edge]), dec.iso_level, atol=1e-5)
    for channel in ("query_c3", "weight_k0"):
        (verts, faces, values), kwargs, kind = surface_layer(dec, channel)
        assert kind == "surface" and values.shape == (len(verts),)
        # … and carry the attention channel sampled there; inside a cube, a value between the
        # cube's corners.
        index = dec.channel_names.index(channel)
        attn = dec.attention[index]
        np.testing.assert_allclose(values[edge], _edge_interpolation(attn, verts[edge]), atol=1e-5)
        for v, value in zip(verts[~edge], values[~edge]):
            corners = attn[tuple(slice(int(c), int(c) + 2) for c in np.floor(v))]
            assert corners.min() - 1e-6 <= value <= corners.max() + 1e-6
        # Limits: the 2nd and 98th percentiles of the surface's own values, so its colours spread.
        lo, hi = kwargs["contrast_limits"]
        assert (lo, hi) == pytest.approx(tuple(np.percentile(values, [2.0, 98.0])), rel=1e-5)
        assert values.min() <= lo < hi <= values.max()


def test_surface_of_a_synthetic_sphere_samples_a_linear_field():
    D = 24
    grid = np.stack(np.meshgrid(*[np.arange(D)] * 3, indexing="ij"), axis=-1).astype(np.float32)
    sphere = 1.0 - np.linalg.norm(grid - D / 2, axis=-1) / 8  # 0 on the radius-8 sphere
    ramp = grid @ np.array([1.0, -2.0, 0.5], np.float32)  # linear: interpolation is exact
    verts, faces = isosurface(sphere, 0.0)
    dec = DecodedLatent(np.zeros(2, np.float32), sphere, ramp[None], ("ramp",), 2.0, "angstrom", 0.0,
                        verts, faces)
    (_, _, values), _, _ = surface_layer(dec, "ramp")
    np.testing.assert_allclose(values, verts @ np.array([1.0, -2.0, 0.5]), atol=1e-4)
    radius = np.linalg.norm(verts - D / 2, axis=1)
    assert np.abs(radius - 8).max() < 0.1


def test_redecoding_updates_layers_in_place(session):
    viewer = ViewerModel()
    dec = decode_latent(session, session.from_cluster(0)[0])
    first = add_or_update(viewer, latent_layers(dec, channels=[0, 1], surface_channel=0))
    first[1].visible = False  # the user's choices …
    first[1].colormap = "gray"
    dec2 = decode_latent(session, session.from_cluster(2)[0], D=32)
    second = add_or_update(viewer, latent_layers(dec2, channels=[0, 1], surface_channel=1))
    assert len(viewer.layers) == 4 and all(a is b for a, b in zip(first, second))
    assert second[0].data.shape == (32, 32, 32)
    np.testing.assert_allclose(second[0].scale, [6.0] * 3)
    assert second[1].visible is False and second[1].colormap.name == "gray"  # … are kept
    assert second[3].metadata["cryoformer"]["channel"] == "query_c1"
    assert len(second[3].data[2]) == len(dec2.vertices)


def test_decoding_goes_through_the_sessions_cache(session):
    """One decoder for both front ends: napari's volumes are the session's cached ones."""
    z, label = session.from_cluster(0)
    dec = decode_latent(session, z, D=16, label=label)
    again = decode_latent(session, z, D=16, label=label)
    assert again.volume is dec.volume and session.volume_at(z, 16) is dec.volume
    assert (dec.voxel_size, dec.unit) == session.voxel_size(16)


def test_bad_iso_level_is_a_clear_error(session):
    with pytest.raises(ValueError, match="outside the density range"):
        decode_latent(session, session.from_cluster(0)[0], iso_level=1e6)
    dec = decode_latent(session, session.from_cluster(0)[0])
    with pytest.raises(ValueError, match="no attention channel 'query_c99'"):
        latent_layers(dec, channels=["query_c99"])


# ---------------------------------------------------------------- reader / writer
def test_reader_volume_keeps_voxel_size(tmp_path, rng, plugins):
    vol = rng.normal(size=(8, 10, 12)).astype(np.float32)
    path = str(tmp_path / "map.mrc")
    write_volume(path, vol, 2.5)
    assert get_reader(path) is read_mrc and get_reader(str(tmp_path / "x.tif")) is None
    viewer = ViewerModel()
    [layer] = viewer.open(path, plugin="cryoformer-widgets")
    np.testing.assert_array_equal(layer.data, vol)
    np.testing.assert_allclose(layer.scale, [2.5] * 3)
    assert [str(u) for u in layer.units] == ["angstrom"] * 3
    assert layer.metadata["voxel_size_angstrom"] == pytest.approx(2.5)


def test_reader_particle_stack_is_a_memory_mapped_image_of_images(tmp_path, rng):
    images = rng.normal(size=(5, 16, 16)).astype(np.float32)
    path = str(tmp_path / "particles.mrcs")
    write_stack(path, images, 3.0)
    [(data, kwargs, kind)] = read_mrc(path)
    assert kind == "image" and isinstance(data, np.memmap) and data.shape == (5, 16, 16)
    np.testing.assert_array_equal(np.asarray(data), images)
    assert kwargs["scale"] == [1.0, 3.0, 3.0] and kwargs["axis_labels"] == ("image", "y", "x")
    lo, hi = kwargs["contrast_limits"]
    assert images.min() <= lo < hi <= images.max()


def test_reader_volume_stack_gets_a_channel_axis(tmp_path, rng):
    stack = rng.normal(size=(3, 8, 8, 8)).astype(np.float32)
    path = str(tmp_path / "attn.mrc")
    write_volume(path, stack, 4.0)
    [(data, kwargs, _)] = read_mrc(path)
    np.testing.assert_array_equal(data, stack)
    assert kwargs["scale"] == [1.0, 4.0, 4.0, 4.0] and kwargs["axis_labels"][0] == "channel"


@pytest.mark.parametrize("content", [b"", b"not an mrc file at all" * 100])
def test_reader_bad_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.mrc"
    path.write_bytes(content)
    with pytest.raises(InputError, match="broken.mrc"):
        read_mrc(str(path))


def test_reader_truncated_stack_names_the_file(tmp_path, rng):
    path = tmp_path / "cut.mrcs"
    write_stack(str(path), rng.normal(size=(4, 16, 16)).astype(np.float32), 1.5)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"cut\.mrcs.*truncated"):
        read_mrc(str(path))


def test_writer_round_trip_keeps_voxel_size(tmp_path, rng, plugins):
    vol = rng.normal(size=(8, 8, 8)).astype(np.float32)
    viewer = ViewerModel()
    layer = viewer.add_image(vol, scale=(1.7, 1.7, 1.7), units="angstrom")
    path = str(tmp_path / "saved.mrc")
    assert layer.save(path, plugin="cryoformer-widgets") == [path]
    back, voxel = read_volume(path)
    np.testing.assert_array_equal(back, vol)
    assert voxel == pytest.approx(1.7)
    [again] = ViewerModel().open(path, plugin="cryoformer-widgets")
    np.testing.assert_allclose(again.scale, layer.scale)
    assert not [f for f in os.listdir(tmp_path) if f != "saved.mrc"]  # no temporary left


def test_writer_converts_units_and_refuses_anisotropy(tmp_path, rng):
    img = rng.normal(size=(6, 6)).astype(np.float32)
    path = str(tmp_path / "image.mrc")
    write_mrc(path, img, {"scale": [0.25, 0.25], "units": ["nm", "nm"]})
    [(data, kwargs, _)] = read_mrc(path)  # one section → a 2-D image
    np.testing.assert_array_equal(data, img)
    assert kwargs["scale"] == pytest.approx([2.5, 2.5])
    with pytest.raises(InputError, match="anisotropic"):
        write_mrc(str(tmp_path / "aniso.mrc"), np.zeros((4, 4, 4)), {"scale": [1.0, 1.0, 2.0]})
    with pytest.raises(InputError, match="RGB"):
        write_mrc(str(tmp_path / "rgb.mrc"), np.zeros((4, 4, 3)), {"rgb": True})
    assert sorted(os.listdir(tmp_path)) == ["image.mrc"]
