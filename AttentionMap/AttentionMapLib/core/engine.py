"""``explain``: run a 3D transformer once, capture its attention, fuse it, read it out as a grid.

The model's adapter (:mod:`.model_adapters`: MONAI's ViT family, Swin, or declared modules) says where its
attention is and on which token grids. Two steps, usable separately so that a GUI can re-fuse without
re-running the network:

- :func:`capture_attention` runs the forward (and, for gradient rollout, one backward) pass and keeps
  what the readout needs, by one of three attention paths (``windowed`` for Swin models, :mod:`.swin`;
  for global attention one of these two):

  - ``full``: flash attention off, one head-fused ``(B, N, N)`` matrix per layer (plus one relevance
    matrix per layer for gradient rollout). Heads are fused inside the hook, as each layer's attention
    appears: the full ``(B, heads, N, N)`` of a layer is never kept past its own block. Extra memory:
    ``L * B * N^2`` floats (x2 with gradients), and the forward itself forms ``(B, heads, N, N)``.
  - ``blockwise``: flash attention on, each block's input ``(B, N, C)`` (and dO ``(B, heads, N,
    d_head)`` for gradients); the readout recomputes Q, K (V) and row slabs of the attention (see
    :mod:`.blockwise`). Extra memory: ``L * B * N * C`` floats (x2 with gradients) plus one slab.
  - ``auto`` (default): ``blockwise`` when the model's blocks run flash attention or when the full
    path's matrices would exceed :data:`FULL_PATH_BUDGET_BYTES`, and every block's attention is plain
    ``softmax(Q K^T s)`` (no relative positional embedding, causal or attention mask,
    ``attention_dtype``); else ``full``.

- :func:`readout` turns that cache into a ``(B, n1, n2, n3)`` grid for a method, layer, query and
  normalisation in O(L * B * N^2) by vector-matrix products (see :mod:`.methods`); both paths give
  the same grid (to float32 rounding).

Grid axis order is the input tensor's spatial order: MONAI's patch embedding flattens
``(B, C, s1, s2, s3)`` patches so that token ``t = (a * n2 + b) * n3 + c``; the CLS token, when the
model has one, is token 0 and is dropped from the grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import AttentionMapError
from . import blockwise, methods
from .capture import attention_blocks
from .method_registry import get_method
from .model_adapters import ModelSpec, adapter_for
from .segment import SegmentTarget, check_not_empty, segment_region, segment_rows, segment_scores

ATTENTION_PATHS = ("auto", "full", "blockwise")
FULL_PATH_BUDGET_BYTES = 512 * 1024 ** 2
"""``auto`` takes the block-wise path when the full path's per-layer matrices would need more than this."""
Query = Union[int, Sequence[int], None]
Target = Union[int, Sequence[int], SegmentTarget, Callable[[torch.Tensor], torch.Tensor], None]


