"""Attention modules declared as data (a model card's ``attention`` section): ViT-like networks without project code.

A declaration names the class of a network's attention modules and how to read them; the network's tokens are the
patches of a regular grid (``patch_size``), after ``prefix_tokens`` (0, or 1 for a CLS token). Two kinds:

- ``softmax``: the module computes its weights explicitly; ``attention_output`` is the path of the submodule whose
  output is the post-softmax attention ``(B, heads, N, N)`` (an ``nn.Softmax``, or the dropout right after a
  functional softmax: identity in eval mode). Read live by a forward hook, gradients included.
- ``qkv``: the module calls ``F.scaled_dot_product_attention`` (or flash attention), so the weights never exist;
  they are recomputed from its ``qkv`` Linear's output ``(B, N, 3 * heads * d)`` (features ordered q / k / v,
  then heads, then d: MONAI's ``SABlock`` and timm's layout) as ``softmax(q k^T * scale)``, scale ``d ** -0.5``
  unless given; gradients come from ``dO``, the gradient reaching the input of ``output`` (the projection after
  the attention, ``(B, N, heads * d)``): ``dA_h = dO_h V_h^T`` for ``A_h V_h = O_h``. A module that sees its tokens
  channels-last, ``(B, D, H, W, C)`` (SAM and SAM-Med3D's ``ImageEncoderViT3D``), is read the same way, its tokens
  in C order of (D, H, W). ``relative_position: "decomposed"`` adds the decomposed 3D relative-position bias of
  MViTv2 / SAM / SAM-Med3D to the logits before the softmax: ``q_n . R_d[d_n - d_m] + q_n . R_h[h_n - h_m] +
  q_n . R_w[w_n - w_m]`` with the unscaled query and the module's tables ``relative_position_tables`` (default
  ``rel_pos_d``, ``rel_pos_h``, ``rel_pos_w``, each ``(2 L - 1, d)``, linearly resized when the grid differs from
  the one they were trained for); it needs the channels-last layout (the grid is read from it) and no CLS token.
  Windowed blocks (SAM's window partition) are refused: their tokens are not the network's grid (an adapter like
  ``core/swin.py`` is the way). Attention masks are not part of the recomputation.

:func:`declare_attention` attaches a declaration to a network; the adapter here (registered before the built-in
ones, so a declaration wins) reads it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import AttentionMapError
from .capture import AttentionCallback, attention_hooks
from .model_adapters import ModelAdapter, ModelSpec

KINDS = ("softmax", "qkv")
RELATIVE_POSITIONS = ("decomposed",)
ATTRIBUTE = "attentionmap_declaration"
RelevanceCallback = Callable[[int, torch.Tensor], None]
"""Called as ``callback(block_index, relevance)`` with Chefer's ``mean_heads((dA * A)^+)`` ``(B, N, N)``."""


@dataclass(frozen=True)
class Declaration:
    """A checked ``attention`` section (see the module docstring)."""

    module_class: str
    kind: str
    patch_size: Tuple[int, ...]
    prefix_tokens: int = 0
    in_channels: int = 1
    attention_output: Optional[str] = None
    qkv: str = "qkv"
    output: str = "proj"
    num_heads: str = "num_heads"
    scale: Optional[float] = None
    relative_position: Optional[str] = None
    relative_position_tables: Tuple[str, str, str] = ("rel_pos_d", "rel_pos_h", "rel_pos_w")


