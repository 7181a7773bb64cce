"""explain_volume: windows, blending, query points, re-fusion, outputs, progress/cancel, bad input.

Real (small, seeded) MONAI ViTs; expectations are built from the engine's per-window maps and the
window layout derived by hand, never from explain_volume itself.
"""
import hashlib
import itertools

import numpy as np
import pytest
import torch
from monai.networks.nets import UNETR, ViT

from AttentionMapLib.core import engine
from AttentionMapLib.core.geometry import apply_affine, ras_to_ijk, token_grid_affine
from AttentionMapLib.core.methods import normalize_map
from AttentionMapLib.core.preprocess import preprocess_volume
from AttentionMapLib.core.volume import explain_volume, window_starts
from AttentionMapLib.errors import AttentionMapError, Cancelled
from geometry_cases import CASES, INTENSITY, cube_volume, peak_error
from oracle import make_oracle_vit

IMG, PATCH = (32, 48, 24), (8, 8, 8)
SMALL = (40, 60, 30)  # 2 x 2 x 2 windows of IMG
SLIDING = {"intensity": INTENSITY, "spatial": {"mode": "sliding_window", "sw_batch_size": 5}}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return ViT(1, IMG, PATCH, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, classification=True,
               num_classes=3, post_activation=None).eval()


def _volume(shape, seed=0):
    return (np.random.default_rng(seed).random(shape) * 2000.0 - 1000.0).astype(np.float32)


def _digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_volume_of_exactly_one_window_gives_the_resize_result(vit):
    volume, affine = _volume(IMG), CASES["oblique_30_20"][1]
    resize = explain_volume(vit, volume, affine, {"intensity": INTENSITY, "spatial": {"mode": "resize"}}, img_size=IMG)
    sliding = explain_volume(vit, volume, affine, SLIDING, img_size=IMG)
    assert sliding.num_windows == resize.num_windows == 1
    assert np.allclose(sliding.grid, resize.grid, atol=1e-6)
    assert np.allclose(sliding.ijk_to_ras, resize.ijk_to_ras)
    assert np.allclose(sliding.window_logits, resize.window_logits, atol=1e-6)


def test_window_starts_are_patch_aligned_and_cover_the_axis():
    assert window_starts(80, 32, 8, 0.25) == [0, 24, 48]
    assert window_starts(64, 24, 8, 0.25) == [0, 16, 32, 40]
    assert window_starts(32, 32, 8, 0.25) == [0]
    assert window_starts(96, 32, 8, 0.0) == [0, 32, 64]
    assert window_starts(40, 32, 8, 0.9) == [0, 8]  # step never below one patch


def test_two_and_a_half_windows_per_axis_are_all_covered(vit):
    shape = (80, 120, 60)  # 2.5 windows of (32, 48, 24) along every axis
    affine = CASES["spacing_0.8x0.8x2.5"][1]
    result = explain_volume(vit, _volume(shape), affine, SLIDING, img_size=IMG, normalize="none")
    # K: 60 -> padded to 64 (multiple of 8); starts every floor(24*0.75/8)*8 = 16: 0, 16, 32, last 40
    # I: 80, step 24: 0, 24, last 48.  J: 120, step floor(48*0.75/8)*8 = 32: 0, 32, 64, last 72
    assert result.num_windows == 3 * 4 * 4
    assert result.grid.shape == (10, 15, 8)
    assert result.window_logits.shape == (48, 3)
    assert np.all(result.grid > 0)  # every token is covered by at least one window
    # the grid's box holds the whole volume: every corner voxel maps to a token index inside the grid
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])))
    tokens = ras_to_ijk(result.ijk_to_ras, apply_affine(affine, corners))
    assert np.all(tokens >= -0.5) and np.all(tokens <= np.array(result.grid.shape) - 0.5)


