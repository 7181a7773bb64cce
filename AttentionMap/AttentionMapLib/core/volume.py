"""Volume in, placed attention grid out: preprocessing, windows, capture, blending, token-grid geometry.

``explain_volume`` runs the card's MONAI preprocessing (`preprocess.preprocess_volume`), cuts the
model input into windows, captures each window's attention once (`engine.capture_attention`), and
blends the windows' token grids into one global token grid with its own RAS ijk_to_ras:

- resize mode: the whole volume is resized to ``img_size``: one window, the global grid is its grid.
- sliding-window mode: the preprocessed volume (padded to at least ``img_size`` and to a multiple of
  the patch size) is tiled by windows of ``img_size`` whose starts are multiples of the patch size,
  so every window's tokens coincide with tokens of the global grid (no resampling of token maps).
  Neighbouring starts are ``floor(window * (1 - overlap) / patch) * patch`` voxels apart (at least
  one patch) and the last window ends at the volume's end, so the grid covers the whole volume.

Each window is read out unnormalised (``normalize="none"``), scaled by the window's probability of
the target class (``window_weighting="probability"``, class outputs only); overlapping tokens are
averaged (mean, or Gaussian weights favouring window centres); the normalisation is applied once,
to the blended map.

Region (optional, `region.MaskRegion` / `BoxRegion` / `LungFieldRegion`): its mask is computed on the
model-input grid; windows holding no region voxel are not run, tokens whose patch holds no region
voxel are 0 (the normalisation uses the tokens inside only), and the map resampled onto another grid
is 0 at voxels outside the region.

Flip averaging (``flip_axes``, off by default; `flips`): each window is run once per view (every
combination of flips along the given model-input axes), each view's token map is flipped back onto
the window's token grid and the views' maps are averaged per window before the probability weighting
and the blending; the window's probabilities are the mean over views of ``softmax(logits / temperature)``.

Half-patch shift averaging (``shift_average``, off by default; `shifts`): each window also runs in the 7 views
whose content is moved by half a patch; each view's token map is spread back onto the window's tokens
(`shifts.spread_back`) and joins the flipped views' maps in the window's mean, and its
``softmax(logits / temperature)`` the mean that makes the window's probabilities (`views.window_views`: every
view counts once). A query token reads, in a shifted view, the rows of the view's tokens that hold its content.

Volume-level prediction: window probabilities are ``softmax(logits / temperature)`` (the card's
calibration); the decisive window is the one with the highest probability of the target class (the
given target, else the class with the highest probability in any window); ``probabilities`` is that
window's softmax and ``decisive_window_ras()`` its centre. With a card's domain (`domain`), only windows
holding enough lung may be decisive; when none does, the prediction gives no probability (no confident
answer) and says why, and it always states how the input compares with the training scans.
"""
from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import AttentionMapError, Cancelled
from . import methods
from .attention_grid import AttentionGrid
from .domain import Domain, check_domain
from .engine import CapturedAttention, capture_attention, check_options, model_spec, readout, resolve_layer
from .flips import check_flip_axes, mean_view_probabilities
from .geometry import apply_affine, check_ijk_to_ras, ras_to_ijk, token_grid_affine
from .method_registry import get_method
from .preprocess import RESIZE, parse_preprocessing, preprocess_volume
from .region import (
    AppliedRegion,
    BoxRegion,
    MaskRegion,
    Region,
    hu_from_model_input,
    nearest_values,
    region_mask,
    token_mask,
)
from .segment import SegmentTarget
from .views import WindowView, window_views

ProgressCallback = Callable[[float], None]
CancelCheck = Callable[[], bool]
_UNCHANGED: Any = object()
WINDOW_WEIGHTINGS = ("probability", "none")


def window_starts(size: int, window: int, patch: int, overlap: float) -> List[int]:
    """Window starts (voxels) along one axis of a volume `size` long, `size` and `window` multiples of `patch`.

    Starts are multiples of `patch`, spaced ``max(patch, floor(window * (1 - overlap) / patch) * patch)``,
    the last one at ``size - window`` so the windows cover the whole axis.
    """
    step = max(patch, int(window * (1.0 - overlap)) // patch * patch)
    last = size - window
    return sorted(set(range(0, last, step)) | {last})


def _blend_weights(grid_shape: Sequence[int], blend: str) -> np.ndarray:
    """Per-token weights of one window (n1, n2, n3): ones, or a Gaussian (sigma = n / 8) about the centre."""
    if blend == "mean":
        return np.ones(grid_shape, dtype=np.float64)
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2.0) / max(n / 8.0, 1e-6)) ** 2) for n in grid_shape]
    return np.maximum(axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :], 1e-6)


