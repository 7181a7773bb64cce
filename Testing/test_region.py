"""Regions (where to look): windows outside are not run, the map is 0 outside, regions live in patient space.

Real (small, seeded) MONAI ViTs on oblique, anisotropic, non-cubic volumes; the expected windows and
tokens are computed here from the box / mask definition, voxel by voxel.
"""
import itertools

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib.core.geometry import apply_affine, rotation
from AttentionMapLib.core.preprocess import preprocess_volume
from AttentionMapLib.core.region import (
    BoxRegion,
    LungFieldRegion,
    MaskRegion,
    box_region,
    card_default_region,
    sample_nearest,
)
from AttentionMapLib.core.volume import explain_volume, window_starts
from AttentionMapLib.errors import AttentionMapError
from geometry_cases import CASES, INTENSITY, OBLIQUE

IMG, PATCH = (32, 48, 24), (8, 8, 8)
PREP = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "intensity": INTENSITY,
        "spatial": {"mode": "sliding_window", "overlap": 0.25, "sw_batch_size": 4}}
CASE = "shape_200x160x40_oblique"  # oblique directions, 0.8 x 0.8 x 2.5 mm, 200 x 160 x 40 voxels


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return ViT(1, IMG, PATCH, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, classification=True,
               num_classes=2, post_activation=None).eval()


def _volume(seed=0):
    shape, affine = CASES[CASE]
    return (np.random.default_rng(seed).random(shape) * 2000.0 - 1000.0).astype(np.float32), affine


def _windows_and_voxels(volume, affine):
    """Model-input grid (shape, ijk_to_ras) and every window start (W, 3), as explain_volume cuts them."""
    image = preprocess_volume(volume, affine, PREP, IMG, PATCH)
    shape = image.shape[1:]
    axes = [window_starts(s, w, p, 0.25) for s, w, p in zip(shape, IMG, PATCH)]
    return shape, image.affine.numpy(), np.array(list(itertools.product(*axes)))


def _inside_box(points_ras, centre, size, axes):
    local = (points_ras - np.asarray(centre)) @ axes
    return np.all(np.abs(local) <= np.asarray(size) / 2.0, axis=1)


def test_box_region_skips_windows_and_zeroes_the_map_outside(vit):
    volume, affine = _volume()
    shape, model_affine, starts = _windows_and_voxels(volume, affine)
    centre = apply_affine(model_affine, (np.array(shape) - 1) * np.array([0.3, 0.6, 0.5]))
    size, axes = (40.0, 30.0, 24.0), rotation(2, 25.0) @ rotation(1, 10.0)
    voxel_inside = _inside_box(apply_affine(model_affine, np.indices(shape).reshape(3, -1).T.astype(float)),
                               centre, size, axes).reshape(shape)
    expected_windows = [bool(voxel_inside[tuple(slice(a, a + w) for a, w in zip(s, IMG))].any()) for s in starts]
    assert 0 < sum(expected_windows) < len(starts)

    full = explain_volume(vit, volume, affine, PREP, img_size=IMG)
    boxed = explain_volume(vit, volume, affine, PREP, img_size=IMG, region=box_region(centre, size, axes))
    assert boxed.num_windows == sum(expected_windows) and full.num_windows == len(starts)
    assert boxed.region.windows_run == sum(expected_windows)
    assert boxed.region.windows_skipped == len(starts) - sum(expected_windows)
    # the windows run are the same windows as without the region (same logits), only fewer
    assert np.allclose(boxed.window_logits, full.window_logits[np.array(expected_windows)], atol=1e-5)
    assert np.allclose(boxed.window_centres_ras, full.window_centres_ras[np.array(expected_windows)])

    n = np.array(shape) // PATCH
    token_inside = voxel_inside.reshape(n[0], 8, n[1], 8, n[2], 8).any(axis=(1, 3, 5))
    assert np.array_equal(boxed.region.tokens, token_inside)
    assert np.all(boxed.grid[~token_inside] == 0) and boxed.grid[token_inside].max() == pytest.approx(1.0)
    assert boxed.grid[token_inside].min() == pytest.approx(0.0)  # minmax over the tokens inside only

    on_input = boxed.resample_to(volume.shape, affine)
    ras = apply_affine(affine, np.indices(volume.shape).reshape(3, -1).T.astype(float))
    well_outside = ~_inside_box(ras, centre, np.asarray(size) + 2 * 2.0 * np.sqrt(3), axes).reshape(volume.shape)
    assert np.all(on_input[well_outside] == 0) and on_input[~well_outside].max() > 0
    assert boxed.region.summary()["map_outside_region"] == 0.0 and "oblique" in boxed.region.description


