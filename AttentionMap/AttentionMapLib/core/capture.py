"""Capture the live self-attention of a model by forward hooks (:func:`attention_hooks`), for MONAI ``SABlock``s here.

MONAI's own ``save_attn=True`` keeps a *detached* copy of every layer's attention and only for models
built with the flag. Here a forward hook on each block's ``drop_weights`` module (the dropout applied
right after the softmax) sees the post-softmax attention ``(B, heads, N, N)`` (rows = queries) as the
network uses it, so gradients can flow through it. Everything the context changes on the model
(hooks, ``use_flash_attention``, ``save_attn``, ``training``) is restored on exit, also on error.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from monai.networks.blocks.selfattention import SABlock

from ..errors import AttentionMapError

AttentionCallback = Callable[[int, torch.Tensor], None]
"""Called as ``callback(layer_index, attention)`` with attention ``(B, heads, N, N)``, live."""


def attention_blocks(model: torch.nn.Module) -> List[SABlock]:
    """The model's self-attention blocks in forward order (module registration order)."""
    blocks = [m for m in model.modules() if isinstance(m, SABlock)]
    if not blocks:
        raise AttentionMapError(
            f"model: {type(model).__name__} contains no MONAI self-attention block (SABlock); "
            "expected a MONAI ViT, UNETR, ViTAutoEnc or another network built from MONAI transformer blocks"
        )
    return blocks


@contextmanager
def attention_hooks(model: torch.nn.Module, modules: Sequence[torch.nn.Module],
                    settings: Sequence[Tuple[object, str, object]], callback: AttentionCallback) -> Iterator[None]:
    """Within the context, the output of ``modules[i]`` (the post-softmax attention) is passed to
    ``callback(i, output)`` at every forward, each ``(object, attribute, value)`` of ``settings`` is set and the
    model is in eval mode; the hooks, the attributes and every module's training flag are restored on exit, also
    on error."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in settings]
    training: Dict[torch.nn.Module, bool] = {m: m.training for m in model.modules()}
    handles = []
    try:
        for owner, name, value in settings:
            setattr(owner, name, value)
        for index, module in enumerate(modules):
            handles.append(module.register_forward_hook(_forward_hook(index, callback)))
        model.eval()
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, value in saved:
            setattr(owner, name, value)
        for module, mode in training.items():
            module.training = mode


@contextmanager
def hooked_attention(model: torch.nn.Module, callback: AttentionCallback) -> Iterator[List[SABlock]]:
    """Within the context, every forward of ``model`` calls ``callback(i, attention)`` for block ``i``.

    The model is put in eval mode and flash attention is switched off (it never materialises the
    attention matrix); ``save_attn`` is switched off so MONAI's ``att_mat`` is left untouched.
    """
    blocks = attention_blocks(model)
    settings = [(b, name, False) for b in blocks for name in ("use_flash_attention", "save_attn")]
    with attention_hooks(model, [b.drop_weights for b in blocks], settings, callback):
        yield blocks


def _forward_hook(index: int, callback: AttentionCallback):
    def hook(_module: torch.nn.Module, _inputs, output: torch.Tensor) -> None:
        callback(index, output)

    return hook
