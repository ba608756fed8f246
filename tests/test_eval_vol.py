"""The map options eval-vol and traverse share (hand flip, sign, low-pass, file numbering), the
latent readers (``.npy``, cryoDRGN ``z.pkl``, text) and ``eval-vol --z-start/--z-end``."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from cryoformer.analysis.volumes import VolumeOptions, flip_hand, lowpass_cosine, postprocess_volume
from cryoformer.cli import EXIT_INPUT_ERROR, main
from cryoformer.cli.eval_vol_cmd import latent_argument, read_latent_file
from cryoformer.errors import InputError
from cryoformer.io import read_volume
from cryoformer.metrics.heterogeneity import lowpass_gaussian

from test_trainer_helpers import tiny_cli_run


def test_flip_reverses_z_about_the_centre_voxel(rng):
    D = 8
    vol = np.zeros((D, D, D), np.float32)
    vol[D // 2 + 2, 1, 3] = 1.0  # z = +2 relative to the centre
    vol[D // 2, 5, 6] = 2.0      # on the centre slice
    flipped = flip_hand(vol)
    assert flipped[D // 2 - 2, 1, 3] == 1.0 and flipped[D // 2, 5, 6] == 2.0  # z → −z, centre kept
    assert flipped.sum() == pytest.approx(3.0)
    v = rng.normal(size=(D, D, D))
    np.testing.assert_array_equal(flip_hand(flip_hand(v)), v)
    k = np.arange(D)
    np.testing.assert_array_equal(flip_hand(v)[k], v[(D - k) % D])  # y and x untouched


def test_invert_negates_and_no_option_is_identity(rng):
    v = rng.normal(size=(6, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(postprocess_volume(v, 2.0, VolumeOptions(invert=True)), -v)
    np.testing.assert_array_equal(postprocess_volume(v, 2.0, VolumeOptions()), v)
    both = postprocess_volume(v, 2.0, VolumeOptions(invert=True, flip=True))
    np.testing.assert_array_equal(both, -flip_hand(v))


def test_gaussian_low_pass_of_a_delta_has_the_right_width():
    # Gain exp(−ln2·f²·r²) is 1/2 at f = 1/r; in real space a Gaussian of σ = r·√(2 ln2)/(2π).
    D, apix, res = 32, 1.5, 12.0
    delta = np.zeros((D, D, D))
    delta[D // 2, D // 2, D // 2] = 1.0
    out = postprocess_volume(delta, apix, VolumeOptions(low_pass_angstrom=res))
    profile = out.sum(axis=(1, 2)).astype(np.float64)  # [D] the filter along z
    z = (np.arange(D) - D // 2) * apix
    sigma = np.sqrt((profile * z ** 2).sum() / profile.sum())
    assert sigma == pytest.approx(res * np.sqrt(2 * np.log(2)) / (2 * np.pi), rel=0.01)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)  # the mean is kept


def test_cosine_low_pass_gain_is_half_at_the_resolution():
    D, apix, res = 32, 2.0, 8.0  # 1/res = 0.125 Å⁻¹ = shell 8 of 32
    delta = np.zeros((D, D, D))
    delta[0, 0, 0] = 1.0  # flat spectrum: the output spectrum is the gain
    gain = np.fft.fftn(lowpass_cosine(delta, apix, res)).real
    assert gain[0, 0, 8] == pytest.approx(0.5, abs=1e-9)
    assert gain[0, 0, 6] == pytest.approx(1.0, abs=1e-9) and gain[0, 0, 10] == pytest.approx(0.0, abs=1e-9)
    gauss = np.fft.fftn(lowpass_gaussian(delta, apix, res)).real
    assert gauss[0, 0, 8] == pytest.approx(0.5, abs=1e-9)


def test_volume_options_refuse_low_pass_beyond_nyquist():
    with pytest.raises(InputError, match="--low-pass"):
        VolumeOptions(low_pass_angstrom=6.0).check(3.0)  # Nyquist is 6 Å
    VolumeOptions(low_pass_angstrom=6.1).check(3.0)
    with pytest.raises(InputError, match="--vol-start-index"):
        VolumeOptions(vol_start_index=-1).check(3.0)


def test_cryodrgn_z_pkl_and_text_read_equal_the_array(rng, tmp_path):
    z_mu, z_logvar = rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32)
    with open(tmp_path / "z.pkl", "wb") as fh:  # cryoDRGN's layout: two pickles in one file
        pickle.dump(z_mu, fh)
        pickle.dump(z_logvar, fh)
    np.testing.assert_array_equal(read_latent_file(str(tmp_path / "z.pkl"), 3), z_mu)
    np.savetxt(tmp_path / "z.txt", z_mu, fmt="%.9g")
    np.testing.assert_array_equal(read_latent_file(str(tmp_path / "z.txt"), 3), z_mu)
    np.savetxt(tmp_path / "one.txt", z_mu[:1])
    np.testing.assert_allclose(latent_argument(str(tmp_path / "one.txt"), 3, "--z-start"), z_mu[0])
    np.testing.assert_allclose(latent_argument("1, 2 3", 3, "--z-start"), [1, 2, 3])
    with pytest.raises(InputError, match=r"zdim = 4.*\[7, 3\]") as exc:
        read_latent_file(str(tmp_path / "z.pkl"), 4)
    assert exc.value.path == str(tmp_path / "z.pkl")
    with pytest.raises(InputError, match="one latent"):
        latent_argument(str(tmp_path / "z.txt"), 3, "--z-end")


def test_z_pkl_executing_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(InputError):
        read_latent_file(str(tmp_path / "evil.pkl"), 2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch run: 24 particles, box 16, 6 Å, zdim 2."""
    root = tmp_path_factory.mktemp("evalvol")
    tiny_cli_run(root)
    return root / "run"


