"""Half-patch shift averaging (``shift_average``): the views, spreading a shifted view's map back and its query
rows against voxel-level references, explain_volume and explain_views_averaged against plain references (maps,
query rows, probabilities), re-fusion, invariance on a constant volume, class choice, dense outputs, progress,
cancel and bad input. Real (small, seeded) MONAI ViT and UNETR."""
import itertools
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import UNETR

import test_volume
from AttentionMapLib import explain
from AttentionMapLib.core.flips import mean_view_probabilities
from AttentionMapLib.core.geometry import apply_affine
from AttentionMapLib.core.preprocess import preprocess_volume
from AttentionMapLib.core.shifts import (
    card_shift_average,
    half_patch_shifts,
    shift_average_from_spec,
    shift_window,
    shifted_query_rows,
    spread_back,
)
from AttentionMapLib.core.views import WindowView, explain_views_averaged, window_views
from AttentionMapLib.core.volume import explain_volume, window_starts
from AttentionMapLib.errors import AttentionMapError, Cancelled
from AttentionMapLib.model_cards import check_inference_defaults
from geometry_cases import CASES, INTENSITY
from test_volume import IMG, PATCH, SMALL, _volume

vit = test_volume.vit  # the same small, seeded MONAI ViT fixture

SLIDING = {"intensity": INTENSITY, "spatial": {"mode": "sliding_window", "sw_batch_size": 3}}
RESIZE = {"intensity": INTENSITY, "spatial": {"mode": "resize"}}
OBLIQUE = CASES["oblique_30_20"][1]  # oblique, anisotropic spacing (1.1, 0.9, 1.3) mm


def _numpy_shift(tile: np.ndarray, shift) -> np.ndarray:
    """The reference: pad the low faces by repeating the edge, keep the first len voxels per axis."""
    padded = np.pad(tile, [(int(s), 0) for s in shift], mode="edge")
    return padded[tuple(slice(0, n) for n in tile.shape)]


def _spread_reference(grid: np.ndarray, shift, patch) -> np.ndarray:
    """At voxel level: each view token's value split evenly over its voxels, view voxel v (v >= shift) put at the
    window's voxel v - shift (the repeated edge dropped), summed per window token."""
    voxels = np.kron(grid, np.ones(patch)) / np.prod(patch)
    window = np.zeros_like(voxels)
    window[tuple(slice(0, n - s) for n, s in zip(voxels.shape, shift))] = voxels[tuple(slice(s, None) for s in shift)]
    n1, n2, n3 = grid.shape
    return window.reshape(n1, patch[0], n2, patch[1], n3, patch[2]).sum(axis=(1, 3, 5))


def _query_reference(token, shift, patch, grid_shape) -> dict:
    """At voxel level: the share of the window token's voxels (those still inside the view) per view token."""
    counts = {}
    ranges = [range(t * p + s, min(t * p + p + s, n * p)) for t, s, p, n in zip(token, shift, patch, grid_shape)]
    for voxel in itertools.product(*ranges):
        key = tuple(v // p for v, p in zip(voxel, patch))
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    return {key: count / total for key, count in counts.items()}


def _view_reference_map(model, x: torch.Tensor, view: WindowView, target, query=None, **options) -> np.ndarray:
    """One view's unnormalised map (n1, n2, n3) on the window's tokens, from engine.explain and the references
    above: the window numpy-flipped then numpy-shifted, the map spread back then flipped back; a query token
    reads the weighted rows of `_query_reference`."""
    tile = np.flip(x[0, 0].numpy(), view.flips) if view.flips else x[0, 0].numpy()
    moved = torch.from_numpy(np.ascontiguousarray(_numpy_shift(tile, view.shift))[None, None])
    grid_shape = tuple(n // p for n, p in zip(tile.shape, PATCH))
    if query is None:
        rows = {None: 1.0}
    else:
        flipped = tuple(n - 1 - q if axis in view.flips else q for axis, (q, n) in enumerate(zip(query, grid_shape)))
        rows = _query_reference(flipped, view.shift, PATCH, grid_shape)
    grid = sum(weight * explain(model, moved, target=target, query=row, normalize="none", **options).grid[0]
               .astype(np.float64) for row, weight in rows.items())
    back = _spread_reference(grid, view.shift, PATCH)
    return np.flip(back, view.flips) if view.flips else back


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_the_views_are_the_seven_half_patch_moves():
    assert half_patch_shifts((8, 8, 8)) == tuple(
        tuple(4 * b for b in bits) for bits in sorted(itertools.product((0, 1), repeat=3)) if any(bits))
    assert half_patch_shifts((16, 6, 4)) == ((0, 0, 2), (0, 3, 0), (0, 3, 2), (8, 0, 0), (8, 0, 2), (8, 3, 0),
                                              (8, 3, 2))
    assert half_patch_shifts((1, 8, 1)) == ((0, 4, 0),)  # a 1-voxel patch axis is never moved


def test_shift_window_equals_the_numpy_reference_on_a_non_cubic_batch():
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 3, 7, 10, 5)).astype(np.float32))
    for shift in [(0, 0, 0), (3, 0, 0), (0, 4, 0), (0, 0, 2), (3, 4, 2), (1, 9, 4)]:
        shifted = shift_window(x, shift)
        assert shifted.shape == x.shape and shifted.dtype == x.dtype
        expected = np.stack([np.stack([_numpy_shift(c, shift) for c in b]) for b in x.numpy()])
        assert np.array_equal(shifted.numpy(), expected), shift
    assert not torch.equal(shift_window(x, (3, 0, 0)), x)


