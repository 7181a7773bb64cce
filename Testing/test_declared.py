"""Attention modules declared as data (core/declared.py), on real networks.

MONAI's ViT declared two ways must give what the built-in SABlock adapter gives: as ``softmax`` (its post-softmax
dropout hooked) and, with flash attention on (``F.scaled_dot_product_attention``: the weights never exist), as
``qkv`` (recomputed from the qkv projection, gradients from dO). A network outside MONAI whose blocks call
``F.scaled_dot_product_attention``, as SDPA models do (MedSAM2's Hiera): no installable package ships a 3D one, so
a small re-implementation is used, against a reference computed with the same weights in explicit form.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ViT

from AttentionMapLib import explain
from AttentionMapLib.core.declared import declare_attention
from AttentionMapLib.errors import AttentionMapError

torch.set_num_threads(1)
IMG, PATCH = (32, 48, 32), (16, 16, 16)
SOFTMAX = {"module_class": "SABlock", "kind": "softmax", "attention_output": "drop_weights",
           "patch_size": list(PATCH), "prefix_tokens": 1}
QKV = {"module_class": "SABlock", "kind": "qkv", "qkv": "qkv", "output": "out_proj", "patch_size": list(PATCH),
       "prefix_tokens": 1}
METHODS = [("raw", 1, None), ("rollout", -1, None), ("rollout", -1, (1, 2, 0)), ("grad_rollout", -1, None)]


def vit(seed=0, flash=False):
    torch.manual_seed(seed)
    model = ViT(in_channels=1, img_size=IMG, patch_size=PATCH, hidden_size=32, mlp_dim=64, num_layers=3,
                num_heads=4, classification=True, num_classes=3, post_activation=None)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6.0)
            block.attn.use_flash_attention = flash  # F.scaled_dot_product_attention: no weights to hook
    return model.eval()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(2, 1, *IMG)


@pytest.mark.parametrize("declaration,flash", [(SOFTMAX, False), (QKV, True)], ids=["softmax", "qkv_flash"])
@pytest.mark.parametrize("method,layer,query", METHODS)
def test_a_declared_monai_vit_equals_the_built_in_adapter(x, declaration, flash, method, layer, query):
    native = explain(vit(), x, method=method, layer=layer, query=query, normalize="none", attention_path="full")
    declared = declare_attention(vit(flash=flash), declaration)
    result = explain(declared, x, method=method, layer=layer, query=query, normalize="none")
    assert result.captured.spec.has_cls and result.grid.shape == native.grid.shape
    np.testing.assert_allclose(result.grid, native.grid, rtol=2e-4, atol=1e-6)
    assert result.target == native.target and np.ptp(native.grid) > 1e-3


class SdpaBlock(torch.nn.Module):
    """Pre-norm transformer block whose attention calls F.scaled_dot_product_attention (or, ``explicit``, the same
    math written out, keeping the weights for the reference)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.explicit, self.kept = heads, False, None
        self.norm, self.qkv = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(2 * dim, dim))

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.explicit:
            self.kept = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
            self.kept.retain_grad()
            out = self.kept @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp(x)


class SdpaNet(torch.nn.Module):
    """Conv patch embedding (no CLS), SDPA blocks, mean-pooled linear head: 3 classes."""

    def __init__(self, dim=32, heads=4, depth=3):
        super().__init__()
        self.embed = torch.nn.Conv3d(1, dim, PATCH, PATCH)
        self.position = torch.nn.Parameter(torch.randn(1, 12, dim) * 0.5)
        self.blocks = torch.nn.ModuleList(SdpaBlock(dim, heads) for _ in range(depth))
        self.head = torch.nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def test_an_sdpa_network_outside_monai_is_explained_from_its_declaration(x):
    torch.manual_seed(2)
    model = SdpaNet().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.qkv.weight.mul_(4.0)
    declare_attention(model, {"module_class": "SdpaBlock", "kind": "qkv", "patch_size": list(PATCH)})
    check_against_explicit_weights(model, [block for block in model.blocks], x)