@dataclass(frozen=True)
class _Tiling:
    """What a re-fusion needs: the cached attention of every window and where each window sits.

    ``captures``: one CapturedAttention per batch, windows in order, view after view (``views``: one
    `views.WindowView` each, the window as it is alone without test-time averaging; memory: the attention x views);
    ``offsets``: (W, 3) token offset of each window in the global grid; ``grid_shape``: the global token grid (I, J, K);
    ``weights``: (n1, n2, n3) blend weights of one window; ``ijk_to_ras``: the global token grid's;
    ``window_scale``: (W,) factor on each window's map (its target-class probability, or ones);
    ``inside``: bool token grid of the region (None: no region): tokens outside are 0;
    ``mean_maps``: per window, its view-mean map already read out (``keep_cache=False``: ``captures`` is empty and
    only the fusion options the maps were made with can be blended).
    """

    captures: Tuple[CapturedAttention, ...]
    offsets: np.ndarray
    grid_shape: Tuple[int, int, int]
    weights: np.ndarray
    ijk_to_ras: np.ndarray
    window_scale: Optional[np.ndarray] = None
    inside: Optional[np.ndarray] = None
    views: Tuple[WindowView, ...] = (WindowView(),)
    mean_maps: Optional[Tuple[Optional[np.ndarray], ...]] = None

    def query_token(self, query_ras: Optional[Sequence[float]]) -> Optional[np.ndarray]:
        """Global token index (3,) of the token whose patch contains the RAS point, or None."""
        if query_ras is None:
            return None
        point = np.asarray(query_ras, dtype=np.float64)
        if point.shape != (3,) or not np.all(np.isfinite(point)):
            raise AttentionMapError(f"query_ras: expected three finite RAS coordinates (mm), got {query_ras!r}")
        token = np.floor(ras_to_ijk(self.ijk_to_ras, point) + 0.5).astype(int)
        if np.any(token < 0) or np.any(token >= np.asarray(self.grid_shape)):
            corners = apply_affine(self.ijk_to_ras, np.array([[-0.5] * 3, np.asarray(self.grid_shape) - 0.5]))
            raise AttentionMapError(
                f"query_ras: {point.tolist()} lies outside the model input (token grid {self.grid_shape}, "
                f"RAS corners {np.round(corners, 1).tolist()}); expected a point inside the volume"
            )
        if self.inside is not None and not self.inside[tuple(token)]:
            raise AttentionMapError(f"query_ras: {point.tolist()} lies outside the region; expected a point inside it")
        return token

    def window_maps(self, captured: CapturedAttention, offsets: np.ndarray, query: Optional[np.ndarray],
                    view: WindowView, **options: Any) -> List[Optional[np.ndarray]]:
        """Unnormalised (n1, n2, n3) map per window of one batch captured in `view`, put back onto the window's
        token grid (`WindowView.unview`); None for a window without the query. A query reads the weighted rows
        of the view's tokens that hold it (`WindowView.query_rows`; every readout is linear in the row)."""
        spec = captured.spec  # a Swin block's stage grid is spread onto the first grid; queries go the other way
        if query is None:
            return [view.unview(spec.on_first_grid(m)) for m in readout(captured, query=None, normalize="none",
                                                                         **options)]
        window_shape = np.asarray(spec.grid_shape)
        local = query[None, :] - offsets
        inside = np.all((local >= 0) & (local < window_shape), axis=1)
        maps: List[Optional[np.ndarray]] = [None] * len(offsets)
        for q in {tuple(int(v) for v in row) for row in local[inside]}:
            batch_maps = sum(
                weight * spec.on_first_grid(readout(captured, query=spec.block_index(row, options["layer"]),
                                                    normalize="none", **options)).astype(np.float64)
                for row, weight in view.query_rows(q, window_shape))
            for index in np.flatnonzero(inside & np.all(local == q, axis=1)):
                maps[index] = view.unview(batch_maps[index])
        return maps

    def view_mean_maps(self, query: Optional[np.ndarray], **options: Any) -> List[Optional[np.ndarray]]:
        """Per window, the mean over views of its unnormalised (n1, n2, n3) map (None: without the query)."""
        if self.mean_maps is not None:
            return list(self.mean_maps)
        per_view = len(self.captures) // len(self.views)
        sums: List[Optional[np.ndarray]] = [None] * len(self.offsets)
        for number, view in enumerate(self.views):
            first = 0
            for captured in self.captures[number * per_view:(number + 1) * per_view]:
                offsets = self.offsets[first:first + captured.batch_size]
                for index, window_map in enumerate(self.window_maps(captured, offsets, query, view, **options)):
                    if window_map is not None:
                        previous = sums[first + index]
                        sums[first + index] = window_map.astype(np.float64) + (0.0 if previous is None else previous)
                first += captured.batch_size
        return [None if total is None else total / len(self.views) for total in sums]

    def blend(self, query: Optional[np.ndarray], normalize: str, **options: Any) -> np.ndarray:
        """Global token grid (I, J, K) float32: weighted mean of the window maps, then normalised once."""
        total = np.zeros(self.grid_shape, dtype=np.float64)
        weight = np.zeros(self.grid_shape, dtype=np.float64)
        scale = np.ones(len(self.offsets)) if self.window_scale is None else self.window_scale
        for offset, window_map, factor in zip(self.offsets, self.view_mean_maps(query, **options), scale):
            if window_map is None:
                continue
            region = tuple(slice(o, o + n) for o, n in zip(offset, window_map.shape))
            total[region] += self.weights * (factor * window_map)
            weight[region] += self.weights
        grid = np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), 0.0)
        if self.inside is None:
            return methods.normalize_map(grid[None], normalize)[0]
        out = np.zeros(self.grid_shape, dtype=np.float32)
        out[self.inside] = methods.normalize_map(grid[self.inside][None], normalize)[0]
        return out


