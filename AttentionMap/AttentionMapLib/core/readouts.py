"""Readout functions of the built-in methods (registered in :mod:`.method_registry`).

Each is ``(captured, row, last, discard_ratio, has_cls) -> (B, N)``: the vector ``row^T R`` for the
method's matrix product ``R`` over blocks ``0..last`` (``raw``: block ``last`` only), on the full path
(head-fused ``(B, N, N)`` matrices, :mod:`.methods`), the block-wise path (:mod:`.blockwise`) or the
windowed path of Swin models (:mod:`.swin`, per-window ``n x n`` blocks).
"""
from __future__ import annotations

import torch

from . import blockwise, methods, swin


def _blockwise(captured, row: torch.Tensor, method: str, last: int, discard_ratio: float,
               has_cls: bool) -> torch.Tensor:
    return blockwise.readout_vector(captured.factors, row, method, last, discard_ratio, has_cls,
                                    captured.head_fusion, captured.head, captured.block_rows)


def raw(captured, row: torch.Tensor, last: int, discard_ratio: float, has_cls: bool) -> torch.Tensor:
    """Row(s) of block ``last``'s head-fused attention."""
    if captured.windows is not None:
        return swin.readout_vector(captured, row, "raw", last, discard_ratio)
    if captured.factors is not None:
        return _blockwise(captured, row, "raw", last, discard_ratio, has_cls)
    return torch.bmm(row.unsqueeze(1), captured.layers[last]).squeeze(1)


def rollout(captured, row: torch.Tensor, last: int, discard_ratio: float, has_cls: bool) -> torch.Tensor:
    """Attention rollout over blocks ``0..last`` (:func:`methods.rollout_vector`; discard cuts looked up
    when the capture keeps its sorted values, see ``CapturedAttention.discard_cuts``)."""
    if captured.windows is not None:
        return swin.readout_vector(captured, row, "rollout", last, discard_ratio)
    if captured.factors is not None:
        return _blockwise(captured, row, "rollout", last, discard_ratio, has_cls)
    cuts = captured.discard_cuts(discard_ratio, last) if discard_ratio > 0 else None
    return methods.rollout_vector(row, captured.layers[: last + 1], discard_ratio, has_cls, cuts)


def grad_rollout(captured, row: torch.Tensor, last: int, discard_ratio: float, has_cls: bool) -> torch.Tensor:
    """Gradient rollout over blocks ``0..last`` (:func:`methods.gradient_rollout_vector`)."""
    if captured.windows is not None:
        return swin.readout_vector(captured, row, "grad_rollout", last, discard_ratio)
    if captured.factors is not None:
        return _blockwise(captured, row, "grad_rollout", last, discard_ratio, has_cls)
    return methods.gradient_rollout_vector(row, captured.relevances[: last + 1])
