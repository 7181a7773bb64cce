"""The block-wise attention path (per-block Q, K, V, dO, flash attention on) against the full-matrix path.

The full-matrix path is itself tested against MONAI's att_mat and plain references in
test_engine_reference.py; here every readout of the block-wise path must equal it to 1e-5 (float32),
on an odd token count (40 x 24 x 56 / patch 8 = 105 patches, + CLS = 106) with slab sizes that do not
divide it, batch 2.
"""
import numpy as np
import pytest
import torch
from monai.networks.blocks.patchembedding import PatchEmbeddingBlock
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets import ViT

from AttentionMapLib import AttentionMapError, capture_attention, explain, explain_volume, readout
from AttentionMapLib.core import blockwise, engine, methods
from test_engine_oracle_and_errors import assert_untouched, model_state

torch.set_num_threads(1)
IMG = (40, 24, 56)
GRID = (5, 3, 7)
ATOL = 1e-5


class PooledClassifier(torch.nn.Module):
    """A no-CLS 3-class classifier: MONAI ViT tokens, mean-pooled, then a linear head."""

    def __init__(self, vit: ViT):
        super().__init__()
        self.vit = vit
        self.head = torch.nn.Linear(vit.norm.normalized_shape[0], 3)

    def forward(self, x):
        return self.head(self.vit(x)[0].mean(dim=1))

    @property
    def blocks(self):
        return self.vit.blocks


def odd_vit(classification: bool, seed: int = 0, **kwargs) -> torch.nn.Module:
    """3 blocks x 4 heads, attention far from uniform (query/key weights scaled up); with CLS (106
    tokens) or a mean-pooled head without CLS (105 tokens)."""
    torch.manual_seed(seed)
    vit = ViT(in_channels=1, img_size=IMG, patch_size=8, hidden_size=32, mlp_dim=48, num_layers=3, num_heads=4,
              classification=classification, num_classes=3, post_activation=None, **kwargs)
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(6.0)
    return (vit if classification else PooledClassifier(vit)).eval()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(2, 1, *IMG)


READOUTS = [
    {"method": "raw", "layer": 1},
    {"method": "raw", "layer": -1, "query": (4, 0, 6)},
    {"method": "rollout"},
    {"method": "rollout", "discard_ratio": 0.3},
    {"method": "rollout", "discard_ratio": 0.9},
    {"method": "rollout", "discard_ratio": 0.3, "layer": 1, "query": 50},
    {"method": "grad_rollout"},
    {"method": "grad_rollout", "layer": 1},
    {"method": "grad_rollout", "query": (2, 1, 3)},
]


@pytest.mark.parametrize("classification", [True, False])
@pytest.mark.parametrize("block_rows", [7, 13, 64, None])
@pytest.mark.parametrize("head_fusion,head", [("mean", None), ("max", None), ("min", None), ("mean", 2)])
def test_blockwise_equals_full_matrix_path(classification, block_rows, head_fusion, head, x):
    model = odd_vit(classification)
    full = capture_attention(model, x, head_fusion, head, with_gradients=True, target=[2, 0], attention_path="full")
    ours = capture_attention(
        model,
        x,
        head_fusion,
        head,
        with_gradients=True,
        target=[2, 0],
        attention_path="blockwise",
        block_rows=block_rows,
    )
    assert full.attention_path == "full" and ours.attention_path == "blockwise"
    assert ours.layers is None and ours.num_tokens == 105 + int(classification) and ours.target == [2, 0]
    torch.testing.assert_close(ours.logits, full.logits, atol=1e-5, rtol=1e-5)
    for options in READOUTS:
        expected = readout(full, normalize="none", **options)
        got = readout(ours, normalize="none", **options)
        assert got.shape == (2,) + GRID
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=str(options))
        # also relative to the map's own scale (a map of tiny values passes 1e-5 trivially)
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), options


def random_factors(batch=2, heads=3, tokens=61, dim=8, seed=0, tied_rows=()) -> blockwise.BlockFactors:
    """Block input, q/k/v projections and dO, float32; the tied rows' query is 0 (the token's input is
    0 and q has no bias): uniform attention, N entries tied at exactly 1/N."""
    generator = torch.Generator().manual_seed(seed)
    channels = heads * dim
    hidden = torch.randn(batch, tokens, 12, generator=generator)
    hidden[:, list(tied_rows)] = 0.0
    weights = [3.0 * torch.randn(channels, 12, generator=generator) for _ in range(3)]
    biases = [None, torch.randn(channels, generator=generator), torch.randn(channels, generator=generator)]
    output_grad = torch.randn(batch, heads, tokens, dim, generator=generator)
    return blockwise.BlockFactors(hidden, tuple(zip(weights, biases)), output_grad, True, heads, dim ** -0.5)


