"""Flip averaging in explain_volume (``flip_axes``): a plain reference, group invariance, re-fusion, bad input.

Real (small, seeded) MONAI ViT; the reference runs ``engine.explain`` on every flipped window of the
preprocessed input, flips each token map back by hand and averages, weights and blends as documented.
"""
import itertools

import numpy as np
import pytest
import torch

import test_volume
from AttentionMapLib.core import engine
from AttentionMapLib.core.flips import mean_view_probabilities
from AttentionMapLib.core.geometry import apply_affine
from AttentionMapLib.core.preprocess import preprocess_volume
from AttentionMapLib.core.views import WindowView, explain_views_averaged
from AttentionMapLib.core.volume import explain_volume, window_starts
from AttentionMapLib.errors import AttentionMapError
from geometry_cases import CASES, INTENSITY
from test_volume import IMG, PATCH, SMALL, _volume

vit = test_volume.vit  # the same small, seeded MONAI ViT fixture

SLIDING = {"intensity": INTENSITY, "spatial": {"mode": "sliding_window", "sw_batch_size": 3}}
RESIZE = {"intensity": INTENSITY, "spatial": {"mode": "resize"}}
OBLIQUE = CASES["oblique_30_20"][1]  # oblique, anisotropic spacing (1.1, 0.9, 1.3) mm


def _all_flips(axes):
    return [view for count in range(len(axes) + 1) for view in itertools.combinations(axes, count)]


