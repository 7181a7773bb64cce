"""Preprocessing from the model card: validation, and the MONAI chain's tracked affine checked against
the data itself (a volume whose intensity is a linear function of the RAS position)."""
import warnings

import numpy as np
import pytest

from AttentionMapLib.core.geometry import apply_affine, voxel_spacing
from AttentionMapLib.core.preprocess import Preprocessing, check_volume, parse_preprocessing, preprocess_volume
from AttentionMapLib.errors import AttentionMapError
from geometry_cases import CASES

RAMP = np.array([0.3, -0.2, 0.5])  # intensity = RAMP . ras + 100: trilinear resampling reproduces it exactly


def _ramp_volume(case):
    shape, ijk_to_ras = CASES[case]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return (apply_affine(ijk_to_ras, ijk) @ RAMP + 100.0).astype(np.float32), ijk_to_ras


def _interior(shape, margin):
    return tuple(slice(margin, n - margin) for n in shape)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("section", [
    {"orientation": "RAS", "spacing": [2.0, 2.5, 3.0], "spatial": {"mode": "sliding_window"}},
    {"orientation": "LPI", "spacing": None, "spatial": {"mode": "sliding_window"}},
    {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "spatial": {"mode": "resize"}},
    {"orientation": None, "spacing": None, "spatial": {"mode": "resize"}},
])
def test_tracked_affine_maps_every_interior_voxel_to_its_ras_position(case, section):
    volume, ijk_to_ras = _ramp_volume(case)
    img_size, patch = (32, 48, 24), (8, 8, 8)
    out = preprocess_volume(volume, ijk_to_ras, section, img_size, patch)
    spatial = tuple(out.shape[1:])
    if section["spatial"]["mode"] == "resize":
        assert spatial == img_size
    else:
        assert all(s >= w and s % p == 0 for s, w, p in zip(spatial, img_size, patch))
    affine = out.affine.numpy()
    if section["orientation"] == "RAS":  # axes point along +R, +A, +S
        assert np.all(np.argmax(np.abs(affine[:3, :3]), axis=0) == [0, 1, 2]) and np.all(np.diag(affine[:3, :3]) > 0)
    if section["spacing"] and section["spatial"]["mode"] == "sliding_window":
        assert np.allclose(voxel_spacing(affine), section["spacing"])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in spatial], indexing="ij"), axis=-1)
    expected = apply_affine(affine, ijk) @ RAMP + 100.0
    # inside the original volume (away from its edge, where resampling clamps or pads) values match
    inside = np.all(np.abs(apply_affine(np.linalg.inv(ijk_to_ras) @ affine, ijk) - (np.array(volume.shape) - 1) / 2)
                    < (np.array(volume.shape) - 1) / 2 - 2, axis=-1)
    assert inside.sum() > 1000
    assert np.allclose(out[0].numpy()[inside], expected[inside], atol=0.05)


def test_intensity_window_and_padding_value():
    volume = np.full((20, 20, 20), -1000.0, dtype=np.float32)
    volume[5:8, 5:8, 5:8] = 1000.0
    volume[10, 10, 10] = 3000.0
    section = {"intensity": {"a_min": -1000, "a_max": 1000, "b_min": -1.0, "b_max": 1.0, "clip": True},
               "spatial": {"mode": "sliding_window"}}
    out = preprocess_volume(volume, np.eye(4), section, (32, 32, 32), (8, 8, 8))[0].numpy()
    assert out.shape == (32, 32, 32)
    assert out.min() == -1.0 and out.max() == 1.0  # clipped; padding is b_min, not 0
    assert np.count_nonzero(out == 1.0) == 28  # the 3^3 cube and the clipped 3000 HU voxel


def test_zscore_over_nonzero_voxels():
    rng = np.random.default_rng(0)
    volume = np.zeros((16, 16, 16), dtype=np.float32)
    volume[4:12, 4:12, 4:12] = rng.normal(50.0, 10.0, (8, 8, 8))
    section = {"intensity": {"normalize": "zscore", "nonzero": True}, "spatial": {"mode": "resize"}}
    out = preprocess_volume(volume, np.eye(4), section, (16, 16, 16), (8, 8, 8))[0].numpy()
    inner = out[4:12, 4:12, 4:12]
    assert abs(inner.mean()) < 1e-4 and abs(inner.std() - 1.0) < 1e-3
    assert np.all(out[:4] == 0.0)


def test_parse_defaults_and_normalisation():
    prep = parse_preprocessing({"orientation": "ras", "spacing": [1, 1, 2], "spatial": {"mode": "sliding_window"}})
    assert prep == Preprocessing(orientation="RAS", spacing=(1.0, 1.0, 2.0), mode="sliding_window")
    assert prep.overlap == 0.25 and prep.sw_batch_size == 4 and prep.blend == "mean"
    assert parse_preprocessing(prep) is prep


