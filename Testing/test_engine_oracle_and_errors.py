"""Token and axis order on an oracle model, the model left untouched, and one clear error per bad input."""
import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib import AttentionMapError, explain
from oracle import make_oracle_vit

torch.set_num_threads(1)
IMG = (32, 48, 64)
PATCH = (8, 8, 8)
GRID = (4, 6, 8)


def bright_cubes(corners) -> torch.Tensor:
    """One 8^3 bright cube per sample at the given voxel corners of a dim (0.2) background."""
    x = torch.full((len(corners), 1) + IMG, 0.2)
    for b, (i, j, k) in enumerate(corners):
        x[b, 0, i:i + 8, j:j + 8, k:k + 8] = 1.0
    return x


@pytest.mark.parametrize("classification", [True, False])
@pytest.mark.parametrize("method", ["raw", "rollout"])
def test_oracle_peak_lands_on_the_bright_cube(classification, method):
    model = make_oracle_vit(IMG, PATCH, classification=classification)
    corners = [(8, 32, 48), (24, 0, 8)]  # grid cells (1, 4, 6) and (3, 0, 1): asymmetric on every axis
    result = explain(model, bright_cubes(corners), method=method, layer=0)
    assert result.grid.shape == (2,) + GRID
    for b, corner in enumerate(corners):
        peak = np.unravel_index(result.grid[b].argmax(), GRID)
        assert tuple(int(p) for p in peak) == tuple(c // 8 for c in corner)
        assert result.grid[b][tuple(c // 8 for c in corner)] == 1.0


def test_oracle_query_row_also_points_at_the_cube():
    model = make_oracle_vit(IMG, PATCH)
    result = explain(model, bright_cubes([(16, 8, 40)]), method="raw", layer=0, query=(0, 0, 0))
    assert tuple(int(p) for p in np.unravel_index(result.grid[0].argmax(), GRID)) == (2, 1, 5)


def model_state(model: torch.nn.Module):
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "flags": [(b.attn.use_flash_attention, b.attn.save_attn) for b in model.blocks],
        "att_mat": [b.attn.att_mat for b in model.blocks],
        "grads": [p.grad for p in model.parameters()],
    }


def assert_untouched(model, before):
    after = model_state(model)
    assert after["weights"].keys() == before["weights"].keys()
    for key, value in before["weights"].items():
        assert torch.equal(after["weights"][key], value), key
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["flags"] == before["flags"]
    assert all(a is b for a, b in zip(after["att_mat"], before["att_mat"]))
    assert all(g is None for g in after["grads"])


def small_vit(**kwargs) -> ViT:
    torch.manual_seed(0)
    return ViT(in_channels=1, img_size=(16, 16, 32), patch_size=8, hidden_size=32, mlp_dim=32, num_layers=2,
               num_heads=2, classification=True, post_activation=None, dropout_rate=0.1, **kwargs)


@pytest.mark.parametrize("method", ["raw", "rollout", "grad_rollout"])
def test_model_left_exactly_as_it_was(method):
    model = small_vit(save_attn=True)
    model.train()  # a model in training mode, with a saved attention matrix
    with torch.no_grad():
        model(torch.rand(1, 1, 16, 16, 32))
    before = model_state(model)
    explain(model, torch.rand(2, 1, 16, 16, 32), method=method)
    assert_untouched(model, before)


class Exploding(torch.nn.Module):
    def __init__(self, vit: ViT):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        self.vit(x)
        raise RuntimeError("boom inside forward")


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_model_restored_after_an_exception_inside_forward(method):
    model = Exploding(small_vit())
    for block in model.vit.blocks:
        block.attn.use_flash_attention = True
    model.vit.blocks[0].train()
    before = model_state(model.vit)
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, torch.rand(1, 1, 16, 16, 32), method=method)
    assert_untouched(model.vit, before)


@pytest.mark.parametrize(
    "kwargs,x_shape,message",
    [
        (
            {},
            (1, 1, 16, 16, 16),
            r"x: spatial size \(16, 16, 16\) with patch \(8, 8, 8\) gives 8 patches, but the model was built for 16",
        ),
        ({}, (1, 2, 16, 16, 32), r"x: the model expects 1 channel\(s\), got 2"),
        ({}, (1, 16, 16, 32), r"x: expected a torch tensor \(B, C\) \+ 3 spatial axes"),
        ({"layer": 2}, (1, 1, 16, 16, 32), r"layer: expected -2\.\.1 \(the model has 2 blocks\), got 2"),
        ({"layer": -3}, (1, 1, 16, 16, 32), r"layer: expected -2\.\.1"),
        ({"head": 2}, (1, 1, 16, 16, 32), r"head: expected 0\.\.1 \(the model has 2 heads\), got 2"),
        ({"method": "gradcam"}, (1, 1, 16, 16, 32), r"method: expected one of raw, rollout, grad_rollout"),
        ({"head_fusion": "median"}, (1, 1, 16, 16, 32), r"head_fusion: expected one of mean, max, min"),
        ({"discard_ratio": 1.0}, (1, 1, 16, 16, 32), r"discard_ratio: expected a value in \[0, 1\)"),
        ({"discard_ratio": -0.1}, (1, 1, 16, 16, 32), r"discard_ratio"),
        ({"normalize": "zscore"}, (1, 1, 16, 16, 32), r"normalize: expected one of minmax, percentile, none"),
        ({"target": 5, "method": "grad_rollout"}, (1, 1, 16, 16, 32), r"target: expected an output index in 0\.\.1"),
        ({"target": 2}, (1, 1, 16, 16, 32), r"target: expected an output index in 0\.\.1"),
        ({"query": 16}, (1, 1, 16, 16, 32), r"query: expected a token index in 0\.\.15"),
        ({"query": (0, 2, 0)}, (1, 1, 16, 16, 32), r"query: expected a grid index within \(2, 2, 4\)"),
    ],
)
def test_bad_input_gives_one_clear_error(kwargs, x_shape, message):
    model = small_vit().eval()
    with pytest.raises(AttentionMapError, match=message):
        explain(model, torch.rand(*x_shape), **kwargs)


def test_nan_input_is_refused():
    x = torch.rand(1, 1, 16, 16, 32)
    x[0, 0, 3, 4, 5] = float("nan")
    with pytest.raises(AttentionMapError, match="x: contains NaN or infinite values"):
        explain(small_vit().eval(), x)


def test_model_without_self_attention_is_refused():
    with pytest.raises(AttentionMapError, match="model: Conv3d contains no attention block this tool can read"):
        explain(torch.nn.Conv3d(1, 1, 3), torch.rand(1, 1, 16, 16, 16))
