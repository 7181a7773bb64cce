"""Baselines (Grad-CAM, occlusion, random) against plain reference implementations on real MONAI ViTs.

References are written from the definitions with ordinary autograd and loops:
Grad-CAM: w_c = mean over positions of dy/dA_c, map = ReLU(sum_c w_c A_c) (Selvaraju et al. 2017);
occlusion: p(x) - p(x with one patch replaced), patch by patch.
"""
import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from attentionmap_dev.baselines import GradCAM, OcclusionSensitivity, RandomMap
from AttentionMapLib.core.methods import normalize_map
from AttentionMapLib.errors import AttentionMapError

torch.set_num_threads(1)
IMG = (32, 48, 64)
PATCH = 16
GRID = (2, 3, 4)


@pytest.fixture(scope="module")
def model() -> ViT:
    torch.manual_seed(3)
    net = ViT(in_channels=1, img_size=IMG, patch_size=PATCH, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4,
              classification=True, num_classes=3, post_activation=None)
    return net.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand((2, 1) + IMG, generator=torch.Generator().manual_seed(5))


def reference_gradcam(model: ViT, x: torch.Tensor, target: int, layer: str) -> np.ndarray:
    """Grad-CAM of one sample (1, C, *IMG) from a forward hook on the chosen layer."""
    store = {}
    module = model.blocks[-1].norm1 if layer == "tokens" else model.patch_embedding.patch_embeddings

    def keep(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    handle = module.register_forward_hook(keep)
    try:
        logits = model(x.clone())[0]
        logits[0, target].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    acti, grad = store["a"].detach(), store["a"].grad
    if layer == "tokens":  # (1, 1 + n, C): drop CLS, channels first, token grid
        acti = acti[:, 1:].transpose(1, 2).reshape((1, -1) + GRID)
        grad = grad[:, 1:].transpose(1, 2).reshape((1, -1) + GRID)
    weights = grad.flatten(2).mean(dim=2)[:, :, None, None, None]
    return torch.relu((weights * acti).sum(dim=1))[0].numpy()


@pytest.mark.parametrize("layer", ["tokens", "patch_embedding"])
def test_gradcam_matches_reference(model, x, layer):
    targets = [1, 0]
    got = GradCAM(model, layer)(x, target=targets)
    assert got.shape == (2,) + GRID and got.dtype == np.float32
    for i, t in enumerate(targets):
        expected = normalize_map(reference_gradcam(model, x[i:i + 1], t, layer)[None], "minmax")[0]
        assert expected.max() == 1.0  # a non-trivial map, so the comparison means something
        np.testing.assert_allclose(got[i], expected, atol=1e-4)


def test_gradcam_default_target_is_predicted_class(model, x):
    predicted = model(x)[0].argmax(dim=1).tolist()
    cam = GradCAM(model)
    np.testing.assert_allclose(cam(x), cam(x, target=predicted), atol=1e-6)


def test_occlusion_matches_reference(model, x):
    got = OcclusionSensitivity(model, mode="mean_img", n_batch=5)(x, target=1)
    for i in range(2):
        sample = x[i:i + 1]
        with torch.no_grad():
            base = torch.softmax(model(sample)[0], dim=1)[0, 1]
            drops = np.zeros(GRID, dtype=np.float32)
            for index in np.ndindex(*GRID):
                occluded = sample.clone()
                box = tuple(slice(g * PATCH, (g + 1) * PATCH) for g in index)
                occluded[(0, 0) + box] = sample.mean()
                drops[index] = base - torch.softmax(model(occluded)[0], dim=1)[0, 1]
        np.testing.assert_allclose(got[i], normalize_map(drops[None], "minmax")[0], atol=1e-4)


def test_model_left_untouched(model, x):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    GradCAM(model)(x)
    GradCAM(model, "patch_embedding")(x)
    OcclusionSensitivity(model)(x[:1])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(m.training for m in model.modules())
    model.train()
    try:
        OcclusionSensitivity(model)(x[:1])
        GradCAM(model)(x[:1])
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


def test_random_map_is_seeded_and_on_the_grid(model, x):
    first, again = RandomMap(model, seed=7)(x), RandomMap(model, seed=7)(x)
    assert first.shape == (2,) + GRID
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, RandomMap(model, seed=8)(x))