@dataclass(frozen=True)
class VolumeAttention(AttentionGrid):
    """An attention map on the token grid of a volume, placed in patient space (the shared fields, grid to
    region: `attention_grid.AttentionGrid`), with what a re-fusion and the prediction need.

    window_probabilities: (W, K) softmax(logits / temperature) per window (None for dense outputs; with flip
    or shift averaging the mean over views, and window_logits the mean logits);
    probabilities is the decisive window's row (see the module docstring); decisive_window: its index
    (None for dense outputs). window_centres_ras: (W, 3) RAS mm centre of each window that was run.
    temperature: the calibration temperature applied. domain / window_eligible: the input against the card's
    domain and the windows holding enough lung to be decisive (None without a domain). segmentation (dense
    outputs: UNETR, SwinUNETR): the network's own labels (argmax over channels of the windows' summed softmax, the
    unchanged view) on the model-input grid, placed by segmentation_ijk_to_ras; `segmentation_on` puts them on
    another grid.
    """

    window_probabilities: Optional[np.ndarray] = None
    decisive_window: Optional[int] = None
    window_centres_ras: Optional[np.ndarray] = None
    temperature: float = 1.0
    domain: Optional[Dict[str, Any]] = None  # `domain.DomainCheck.report` when the card has a domain
    window_eligible: Optional[np.ndarray] = None  # (W,) bool: windows that may be decisive (None: all)
    segmentation: Optional[np.ndarray] = None  # dense outputs: int16 labels on the model-input grid (`_Stitched`)
    segmentation_ijk_to_ras: Optional[np.ndarray] = None  # (4, 4) that grid's geometry
    _tiling: Optional[_Tiling] = field(default=None, repr=False, compare=False)

    def segmentation_on(self, shape_ijk: Sequence[int], ijk_to_ras: np.ndarray) -> Optional[np.ndarray]:
        """The network's labels (int16) on another voxel grid, nearest neighbour, 0 outside the model input; None
        for class outputs."""
        if self.segmentation is None:
            return None
        return nearest_values(self.segmentation, self.segmentation_ijk_to_ras, shape_ijk, ijk_to_ras)

    def prediction(self, classes: Sequence[str]) -> Optional[Dict[str, Any]]:
        """The volume-level prediction as plain data (None for dense outputs): the decisive window's class,
        probability and RAS centre, the rule that picked it (with the views averaged), the number of windows and
        the temperature. With a domain: ``domain`` (the input beside the training scans) and ``confident``; when
        no window holds enough lung, ``probability`` is None and ``highest_probability_unlike_training`` the
        decisive window's value, not a confident answer."""
        if self.decisive_window is None:
            return None
        klass = int(self.target) if self.target is not None else int(np.argmax(self.probabilities))
        name = classes[klass] if klass < len(classes) else str(klass)
        calibrated = ", calibrated" if self.temperature != 1.0 else ""
        out = {
            "class": name,
            "probability": float(self.probabilities[klass]),
            "window_centre_ras_mm": [float(v) for v in self.decisive_window_ras()],
            "windows": int(self.num_windows),
            "rule": f"the highest P({name}) of the {self.num_windows} window(s) that were run" + calibrated
                    + self._views_text(),
            "temperature": float(self.temperature),
        }
        if self.domain is None or self.window_eligible is None:
            return out
        eligible = int(np.count_nonzero(self.window_eligible))
        share = f"{self.domain['min_lung_fraction']:.0%} of its voxels or more"
        out["domain"] = self.domain
        out["confident"] = eligible > 0
        if eligible == 0:
            out["highest_probability_unlike_training"] = out.pop("probability")
            out["probability"] = None
            out["rule"] = (f"no confident answer: no window holds lung ({share}, as every training lesion crop "
                           f"did); the highest P({name}) of the {self.num_windows} window(s), "
                           f"{out['highest_probability_unlike_training']:.2f}, comes from a window unlike the "
                           "training windows")
        elif eligible < self.num_windows:
            out["rule"] = (f"the highest P({name}) of the {eligible} window(s) holding lung ({share}){calibrated}"
                           f"{self._views_text()}; the {self.num_windows - eligible} other window(s) are unlike the "
                           "training windows and were not counted")
        return out

    def _views_text(self) -> str:
        """How each window's probabilities were averaged over views, for the prediction's rule ("" for one view)."""
        shifts = sum(1 for view in self._tiling.views if any(view.shift))
        parts = [f"{2 ** len(self.flip_axes)} flipped views"] if self.flip_axes else []
        parts += [f"{shifts} half-patch-shifted views"] if shifts else []
        return f", each the mean over {' and '.join(parts)}" if parts else ""

    def decisive_window_ras(self) -> Optional[np.ndarray]:
        """RAS centre (3,) in mm of the window the volume-level probabilities come from (None: dense outputs)."""
        if self.decisive_window is None or self.window_centres_ras is None:
            return None
        return self.window_centres_ras[self.decisive_window]

    def fuse_again(
        self,
        method: Optional[str] = None,
        layer: Optional[int] = None,
        discard_ratio: Optional[float] = None,
        query_ras: Any = _UNCHANGED,
        normalize: Optional[str] = None,
    ) -> "VolumeAttention":
        """A new VolumeAttention from the cached head-fused attention, without running the network.

        Arguments left out (None) keep this result's value; ``query_ras=None`` drops the query.
        Head fusion and target are fixed at capture time. The first rollout with a discard ratio sorts
        each block's fused attention once and keeps it with the cache (``CapturedAttention.sorted_fused``:
        the cache's memory doubles); later ratios only look up their cut. After a view-averaged run the
        cache holds every view's attention (memory x views) and each re-fusion reads out every view.
        """
        start = time.perf_counter()
        if not self._tiling.captures:
            raise AttentionMapError("fuse_again: this result kept no attention (explain_volume(keep_cache=False)); "
                                    "run explain_volume again, with keep_cache=True to re-fuse")
        options = {
            "method": self.method if method is None else method,
            "layer": self.layer if layer is None else layer,
            "discard_ratio": self.discard_ratio if discard_ratio is None else discard_ratio,
        }
        options["layer"] = resolve_layer(options["layer"], self._tiling.captures[0].spec.num_layers)
        query_point = self.query_ras if query_ras is _UNCHANGED else query_ras
        query = self._tiling.query_token(query_point)
        norm = self.normalize if normalize is None else normalize
        grid = self._tiling.blend(query, norm, keep_sorted=True, **options)  # later discard ratios: a lookup
        fused = time.perf_counter()
        return replace(
            self,
            grid=grid,
            normalize=norm,
            discard_ratio=float(options["discard_ratio"]),
            method=options["method"],
            layer=options["layer"],
            query_ras=None if query_point is None else np.asarray(query_point, dtype=np.float64),
            timings={"preprocess": 0.0, "forward": 0.0, "fuse": fused - start, "geometry": 0.0},
        )

    def refuse(self, *args: Any, **kwargs: Any) -> "VolumeAttention":
        """Deprecated name of :meth:`fuse_again` ("re-fuse"), kept for scripts written against it."""
        warnings.warn("VolumeAttention.refuse is deprecated; use fuse_again (same arguments)", DeprecationWarning,
                      stacklevel=2)
        return self.fuse_again(*args, **kwargs)