def test_spread_back_and_the_query_rows_equal_the_voxel_level_references():
    rng = np.random.default_rng(5)
    for shape, shift, patch in [((4, 3, 2), (4, 0, 4), (8, 8, 8)), ((3, 4, 5), (2, 1, 3), (5, 4, 6)),
                                ((2, 2, 2), (0, 0, 0), (8, 8, 8)), ((5, 1, 3), (3, 0, 0), (7, 1, 2))]:
        grid = rng.random(shape)
        back = spread_back(grid[None], shift, patch)  # batched: (1, n1, n2, n3)
        assert back.shape == (1, *shape) and back.dtype == np.float64
        assert np.allclose(back[0], _spread_reference(grid, shift, patch)), (shift, patch)
        for token in itertools.product(*[range(n) for n in shape]):
            rows = dict(shifted_query_rows(token, shift, patch, shape))
            expected = _query_reference(token, shift, patch, shape)
            assert rows.keys() == expected.keys() and all(np.isclose(rows[k], expected[k]) for k in rows), token
    one = np.zeros((4, 3, 2))
    one[2, 1, 1] = 8.0
    expected = np.zeros_like(one)
    expected[1:3, 1, 0:2] = 2.0  # half to tokens 1, 2 along axis 0 and half to tokens 0, 1 along axis 2
    assert np.array_equal(spread_back(one, (4, 0, 4), (8, 8, 8)), expected)


def test_the_views_of_a_run_and_their_windows(vit):
    views = window_views((0, 2), True, PATCH)
    assert [v.flips for v in views[:4]] == [(), (0,), (2,), (0, 2)] and len(views) == 11
    assert [v.shift for v in views[4:]] == list(half_patch_shifts(PATCH)) and not any(v.flips for v in views[4:])
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 1, *IMG)).astype(np.float32))
    both = WindowView(flips=(1,), shift=(4, 0, 4), patch_size=PATCH)
    expected = np.stack([[_numpy_shift(np.flip(t[0], 1), (4, 0, 4))] for t in x.numpy()])
    assert np.array_equal(both.window(x).numpy(), expected)
    assert window_views((), False, PATCH) == (WindowView(patch_size=PATCH),)


