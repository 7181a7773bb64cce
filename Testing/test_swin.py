"""Swin models (MONAI SwinUNETR / SwinTransformer): the windowed readout against a dense reference and an oracle.

The reference builds every block's full N x N matrix from the softmax outputs this test records itself (a forward
hook on each block's ``softmax``; for gradients, ``retain_grad``), placing each window slot by plain index
arithmetic written from the Swin definition (pad the grid at its far end, roll by -shift, cut into windows in C
order; padding slots are not tokens), and the PatchMerging step as a dense N_coarse x N_fine matrix. Rollout is
then products of those matrices. The oracle is a real SwinUNETR whose q/k weights and relative position bias are
zero, so every window's attention is uniform within its mask region: known from the geometry alone.
"""
import functools
import itertools

import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer, SwinTransformerBlock

from AttentionMapLib import capture_attention, explain, readout
from AttentionMapLib.core.engine import model_spec
from AttentionMapLib.errors import AttentionMapError

torch.set_num_threads(1)


class SwinClassifier(torch.nn.Module):
    """MONAI's SwinTransformer with a pooled linear head: a classifier of any input size (odd grids included)."""

    def __init__(self, window=(4, 4, 4)):
        super().__init__()
        self.swin = SwinTransformer(in_chans=1, embed_dim=12, window_size=window, patch_size=(2, 2, 2),
                                    depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3))
        self.head = torch.nn.Linear(12 * 16, 3)

    def forward(self, x):
        return self.head(self.swin(x)[-1].mean(dim=(2, 3, 4)))


def sharpen(model, factor=4.0):
    """Scale q/k weights so the attention is far from uniform."""
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, SwinTransformerBlock):
                block.attn.qkv.weight.mul_(factor)
                block.attn.relative_position_bias_table.normal_(0, 1.0)
    return model.eval()


def unetr():
    torch.manual_seed(1)
    return sharpen(SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2),
                             num_heads=(3, 3, 3, 3), spatial_dims=3))


def classifier():
    torch.manual_seed(2)
    return sharpen(SwinClassifier())


CASES = {  # model factory, input size: a padded 7^3 window on a non-cubic grid; odd grids and merges
    "swinunetr": (unetr, (32, 32, 64)),
    "swin_classifier_odd": (classifier, (24, 20, 30)),
}


@functools.lru_cache(maxsize=None)
def built(name):
    factory, size = CASES[name]
    model = factory()
    torch.manual_seed(3)
    return model, torch.randn((1, 1) + size)


@pytest.fixture(params=sorted(CASES))
def case(request):
    return built(request.param)


# ---- the reference ---------------------------------------------------------------------------------------------
def blocks_of(model):
    return [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]


def record(model, x, with_gradients):
    """Each block's softmax output (B*windows, heads, n, n), and its gradient for the target score."""
    outputs = []
    handles = [b.attn.softmax.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in blocks_of(model)]
    try:
        with torch.set_grad_enabled(with_gradients):
            logits = model(x)
            if with_gradients:
                for out in outputs:
                    out.retain_grad()
                score = logits[0, 1].mean() if logits.ndim > 2 else logits[0, int(logits[0].argmax())]
                score.backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = [o.grad for o in outputs] if with_gradients else None
    return [o.detach() for o in outputs], grads


