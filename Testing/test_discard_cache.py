"""Discard-ratio re-fusion from sorted fused values (engine.CapturedAttention.discard_cuts).

The cached path must give bit for bit what selection gives (torch.kthvalue, ties dropped with the
cut, CLS -> CLS kept): checked on hand-made tie-heavy matrices against masked_fill written from the
rule, on real MONAI ViTs (with and without CLS, batch 2) and through VolumeAttention.fuse_again.
"""
import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib.core import methods
from AttentionMapLib.core.engine import capture_attention, readout
from AttentionMapLib.core.volume import explain_volume
from oracle import make_oracle_vit

RATIOS = (0.3, 0.5, 0.9, 0.97)


def reference_discard(fused: torch.Tensor, ratio: float, keep_first: bool) -> torch.Tensor:
    """The rule written plainly: k = int(N*N*ratio), cut = k-th smallest (kthvalue), entries <= cut -> 0."""
    flat = fused.reshape(fused.shape[0], -1)
    count = int(flat.shape[1] * ratio)
    if count == 0:
        return fused
    cut = flat.kthvalue(count, dim=1, keepdim=True).values
    drop = flat <= cut
    if keep_first:
        drop[:, 0] = False
    return flat.masked_fill(drop, 0.0).reshape(fused.shape)