def _shift_reference(model, volume, affine, temperature):
    """Window probabilities (W, K) computed plainly: per window of the preprocessed input, the mean of the softmax
    over the window as it is and its 7 numpy-shifted copies."""
    image = preprocess_volume(volume, affine, SLIDING, IMG, PATCH)[0].numpy()
    rows = []
    for start in itertools.product(*[window_starts(s, w, p, 0.25) for s, w, p in zip(image.shape, IMG, PATCH)]):
        tile = image[tuple(slice(a, a + w) for a, w in zip(start, IMG))]
        views = [tile] + [_numpy_shift(tile, s) for s in half_patch_shifts(PATCH)]
        with torch.no_grad():
            logits = model(torch.from_numpy(np.stack(views)[:, None].astype(np.float32)))[0].numpy()
        rows.append(_softmax(logits, temperature).mean(axis=0))
    return np.array(rows)


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_shift_average_probabilities_equal_the_plain_reference_and_the_maps_change(vit, method):
    volume = _volume(SMALL, seed=3)
    common = dict(img_size=IMG, method=method, target=1, normalize="none", temperature=1.7)
    result = explain_volume(vit, volume, OBLIQUE, SLIDING, shift_average=True, **common)
    plain = explain_volume(vit, volume, OBLIQUE, SLIDING, **common)
    expected = _shift_reference(vit, volume, OBLIQUE, 1.7)
    assert result.shift_average and not plain.shift_average and result.num_windows == len(expected) == 8
    assert np.allclose(result.window_probabilities, expected, atol=1e-5)
    assert not np.allclose(plain.window_probabilities, expected, atol=1e-3)  # the shifts do change them
    assert result.decisive_window == int(expected[:, 1].argmax())
    assert np.allclose(result.probabilities, expected[result.decisive_window], atol=1e-5)
    assert not np.allclose(result.grid, plain.grid, atol=1e-4)  # the shifted views' maps count too
    assert result.prediction(["a", "b", "c"])["rule"].endswith(
        ", calibrated, each the mean over 7 half-patch-shifted views")


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_a_windows_map_is_the_mean_of_every_views_map_put_back(vit, method):
    """One window (resize mode): explain_volume and explain_views_averaged against the plain reference: per view
    engine.explain of the numpy-flipped or numpy-shifted input, its map spread back at voxel level, flipped back."""
    volume = _volume(IMG, seed=7)
    x = preprocess_volume(volume, OBLIQUE, RESIZE, IMG, PATCH).as_tensor()[None]
    result = explain_volume(vit, volume, OBLIQUE, RESIZE, img_size=IMG, method=method, target=1, normalize="none",
                            flip_axes=(1,), shift_average=True)
    views = window_views((1,), True, PATCH)
    expected = np.mean([_view_reference_map(vit, x, view, 1, method=method) for view in views], axis=0)
    tolerance = 1e-5 * max(1.0, float(np.abs(expected).max()))
    assert len(views) == 9 and np.allclose(result.grid, expected, atol=tolerance)
    grid, view_logits = explain_views_averaged(vit, x, (1,), True, normalize="none", method=method, target=1)
    assert view_logits.shape == (9, 1, 3) and np.allclose(grid[0], expected, atol=tolerance)
    unshifted = explain_volume(vit, volume, OBLIQUE, RESIZE, img_size=IMG, method=method, target=1,
                               normalize="none", flip_axes=(1,))
    assert not np.allclose(unshifted.grid, expected, atol=tolerance)


@pytest.mark.parametrize("token, method", [((3, 5, 2), "raw"), ((0, 0, 0), "raw"), ((1, 2, 1), "rollout")])
def test_a_query_reads_the_rows_of_each_views_tokens_that_hold_it(vit, token, method):
    """Query rows: in a shifted view, the rows of the one to eight view tokens holding the token's voxels, weighted
    by their share (the top face's token (3, 5, 2): its shifted-out half not counted)."""
    volume = _volume(IMG, seed=12)
    x = preprocess_volume(volume, OBLIQUE, RESIZE, IMG, PATCH).as_tensor()[None]
    common = dict(img_size=IMG, target=1, normalize="none", method=method, layer=0)
    plain = explain_volume(vit, volume, OBLIQUE, RESIZE, **common)
    point = apply_affine(plain.ijk_to_ras, np.array(token, dtype=float) + [0.2, -0.3, 0.1])
    result = explain_volume(vit, volume, OBLIQUE, RESIZE, query_ras=point, flip_axes=(2,), shift_average=True,
                            **common)
    expected = np.mean([_view_reference_map(vit, x, view, 1, query=token, method=method, layer=0)
                        for view in window_views((2,), True, PATCH)], axis=0)
    assert np.allclose(result.grid, expected, atol=1e-6 * max(1.0, float(np.abs(expected).max())))
    with pytest.raises(AttentionMapError, match="query: not available when averaging views of one model input"):
        explain_views_averaged(vit, x, (2,), True, query=token)