def grids_of(model, size):
    """Stage grid of every block, from the Swin definition (patch 2, halved with rounding up between stages)."""
    grid, grids = [-(-s // 2) for s in size], []
    stages = [m for m in model.modules() if type(m).__name__ == "BasicLayer"]
    for stage in stages:
        grids += [tuple(grid)] * len(stage.blocks)
        grid = [-(-g // 2) for g in grid]
    return grids


def slots(grid, window, shift):
    """Per window (C order over the windows) the token index of each slot (C order in the window) or -1."""
    window = [g if g <= w else w for g, w in zip(grid, window)]
    shift = [0 if g <= w else s for g, w, s in zip(grid, window, shift)]
    padded = [-(-g // w) * w for g, w in zip(grid, window)]
    table = []
    for origin in itertools.product(*[range(p // w) for p, w in zip(padded, window)]):
        row = []
        for offset in itertools.product(*[range(w) for w in window]):
            position = [(o * w + a + s) % p for o, w, a, s, p in zip(origin, window, offset, shift, padded)]
            row.append(int(np.ravel_multi_index(position, grid)) if all(q < g for q, g in zip(position, grid)) else -1)
        table.append(row)
    return np.array(table)


def dense(per_window, table, tokens):
    """N x N (float32) from (windows, n, n) window weights."""
    matrix = np.zeros((tokens, tokens), dtype=np.float32)
    for weights, row in zip(per_window, table):
        real = row >= 0
        matrix[np.ix_(row[real], row[real])] = weights[np.ix_(real, real)]
    return matrix


def merge_matrix(coarse, fine):
    """N_coarse x N_fine: coarse token -> its fine tokens, equal shares."""
    matrix = np.zeros((int(np.prod(coarse)), int(np.prod(fine))))
    for position in itertools.product(*[range(f) for f in fine]):
        parent = np.ravel_multi_index([p // 2 for p in position], coarse)
        matrix[parent, np.ravel_multi_index(position, fine)] = 1.0
    return matrix / matrix.sum(axis=1, keepdims=True)


def reference(model, x, method, last, query=None, discard_ratio=0.0):
    with_gradients = method == "grad_rollout"
    attention, grads = record(model, x, with_gradients)
    grids = grids_of(model, x.shape[2:])
    matrices = {}
    for index, block in enumerate(blocks_of(model)):
        if index > last or (method == "raw" and index != last):
            continue
        table = slots(grids[index], block.window_size, block.shift_size)
        weights = attention[index].double()
        if with_gradients:
            weights = (grads[index].double() * weights).clamp(min=0)
        fused = weights.mean(dim=1).numpy()
        if discard_ratio > 0:
            real = table >= 0
            entries = np.concatenate([w[np.ix_(r, r)].ravel() for w, r in zip(fused, real)])
            cut = np.sort(entries)[int(len(entries) * discard_ratio) - 1]
            fused = np.where(fused > cut, fused, 0.0)
        matrices[index] = dense(fused, table, int(np.prod(grids[index])))
    tokens = int(np.prod(grids[last]))
    vector = np.full(tokens, 1.0 / tokens)
    if query is not None:
        vector = np.eye(tokens)[np.ravel_multi_index(query, grids[last])]
    if method == "raw":
        return vector @ matrices[last], grids[last]
    for index in range(last, -1, -1):
        if index < last and grids[index] != grids[index + 1]:
            vector = vector @ merge_matrix(grids[index + 1], grids[index])
        product = matrices[index] * (1.0 if method == "grad_rollout" else 0.5)
        product[np.diag_indices(len(product))] += 1.0 if method == "grad_rollout" else 0.5  # I + A, or 0.5 (A + I)
        if method == "rollout":
            product /= product.sum(axis=1, keepdims=True)
        vector = vector @ product.astype(np.float64)
    return vector, grids[0]


# ---- tests -------------------------------------------------------------------------------------------------------
READOUTS = [("raw", 0, (3, 4, 5), 0.0), ("raw", 3, None, 0.0), ("raw", 5, (1, 0, 2), 0.0),
            ("rollout", 7, None, 0.0), ("rollout", 3, (2, 1, 3), 0.0), ("rollout", 7, None, 0.5),
            ("grad_rollout", 7, None, 0.0), ("grad_rollout", 5, (1, 2, 0), 0.0)]
PAIRS = [("swin_classifier_odd",) + readout for readout in READOUTS] + \
    [("swinunetr",) + READOUTS[i] for i in (0, 4, 5, 6)]  # 8,192 first-stage tokens: dense takes seconds


@pytest.mark.parametrize("name,method,last,query,discard", PAIRS)
def test_windowed_readout_matches_the_dense_reference(name, method, last, query, discard):
    model, x = built(name)
    expected, grid = reference(model, x, method, last, query, discard)
    result = explain(model, x, method=method, layer=last, query=query, discard_ratio=discard, normalize="none")
    assert result.captured.attention_path == "windowed"
    assert result.grid.shape == (1,) + grid
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(result.grid[0].ravel(), expected, rtol=1e-5, atol=1e-5 * scale)


def test_gradient_relevance_is_not_zero_and_differs_from_rollout(case):
    model, x = case
    captured = capture_attention(model, x, with_gradients=True)
    assert all(float(r.max()) > 0 for r in captured.relevances)
    rollout = readout(captured, "rollout", normalize="minmax")
    gradient = readout(captured, "grad_rollout", normalize="minmax")
    assert np.abs(rollout - gradient).max() > 1e-3


def test_the_first_blocks_raw_row_is_its_windows_head_mean_and_zero_elsewhere():
    model = unetr()
    x = torch.randn(1, 1, 32, 32, 64)
    attention, _ = record(model, x, False)
    query = (9, 2, 30)  # stage 0 grid 16 x 16 x 32, window 7: the third window along the last axis
    result = explain(model, x, method="raw", layer=0, query=query, normalize="none")
    table = slots((16, 16, 32), (7, 7, 7), (0, 0, 0))
    token = np.ravel_multi_index(query, (16, 16, 32))
    window, slot = [int(v[0]) for v in np.nonzero(table == token)]
    expected = np.zeros((16, 16, 32))
    row = attention[0][window].mean(dim=0)[slot].numpy()
    real = table[window] >= 0
    expected.ravel()[table[window][real]] = row[real]
    np.testing.assert_allclose(result.grid[0], expected, atol=1e-7)
    assert np.count_nonzero(result.grid[0]) == real.sum() == 7 * 7 * 4  # the grid (32) ends 4 tokens into the window


def oracle_unetr(depths=(2, 2, 2, 2)):
    """Zero q/k projections and relative position bias: each block's attention is uniform over the slots of a
    window that share its mask region (a shifted block's roll brings far tokens together; the mask keeps them
    apart)."""
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=depths, num_heads=(3, 3, 3, 3),
                      window_size=(4, 4, 4), spatial_dims=3)
    with torch.no_grad():
        for block in blocks_of(model):
            block.attn.qkv.weight[: 2 * block.attn.dim].zero_()
            block.attn.qkv.bias[: 2 * block.attn.dim].zero_()
            block.attn.relative_position_bias_table.zero_()
    return model.eval()


def region_label(coordinate, size, window, shift):
    """compute_mask's region along one axis of the rolled grid: [0, P-w), [P-w, P-s), [P-s, P)."""
    return 0 if coordinate < size - window else (1 if coordinate < size - shift else 2)


def test_oracle_uniform_windows_give_the_known_raw_rows_and_rollout():
    model = oracle_unetr()
    x = torch.randn(1, 1, 32, 64, 32)
    grid, window, shift = (16, 32, 16), 4, 2
    for query in [(0, 0, 0), (15, 31, 15), (5, 13, 2)]:
        unshifted = explain(model, x, method="raw", layer=0, query=query, normalize="none").grid[0]
        expected = np.zeros(grid)
        corner = [q // window * window for q in query]
        expected[tuple(slice(c, c + window) for c in corner)] = 1.0 / window ** 3
        np.testing.assert_allclose(unshifted, expected, atol=1e-6)

        shifted = explain(model, x, method="raw", layer=1, query=query, normalize="none").grid[0]
        rolled = [(q - shift) % g for q, g in zip(query, grid)]  # where the roll puts the query
        expected = np.zeros(grid)
        members = []
        for position in itertools.product(*[range(g) for g in grid]):
            moved = [(p - shift) % g for p, g in zip(position, grid)]
            if all(m // window == r // window and region_label(m, g, window, shift) == region_label(r, g, window, shift)
                   for m, r, g in zip(moved, rolled, grid)):
                members.append(position)
        for position in members:
            expected[position] = 1.0 / len(members)
        np.testing.assert_allclose(shifted, expected, atol=1e-6)

        rollout = explain(model, x, method="rollout", layer=0, query=query, normalize="none").grid[0]
        expected = 0.5 * unshifted
        expected[query] += 0.5
        np.testing.assert_allclose(rollout, expected, atol=1e-6)


def test_a_merge_shares_a_coarse_token_equally_among_its_fine_tokens():
    """Raw row of a stage-1 token (depth 1 per stage: block 1 is stage 1's unshifted block), rolled out through
    block 0: mass 1 kept; each of the coarse window's 4^3 tokens carries 1/64 over its 8 fine tokens."""
    model = oracle_unetr(depths=(1, 1, 1, 1))
    x = torch.randn(1, 1, 32, 32, 64)
    query = (3, 2, 9)
    result = explain(model, x, method="rollout", layer=1, query=query, normalize="none").grid[0]
    assert result.shape == (16, 16, 32)
    np.testing.assert_allclose(result.sum(), 1.0, rtol=1e-5)
    coarse = np.zeros((8, 8, 16))
    coarse[0:4, 0:4, 8:12] = 0.5 / 64
    coarse[query] += 0.5
    fine = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2) / 8  # then block 0: half kept, half uniform
    windows = fine.reshape(4, 4, 4, 4, 8, 4).sum(axis=(1, 3, 5)) / 64
    expected = 0.5 * fine + 0.5 * np.repeat(np.repeat(np.repeat(windows, 4, 0), 4, 1), 4, 2)
    np.testing.assert_allclose(result, expected, atol=1e-7)


def test_spec_grids_and_errors():
    model = unetr()
    spec = model_spec(model, input_size=(32, 32, 64))
    assert spec.grid_shape == (16, 16, 32) and spec.patch_size == (2, 2, 2) and not spec.has_cls
    assert spec.stage_grids == ((16, 16, 32), (8, 8, 16), (4, 4, 8), (2, 2, 4))
    assert spec.block_stages == (0, 0, 1, 1, 2, 2, 3, 3) and spec.num_layers == 8
    with pytest.raises(AttentionMapError, match="pass img_size"):
        model_spec(model)
    x = torch.randn(1, 1, 32, 32, 64)
    with pytest.raises(AttentionMapError, match=r"query: expected a grid index within \(8, 8, 16\)"):
        explain(model, x, method="raw", layer=2, query=(9, 0, 0))
    with pytest.raises(AttentionMapError, match="blockwise reads global"):
        explain(model, x, attention_path="blockwise")


def test_the_model_is_left_as_it_was():
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, use_checkpoint=True, spatial_dims=3)
    blocks = blocks_of(model)
    flash = [hasattr(b.attn, "use_flash_attention") for b in blocks]
    if all(flash):
        for block in blocks:
            block.attn.use_flash_attention = True
    model.train()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    explain(model, torch.randn(1, 1, 32, 32, 64), method="grad_rollout")
    assert model.training and all(b.use_checkpoint for b in blocks)
    if all(flash):  # MONAI >= 1.6 has the flag
        assert all(b.attn.use_flash_attention for b in blocks)
    assert not any(b.attn.softmax._forward_hooks for b in blocks)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_explain_volume_spreads_a_later_stage_onto_the_first_grid_and_maps_its_query():
    """explain_volume places every Swin map on the window's first-stage grid: a stage-s raw map spread over the
    2^s first-stage tokens of each of its tokens; a RAS query read at the token holding it on the block's stage."""
    from AttentionMapLib import explain_volume

    torch.manual_seed(10)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, norm_name="batch", spatial_dims=3).eval()
    volume = np.random.default_rng(3).random((32, 32, 32)).astype(np.float32)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    x = torch.from_numpy(volume)[None, None]
    options = dict(img_size=(32, 32, 32), normalize="none")
    for layer, stage in ((3, 1), (6, 3)):
        placed = explain_volume(model, volume, affine, {"spatial": {"mode": "resize"}}, method="raw", layer=layer,
                                **options).grid
        own = explain(model, x, method="raw", layer=layer, normalize="none").grid[0]
        factor = 2 ** stage
        spread = own.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)[:16, :16, :16]
        np.testing.assert_allclose(placed, spread, rtol=1e-5, atol=1e-9)
        token = np.array([9, 2, 13])  # first-grid token; its centre in RAS (2-voxel tokens)
        ras = (affine @ np.append(token * 2 + 0.5, 1.0))[:3]
        queried = explain_volume(model, volume, affine, {"spatial": {"mode": "resize"}}, method="rollout",
                                 layer=layer, query_ras=ras, **options).grid
        expected = explain(model, x, method="rollout", layer=layer, query=tuple(token // factor),
                           normalize="none").grid[0]
        np.testing.assert_allclose(queried, expected, rtol=1e-5, atol=1e-9)


def test_a_swinunetr_input_of_another_size_is_refused_with_monais_rule():
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, norm_name="batch", spatial_dims=3).eval()
    with pytest.raises(AttentionMapError, match=r"x: spatial dimensions \[2, 3, 4\] .* must be divisible by 2\*\*5"):
        explain(model, torch.rand(1, 1, 40, 40, 40))


def test_a_bare_swin_transformer_is_explained_from_its_deepest_output():
    """MONAI's SwinTransformer returns the patch embedding's output and each stage's: the first has seen no
    attention (its gradient would give every block zero relevance); the last, deepest one is explained."""
    torch.manual_seed(11)
    model = SwinTransformer(in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2),
                            depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    result = explain(model, x, method="grad_rollout", normalize="none")
    assert tuple(result.logits.shape) == (1, 192, 1, 1, 1)  # the last stage's output, merged
    assert all(float(r.max()) > 0 for r in result.captured.relevances)