def tied_layers(batch: int = 2, tokens: int = 37, levels: int = 5, seed: int = 0) -> torch.Tensor:
    """(B, N, N) with only `levels` distinct values before row normalisation: most entries tie."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(1, levels + 1, (batch, tokens, tokens), generator=generator).float() / levels
    return values / values.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("keep_first", [True, False])
@pytest.mark.parametrize("ratio", RATIOS + (0.0001,))
def test_sorted_cut_and_zeroing_equal_the_selection_rule_ties_included(ratio, keep_first):
    fused = tied_layers()
    ordered = methods.sorted_values(fused)
    assert torch.equal(ordered, fused.reshape(2, -1).sort(dim=1).values)
    cut = methods.sorted_cut(ordered, ratio)
    expected = reference_discard(fused, ratio, keep_first)
    if int(fused[0].numel() * ratio) == 0:  # k = 0: nothing dropped, by either path
        assert cut is None and methods.discard_cut(fused, ratio) is None
        return
    assert torch.equal(cut, fused.reshape(2, -1).kthvalue(int(fused[0].numel() * ratio), dim=1).values)
    assert torch.equal(cut, methods.discard_cut(fused, ratio))
    before = fused.clone()
    ours = methods.zero_at_or_below(fused, cut, keep_first)
    assert torch.equal(ours, expected)
    assert torch.equal(fused, before)  # the cached layer is never changed
    dropped = (ours == 0).reshape(2, -1).sum(dim=1)
    assert bool((dropped >= int(fused[0].numel() * ratio) - int(keep_first)).all())  # ties at the cut go too
    if keep_first:
        assert torch.equal(ours[:, 0, 0], fused[:, 0, 0])


def reference_rollout(layers, ratio: float, has_cls: bool) -> torch.Tensor:
    """e^T rownorm(0.5 A'_L + 0.5 I) ... with A' = reference_discard, same operation order as the library."""
    batch, tokens = layers[0].shape[:2]
    vector = methods.readout_vector(batch, tokens, has_cls, None, "cpu", layers[0].dtype)
    for fused in reversed(layers):
        fused = reference_discard(fused, ratio, has_cls)
        weighted = vector / (0.5 * fused.sum(dim=-1) + 0.5)
        vector = 0.5 * torch.bmm(weighted.unsqueeze(1), fused).squeeze(1) + 0.5 * weighted
    return vector


@pytest.mark.parametrize("has_cls", [True, False])
def test_rollout_with_known_cuts_equals_the_plain_rule_bit_for_bit(has_cls):
    layers = [tied_layers(seed=s) for s in range(3)]
    for ratio in RATIOS:
        cuts = [methods.sorted_cut(methods.sorted_values(f), ratio) for f in layers]
        expected = reference_rollout(layers, ratio, has_cls)
        readout_row = methods.readout_vector(2, 37, has_cls, None, "cpu", torch.float32)
        assert torch.equal(methods.rollout_vector(readout_row, layers, ratio, has_cls, cuts), expected)
        assert torch.equal(methods.rollout_vector(readout_row, layers, ratio, has_cls), expected)


def small_vit(classification: bool) -> ViT:
    torch.manual_seed(3)
    return ViT(in_channels=1, img_size=(16, 24, 8), patch_size=(4, 4, 4), hidden_size=32, mlp_dim=32, num_layers=3,
               num_heads=2, classification=classification, num_classes=2, post_activation=None).eval()


@pytest.mark.parametrize("classification", [True, False])
def test_cached_readout_equals_selection_for_a_real_vit_batch_2(classification):
    model = small_vit(classification)
    x = torch.randn(2, 1, 16, 24, 8, generator=torch.Generator().manual_seed(1))
    captured = capture_attention(model, x, attention_path="full")
    plain = capture_attention(model, x, attention_path="full")  # never asked to keep a sort: selects
    assert all(torch.equal(a, b) for a, b in zip(captured.layers, plain.layers))
    for ratio in (0.5, 0.9, 0.3, 0.9):
        for layer in (-1, 1):
            cached = readout(captured, "rollout", layer, ratio, normalize="none", keep_sorted=True)
            selected = readout(plain, "rollout", layer, ratio, normalize="none")
            assert np.array_equal(cached, selected)
            offset = 1 if classification else 0
            expected = reference_rollout(captured.layers[: layer % 3 + 1], ratio, classification)
            assert np.array_equal(cached, expected[:, offset:].reshape(2, 4, 6, 2).numpy())
    assert captured.keep_sorted and len(captured.sorted_fused) == 3
    assert not plain.keep_sorted and plain.sorted_fused == {}


def test_each_block_is_sorted_once_and_only_when_a_ratio_drops_something():
    model = small_vit(True)
    captured = capture_attention(model, torch.randn(1, 1, 16, 24, 8), attention_path="full")
    readout(captured, "rollout", -1, 1e-4, keep_sorted=True)  # k = int(25 * 25 * 1e-4) = 0
    assert captured.sorted_fused == {}
    readout(captured, "rollout", 1, 0.5, keep_sorted=True)
    assert sorted(captured.sorted_fused) == [0, 1]  # only the blocks the layer reads
    first = dict(captured.sorted_fused)
    readout(captured, "rollout", -1, 0.9, keep_sorted=True)
    assert sorted(captured.sorted_fused) == [0, 1, 2]
    assert all(captured.sorted_fused[block] is first[block] for block in first)  # not sorted again
    readout(captured, "rollout", -1, 0.2)  # the capture keeps using its sort
    assert all(captured.sorted_fused[block] is first[block] for block in first)


def test_fuse_again_with_new_discard_ratios_equals_fresh_explanations_on_tied_attention():
    """Oracle ViT on a volume of few intensity levels: attention full of ties. A re-fusion to another
    ratio gives exactly the grid of an explanation made with that ratio; the sort is kept across results."""
    model = make_oracle_vit((16, 16, 16), (4, 4, 4), classification=True, num_layers=2, sharpness=2.0).eval()
    array = np.full((32, 16, 16), 0.2, np.float32)
    array[4:12, 4:8, :] = 0.6
    array[20:24, 8:16, 0:8] = 1.0
    affine = np.diag([1.0, 1.3, 0.7, 1.0])
    affine[:3, 3] = (5.0, -2.0, 8.0)
    prep = {"orientation": "RAS", "spacing": None,
            "intensity": {"a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
            "spatial": {"mode": "sliding_window", "overlap": 0.0, "sw_batch_size": 1}}

    def explained(ratio):
        return explain_volume(model, array, affine, prep, img_size=(16, 16, 16), method="rollout",
                              discard_ratio=ratio, normalize="none", device="cpu")

    first = explained(0.3)
    fused = first._tiling.captures[0].layers[0]
    assert torch.unique(fused).numel() < fused.numel() / 50  # ties everywhere
    fused_again = first.fuse_again(discard_ratio=0.9)
    assert np.array_equal(fused_again.grid, explained(0.9).grid)
    kept = dict(first._tiling.captures[0].sorted_fused)
    again = fused_again.fuse_again(discard_ratio=0.5)
    assert np.array_equal(again.grid, explained(0.5).grid)
    assert np.array_equal(again.fuse_again(discard_ratio=0.3).grid, first.grid)
    assert all(first._tiling.captures[0].sorted_fused[b] is kept[b] for b in kept) and len(kept) == 2