def check_against_explicit_weights(model, blocks, x):
    """The declared network's rollout and grad_rollout (mean row over all tokens) against the same products
    written out from the weights the blocks keep when run ``explicit`` (and their autograd gradients)."""
    rollout = explain(model, x, method="rollout", normalize="none").grid
    gradient = explain(model, x, method="grad_rollout", normalize="none")
    for block in blocks:
        block.explicit = True
    sample = 0
    logits = model(x[sample:sample + 1])
    logits[0, gradient.target[sample]].backward()
    tokens = int(np.prod(gradient.grid.shape[1:]))
    eye = np.eye(tokens)
    expected_rollout, expected_gradient = np.full(tokens, 1 / tokens), np.full(tokens, 1 / tokens)
    for block in reversed(blocks):
        weights = block.kept[0].detach().double().mean(0).numpy()
        hat = (0.5 * weights + 0.5 * eye)
        expected_rollout = expected_rollout @ (hat / hat.sum(axis=1, keepdims=True))
        relevance = (block.kept.grad[0].double() * block.kept[0].detach().double()).clamp(min=0).mean(0).numpy()
        expected_gradient = expected_gradient @ (eye + relevance)
    np.testing.assert_allclose(rollout[sample].ravel(), expected_rollout, rtol=1e-5)
    np.testing.assert_allclose(gradient.grid[sample].ravel(), expected_gradient, rtol=1e-4)
    assert np.ptp(expected_gradient) > 1e-3 * expected_gradient.max()  # the relevance is not zero


def resized_like_torch(table, length):
    """A (L, d) table resampled to ``length`` rows by linear interpolation with half-pixel centres (the rule of
    ``F.interpolate(mode="linear")``), written with numpy."""
    table = np.asarray(table, dtype=np.float64)
    if table.shape[0] == length:
        return table
    where = np.clip((np.arange(length) + 0.5) * table.shape[0] / length - 0.5, 0, table.shape[0] - 1)
    return np.stack([np.interp(where, np.arange(table.shape[0]), column) for column in table.T], axis=1)