def formed(layer: blockwise.LayerRows, tokens: int, block_rows: int, relevance: bool = False) -> torch.Tensor:
    """The (B, N, N) matrix assembled from the same slabs the kernels compute."""
    rows = [slice(s, min(tokens, s + block_rows)) for s in range(0, tokens, block_rows)]
    return torch.cat([layer.relevance(r) if relevance else layer.fused(r) for r in rows], dim=1)


@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("head_fusion,head", [("mean", None), ("max", None), ("min", None), ("mean", 1)])
def test_discard_cut_is_kthvalue_exactly_ties_included(ratio, head_fusion, head):
    factors = random_factors(tied_rows=range(0, 61, 3))  # a third of all rows tied at exactly 1/61
    layer = blockwise.LayerRows(factors, head_fusion, head)
    count = int(61 * 61 * ratio)
    for block_rows in (1, 13, 64):
        expected = formed(layer, 61, block_rows).reshape(2, -1).kthvalue(count, dim=1).values
        assert torch.equal(blockwise.discard_cut(layer, ratio, block_rows), expected)
    assert blockwise.discard_cut(layer, 1e-4, 13) is None  # k = int(3721 * 1e-4) = 0: nothing to discard


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9])
def test_kernels_equal_methods_on_the_formed_matrices(has_cls, ratio):
    """Each kernel equals methods.py applied to the N x N matrices formed from the same factors."""
    blocks = [random_factors(seed=s, tied_rows=range(s, 61, 5)) for s in range(3)]
    layers = [blockwise.LayerRows(b, "mean", None) for b in blocks]
    fused = [formed(layer, 61, 61) for layer in layers]
    relevances = [formed(layer, 61, 61, relevance=True) for layer in layers]
    row = methods.readout_vector(2, 61, has_cls, None, torch.device("cpu"), torch.float32)
    dense = torch.softmax(torch.randn(2, 61, generator=torch.Generator().manual_seed(9)), dim=1)
    for vector in (row, dense):
        for block_rows in (7, 61):
            got = blockwise.readout_vector(blocks, vector, "rollout", 2, ratio, has_cls, "mean", None, block_rows)
            torch.testing.assert_close(got, methods.rollout_vector(vector, fused, ratio, has_cls), atol=1e-6, rtol=1e-6)
            got = blockwise.readout_vector(blocks, vector, "grad_rollout", 2, ratio, has_cls, "mean", None, block_rows)
            torch.testing.assert_close(got, methods.gradient_rollout_vector(vector, relevances), atol=1e-6, rtol=1e-6)
            got = blockwise.readout_vector(blocks, vector, "raw", 1, ratio, has_cls, "mean", None, block_rows)
            torch.testing.assert_close(got, torch.bmm(vector.unsqueeze(1), fused[1]).squeeze(1), atol=1e-6, rtol=1e-6)
    # the relevance is Chefer's mean_h((dA * A)^+) with dA = dO V^T, written out per head
    b = blocks[0]
    (wq, _), (wk, bk), (wv, bv) = b.projections
    q, k, v = ((b.hidden @ w.T + (0 if bias is None else bias)).view(2, 61, 3, 8).transpose(1, 2)
               for w, bias in ((wq, None), (wk, bk), (wv, bv)))
    attention = torch.softmax(q @ k.transpose(-1, -2) * b.scale, dim=-1)
    expected = ((b.output_grad @ v.transpose(-1, -2)) * attention).clamp(min=0).mean(dim=1)
    torch.testing.assert_close(relevances[0], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["raw", "rollout", "grad_rollout"])
@pytest.mark.parametrize("flash", [False, True])
def test_blockwise_leaves_the_model_untouched(method, flash):
    """Flash flag (on or off), dropout rate, save_attn, training modes, hooks, weights, grads restored."""
    model = odd_vit(True, dropout_rate=0.1, save_attn=not flash)
    for block in model.blocks:
        block.attn.use_flash_attention = flash
    model.train()
    if not flash:
        with torch.no_grad():
            model(torch.rand(1, 1, *IMG))  # a saved attention matrix that must stay as it is
    before = model_state(model)
    rates = [b.attn.dropout_rate for b in model.blocks]
    result = explain(model, torch.rand(2, 1, *IMG), method=method, attention_path="blockwise")
    assert result.captured.attention_path == "blockwise"
    assert_untouched(model, before)
    assert [b.attn.dropout_rate for b in model.blocks] == rates == [0.1] * 3


