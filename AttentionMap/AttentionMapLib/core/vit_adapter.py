"""The adapter of MONAI's ViT family (ViT, UNETR, ViTAutoEnc, ...): global self-attention in ``SABlock``s over
the tokens of one ``PatchEmbeddingBlock`` (plus a CLS token in a classifying ViT).
"""
from __future__ import annotations

from typing import ContextManager, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.networks.blocks.patchembedding import PatchEmbeddingBlock
from monai.networks.blocks.selfattention import SABlock

from ..errors import AttentionMapError
from .capture import AttentionCallback, attention_blocks, hooked_attention
from .model_adapters import ModelAdapter, ModelSpec


class SABlockAdapter(ModelAdapter):
    name = "monai_sablock"
    blockwise = True

    def matches(self, model: torch.nn.Module) -> bool:
        return any(isinstance(m, SABlock) for m in model.modules())

    def hooked_attention(self, model: torch.nn.Module, callback: AttentionCallback,
                         on_relevance: Optional[AttentionCallback] = None) -> ContextManager[list]:
        return hooked_attention(model, callback)  # live attention: the engine's hooks give the relevance

    def spec(self, model: torch.nn.Module, img_size: Optional[Sequence[int]] = None,
             input_size: Optional[Sequence[int]] = None) -> ModelSpec:
        """Patch size, token grid and channel count read from the model's MONAI ``PatchEmbeddingBlock``.

        ``img_size`` is taken from the argument, else from the model (``img_size`` of ViTAutoEnc,
        ``feat_size * patch_size`` of UNETR), else from ``input_size`` (the spatial size of the input
        at hand: a plain MONAI ViT does not store its ``img_size``; then only the patch count can be
        checked), else from a cubic number of patches.
        """
        blocks = attention_blocks(model)
        embedding = next((m for m in model.modules() if isinstance(m, PatchEmbeddingBlock)), None)
        if embedding is None:
            raise AttentionMapError(
                f"model: {type(model).__name__} has no MONAI PatchEmbeddingBlock, so its tokens cannot be "
                "placed on a grid; expected a MONAI ViT-based network"
            )
        patch_size, in_channels = _patch_geometry(embedding)
        num_patches = int(embedding.n_patches)
        img_size = _img_size(model, img_size, input_size, patch_size, num_patches)
        grid = tuple(s // p for s, p in zip(img_size, patch_size))
        if int(np.prod(grid)) != num_patches:
            raise AttentionMapError(
                f"x: spatial size {tuple(img_size)} with patch {patch_size} gives {int(np.prod(grid))} patches, "
                f"but the model was built for {num_patches} (its img_size); resize or tile the volume first "
                "(explain_volume does this)"
            )
        has_cls = any(isinstance(getattr(m, "cls_token", None), torch.nn.Parameter) for m in model.modules())
        return ModelSpec(patch_size, grid, tuple(int(s) for s in img_size), in_channels, len(blocks),
                         int(blocks[0].num_heads), has_cls)


def _patch_geometry(embedding: PatchEmbeddingBlock) -> Tuple[Tuple[int, ...], int]:
    projection = embedding.patch_embeddings
    if isinstance(projection, torch.nn.Sequential):  # "perceptron": Rearrange then Linear
        lengths = projection[0].axes_lengths
        patch = tuple(int(lengths[f"p{i + 1}"]) for i in range(len(lengths)))
        return patch, int(projection[1].in_features // np.prod(patch))
    return tuple(int(k) for k in projection.kernel_size), int(projection.in_channels)


def _img_size(model, img_size, input_size, patch_size, num_patches) -> Tuple[int, ...]:
    if img_size is not None:
        return tuple(int(s) for s in img_size)
    for module in model.modules():
        if getattr(module, "img_size", None) is not None:
            return tuple(int(s) for s in module.img_size)
        if getattr(module, "feat_size", None) is not None and getattr(module, "patch_size", None) is not None:
            return tuple(int(f) * int(p) for f, p in zip(module.feat_size, module.patch_size))
    if input_size is not None:
        if len(input_size) != len(patch_size):
            raise AttentionMapError(f"x: expected a torch tensor (B, C) + {len(patch_size)} spatial axes, "
                                    f"got {len(input_size)} spatial axes {tuple(input_size)}")
        return tuple(int(s) for s in input_size)
    side = round(num_patches ** (1.0 / len(patch_size)))
    if side ** len(patch_size) != num_patches:
        raise AttentionMapError(
            f"model: cannot tell the input size of a model with {num_patches} patches of {patch_size}; "
            "pass img_size (e.g. from the model card's network args)"
        )
    return tuple(side * p for p in patch_size)


ADAPTER = SABlockAdapter()
