"""Geometry helpers: axis order, LPS/RAS, affine checks, token-grid affine, export resampling."""
import itertools

import numpy as np
import pytest

from AttentionMapLib.core.geometry import (
    apply_affine,
    check_ijk_to_ras,
    crop,
    ijk_to_kji,
    kji_to_ijk,
    lps_to_ras,
    peak_index,
    ras_to_ijk,
    resample_grid,
    rotation,
    token_grid_affine,
    voxel_spacing,
)
from AttentionMapLib.errors import AttentionMapError
from geometry_cases import CASES, OBLIQUE


def test_kji_to_ijk_reverses_axes_and_is_self_inverse():
    kji = np.arange(4 * 3 * 2).reshape(4, 3, 2)  # (K, J, I)
    ijk = kji_to_ijk(kji)
    assert ijk.shape == (2, 3, 4)
    assert ijk[1, 2, 3] == kji[3, 2, 1]
    assert np.array_equal(ijk_to_kji(ijk), kji)
    vector = np.arange(5 * 4 * 3 * 2).reshape(5, 4, 3, 2)  # Slicer vector volume (K, J, I, C)
    assert kji_to_ijk(vector).shape == (2, 3, 4, 5)  # (C, I, J, K)
    assert kji_to_ijk(vector)[1, 2, 3, 4] == vector[4, 3, 2, 1]


def test_lps_to_ras_negates_x_and_y_and_is_self_inverse():
    m = np.eye(4)
    m[:3, :3] = OBLIQUE * 1.5
    m[:3, 3] = [10.0, -20.0, 30.0]
    ras = lps_to_ras(m)
    point_lps = apply_affine(m, [1.0, 2.0, 3.0])
    assert np.allclose(apply_affine(ras, [1.0, 2.0, 3.0]), point_lps * [-1, -1, 1])
    assert np.allclose(lps_to_ras(ras), m)