def test_fuse_again_after_a_shift_averaged_run_equals_a_fresh_run(vit):
    volume = _volume(SMALL, seed=13)
    common = dict(img_size=IMG, target=1, flip_axes=(0,), shift_average=True)
    first = explain_volume(vit, volume, OBLIQUE, SLIDING, method="rollout", **common)
    again = first.fuse_again(method="raw", layer=0)
    fresh = explain_volume(vit, volume, OBLIQUE, SLIDING, method="raw", layer=0, **common)
    assert np.allclose(again.grid, fresh.grid, atol=1e-6) and not np.allclose(again.grid, first.grid, atol=1e-3)


def test_with_flips_the_crop_rule_and_the_one_window_volume_run_agree(vit):
    """explain_views_averaged (the evaluation's crops) and explain_volume apply one rule: 8 flips + 7 shifts."""
    volume = _volume(IMG, seed=7)
    x = preprocess_volume(volume, OBLIQUE, RESIZE, IMG, PATCH).as_tensor()[None]
    result = explain_volume(vit, volume, OBLIQUE, RESIZE, img_size=IMG, target=1, temperature=1.5,
                            flip_axes=(0, 1, 2), shift_average=True)
    grid, view_logits = explain_views_averaged(vit, x, (0, 1, 2), True, target=1)
    flips_only = explain_views_averaged(vit, x, (0, 1, 2), target=1)[1]
    assert view_logits.shape == (15, 1, 3) and np.allclose(view_logits[:8], flips_only)
    with torch.no_grad():
        for view, shift in enumerate(half_patch_shifts(PATCH)):
            moved = torch.from_numpy(_numpy_shift(x[0, 0].numpy(), shift)[None, None])
            assert np.allclose(view_logits[8 + view], vit(moved)[0].numpy(), atol=1e-5), shift
    assert np.allclose(grid[0], result.grid, atol=1e-5)
    assert np.allclose(mean_view_probabilities(view_logits, 1.5)[0], result.probabilities, atol=1e-6)
    assert np.allclose(result.window_logits[0], view_logits.mean(axis=0)[0], atol=1e-5)
    assert result.prediction(["a", "b", "c"])["rule"].endswith(
        "each the mean over 8 flipped views and 7 half-patch-shifted views")


def test_a_constant_volume_is_unchanged_by_the_shifts(vit):
    """Edge-repeating shifts of a constant window are the window itself: every view gives the same logits."""
    volume, affine = np.full(IMG, 40.0, dtype=np.float32), np.diag([1.2, 0.9, 2.0, 1.0])  # no resampling, no pad
    with pytest.warns(UserWarning, match="the volume is constant"):
        shifted = explain_volume(vit, volume, affine, RESIZE, img_size=IMG, shift_average=True)
        plain = explain_volume(vit, volume, affine, RESIZE, img_size=IMG)
    assert shifted.shift_average and np.allclose(shifted.window_probabilities, plain.window_probabilities, atol=1e-6)
    ramp = volume + np.arange(IMG[0], dtype=np.float32)[:, None, None] * 50.0  # not constant: the shifts tell
    assert not np.allclose(explain_volume(vit, ramp, affine, RESIZE, img_size=IMG, shift_average=True).probabilities,
                           explain_volume(vit, ramp, affine, RESIZE, img_size=IMG).probabilities, atol=1e-4)


def test_a_gradient_method_without_target_picks_the_class_from_every_view(vit):
    volume = _volume(SMALL, seed=11)
    result = explain_volume(vit, volume, OBLIQUE, SLIDING, img_size=IMG, method="grad_rollout", shift_average=True)
    expected = _shift_reference(vit, volume, OBLIQUE, 1.0)
    assert result.target == int(expected.max(axis=0).argmax())
    assert np.allclose(result.window_probabilities, expected, atol=1e-5)


