"""'Why this segment' (SegmentTarget) on UNETR and SwinUNETR: the gradient of the channel summed over the region, and
the segment's tokens as the readout row, against plain references (autograd on the summed score, dense products;
and the linearity of a row: the segment's map is the weighted sum of its tokens' query maps)."""
import numpy as np
import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR, ViT

from AttentionMapLib import SegmentTarget, capture_attention, explain, readout
from AttentionMapLib.errors import AttentionMapError

torch.set_num_threads(1)
IMG = (32, 48, 32)
GRID = (2, 3, 2)


@pytest.fixture(scope="module")
def unetr():
    torch.manual_seed(4)
    model = UNETR(in_channels=1, out_channels=3, img_size=IMG, feature_size=8, hidden_size=48, mlp_dim=96,
                  num_heads=4).eval()
    with torch.no_grad():
        for block in model.vit.blocks:
            block.attn.qkv.weight.mul_(5.0)
    return model


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(5)
    return torch.rand(1, 1, *IMG)


def box_mask(shape, start, stop):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = 1
    return mask


def token_shares(mask, patch):
    """Each token's share of the mask's voxels (C order), by reshaping: the plain definition."""
    grid = [s // p for s, p in zip(mask.shape, patch)]
    counts = mask.reshape(grid[0], patch[0], grid[1], patch[1], grid[2], patch[2]).sum(axis=(1, 3, 5)).ravel()
    return counts / counts.sum()


def test_grad_rollout_of_a_segment_is_the_gradient_of_its_summed_logit_read_from_its_tokens(unetr, x):
    mask = box_mask(IMG, (10, 5, 3), (30, 20, 12))  # meets 2 x 2 x 1 tokens, unequally
    result = explain(unetr, x, method="grad_rollout", target=SegmentTarget(2, mask), normalize="none")
    atts = []
    handles = [b.attn.drop_weights.register_forward_hook(lambda m, i, o: atts.append(o)) for b in unetr.vit.blocks]
    leaf = x.clone().requires_grad_(True)
    score = (unetr(leaf)[0, 2] * torch.from_numpy(mask).float()).sum()
    grads = torch.autograd.grad(score, atts)
    for handle in handles:
        handle.remove()
    relevance = torch.eye(12, dtype=torch.float64)
    for att, grad in zip(atts, grads):
        relevance = relevance + (grad[0].double() * att[0].detach().double()).clamp(min=0).mean(0) @ relevance
    expected = torch.from_numpy(token_shares(mask, (16, 16, 16))) @ relevance
    assert result.target == [2]
    np.testing.assert_allclose(result.grid[0].ravel(), expected.numpy(), rtol=1e-5, atol=1e-6)
    plain = explain(unetr, x, method="grad_rollout", target=2, normalize="none")  # mean of the channel, all rows
    assert np.abs(plain.grid - result.grid).max() > 1e-3


@pytest.mark.parametrize("method", ["raw", "rollout"])
def test_a_segment_row_is_the_weighted_sum_of_its_tokens_query_maps(unetr, x, method):
    mask = box_mask(IMG, (0, 10, 14), (20, 40, 32))
    shares = token_shares(mask, (16, 16, 16))
    captured = capture_attention(unetr, x, target=SegmentTarget(1, mask))
    result = readout(captured, method, layer=1, normalize="none")
    expected = sum(share * readout(captured, method, layer=1, query=token, normalize="none")
                   for token, share in enumerate(shares) if share > 0)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-7)


def test_the_block_wise_path_reads_the_same_segment(unetr, x):
    mask = box_mask(IMG, (3, 3, 3), (20, 30, 30))
    options = dict(method="grad_rollout", target=SegmentTarget(0, mask), normalize="none")
    full = explain(unetr, x, attention_path="full", **options).grid
    # the block-wise path runs flash attention: float32 rounding of its forward, through 12 blocks' (I + A)
    # products of a summed (not averaged) score, stays within 1e-3 relative
    np.testing.assert_allclose(explain(unetr, x, attention_path="blockwise", **options).grid, full, rtol=2e-3)


