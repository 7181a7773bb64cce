"""``attention-map``: the headless main job.

    attention-map run INPUT... --model demo|CARD.json|BUNDLE_DIR [--trust-bundle] --output-dir DIR
                  [--method METHOD] [--layer N] [--head-fusion mean|max|min] [--head H]
                  [--discard-ratio R] [--target CLASS] [--query-ras X Y Z] [--label MASK...] [--resample]
                  [--flip-average all|AXES|none] [--shift-average on|off]
                  [--device auto|cpu|cuda|mps] [--normalize minmax|percentile|none]
                  [--series-uid UID]
                  [--roi CX CY CZ SX SY SZ | --roi none | --mask MASK...]
                  [--target-class CLASS [--target-mask MASK... | --target-roi CX CY CZ SX SY SZ]]
    attention-map cohort MANIFEST --model ... --output-dir DIR [run's options; --label / --mask are the
                  manifest's columns] [--scheduler tcp://HOST:PORT] [--workers N] [--threads-per-worker T]
                  [--retry-failed]
    attention-map score INPUT --model ... [--steps S] [--baseline blur|mean|zero] [--output FILE.json]
                  [--series-uid UID]
    attention-map sample-data [--cache-dir DIR]

Region: a card may name a default region (the demo: the automatic lung field); ``--roi`` (RAS centre and
size in mm) or ``--mask`` (a label volume per input, any grid: sampled by nearest neighbour) replace it,
``--roi none`` switches it off. Windows outside the region are not run and the map is 0 outside it.
The summary gives one volume-level prediction per case: the highest (calibrated) probability of the
target class over the windows, and the RAS centre of that window.

Why this segment (segmentation networks: UNETR, SwinUNETR): ``--target-class`` names the class (output channel);
its region is ``--target-mask`` (a label volume per input, any grid), ``--target-roi`` (a RAS box), or else the
voxels the network itself labels with that class. Gradient methods take the gradient of the class's logit summed
over the region, and every method reads the rows of the region's tokens; only windows meeting the region run.

Layers are numbered from 1 (first block) to L (last), like the Slicer module's slider; negative numbers count from
the end (-1 = last, the default); heads from 0 (see `numbering`). Exit status: 0 on success, 2 on bad input or an
output that cannot be written (one line on stderr naming the input or output and the problem), 130 after Ctrl-C,
143 after SIGTERM, 1 for an unexpected internal error (one line; ATTENTIONMAP_TRACEBACK=1 shows the traceback).
Outputs are staged and moved into place at the end (`outputs.staged_folder`): a failed or interrupted run leaves
nothing behind. Inputs are only read; an output never replaces an input or writes through a symbolic link.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .core.method_registry import get_method, method_names
from .core.numbering import layer_index
from .errors import AttentionMapError
from .io import read_volume
from .models import DEVICES
from .outputs import check_output_file, check_output_folder, staged_folder, write_file, writing

_VOLUME_SUFFIXES = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors reported on one line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attention-map", description="Attention maps of MONAI Vision Transformers on 3D volumes.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    model = _Parser(add_help=False)
    model.add_argument("--model", default="demo",
                       help="'demo', 'demo-segmentation' (a SwinUNETR), a model card .json, or a MONAI bundle folder")
    model.add_argument("--trust-bundle", action="store_true",
                       help="allow loading a MONAI bundle (its configs can run Python code)")
    model.add_argument("--method", default="rollout", choices=method_names(),
                       help="; ".join(f"{m}: {get_method(m).display_name}" for m in method_names()))
    model.add_argument("--layer", type=int, default=-1,
                       help="block 1..L (rollout: up to this block), or negative from the end; default -1 = last")
    model.add_argument("--head-fusion", default="mean", choices=("mean", "max", "min"))
    model.add_argument(
        "--head", type=int, default=None, help="one head 0..H-1 (first head = 0) instead of fusing heads"
    )
    model.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of weakest links")
    model.add_argument("--target", default=None, help="class name or index (default: the card's, else the predicted)")
    model.add_argument("--device", default="auto", choices=DEVICES,
                       help="auto: CUDA when available, else Apple's MPS, else the CPU (also after CUDA out-of-memory)")
    model.add_argument(
        "--normalize",
        default="percentile",
        choices=("minmax", "percentile", "none"),
        help="map scaling (default percentile: 1st..99th percentile to 0..1, lower values 0, higher ones kept above 1)",
    )

    shared = _Parser(add_help=False)  # what `run` and `cohort` both do to each case
    shared.add_argument("--query-ras", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="read the attention of the patch at this RAS point (mm) instead of the CLS token")
    shared.add_argument("--resample", action="store_true", help="also write the map on the input's voxel grid")
    shared.add_argument("--segmentation", action="store_true",
                        help="segmentation networks: also write the network's own labels on the input's voxel grid "
                             "(<case>_segmentation.nrrd: the argmax over its output channels, stitched over the "
                             "windows)")
    shared.add_argument("--flip-average", default=None, metavar="all|AXES|none",
                        help="average maps and probabilities over every combination of flips along these model-input "
                             "axes ('all' = 0,1,2: 8 views; '0,2': 4 views; 'none': no flips); costs one forward (and "
                             "backward) pass per view: 'all' runs 8x longer. Default: the card's default_flip_axes "
                             "(the demo card's: all), else none")
    shared.add_argument("--shift-average", default=None, choices=("on", "off"),
                        help="also average maps and probabilities over the 7 views of each window whose content is "
                             "moved by half a patch, each view's map spread back onto the window's patches (7 more "
                             "forward (and backward) passes per window). Default: the card's "
                             "default_shift_average (the demo card's: on), else off")
    shared.add_argument("--target-class", default=None, metavar="CLASS",
                        help="why this segment: the class (name or output channel) of a segmentation network to "
                             "explain over a region: --target-mask, --target-roi, or else the voxels the network "
                             "itself labels with this class")
    shared.add_argument("--series-uid", default=None, metavar="UID",
                        help="DICOM folders holding several series: the SeriesInstanceUID to read")
    roi_help = ("look only inside this box: RAS centre and size in mm (CX CY CZ SX SY SZ), or 'none' to switch off "
                "the card's default region")
    target_roi_help = "the segment: a box, RAS centre and size in mm (CX CY CZ SX SY SZ)"

    run = commands.add_parser("run", parents=[model, shared],
                              help="attention maps, overlays and a summary per input")
    run.add_argument("inputs", nargs="+", metavar="INPUT", help="NRRD / NIfTI / MHA file or DICOM series folder")
    run.add_argument("--label", nargs="+", default=None, metavar="MASK",
                     help="tumour/organ mask on the input's grid, one per input (same order)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--roi", nargs="+", default=None, metavar="V", help=roi_help)
    where.add_argument(
        "--mask",
        nargs="+",
        default=None,
        metavar="MASK",
        help="look only inside this label volume (voxels > 0; any grid, nearest neighbour), one per input",
    )
    segment = run.add_mutually_exclusive_group()
    segment.add_argument("--target-mask", nargs="+", default=None, metavar="MASK",
                         help="the segment: a label volume per input (voxels > 0; any grid, nearest neighbour)")
    segment.add_argument("--target-roi", nargs=6, type=float, default=None, metavar="V", help=target_roi_help)
    run.add_argument("--output-dir", required=True, type=Path,
                     help="created if missing; files of this run replace same-named earlier results, others stay")
    run.set_defaults(func=run_command)

    cohort = commands.add_parser(
        "cohort", parents=[model, shared],
        help="a whole data set on Dask: each case on its own, written as it finishes, resumable, one table")
    cohort.add_argument("manifest", type=Path, metavar="MANIFEST",
                        help="CSV with a header, or JSON lines: image (file or DICOM folder), optional label, mask, "
                             "case_id; relative paths are relative to the manifest")
    cohort.add_argument("--output-dir", required=True, type=Path,
                        help="DIR/cases/<case_id>/ per finished case, DIR/failed/<case_id>.json per failed one, "
                             "DIR/cohort.parquet, cohort.csv, summary.html, summary.png")
    cohort.add_argument("--roi", nargs="+", default=None, metavar="V", help=roi_help)
    cohort.add_argument("--target-roi", nargs=6, type=float, default=None, metavar="V", help=target_roi_help)
    cohort.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run on this Dask scheduler (e.g. tcp://10.0.0.5:8786, started with `dask scheduler` "
                             "and `dask worker`); default: a local cluster on this machine")
    cohort.add_argument("--workers", type=int, default=None,
                        help="local cluster: worker processes (default: 1 per 4 cores, at least 1)")
    cohort.add_argument("--threads-per-worker", type=int, default=None,
                        help="torch threads of each worker (default: its machine's cores / its worker processes)")
    cohort.add_argument("--retry-failed", action="store_true",
                        help="also run again the cases an earlier run of this cohort recorded as failed")
    cohort.set_defaults(func=cohort_command, target_mask=None)  # segments per case: not a manifest column yet

    score = commands.add_parser("score", parents=[model],
                                help="deletion / insertion AUC (RISE) of the map on the model input")
    score.add_argument("input", metavar="INPUT")
    score.add_argument("--series-uid", default=None, metavar="UID",
                       help="DICOM folder holding several series: the SeriesInstanceUID to read")
    score.add_argument("--centre-ras", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                       help="sliding-window cards: score the window centred here (default: the volume centre)")
    score.add_argument("--steps", type=int, default=32, help="points on each curve minus one (default 32)")
    score.add_argument("--baseline", default="blur", choices=("blur", "mean", "zero"),
                       help="what deleted patches become / insertion starts from (default blur)")
    score.add_argument("--output", type=Path, default=None, help="also write the scores and curves as JSON")
    score.set_defaults(func=score_command)

    sample = commands.add_parser("sample-data", help="download (once) and list the pyradiomics sample CTs")
    sample.add_argument("--cache-dir", type=Path, default=None)
    sample.set_defaults(func=sample_data_command)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that staged outputs are removed on the way out."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _say(message: str) -> None:
    print(f"attention-map: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except AttentionMapError as exc:
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted (Ctrl-C); no outputs of this run were kept")
        return 130
    except Terminated:
        _say("terminated (SIGTERM); no outputs of this run were kept")
        return 143
    except Exception as exc:  # a fault of ours, not bad input: still one line, traceback on request
        if os.environ.get("ATTENTIONMAP_TRACEBACK"):
            raise
        _say(f"internal error: {type(exc).__name__}: {exc} (set ATTENTIONMAP_TRACEBACK=1 for the traceback)")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- helpers
def case_name(path: Path) -> str:
    """File name without its volume suffix (lung2_image.nrrd -> lung2_image), or the DICOM folder's name."""
    name = path.name
    lowered = name.lower()
    suffix = next((s for s in _VOLUME_SUFFIXES if lowered.endswith(s)), "")
    return name[: len(name) - len(suffix)] if suffix else name