def test_blockwise_capture_runs_flash_attention_without_dropout(x):
    """During the pass MONAI's SDPA call must see flash on and dropout_p 0 (MONAI passes its dropout
    rate even in eval mode): the logits equal the eval-mode full path's, twice in a row."""
    model = odd_vit(True, dropout_rate=0.5)
    seen = []
    handles = [b.attn.register_forward_pre_hook(lambda m, a: seen.append((m.use_flash_attention, m.dropout_rate)))
               for b in model.blocks]
    first = capture_attention(model, x, attention_path="blockwise")
    second = capture_attention(model, x, attention_path="blockwise")
    for handle in handles:
        handle.remove()
    assert seen == [(True, 0.0)] * 6
    full = capture_attention(model, x, attention_path="full")
    torch.testing.assert_close(first.logits, full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.logits, second.logits, atol=0, rtol=0)


def test_blockwise_keeps_each_block_input_in_the_model_dtype(x):
    model = odd_vit(True).double()
    captured = capture_attention(model, x.double(), attention_path="blockwise")
    factors = captured.factors[0]
    assert factors.hidden.shape == (2, 106, 32) and factors.hidden.dtype == torch.float64
    assert factors.output_grad is None and not captured.has_gradients
    assert factors.projections[1][0].data_ptr() == model.blocks[0].attn.qkv.weight[32:].data_ptr()  # a view, not a copy
    with pytest.raises(AttentionMapError, match="grad_rollout needs attention captured with gradients"):
        readout(captured, "grad_rollout")
    reference = explain(model, x.double(), method="rollout", discard_ratio=0.3, normalize="none", attention_path="full")
    np.testing.assert_allclose(
        readout(captured, "rollout", discard_ratio=0.3, normalize="none"), reference.grid, atol=ATOL
    )


class TokenModel(torch.nn.Module):
    """Patch embedding + MONAI TransformerBlocks with separate q/k/v projections, optionally called
    with an attention mask; mean-pooled 2-class head (no CLS)."""

    def __init__(self, mask_last_token: bool = False):
        super().__init__()
        torch.manual_seed(3)
        self.embedding = PatchEmbeddingBlock(in_channels=1, img_size=IMG, patch_size=8, hidden_size=32, num_heads=4,
                                             proj_type="conv")
        self.blocks = torch.nn.ModuleList(TransformerBlock(32, 48, 4, use_combined_linear=False) for _ in range(2))
        self.head = torch.nn.Linear(32, 2)
        self.mask_last_token = mask_last_token

    def forward(self, x):
        tokens = self.embedding(x)
        mask = None
        if self.mask_last_token:
            mask = torch.ones(tokens.shape[0], tokens.shape[1], dtype=torch.bool)
            mask[:, -1] = False
        for block in self.blocks:
            tokens = block(tokens, attn_mask=mask)
        return self.head(tokens.mean(dim=1))


def test_separate_qkv_projections_are_captured(x):
    model = TokenModel().eval()
    for method in ("raw", "rollout", "grad_rollout"):
        full = explain(model, x, method=method, discard_ratio=0.3, normalize="none", attention_path="full").grid
        ours = explain(model, x, method=method, discard_ratio=0.3, normalize="none", attention_path="blockwise").grid
        np.testing.assert_allclose(ours, full, atol=ATOL, err_msg=method)


def test_attention_mask_falls_back_to_the_full_path(x):
    """A block called with a mask is not plain softmax(Q K^T s): auto falls back, forcing is refused."""
    model = TokenModel(mask_last_token=True).eval()
    for block in model.blocks:
        block.attn.use_flash_attention = True  # auto would pick the block-wise path
    before = model_state_of(model)
    result = explain(model, x, method="raw", normalize="none")
    assert result.captured.attention_path == "full"
    assert np.all(result.grid.reshape(2, -1)[:, -1] == 0) and np.all(
        result.grid.reshape(2, -1)[:, :-1] > 0
    )  # the masked key gets nothing
    with pytest.raises(AttentionMapError, match="block 0 is called with an attention mask.*attention_path='full'"):
        explain(model, x, attention_path="blockwise")
    assert model_state_of(model) == before