def test_without_a_mask_the_segment_is_the_networks_own_labels(unetr, x):
    labels = unetr(x)[0].argmax(dim=0).numpy()
    channel = int(np.bincount(labels.ravel()).argmax())
    own = explain(unetr, x, method="grad_rollout", target=SegmentTarget(channel), normalize="none").grid
    given = explain(unetr, x, method="grad_rollout", target=SegmentTarget(channel, labels == channel),
                    normalize="none").grid
    np.testing.assert_allclose(own, given, rtol=1e-6)


def test_swinunetr_segment_rows_pool_each_stage_s_tokens_of_patch_times_2_to_the_s():
    torch.manual_seed(6)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3).eval()
    x = torch.randn(1, 1, 32, 32, 64)
    mask = box_mask((32, 32, 64), (4, 8, 20), (28, 20, 50))
    # block 6 acts on stage 3 (grid 2 x 2 x 4, tokens of 16 voxels)
    shares = token_shares(mask, (16, 16, 16))
    captured = capture_attention(model, x, target=SegmentTarget(1, mask))
    result = readout(captured, "rollout", layer=6, normalize="none")
    expected = sum(share * readout(captured, "rollout", layer=6, query=int(token), normalize="none")
                   for token, share in enumerate(shares) if share > 0)
    assert result.shape == (1, 16, 16, 32)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-8)
    gradient = explain(model, x, method="grad_rollout", target=SegmentTarget(1, mask), normalize="none")
    assert gradient.target == [1] and np.isfinite(gradient.grid).all() and gradient.grid.max() > 0


@pytest.mark.parametrize("target,message", [
    (SegmentTarget(5, None), r"target: expected a segment channel in 0..2, got 5"),
    (SegmentTarget(1, np.ones((32, 48))), r"target: the segment mask has shape \(32, 48\)"),
    (SegmentTarget(1, np.zeros(IMG)), r"target: segment 1 is empty \(the mask holds no voxel"),
])
def test_bad_segment_targets_get_one_clear_message(unetr, x, target, message):
    with pytest.raises(AttentionMapError, match=message):
        explain(unetr, x, method="grad_rollout", target=target)


def test_a_segment_target_on_a_classifier_is_refused():
    model = ViT(in_channels=1, img_size=(16, 16, 16), patch_size=(8, 8, 8), hidden_size=16, mlp_dim=16,
                num_layers=1, num_heads=2, classification=True, num_classes=2).eval()
    with pytest.raises(AttentionMapError, match="a segment target needs a dense output"):
        explain(model, torch.rand(1, 1, 16, 16, 16), target=SegmentTarget(1))


def test_deletion_and_insertion_of_a_segment_read_its_channel_s_mean_probability_over_the_region(unetr, x):
    from AttentionMapLib import deletion_insertion

    mask = box_mask(IMG, (2, 20, 4), (18, 44, 20))
    saliency = np.arange(12, dtype=float).reshape(GRID)[::-1].copy()  # token 11 first, ..., token 0 last
    scores = deletion_insertion(unetr, x, saliency, target=SegmentTarget(1, mask), steps=4, baseline="zero")

    def mean_probability(image):  # the plain definition, one input at a time
        with torch.no_grad():
            p = torch.softmax(unetr(image)[0], dim=0)[1].numpy()
        return float(p[mask > 0].mean())

    order = np.argsort(-saliency.ravel(), kind="stable")
    deletion, insertion = [], []
    for count in (0, 3, 6, 9, 12):
        kept = np.zeros(12, dtype=bool)
        kept[order[:count]] = True
        top = torch.from_numpy(np.kron(kept.reshape(GRID), np.ones((16, 16, 16))) > 0)[None, None]
        deletion.append(mean_probability(torch.where(top, torch.zeros_like(x), x)))
        insertion.append(mean_probability(torch.where(top, x, torch.zeros_like(x))))
    assert scores["target"] == 1
    np.testing.assert_allclose(scores["deletion_curve"], deletion, rtol=1e-5)
    np.testing.assert_allclose(scores["insertion_curve"], insertion, rtol=1e-5)
    own = deletion_insertion(unetr, x, saliency, target=SegmentTarget(0), steps=4, baseline="zero")
    assert own["deletion_curve"] != scores["deletion_curve"]
    with pytest.raises(AttentionMapError, match="target: segment 1 is empty"):
        deletion_insertion(unetr, x, saliency, target=SegmentTarget(1, np.zeros(IMG)))
    with pytest.raises(AttentionMapError, match="or a segment target"):
        deletion_insertion(unetr, x, saliency, target=1)