@pytest.mark.parametrize("matrix, words", [
    (np.eye(3), "4x4"),
    (np.diag([1.0, 1.0, np.nan, 1.0]), "NaN"),
    (np.diag([1.0, 0.0, 1.0, 1.0]), "degenerate"),
    (np.array([[1, 2, 0, 0], [2, 4, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "degenerate"),
    (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]), "last row"),
    ("not a matrix", "4x4"),
])
def test_check_ijk_to_ras_refuses_unusable_matrices(matrix, words):
    with pytest.raises(AttentionMapError, match=words):
        check_ijk_to_ras(matrix)


def test_token_grid_affine_puts_token_centres_on_patch_centres():
    voxel = CASES["shape_200x160x40_oblique"][1]
    patch = (8, 4, 2)
    tokens = token_grid_affine(voxel, patch, offset_voxels=(16, 8, 0))
    # token (1, 2, 3) covers voxels 16+8..16+15, 8+8..8+11, 6..7: centre (27.5, 17.5, 6.5)
    assert np.allclose(apply_affine(tokens, [1, 2, 3]), apply_affine(voxel, [27.5, 17.5, 6.5]))
    assert np.allclose(voxel_spacing(tokens), voxel_spacing(voxel) * patch)
    assert np.allclose(ras_to_ijk(tokens, apply_affine(tokens, [0.3, 1.7, 2.2])), [0.3, 1.7, 2.2])


def test_peak_index():
    grid = np.zeros((3, 4, 5))
    grid[2, 1, 3] = 1.0
    assert peak_index(grid) == (2, 1, 3)


def test_resample_grid_is_trilinear_inside_constant_at_the_rim_and_zero_outside():
    rng = np.random.default_rng(1)
    shape = (4, 6, 3)
    grid_affine = token_grid_affine(CASES["oblique_30_20"][1], (8, 8, 8))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    coefficients = np.array([0.7, -0.3, 1.1])
    grid = (ijk @ coefficients + 2.0).astype(np.float32)  # linear in the index: trilinear reproduces it
    target_affine = CASES["oblique_30_20"][1] @ np.diag([1.7, 1.3, 2.1, 1.0])  # another grid, same frame
    target_shape = (30, 40, 20)
    out = resample_grid(grid, grid_affine, target_shape, target_affine, max_points=5000)  # several slabs
    assert out.dtype == np.float32 and out.shape == target_shape
    target_ijk = np.stack(np.meshgrid(*[np.arange(n) for n in target_shape], indexing="ij"), axis=-1)
    source = ras_to_ijk(grid_affine, apply_affine(target_affine, target_ijk))
    n = np.array(shape)
    hull = np.all((source >= 0) & (source <= n - 1), axis=-1)
    rim = np.all((source >= -0.5) & (source <= n - 0.5), axis=-1) & ~hull
    outside = ~np.all((source >= -0.5) & (source <= n - 0.5), axis=-1)
    assert hull.sum() > 100 and rim.sum() > 100 and outside.sum() > 100
    assert np.allclose(out[hull], source[hull] @ coefficients + 2.0, atol=1e-4)
    clamped = np.clip(source[rim], 0, n - 1)
    assert np.allclose(out[rim], clamped @ coefficients + 2.0, atol=1e-4)
    assert np.all(out[outside] == 0.0)
    # a one-voxel target placed exactly on a token centre returns that token's value
    i, j, k = rng.integers(0, shape)
    on_token = grid_affine @ _translation([i, j, k])
    assert np.isclose(resample_grid(grid, grid_affine, (1, 1, 1), on_token)[0, 0, 0], grid[i, j, k], atol=1e-4)


def trilinear_reference(grid: np.ndarray, index: np.ndarray) -> float:
    """The value at one continuous index (3,), written from the formula: 0 outside the box (voxel centres +- half
    a voxel); else the index clamped to [0, n - 1] and the 8 surrounding voxels weighted by the products of
    (1 - f) and f along each axis (an axis of one voxel: that voxel)."""
    n = np.array(grid.shape)
    if np.any(index < -0.5) or np.any(index > n - 0.5):
        return 0.0
    x = np.clip(index, 0, n - 1)
    low = np.minimum(np.floor(x), np.maximum(n - 2, 0)).astype(int)
    f = x - low
    total = 0.0
    for corner in itertools.product((0, 1), repeat=3):
        weight = np.prod([f[a] if corner[a] else 1.0 - f[a] for a in range(3)])
        total += weight * grid[tuple(np.minimum(low + corner, n - 1))]
    return float(total)


@pytest.mark.parametrize("shape", [(5, 4, 3), (6, 1, 4)])
def test_resample_grid_equals_plain_trilinear_interpolation_on_an_oblique_grid(shape):
    """Random values (not linear: every corner weight matters) on an oblique, anisotropic token grid, resampled
    onto another oblique, non-cubic grid in slabs; every voxel against the formula. (6, 1, 4): a one-voxel axis."""
    grid = np.random.default_rng(4).random(shape).astype(np.float32)
    grid_affine = token_grid_affine(CASES["oblique_30_20"][1], (8, 8, 8))
    target_to_grid = np.eye(4)  # rotated against the token grid, steps of 0.23 to 0.61 tokens
    target_to_grid[:3, :3] = rotation(1, 25.0) @ rotation(2, -15.0) @ np.diag([0.31, 0.23, 0.61])
    target_to_grid[:3, 3] = (-1.2, -1.1, -0.9)
    target_affine = grid_affine @ target_to_grid
    target_shape = (23, 17, 9)
    out = resample_grid(grid, grid_affine, target_shape, target_affine, max_points=23 * 17 * 2)  # 5 slabs
    source = ras_to_ijk(grid_affine, apply_affine(target_affine, np.indices(target_shape).reshape(3, -1).T))
    expected = np.array([trilinear_reference(grid, point) for point in source]).reshape(target_shape)
    assert (expected > 0).sum() > 300 and (expected == 0).sum() > 300  # voxels inside and outside the box
    np.testing.assert_allclose(out, expected, atol=1e-5)


def _translation(offset):
    t = np.eye(4)
    t[:3, 3] = offset
    return t


def test_crop_keeps_every_kept_voxel_at_its_ras_position():
    affine = CASES["oblique_30_20"][1]
    array = np.random.default_rng(0).random((2, 9, 8, 7)).astype(np.float32)  # (C, I, J, K)
    part, moved = crop(array, affine, (2, 1, 3), (7, 8, 6))
    assert part.shape == (2, 5, 7, 3) and np.shares_memory(part, array) is False
    assert part[1, 0, 0, 0] == array[1, 2, 1, 3] and part[0, 4, 6, 2] == array[0, 6, 7, 5]
    assert np.allclose(apply_affine(moved, [4, 6, 2]), apply_affine(affine, [6, 7, 5]))
    assert np.allclose(moved[:3, :3], affine[:3, :3])
