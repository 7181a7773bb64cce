"""The options of one explanation, in one object that the command line, the worker and the Slicer module fill.

:class:`ExplainOptions` holds what ``volume.explain_volume`` takes besides the model, the volume, its
preprocessing and the run's plumbing (progress, cancel, device, cache). Fields that a model card may give a
default for hold a *spec* until :meth:`ExplainOptions.resolve` reads the card: ``target`` (None: the card's
target), ``region`` ("default": the card's default region), ``flip_axes`` / ``shift_average`` ("default": the
card's test-time views); the card's calibration temperature and domain are always the card's. A new option is
one field here, its use in ``explain_volume``, and the flag or widget that sets it.

Torch-free: the Slicer module builds one before its dependency check.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Sequence

from .errors import AttentionMapError


@dataclass(frozen=True)
class ExplainOptions:
    """``method``, ``layer`` (0-based, negative from the end), ``head_fusion``, ``head``, ``discard_ratio``,
    ``normalize``, ``query_ras`` (3,) RAS mm, ``window_weighting``: as ``explain_volume`` takes them. ``target``: a
    class index or name, a ``segment.SegmentTarget``, or None (the card's). ``region``: a ``region.Region``,
    "default" (the card's) or "none". ``flip_axes``: axes, "default" or "none"; ``shift_average``: a bool, "on",
    "off" or "default"."""

    method: str = "rollout"
    layer: int = -1
    head_fusion: str = "mean"
    head: Optional[int] = None
    discard_ratio: float = 0.0
    normalize: str = "minmax"
    query_ras: Optional[Sequence[float]] = None
    window_weighting: str = "probability"
    target: Any = None
    region: Any = "default"
    flip_axes: Any = "default"
    shift_average: Any = "default"

    @classmethod
    def from_message(cls, message: Optional[Dict[str, Any]], source: str = "options") -> "ExplainOptions":
        """From plain data (the worker protocol's ``options``); unknown keys are refused, naming them."""
        message = dict(message or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(message) - known)
        if unknown:
            raise AttentionMapError(f"{source}: unknown option(s) {unknown}; expected some of {sorted(known)}")
        return cls(**message)

    def resolve(self, loaded: Any) -> Dict[str, Any]:
        """``explain_volume``'s keywords for the model ``loaded`` (a ``models.LoadedModel``): the card's defaults
        filled in, its temperature and domain added; AttentionMapError naming the card field or the option."""
        from .core.calibration import card_temperature
        from .core.domain import card_domain
        from .core.flips import flip_axes_from_spec
        from .core.region import card_default_region
        from .core.segment import SegmentTarget
        from .core.shifts import shift_average_from_spec
        from .models import class_index

        card, source = loaded.card, loaded.source
        target = self.target
        if isinstance(target, SegmentTarget):
            target = SegmentTarget(class_index(target.channel, loaded.classes, source), target.mask)
        else:
            target = loaded.target if target is None else class_index(target, loaded.classes, source)
        region = self.region
        if isinstance(region, str):
            if region not in ("default", "none"):
                raise AttentionMapError(f"region: expected a region, 'default' or 'none', got {region!r}")
            region = card_default_region(card, source) if region == "default" else None
        keywords = {f.name: getattr(self, f.name) for f in fields(self)}
        keywords.update(target=target, region=region,
                        flip_axes=flip_axes_from_spec(self.flip_axes, card, source),
                        shift_average=shift_average_from_spec(self.shift_average, card, source),
                        temperature=card_temperature(card, source), domain=card_domain(card, source))
        return keywords