class RelPosAttention(torch.nn.Module):
    """The attention of SAM-Med3D's ``ImageEncoderViT3D`` global blocks, re-implemented small (no package on the
    index ships that encoder): tokens channels-last (B, D, H, W, C), a qkv Linear, the decomposed 3D relative
    position (tables ``rel_pos_d/h/w`` of 2 L - 1 rows made for ``trained_grid``) added to the logits, a functional
    softmax (no module to hook). ``explicit`` keeps the weights; the bias is written here as a gather over all
    token pairs."""

    def __init__(self, dim, heads, trained_grid, window=False):
        super().__init__()
        self.num_heads, self.explicit, self.kept, self.window = heads, False, None, window
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        for name, size in zip(("rel_pos_d", "rel_pos_h", "rel_pos_w"), trained_grid):
            setattr(self, name, torch.nn.Parameter(torch.randn(2 * size - 1, dim // heads)))

    def forward(self, x):
        if self.window:  # a window partition along D: each window one slice of tokens
            batch, depth = x.shape[:2]
            return self.attend(x.reshape(batch * depth, 1, *x.shape[2:])).reshape(x.shape)
        return self.attend(x)

    def attend(self, x):
        batch, depth, height, width, dim = x.shape
        tokens = depth * height * width
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        coords = np.array(list(np.ndindex(depth, height, width)))
        for axis, (name, size) in enumerate(zip(("rel_pos_d", "rel_pos_h", "rel_pos_w"), (depth, height, width))):
            table = torch.from_numpy(resized_like_torch(getattr(self, name).detach(), 2 * size - 1)).float()
            pairs = coords[:, None, axis] - coords[None, :, axis] + size - 1
            logits = logits + torch.einsum("bhnc,nmc->bhnm", q, table[torch.from_numpy(pairs)])
        weights = logits.softmax(dim=-1)
        if self.explicit:
            self.kept = weights
            weights.retain_grad()
        out = (weights @ v).transpose(1, 2).reshape(batch, depth, height, width, dim)
        return self.proj(out)


class RelPosNet(torch.nn.Module):
    """Conv patch embedding to channels-last tokens, pre-norm blocks of RelPosAttention, mean-pooled head."""

    def __init__(self, dim=24, heads=3, depth=2, trained_grid=(2, 3, 2), window=False):
        super().__init__()
        self.embed = torch.nn.Conv3d(1, dim, PATCH, PATCH)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(depth))
        self.attns = torch.nn.ModuleList(RelPosAttention(dim, heads, trained_grid, window) for _ in range(depth))
        self.head = torch.nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 4, 1)
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return self.head(x.mean(dim=(1, 2, 3)))


RELPOS = {"module_class": "RelPosAttention", "kind": "qkv", "patch_size": list(PATCH),
          "relative_position": "decomposed"}


@pytest.mark.parametrize("size", [IMG, (32, 64, 48)], ids=["trained_grid", "tables_resized"])
def test_a_relative_position_attention_is_recomputed_with_its_bias(size):
    """SAM-Med3D-style attention declared as qkv with a decomposed relative position, on the grid its tables were
    made for (2, 3, 2) and on a larger one (2, 4, 3), where the tables are resized."""
    torch.manual_seed(3)
    model = RelPosNet().eval()
    with torch.no_grad():
        for attn in model.attns:
            attn.qkv.weight.mul_(4.0)
    x = torch.rand(2, 1, *size)
    declare_attention(model, RELPOS)
    without = declare_attention(RelPosNet().eval(), {**RELPOS, "relative_position": None})
    without.load_state_dict(model.state_dict())
    assert np.abs(explain(without, x, method="rollout").grid - explain(model, x, method="rollout").grid).max() > 1e-3
    check_against_explicit_weights(model, list(model.attns), x)


def test_a_declared_qkv_module_that_sees_windows_is_refused():
    model = declare_attention(RelPosNet(window=True).eval(), RELPOS)
    with pytest.raises(AttentionMapError, match=r"sees tokens \(1, 3, 2\), not the network's grid \(2, 3, 2\): "
                                                r"windowed attention"):
        explain(model, torch.rand(1, 1, *IMG), method="rollout")


@pytest.mark.parametrize("section,message", [
    ({**SOFTMAX, "kind": "linear"}, "attention.kind: expected one of softmax, qkv"),
    ({**SOFTMAX, "module_class": "Nothing"}, "no module of class 'Nothing'"),
    ({**SOFTMAX, "attention_output": "missing"}, "SABlock has no submodule 'missing'"),
    ({k: v for k, v in SOFTMAX.items() if k != "attention_output"}, "attention.attention_output: a softmax"),
    ({**SOFTMAX, "patch_size": [16, 16]}, "attention.patch_size: expected three positive integers"),
    ({**SOFTMAX, "prefix_tokens": 2}, "attention.prefix_tokens: expected 0 or 1"),
    ({**SOFTMAX, "code": "import os"}, r"attention: unknown key\(s\) \['code'\]"),
    ({**SOFTMAX, "relative_position": "decomposed"}, "attention.relative_position: expected null or one of "
                                                     "decomposed with kind 'qkv'"),
    ({**QKV, "relative_position": "decomposed"}, "attention.relative_position: a decomposed relative position has "
                                                 "no CLS token"),
    ({**QKV, "prefix_tokens": 0, "relative_position": "decomposed"}, "attention.relative_position_tables: SABlock "
                                                                     "has no table 'rel_pos_d'"),
    ({**QKV, "relative_position_tables": ["a", "b"]}, "attention.relative_position_tables: expected three"),
])
def test_bad_declarations_are_refused_naming_the_field(section, message):
    with pytest.raises(AttentionMapError, match=message):
        declare_attention(vit(), section)


def test_a_card_declares_the_attention_of_its_network(tmp_path, x):
    """A card's ``attention`` section is attached at load time: the card's ViT is explained through its qkv
    projections (recomputed attention, gradients from dO), as the built-in adapter explains the same weights."""
    from AttentionMapLib import load_model

    args = {"in_channels": 1, "img_size": list(IMG), "patch_size": list(PATCH), "hidden_size": 32, "mlp_dim": 64,
            "num_layers": 3, "num_heads": 4, "classification": True, "num_classes": 3, "post_activation": None}
    torch.save(vit().state_dict(), tmp_path / "model.pt")
    card = {"network": {"name": "ViT", "args": args}, "weights": "model.pt", "attention": QKV,
            "preprocessing": {"spatial": {"mode": "resize"}}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    loaded = load_model(str(tmp_path / "card.json"))
    result = explain(loaded.network, x, method="grad_rollout", normalize="none")
    native = explain(vit(), x, method="grad_rollout", normalize="none", attention_path="full")
    np.testing.assert_allclose(result.grid, native.grid, rtol=2e-4, atol=1e-6)
    card["attention"] = {**QKV, "qkv": "nothing"}
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(AttentionMapError, match=r"card.json: attention: SABlock has no submodule 'nothing'"):
        load_model(str(tmp_path / "card.json"))