def model_state_of(model):
    return [
        (
            b.attn.use_flash_attention,
            b.attn.dropout_rate,
            b.attn.training,
            len(b.attn._forward_pre_hooks),
            len(b.attn.input_rearrange._forward_hooks),
            len(b.attn.out_rearrange._forward_pre_hooks),
        )
        for b in model.blocks
    ]


def test_automatic_path_selection(x, monkeypatch):
    model = odd_vit(True)
    spec = engine.model_spec(model, input_size=IMG)
    assert explain(model, x).captured.attention_path == "full"  # small, flash off
    for block in model.blocks:
        block.attn.use_flash_attention = True
    assert explain(model, x).captured.attention_path == "blockwise"  # the model runs flash attention
    assert explain(model, x, attention_path="full").captured.attention_path == "full"
    for block in model.blocks:
        block.attn.use_flash_attention = False
    # L * B * N^2 * 4 bytes: 3 * 2 * 106^2 * 4 without gradients; (2 + heads) times that with
    assert engine.full_path_bytes(spec, 2, False) == 3 * 2 * 106 * 106 * 4
    assert engine.full_path_bytes(spec, 2, True) == 3 * 2 * 106 * 106 * 4 * 6
    monkeypatch.setattr(engine, "FULL_PATH_BUDGET_BYTES", engine.full_path_bytes(spec, 2, False))
    assert explain(model, x, method="rollout").captured.attention_path == "full"  # fits exactly
    assert explain(model, x, method="grad_rollout").captured.attention_path == "blockwise"
    with pytest.raises(AttentionMapError, match="attention_path: expected one of auto, full, blockwise, got 'flash'"):
        explain(model, x, attention_path="flash")


def test_relative_position_and_causal_blocks_use_the_full_path(x):
    model = odd_vit(True)
    model.blocks[1].attn.causal = True  # a block that is not plain softmax(Q K^T s)
    assert engine.choose_attention_path(model, engine.model_spec(model, input_size=IMG), 2, False) == "full"
    with pytest.raises(AttentionMapError, match="block 1 has causal mask; use attention_path='full'"):
        explain(model, x, attention_path="blockwise")
    assert model.blocks[1].attn.causal and not model.blocks[1].attn.use_flash_attention
    model.blocks[1].attn.causal = False
    model.blocks[0].attn.rel_positional_embedding = torch.nn.Identity()  # stands for MONAI's decomposed rel. pos.
    assert engine.choose_attention_path(model, engine.model_spec(model, input_size=IMG), 2, False) == "full"
    with pytest.raises(AttentionMapError, match="block 0 has relative positional embedding"):
        explain(model, x, attention_path="blockwise")


def test_volume_fusing_again_from_the_blockwise_cache():
    """explain_volume on a flash-attention model (block-wise cache) gives the maps of the same model
    without flash attention (full-matrix cache), and so does every re-fusion."""
    torch.manual_seed(0)
    model = ViT(in_channels=1, img_size=(32, 32, 32), patch_size=8, hidden_size=32, mlp_dim=48, num_layers=3,
                num_heads=4, classification=True, num_classes=2, post_activation=None).eval()
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(40, 56, 48)).astype(np.float32)
    affine = np.diag([1.5, 0.8, 1.2, 1.0])
    prep = {"spatial": {"mode": "sliding_window", "overlap": 0.5, "sw_batch_size": 2}}
    options = dict(img_size=(32, 32, 32), method="grad_rollout", normalize="none")
    full = explain_volume(model, volume, affine, prep, **options)
    for block in model.blocks:
        block.attn.use_flash_attention = True
    ours = explain_volume(model, volume, affine, prep, **options)
    assert all(c.attention_path == "blockwise" for c in ours._tiling.captures)
    assert all(c.attention_path == "full" for c in full._tiling.captures)
    assert full.num_windows > 1 and ours.target == full.target
    np.testing.assert_allclose(ours.grid, full.grid, atol=ATOL)
    for change in ({"method": "rollout", "discard_ratio": 0.3}, {"method": "raw", "layer": 0}, {"layer": 1},
                   {"query_ras": full.peak_ras()}):
        np.testing.assert_allclose(
            ours.fuse_again(**change).grid, full.fuse_again(**change).grid, atol=ATOL, err_msg=str(change)
        )