def _window_maps(model, volume, affine, prep, weighted_class=None, **options):
    """Reference: every window's unnormalised map from engine.explain on the preprocessed input,
    times the window's softmax probability of `weighted_class` when given."""
    image = preprocess_volume(volume, affine, prep, IMG, PATCH)[0].numpy()
    maps = {}
    for start in itertools.product(*[window_starts(s, w, p, 0.25) for s, w, p in zip(image.shape, IMG, PATCH)]):
        tile = image[tuple(slice(a, a + w) for a, w in zip(start, IMG))]
        x = torch.from_numpy(np.ascontiguousarray(tile))[None, None]
        result = engine.explain(model, x, normalize="none", **options)
        factor = 1.0 if weighted_class is None else float(torch.softmax(result.logits, dim=1)[0, weighted_class])
        maps[tuple(a // p for a, p in zip(start, PATCH))] = factor * result.grid[0]
    return maps, tuple(s // p for s, p in zip(image.shape, PATCH))


def _mean_blend(maps, grid_shape):
    """(token -> the window values seen there, their unnormalised mean over windows)."""
    values = {}
    for offset, window_map in maps.items():
        for index in itertools.product(*[range(n) for n in window_map.shape]):
            values.setdefault(tuple(o + i for o, i in zip(offset, index)), []).append(window_map[index])
    assert len(values) == int(np.prod(grid_shape)) and max(len(v) for v in values.values()) > 1
    expected = np.zeros(grid_shape)
    for index, seen in values.items():
        expected[index] = np.mean(seen)
    return values, expected


def test_probability_weighted_blend_scales_each_window_by_its_target_probability(vit):
    volume, affine = _volume(SMALL, seed=3), CASES["lps_axes"][1]
    maps, grid_shape = _window_maps(vit, volume, affine, SLIDING, weighted_class=1, method="rollout")
    result = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, method="rollout", target=1)
    assert result.window_weighting == "probability"
    assert np.allclose(result.grid, normalize_map(_mean_blend(maps, grid_shape)[1][None], "minmax")[0], atol=1e-5)
    unweighted = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, method="rollout", target=1,
                                window_weighting="none")
    assert not np.allclose(unweighted.grid, result.grid, atol=1e-3)
    with pytest.raises(AttentionMapError, match="window_weighting: expected one of probability, none"):
        explain_volume(vit, volume, affine, SLIDING, img_size=IMG, window_weighting="max")


def test_mean_blend_averages_windows_then_normalises_once(vit):
    volume, affine = _volume(SMALL, seed=3), CASES["lps_axes"][1]
    maps, grid_shape = _window_maps(vit, volume, affine, SLIDING, method="rollout")
    result = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, method="rollout", window_weighting="none")
    assert result.window_weighting == "none"
    values, expected = _mean_blend(maps, grid_shape)
    assert np.allclose(result.grid, normalize_map(expected[None], "minmax")[0], atol=1e-5)

    gaussian = explain_volume(vit, volume, affine, {**SLIDING, "spatial": {**SLIDING["spatial"], "blend": "gaussian"}},
                              img_size=IMG, method="rollout", normalize="none", window_weighting="none")
    low = np.zeros(grid_shape)
    high = np.zeros(grid_shape)
    for index, seen in values.items():
        low[index], high[index] = min(seen), max(seen)
    assert np.all(gaussian.grid >= low - 1e-6) and np.all(gaussian.grid <= high + 1e-6)
    assert not np.allclose(gaussian.grid, expected, atol=1e-6)


def test_query_ras_reads_the_row_of_the_token_holding_the_point(vit):
    volume, affine = _volume(IMG, seed=4), CASES["oblique_30_20"][1]
    resize = {"intensity": INTENSITY, "spatial": {"mode": "resize"}}
    x = preprocess_volume(volume, affine, resize, IMG, PATCH)
    tokens = token_grid_affine(x.affine.numpy(), PATCH)
    for token in [(1, 4, 2), (3, 0, 1)]:
        point = apply_affine(tokens, np.array(token) + [0.45, -0.45, 0.3])  # inside the patch, near its border
        result = explain_volume(vit, volume, affine, resize, img_size=IMG, method="raw", query_ras=point)
        reference = engine.explain(vit, x.as_tensor()[None], method="raw", query=token).grid[0]
        assert np.allclose(result.grid, reference, atol=1e-6)
        assert np.allclose(result.query_ras, point)
    with pytest.raises(AttentionMapError, match="query_ras: .* lies outside"):
        explain_volume(vit, volume, affine, resize, img_size=IMG, query_ras=apply_affine(tokens, [4.6, 0, 0]))
    with pytest.raises(AttentionMapError, match="query_ras: expected three finite"):
        explain_volume(vit, volume, affine, resize, img_size=IMG, query_ras=[0.0, np.nan, 0.0])


