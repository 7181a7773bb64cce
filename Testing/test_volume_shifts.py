"""Half-patch shift averaging (``shift_average``): the views, a plain numpy reference, explain_volume and
explain_flip_averaged against it, invariance on a constant volume, class choice, dense outputs, progress,
cancel and bad input. Real (small, seeded) MONAI ViT and UNETR."""
import itertools
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import UNETR

import test_volume
from AttentionMapLib.core.flips import explain_flip_averaged, mean_view_probabilities
from AttentionMapLib.core.preprocess import preprocess_volume
from AttentionMapLib.core.shifts import (
    card_shift_average,
    half_patch_shifts,
    shift_average_from_spec,
    shift_window,
    shifted_view_logits,
)
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


def test_shifted_view_logits_equal_the_model_on_each_shifted_input(vit):
    tile = np.random.default_rng(2).normal(size=(2, 1, *IMG)).astype(np.float32)
    logits = shifted_view_logits(vit, torch.from_numpy(tile))
    assert logits.shape == (7, 2, 3) and logits.dtype == np.float32
    with torch.no_grad():
        for view, shift in enumerate(half_patch_shifts(PATCH)):
            moved = np.stack([[_numpy_shift(t[0], shift)] for t in tile])
            assert np.allclose(logits[view], vit(torch.from_numpy(moved))[0].numpy(), atol=1e-5), shift


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
def test_shift_average_equals_the_plain_reference_and_leaves_the_map_unchanged(vit, method):
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
    # the maps: the unshifted view's, each window weighted by its (now shift-averaged) probability
    unweighted = dict(common, window_weighting="none")
    assert np.allclose(explain_volume(vit, volume, OBLIQUE, SLIDING, shift_average=True, **unweighted).grid,
                       explain_volume(vit, volume, OBLIQUE, SLIDING, **unweighted).grid, atol=1e-6)
    assert result.prediction(["a", "b", "c"])["rule"].endswith(
        ", calibrated, each the mean over 7 half-patch-shifted views")


def test_with_flips_the_crop_rule_and_the_one_window_volume_run_agree(vit):
    """explain_flip_averaged (the evaluation's crops) and explain_volume apply one rule: 8 flips + 7 shifts."""
    volume = _volume(IMG, seed=7)
    x = preprocess_volume(volume, OBLIQUE, RESIZE, IMG, PATCH).as_tensor()[None]
    result = explain_volume(vit, volume, OBLIQUE, RESIZE, img_size=IMG, target=1, temperature=1.5,
                            flip_axes=(0, 1, 2), shift_average=True)
    grid, view_logits = explain_flip_averaged(vit, x, (0, 1, 2), target=1, shift_average=True)
    flips_only = explain_flip_averaged(vit, x, (0, 1, 2), target=1)[1]
    assert view_logits.shape == (15, 1, 3) and np.allclose(view_logits[:8], flips_only)
    assert np.allclose(view_logits[8:], shifted_view_logits(vit, x), atol=1e-6)
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


def test_dense_outputs_run_without_shifts_and_record_none():
    torch.manual_seed(0)
    unetr = UNETR(1, 2, (32, 32, 32), feature_size=4, hidden_size=32, mlp_dim=32, num_heads=2).eval()
    volume = _volume((48, 32, 32), seed=8)
    seen = []
    result = explain_volume(unetr, volume, np.eye(4), {"intensity": INTENSITY, "spatial": {"mode": "sliding_window"}},
                            shift_average=True, progress=seen.append)
    assert result.probabilities is None and not result.shift_average and result.prediction([]) is None
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_progress_counts_the_shifted_runs_and_cancel_stops_them(vit):
    volume, affine = _volume(SMALL, seed=9), CASES["lps_axes"][1]
    seen = []
    result = explain_volume(vit, volume, affine, SLIDING, img_size=IMG, shift_average=True, progress=seen.append)
    batches = -(-result.num_windows // 3)
    assert len(seen) == 2 * batches and seen[-1] == 1.0 and seen == sorted(seen)
    assert seen[batches - 1] == pytest.approx(7 / 8)  # 7 shifted runs per window, then one capture
    before, checks = volume.copy(), []
    with pytest.raises(Cancelled, match="cancelled after the shifted views of 3 of 8 windows"):
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


def test_a_shifted_views_map_spreads_back_onto_the_two_tokens_it_straddles():
    """benchmarks.view_averaging.spread_back: a shifted token covers half of token t - 1 and half of token t."""
    from benchmarks.view_averaging import spread_back

    grid = np.zeros((1, 4, 3, 2))
    grid[0, 2, 1, 1] = 8.0
    back = spread_back(grid, (4, 0, 4))
    expected = np.zeros_like(grid)
    expected[0, 1:3, 1, 0:2] = 2.0  # halved along axis 0 (tokens 1, 2) and along axis 2 (tokens 0, 1)
    assert np.array_equal(back, expected)
    edge = np.zeros((1, 4, 3, 2))
    edge[0, 0, 0, 0] = 1.0
    assert spread_back(edge, (0, 4, 0))[0, 0, 0, 0] == 0.5 and spread_back(edge, (0, 4, 0)).sum() == 0.5  # low face
