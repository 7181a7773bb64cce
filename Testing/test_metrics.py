"""metrics: mask statistics, pointing game, distances, RISE deletion / insertion, against hand-computed values."""
import math

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib.core.metrics import (
    deletion_insertion,
    distance_to_mask_mm,
    mask_statistics,
    pointing_game,
    within_mm,
)
from AttentionMapLib.errors import AttentionMapError, Cancelled


def test_mask_statistics_by_hand():
    attention = np.zeros((4, 3, 2))
    attention[0, 0, 0] = 6.0
    attention[1, 1, 1] = 3.0
    attention[3, 2, 1] = 1.0
    mask = np.zeros((4, 3, 2), dtype=np.uint8)
    mask[1, 1, :] = 1
    mask[3, 2, 1] = 2  # any value > 0 is inside
    stats = mask_statistics(attention, mask)
    assert stats["mass_fraction"] == pytest.approx(4.0 / 10.0)
    assert stats["mean"] == pytest.approx(4.0 / 3.0)
    assert stats["max"] == pytest.approx(3.0)
    assert stats["volume_fraction"] == pytest.approx(3.0 / 24.0)
    assert stats["mass_ratio"] == pytest.approx(0.4 / (3.0 / 24.0))
    assert stats["pointing_hit"] is False
    attention[1, 1, 0] = 7.0
    assert mask_statistics(attention, mask)["pointing_hit"] is True


def test_mask_statistics_refuses_mismatch_and_empty_mask():
    with pytest.raises(AttentionMapError, match="differs from the attention map"):
        mask_statistics(np.ones((2, 2, 2)), np.ones((2, 2, 3)))
    with pytest.raises(AttentionMapError, match="empty"):
        mask_statistics(np.ones((2, 2, 2)), np.zeros((2, 2, 2)))


def test_pointing_game_tolerance_is_a_per_axis_box():
    attention = np.zeros((8, 8, 8))
    attention[2, 2, 2] = 1.0
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[3, 4, 2] = True  # 1 voxel away along I, 2 along J
    assert not pointing_game(attention, mask)
    assert not pointing_game(attention, mask, tolerance=1)
    assert pointing_game(attention, mask, tolerance=2)
    assert pointing_game(attention, mask, tolerance=(1, 2, 0))
    assert not pointing_game(attention, mask, tolerance=(2, 1, 2))
    mask[2, 2, 2] = True
    assert pointing_game(attention, mask)


def test_distance_to_mask_on_an_oblique_anisotropic_grid():
    angle = math.radians(30)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation @ np.diag([0.8, 1.2, 2.5])
    ijk_to_ras[:3, 3] = [10.0, -20.0, 5.0]
    mask = np.zeros((10, 10, 6), dtype=bool)
    mask[4, 5, 2] = mask[6, 5, 2] = True
    centres = [ijk_to_ras[:3, :3] @ np.array(v, float) + ijk_to_ras[:3, 3] for v in ((4, 5, 2), (6, 5, 2))]
    point = ijk_to_ras[:3, :3] @ np.array([4.0, 5.0, 5.0]) + ijk_to_ras[:3, 3]  # 3 slices (7.5 mm) above (4, 5, 2)
    result = distance_to_mask_mm(point, mask, ijk_to_ras)
    assert result["inside"] is False
    assert result["nearest_mm"] == pytest.approx(7.5)
    assert result["centroid_mm"] == pytest.approx(np.linalg.norm((centres[0] + centres[1]) / 2 - point))
    inside = distance_to_mask_mm(centres[1], mask, ijk_to_ras)
    assert inside["inside"] is True and inside["nearest_mm"] == 0.0


class BlockDetector(torch.nn.Module):
    """Class-1 logit = 10 * mean(x over the first 4x4x4 block) - 5, class-0 logit = 0."""

    def forward(self, x):
        score = 10.0 * x[:, 0, :4, :4, :4].mean(dim=(1, 2, 3)) - 5.0
        return torch.stack([torch.zeros_like(score), score], dim=1)


