"""Baseline saliency maps to compare attention against: Grad-CAM, occlusion sensitivity, random.

Each baseline is a callable ``baseline(x, target) -> np.ndarray`` float32 ``(B, n1, n2, n3)`` on the
model's token grid (the grid :func:`engine.explain` returns), in ``x``'s spatial axis order, higher =
more important, per sample min-max normalised to [0, 1]. ``x`` is ``(B, C, *img_size)``; ``target`` is
a class index (default: the predicted class of each sample) of a MONAI ViT classifier (class logits ``(B, K)``
as the first output), or, for a segmentation network (UNETR, SwinUNETR), a ``segment.SegmentTarget``: the score
is then the channel's logit summed over the segment (the score of "why this segment").

- :class:`GradCAM` runs MONAI's ``monai.visualize.GradCAM`` on a *copy* of the model (MONAI's
  ``ModelWithHooks`` registers hooks it never removes and zeroes parameter gradients), with
  parameters frozen so that only the input path is differentiated. MONAI's GradCAM needs a layer
  whose output is a spatial feature map ``(B, C, *spatial)``; a ViT has two:
  ``"tokens"`` (default): the input of the last transformer block's attention (``blocks[-1].norm1``),
  its patch tokens reshaped to ``(B, hidden, n1, n2, n3)`` -- the usual choice for ViTs (as in
  pytorch-grad-cam): the last layer whose patch tokens still reach the class token (after the last
  block only the class token feeds the head, so the patch tokens' gradient there is zero). For a Swin
  encoder, the input of its last block's attention (``norm1``'s output, ``(B, d, h, w, C)`` on the last stage's
  grid), spread onto the first stage's grid (``ModelSpec.on_first_grid``).
  ``"patch_embedding"``: the output of the patch-embedding convolution (already ``(B, hidden, n1,
  n2, n3)``), the first layer: closer to gradient x input, little class-specific abstraction.
  MONAI's default post-processing maps (min, max) to (1, 0), i.e. inverts; here the raw
  ReLU(sum_c w_c A_c) map on the token grid is min-max normalised the other way round.
- :class:`OcclusionSensitivity` runs ``monai.visualize.OcclusionSensitivity`` (boxes of ``mask_size``
  voxels, default one patch, no overlap: one forward pass per box). MONAI's map is the target
  probability with each box occluded (lower = more important); here importance = p(x) - p(occluded),
  averaged over each patch.
- :class:`RandomMap`: uniform noise from a seeded generator, the chance level.
"""
from __future__ import annotations

import copy
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from AttentionMapLib.core.engine import model_spec, primary_output, resolve_target
from AttentionMapLib.core.methods import normalize_map
from AttentionMapLib.core.segment import SegmentTarget, segment_scores
from AttentionMapLib.errors import AttentionMapError

Target = Union[int, Sequence[int], SegmentTarget, None]
GRADCAM_LAYERS = ("tokens", "patch_embedding")
OCCLUSION_MODES = ("gaussian", "mean_patch", "mean_img")


class _Logits(torch.nn.Module):
    """The model with only its class logits ``(B, K)`` as output (MONAI's ViT returns a tuple); with ``segment``
    set (a SegmentTarget of one sample), the segment's score ``(B, 1)`` of a dense output."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.segment: Optional[SegmentTarget] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = primary_output(self.model(x), self.model)
        if self.segment is not None:
            return segment_scores(logits, self.segment)[:, None]
        if logits.ndim != 2:
            raise AttentionMapError(
                f"model: output shape {tuple(logits.shape)} is not class logits (B, K); the baselines need a classifier"
            )
        return logits


class _TokenGrid(torch.nn.Module):
    """Identity on a ``(B, hidden, n1, n2, n3)`` feature map: the module MONAI's GradCAM hooks."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.clone()