@dataclass
class CapturedAttention:
    """Head-fused attention of one forward pass, ready to be read out again without the network.

    Full path: ``layers[l]`` is ``(B, N, N)`` (rows = queries) for block ``l`` in forward order;
    ``relevances[l]`` is Chefer's ``mean_heads((dy/dA * A)^+)`` ``(B, N, N)`` when captured with
    gradients, else None; ``factors`` is None. Block-wise path: ``layers`` and ``relevances`` are None
    and ``factors[l]`` holds what block ``l``'s Q, K (V, dO) are recomputed from;
    ``block_rows``: query rows per slab (None: from free memory).
    ``target`` is the output index per sample used for the gradients. ``keep_sorted`` (set by a
    re-fusion, see :func:`readout`): ``sorted_fused[l]``, block ``l``'s fused entries sorted per sample
    ``(B, N*N)``, is made by :meth:`discard_cuts` on the first discard ratio for that block and kept
    (one more ``B * N^2`` float32 per block, as much again as ``layers``).
    Windowed path (Swin, :mod:`.swin`): ``windows[l]`` is block ``l``'s :class:`swin.WindowLayout` and
    ``layers[l]`` / ``relevances[l]`` are ``(B, windows, n, n)``, one ``n x n`` block per window.
    ``segment``: with a :class:`segment.SegmentTarget`, its region ``(B, *spatial)`` float on the output grid
    (read out as the default row, see :func:`readout`), else None.
    """

    spec: ModelSpec
    layers: Optional[List[torch.Tensor]]
    relevances: Optional[List[torch.Tensor]]
    logits: torch.Tensor
    target: Optional[List[int]]
    head_fusion: str
    head: Optional[int]
    factors: Optional[List[blockwise.BlockFactors]] = None
    block_rows: Optional[int] = None
    keep_sorted: bool = False
    windows: Optional[list] = None
    segment: Optional[torch.Tensor] = None
    sorted_fused: Dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def discard_cuts(self, ratio: float, last: int) -> Optional[List[Optional[torch.Tensor]]]:
        """Per block ``0..last`` the ``(B,)`` discard cut of ``ratio`` (full path) when ``keep_sorted``,
        read from ``sorted_fused`` (sorted on first use, O(N^2 log N) per block) in O(1): the value
        ``methods.discard_cut`` selects, so any later ratio costs no selection. None when not
        ``keep_sorted`` (the caller selects)."""
        if not self.keep_sorted or self.windows is not None:
            return None
        if methods.discard_count(self.num_tokens ** 2, ratio) == 0:
            return [None] * (last + 1)
        for block in range(last + 1):
            if block not in self.sorted_fused:
                self.sorted_fused[block] = methods.sorted_values(self.layers[block])
        return [methods.sorted_cut(self.sorted_fused[block], ratio) for block in range(last + 1)]

    @property
    def attention_path(self) -> str:
        if self.windows is not None:
            return "windowed"
        return "full" if self.factors is None else "blockwise"

    @property
    def has_gradients(self) -> bool:
        return self.relevances is not None if self.factors is None else self.factors[0].with_gradients

    def row_tokens(self, last: int) -> int:
        """Length of the readout row for blocks ``0..last``: N, or block ``last``'s stage tokens (windowed)."""
        return self.num_tokens if self.windows is None else self.windows[last].num_tokens

    def _first(self) -> torch.Tensor:
        return self.layers[0] if self.factors is None else self.factors[0].hidden

    @property
    def batch_size(self) -> int:
        return int(self._first().shape[0])

    @property
    def device(self) -> torch.device:
        return self._first().device

    @property
    def num_tokens(self) -> int:
        """N, the CLS token included (windowed path: the first stage's tokens)."""
        if self.windows is not None:
            return self.windows[0].num_tokens
        return int(self._first().shape[1 if self.factors is not None else -1])


@dataclass
class AttentionResult:
    """``grid``: float32 ``(B, n1, n2, n3)`` in the input's spatial axis order; ``logits``: the model's
    (first) output; ``layer``: the resolved, non-negative block index (last block used)."""

    grid: np.ndarray
    logits: torch.Tensor
    method: str
    layer: int
    target: Optional[List[int]]
    head_fusion: str
    head: Optional[int]
    query: Optional[int]
    normalize: str
    captured: CapturedAttention


def model_spec(model: torch.nn.Module, img_size: Optional[Sequence[int]] = None,
               input_size: Optional[Sequence[int]] = None) -> ModelSpec:
    """The model's token grids, read by its adapter (:func:`model_adapters.adapter_for`). ``img_size``: the
    argument, else what the model stores, else ``input_size`` (the spatial size of the input at hand)."""
    return adapter_for(model).spec(model, img_size, input_size)