@pytest.mark.parametrize("mm", [0.0, 2.5, 6.0])
def test_within_mm_is_every_voxel_whose_centre_is_that_close_to_a_mask_voxel_s_centre(mm):
    """Against the plain definition (all pairwise distances) on an oblique, anisotropic, non-cubic grid."""
    from AttentionMapLib.core.geometry import rotation

    affine = np.eye(4)
    affine[:3, :3] = rotation(0, 25.0) @ rotation(2, -40.0) @ np.diag([0.7, 1.3, 2.9])
    affine[:3, 3] = (-12.0, 30.0, 5.0)
    mask = np.zeros((22, 15, 9), dtype=np.uint8)
    mask[[3, 4, 12, 20], [2, 2, 9, 14], [1, 1, 4, 8]] = 1  # at the faces too
    centres = np.argwhere(np.ones(mask.shape, bool)) @ affine[:3, :3].T
    inside = np.argwhere(mask) @ affine[:3, :3].T
    nearest = np.min(np.linalg.norm(centres[:, None] - inside[None], axis=2), axis=1).reshape(mask.shape)
    expected = nearest <= mm + 1e-6
    result = within_mm(mask, affine, mm)
    assert result.dtype == bool and np.array_equal(result, expected)
    assert np.array_equal(result, mask > 0) if mm == 0 else result.sum() > mask.sum()


def test_within_mm_refuses_an_empty_mask_and_a_negative_distance():
    with pytest.raises(AttentionMapError, match="mask: expected a non-empty 3D mask"):
        within_mm(np.zeros((4, 4, 4)), np.eye(4), 2.0)
    with pytest.raises(AttentionMapError, match="mm: expected a distance >= 0"):
        within_mm(np.ones((4, 4, 4)), np.eye(4), -1.0)


def _trapezoid(y, x):
    y, x = np.asarray(y), np.asarray(x)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())


def test_deletion_insertion_by_hand():
    x = torch.ones(1, 1, 8, 8, 8)
    high, low = 1 / (1 + math.exp(-5)), 1 / (1 + math.exp(5))
    saliency = np.arange(8, dtype=float)[::-1].reshape(2, 2, 2).copy()  # block (0, 0, 0) ranked first
    scores = deletion_insertion(BlockDetector(), x, saliency, target=1, steps=8, baseline="zero")
    fractions = np.arange(9) / 8
    assert scores["fractions"] == pytest.approx(fractions.tolist())
    assert scores["deletion_curve"] == pytest.approx([high] + [low] * 8, abs=1e-6)
    assert scores["insertion_curve"] == pytest.approx([low] + [high] * 8, abs=1e-6)
    assert scores["deletion_auc"] == pytest.approx(_trapezoid([high] + [low] * 8, fractions), abs=1e-6)
    assert scores["insertion_auc"] == pytest.approx(_trapezoid([low] + [high] * 8, fractions), abs=1e-6)
    worst = deletion_insertion(BlockDetector(), x, saliency[::-1, ::-1, ::-1].copy(), target=1, steps=8,
                               baseline="zero", batch_size=3)
    assert worst["deletion_curve"] == pytest.approx([high] * 8 + [low], abs=1e-6)
    assert worst["deletion_auc"] > scores["deletion_auc"] and worst["insertion_auc"] < scores["insertion_auc"]


def test_deletion_insertion_reports_progress_and_stops_when_cancelled():
    """steps=8, batch 3: 3 batches per curve; progress after each of the 6, cancel checked before each."""
    x = torch.ones(1, 1, 8, 8, 8)
    saliency = np.arange(8, dtype=float).reshape(2, 2, 2)
    fractions, checks = [], []
    scores = deletion_insertion(BlockDetector(), x, saliency, target=1, steps=8, baseline="zero", batch_size=3,
                                progress=fractions.append, cancel=lambda: checks.append(1) and False)
    assert fractions == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0]) and len(checks) == 6
    assert scores == deletion_insertion(BlockDetector(), x, saliency, target=1, steps=8, baseline="zero", batch_size=3)
    fractions.clear()
    with pytest.raises(Cancelled, match="insertion curve, after 3 of 9 steps"):
        deletion_insertion(BlockDetector(), x, saliency, target=1, steps=8, baseline="zero", batch_size=3,
                           progress=fractions.append, cancel=lambda: len(fractions) >= 4)
    assert len(fractions) == 4