def explain_options(args: argparse.Namespace, loaded) -> Dict[str, Any]:
    """Keyword arguments for explain / explain_volume from the shared command-line options."""
    from .core.engine import model_spec
    from .models import class_index

    target = class_index(args.target, loaded.classes, "--target") if args.target is not None else loaded.target
    return {
        "method": args.method,
        "layer": layer_index(args.layer, model_spec(loaded.network, loaded.img_size).num_layers),
        "head_fusion": args.head_fusion,
        "head": args.head,
        "discard_ratio": args.discard_ratio,
        "target": target,
        "normalize": args.normalize,
    }


def flip_axes_option(value: Optional[str], loaded: Any) -> Tuple[int, ...]:
    """``--flip-average``: None -> the card's default_flip_axes (() without), 'none' -> (), 'all' -> (0, 1, 2),
    '0,2' -> (0, 2); AttentionMapError naming the option."""
    from .core.flips import flip_axes_from_spec

    if value is None:
        return flip_axes_from_spec("default", loaded.card, loaded.source)
    text = value.strip().lower()
    try:
        spec = "none" if text == "none" else (0, 1, 2) if text == "all" else tuple(int(a) for a in text.split(","))
        return flip_axes_from_spec(spec, loaded.card, loaded.source)
    except (ValueError, AttentionMapError):
        raise AttentionMapError(f"--flip-average: expected 'all', 'none' or distinct model-input axes among 0, 1, 2 "
                                f"separated by commas (e.g. 0,2), got {value!r}") from None