def test_mask_on_a_regridded_copy_gives_the_same_result(vit):
    """The same mask stored on a flipped, three times finer grid (same voxels in patient space) gives the same map.

    Spacings 0.7 / 0.9 / 2.3 mm put no 2 mm model voxel exactly halfway between two mask voxels (no ties)."""
    shape = (170, 140, 44)
    affine = np.eye(4)
    affine[:3, :3] = OBLIQUE @ np.diag([0.7, 0.9, 2.3])
    affine[:3, 3] = (-40.0, 25.0, -60.0)
    volume = (np.random.default_rng(1).random(shape) * 2000.0 - 1000.0).astype(np.float32)
    ijk = np.indices(shape).reshape(3, -1).T
    mask = (np.linalg.norm((ijk - np.array([110, 60, 24])) / np.array([40, 35, 10]), axis=1) < 1).reshape(shape)
    fine = np.repeat(np.repeat(np.repeat(mask, 3, 0), 3, 1), 3, 2)[::-1, :, ::-1]  # 3x finer, I and K flipped
    third = np.diag([1 / 3, 1 / 3, 1 / 3, 1.0])
    third[:3, 3] = -1 / 3
    flip = np.eye(4)
    flip[0, 0], flip[0, 3], flip[2, 2], flip[2, 3] = -1, fine.shape[0] - 1, -1, fine.shape[2] - 1
    fine_affine = affine @ third @ flip
    on_input = explain_volume(vit, volume, affine, PREP, img_size=IMG, region=MaskRegion(mask.astype(np.uint8), affine))
    on_fine = explain_volume(vit, volume, affine, PREP, img_size=IMG, region=MaskRegion(fine, fine_affine))
    assert np.array_equal(on_input.region.voxels, on_fine.region.voxels)
    assert np.array_equal(on_input.grid, on_fine.grid)
    assert np.array_equal(on_input.probabilities, on_fine.probabilities)
    assert 0 < on_input.num_windows
    # the map on the input grid is 0 wherever the mask, sampled at the model grid, is 0
    sampled = sample_nearest(on_input.region.voxels, on_input.region.ijk_to_ras, shape, affine)
    assert np.all(on_input.resample_to(shape, affine)[~sampled] == 0)
    assert sampled[mask].mean() > 0.9 and sampled[~mask].mean() < 0.05  # the mask, at 2 mm


def test_sample_nearest_in_slabs_equals_the_nearest_voxel_of_each_target_voxel():
    """Nearest-neighbour sampling of a mask (oblique, anisotropic, non-cubic) onto another oblique grid, in slabs
    of a few K planes, against each target voxel's nearest mask voxel found here one by one."""
    mask = np.random.default_rng(5).random((13, 9, 7)) > 0.5
    mask_affine = np.eye(4)
    mask_affine[:3, :3] = OBLIQUE @ np.diag([2.0, 1.5, 3.0])
    mask_affine[:3, 3] = (5.0, -3.0, 8.0)
    target_affine = np.eye(4)
    target_affine[:3, :3] = rotation(0, 35.0) @ np.diag([0.9, 1.1, 1.7])
    target_affine[:3, 3] = apply_affine(mask_affine, [-2.0, -1.0, -1.0])
    shape = (31, 23, 17)
    sampled = sample_nearest(mask.astype(np.uint8), mask_affine, shape, target_affine, max_points=31 * 23 * 3)
    expected = np.zeros(shape, dtype=bool)
    inverse = np.linalg.inv(mask_affine) @ target_affine
    for voxel in itertools.product(*map(range, shape)):
        nearest = np.floor(inverse[:3, :3] @ voxel + inverse[:3, 3] + 0.5).astype(int)
        if np.all(nearest >= 0) and np.all(nearest < mask.shape):
            expected[voxel] = mask[tuple(nearest)]
    assert expected.sum() > 1000 and (~expected).sum() > 1000
    assert np.array_equal(sampled, expected)


