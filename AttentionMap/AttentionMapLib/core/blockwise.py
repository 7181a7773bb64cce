"""Attention maps without the N x N attention matrix: per block Q, K (and V, dO), flash attention on.

The readout of every method is a vector times each block's (head-fused) attention, so a block needs
only its queries and keys instead of ``N x N``: ``r A`` is the sum over row blocks of
``r[rows] softmax(Q[rows] K^T s)``, with only a ``(B, heads, b, N)`` slab alive at a time.

- capture (:func:`hooked_factors`): the model runs with ``use_flash_attention=True``
  (``F.scaled_dot_product_attention``). A forward pre-hook on each ``SABlock`` keeps the block's
  input ``(B, N, C)`` (``N * C`` numbers, half of Q and K together), from which the readout
  recomputes Q, K (V) with the block's own projection weights (kept by reference) and MONAI's head
  split (``"b h (qkv l d) -> qkv b l h d"``); for gradients a tensor hook on the input of
  ``out_rearrange`` (the attention output O, ``(B, heads, N, d_head)``) keeps ``dO``. With
  ``O_h = A_h V_h``, the gradient reaching the attention probabilities is ``dA_h = dO_h V_h^T``:
  what the full-matrix path's hook on ``drop_weights`` sees (dropout is the identity in eval mode).
- kernels (:func:`vector_times_layer`): ``raw`` (fused layer), ``rollout`` (with the identity and
  row normalisation of :func:`methods.rollout_vector`, after :func:`methods.discard_cut`),
  ``grad_rollout`` (``v + v mean_h((dA_h * A_h)^+)``), each as one pass over row blocks; head fusion
  (mean / max / min / one head) is done on each ``(B, heads, b, N)`` slab, so max and min are exact.
- discard_ratio (:func:`discard_cut`): the k-th smallest fused entry per sample, exactly as
  ``torch.kthvalue`` over the N x N matrix would give it, by a two-pass radix selection over the
  float32 bit patterns (16 high bits, then 16 low bits), streaming the row blocks twice.

Memory: ``B * N * C`` numbers per block kept (x2 with gradients: dO), plus, while one block is read
out, its Q, K (V) and one slab of ``block_rows`` rows, sized from free memory
(:func:`choose_block_rows`). Kernels compute in the capture dtype promoted to at least float32.
The cache refers to the model's projection weights and to each block's input tensor (no copies):
re-fusing after changing the weights in place reads out the changed model, and a model that
modified a block's input in place after the block ran would change the cache (MONAI's blocks do not).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from monai.networks.blocks.selfattention import SABlock

from ..errors import AttentionMapError
from . import methods
from .capture import attention_blocks

CPU_SLAB_BUDGET_BYTES = 64 * 1024 ** 2
"""Bytes of float32 row-block temporaries on CPU (a fixed budget: free RAM is shared and unreliable)."""
CUDA_FREE_FRACTION = 0.25
"""Share of the free CUDA memory (``torch.cuda.mem_get_info``) that row-block temporaries may use."""
SLAB_TEMPORARIES = 4
"""``(B, heads, b, N)`` float32 temporaries alive at once: scores/probabilities, dA, their product, fused."""
_HIGH, _LOW = 1 << 15, 1 << 16  # buckets of the two radix passes (float32 >= 0: sign bit 0)


class NotPlainAttention(AttentionMapError):
    """A block's attention is not plain ``softmax(Q K^T s)`` (mask given at call time)."""


Projection = Tuple[torch.Tensor, Optional[torch.Tensor]]
"""(weight ``(heads * d_head, C)``, bias or None) of a linear projection."""


@dataclass
class BlockFactors:
    """One ``SABlock``'s pass: ``hidden`` its input ``(B, N, C)`` in the dtype the model ran in;
    ``projections`` the q, k, v projections (detached references to the block's weights);
    ``output_grad`` ``dO`` ``(B, heads, N, d_head)`` (None without gradients, or when no gradient
    reached the block); ``with_gradients``: captured with a backward pass; ``heads``; ``scale`` the
    block's softmax scale ``s``."""

    hidden: torch.Tensor
    projections: Tuple[Projection, Projection, Projection]
    output_grad: Optional[torch.Tensor]
    with_gradients: bool
    heads: int
    scale: float

    def project(self, which: int) -> torch.Tensor:
        """Q (0), K (1) or V (2) ``(B, heads, N, d_head)``, as SABlock's ``input_rearrange`` splits heads."""
        weight, bias = self.projections[which]
        out = F.linear(self.hidden, weight, bias)
        return out.view(out.shape[0], out.shape[1], self.heads, -1).transpose(1, 2)