@pytest.mark.parametrize(
    "section, words",
    [
        ([], "expected an object"),
        ({"orientation": "RAS"}, r"missing key\(s\) \['spatial'\]"),
        ({"spatial": {"mode": "resize"}, "spacings": [1, 1, 1]}, r"unknown key\(s\) \['spacings'\]"),
        ({"orientation": "RAR", "spatial": {"mode": "resize"}}, "preprocessing.orientation"),
        ({"orientation": "XYZ", "spatial": {"mode": "resize"}}, "preprocessing.orientation"),
        ({"spacing": [1, 1], "spatial": {"mode": "resize"}}, "preprocessing.spacing"),
        ({"spacing": [1, 0, 1], "spatial": {"mode": "resize"}}, "preprocessing.spacing"),
        (
            {"intensity": {"a_min": 0, "a_max": 1, "b_min": 0}, "spatial": {"mode": "resize"}},
            r"missing key\(s\) \['b_max'\]",
        ),
        ({"intensity": {"a_min": 5, "a_max": 1, "b_min": 0, "b_max": 1}, "spatial": {"mode": "resize"}}, "a_max"),
        ({"intensity": {"a_min": 0, "a_max": 1, "b_min": 0, "b_max": "1"}, "spatial": {"mode": "resize"}}, "b_max"),
        ({"intensity": {"normalize": "minmax"}, "spatial": {"mode": "resize"}}, "zscore"),
        ({"intensity": {"normalize": "zscore", "nonzero": "yes"}, "spatial": {"mode": "resize"}}, "nonzero"),
        ({"spatial": {"mode": "tiles"}}, "spatial.mode"),
        ({"spatial": {"mode": "resize", "overlap": 0.5}}, r"unknown key\(s\) \['overlap'\]"),
        ({"spatial": {"mode": "resize", "interpolation": "cubic"}}, "interpolation"),
        ({"spatial": {"mode": "sliding_window", "overlap": 1.0}}, "overlap"),
        ({"spatial": {"mode": "sliding_window", "sw_batch_size": 0}}, "sw_batch_size"),
        ({"spatial": {"mode": "sliding_window", "blend": "max"}}, "blend"),
    ],
)
def test_parse_refuses_bad_sections(section, words):
    with pytest.raises(AttentionMapError, match=words):
        parse_preprocessing(section)


@pytest.mark.parametrize("shape, channels, words", [
    ((64, 64), 1, "2D image"),
    ((64, 64, 1), 1, "2D image"),
    ((1, 64, 1, 64), 1, "2D image"),
    ((3, 16, 16, 16), 1, r"expects 1 channel\(s\)"),
    ((16, 16, 16), 2, r"expects 2 channel\(s\)"),
    ((1, 1, 16, 16, 16), 1, r"expects 1 channel\(s\)"),
    ((16, 16, 16, 1), 1, r"expects 1 channel\(s\): an array \(I, J, K\) or \(1, I, J, K\) \(channels first\)"),
])
def test_check_volume_refuses_bad_shapes(shape, channels, words):
    with pytest.raises(AttentionMapError, match=words):
        check_volume(np.zeros(shape, dtype=np.float32), channels)


def test_check_volume_refuses_nan_and_copies():
    volume = np.zeros((8, 8, 8), dtype=np.float64)
    volume[1, 2, 3] = np.nan
    with pytest.raises(
        AttentionMapError, match=r"1 NaN or infinite voxel\(s\) \(first at channel, i, j, k = \[0, 1, 2, 3\]\)"
    ):
        check_volume(volume, 1)
    ok = np.ones((2, 8, 8, 8), dtype=np.int16)
    checked = check_volume(ok, 2)
    assert checked.dtype == np.float32 and checked.shape == (2, 8, 8, 8) and not np.shares_memory(checked, ok)
    with pytest.raises(AttentionMapError, match="numeric"):
        check_volume(np.zeros((8, 8, 8), dtype=object), 1)


def test_volume_smaller_than_a_patch_after_resampling_names_the_size_needed():
    volume = np.zeros((40, 40, 12), dtype=np.float32)
    volume[0, 0, 0] = 1.0
    section = {"spacing": [1.0, 1.0, 2.0], "spatial": {"mode": "sliding_window"}}
    # 12 slices of 1 mm -> 6 voxels at 2 mm; a patch is 8 voxels = 16 mm
    with pytest.raises(
        AttentionMapError,
        match=r"\(40, 40, 6\) voxels .* needs at least one patch: \(8, 8, 8\) voxels \(\(8.0, 8.0, 16.0\) mm\)",
    ):
        preprocess_volume(volume, np.eye(4), section, (32, 32, 32), (8, 8, 8))


def test_constant_volume_warns():
    with pytest.warns(UserWarning, match="constant"):
        preprocess_volume(
            np.full((16, 16, 16), 7.0, np.float32), np.eye(4), {"spatial": {"mode": "resize"}}, (16, 16, 16), (8, 8, 8)
        )
    clipped = {
        "intensity": {"a_min": 0, "a_max": 100, "b_min": 0, "b_max": 1, "clip": True},
        "spatial": {"mode": "resize"},
    }
    with pytest.warns(UserWarning, match="constant"):  # varies, but entirely below the window
        preprocess_volume(np.linspace(-50, -10, 16**3).reshape(16, 16, 16), np.eye(4), clipped, (16, 16, 16), (8, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess_volume(
            np.linspace(0, 1, 16**3).reshape(16, 16, 16),
            np.eye(4),
            {"spatial": {"mode": "resize"}},
            (16, 16, 16),
            (8, 8, 8),
        )