def _chest(shape=(180, 150, 44), spacing=(0.9, 0.9, 2.5)):
    """A phantom chest: soft-tissue body (40 HU) in air, two air lungs (-850 HU), LPS-stored oblique geometry."""
    i, j, k = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2.0
    body = ((i - c[0]) / 80) ** 2 + ((j - c[1]) / 60) ** 2 < 1
    lungs = [((i - c[0] - s * 38) / 26) ** 2 + ((j - c[1]) / 35) ** 2 + ((k - c[2] - 2) / 14) ** 2 < 1 for s in (-1, 1)]
    hu = np.where(body, 40.0, -1000.0) + np.random.default_rng(3).normal(0, 10, shape)
    hu[lungs[0] | lungs[1]] = -850.0
    affine = np.eye(4)
    affine[:3, :3] = rotation(2, 12.0) @ np.diag(spacing)
    affine[:3, 3] = (-80.0, -70.0, -60.0)
    return hu.astype(np.float32), affine, lungs[0] | lungs[1]


def test_lung_field_is_found_in_patient_space_and_survives_a_flip(vit):
    hu, affine, lungs = _chest()
    prep = {**PREP, "intensity": {"a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True}}
    result = explain_volume(vit, hu, affine, prep, img_size=IMG, region=LungFieldRegion(margin_mm=8.0))
    flip = np.eye(4)
    flip[0, 0], flip[0, 3], flip[1, 1], flip[1, 3] = -1, hu.shape[0] - 1, -1, hu.shape[1] - 1
    flipped = explain_volume(vit, hu[::-1, ::-1].copy(), affine @ flip, prep, img_size=IMG,
                             region=LungFieldRegion(margin_mm=8.0))
    assert np.array_equal(result.region.voxels, flipped.region.voxels)
    assert np.allclose(result.grid, flipped.grid, atol=1e-5)
    on_input = result.region.on_grid(hu.shape, affine)
    assert on_input[lungs].all()  # every lung voxel lies in the field
    body_only = ~on_input & (hu > -500)
    assert body_only.sum() > 0.3 * (hu > -500).sum()  # most of the body (and the air around it) is left out
    assert "lung field" in result.region.description
    with pytest.raises(AttentionMapError, match="no lungs found"), pytest.warns(UserWarning, match="constant"):
        explain_volume(vit, np.full(hu.shape, 40.0, np.float32), affine, prep, img_size=IMG, region=LungFieldRegion())


def test_bad_regions_are_refused(vit):
    volume, affine = _volume(seed=2)
    with pytest.raises(AttentionMapError, match="does not overlap the volume"):
        explain_volume(vit, volume, affine, PREP, img_size=IMG, region=box_region((5000.0, 0.0, 0.0), (10, 10, 10)))
    with pytest.raises(AttentionMapError, match="three positive sizes"):
        box_region((0, 0, 0), (10, 0, 10))
    with pytest.raises(AttentionMapError, match="orthonormal"):
        box_region((0, 0, 0), (10, 10, 10), np.ones((3, 3)))
    with pytest.raises(AttentionMapError, match="HU range"):
        explain_volume(vit, volume, affine, {**PREP, "intensity": {"normalize": "zscore"}}, img_size=IMG,
                       region=LungFieldRegion())
    shape, model_affine, _ = _windows_and_voxels(volume, affine)
    centre = apply_affine(model_affine, (np.array(shape) - 1) * 0.25)
    boxed = explain_volume(vit, volume, affine, PREP, img_size=IMG, region=BoxRegion(tuple(centre), (20, 20, 20)))
    far = apply_affine(model_affine, (np.array(shape) - 1) * 0.9)
    with pytest.raises(AttentionMapError, match="outside the region"):
        boxed.fuse_again(query_ras=far)
    assert card_default_region({"default_region": {"kind": "lung_field", "margin_mm": 12}}) == LungFieldRegion(
        margin_mm=12.0
    )
    assert card_default_region({}) is None
    with pytest.raises(AttentionMapError, match="default_region"):
        card_default_region({"default_region": {"kind": "heart"}})
