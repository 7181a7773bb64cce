"""'Why this segment': the target of a segmentation network made of a class and a region.

For a network with a dense output ``(B, C, *spatial)`` (UNETR, SwinUNETR), :class:`SegmentTarget` names an output
channel and a region of the output grid. It is read two ways:

- the **score** of gradient methods is the channel's logit summed over the region (:func:`segment_scores`),
  instead of the channel's mean over the whole output;
- the **readout row** of every method (when no query token is given) is the region's tokens, each weighted by
  its share of the region's voxels (:func:`segment_rows`), instead of the mean of all rows: "what do this
  segment's tokens look at".

The region is a mask on the output grid (the model input's for UNETR / SwinUNETR) or, when None, the voxels the
network itself labels with the channel (argmax over channels, per sample). An empty region gives a zero score
and a zero row (a window of a volume that does not meet the segment adds nothing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AttentionMapError


@dataclass(frozen=True)
class SegmentTarget:
    """Output ``channel`` over a region: ``mask`` (*spatial) or (B, *spatial), > 0 inside, on the output's grid
    (numpy or torch), or None: where the network's own argmax is ``channel``. In ``explain_volume`` the mask may
    also be a ``region.MaskRegion`` / ``region.BoxRegion`` (or an array on the input volume's grid), placed in
    patient space and carried onto each window."""

    channel: int
    mask: Any = None


def segment_region(logits: torch.Tensor, target: SegmentTarget) -> torch.Tensor:
    """The region as float ``(B, *spatial)`` (1 inside, 0 outside) on ``logits`` ``(B, C, *spatial)``'s grid."""
    if logits.ndim < 3:
        raise AttentionMapError(f"target: a segment target needs a dense output (B, C, *spatial), such as UNETR's or "
                                f"SwinUNETR's; this model gives {tuple(logits.shape)} (use a class index)")
    channels = int(logits.shape[1])
    if not 0 <= int(target.channel) < channels:
        raise AttentionMapError(f"target: expected a segment channel in 0..{channels - 1}, got {target.channel}")
    spatial = tuple(logits.shape[2:])
    if target.mask is None:
        return (logits.detach().argmax(dim=1) == int(target.channel)).float()
    mask = torch.as_tensor(np.asarray(target.mask) if not isinstance(target.mask, torch.Tensor) else target.mask)
    if tuple(mask.shape[-len(spatial):]) != spatial or mask.ndim not in (len(spatial), len(spatial) + 1):
        raise AttentionMapError(f"target: the segment mask has shape {tuple(mask.shape)}; expected the output's "
                                f"spatial shape {spatial} (or one per sample, (B,) + that)")
    mask = (mask > 0).float().to(logits.device)
    return mask.expand((int(logits.shape[0]),) + spatial)


def segment_scores(logits: torch.Tensor, target: SegmentTarget) -> torch.Tensor:
    """``(B,)``: the channel's logit summed over the region."""
    region = segment_region(logits, target)
    return (logits[:, int(target.channel)] * region).reshape(region.shape[0], -1).sum(dim=1)


def segment_rows(region: torch.Tensor, grid: Sequence[int], token_size: Sequence[int], has_cls: bool) -> torch.Tensor:
    """``(B, N)`` readout rows: each token of ``grid`` weighted by the region's voxels inside it (tokens of
    ``token_size`` voxels from the grid's origin, the region padded with zeros to cover the grid), summing to 1
    per sample (0 where the region is empty); a 0 for the CLS token first when ``has_cls``."""
    cover = [int(g) * int(t) for g, t in zip(grid, token_size)]
    padding = []
    for size, target in zip(reversed(region.shape[1:]), reversed(cover)):
        padding += [0, max(target - int(size), 0)]
    padded = F.pad(region, padding)[(slice(None),) + tuple(slice(0, c) for c in cover)]
    pooled = F.avg_pool3d(padded[:, None], kernel_size=tuple(int(t) for t in token_size))[:, 0] if len(grid) == 3 \
        else F.avg_pool2d(padded[:, None], kernel_size=tuple(int(t) for t in token_size))[:, 0]
    rows = pooled.reshape(pooled.shape[0], -1)
    total = rows.sum(dim=1, keepdim=True)
    rows = torch.where(total > 0, rows / torch.where(total > 0, total, torch.ones_like(total)), rows)
    return F.pad(rows, (1, 0)) if has_cls else rows


def check_not_empty(region: Optional[torch.Tensor], target: SegmentTarget) -> None:
    """One clear error when a single input's segment is empty (nothing to explain)."""
    if region is not None and not bool((region.reshape(region.shape[0], -1).sum(dim=1) > 0).all()):
        where = "the network labels no voxel" if target.mask is None else "the mask holds no voxel"
        raise AttentionMapError(f"target: segment {target.channel} is empty ({where} as {target.channel}); pick "
                                "another class or give a mask that meets the input")
