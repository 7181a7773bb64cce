"""The engine against MONAI's own att_mat and against plain reference implementations of each formula.

References below use full N x N matrices and loops, written straight from the papers, on the
attention recorded by MONAI itself (``save_attn=True``) or, for gradients, by torch.autograd.grad
per sample.
"""
import gc
import weakref

import numpy as np
import pytest
import torch
from monai.networks.nets import UNETR, ViT, ViTAutoEnc

from AttentionMapLib import capture_attention, explain, readout
from AttentionMapLib.core.capture import hooked_attention

torch.set_num_threads(1)
IMG = (32, 48, 64)
PATCH = (16, 16, 16)
GRID = (2, 3, 4)


def make_vit(classification: bool, save_attn: bool = False, seed: int = 0, proj_type: str = "conv") -> ViT:
    """A small random ViT whose attention is far from uniform (query/key weights scaled up)."""
    torch.manual_seed(seed)
    model = ViT(in_channels=2, img_size=IMG, patch_size=PATCH, hidden_size=32, mlp_dim=64, num_layers=3,
                num_heads=4, classification=classification, num_classes=3, post_activation=None,
                save_attn=save_attn, proj_type=proj_type)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6.0)
    return model.eval()


class PooledClassifier(torch.nn.Module):
    """A no-CLS classifier: MONAI ViT tokens, mean-pooled, then a linear head."""

    def __init__(self, vit: ViT):
        super().__init__()
        self.vit = vit
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.vit(x)[0].mean(dim=1)), None

    @property
    def blocks(self):
        return self.vit.blocks


def classifier(classification: bool) -> torch.nn.Module:
    """A 3-class classifier with (CLS head) or without (mean pooling) a CLS token."""
    model = make_vit(classification)
    if classification:
        return model
    torch.manual_seed(5)
    return PooledClassifier(model).eval()


def twin_with_saved_attention(model: ViT, classification: bool, proj_type: str = "conv") -> ViT:
    twin = make_vit(classification, save_attn=True, proj_type=proj_type)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def monai_attention(model: ViT, x: torch.Tensor, classification: bool, proj_type: str = "conv") -> list:
    """Per-block (B, heads, N, N) attention as MONAI itself records it."""
    twin = twin_with_saved_attention(model, classification, proj_type)
    with torch.no_grad():
        twin(x)
    return [block.attn.att_mat.double() for block in twin.blocks]


def fuse(att: torch.Tensor, head_fusion: str, head=None) -> torch.Tensor:
    if head is not None:
        return att[:, head]
    return {"mean": att.mean(1), "max": att.max(1).values, "min": att.min(1).values}[head_fusion]


def reference_row(matrix: torch.Tensor, has_cls: bool, query) -> torch.Tensor:
    """Row read out of one sample's N x N matrix, patch columns only."""
    if query is not None:
        row = matrix[query + (1 if has_cls else 0)]
    elif has_cls:
        row = matrix[0]
    else:
        row = matrix.mean(0)
    return row[1:] if has_cls else row


def reference_rollout(atts, has_cls, head_fusion="mean", discard_ratio=0.0, last=None, query=None):
    maps = []
    for b in range(atts[0].shape[0]):
        n = atts[0].shape[-1]
        eye = torch.eye(n, dtype=torch.float64)
        result = eye.clone()
        for att in atts[: (last if last is not None else len(atts) - 1) + 1]:
            fused = fuse(att, head_fusion)[b].clone()
            flat = fused.view(-1)
            count = int(flat.numel() * discard_ratio)
            if count:
                order = torch.argsort(flat)[:count]
                order = order[order != 0] if has_cls else order
                flat[order] = 0
            a = (fused + eye) / 2
            a = a / a.sum(dim=-1, keepdim=True)
            result = a @ result
        maps.append(reference_row(result, has_cls, query))
    return torch.stack(maps)


def reference_grad_rollout(model, x, has_cls, target_fn, last=None):
    """Chefer et al.: R = I; R <- R + mean_h((dy/dA * A)^+) R per block; per sample autograd.grad."""
    maps = []
    for b in range(x.shape[0]):
        atts = []
        handles = [
            blk.attn.drop_weights.register_forward_hook(lambda m, i, o, store=atts: store.append(o))
            for blk in model.blocks
        ]
        try:
            leaf = x[b:b + 1].clone().requires_grad_(True)
            output = model(leaf)[0]
            score = target_fn(output)
            grads = torch.autograd.grad(score, atts)
        finally:
            for h in handles:
                h.remove()
        n = atts[0].shape[-1]
        result = torch.eye(n, dtype=torch.float64)
        for att, grad in list(zip(atts, grads))[: (last if last is not None else len(atts) - 1) + 1]:
            cam = (grad[0].double() * att[0].detach().double()).clamp(min=0).mean(0)
            result = result + cam @ result
        maps.append(reference_row(result, has_cls, None))
    return torch.stack(maps)