def test_deletion_insertion_voxel_map_and_mean_baseline():
    x = torch.zeros(1, 1, 8, 8, 8)
    x[0, 0, :4, :4, :4] = 1.0
    saliency = x[0, 0].numpy().copy()  # voxel-level map: the block's 64 voxels are in the first half
    scores = deletion_insertion(BlockDetector(), x, saliency, steps=2, baseline="mean")
    mean_logit = 10 * (64 / 512) - 5  # the baseline is x's mean everywhere
    p = lambda logit: 1 / (1 + math.exp(-logit))  # noqa: E731
    assert scores["target"] == 1  # the predicted class
    assert scores["deletion_curve"] == pytest.approx([p(5), p(mean_logit), p(mean_logit)], abs=1e-6)
    assert scores["insertion_curve"] == pytest.approx([p(mean_logit), p(5), p(5)], abs=1e-6)


def test_deletion_insertion_on_a_vit_token_grid_with_blur_baseline():
    torch.manual_seed(0)
    model = ViT(1, (16, 16, 16), 8, hidden_size=32, mlp_dim=32, num_layers=1, num_heads=2,
                classification=True, post_activation=None).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    saliency = np.random.default_rng(0).random((2, 2, 2))
    scores = deletion_insertion(model, x, saliency, target=0, steps=4)
    with torch.no_grad():
        p_x = torch.softmax(model(x)[0], dim=1)[0, 0].item()
    assert len(scores["deletion_curve"]) == len(scores["insertion_curve"]) == 5
    assert scores["deletion_curve"][0] == pytest.approx(p_x, abs=1e-5)
    assert scores["insertion_curve"][-1] == pytest.approx(p_x, abs=1e-5)
    assert scores["deletion_curve"][-1] == pytest.approx(scores["insertion_curve"][0], abs=1e-6)
    assert scores["baseline"] == "blur"


def test_deletion_insertion_bad_inputs():
    x = torch.ones(1, 1, 8, 8, 8)
    with pytest.raises(AttentionMapError, match="must divide"):
        deletion_insertion(BlockDetector(), x, np.ones((3, 3, 3)))
    with pytest.raises(AttentionMapError, match="baseline"):
        deletion_insertion(BlockDetector(), x, np.ones((2, 2, 2)), baseline="noise")
    with pytest.raises(AttentionMapError, match="not class logits"):
        deletion_insertion(lambda t: t, x, np.ones((2, 2, 2)))


def test_score_volume_scores_the_window_around_the_centre_point():
    from AttentionMapLib.core.metrics import score_volume

    torch.manual_seed(0)
    model = ViT(1, (32, 32, 32), 8, hidden_size=32, mlp_dim=32, num_layers=1, num_heads=2,
                classification=True, post_activation=None).eval()
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1000, 400, (64, 40, 40)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [5.0, -3.0, 2.0]
    prep = {"orientation": "RAS", "spacing": None,
            "intensity": {"a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
            "spatial": {"mode": "sliding_window"}}
    centre = affine[:3, :3] @ np.array([50.0, 20.0, 20.0]) + affine[:3, 3]
    scores = score_volume(model, volume, affine, prep, centre_ras=centre, steps=2, baseline="zero",
                          method="raw", target=1)
    assert scores["window_start"] == [32, 0, 0]  # centre - 16, kept inside the volume, on whole patches
    window = torch.from_numpy((volume[32:64, 0:32, 0:32] + 1000) / 1400)[None, None]
    with torch.no_grad():
        expected = torch.softmax(model(window)[0], dim=1)[0, 1].item()
    assert scores["deletion_curve"][0] == pytest.approx(expected, abs=1e-5)
    assert score_volume(model, volume, affine, prep, steps=1, method="raw")["window_start"] == [16, 0, 0]