def test_dense_outputs_average_the_shifted_views_maps_without_a_prediction():
    torch.manual_seed(0)
    unetr = UNETR(1, 2, (32, 32, 32), feature_size=4, hidden_size=32, mlp_dim=32, num_heads=2).eval()
    volume = _volume((48, 32, 32), seed=8)
    preprocessing = {"intensity": INTENSITY, "spatial": {"mode": "sliding_window"}}
    seen = []
    result = explain_volume(unetr, volume, np.eye(4), preprocessing, shift_average=True, progress=seen.append)
    plain = explain_volume(unetr, volume, np.eye(4), preprocessing)
    assert result.probabilities is None and result.shift_average and result.prediction([]) is None
    assert not np.allclose(result.grid, plain.grid, atol=1e-4)
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_progress_counts_every_views_runs_and_cancel_stops_them(vit):
    volume, affine = _volume(SMALL, seed=9), CASES["lps_axes"][1]
    seen = []
    result = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, shift_average=True, progress=seen.append)
    batches = -(-result.num_windows // 3)
    assert len(seen) == 8 * batches and seen[-1] == 1.0 and seen == sorted(seen)
    assert seen[batches - 1] == pytest.approx(1 / 8)  # the window as it is, then each of the 7 shifted views
    before, checks = volume.copy(), []
    with pytest.raises(Cancelled, match="cancelled after 3 of 8 windows"):
        explain_volume(vit, volume, affine, SLIDING, img_size=IMG, shift_average=True,
                       cancel=lambda: checks.append(1) or len(checks) > 1)
    assert np.array_equal(volume, before)


@pytest.mark.parametrize("bad", ["yes", 1, None, [True]])
def test_bad_shift_average_gives_one_clear_error(vit, bad):
    volume = _volume(IMG)
    before = volume.copy()
    with pytest.raises(AttentionMapError, match=r"shift_average: expected true or false"):
        explain_volume(vit, volume, OBLIQUE, RESIZE, img_size=IMG, shift_average=bad)
    assert np.array_equal(volume, before)


def test_the_card_default_and_the_user_choice(tmp_path):
    assert card_shift_average({"default_shift_average": True}) and not card_shift_average({})
    assert shift_average_from_spec("default", {"default_shift_average": True})
    assert not shift_average_from_spec("off", {"default_shift_average": True})
    assert shift_average_from_spec("on", None) and shift_average_from_spec(True, None)
    with pytest.raises(AttentionMapError, match=r"^default_shift_average: expected true or false .*got 'yes'"):
        check_inference_defaults(json.loads('{"default_shift_average": "yes"}'))
    with pytest.raises(AttentionMapError, match=r"expected 'default', 'on', 'off' or a bool\): expected true or false"):
        shift_average_from_spec("sometimes", None)


@pytest.mark.parametrize("method, target, query", [("rollout", 1, False), ("grad_rollout", None, False),
                                                   ("raw", 0, True)])
def test_without_the_cache_the_result_is_the_same_and_re_fusion_is_refused(vit, method, target, query):
    """keep_cache=False (what `attention-map run` uses) reads each batch's maps out as it is captured and frees the
    capture: the same grid, probabilities and decisive window as the cached run, with flips, shifts, a region and
    a query point; a gradient method without a target picks the same class; no attention is kept, so re-fusion is
    refused with a message."""
    from AttentionMapLib.core.region import BoxRegion

    volume = _volume(SMALL, seed=17)
    shape = preprocess_volume(volume, OBLIQUE, SLIDING, IMG, PATCH).shape[1:]
    affine = preprocess_volume(volume, OBLIQUE, SLIDING, IMG, PATCH).affine.numpy()
    point = apply_affine(affine, (np.asarray(shape) - 1) * 0.4)
    common = dict(img_size=IMG, method=method, target=target, flip_axes=(0,), shift_average=True, layer=-1,
                  region=BoxRegion(tuple(apply_affine(affine, (np.asarray(shape) - 1) * 0.45)), (70, 90, 50)),
                  query_ras=point if query else None, temperature=0.7)
    cached = explain_volume(vit, volume, OBLIQUE, SLIDING, **common)
    streamed = explain_volume(vit, volume, OBLIQUE, SLIDING, keep_cache=False, **common)
    assert streamed._tiling.captures == () and len(streamed._tiling.mean_maps) == cached.num_windows
    assert np.allclose(streamed.grid, cached.grid, atol=1e-6) and np.abs(cached.grid).max() > 0
    np.testing.assert_allclose(streamed.window_probabilities, cached.window_probabilities, atol=1e-6)
    assert streamed.decisive_window == cached.decisive_window and streamed.target == cached.target
    with pytest.raises(AttentionMapError, match="keep_cache=False"):
        streamed.fuse_again(method="raw")
