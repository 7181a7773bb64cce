"""Oracle ViT: a real MONAI ViT whose weights are set by hand so that its attention is known.

Construction (every block identical, residual stream never changed):
- patch embedding: hidden channel 0 = mean intensity m of the patch, channel 1 = constant c
  (the conv bias); position embeddings 0; the CLS token (if any) is [0, c, 0, ...].
- after LayerNorm, channel 1 is positive for every token and channel 0 increases with m (m >= 0,
  m <= 1 < c * (hidden - 1));
- every head's query reads channel 1 and its key reads ``sharpness`` x channel 0, so the logit of
  query i on key j is proportional to channel 0 of token j: every query attends to the brightest
  patch (softmax with a large sharpness is nearly one-hot);
- attention output projection and MLP are 0, so the residual stream (and the next block's
  attention) is unchanged.
"""
from typing import Sequence

import torch
from monai.networks.nets import ViT


def make_oracle_vit(img_size: Sequence[int], patch_size: Sequence[int], classification: bool = False,
                    num_layers: int = 2, num_heads: int = 2, hidden_size: int = 16,
                    sharpness: float = 60.0, constant: float = 1.0) -> ViT:
    model = ViT(in_channels=1, img_size=tuple(img_size), patch_size=tuple(patch_size), hidden_size=hidden_size,
                mlp_dim=hidden_size, num_layers=num_layers, num_heads=num_heads,
                classification=classification, num_classes=2, post_activation=None)
    head_dim = hidden_size // num_heads
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        conv = model.patch_embedding.patch_embeddings
        conv.weight[0, 0].fill_(1.0 / float(torch.tensor(patch_size).prod()))
        conv.bias[1] = constant
        if classification:
            model.cls_token[0, 0, 1] = constant
        for block in model.blocks:
            weight = block.attn.qkv.weight
            for head in range(num_heads):
                weight[head * head_dim, 1] = 1.0
                weight[hidden_size + head * head_dim, 0] = sharpness
    return model.eval()