def test_sliding_window_query_uses_only_windows_holding_the_point(vit):
    shape, affine = (80, 120, 60), CASES["lps_axes"][1]
    volume = _volume(shape, seed=5)
    plain = explain_volume(vit, volume, affine, SLIDING, img_size=IMG)
    query_token = np.array([4, 7, 3])
    result = plain.fuse_again(query_ras=apply_affine(plain.ijk_to_ras, query_token), normalize="none")
    starts = [np.array(window_starts(s, w, p, 0.25)) // p for s, w, p in zip((80, 120, 64), IMG, PATCH)]
    n = np.array(IMG) // PATCH
    covered = np.zeros(result.grid.shape, dtype=bool)
    for offset in itertools.product(*starts):
        if np.all((query_token >= offset) & (query_token < np.array(offset) + n)):
            covered[tuple(slice(o, o + m) for o, m in zip(offset, n))] = True
    assert 0 < covered.sum() < covered.size
    assert np.all(result.grid[covered] > 0) and np.all(result.grid[~covered] == 0)
    assert result.fuse_again(query_ras=None, normalize="minmax").grid.tolist() == plain.grid.tolist()


def test_fuse_again_matches_a_fresh_run_without_running_the_network(vit):
    volume, affine = _volume(SMALL, seed=6), CASES["oblique_30_20"][1]
    first = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, method="rollout")
    calls = []
    handle = vit.register_forward_hook(lambda *args: calls.append(1))
    try:
        again = first.fuse_again(method="raw", layer=0, normalize="percentile")
        rolled = again.fuse_again(method="rollout", discard_ratio=0.5, layer=-1)
    finally:
        handle.remove()
    assert calls == []
    fresh = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, method="raw", layer=0, normalize="percentile")
    assert np.allclose(again.grid, fresh.grid, atol=1e-6) and (again.method, again.layer) == ("raw", 0)
    fresh = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, method="rollout", discard_ratio=0.5,
                           normalize="percentile")
    assert np.allclose(rolled.grid, fresh.grid, atol=1e-6) and rolled.layer == 1
    assert np.array_equal(first.fuse_again().grid, first.grid)
    with pytest.raises(AttentionMapError, match="grad_rollout needs"):
        first.fuse_again(method="grad_rollout")


def test_refuse_is_the_deprecated_name_of_fuse_again(vit):
    """Scripts written against the old name (the README documented ``attention.refuse(...)``) keep working,
    with a DeprecationWarning, and get exactly what fuse_again gives, without running the network."""
    first = explain_volume(vit, _volume(SMALL, seed=7), CASES["oblique_30_20"][1], SLIDING, img_size=IMG)
    calls = []
    handle = vit.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.warns(DeprecationWarning, match="use fuse_again"):
            old = first.refuse(layer=0, method="raw")
        new = first.fuse_again(layer=0, method="raw")
    finally:
        handle.remove()
    assert calls == [] and (old.method, old.layer) == ("raw", 0)
    np.testing.assert_array_equal(old.grid, new.grid)
    assert not np.array_equal(old.grid, first.grid)


def test_outputs_timings_and_grad_rollout_target(vit):
    volume, affine = _volume(SMALL, seed=7), CASES["lps_axes"][1]
    result = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, method="grad_rollout")
    w = result.num_windows
    assert result.window_logits.shape == (w, 3) and w > 1
    softmax = torch.softmax(torch.from_numpy(result.window_logits), dim=1).numpy()
    # one prediction: the softmax of the window holding the highest probability of any class
    best_window, best_class = np.unravel_index(np.argmax(softmax), softmax.shape)
    assert result.decisive_window == best_window
    assert np.allclose(result.probabilities, softmax[best_window], atol=1e-6)
    assert np.isclose(result.probabilities.sum(), 1.0)
    assert result.target == best_class == int(np.argmax(result.probabilities))
    starts = np.array(list(itertools.product(*[window_starts(s, w, 8, 0.25) for s, w in zip(
        preprocess_volume(volume, affine, SLIDING, IMG, PATCH).shape[1:], IMG)])))
    image = preprocess_volume(volume, affine, SLIDING, IMG, PATCH)
    centres = apply_affine(image.affine.numpy(), starts + (np.array(IMG) - 1) / 2.0)
    assert np.allclose(result.decisive_window_ras(), centres[best_window])
    assert set(result.timings) == {"preprocess", "forward", "fuse", "geometry"}
    assert all(t >= 0 for t in result.timings.values())
    chosen = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, method="grad_rollout", target=2)
    assert chosen.target == 2
    if result.target != 2:
        assert not np.allclose(chosen.grid, result.grid)
    assert explain_volume(vit, volume, affine, SLIDING, img_size=IMG).target is None