@dataclass(frozen=True)
class _BatchOutputs:
    """What is kept of a batch's capture when its attention is not: logits (B, K) and the resolved target."""

    logits: torch.Tensor
    target: Any


def _outputs_only(captured: CapturedAttention) -> _BatchOutputs:
    """Class logits (B, K) are kept; a dense output (B, C, *spatial) is not needed past its batch (the network's
    segmentation is stitched as it comes, `_Stitched`): an empty (B, C, 0) stands for it."""
    logits = captured.logits
    return _BatchOutputs(logits if logits.ndim == 2 else logits.new_empty(tuple(logits.shape[:2]) + (0,)),
                         captured.target)


class _Stitched:
    """The network's own segmentation of a dense output over the windows of the unchanged view: each window's
    softmax over channels added onto the model-input grid, then the argmax. Memory O(channels x voxels)."""

    def __init__(self, shape: Sequence[int], starts: np.ndarray, window: Sequence[int]):
        self.shape, self.starts, self.window = tuple(int(s) for s in shape), starts, tuple(int(w) for w in window)
        self.sums: Optional[np.ndarray] = None

    def add(self, first: int, logits: torch.Tensor) -> None:
        """A batch's output (B, C, *window) for windows ``first ..``; class outputs (B, K) are not stitched."""
        if logits.ndim != 5 or tuple(logits.shape[2:]) != self.window:
            return
        probabilities = torch.softmax(logits.detach().float(), dim=1).cpu().numpy()
        if self.sums is None:
            self.sums = np.zeros((probabilities.shape[1],) + self.shape, dtype=np.float32)
        for start, window in zip(self.starts[first:first + len(probabilities)], probabilities):
            self.sums[(slice(None),) + tuple(slice(a, a + w) for a, w in zip(start, self.window))] += window

    def labels(self) -> Optional[np.ndarray]:
        """int16 (I, J, K) on the model-input grid: the channel of the highest summed probability (0 where no
        window ran), or None for class outputs."""
        return None if self.sums is None else self.sums.argmax(axis=0).astype(np.int16)