def block_projections(block: SABlock) -> Tuple[Projection, Projection, Projection]:
    """The q, k, v (weight, bias) of ``block``: slices of the combined ``qkv`` Linear (features ordered
    ``(qkv, heads, d_head)``) or ``to_q``/``to_k``/``to_v``; detached, not copied."""
    if block.use_combined_linear:
        weight = block.qkv.weight.detach()
        bias = None if block.qkv.bias is None else block.qkv.bias.detach()
        inner = weight.shape[0] // 3
        return tuple((weight[i * inner:(i + 1) * inner], None if bias is None else bias[i * inner:(i + 1) * inner])
                     for i in range(3))
    return tuple(
        (m.weight.detach(), None if m.bias is None else m.bias.detach()) for m in (block.to_q, block.to_k, block.to_v)
    )


def unsupported_reason(block: SABlock) -> Optional[str]:
    """Why ``block`` cannot be explained block-wise (its attention is not plain ``softmax(Q K^T s)``
    in the dtype of Q and K), or None."""
    if block.rel_positional_embedding is not None:
        return "relative positional embedding"
    if block.causal:
        return "causal mask"
    if block.attention_dtype is not None:
        return f"attention_dtype={block.attention_dtype}"
    return None


@contextmanager
def hooked_factors(model: torch.nn.Module, with_gradients: bool) -> Iterator[List[Optional[BlockFactors]]]:
    """Within the context, a forward (and backward) of ``model`` fills one :class:`BlockFactors` per block.

    For the pass every block runs flash attention with ``dropout_rate`` 0 (MONAI passes
    ``dropout_p=dropout_rate`` to ``scaled_dot_product_attention`` even in eval mode) and
    ``save_attn`` off, the model in eval mode. All of it, and the hooks, are restored on exit, also on
    error. A block called with an attention mask raises :class:`NotPlainAttention`.
    """
    blocks = attention_blocks(model)
    reasons = [(i, unsupported_reason(b)) for i, b in enumerate(blocks)]
    reasons = [(i, r) for i, r in reasons if r is not None]
    if reasons:
        raise NotPlainAttention("model: block-wise attention needs plain softmax(Q K^T s) attention; "
                                + ", ".join(f"block {i} has {r}" for i, r in reasons) + "; use attention_path='full'")
    saved = [(b.use_flash_attention, b.save_attn, b.dropout_rate) for b in blocks]
    training: Dict[torch.nn.Module, bool] = {m: m.training for m in model.modules()}
    store: List[Optional[BlockFactors]] = [None] * len(blocks)
    handles = []
    try:
        for index, block in enumerate(blocks):
            block.use_flash_attention, block.save_attn, block.dropout_rate = True, False, 0.0
            handles += [
                block.register_forward_pre_hook(_input_hook(index, block, store, with_gradients), with_kwargs=True),
                block.out_rearrange.register_forward_pre_hook(_output_hook(index, store)),
            ]
        model.eval()
        yield store
    finally:
        for handle in handles:
            handle.remove()
        for block, (flash, save, rate) in zip(blocks, saved):
            block.use_flash_attention, block.save_attn, block.dropout_rate = flash, save, rate
        for module, mode in training.items():
            module.training = mode


def _input_hook(index: int, block: SABlock, store: List[Optional[BlockFactors]], with_gradients: bool):
    def hook(_module, args, kwargs):
        mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
        if mask is not None:
            raise NotPlainAttention(f"model: block {index} is called with an attention mask; "
                                    "block-wise attention needs plain softmax(Q K^T s); use attention_path='full'")
        hidden = kwargs["x"] if "x" in kwargs else args[0]
        store[index] = BlockFactors(hidden.detach(), block_projections(block), None, with_gradients,
                                    int(block.num_heads), float(block.scale))

    return hook