def as_grid(maps: torch.Tensor) -> np.ndarray:
    return maps.reshape((maps.shape[0],) + GRID).numpy()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(2, 2, *IMG)


@pytest.mark.parametrize("classification", [True, False])
def test_captured_attention_equals_monai_att_mat(classification, x):
    model = make_vit(classification)
    expected = monai_attention(model, x, classification)
    seen = {}
    with hooked_attention(model, lambda i, att: seen.__setitem__(i, att.detach().double())):
        with torch.no_grad():
            model(x)
    assert len(seen) == len(expected) == 3
    for index, att in enumerate(expected):
        assert seen[index].shape == (2, 4, att.shape[-1], att.shape[-1])
        torch.testing.assert_close(seen[index], att, rtol=0, atol=1e-6)
    assert expected[0].shape[-1] == 24 + (1 if classification else 0)


@pytest.mark.parametrize("classification", [True, False])
@pytest.mark.parametrize("head_fusion,head", [("mean", None), ("max", None), ("min", None), ("mean", 2)])
@pytest.mark.parametrize("layer", [0, -1])
def test_raw_equals_reference(classification, head_fusion, head, layer, x):
    model = make_vit(classification)
    att = monai_attention(model, x, classification)[layer]
    fused = fuse(att, head_fusion, head)
    expected = torch.stack([reference_row(fused[b], classification, None) for b in range(2)])
    result = explain(model, x, method="raw", layer=layer, head_fusion=head_fusion, head=head, normalize="none")
    np.testing.assert_allclose(result.grid, as_grid(expected), atol=1e-6)
    assert result.grid.shape == (2,) + GRID and result.grid.dtype == np.float32
    assert result.layer == layer % 3


@pytest.mark.parametrize("classification", [True, False])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3, 0.9])
def test_rollout_equals_reference(classification, discard_ratio, x):
    model = make_vit(classification)
    atts = monai_attention(model, x, classification)
    expected = reference_rollout(atts, classification, discard_ratio=discard_ratio)
    result = explain(model, x, method="rollout", discard_ratio=discard_ratio, normalize="none")
    np.testing.assert_allclose(result.grid, as_grid(expected), atol=1e-6)


def test_rollout_up_to_a_layer_with_max_fusion_and_query(x):
    model = make_vit(True)
    atts = monai_attention(model, x, True)
    expected = reference_rollout(atts, True, head_fusion="max", last=1, query=7)
    result = explain(model, x, method="rollout", layer=1, head_fusion="max", query=7, normalize="none")
    np.testing.assert_allclose(result.grid, as_grid(expected), atol=1e-6)
    by_index = explain(model, x, method="rollout", layer=1, head_fusion="max", query=(0, 1, 3), normalize="none")
    np.testing.assert_array_equal(by_index.grid, result.grid)  # token 7 = (0 * 3 + 1) * 4 + 3


@pytest.mark.parametrize("classification", [True, False])
def test_grad_rollout_equals_reference(classification, x):
    model = classifier(classification)
    predicted = model(x)[0].argmax(1)
    expected = torch.cat([
        reference_grad_rollout(model, x[b:b + 1], classification, lambda out, t=int(predicted[b]): out[0, t])
        for b in range(2)
    ])
    result = explain(model, x, method="grad_rollout", normalize="none")
    assert result.target == [int(t) for t in predicted]
    np.testing.assert_allclose(result.grid, as_grid(expected), atol=1e-5)
    assert float(np.abs(result.grid).max()) > 0  # relevance actually flowed


@pytest.mark.parametrize("attention_path", ["full", "blockwise"])
def test_gradient_capture_frees_the_forward_graph(attention_path, x):
    """No reference cycle through autograd (a tensor hook holding its own tensor) keeps the attention of the
    forward pass alive after the explanation: repeated grad_rollout calls would leak every graph."""
    model = classifier(True)
    alive = []  # the attention weights (full path only: flash attention skips them) and the attention outputs O
    handles = [block.attn.drop_weights.register_forward_hook(lambda _m, _i, out: alive.append(weakref.ref(out)))
               for block in model.blocks]
    handles += [block.attn.out_rearrange.register_forward_hook(lambda _m, i, _o: alive.append(weakref.ref(i[0])))
                for block in model.blocks]
    try:
        result = explain(model, x, method="grad_rollout", normalize="none", attention_path=attention_path)
    finally:
        for handle in handles:
            handle.remove()
    assert result.captured.attention_path == attention_path and float(np.abs(result.grid).max()) > 0
    del result
    gc.collect()
    assert len(alive) == (6 if attention_path == "full" else 3) and all(ref() is None for ref in alive)