def _sweep(tiles: List[torch.Tensor], batch_size: int, capture: Callable,
           progress: Optional[ProgressCallback], cancel: Optional[CancelCheck], done: int, total: int,
           reduce: Optional[Callable[[int, CapturedAttention], Any]] = None) -> list:
    """Run ``capture(batch, rows)`` on batches of `tiles` (rows: the batch's slice of `tiles`); progress and cancel
    checks between batches. ``reduce(first, captured)``
    (first: the batch's first window) replaces each capture by what it returns, so the capture can be freed."""
    results = []
    for first in range(0, len(tiles), batch_size):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled after {first} of {len(tiles)} windows")
        captured = capture(torch.stack(tiles[first:first + batch_size]), slice(first, first + batch_size))
        results.append(captured if reduce is None else reduce(first, captured))
        if progress is not None:
            progress((done + min(first + batch_size, len(tiles))) / total)
    return results


def _class_outputs(captures: Sequence[Any], temperature: float = 1.0,
                   views: int = 1) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(window_logits (W, K), window_probabilities (W, K)); (None, None) for dense outputs. `captures` (each a
    CapturedAttention or the _BatchOutputs kept of one) hold `views` views one after the other: the logits are
    the mean over the views, the probabilities the mean over
    the views of softmax(logits / temperature) (`flips.mean_view_probabilities`)."""
    if captures[0].logits.ndim != 2:
        return None, None
    logits = torch.cat([c.logits for c in captures]).float().cpu().numpy()
    view_logits = logits.reshape(views, -1, logits.shape[-1])
    return view_logits.mean(axis=0), mean_view_probabilities(view_logits, temperature)


def decisive_window(window_probabilities: np.ndarray, target: Optional[int],
                    eligible: Optional[np.ndarray] = None) -> int:
    """Index of the window with the highest probability of `target` (None: of the class with the highest
    probability in any window); window_probabilities (W, K). eligible (W,) bool: only those windows count
    (all when None or when none is eligible)."""
    if eligible is not None and np.any(eligible):
        window_probabilities = np.where(np.asarray(eligible)[:, None], window_probabilities, -np.inf)
    klass = int(window_probabilities.max(axis=0).argmax()) if target is None else int(target)
    return int(window_probabilities[:, klass].argmax())


def _segment_on_input(target: SegmentTarget, array_ijk: np.ndarray, ijk_to_ras: np.ndarray, image, spec,
                      starts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A segment target's mask on the model-input grid (bool, nearest neighbour) and the mask (W,) of the windows
    that meet it; an array mask must have the volume's (I, J, K) shape."""
    mask = target.mask
    if not isinstance(mask, (MaskRegion, BoxRegion)):
        mask = np.asarray(mask)
        if mask.shape != tuple(np.shape(array_ijk)[-3:]):
            raise AttentionMapError(f"target: the segment mask has shape {mask.shape}; expected the volume's "
                                    f"(I, J, K) {tuple(np.shape(array_ijk)[-3:])}, or a MaskRegion placed in RAS")
        mask = MaskRegion(mask, ijk_to_ras, "segment")
    voxels = region_mask(mask, image.as_tensor()[0].cpu().numpy(), image.affine.numpy())
    meets = np.array([voxels[tuple(slice(a, a + w) for a, w in zip(s, spec.img_size))].any() for s in starts],
                     dtype=bool)
    if not meets.any():
        raise AttentionMapError(f"target: the segment ({mask.describe()}) does not meet the windows that run; "
                                "expected a mask inside the volume (and inside the region, if one is given)")
    return voxels, meets


