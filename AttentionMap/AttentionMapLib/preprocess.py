"""Moved to :mod:`AttentionMapLib.core.preprocess`; this path stays importable for users' scripts."""
from .core.preprocess import (
    RESIZE,
    SLIDING_WINDOW,
    Preprocessing,
    check_volume,
    fitting_transforms,
    parse_preprocessing,
    preprocess_volume,
    resampling_transforms,
)

__all__ = ["RESIZE", "SLIDING_WINDOW", "Preprocessing", "check_volume", "fitting_transforms", "parse_preprocessing",
           "preprocess_volume", "resampling_transforms"]