def test_eval_vol_interpolates_and_post_processes(run, tmp_path):
    out = tmp_path / "line"
    assert main(["eval-vol", str(run), "--z-start", "0 0", "--z-end", "1 -2", "-n", "3", "--flip", "--invert",
                 "--low-pass", "20", "--vol-start-index", "1", "-o", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["vol_001.mrc", "vol_002.mrc", "vol_003.mrc", "z_values.txt"]
    np.testing.assert_allclose(np.loadtxt(out / "z_values.txt"), [[0, 0], [0.5, -1], [1, -2]])
    plain = tmp_path / "plain"
    assert main(["eval-vol", str(run), "--z", "0.5 -1", "-o", str(plain)]) == 0
    ref, apix = read_volume(plain / "vol_000.mrc")
    got, apix_got = read_volume(out / "vol_002.mrc")
    assert apix_got == apix == pytest.approx(6.0)
    expected = -flip_hand(lowpass_gaussian(ref, apix, 20.0))
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(ref).max())


def test_eval_vol_reads_z_pkl_and_refuses_bad_input(run, tmp_path, capsys):
    z = np.array([[0.1, 0.2], [0.3, -0.4]], np.float32)
    with open(tmp_path / "z.pkl", "wb") as fh:
        pickle.dump(z, fh)
    assert main(["eval-vol", str(run), "--zfile", str(tmp_path / "z.pkl"), "-o", str(tmp_path / "a")]) == 0
    assert main(["eval-vol", str(run), "--zfile", str(tmp_path / "z.pkl"), "-o", str(tmp_path / "b"),
                 "--prefix", "map_"]) == 0
    assert sorted(os.listdir(tmp_path / "b")) == ["map_000.mrc", "map_001.mrc"]
    np.testing.assert_array_equal(read_volume(tmp_path / "a" / "vol_001.mrc")[0],
                                  read_volume(tmp_path / "b" / "map_001.mrc")[0])
    for argv, words in (
            (["--zfile", str(tmp_path / "z.pkl"), "-o", str(tmp_path / "a")], ("--force",)),
            (["--z", "0 0", "--low-pass", "12", "-o", str(tmp_path / "c")], ("--low-pass", "12")),
            (["--z-start", "0 0", "-o", str(tmp_path / "c")], ("--z-end",)),
            (["--z-start", "0 0", "--z-end", "1 1", "-n", "1", "-o", str(tmp_path / "c")], ("-n",))):
        capsys.readouterr()
        assert main(["eval-vol", str(run)] + argv) == EXIT_INPUT_ERROR
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "c").exists()
