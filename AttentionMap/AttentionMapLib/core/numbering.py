"""How users number layers and heads, and the one conversion to the library's indices (torch-free).

The convention of the command line and the Slicer module (stated in the README):

- layers (transformer blocks) count from 1 (first block) to L (last); negative numbers count from the
  end (-1 = the last block). For rollout, layer k means "blocks 1..k". The Slicer slider's leftmost
  position, shown as "last", is -1.
- heads count from 0 to H-1, as the library and PyTorch index them (``attention[:, head]``): no
  conversion.

The library itself (``explain(layer=...)``) takes Python indices: 0..L-1, negative from the end.
"""
from typing import Optional

from ..errors import AttentionMapError


def layer_index(layer: int, num_layers: Optional[int] = None, name: str = "--layer") -> int:
    """User layer (1..L, or -L..-1 from the end) -> the library's block index.

    With ``num_layers`` the result is 0..L-1 and an out-of-range layer raises AttentionMapError naming
    ``name``; without it (the model not known yet) a negative layer stays a negative index from the end
    (the library checks it against the model) and only 0 is refused.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise AttentionMapError(f"{name} {layer!r}: expected a whole number (1 = first block, -1 = last)")
    if num_layers is None:
        if layer == 0:
            raise AttentionMapError(f"{name} 0: expected 1 or more (first block = 1) or a negative number (-1 = last)")
        return layer - 1 if layer > 0 else layer
    if not (1 <= layer <= num_layers or -num_layers <= layer <= -1):
        raise AttentionMapError(
            f"{name} {layer}: expected 1..{num_layers} (first to last block) or -{num_layers}..-1 "
            f"(from the end); the model has {num_layers} blocks"
        )
    return layer - 1 if layer > 0 else num_layers + layer