def _read_label(label_path: Path, input_path: Path, shape: Tuple[int, ...], ijk_to_ras: np.ndarray) -> np.ndarray:
    mask, mask_affine = read_volume(label_path)
    if mask.shape != shape or not np.allclose(mask_affine, ijk_to_ras, atol=1e-3):
        raise AttentionMapError(
            f"{label_path}: the mask's voxel grid (shape {mask.shape}) differs from {input_path}'s (shape {shape}); "
            "expected a mask on the input's grid"
        )
    if not np.any(mask > 0):
        raise AttentionMapError(f"{label_path}: the mask is empty (no voxel > 0)")
    return mask > 0


def explain_with_fallback(loaded, device: str, auto: bool, call: Callable[[str], Any]) -> Tuple[Any, str]:
    """call(device); with --device auto, a CUDA out-of-memory error reruns it on the CPU (message on stderr)."""
    import torch

    try:
        return call(device), device
    except torch.cuda.OutOfMemoryError:
        if not (auto and device == "cuda"):
            raise
        print("attention-map: CUDA out of memory; running on the CPU instead", file=sys.stderr)
        torch.cuda.empty_cache()
        loaded.network.to("cpu")
        return call("cpu"), "cpu"


def _progress_bar(description: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=description, unit="%", leave=False, disable=None)

    def update(fraction: float) -> None:
        bar.update(max(0, round(100 * fraction) - bar.n))

    return bar, update