def as_model_input(model: Any, x: Any) -> torch.Tensor:
    """`x` in the dtype of the model's parameters (float32 for MONAI networks), or AttentionMapError.

    Integer and float64 tensors (what ``torch.from_numpy`` gives for default numpy arrays) are cast
    explicitly (a copy; the caller's tensor is not changed); bool and complex tensors, numpy arrays and
    other objects are refused, naming the argument.
    """
    if not isinstance(model, torch.nn.Module):
        raise AttentionMapError(
            f"model: expected a torch.nn.Module (a MONAI ViT-based network), got {type(model).__name__}"
        )
    if not isinstance(x, torch.Tensor):
        hint = " (convert it with torch.from_numpy)" if isinstance(x, np.ndarray) else ""
        raise AttentionMapError(f"x: expected a torch tensor (B, C, *img_size), got {type(x).__name__}{hint}")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise AttentionMapError(f"x: expected real intensities (a float or integer tensor), got dtype {x.dtype}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return x if x.dtype == dtype else x.to(dtype)


def check_input(x: torch.Tensor, spec: ModelSpec) -> None:
    """One clear error for an input the model cannot take: dimensions, channels, size, NaN/inf."""
    dims = len(spec.patch_size)
    if not isinstance(x, torch.Tensor) or x.ndim != dims + 2:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise AttentionMapError(f"x: expected a torch tensor (B, C) + {dims} spatial axes, got {shape}")
    if x.shape[1] != spec.in_channels:
        raise AttentionMapError(
            f"x: the model expects {spec.in_channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})"
        )
    if tuple(x.shape[2:]) != spec.img_size:
        raise AttentionMapError(
            f"x: spatial size {tuple(x.shape[2:])} differs from the model's img_size {spec.img_size}; "
            "resize or tile the volume first (explain_volume does this)"
        )
    if not bool(torch.isfinite(x).all()):
        raise AttentionMapError("x: contains NaN or infinite values; replace them before explaining")


def capture_attention(
    model: torch.nn.Module,
    x: torch.Tensor,
    head_fusion: str = "mean",
    head: Optional[int] = None,
    with_gradients: bool = False,
    target: Target = None,
    img_size: Optional[Sequence[int]] = None,
    attention_path: str = "auto",
    block_rows: Optional[int] = None,
) -> CapturedAttention:
    """One pass of ``model`` on ``x`` ``(B, C, *img_size)``, keeping what the readout needs per layer.

    With ``with_gradients`` also one backward pass from the target score (see :func:`target_scores`)
    to the input only: no parameter's ``.grad`` is touched. ``attention_path``: auto | full |
    blockwise (see the module docstring); ``block_rows``: query rows per slab of the block-wise path
    (None: from free memory). Cost: one forward (+ one backward) pass, plus (full path) O(heads * N^2)
    per layer to fuse heads.
    """
    x = as_model_input(model, x)
    if x.ndim < 3:
        raise AttentionMapError(f"x: expected a torch tensor (B, C) + spatial axes, got shape {tuple(x.shape)}")
    spec = model_spec(model, img_size, input_size=tuple(x.shape[2:]))
    _check_fusion(head_fusion, head, spec.num_heads)
    check_input(x, spec)
    adapter = adapter_for(model)
    path = choose_attention_path(model, spec, int(x.shape[0]), with_gradients, attention_path)
    if path == "blockwise":
        try:
            return _with_segment(_capture_factors(model, x, spec, head_fusion, head, with_gradients, target,
                                                  block_rows), target)
        except blockwise.NotPlainAttention:
            if attention_path == "blockwise":
                raise
    fused: List[Optional[torch.Tensor]] = [None] * spec.num_layers
    relevances: List[Optional[torch.Tensor]] = [None] * spec.num_layers

    def on_attention(index: int, attention: torch.Tensor) -> None:
        fused[index] = fuse_heads_detached(attention, head_fusion, head)
        if with_gradients and attention.requires_grad:
            # the hook keeps a detached view: one holding `attention` itself would form a cycle through the
            # autograd graph (tensor -> its hooks -> closure -> tensor) that Python's GC cannot see, leaking
            # every captured graph (measured: about 50 MB per 8-crop call of the demo ViT)
            attention.register_hook(_relevance_hook(index, attention.detach(), relevances))

    def on_relevance(index: int, relevance: torch.Tensor) -> None:  # adapters that recompute the attention
        relevances[index] = relevance.float()

    with adapter.hooked_attention(model, on_attention, on_relevance):
        logits, targets = _run(model, x, with_gradients, target)
    if any(f is None for f in fused):
        raise AttentionMapError("model: not every self-attention block ran in the forward pass")
    relevance_list = None
    if with_gradients:
        relevance_list = [r if r is not None else torch.zeros_like(f) for r, f in zip(relevances, fused)]
    layouts = adapter.window_layouts(spec, model, x.device)
    if layouts is not None:  # (B * windows, n, n) -> (B, windows, n, n)
        def per_window(matrices):
            return [m.reshape(int(x.shape[0]), -1, *m.shape[1:]) for m in matrices]
        fused = per_window(fused)
        relevance_list = None if relevance_list is None else per_window(relevance_list)
    return _with_segment(CapturedAttention(spec, list(fused), relevance_list, logits, targets, head_fusion, head,
                                           windows=layouts), target)


def _with_segment(captured: CapturedAttention, target: Target) -> CapturedAttention:
    if isinstance(target, SegmentTarget):
        captured.segment = segment_region(captured.logits, target)
    return captured


def _capture_factors(model, x, spec, head_fusion, head, with_gradients, target, block_rows) -> CapturedAttention:
    """The block-wise path of :func:`capture_attention`: Q, K (V, dO) per block, flash attention on."""
    with blockwise.hooked_factors(model, with_gradients) as store:
        logits, targets = _run(model, x, with_gradients, target)
    if any(f is None for f in store):
        raise AttentionMapError("model: not every self-attention block ran in the forward pass")
    return CapturedAttention(spec, None, None, logits, targets, head_fusion, head, factors=list(store),
                             block_rows=block_rows)


def _run(model, x, with_gradients: bool, target: Target) -> Tuple[torch.Tensor, Optional[List[int]]]:
    """(logits, targets) of one forward pass, plus, with gradients, one backward pass from the target
    score to a copy of the input (the hooks of the capture see the attention and its gradient)."""
    if with_gradients:
        with torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            logits = primary_output(model(leaf), model)
            targets = resolve_target(logits, target)
            score = target_scores(logits, targets, target)
            torch.autograd.backward(score.sum(), inputs=[leaf])
        return logits.detach(), targets
    with torch.no_grad():
        logits = primary_output(model(x), model)
    return logits, resolve_target(logits, target) if target is not None else None


def full_path_bytes(spec: ModelSpec, batch: int, with_gradients: bool) -> int:
    """Bytes the full path keeps or forms beyond the forward: ``L`` fused ``(B, N, N)`` float32
    matrices, with gradients also ``L`` relevance matrices and the ``(B, heads, N, N)`` attention of
    every block that autograd saves for the backward."""
    tokens = spec.num_patches + int(spec.has_cls)
    per_matrix = 4 * batch * tokens * tokens
    return spec.num_layers * per_matrix * ((2 + spec.num_heads) if with_gradients else 1)


def choose_attention_path(model: torch.nn.Module, spec: ModelSpec, batch: int, with_gradients: bool,
                          requested: str = "auto") -> str:
    """``full`` or ``blockwise`` for ``requested`` (auto | full | blockwise), see the module docstring."""
    if requested not in ATTENTION_PATHS:
        raise AttentionMapError(f"attention_path: expected one of {', '.join(ATTENTION_PATHS)}, got {requested!r}")
    if not adapter_for(model).blockwise:
        if requested == "blockwise":
            raise AttentionMapError(f"attention_path: blockwise reads global (ViT) attention only; "
                                    f"{type(model).__name__}'s windowed attention is read per window (use auto)")
        return "full"
    if requested != "auto":
        return requested
    blocks = attention_blocks(model)
    if any(blockwise.unsupported_reason(b) is not None for b in blocks):
        return "full"
    if any(b.use_flash_attention for b in blocks):
        return "blockwise"
    return "blockwise" if full_path_bytes(spec, batch, with_gradients) > FULL_PATH_BUDGET_BYTES else "full"


def fuse_heads_detached(attention: torch.Tensor, head_fusion: str, head: Optional[int]) -> torch.Tensor:
    with torch.no_grad():
        return methods.fuse_heads(attention.detach(), head_fusion, head).float()


def _relevance_hook(index: int, attention: torch.Tensor, store: List[Optional[torch.Tensor]]):
    """Gradient hook storing relevance ``mean_heads(clamp(grad * attention, 0))``; ``attention`` detached."""
    def hook(gradient: torch.Tensor) -> None:
        product = gradient * attention  # the one (B, heads, N, N) temporary
        store[index] = product.clamp_(min=0).mean(dim=1).float()

    return hook


def primary_output(output, model: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """The tensor to explain: MONAI's ViT returns ``(x, hidden_states)``: the first element; a sequence of outputs
    is read at the index the model's adapter gives (:meth:`model_adapters.ModelAdapter.output_index`: a bare MONAI
    SwinTransformer's stage outputs at the last, deepest one)."""
    index = adapter_for(model).output_index(model) if model is not None and isinstance(output, (tuple, list)) else 0
    while isinstance(output, (tuple, list)):
        output = output[index]
        index = 0
    return output


def resolve_target(logits: torch.Tensor, target: Target) -> Optional[List[int]]:
    """Output index per sample. Class logits ``(B, K)``: default the predicted class. Dense outputs
    ``(B, C, ...)`` (UNETR, ViTAutoEnc): default channel 1 if C > 1 (first foreground) else 0.
    A segment target (:class:`segment.SegmentTarget`, dense outputs) gives its channel. A callable target picks
    its own score, so no index is returned."""
    if isinstance(target, SegmentTarget):
        segment_region(logits, target)  # checks the output, channel and mask
        return [int(target.channel)] * int(logits.shape[0])
    if callable(target):
        return None
    batch, channels = int(logits.shape[0]), int(logits.shape[1])
    if target is None:
        if logits.ndim == 2:
            return [int(i) for i in logits.argmax(dim=1)]
        return [1 if channels > 1 else 0] * batch
    targets = [int(target)] * batch if np.ndim(target) == 0 else [int(t) for t in target]
    if len(targets) != batch or any(not 0 <= t < channels for t in targets):
        raise AttentionMapError(
            f"target: expected an output index in 0..{channels - 1} (one, or one per sample of {batch}), got {target!r}"
        )
    return targets


def target_scores(logits: torch.Tensor, targets: Optional[List[int]], target: Target) -> torch.Tensor:
    """Scalar per sample ``(B,)`` whose gradient defines the relevance: the class logit for ``(B, K)``
    outputs; the mean of channel ``target`` over all positions for dense ``(B, C, ...)`` outputs; the
    channel summed over the region for a :class:`segment.SegmentTarget`; or ``target(logits)`` for a callable."""
    if isinstance(target, SegmentTarget):
        return segment_scores(logits, target)
    if callable(target):
        return target(logits)
    rows = torch.arange(logits.shape[0], device=logits.device)
    chosen = logits[rows, torch.tensor(targets, device=logits.device)]
    return chosen if chosen.ndim == 1 else chosen.reshape(chosen.shape[0], -1).mean(dim=1)


def _check_fusion(head_fusion: str, head: Optional[int], num_heads: int) -> None:
    if head_fusion not in methods.HEAD_FUSIONS:
        raise AttentionMapError(f"head_fusion: expected one of {', '.join(methods.HEAD_FUSIONS)}, got {head_fusion!r}")
    if head is not None and not 0 <= int(head) < num_heads:
        raise AttentionMapError(f"head: expected 0..{num_heads - 1} (the model has {num_heads} heads), got {head}")


def check_options(method: str, discard_ratio: float, normalize: str) -> None:
    """One clear error for an unknown method or normalisation, or a discard ratio outside [0, 1)."""
    get_method(method)
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise AttentionMapError(f"discard_ratio: expected a value in [0, 1), got {discard_ratio}")
    if normalize not in methods.NORMALIZATIONS:
        raise AttentionMapError(f"normalize: expected one of {', '.join(methods.NORMALIZATIONS)}, got {normalize!r}")


def resolve_layer(layer: int, num_layers: int) -> int:
    """Non-negative block index for ``layer`` (negative counts from the end)."""
    if not -num_layers <= int(layer) < num_layers:
        raise AttentionMapError(
            f"layer: expected -{num_layers}..{num_layers - 1} (the model has {num_layers} blocks), got {layer}"
        )
    return int(layer) % num_layers


def resolve_query(query: Query, spec: ModelSpec, block: int = 0) -> Optional[int]:
    """Flat patch index (C order over the grid block ``block`` acts on) for an int or a grid index tuple."""
    if query is None:
        return None
    grid = spec.block_grid(block)
    count = int(np.prod(grid))
    if np.ndim(query) == 0:
        flat = int(query)
        if not 0 <= flat < count:
            raise AttentionMapError(f"query: expected a token index in 0..{count - 1}, got {query}")
        return flat
    index = tuple(int(q) for q in query)
    if len(index) != len(grid) or any(not 0 <= q < n for q, n in zip(index, grid)):
        raise AttentionMapError(f"query: expected a grid index within {grid}, got {tuple(query)}")
    return int(np.ravel_multi_index(index, grid))


def readout(
    captured: CapturedAttention,
    method: str = "rollout",
    layer: int = -1,
    discard_ratio: float = 0.0,
    query: Query = None,
    normalize: str = "minmax",
    keep_sorted: bool = False,
) -> np.ndarray:
    """Grid ``(B, n1, n2, n3)`` float32 from cached attention. O(L * B * N^2).

    ``method``: a name in :mod:`.method_registry` (built in: ``raw``: row(s) of block ``layer``;
    ``rollout``: blocks ``0..layer``; ``grad_rollout``: blocks ``0..layer``, needs a capture with
    gradients). The row is the query token when given, else a segment target's tokens
    (:func:`segment.segment_rows`; Swin stage ``s`` has tokens of ``patch * 2**s`` voxels), else CLS, else the
    mean over all query rows.
    ``keep_sorted`` (full path, for repeated re-fusion) sets ``captured.keep_sorted``: from then on
    rollout's discard cuts come from :meth:`CapturedAttention.discard_cuts`, the same grid as without.
    """
    check_options(method, discard_ratio, normalize)
    spec = captured.spec
    last = resolve_layer(layer, spec.num_layers)
    query_index = resolve_query(query, spec, last)
    entry = get_method(method)
    captured.keep_sorted = captured.keep_sorted or keep_sorted
    if entry.needs_gradients and not captured.has_gradients:
        raise AttentionMapError(f"method: {method} needs attention captured with gradients "
                                "(capture_attention(..., with_gradients=True))")
    tokens = captured.row_tokens(last)
    offset = 1 if captured.windows is None and tokens == spec.num_patches + 1 else 0
    if query_index is None and captured.segment is not None:
        stage = spec.block_stages[last] if spec.block_stages else 0
        row = segment_rows(captured.segment, spec.block_grid(last), [p * 2 ** stage for p in spec.patch_size],
                           offset == 1).to(torch.float32)
    else:
        row = methods.readout_vector(captured.batch_size, tokens, offset == 1,
                                     None if query_index is None else query_index + offset, captured.device,
                                     torch.float32)
    with torch.no_grad():
        vector = entry.readout_function()(captured, row, last, float(discard_ratio), offset == 1)
    grid = vector[:, offset:].reshape((vector.shape[0],) + spec.grid_with(vector.shape[1] - offset)).cpu().numpy()
    return methods.normalize_map(grid, normalize)


def explain(
    model: torch.nn.Module,
    x: torch.Tensor,
    method: str = "rollout",
    layer: int = -1,
    head_fusion: str = "mean",
    head: Optional[int] = None,
    discard_ratio: float = 0.0,
    target: Target = None,
    query: Query = None,
    normalize: str = "minmax",
    attention_path: str = "auto",
) -> AttentionResult:
    """Attention map of ``model`` for input ``x``: one forward (and for gradient methods one backward)
    pass, the attention fused and read out as a token grid. The model is left exactly as it was (see
    :func:`capture.hooked_attention` and :func:`blockwise.hooked_factors`).

    Args:
        model: a MONAI ViT-based network (ViT, UNETR, ViTAutoEnc, ... with SABlock attention) or a MONAI
            SwinUNETR / SwinTransformer (windowed attention, :mod:`.swin`), or any kind with a registered
            adapter (:mod:`.model_adapters`).
        x: ``(B, C, *img_size)`` torch tensor, any real dtype (cast to the model's parameter dtype, see
            :func:`as_model_input`).
        method: a name in :mod:`.method_registry`: ``raw`` (one block), ``rollout`` (Abnar & Zuidema
            2020), ``grad_rollout`` (Chefer, Gur & Wolf 2021).
        layer: block index, Python style (0 = first, -1 = last), counted in forward order across a Swin
            model's stages; rollout methods use blocks 0..layer.
        head_fusion: ``mean`` | ``max`` | ``min`` over heads.
        head: one head 0..H-1 instead of fusing heads.
        discard_ratio: rollout: drop this fraction of each layer's weakest links, in [0, 1).
        target: gradient methods: a class index (default the predicted class), one per sample, or a
            callable ``logits -> (B,)`` score; dense outputs use the mean of a channel (see
            :func:`target_scores`). "Why this segment": a :class:`segment.SegmentTarget` (channel and region of
            a dense output; every method then reads the segment's tokens' rows, gradient methods also take the
            gradient of the channel summed over the region).
        query: read the row of one patch token (flat index or grid index; "what does this patch look
            at") instead of CLS / the mean of rows; for a Swin model an index on block ``layer``'s stage grid.
        normalize: ``minmax`` | ``percentile`` | ``none`` (see :func:`methods.normalize_map`).
        attention_path: ``auto`` (default), ``full`` (per-layer N x N matrices, flash attention off for
            the pass) or ``blockwise`` (per-layer block inputs, flash attention on; O(L * N * d)
            memory), see the module docstring; both give the same map. Swin models always take the
            windowed path (per-window matrices).

    Returns:
        AttentionResult: ``grid`` float32 ``(B, n1, n2, n3)`` in x's spatial axis order (Swin: the first stage's
        grid, ``raw`` the grid of block ``layer``'s stage), logits, the
        resolved layer and target, and the capture (for :func:`readout` with other options).
    """
    check_options(method, discard_ratio, normalize)
    captured = capture_attention(model, x, head_fusion, head, with_gradients=get_method(method).needs_gradients,
                                 target=target,
                                 attention_path=attention_path)
    if isinstance(target, SegmentTarget):
        check_not_empty(captured.segment, target)
    last = resolve_layer(layer, captured.spec.num_layers)
    grid = readout(captured, method, last, discard_ratio, query, normalize)
    return AttentionResult(grid, captured.logits, method, last, captured.target, head_fusion, head,
                           resolve_query(query, captured.spec, last), normalize, captured)