def _apply_region(region: Region, image, prep, spec, starts: np.ndarray) -> Tuple[AppliedRegion, np.ndarray]:
    """The region on the model-input grid and the mask (W,) of the windows that meet it."""
    voxels = region_mask(region, image.as_tensor()[0].cpu().numpy(), image.affine.numpy(), prep.intensity)
    keep = np.array(
        [voxels[tuple(slice(a, a + w) for a, w in zip(s, spec.img_size))].any() for s in starts], dtype=bool
    )
    if not keep.any():
        raise AttentionMapError(f"region: {region.describe()} does not overlap the volume; expected a region inside it")
    applied = AppliedRegion(
        description=region.describe(),
        name=getattr(region, "name", "lung field"),
        voxels=voxels,
        ijk_to_ras=image.affine.numpy(),
        tokens=token_mask(voxels, spec.patch_size),
        windows_run=int(keep.sum()),
        windows_skipped=int((~keep).sum()),
    )
    return applied, keep


def explain_volume(
    model: torch.nn.Module,
    array_ijk: np.ndarray,
    ijk_to_ras: np.ndarray,
    preprocessing: Any,
    img_size: Optional[Sequence[int]] = None,
    query_ras: Optional[Sequence[float]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCheck] = None,
    device: Optional[Any] = None,
    method: str = "rollout",
    layer: int = -1,
    head_fusion: str = "mean",
    head: Optional[int] = None,
    discard_ratio: float = 0.0,
    target: Union[int, SegmentTarget, None] = None,
    normalize: str = "minmax",
    window_weighting: str = "probability",
    region: Optional[Region] = None,
    temperature: float = 1.0,
    flip_axes: Sequence[int] = (),
    shift_average: bool = False,
    domain: Optional[Domain] = None,
    keep_cache: bool = True,
) -> VolumeAttention:
    """Attention map of `model` for a volume, as a token grid placed in RAS (see the module docstring).

    Args:
        model: a MONAI ViT-based network (see `engine.explain`).
        array_ijk: (I, J, K) or (C, I, J, K), any numeric dtype, never modified.
        ijk_to_ras: (4, 4) voxel index -> RAS mm.
        preprocessing: the model card's "preprocessing" section (dict, see `preprocess`).
        img_size: the model's input size (needed for a plain MONAI ViT, which does not store it).
        query_ras: read the row of the token whose patch holds this RAS point; in sliding-window mode
            only windows holding that point contribute, other tokens are 0.
        progress: progress(fraction), called between batches.
        cancel: cancel() -> bool, called between batches; True raises errors.Cancelled.
        device: where the input goes (default: the model's).
        method, layer, head_fusion, head, discard_ratio, normalize: as in `engine.explain`.
        target: class (output index) to explain. In sliding-window mode a gradient method without a
            target first runs all windows without gradients to pick the class (highest window
            probability). "Why this segment" (dense outputs): a `segment.SegmentTarget` whose mask is a
            ``region.MaskRegion`` / ``region.BoxRegion`` in patient space, an array on this volume's grid
            (``array_ijk``'s (I, J, K), > 0 inside), or None (each window's own segmentation of the channel):
            the mask is carried onto the model input with the volume, only windows that meet it run, and each
            window view reads its part of the mask (flipped and shifted with the view).
        window_weighting: "probability" (default) multiplies each window's map by that window's softmax
            probability of the target class (the given target, else the class with the highest window
            probability) before blending, so windows that do not see the class do not contribute (a
            classifier's attention in a window without the class points somewhere arbitrary); "none"
            blends the maps as they are. Only used with several windows and class outputs.
        region: restrict windows and map to a region (see the module docstring).
        temperature: calibration temperature of the window probabilities (the card's
            ``calibration.temperature``; 1 = plain softmax).
        flip_axes: average over every combination of flips along these model-input axes (0, 1, 2):
            ``(0, 1, 2)`` = 8 views, ``(0,)`` = 2, ``()`` (default) = none. Costs one forward (and
            backward) per view. Each view's map is flipped back and the views are averaged per window
            before weighting and blending; the window probabilities are the mean over views of
            softmax(logits / temperature) (the demo card's temperature was fitted on that mean); a gradient
            method takes each view's gradient of the target from that view's own logits.
        shift_average: also average over the 7 views whose content is moved by half a patch (`shifts`): each
            view's map spread back onto the window's tokens and its probabilities join the flipped views' in
            the window's mean. Costs one forward (and backward) pass per view, 7 per window; the cache grows
            to (flipped views + 7) x the attention of one pass. With a gradient method and no target, the
            class is picked from the probabilities of all views.
        domain: the card's domain (`domain.card_domain`): the windows holding less lung than it states cannot
            be decisive, and the prediction states how the input compares with the training scans.
        keep_cache: True (default) keeps every view's attention of every window for ``fuse_again`` (memory:
            windows x views x one capture, gigabytes for a whole CT with 15 views); False reads each batch's maps
            out as it is captured and keeps only the per-window maps (kilobytes): the same result, without
            re-fusion (what `attention-map run` does). The fusion is then timed with the forward pass.

    Returns:
        VolumeAttention: the token grid (I, J, K) with its ijk_to_ras, window outputs, the volume-level
        prediction and timings; ``fuse_again`` re-reads it with other fusion options.
    """
    if window_weighting not in WINDOW_WEIGHTINGS:
        raise AttentionMapError(
            f"window_weighting: expected one of {', '.join(WINDOW_WEIGHTINGS)}, got {window_weighting!r}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not np.isfinite(temperature) \
            or temperature <= 0:
        raise AttentionMapError(f"temperature: expected a positive number, got {temperature!r}")
    flip_axes = check_flip_axes(flip_axes)
    timings = {"preprocess": 0.0, "forward": 0.0, "fuse": 0.0, "geometry": 0.0}
    start = time.perf_counter()
    prep = parse_preprocessing(preprocessing)
    spec = model_spec(model, img_size)
    views = window_views(flip_axes, shift_average, spec.patch_size)
    image = preprocess_volume(array_ijk, ijk_to_ras, prep, spec.img_size, spec.patch_size, spec.in_channels)
    if device is None:
        device = next(model.parameters()).device
    volume = image.as_tensor().to(device=device, dtype=torch.float32)
    axes = [window_starts(s, w, p, prep.overlap) for s, w, p in zip(volume.shape[1:], spec.img_size, spec.patch_size)]
    starts = np.array(list(itertools.product(*axes)), dtype=int).reshape(-1, 3)
    applied = None
    if region is not None:
        applied, keep = _apply_region(region, image, prep, spec, starts)
        starts = starts[keep]
    segment_voxels = None
    if isinstance(target, SegmentTarget) and target.mask is not None:
        segment_voxels, meets = _segment_on_input(target, array_ijk, ijk_to_ras, image, spec, starts)
        starts = starts[meets]
    tiles = [volume[(slice(None), *(slice(a, a + w) for a, w in zip(s, spec.img_size)))] for s in starts]
    segment_tiles = None if segment_voxels is None else [
        torch.from_numpy(segment_voxels[tuple(slice(a, a + w) for a, w in zip(s, spec.img_size))]).float().to(device)
        for s in starts]
    batch = len(tiles) if prep.mode == RESIZE else prep.sw_batch_size
    checked = None
    if domain is not None:
        hu = hu_from_model_input(image.as_tensor()[0].cpu().numpy(), prep.intensity, "domain")
        checked = check_domain(domain, hu, image.affine.numpy(), np.shape(array_ijk)[-3:], ijk_to_ras, array_ijk,
                               starts, spec.img_size)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    check_options(method, discard_ratio, normalize)
    last = resolve_layer(layer, spec.num_layers)
    patch = np.asarray(spec.patch_size)
    tiling = _Tiling(
        captures=(),
        offsets=starts // patch,
        grid_shape=tuple(int(s) for s in np.asarray(volume.shape[1:]) // patch),
        weights=_blend_weights(spec.grid_shape, prep.blend),
        ijk_to_ras=token_grid_affine(check_ijk_to_ras(image.affine.numpy(), "preprocessed affine"), patch),
        inside=None if applied is None else applied.tokens,
        views=views,
    )
    query = tiling.query_token(query_ras)
    timings["geometry"] = time.perf_counter() - start

    start = time.perf_counter()
    gradients = get_method(method).needs_gradients
    runs = len(tiles) * len(views)
    # a gradient method without a target first runs every window in every view to pick the class
    two_sweeps = gradients and target is None and runs > 1
    total = runs * (2 if two_sweeps else 1)

    def batch_target(view: WindowView, rows: slice) -> Any:
        """The target of a batch of windows in one view: with a segment mask, the batch's part of it, viewed."""
        if segment_tiles is None:
            return target
        return SegmentTarget(target.channel, torch.stack([view.window(m) for m in segment_tiles[rows]]))

    stitched = _Stitched(volume.shape[1:], starts, spec.img_size)

    def sweep_views(capture: Callable, done: int, reduce: Optional[Callable] = None, stitch: bool = False) -> list:
        """Every view's sweep over the windows, ``capture(x, target)`` per batch; reduce(view, first, captured)
        replaces each batch's capture; ``stitch``: the unchanged view's dense outputs go into ``stitched``."""
        results = []
        for number, view in enumerate(views):
            def per_batch(first: int, captured: Any, view: WindowView = view, number: int = number) -> Any:
                if stitch and number == 0:
                    stitched.add(first, captured.logits)
                if reduce is not None:
                    return reduce(view, first, captured)
                captured.logits = _outputs_only(captured).logits  # a kept capture drops a dense output too
                return captured

            results += _sweep([view.window(t) for t in tiles], batch,
                              lambda x, rows, view=view: capture(x, batch_target(view, rows)), progress, cancel,
                              done + number * len(tiles), total, per_batch)
        return results

    if two_sweeps:  # only the logits are kept: they pick the class
        first = sweep_views(lambda x, _target: capture_attention(model, x, head_fusion, head, img_size=spec.img_size),
                            0, lambda view, first, captured: _outputs_only(captured))
        window_probabilities = _class_outputs(first, temperature, len(views))[1]
        target = None if window_probabilities is None else int(window_probabilities.max(axis=0).argmax())
    fusion = {"method": method, "layer": last, "discard_ratio": discard_ratio}
    sums: List[Optional[np.ndarray]] = [None] * len(tiles)

    def read_out(view: WindowView, first: int, captured: CapturedAttention) -> _BatchOutputs:
        """keep_cache=False: the batch's window maps added to their windows' sums, then only its outputs kept."""
        offsets = tiling.offsets[first:first + captured.batch_size]
        for index, window_map in enumerate(tiling.window_maps(captured, offsets, query, view, **fusion)):
            if window_map is not None:
                previous = sums[first + index]
                sums[first + index] = window_map.astype(np.float64) + (0.0 if previous is None else previous)
        return _outputs_only(captured)

    captures = sweep_views(
        lambda x, batch_target: capture_attention(model, x, head_fusion, head, gradients, batch_target,
                                                  img_size=spec.img_size),
        total - runs, None if keep_cache else read_out, stitch=True,
    )
    if keep_cache:
        tiling = replace(tiling, captures=tuple(captures))
    else:
        tiling = replace(tiling, mean_maps=tuple(None if m is None else m / len(views) for m in sums))
    timings["forward"] = time.perf_counter() - start

    start = time.perf_counter()
    window_logits, window_probabilities = _class_outputs(captures, temperature, len(views))
    eligible = None if checked is None else checked.eligible
    decisive = None if window_probabilities is None else decisive_window(window_probabilities, target, eligible)
    probabilities = None if decisive is None else window_probabilities[decisive]
    resolved = captures[0].target
    if target is None and resolved is not None and gradients:
        target = resolved[0]
    if isinstance(target, SegmentTarget):
        target = target.channel
    weighting = window_weighting if window_logits is not None and len(tiles) > 1 else "none"
    if weighting == "probability":
        weighted_class = int(probabilities.argmax()) if target is None else int(target)
        scale = window_probabilities[:, weighted_class].astype(np.float64)
        tiling = replace(tiling, window_scale=scale)
    grid = tiling.blend(query, normalize, **fusion)
    timings["fuse"] = time.perf_counter() - start
    return VolumeAttention(
        grid=grid, ijk_to_ras=tiling.ijk_to_ras, window_logits=window_logits, probabilities=probabilities,
        target=None if target is None else int(target), method=method, layer=last, head_fusion=head_fusion, head=head,
        discard_ratio=float(discard_ratio), normalize=normalize,
        query_ras=None if query_ras is None else np.asarray(query_ras, dtype=np.float64),
        num_windows=len(tiles), timings=timings, window_weighting=weighting,
        window_probabilities=window_probabilities, decisive_window=decisive,
        window_centres_ras=apply_affine(image.affine.numpy(), starts + (np.asarray(spec.img_size) - 1) / 2.0),
        temperature=float(temperature), flip_axes=flip_axes, shift_average=bool(shift_average),
        region=applied, domain=None if checked is None else checked.report, window_eligible=eligible,
        segmentation=stitched.labels(), segmentation_ijk_to_ras=image.affine.numpy(), _tiling=tiling,
    )
