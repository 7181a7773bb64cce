"""The fusion methods: one table that the engine, volume, command line, demo tool and Slicer module read.

Torch-free (the Slicer module imports it before its dependency check): each entry names its readout
function by import path, and the function is imported on first use.

A readout function is ``readout(captured, row, last, discard_ratio, has_cls) -> (B, N)`` tensor:
``captured`` an :class:`engine.CapturedAttention` (full or block-wise path), ``row`` the readout row
``(B, N)`` (one-hot query / CLS, or the mean of rows), ``last`` the last block to use (0-based),
``has_cls`` whether token 0 is a CLS token. Adding a method = that function + one :func:`register` line.
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Tuple, Union

from ..errors import AttentionMapError


@dataclass(frozen=True)
class Method:
    """``name``: as typed (CLI ``--method``, ``explain(method=...)``); ``display_name``: for help texts;
    ``needs_gradients``: capture runs one backward pass; ``readout``: the readout function, or its
    import path ``"package.module:function"``."""

    name: str
    display_name: str
    needs_gradients: bool
    readout: Union[str, Callable]

    def readout_function(self) -> Callable:
        """The readout function, imported on first use."""
        if callable(self.readout):
            return self.readout
        module, _, function = self.readout.partition(":")
        return getattr(importlib.import_module(module), function)


_METHODS: Dict[str, Method] = {}


def register(method: Method) -> None:
    """Add ``method`` (its name must be new)."""
    if method.name in _METHODS:
        raise AttentionMapError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method


def unregister(name: str) -> None:
    """Remove a registered method (e.g. a test's toy method)."""
    _METHODS.pop(name, None)


def method_names() -> Tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    """The entry for ``name``; one clear error for an unknown method."""
    method = _METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise AttentionMapError(f"method: expected one of {', '.join(_METHODS)}, got {name!r}")
    return method


_READOUTS = f"{__package__}.readouts"
register(Method("raw", "raw attention of one layer", False, f"{_READOUTS}:raw"))
register(Method("rollout", "attention rollout (Abnar & Zuidema 2020)", False, f"{_READOUTS}:rollout"))
register(Method("grad_rollout", "gradient-weighted rollout (Chefer et al. 2021)", True, f"{_READOUTS}:grad_rollout"))
