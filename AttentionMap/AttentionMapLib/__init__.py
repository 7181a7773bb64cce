"""AttentionMapLib: capture, fuse and place the self-attention of 3D Vision Transformers (MONAI's ViT family,
SwinUNETR, and networks whose attention modules are declared).

Qt-free. Importing the package needs neither torch nor MONAI: the public names below are loaded
on first use, so the Slicer module can import it before its dependency check has run.

Flow: preprocess -> capture -> methods -> geometry -> mrml | io (see docs/DESIGN.md in the repository).
"""
import importlib
from typing import TYPE_CHECKING, Any

from .errors import AttentionMapError, Cancelled

# public name -> module that defines it
_LAZY = {
    "explain": "core.engine",
    "capture_attention": "core.engine",
    "AttentionResult": "core.engine",
    "CapturedAttention": "core.engine",
    "readout": "core.engine",
    "SegmentTarget": "core.segment",
    "declare_attention": "core.declared",
    "explain_volume": "core.volume",
    "VolumeAttention": "core.volume",
    "AttentionGrid": "core.attention_grid",
    "read_volume": "io",
    "write_volume": "io",
    "kji_to_ijk": "core.geometry",
    "ijk_to_kji": "core.geometry",
    "lps_to_ras": "core.geometry",
    "parse_preprocessing": "core.preprocess",
    "load_model": "models",
    "LoadedModel": "models",
    "mask_statistics": "core.metrics",
    "pointing_game": "core.metrics",
    "deletion_insertion": "core.metrics",
    "score_volume": "core.metrics",
}

__all__ = ["AttentionMapError", "Cancelled", *_LAZY]

if TYPE_CHECKING:  # the lazy names as type checkers and IDEs see them (never imported at run time)
    from .core.attention_grid import AttentionGrid
    from .core.declared import declare_attention
    from .core.engine import AttentionResult, CapturedAttention, capture_attention, explain, readout
    from .core.geometry import ijk_to_kji, kji_to_ijk, lps_to_ras
    from .core.metrics import deletion_insertion, mask_statistics, pointing_game, score_volume
    from .core.preprocess import parse_preprocessing
    from .core.segment import SegmentTarget
    from .core.volume import VolumeAttention, explain_volume
    from .io import read_volume, write_volume
    from .models import LoadedModel, load_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'AttentionMapLib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