# ---------------------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class Case:
    """One input of `run` / `score`: its name and files. Its volumes are read when needed (`load_case`)."""

    name: str
    path: Path
    label_path: Optional[Path] = None
    mask_path: Optional[Path] = None  # --mask: this case's region
    segment_path: Optional[Path] = None  # --target-mask: this case's segment


@dataclass
class LoadedCase:
    """A case's volumes: array (I, J, K) or (C, I, J, K) with ijk_to_ras (4, 4); label bool (I, J, K) or None."""

    case: Case
    array: np.ndarray
    ijk_to_ras: np.ndarray
    label: Optional[np.ndarray]
    read_s: float


def plan_cases(inputs: Sequence[str], labels: Optional[Sequence[str]] = None,
               masks: Optional[Sequence[str]] = None, segments: Optional[Sequence[str]] = None) -> List[Case]:
    """The cases of a command, their names and mask files checked (one label / mask / segment per input); nothing
    is read."""
    paths = [Path(p) for p in inputs]
    for option, given in (("--label", labels), ("--mask", masks), ("--target-mask", segments)):
        if given is not None and len(given) != len(paths):
            raise AttentionMapError(
                f"{option}: got {len(given)} mask(s) for {len(paths)} input(s); expected one per input"
            )
    names = [case_name(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AttentionMapError(f"{duplicates[0]}: several inputs share this case name; their outputs would collide")
    return [Case(name, path, Path(labels[i]) if labels else None, Path(masks[i]) if masks else None,
                 Path(segments[i]) if segments else None)
            for i, (name, path) in enumerate(zip(names, paths))]


def load_case(case: Case, series_uid: Optional[str] = None) -> LoadedCase:
    """Read a case's volume and label (AttentionMapError naming the file that cannot be used)."""
    t0 = time.perf_counter()
    array, ijk_to_ras = read_volume(case.path, series_uid)
    label = None if case.label_path is None else _read_label(case.label_path, case.path, array.shape[-3:], ijk_to_ras)
    return LoadedCase(case, array, ijk_to_ras, label, time.perf_counter() - t0)


def output_names(cases: Sequence[Case], resample: bool, segmentation: bool = False) -> List[str]:
    """File names `run` writes into --output-dir, known before anything is computed."""
    names = []
    for case in cases:
        names += [f"{case.name}_attention.nrrd", f"{case.name}_overlay.png"]
        names += [f"{case.name}_attention_resampled.nrrd"] if resample else []
        names += [f"{case.name}_segmentation.nrrd"] if segmentation else []
    return names + (["montage.png"] if len(cases) > 1 else []) + ["summary.json"]


def input_paths(args: argparse.Namespace) -> List[Path]:
    """Every file or folder the command reads (volumes, masks, model): no output may replace one."""
    paths = [Path(p) for p in getattr(args, "inputs", None) or [args.input]]
    paths += [Path(p) for p in getattr(args, "label", None) or []]
    paths += [Path(p) for p in getattr(args, "mask", None) or []]
    paths += [Path(p) for p in getattr(args, "target_mask", None) or []]
    from .models import DEMO_SOURCES

    return paths + ([Path(args.model)] if args.model not in DEMO_SOURCES else [])


def naming_input(path: Path, exc: AttentionMapError) -> AttentionMapError:
    """The library's message about `array_ijk` told about the input file (with several inputs: which one)."""
    return AttentionMapError(f"{path}: {str(exc).replace('array_ijk: ', '', 1)}")


def roi_option(roi: Optional[Sequence[str]]) -> Any:
    """``--roi``: None (not given), "none" (no region) or the box region it gives (AttentionMapError otherwise)."""
    from .core.region import box_region

    if roi is None:
        return None
    if [v.lower() for v in roi] == ["none"]:
        return "none"
    try:
        values = [float(v) for v in roi]
    except ValueError:
        values = []
    if len(values) != 6:
        raise AttentionMapError(f"--roi {' '.join(roi)}: expected six numbers (RAS centre CX CY CZ and size "
                                "SX SY SZ in mm) or 'none'")
    return box_region(values[:3], values[3:], name="ROI")


def case_region(roi: Any, case: Case, loaded) -> Any:
    """A case's region: the --roi box, its --mask volume (read now), none (--roi none), else the card's default."""
    from .core.region import card_default_region

    if isinstance(roi, str):
        return None
    if roi is not None:
        return roi
    if case.mask_path is not None:
        return _mask_region(case.mask_path)
    return card_default_region(loaded.card, loaded.source)


def _mask_region(path: Path) -> Any:
    """A label volume (voxels > 0) as a region placed in patient space; AttentionMapError when empty."""
    from .core.region import MaskRegion

    mask, ijk_to_ras = read_volume(path)
    if not np.any(mask > 0):
        raise AttentionMapError(f"{path}: the mask is empty (no voxel > 0)")
    return MaskRegion(mask, ijk_to_ras, name=path.name)


def segment_option(args: argparse.Namespace, loaded) -> Optional[int]:
    """``--target-class``: the segment's class index, or None (no segment target); --target-mask / --target-roi
    without it are refused."""
    from .models import class_index

    if args.target_class is None:
        if args.target_mask is not None or args.target_roi is not None:
            raise AttentionMapError("--target-mask / --target-roi: give the class to explain with --target-class")
        return None
    if args.target is not None:
        raise AttentionMapError("--target-class: give either --target (a class) or --target-class (a segment)")
    return class_index(args.target_class, loaded.classes, "--target-class")


def case_target(channel: Optional[int], args: argparse.Namespace, case: Case, default: Any) -> Any:
    """A case's target: the segment (its --target-mask, the --target-roi box, or the network's own labels) of
    `channel`, else `default` (the --target / card class)."""
    from .core.region import box_region
    from .core.segment import SegmentTarget

    if channel is None:
        return default
    if case.segment_path is not None:
        return SegmentTarget(channel, _mask_region(case.segment_path))
    if args.target_roi is not None:
        return SegmentTarget(channel, box_region(args.target_roi[:3], args.target_roi[3:], name="segment ROI"))
    return SegmentTarget(channel)


def segment_description(target: Any) -> Optional[Dict[str, Any]]:
    """The summary's account of a segment target (None for a class target)."""
    from .core.segment import SegmentTarget

    if not isinstance(target, SegmentTarget):
        return None
    where = "the network's own labels" if target.mask is None else target.mask.describe()
    return {"channel": int(target.channel), "region": where}


def check_volume_for_model(volume: LoadedCase, loaded) -> None:
    """The input is one the model can take (3D, channels, finite): AttentionMapError naming the file."""
    from .core.engine import model_spec
    from .core.preprocess import check_volume

    try:
        check_volume(volume.array, model_spec(loaded.network, loaded.img_size).in_channels)
    except AttentionMapError as exc:
        raise naming_input(volume.case.path, exc) from None


def check_cases(cases: Sequence[Case], roi: Any, loaded, series_uid: Optional[str]) -> List[Optional[str]]:
    """Read and check every input, label, mask and segment mask before anything is computed; returns each case's
    region description. Nothing is kept: `run` reads each case again when its turn comes, so that one case's
    volumes are held at a time."""
    descriptions = []
    for case in cases:
        check_volume_for_model(load_case(case, series_uid), loaded)
        region = case_region(roi, case, loaded)
        descriptions.append(None if region is None else region.describe())
        if case.segment_path is not None:
            _mask_region(case.segment_path)
    return descriptions


def run_command(args: argparse.Namespace) -> int:
    """`attention-map run`: see the module docstring. Writes only into --output-dir, at the end.

    Memory does not grow with the number of inputs: one case's volumes and maps are held at a time, and its
    attention only batch by batch (`explain_volume(keep_cache=False)`: no re-fusion cache); what outlives a case
    is its summary record and its overlay planes (`render.OverlaySlices`, a few MB), which also carry the two
    numbers the shared colour scale needs.
    """
    from .models import load_model, resolve_device

    cases = plan_cases(args.inputs, args.label, args.mask, args.target_mask)
    names = output_names(cases, args.resample, args.segmentation)
    check_output_folder(args.output_dir, names, input_paths(args))
    device = resolve_device(args.device, "--device")
    return run_with_model(args, load_model(args.model, trust_bundle=args.trust_bundle, device=device), device)


def resolved_options(args: argparse.Namespace, loaded) -> Tuple[Dict[str, Any], Optional[int]]:
    """The explain options of `run` / `cohort` with the card's defaults filled in (each case adds its region and
    target), and the --target-class channel (None without); AttentionMapError naming a bad option."""
    from .explain_options import ExplainOptions

    base = ExplainOptions(**explain_options(args, loaded), query_ras=args.query_ras,
                          flip_axes=flip_axes_option(args.flip_average, loaded),
                          shift_average=args.shift_average or "default")
    return base.resolve(loaded), segment_option(args, loaded)


def run_with_model(args: argparse.Namespace, loaded, device: str) -> int:
    """`run` with the model already loaded on ``device`` (a cohort's worker keeps it between cases)."""
    from tqdm import tqdm

    from .render import joint_range, write_montage, write_overlay

    cases = plan_cases(args.inputs, args.label, args.mask, args.target_mask)
    roi = roi_option(args.roi)
    names = output_names(cases, args.resample, args.segmentation)
    inputs = input_paths(args)
    output_dir = check_output_folder(args.output_dir, names, inputs)
    options, channel = resolved_options(args, loaded)
    regions = check_cases(cases, roi, loaded, args.series_uid)
    records, pictures = [], []
    with staged_folder(output_dir, names, inputs) as staging:
        for case in tqdm(cases, desc="cases", unit="case", disable=None):
            region = case_region(roi, case, loaded)
            target = case_target(channel, args, case, options["target"])
            record, picture, device = _run_case(loaded, case, args, {**options, "region": region, "target": target},
                                                device, staging, output_dir)
            record["segment"] = segment_description(target)
            records.append(record)
            pictures.append(picture)
        # normalised maps share the scale their normalisation defines (percentile saturates above 1)
        scale = joint_range([p.value_range for p in pictures]) if args.normalize == "none" else (0.0, 1.0)
        for record, picture in zip(records, pictures):
            t0 = time.perf_counter()
            name = f"{picture.name}_overlay.png"
            with writing(staging / name):
                write_overlay(staging / name, picture, scale)
            record["outputs"]["overlay"] = str(output_dir / name)
            record["timings_s"]["render"] = time.perf_counter() - t0
        summary = {
            "model": {"source": loaded.source, "classes": loaded.classes, "img_size": list(loaded.img_size),
                      "description": loaded.card.get("description"), "notes": loaded.notes},
            "options": {**{k: v for k, v in options.items() if k != "domain"}, "layer_cli": args.layer,
                        "device": device, "region": regions},
            "colour_scale": list(scale),
            "cases": records,
        }
        if len(cases) > 1:
            with writing(staging / "montage.png"):
                write_montage(staging / "montage.png", pictures, scale)
            summary["montage"] = str(output_dir / "montage.png")
        with writing(staging / "summary.json"):
            (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"attention-map: wrote {len(names)} files to {output_dir}")
    return 0


def _run_case(loaded, case: Case, args: argparse.Namespace, options: Dict[str, Any], device: str, staging: Path,
              output_dir: Path):
    """Explain one case and write its maps; returns (summary record, overlay planes, device that ran).

    The case's volumes, attention (with its re-fusion caches) and resampled map are dropped on return.
    """
    from .render import OverlayCase, overlay_slices, prediction_title

    volume = load_case(case, args.series_uid)
    attention, device = _explain_case(loaded, volume, args, options, device)
    on_input, timings = _write_maps(staging, case.name, attention, volume, args.resample)
    record = _case_record(volume, attention, on_input, loaded.classes)
    record["outputs"] = {"attention": str(output_dir / f"{case.name}_attention.nrrd")}
    if args.resample:
        record["outputs"]["attention_resampled"] = str(output_dir / f"{case.name}_attention_resampled.nrrd")
    record["timings_s"].update(timings)
    if args.segmentation:
        record["segmentation"] = _write_segmentation(staging, case.name, attention, volume, loaded.classes)
        record["outputs"]["segmentation"] = str(output_dir / f"{case.name}_segmentation.nrrd")
    domain = (record["prediction"] or {}).get("domain")
    if domain and domain["unlike_training"]:
        _say(f"{case.name}: {domain['summary']}")
    if record["prediction"] and record["prediction"]["probability"] is None:
        _say(f"{case.name}: {record['prediction']['rule']}")
    title = prediction_title(case.name, args.method, attention.prediction(loaded.classes))
    if attention.region is not None:
        title += f"; map 0 outside the {attention.region.name}"
    picture = overlay_slices(OverlayCase(case.name, volume.array, on_input, volume.ijk_to_ras,
                                         record["peak_ras_mm"], title, volume.label))
    return record, picture, device


def _explain_case(loaded, volume: LoadedCase, args: argparse.Namespace, options: Dict[str, Any], device: str):
    from .core.volume import explain_volume

    bar, update = _progress_bar(f"{volume.case.name} windows")
    try:
        return explain_with_fallback(
            loaded, device, args.device == "auto",
            lambda dev: explain_volume(loaded.network, volume.array, volume.ijk_to_ras, loaded.preprocessing,
                                       img_size=loaded.img_size, progress=update,
                                       device=dev, keep_cache=False, **options),  # no re-fusion here
        )
    except AttentionMapError as exc:
        raise naming_input(volume.case.path, exc) from None
    finally:
        bar.close()


def _write_maps(staging: Path, name: str, attention, volume: LoadedCase,
                resample: bool) -> Tuple[np.ndarray, Dict[str, float]]:
    """<name>_attention.nrrd (token grid, own geometry) and, with --resample, the map on the input grid, written
    into `staging`. Returns the map resampled onto the input's voxel grid and the timings."""
    from .io import write_volume

    t0 = time.perf_counter()
    on_input = attention.resample_to(volume.array.shape[-3:], volume.ijk_to_ras)
    t1 = time.perf_counter()
    write_volume(staging / f"{name}_attention.nrrd", attention.grid, attention.ijk_to_ras)
    if resample:
        write_volume(staging / f"{name}_attention_resampled.nrrd", on_input, volume.ijk_to_ras)
    return on_input, {"resample": t1 - t0, "write": time.perf_counter() - t1}


def _write_segmentation(staging: Path, name: str, attention, volume: LoadedCase,
                        classes: List[str]) -> Dict[str, int]:
    """<name>_segmentation.nrrd: the network's labels on the input's grid (int16), into `staging`; returns the
    voxels of each label (by class name when the card names them)."""
    from .io import write_volume

    labels = attention.segmentation_on(volume.array.shape[-3:], volume.ijk_to_ras)
    if labels is None:
        raise AttentionMapError("--segmentation: this model gives class outputs, not a segmentation; expected a "
                                "segmentation network (UNETR, SwinUNETR)")
    write_volume(staging / f"{name}_segmentation.nrrd", labels, volume.ijk_to_ras)
    values, counts = np.unique(labels, return_counts=True)
    return {(classes[v] if v < len(classes) else str(int(v))): int(c) for v, c in zip(values, counts)}


def _case_record(volume: LoadedCase, attention, on_input: np.ndarray, classes: List[str]) -> Dict[str, Any]:
    """Probabilities, peak, timings and (with a mask) the scores against the mask."""
    from .core.geometry import voxel_spacing
    from .core.metrics import distance_to_mask_mm, mask_statistics, pointing_game

    peak = np.asarray(attention.peak_ras(), dtype=np.float64)
    record: Dict[str, Any] = {
        "case": volume.case.name,
        "input": str(volume.case.path),
        "probabilities": None if attention.probabilities is None else {
            c: float(p) for c, p in zip(classes, attention.probabilities)},
        "prediction": attention.prediction(classes),
        "region": None if attention.region is None else attention.region.summary(),
        "target": attention.target,
        "peak_ras_mm": peak.tolist(),
        "grid_shape": list(attention.grid.shape),
        "num_windows": int(attention.num_windows),
        "timings_s": {"read": volume.read_s, **{k: float(v) for k, v in attention.timings.items()}},
    }
    if volume.label is not None:
        patch = np.rint(voxel_spacing(attention.ijk_to_ras) / voxel_spacing(volume.ijk_to_ras)).astype(int)
        distance = distance_to_mask_mm(peak, volume.label, volume.ijk_to_ras)
        record["label"] = {
            **mask_statistics(on_input, volume.label),
            "pointing_hit_one_patch": pointing_game(on_input, volume.label, tolerance=patch.tolist()),
            "peak_inside": distance["inside"],
            "peak_to_nearest_label_voxel_mm": distance["nearest_mm"],
            "peak_to_label_centroid_mm": distance["centroid_mm"],
        }
    return record


def cohort_command(args: argparse.Namespace) -> int:
    """`attention-map cohort`: see `cohort.run_cohort`."""
    from .cohort import run_cohort

    return run_cohort(args)


# ---------------------------------------------------------------------------------------------- score
def score_command(args: argparse.Namespace) -> int:
    """`attention-map score`: deletion / insertion AUC of the map on the model input (`metrics.score_volume`)."""
    from .core.metrics import score_volume
    from .models import load_model, resolve_device

    (case,) = plan_cases([args.input])
    inputs = input_paths(args)
    if args.output is not None:
        check_output_file(Path(args.output), inputs, "--output")
    device = resolve_device(args.device, "--device")
    loaded = load_model(args.model, trust_bundle=args.trust_bundle, device=device)
    options = explain_options(args, loaded)
    volume = load_case(case, args.series_uid)
    check_volume_for_model(volume, loaded)
    try:
        scores = score_volume(loaded.network, volume.array, volume.ijk_to_ras, loaded.preprocessing, loaded.img_size,
                              centre_ras=args.centre_ras, steps=args.steps, baseline=args.baseline, device=device,
                              **options)
    except AttentionMapError as exc:
        raise naming_input(case.path, exc) from None
    report = {"case": case.name, "input": str(case.path), "model": loaded.source,
              "options": {**options, "layer_cli": args.layer, "centre_ras": args.centre_ras}, **scores}
    target = loaded.classes[scores["target"]] if loaded.classes else scores["target"]
    print(f"{case.name}: deletion AUC {scores['deletion_auc']:.4f} (lower is better), insertion AUC "
          f"{scores['insertion_auc']:.4f} (higher is better); target {target}, baseline {args.baseline}, "
          f"{args.steps} steps")
    if args.output is not None:
        write_file(Path(args.output), json.dumps(report, indent=2).encode(), inputs, "--output")
    return 0


# ---------------------------------------------------------------------------------------------- sample data
def sample_data_command(args: argparse.Namespace) -> int:
    """`attention-map sample-data`: fetch (once) and print name and path of each sample volume."""
    from .sample_data import fetch_sample_data

    try:
        samples = fetch_sample_data(args.cache_dir)
    except OSError as exc:
        where = args.cache_dir if args.cache_dir is not None else exc.filename
        raise AttentionMapError(
            f"--cache-dir {where}: cannot be used as the sample-data cache ({exc.strerror or exc}); "
            "expected a writable folder"
        ) from None
    for name, path in samples.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