def test_bad_inputs_raise_clear_errors(model, x):
    with pytest.raises(AttentionMapError, match="layer"):
        GradCAM(model, "head")
    with pytest.raises(AttentionMapError, match="target"):
        GradCAM(model)(x[:1], target=7)
    with pytest.raises(AttentionMapError, match="mode"):
        OcclusionSensitivity(model, mode="blur")
    with pytest.raises(AttentionMapError, match="overlap"):
        OcclusionSensitivity(model, overlap=1.0)
    with pytest.raises(AttentionMapError, match="target"):
        OcclusionSensitivity(model)(x[:1], target=3)


# ---- segmentation networks: the baselines of "why this segment" ------------------------------------------------
def segment_reference_gradcam(model, x, module, mask, channel, grid, stage_factor=1):
    """Grad-CAM of the channel's logit summed over the mask, from a forward hook on ``module``."""
    store = {}

    def keep(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    handle = module.register_forward_hook(keep)
    try:
        (model(x.clone())[0, channel] * torch.from_numpy(mask).float()).sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    acti, grad = store["a"].detach(), store["a"].grad
    if acti.ndim == 5:  # Swin: (1, d, h, w, C)
        acti, grad = acti.permute(0, 4, 1, 2, 3), grad.permute(0, 4, 1, 2, 3)
    else:  # ViT tokens (1, n, C)
        acti = acti.transpose(1, 2).reshape((1, -1) + grid)
        grad = grad.transpose(1, 2).reshape((1, -1) + grid)
    cam = torch.relu((grad.flatten(2).mean(dim=2)[:, :, None, None, None] * acti).sum(dim=1))[0].numpy()
    for axis in range(3):
        cam = np.repeat(cam, stage_factor, axis=axis)
    return normalize_map(cam[None], "minmax")[0]


def test_segment_baselines_on_unetr_and_swinunetr():
    """Grad-CAM and occlusion of a SegmentTarget: the gradient / occlusion of the channel's logit summed over the
    segment (UNETR: the last block's tokens; SwinUNETR: the last Swin block's input, spread from its 2 x 2 x 2 grid
    onto the first stage's 16^3)."""
    from monai.networks.nets import UNETR, SwinUNETR

    from AttentionMapLib.core.segment import SegmentTarget

    torch.manual_seed(6)
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(7))
    mask = np.zeros((32, 32, 32), dtype=np.uint8)
    mask[4:20, 10:30, 8:16] = 1
    target = SegmentTarget(1, mask)
    unetr = UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=8, hidden_size=32,
                  mlp_dim=32, num_heads=2).eval()
    expected = segment_reference_gradcam(unetr, x, unetr.vit.blocks[-1].norm1, mask, 1, (2, 2, 2))
    np.testing.assert_allclose(GradCAM(unetr)(x, target)[0], expected, atol=1e-4)
    swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, norm_name="batch", spatial_dims=3).eval()
    last = [m for m in swin.modules() if type(m).__name__ == "SwinTransformerBlock"][-1]
    expected = segment_reference_gradcam(swin, x, last.norm1, mask, 1, None, stage_factor=8)
    got = GradCAM(swin)(x, target)[0]
    assert got.shape == (16, 16, 16) and expected.max() == 1.0
    np.testing.assert_allclose(got, expected, atol=1e-4)

    occlusion = OcclusionSensitivity(unetr, mode="mean_img", n_batch=4)(x, target)[0]
    with torch.no_grad():
        def score(volume):
            return float((unetr(volume)[0, 1] * torch.from_numpy(mask).float()).sum())
        base, drops = score(x), np.zeros((2, 2, 2), dtype=np.float32)
        for index in np.ndindex(2, 2, 2):
            occluded = x.clone()
            occluded[(0, 0) + tuple(slice(g * 16, (g + 1) * 16) for g in index)] = x.mean()
            drops[index] = base - score(occluded)
    np.testing.assert_allclose(occlusion, normalize_map(drops[None], "minmax")[0], atol=1e-4)