def test_grad_rollout_for_a_chosen_class_and_layer(x):
    model = make_vit(True)
    expected = torch.cat([
        reference_grad_rollout(model, x[b:b + 1], True, lambda out: out[0, 2], last=1) for b in range(2)
    ])
    result = explain(model, x, method="grad_rollout", target=2, layer=1, normalize="none")
    assert result.target == [2, 2]
    np.testing.assert_allclose(result.grid, as_grid(expected), atol=1e-5)


def test_perceptron_patch_embedding_equals_reference(x):
    model = make_vit(True, proj_type="perceptron")
    atts = monai_attention(model, x, True, proj_type="perceptron")
    result = explain(model, x, method="rollout", normalize="none")
    np.testing.assert_allclose(result.grid, as_grid(reference_rollout(atts, True)), atol=1e-6)
    assert result.captured.spec.patch_size == PATCH and result.captured.spec.in_channels == 2


def test_readout_from_cache_equals_fresh_explain(x):
    model = make_vit(True)
    captured = capture_attention(model, x, with_gradients=True)
    for method, layer in [("raw", 1), ("rollout", 0), ("grad_rollout", -1)]:
        fresh = explain(model, x, method=method, layer=layer)
        np.testing.assert_allclose(readout(captured, method=method, layer=layer), fresh.grid, atol=1e-6)


def test_normalisations_match_numpy(x):
    model = make_vit(False)
    raw = explain(model, x, method="rollout", normalize="none").grid
    minmax = explain(model, x, method="rollout", normalize="minmax").grid
    for b in range(2):
        expected = (raw[b] - raw[b].min()) / (raw[b].max() - raw[b].min())
        np.testing.assert_allclose(minmax[b], expected, atol=1e-6)
        low, high = np.percentile(raw[b], [1, 99])
        robust = explain(model, x, method="rollout", normalize="percentile").grid[b]
        np.testing.assert_allclose(robust, (np.maximum(raw[b], low) - low) / (high - low), atol=1e-5)
        assert robust.min() == 0 and robust.max() > 1  # the top is not clipped: the peak stays unique
        assert np.argmax(robust) == np.argmax(raw[b]) and np.sum(robust == robust.max()) == 1


def test_unetr_dense_output_uses_mean_of_channel():
    torch.manual_seed(3)
    model = UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=8, hidden_size=48,
                  mlp_dim=96, num_heads=4).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    result = explain(model, x, method="grad_rollout", target=2, normalize="none")
    assert result.grid.shape == (1, 2, 2, 2) and result.target == [2]
    atts = []
    handles = [
        blk.attn.drop_weights.register_forward_hook(lambda m, i, o, store=atts: store.append(o))
        for blk in model.vit.blocks
    ]
    leaf = x.clone().requires_grad_(True)
    grads = torch.autograd.grad(model(leaf)[0, 2].mean(), atts)
    for h in handles:
        h.remove()
    result_ref = torch.eye(8, dtype=torch.float64)
    for att, grad in zip(atts, grads):
        result_ref = result_ref + (grad[0].double() * att[0].detach().double()).clamp(min=0).mean(0) @ result_ref
    np.testing.assert_allclose(result.grid[0], result_ref.mean(0).reshape(2, 2, 2).numpy(), atol=1e-5)
    assert explain(model, x, method="rollout").captured.spec.num_layers == 12


def test_vitautoenc_and_flash_attention_are_explained_and_restored():
    torch.manual_seed(4)
    model = ViTAutoEnc(in_channels=1, img_size=(64, 32, 16), patch_size=(16, 16, 16), hidden_size=32, mlp_dim=64,
                       num_layers=2, num_heads=4).eval()
    x = torch.rand(1, 1, 64, 32, 16)
    reference = explain(model, x, method="rollout").grid
    for block in model.blocks:
        block.attn.use_flash_attention = True
    with torch.no_grad():
        flash_output = model(x)[0]
    result = explain(model, x, method="rollout")
    np.testing.assert_allclose(result.grid, reference, atol=1e-6)
    assert result.grid.shape == (1, 4, 2, 1)
    assert all(block.attn.use_flash_attention for block in model.blocks)
    torch.testing.assert_close(result.logits, flash_output, atol=1e-5, rtol=1e-5)