def test_dense_output_model_has_no_class_outputs():
    torch.manual_seed(0)
    unetr = UNETR(1, 2, (32, 32, 32), feature_size=4, hidden_size=32, mlp_dim=32, num_heads=2).eval()
    volume = _volume((48, 32, 32), seed=8)
    result = explain_volume(unetr, volume, np.eye(4), {"intensity": INTENSITY, "spatial": {"mode": "sliding_window"}},
                            method="grad_rollout")
    assert result.window_logits is None and result.probabilities is None
    assert result.target == 1  # the engine's default for dense outputs: first foreground channel
    assert result.grid.shape == (3, 2, 2) and result.num_windows == 2


def test_progress_and_cancel(vit):
    volume, affine = _volume(SMALL, seed=9), CASES["lps_axes"][1]
    seen = []
    result = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, progress=seen.append)
    assert len(seen) == -(-result.num_windows // 5) and seen[-1] == 1.0 and seen == sorted(seen)
    seen.clear()
    explain_volume(vit, volume, affine, SLIDING, img_size=IMG, method="grad_rollout", progress=seen.append)
    assert len(seen) == 2 * -(-result.num_windows // 5) and seen[-1] == 1.0 and seen == sorted(seen)
    checks = []
    with pytest.raises(Cancelled, match="after 5 of"):
        explain_volume(vit, volume, affine, SLIDING, img_size=IMG, cancel=lambda: checks.append(1) or len(checks) > 1)


def test_resample_to_the_input_grid_keeps_the_peak_on_the_cube():
    model = make_oracle_vit((32, 32, 32), (8, 8, 8), classification=True)
    volume = cube_volume("shape_200x160x40_oblique", (0.72, 0.30, 0.62))
    result = explain_volume(model, volume.array, volume.ijk_to_ras,
                            {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "intensity": INTENSITY,
                             "spatial": {"mode": "sliding_window"}}, img_size=(32, 32, 32), method="raw", layer=0)
    on_ct = result.resample_to(volume.array.shape, volume.ijk_to_ras)
    assert on_ct.shape == volume.array.shape and on_ct.dtype == np.float32
    peak = apply_affine(volume.ijk_to_ras, np.unravel_index(np.argmax(on_ct), on_ct.shape))
    assert np.linalg.norm(peak - volume.centre_ras) <= peak_error(result, volume.centre_ras)["half_diagonal_mm"]


def test_bad_input_gives_one_error_and_leaves_the_array_alone(vit):
    affine = CASES["oblique_30_20"][1]
    resize = {"intensity": INTENSITY, "spatial": {"mode": "resize"}}
    nan_volume = _volume((40, 40, 40))
    nan_volume[3, 4, 5] = np.nan
    cases = [
        (_volume((40, 40)), affine, resize, "2D image"),
        (_volume((40, 1, 40)), affine, resize, "2D image"),
        (_volume((3, 40, 40, 40)), affine, resize, r"expects 1 channel\(s\)"),
        (_volume((40, 40, 40)), np.diag([1.0, 1.0, 0.0, 1.0]), resize, "ijk_to_ras: degenerate"),
        (_volume((40, 40, 40)), np.full((4, 4), np.nan), resize, "ijk_to_ras: contains NaN"),
        (_volume((40, 40, 40)), np.eye(3), resize, "ijk_to_ras: expected a 4x4"),
        (nan_volume, affine, resize, r"1 NaN or infinite voxel\(s\)"),
        (_volume((40, 40, 10)), np.eye(4), {**resize, "spacing": [1.0, 1.0, 2.0]}, "needs at least one patch"),
        (_volume((40, 40, 40)), affine, {"spatial": {"mode": "resise"}}, "preprocessing.spatial.mode"),
    ]
    for volume, matrix, prep, words in cases:
        before = _digest(volume)
        with pytest.raises(AttentionMapError, match=words):
            explain_volume(vit, volume, matrix, prep, img_size=IMG)
        assert _digest(volume) == before
    volume = _volume(SMALL)
    volume[:] = np.round(volume)
    before = _digest(volume)
    for method in ["rollout", "grad_rollout"]:
        explain_volume(
            vit,
            volume,
            affine,
            {"intensity": {"normalize": "zscore"}, "spatial": {"mode": "sliding_window"}},
            img_size=IMG,
            method=method,
        )
    assert _digest(volume) == before
    with pytest.raises(AttentionMapError, match="method"):
        explain_volume(vit, volume, affine, resize, img_size=IMG, method="gradcam")


def test_constant_volume_warns(vit):
    with pytest.warns(UserWarning, match="constant"):
        result = explain_volume(
            vit, np.zeros((40, 40, 40), np.int16), np.eye(4), {"spatial": {"mode": "resize"}}, img_size=IMG
        )
    assert result.grid.shape == (4, 6, 3)