def _output_hook(index: int, store: List[Optional[BlockFactors]]):
    """For gradients: ``dO``, the gradient of the attention output O (the input of ``out_rearrange``)."""

    def hook(_module, inputs) -> None:
        factors, output = store[index], inputs[0]
        if factors.with_gradients and output.requires_grad:
            output.register_hook(lambda gradient: setattr(factors, "output_grad", gradient.detach()))

    return hook


def choose_block_rows(
    batch: int, heads: int, tokens: int, device: torch.device, requested: Optional[int] = None
) -> int:
    """Query rows per slab: ``requested`` (clipped to 1..N), else as many as fit the slab budget
    (CPU: :data:`CPU_SLAB_BUDGET_BYTES`; CUDA: :data:`CUDA_FREE_FRACTION` of the free memory)."""
    if requested is not None:
        return max(1, min(int(requested), tokens))
    if device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * CUDA_FREE_FRACTION)
    else:
        budget = CPU_SLAB_BUDGET_BYTES
    per_row = batch * heads * tokens * 4 * SLAB_TEMPORARIES
    return max(1, min(tokens, budget // per_row))


class LayerRows:
    """Row slabs of one block's attention, computed from its factors.

    Attention is computed in the factors' dtype promoted to at least float32 (float16/bfloat16 in,
    float32 math); fused and relevance rows come out as float32, as the full path stores them.
    """

    def __init__(self, factors: BlockFactors, head_fusion: str, head: Optional[int]):
        self.factors = factors
        self.head_fusion, self.head = head_fusion, head
        self.dtype = torch.promote_types(factors.hidden.dtype, torch.float32)
        self.query = factors.project(0).to(self.dtype)
        self.key_t = factors.project(1).to(self.dtype).transpose(-1, -2)
        self.value_t = None if factors.output_grad is None else factors.project(2).to(self.dtype).transpose(-1, -2)

    def probabilities(self, rows: slice) -> torch.Tensor:
        """``softmax(Q[rows] K^T s)`` ``(B, heads, b, N)``, as SABlock computes it (scores, then scale)."""
        scores = torch.matmul(self.query[:, :, rows], self.key_t)
        return scores.mul_(self.factors.scale).softmax(dim=-1)

    def fused(self, rows: slice) -> torch.Tensor:
        """Head-fused attention rows ``(B, b, N)`` float32."""
        return methods.fuse_heads(self.probabilities(rows), self.head_fusion, self.head).float()

    def relevance(self, rows: slice) -> torch.Tensor:
        """Chefer's ``mean_h((dA_h * A_h)^+)`` rows ``(B, b, N)`` float32, with ``dA_h = dO_h V_h^T``."""
        if self.factors.output_grad is None:
            return torch.zeros((self.key_t.shape[0], rows.stop - rows.start, self.key_t.shape[-1]),
                               device=self.key_t.device)
        product = torch.matmul(self.factors.output_grad[:, :, rows].to(self.dtype), self.value_t)
        return product.mul_(self.probabilities(rows)).clamp_(min=0).mean(dim=1).float()


def _row_slices(tokens: int, block_rows: int) -> Iterator[slice]:
    for start in range(0, tokens, block_rows):
        yield slice(start, min(tokens, start + block_rows))


def discard_cut(layer: LayerRows, ratio: float, block_rows: int) -> Optional[torch.Tensor]:
    """Per sample ``(B,)`` the ``k``-th smallest fused entry, ``k = int(N * N * ratio)`` (None when
    ``k == 0``): the value ``methods.discard_cut`` finds, found without storing N x N.

    Fused attention is >= 0, so its float32 bit patterns order as integers: a histogram of the high
    16 bits finds the bucket holding the k-th entry, a second pass over that bucket's low 16 bits
    finds the exact pattern (duplicates counted, as ``kthvalue`` does).
    """
    batch, tokens = layer.key_t.shape[0], layer.key_t.shape[-1]
    count = methods.discard_count(tokens * tokens, ratio)
    if count == 0:
        return None
    device = layer.key_t.device
    offsets = torch.arange(batch, device=device).view(batch, 1, 1)
    high_counts = torch.zeros(batch * _HIGH, dtype=torch.long, device=device)
    for rows in _row_slices(tokens, block_rows):
        bits = layer.fused(rows).view(torch.int32).long()
        high_counts += torch.bincount(((bits >> 16) + offsets * _HIGH).flatten(), minlength=batch * _HIGH)
    cumulative = high_counts.view(batch, _HIGH).cumsum(dim=1)
    wanted = torch.full((batch, 1), count, dtype=torch.long, device=device)
    high = torch.searchsorted(cumulative, wanted)  # (B, 1): bucket whose cumulative count reaches k
    below = torch.where(high > 0, cumulative.gather(1, (high - 1).clamp(min=0)), torch.zeros_like(high))
    rank = wanted - below  # 1-based rank inside the bucket
    low_counts = torch.zeros(batch * _LOW, dtype=torch.long, device=device)
    for rows in _row_slices(tokens, block_rows):
        bits = layer.fused(rows).view(torch.int32).long()
        inside = (bits >> 16) == high.view(batch, 1, 1)
        index = ((bits & 0xFFFF) + offsets * _LOW)[inside]
        low_counts += torch.bincount(index, minlength=batch * _LOW)
    low = torch.searchsorted(low_counts.view(batch, _LOW).cumsum(dim=1), rank)
    return ((high << 16) | low).view(batch).to(torch.int32).view(torch.float32)


def vector_times_layer(vector: torch.Tensor, layer: LayerRows, method: str, block_rows: int,
                       cut: Optional[torch.Tensor] = None, keep_first: bool = False) -> torch.Tensor:
    """One block's step of the readout, ``(B, N)`` -> ``(B, N)``, one pass over row slabs.

    ``raw``: ``v F``; ``rollout``: ``v rownorm(0.5 F' + 0.5 I)`` with ``F'`` the fused rows with
    entries ``<= cut`` zeroed (entry [0, 0] kept when ``keep_first``); ``grad_rollout``:
    ``v + v Abar``. Slabs whose entries of ``v`` are all zero are skipped (a one-hot readout row
    costs one slab).
    """
    product = torch.zeros_like(vector)
    identity = torch.zeros_like(vector)
    for rows in _row_slices(vector.shape[1], block_rows):
        weights = vector[:, rows]
        if not bool(weights.any()):
            continue
        if method == "grad_rollout":
            matrix = layer.relevance(rows)
        else:
            matrix = layer.fused(rows)
            if cut is not None:
                matrix = methods.zero_at_or_below(matrix, cut, keep_first and rows.start == 0)
            if method == "rollout":
                weights = weights / (0.5 * matrix.sum(dim=-1) + 0.5)
                identity[:, rows] = weights
        product += torch.bmm(weights.unsqueeze(1), matrix).squeeze(1)
    if method == "rollout":
        return 0.5 * product + 0.5 * identity
    return vector + product if method == "grad_rollout" else product


def readout_vector(
    factors: Sequence[BlockFactors],
    row: torch.Tensor,
    method: str,
    last: int,
    discard_ratio: float,
    has_cls: bool,
    head_fusion: str,
    head: Optional[int],
    block_rows: Optional[int] = None,
) -> torch.Tensor:
    """``(B, N)`` readout of ``method`` from blocks ``0..last`` (``raw``: block ``last`` only), the
    same vector as :func:`engine.readout`'s full-matrix path; ``row`` is the readout row ``(B, N)``."""
    first = factors[0]
    batch, tokens = first.hidden.shape[:2]
    rows = choose_block_rows(batch, first.heads, tokens, first.hidden.device, block_rows)
    if method == "raw":
        return vector_times_layer(row, LayerRows(factors[last], head_fusion, head), "raw", rows)
    vector = row
    for block in reversed(list(factors[: last + 1])):
        layer = LayerRows(block, head_fusion, head)
        cut = discard_cut(layer, discard_ratio, rows) if method == "rollout" and discard_ratio > 0 else None
        vector = vector_times_layer(vector, layer, method, rows, cut, keep_first=has_cls)
    return vector

