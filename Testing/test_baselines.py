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