# ---- explain_volume ------------------------------------------------------------------------------------------
from AttentionMapLib import explain_volume  # noqa: E402
from AttentionMapLib.core.geometry import rotation  # noqa: E402
from AttentionMapLib.core.region import BoxRegion, MaskRegion  # noqa: E402

PREPROCESSING = {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                 "spatial": {"mode": "sliding_window", "overlap": 0.25}}
SHAPE = (40, 52, 30)


def oblique_volume():
    """An oblique, anisotropic, non-cubic volume with a bright blob, and a box mask around the blob (IJK)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(2, 30.0) @ rotation(0, 20.0) @ np.diag([1.1, 0.9, 1.6])
    affine[:3, 3] = (20.0, -35.0, 12.0)
    rng = np.random.default_rng(7)
    array = rng.normal(0.0, 0.1, SHAPE).astype(np.float32)
    array[22:30, 10:20, 5:12] += 1.0
    return array, affine, box_mask(SHAPE, (20, 8, 4), (32, 22, 13))


def test_a_segment_follows_the_patient_not_the_voxel_order(unetr):
    """The same scene stored with its I axis reversed (and the affine saying so): the same map in patient space."""
    array, affine, mask = oblique_volume()
    options = dict(method="grad_rollout", normalize="none", img_size=(32, 48, 32))
    stored = explain_volume(unetr, array, affine, PREPROCESSING, target=SegmentTarget(2, mask), **options)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, SHAPE[0] - 1
    reversed_ = explain_volume(unetr, array[::-1].copy(), affine @ flip, PREPROCESSING,
                               target=SegmentTarget(2, mask[::-1].copy()), **options)
    assert stored.target == reversed_.target == 2 and stored.num_windows == reversed_.num_windows
    np.testing.assert_allclose(stored.resample_to(SHAPE, affine), reversed_.resample_to(SHAPE, affine),
                               rtol=1e-4, atol=1e-6 * float(stored.grid.max()))
    whole = explain_volume(unetr, array, affine, PREPROCESSING, target=2, **options)
    assert np.abs(whole.grid - stored.grid).max() > 1e-3 * float(stored.grid.max())


def test_a_segment_mask_on_another_grid_or_as_a_box_in_ras_gives_the_same_windows_and_a_close_map(unetr):
    array, affine, mask = oblique_volume()
    options = dict(method="rollout", img_size=(32, 48, 32))
    reference = explain_volume(unetr, array, affine, PREPROCESSING, target=SegmentTarget(1, mask), **options)
    fine = np.eye(4)
    fine[:3, :3] *= 0.5
    fine[:3, 3] = -0.25  # voxel i2 of the 2x grid is at i2 / 2 - 0.25 of the mask's own grid
    upsampled = mask.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    other_grid = explain_volume(unetr, array, affine, PREPROCESSING,
                                target=SegmentTarget(1, MaskRegion(upsampled, affine @ fine)), **options)
    assert other_grid.num_windows == reference.num_windows
    assert np.abs(other_grid.grid - reference.grid).max() < 0.05
    lo, hi = np.array([20, 8, 4]) - 0.5, np.array([32, 22, 13]) - 0.5
    centre = (affine @ np.append((lo + hi) / 2, 1.0))[:3]
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    box = BoxRegion(centre, (hi - lo) * np.linalg.norm(affine[:3, :3], axis=0), axes)
    as_box = explain_volume(unetr, array, affine, PREPROCESSING, target=SegmentTarget(1, box), **options)
    assert as_box.num_windows == reference.num_windows
    assert np.abs(as_box.grid - reference.grid).max() < 0.05


def test_only_windows_meeting_the_segment_run():
    torch.manual_seed(8)
    model = UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=8, hidden_size=48,
                  mlp_dim=96, num_heads=4).eval()
    array = np.random.default_rng(1).normal(size=(64, 64, 40)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    preprocessing = {"spatial": {"mode": "sliding_window", "overlap": 0.0}}
    everything = explain_volume(model, array, affine, preprocessing, method="grad_rollout", target=1)
    corner = explain_volume(model, array, affine, preprocessing, method="grad_rollout",
                            target=SegmentTarget(1, box_mask(array.shape, (0, 0, 0), (10, 10, 10))))
    assert everything.num_windows == 8 and corner.num_windows == 1
    with pytest.raises(AttentionMapError, match=r"target: the segment mask has shape \(64, 64\)"):
        explain_volume(model, array, affine, preprocessing, target=SegmentTarget(1, np.ones((64, 64))))
    outside = BoxRegion((500.0, 500.0, 500.0), (10.0, 10.0, 10.0))
    with pytest.raises(AttentionMapError, match="target: the segment .* does not meet the windows that run"):
        explain_volume(model, array, affine, preprocessing, target=SegmentTarget(1, outside))


def test_swinunetr_explains_its_own_segment_over_windows_and_flips():
    torch.manual_seed(9)  # batch norm: a 32^3 input's 1-voxel bottleneck is fine in eval mode
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, norm_name="batch", spatial_dims=3).eval()
    array = np.random.default_rng(2).normal(size=(40, 30, 20)).astype(np.float32)
    result = explain_volume(model, array, np.diag([1.2, 1.0, 2.0, 1.0]), {"spatial": {"mode": "sliding_window"}},
                            img_size=(32, 32, 32), method="grad_rollout", target=SegmentTarget(1), flip_axes=(0,),
                            keep_cache=False)
    assert result.target == 1 and result.num_windows == 2 and result.grid.shape == (20, 16, 16)
    assert np.isfinite(result.grid).all() and result.grid.max() == 1.0


def test_explain_volume_gives_the_networks_own_segmentation_stitched_over_its_windows():
    """Dense outputs: the labels are each window's argmax where windows do not overlap (overlap 0), placed on the
    model-input grid and, by segmentation_on, on any other grid; class outputs have none."""
    torch.manual_seed(12)
    model = UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=8, hidden_size=48,
                  mlp_dim=96, num_heads=4).eval()
    array = np.random.default_rng(4).normal(size=(64, 32, 32)).astype(np.float32)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    result = explain_volume(model, array, affine, {"spatial": {"mode": "sliding_window", "overlap": 0.0}},
                            method="rollout", keep_cache=False)
    with torch.no_grad():
        expected = np.concatenate([model(torch.from_numpy(array[a:a + 32])[None, None])[0].argmax(0).numpy()
                                   for a in (0, 32)])
    assert result.segmentation.dtype == np.int16 and np.array_equal(result.segmentation, expected)
    kept = explain_volume(model, array, affine, {"spatial": {"mode": "sliding_window", "overlap": 0.0}},
                          method="rollout", flip_axes=(0,))
    assert np.array_equal(kept.segmentation, expected)  # the unchanged view's outputs; the flipped ones not added
    assert all(c.logits.numel() == 0 for c in kept._tiling.captures)  # the re-fusion cache keeps no dense output
    assert len(np.unique(expected)) > 1
    np.testing.assert_allclose(result.segmentation_ijk_to_ras, affine)
    half = affine @ np.diag([2.0, 2.0, 2.0, 1.0])  # a coarser grid over the same volume
    half[:3, 3] += affine[:3, :3] @ np.full(3, 0.5)
    np.testing.assert_array_equal(result.segmentation_on((32, 16, 16), half), expected[1::2, 1::2, 1::2])
    classifier = ViT(in_channels=1, img_size=(32, 32, 32), patch_size=(16, 16, 16), hidden_size=16, mlp_dim=16,
                     num_layers=1, num_heads=2, classification=True, num_classes=2).eval()
    assert explain_volume(classifier, array, affine, {"spatial": {"mode": "sliding_window"}}).segmentation is None