def parse_declaration(section: Any, source: str = "attention") -> Declaration:
    """A declaration from plain data (a card's ``attention`` object); AttentionMapError naming the field."""
    if not isinstance(section, Mapping):
        raise AttentionMapError(f"{source}: expected an object with module_class, kind and patch_size, got "
                                f"{type(section).__name__}")
    known = set(Declaration.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:
        raise AttentionMapError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    for key in ("module_class", "kind", "patch_size"):
        if key not in section:
            raise AttentionMapError(f"{source}.{key}: missing")
    kind = section["kind"]
    if kind not in KINDS:
        raise AttentionMapError(f"{source}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    patch = section["patch_size"]
    if not (isinstance(patch, list) and len(patch) == 3 and all(isinstance(p, int) and p >= 1 for p in patch)):
        raise AttentionMapError(f"{source}.patch_size: expected three positive integers, got {patch!r}")
    for key in ("module_class", "attention_output", "qkv", "output", "num_heads"):
        value = section.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise AttentionMapError(f"{source}.{key}: expected a name, got {value!r}")
    if kind == "softmax" and not section.get("attention_output"):
        raise AttentionMapError(f"{source}.attention_output: a softmax declaration names the submodule whose output "
                                "is the attention (e.g. 'attn_drop' or 'softmax')")
    prefix, channels, scale = section.get("prefix_tokens", 0), section.get("in_channels", 1), section.get("scale")
    if prefix not in (0, 1) or isinstance(prefix, bool):
        raise AttentionMapError(f"{source}.prefix_tokens: expected 0 or 1 (a CLS token), got {prefix!r}")
    if not (isinstance(channels, int) and not isinstance(channels, bool) and 1 <= channels <= 64):
        raise AttentionMapError(f"{source}.in_channels: expected an integer in 1..64, got {channels!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise AttentionMapError(f"{source}.scale: expected a positive number or null, got {scale!r}")
    relative, tables = section.get("relative_position"), section.get("relative_position_tables")
    if relative is not None:
        if relative not in RELATIVE_POSITIONS or kind != "qkv":
            raise AttentionMapError(f"{source}.relative_position: expected null or one of "
                                    f"{', '.join(RELATIVE_POSITIONS)} with kind 'qkv', got {relative!r} (kind "
                                    f"{kind!r}); a softmax declaration reads the weights with their bias already in")
        if prefix:
            raise AttentionMapError(f"{source}.relative_position: a decomposed relative position has no CLS token; "
                                    "set prefix_tokens to 0")
    if tables is not None and not (isinstance(tables, list) and len(tables) == 3
                                   and all(isinstance(t, str) and t.strip() for t in tables)):
        raise AttentionMapError(f"{source}.relative_position_tables: expected three attribute names (D, H, W "
                                f"axes), got {tables!r}")
    return Declaration(**{**section, "patch_size": tuple(patch),
                          **({"relative_position_tables": tuple(tables)} if tables is not None else {})})


def declare_attention(model: torch.nn.Module, section: Any, source: str = "attention") -> torch.nn.Module:
    """Attach the declaration ``section`` (plain data, see :func:`parse_declaration`) to ``model``; from then on
    the engine reads the declared modules of this model. Returns the model."""
    declaration = parse_declaration(section, source)
    modules = _modules(model, declaration)
    for module in modules:
        for path in ([declaration.attention_output] if declaration.kind == "softmax"
                     else [declaration.qkv, declaration.output]):
            if not isinstance(_submodule(module, path), torch.nn.Module):
                raise AttentionMapError(f"{source}: {declaration.module_class} has no submodule {path!r}")
        if not isinstance(getattr(module, declaration.num_heads, None), int):
            raise AttentionMapError(f"{source}.num_heads: {declaration.module_class} has no integer attribute "
                                    f"{declaration.num_heads!r}")
        for name in declaration.relative_position_tables if declaration.relative_position else ():
            table = getattr(module, name, None)
            if not (isinstance(table, torch.Tensor) and table.ndim == 2):
                raise AttentionMapError(f"{source}.relative_position_tables: {declaration.module_class} has no "
                                        f"table {name!r} (a (2 L - 1, head dim) tensor)")
    setattr(model, ATTRIBUTE, declaration)
    return model


def _modules(model: torch.nn.Module, declaration: Declaration) -> List[torch.nn.Module]:
    modules = [m for m in model.modules() if type(m).__name__ == declaration.module_class]
    if not modules:
        raise AttentionMapError(f"attention.module_class: no module of class {declaration.module_class!r} in "
                                f"{type(model).__name__}")
    return modules


def _submodule(module: torch.nn.Module, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


class DeclaredAdapter(ModelAdapter):
    """Networks carrying a declaration (:func:`declare_attention`)."""

    name = "declared"

    def matches(self, model: torch.nn.Module) -> bool:
        return isinstance(getattr(model, ATTRIBUTE, None), Declaration)

    def spec(self, model: torch.nn.Module, img_size: Optional[Sequence[int]] = None,
             input_size: Optional[Sequence[int]] = None) -> ModelSpec:
        declaration: Declaration = getattr(model, ATTRIBUTE)
        size = img_size if img_size is not None else input_size
        if size is None:
            raise AttentionMapError("img_size: a declared network does not store its input size; pass img_size")
        size = tuple(int(s) for s in size)
        if len(size) != 3 or any(s % p for s, p in zip(size, declaration.patch_size)):
            raise AttentionMapError(f"x: spatial size {size} is not whole patches of {declaration.patch_size}")
        modules = _modules(model, declaration)
        heads = min(int(getattr(m, declaration.num_heads)) for m in modules)
        grid = tuple(s // p for s, p in zip(size, declaration.patch_size))
        return ModelSpec(declaration.patch_size, grid, size, declaration.in_channels, len(modules), heads,
                         declaration.prefix_tokens == 1)

    @contextmanager
    def hooked_attention(self, model: torch.nn.Module, callback: AttentionCallback,
                         on_relevance: Optional[RelevanceCallback] = None) -> Iterator[list]:
        """``softmax``: the declared output's forward output, live. ``qkv``: the recomputed attention (no graph)
        and, when gradients flow, the relevance from ``dO`` through ``on_relevance``."""
        declaration: Declaration = getattr(model, ATTRIBUTE)
        modules = _modules(model, declaration)
        if declaration.kind == "softmax":
            with attention_hooks(model, [_submodule(m, declaration.attention_output) for m in modules], [],
                                 callback):
                yield modules
            return
        running: dict = {}  # the token grid of the input being run, for the states to check their tokens against

        def note_grid(_model: torch.nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 5:
                running["grid"] = tuple(int(s) // p for s, p in zip(args[0].shape[2:], declaration.patch_size))
                running["prefix"] = declaration.prefix_tokens

        handles = [model.register_forward_pre_hook(note_grid)]
        try:
            for index, module in enumerate(modules):
                tables = ([getattr(module, t) for t in declaration.relative_position_tables]
                          if declaration.relative_position else None)
                state = _QkvState(int(getattr(module, declaration.num_heads)), declaration.scale, tables, running)
                handles.append(_submodule(module, declaration.qkv).register_forward_hook(
                    lambda _m, _i, out, index=index, state=state: state.attention(index, out, callback)))
                if on_relevance is not None:
                    handles.append(_submodule(module, declaration.output).register_forward_pre_hook(
                        lambda _m, args, index=index, state=state: state.watch_output(index, args[0], on_relevance)))
            with attention_hooks(model, [], [], callback):
                yield modules
        finally:
            for handle in handles:
                handle.remove()


def relative_bias(query: torch.Tensor, tables: Sequence[torch.Tensor], grid: Sequence[int]) -> torch.Tensor:
    """The decomposed relative-position bias ``(B, heads, N, N)`` of unscaled queries ``(B, heads, N, d)`` on
    ``grid`` (D, H, W), tokens in C order: per axis a, ``q_n . R_a[a_n - a_m + L_a - 1]``, each table ``(2 L_a - 1,
    d)`` resized linearly to that length first when it was made for another grid. O(N^2 + N (D + H + W) d)."""
    batch, heads, tokens, dim = query.shape
    on_grid = query.reshape(batch, heads, *grid, dim).float()
    per_axis = []
    for size, table in zip(grid, tables):
        table = table.detach().float().to(query.device)
        if table.shape[0] != 2 * size - 1:
            table = F.interpolate(table.t()[None], size=2 * size - 1, mode="linear")[0].t()
        offsets = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
        per_axis.append(table[offsets.to(query.device)])  # (q_a, k_a, d)
    rel_d = torch.einsum("bhxyzc,xkc->bhxyzk", on_grid, per_axis[0])
    rel_h = torch.einsum("bhxyzc,ykc->bhxyzk", on_grid, per_axis[1])
    rel_w = torch.einsum("bhxyzc,zkc->bhxyzk", on_grid, per_axis[2])
    bias = rel_d[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
    return bias.reshape(batch, heads, tokens, tokens)


class _QkvState:
    """One qkv-declared module's last pass: V and the recomputed attention, kept for its relevance."""

    def __init__(self, heads: int, scale: Optional[float], tables: Optional[Sequence[torch.Tensor]] = None,
                 running: Optional[dict] = None):
        self.heads, self.scale, self.tables = heads, scale, tables
        self.running = running if running is not None else {}
        self.values: Optional[torch.Tensor] = None
        self.weights: Optional[torch.Tensor] = None

    def attention(self, index: int, qkv: torch.Tensor, callback: AttentionCallback) -> None:
        """``qkv`` ``(B, N, 3 * heads * d)`` or channels-last ``(B, D, H, W, 3 * heads * d)`` -> ``softmax(q k^T s
        [+ relative bias])`` ``(B, heads, N, N)`` passed to the callback."""
        grid, expected = tuple(qkv.shape[1:-1]), self.running.get("grid")
        if expected is not None and (grid != expected if qkv.ndim == 5
                                     else grid[0] != int(torch.tensor(expected).prod()) + self.running["prefix"]):
            raise AttentionMapError(f"attention: a declared qkv module sees tokens {grid}, not the network's grid "
                                    f"{expected}: windowed attention (a window partition) is not read from a "
                                    "declaration; write a Python adapter (core/model_adapters.py)")
        if self.tables is not None and qkv.ndim != 5:
            raise AttentionMapError("attention.relative_position: the declared module must see its tokens "
                                    "channels-last, (B, D, H, W, C), to place the relative positions; it sees "
                                    f"{tuple(qkv.shape)}")
        batch, features = qkv.shape[0], qkv.shape[-1]
        flat = qkv.detach().reshape(batch, -1, features)
        tokens = flat.shape[1]
        split = flat.view(batch, tokens, 3, self.heads, features // (3 * self.heads)).permute(2, 0, 3, 1, 4)
        query, key, self.values = split[0], split[1], split[2]
        scale = self.scale if self.scale is not None else float(query.shape[-1]) ** -0.5
        with torch.no_grad():
            logits = (query @ key.transpose(-2, -1)).float() * scale
            if self.tables is not None:
                logits = logits + relative_bias(query, self.tables, grid)
            self.weights = torch.softmax(logits, dim=-1)
        callback(index, self.weights)

    def watch_output(self, index: int, output: torch.Tensor, on_relevance: RelevanceCallback) -> None:
        """The attention output ``O`` ``(B, N, heads * d)`` (or channels-last): its gradient dO gives ``dA = dO
        V^T``."""
        if not output.requires_grad:
            return
        weights, values = self.weights, self.values

        def hook(gradient: torch.Tensor) -> None:
            gradient = gradient.reshape(gradient.shape[0], -1, gradient.shape[-1])
            batch, tokens, _ = gradient.shape
            grad_out = gradient.view(batch, tokens, self.heads, -1).transpose(1, 2).float()
            grad_weights = grad_out @ values.float().transpose(-2, -1)
            on_relevance(index, (grad_weights * weights).clamp_(min=0).mean(dim=1))

        output.register_hook(hook)


ADAPTER = DeclaredAdapter()