def _reference(model, volume, affine, axes, target, query_token=None, **options):
    """(blended unnormalised grid, window probabilities (W, K)) computed plainly: per window and view,
    engine.explain on the flipped window, map flipped back, views averaged, times the mean over views of
    the window's softmax probability of `target`, windows averaged where they overlap."""
    image = preprocess_volume(volume, affine, SLIDING, IMG, PATCH)[0].numpy()
    n = np.array(IMG) // PATCH
    total = np.zeros(tuple(np.array(image.shape) // PATCH))
    count = np.zeros_like(total)
    probabilities = []
    for start in itertools.product(*[window_starts(s, w, p, 0.25) for s, w, p in zip(image.shape, IMG, PATCH)]):
        offset = np.array(start) // PATCH
        tile = image[tuple(slice(a, a + w) for a, w in zip(start, IMG))]
        maps, probs = [], []
        for view in _all_flips(axes):
            x = torch.from_numpy(np.ascontiguousarray(np.flip(tile, axis=view) if view else tile))[None, None]
            query = None
            if query_token is not None:
                local = np.array(query_token) - offset
                if np.any(local < 0) or np.any(local >= n):
                    break
                query = tuple(int(n[a] - 1 - v) if a in view else int(v) for a, v in enumerate(local))
            result = engine.explain(model, x, target=target, query=query, normalize="none", **options)
            maps.append(np.flip(result.grid[0], axis=view) if view else result.grid[0])
            probs.append(torch.softmax(result.logits.detach(), dim=1)[0].numpy())
        probabilities.append(np.mean(probs, axis=0) if probs else None)
        if maps:
            region = tuple(slice(o, o + m) for o, m in zip(offset, n))
            total[region] += np.mean(probs, axis=0)[target] * np.mean(maps, axis=0)
            count[region] += 1
    return np.where(count > 0, total / np.maximum(count, 1), 0.0), probabilities


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_flip_average_equals_the_plain_reference_on_an_oblique_sliding_window_volume(vit, method):
    volume = _volume(SMALL, seed=3)
    result = explain_volume(vit, volume, OBLIQUE, SLIDING, img_size=IMG, method=method, target=1,
                            normalize="none", flip_axes=(2, 0, 1))
    expected, probabilities = _reference(vit, volume, OBLIQUE, (0, 1, 2), 1, method=method)
    assert result.num_windows == len(probabilities) == 8 and result.flip_axes == (0, 1, 2)
    assert np.allclose(result.window_probabilities, np.array(probabilities), atol=1e-5)
    assert np.allclose(result.probabilities, result.window_probabilities[result.window_probabilities[:, 1].argmax()])
    assert np.allclose(result.grid, expected, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    single = explain_volume(vit, volume, OBLIQUE, SLIDING, img_size=IMG, method=method, target=1, normalize="none")
    assert not np.allclose(single.grid, result.grid, atol=1e-4)  # the views do change the map


def test_flip_average_of_a_query_row_flips_the_query_token_in_each_view(vit):
    volume = _volume(SMALL, seed=4)
    plain = explain_volume(vit, volume, OBLIQUE, SLIDING, img_size=IMG, target=2, normalize="none",
                           flip_axes=(0, 2))
    token = (0, 0, 0)  # held only by the windows starting at the volume corner
    point = apply_affine(plain.ijk_to_ras, np.array(token, dtype=float) + [0.3, -0.4, 0.2])
    result = explain_volume(vit, volume, OBLIQUE, SLIDING, img_size=IMG, target=2, normalize="none",
                            flip_axes=(0, 2), query_ras=point, method="raw", layer=0)
    expected, _ = _reference(vit, volume, OBLIQUE, (0, 2), 2, query_token=token, method="raw", layer=0)
    assert 0 < np.count_nonzero(expected) < expected.size
    assert np.allclose(result.grid, expected, atol=1e-6)


def test_flipping_the_model_input_flips_the_flip_averaged_map(vit):
    """With an axis-aligned RAS affine and a volume of the model's input size, preprocessing is pointwise,
    so flipping the array flips the model input; the 8-view average is then the flipped map."""
    volume, affine = _volume(IMG, seed=5), np.diag([1.2, 0.9, 2.0, 1.0])
    axes = (0, 2)
    flipped_volume = np.ascontiguousarray(np.flip(volume, axis=axes))
    for method in ("rollout", "grad_rollout"):
        options = dict(img_size=IMG, method=method, normalize="none", flip_axes=(0, 1, 2))
        result = explain_volume(vit, volume, affine, RESIZE, **options)
        flipped = explain_volume(vit, flipped_volume, affine, RESIZE, **options)
        assert np.allclose(flipped.grid, np.flip(result.grid, axis=axes), atol=1e-5)
        assert np.allclose(flipped.probabilities, result.probabilities, atol=1e-6)
        assert flipped.target == result.target
    single = dict(img_size=IMG, normalize="none")
    plain = explain_volume(vit, volume, affine, RESIZE, **single).grid
    assert not np.allclose(explain_volume(vit, flipped_volume, affine, RESIZE, **single).grid,
                           np.flip(plain, axis=axes), atol=1e-4)  # a single view is not invariant


def test_fuse_again_after_a_flip_averaged_run_equals_a_fresh_flip_averaged_run(vit):
    volume = _volume(SMALL, seed=6)
    common = dict(img_size=IMG, target=0, flip_axes=(1,))
    first = explain_volume(vit, volume, OBLIQUE, SLIDING, **common)
    assert sum(c.batch_size for c in first._tiling.captures) == 2 * first.num_windows == 16
    assert [view.flips for view in first._tiling.views] == [(), (1,)]
    point = apply_affine(first.ijk_to_ras, [1.0, 2.0, 2.0])
    changes = [dict(method="raw", layer=0, normalize="percentile"), dict(discard_ratio=0.5),
               dict(query_ras=point, normalize="none")]
    for change in changes:
        again = first.fuse_again(**change)
        fresh = explain_volume(vit, volume, OBLIQUE, SLIDING, **common, **change)
        assert np.allclose(again.grid, fresh.grid, atol=1e-6), change
        assert again.flip_axes == fresh.flip_axes == (1,)
        assert np.allclose(again.probabilities, fresh.probabilities)


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_flip_averaging_one_model_input_equals_the_one_window_volume_run(vit, method):
    """explain_views_averaged (the evaluation's crops) and explain_volume in resize mode apply one rule."""
    volume = _volume(IMG, seed=7)
    x = preprocess_volume(volume, OBLIQUE, RESIZE, IMG, PATCH).as_tensor()[None]
    result = explain_volume(vit, volume, OBLIQUE, RESIZE, img_size=IMG, method=method, target=1, temperature=1.5,
                            flip_axes=(0, 1, 2))
    grid, view_logits = explain_views_averaged(vit, x, (0, 1, 2), method=method, target=1)
    assert view_logits.shape == (8, 1, 3) and result.num_windows == 1
    assert np.allclose(grid[0], result.grid, atol=1e-5)
    assert np.allclose(mean_view_probabilities(view_logits, 1.5)[0], result.probabilities, atol=1e-6)
    assert not np.allclose(mean_view_probabilities(view_logits[:1], 1.5)[0], result.probabilities, atol=1e-4)


@pytest.mark.parametrize("bad", [(3,), (0, 0), (-1,), (True,), ("x",), 1, (0.5,)])
def test_bad_flip_axes_give_one_clear_error(vit, bad):
    volume = _volume(IMG)
    before = volume.copy()
    with pytest.raises(AttentionMapError, match=r"flip_axes: expected distinct model-input axes among 0, 1, 2"):
        explain_volume(vit, volume, OBLIQUE, RESIZE, img_size=IMG, flip_axes=bad)
    assert np.array_equal(volume, before)


def test_without_flip_axes_the_result_records_no_flips(vit):
    result = explain_volume(vit, _volume(IMG), OBLIQUE, RESIZE, img_size=IMG)
    assert result.flip_axes == () and result._tiling.views == (WindowView(patch_size=PATCH),)