def _block_mean(voxels: np.ndarray, grid_shape: Tuple[int, ...]) -> np.ndarray:
    """``(B, *spatial)`` -> ``(B, *grid_shape)``: mean over each patch (spatial divisible by the grid)."""
    batch = voxels.shape[0]
    split: List[int] = [batch]
    for size, n in zip(voxels.shape[1:], grid_shape):
        split += [n, size // n]
    return voxels.reshape(split).mean(axis=tuple(range(2, 2 * len(grid_shape) + 1, 2)))


class GradCAM:
    """Grad-CAM of a MONAI ViT classifier on its token grid (see the module docstring for ``layer``).

    Cost per sample: one forward and one backward pass (to the input only). Holds a frozen copy of
    the model: later changes to the model's weights are not seen.
    """

    def __init__(self, model: torch.nn.Module, layer: str = "tokens"):
        from monai.visualize import GradCAM as MonaiGradCAM

        if layer not in GRADCAM_LAYERS:
            raise AttentionMapError(f"layer: expected one of {', '.join(GRADCAM_LAYERS)}, got {layer!r}")
        self.layer = layer
        network = copy.deepcopy(model).eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        self._wrapped = _Logits(network)
        self._probe = _TokenGrid()
        self._wrapped.add_module("probe", self._probe)
        self._hooked = self._hook_layer(network)
        self._cam = MonaiGradCAM(self._wrapped, target_layers="probe", postprocessing=_minmax_tensor)

    def _hook_layer(self, network: torch.nn.Module) -> torch.nn.Module:
        if self.layer == "patch_embedding":
            module = network.patch_embedding.patch_embeddings if hasattr(network, "patch_embedding") else None
            if not isinstance(module, torch.nn.Conv3d):
                raise AttentionMapError(
                    "model: layer='patch_embedding' needs a MONAI ViT with a convolutional patch embedding "
                    "(proj_type='conv')"
                )
            module.register_forward_hook(lambda _m, _i, out: self._probe(out))
            return module
        blocks = [m for m in network.modules() if hasattr(m, "norm1") and hasattr(m, "attn")]
        if not blocks:
            raise AttentionMapError(
                "model: no MONAI TransformerBlock (with norm1 and attn) to take Grad-CAM tokens from"
            )
        blocks[-1].norm1.register_forward_hook(self._through_grid)
        return blocks[-1].norm1

    def _through_grid(self, _module, _inputs, tokens: torch.Tensor) -> torch.Tensor:
        """Send the tokens through the probe as ``(B, hidden, *grid)``: a ViT's patch tokens ``(B, [1 +] n,
        hidden)``, or a Swin block's channels-last map ``(B, d, h, w, hidden)``."""
        if tokens.ndim == 5:
            return self._probe(tokens.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        offset = tokens.shape[1] - self._grid_size
        grid = tokens[:, offset:].transpose(1, 2).reshape((tokens.shape[0], tokens.shape[2]) + self._grid_shape)
        patches = self._probe(grid).flatten(2).transpose(1, 2)
        return torch.cat([tokens[:, :offset], patches], dim=1)

    def __call__(self, x: torch.Tensor, target: Target = None) -> np.ndarray:
        spec = model_spec(self._wrapped.model, input_size=tuple(x.shape[2:]))
        self._grid_shape, self._grid_size = spec.grid_shape, spec.num_patches
        segments = _per_sample(target, len(x))
        targets = [None] * len(x) if target is None or segments else [
            int(t) for t in np.broadcast_to(target, (len(x),))]
        maps = []
        with torch.enable_grad():
            for index, (sample, klass) in enumerate(zip(x, targets)):
                leaf = sample[None].detach().clone().requires_grad_(True)
                self._wrapped.segment = segments[index] if segments else None
                try:
                    cam = self._cam.compute_map(leaf, class_idx=0 if segments else klass)  # (1, 1, *grid)
                except IndexError as error:
                    raise AttentionMapError(f"target: class {klass} is not an output of the model ({error})") from None
                finally:
                    self._wrapped.segment = None
                maps.append(spec.on_first_grid(cam.detach()[0, 0].cpu().numpy()))
        return normalize_map(np.stack(maps), "minmax")


def _per_sample(target: Target, batch: int) -> List[SegmentTarget]:
    """A segment target as one per sample (its mask's sample axis split); [] for class targets."""
    if not isinstance(target, SegmentTarget):
        return []
    mask = target.mask
    if mask is None or np.ndim(mask) == 3:
        return [target] * batch
    return [SegmentTarget(target.channel, mask[i]) for i in range(batch)]


def _minmax_tensor(maps: torch.Tensor) -> torch.Tensor:
    """MONAI GradCAM post-processing for ``__call__`` users: per-sample min-max, higher = more important."""
    return torch.as_tensor(normalize_map(maps.detach().cpu().numpy(), "minmax"), device=maps.device)


class OcclusionSensitivity:
    """Occlusion sensitivity (MONAI) reduced to the token grid: importance = p(x) - p(x with the box occluded).

    ``mask_size``: box edge in voxels (default: the patch size); ``overlap`` in [0, 1); ``mode``: what
    replaces the box (MONAI's ``gaussian`` multiplies by 1 - Gaussian, i.e. fades the box centre to 0;
    ``mean_patch``; ``mean_img``). Cost per sample: one forward pass per box position, in batches of
    ``n_batch`` (``(64 / 8)^3 = 512`` passes for a 64^3 input with 8^3 boxes and no overlap).
    """

    def __init__(self, model: torch.nn.Module, mask_size: Optional[Sequence[int]] = None, overlap: float = 0.0,
                 mode: str = "gaussian", n_batch: int = 16):
        if mode not in OCCLUSION_MODES:
            raise AttentionMapError(f"mode: expected one of {', '.join(OCCLUSION_MODES)}, got {mode!r}")
        if not 0.0 <= float(overlap) < 1.0:
            raise AttentionMapError(f"overlap: expected a value in [0, 1), got {overlap}")
        self.model = model
        self.mask_size = mask_size
        self.overlap = float(overlap)
        self.mode = mode
        self.n_batch = int(n_batch)

    def __call__(self, x: torch.Tensor, target: Target = None) -> np.ndarray:
        from monai.visualize import OcclusionSensitivity as MonaiOcclusion

        spec = model_spec(self.model, input_size=tuple(x.shape[2:]))
        mask_size = tuple(spec.patch_size) if self.mask_size is None else tuple(int(m) for m in self.mask_size)
        wrapped = _Logits(self.model)
        segments = _per_sample(target, len(x))
        # a class target's importance is a drop in probability; a segment's, a drop in its summed logit
        activate = (lambda out: out.float()) if segments else (lambda out: torch.softmax(out.float(), dim=1))
        occlusion = MonaiOcclusion(
            wrapped,
            mask_size=mask_size,
            n_batch=self.n_batch,
            verbose=False,
            mode=self.mode,
            overlap=self.overlap,
            activate=activate,
        )
        modes = {m: m.training for m in self.model.modules()}  # MONAI's eval_mode would restore them by .train()
        maps = []
        try:
            wrapped.eval()
            with torch.no_grad():
                if not segments:
                    logits = wrapped(x)
                    probabilities = torch.softmax(logits.float(), dim=1)
                    targets = resolve_target(logits, target)
                for i, sample in enumerate(x):
                    wrapped.segment = segments[i] if segments else None
                    scores = activate(wrapped(sample[None]))[0] if segments else probabilities[i]
                    klass = 0 if segments else targets[i]
                    with warnings.catch_warnings():  # MONAI 1.6 indexes with lists; torch warns about it
                        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
                        occluded, _ = occlusion(
                            sample[None]
                        )  # (1, K, *spatial): the score, box around each voxel occluded
                    maps.append((scores[klass] - occluded[0, klass]).cpu().numpy())
        finally:
            wrapped.segment = None
            for module, mode in modes.items():
                module.training = mode
        return normalize_map(_block_mean(np.stack(maps), spec.grid_shape), "minmax")


class RandomMap:
    """Uniform random values on the token grid (chance level); seeded, so a run is repeatable."""

    def __init__(self, model: torch.nn.Module, seed: int = 0):
        self.model = model
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor, target: Target = None) -> np.ndarray:
        spec = model_spec(self.model, input_size=tuple(x.shape[2:]))
        return self.rng.random((x.shape[0],) + spec.grid_shape).astype(np.float32)
