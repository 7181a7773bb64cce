"""Fusion of attention across heads and layers, read out as one row (vector) per sample.

Shapes: a layer's attention is ``(B, heads, N, N)``, rows = queries, each row sums to 1; a head-fused
layer is ``(B, N, N)``; a readout vector ``(B, N)`` (token 0 is CLS when the model has one).

Rollout and gradient rollout define a product of N x N matrices over layers, but it is only ever read
as ``e^T R`` for one readout vector ``e``, so it is evaluated right to left as vector-matrix products:
O(L * N^2) time and O(N) extra memory per sample, never the O(L * N^3) matrix-matrix product.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

HEAD_FUSIONS = ("mean", "max", "min")
NORMALIZATIONS = ("minmax", "percentile", "none")
PERCENTILE_RANGE = (1.0, 99.0)


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean", head: Optional[int] = None) -> torch.Tensor:
    """``(B, heads, N, N)`` -> ``(B, N, N)``: one chosen ``head``, else the mean / max / min over heads."""
    if head is not None:
        return attention[:, head]
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    return attention.amin(dim=1)


def discard_count(entries: int, ratio: float) -> int:
    """``k = int(entries * ratio)``: how many of a sample's N*N fused entries a discard ratio drops."""
    return int(entries * ratio)


def discard_cut(fused: torch.Tensor, ratio: float) -> Optional[torch.Tensor]:
    """``(B,)`` the k-th smallest of each sample's N*N entries of ``fused`` ``(B, N, N)`` (found by
    selection in O(N^2), ``k`` from :func:`discard_count`); None when ``k == 0`` (nothing to drop)."""
    flat = fused.reshape(fused.shape[0], -1)
    count = discard_count(flat.shape[1], ratio)
    return None if count == 0 else flat.kthvalue(count, dim=1).values


def sorted_values(fused: torch.Tensor) -> torch.Tensor:
    """Each sample's N*N entries of ``fused`` ``(B, N, N)`` in ascending order, ``(B, N*N)``, same dtype."""
    flat = fused.detach().reshape(fused.shape[0], -1)
    if flat.device.type == "cpu":  # numpy's sort of float32 is several times faster than torch.sort on CPU
        return torch.from_numpy(np.sort(flat.numpy(), axis=1))
    return torch.sort(flat, dim=1).values


def sorted_cut(ordered: torch.Tensor, ratio: float) -> Optional[torch.Tensor]:
    """:func:`discard_cut` read in O(1) from :func:`sorted_values` ``(B, N*N)``: the same value."""
    count = discard_count(ordered.shape[1], ratio)
    return None if count == 0 else ordered[:, count - 1]


def zero_at_or_below(fused: torch.Tensor, cut: torch.Tensor, keep_first: bool,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Copy of ``fused`` ``(B, N, N)`` with each sample's entries ``<= cut[b]`` set to 0 (ties dropped);
    ``keep_first`` keeps entry [0, 0] (CLS -> CLS) as vit-explain does. One ``threshold`` pass per sample
    (``x <= t ? 0 : x``, the rule of ``masked_fill(x <= t, 0)``, in a fraction of ``torch.where``'s time),
    written into ``out`` (same shape and dtype) when given, else into a new tensor."""
    out = torch.empty_like(fused) if out is None else out
    for sample, value in enumerate(cut.tolist()):  # float32 -> Python float -> float32 is exact
        torch.threshold(fused[sample], value, 0.0, out=out[sample])
    if keep_first:
        out[:, 0, 0] = fused[:, 0, 0]
    return out


def rollout_vector(readout: torch.Tensor, layers: Sequence[torch.Tensor], discard_ratio: float, has_cls: bool,
                   cuts: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """Abnar & Zuidema rollout read out from the left: ``e^T Ahat_L ... Ahat_1``.

    ``Ahat_l = rownorm(0.5 * A_l + 0.5 * I)`` with ``A_l`` the head-fused layer after the discard cut
    (:func:`zero_at_or_below`, O(N^2) per layer). ``cuts``: per layer the ``(B,)`` cut (or None) when already
    known (e.g. from :func:`sorted_cut`), else found by :func:`discard_cut`.
    ``layers`` are in forward order (first block first). Never forms ``Ahat``: with ``s`` the row sums of
    ``0.5 * A + 0.5 * I``, ``v Ahat = 0.5 * (w A) + 0.5 * w`` where ``w = v / s``.
    """
    layers = list(layers)
    if cuts is None:
        cuts = [discard_cut(fused, discard_ratio) if discard_ratio > 0 else None for fused in layers]
    vector, scratch = readout, None
    for fused, cut in zip(reversed(layers), reversed(list(cuts))):
        if cut is not None:  # one buffer for all layers: no N x N allocation per layer
            fused = scratch = zero_at_or_below(fused, cut, has_cls, out=scratch)
        row_sums = 0.5 * fused.sum(dim=-1) + 0.5
        weighted = vector / row_sums
        vector = 0.5 * torch.bmm(weighted.unsqueeze(1), fused).squeeze(1) + 0.5 * weighted
    return vector


def gradient_rollout_vector(readout: torch.Tensor, relevances: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021 read out from the left: ``e^T (I + Abar_L) ... (I + Abar_1)``.

    ``relevances`` are ``Abar_b = mean_heads((dy/dA_b * A_b)^+)`` ``(B, N, N)`` in forward order; the
    update ``R <- R + Abar_b R`` (first block first) gives ``R = (I + Abar_L) ... (I + Abar_1)``.
    """
    vector = readout
    for relevance in reversed(list(relevances)):
        vector = vector + torch.bmm(vector.unsqueeze(1), relevance).squeeze(1)
    return vector


def readout_vector(batch: int, tokens: int, has_cls: bool, query_token: Optional[int], device, dtype) -> torch.Tensor:
    """The row(s) to read: one-hot at ``query_token`` (an index into all N tokens), else one-hot at
    the CLS token, else the mean over all query rows. ``(B, N)``."""
    if query_token is None and not has_cls:
        return torch.full((batch, tokens), 1.0 / tokens, device=device, dtype=dtype)
    vector = torch.zeros((batch, tokens), device=device, dtype=dtype)
    vector[:, 0 if query_token is None else query_token] = 1.0
    return vector


def normalize_map(values: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """Normalise each sample (axis 0) over all its other axes; float32 out.

    ``minmax``: to [0, 1] (a constant map becomes all 0). ``percentile`` (robust, for display): the
    1st percentile goes to 0 and the 99th to 1; values below the 1st are clipped to 0, values above
    the 99th are kept (> 1, a display window of 0..1 saturates them) so that the peak stays one
    token instead of a plateau of ties. ``none``: unchanged.
    """
    values = np.asarray(values, dtype=np.float32)
    if mode == "none":
        return values.copy()
    flat = values.reshape(values.shape[0], -1)
    if mode == "percentile":
        low, high = np.percentile(flat, PERCENTILE_RANGE, axis=1, keepdims=True)
        flat = np.maximum(flat, low)
    else:
        low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = high - low
    scaled = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1.0), 0.0)
    return scaled.astype(np.float32).reshape(values.shape)
