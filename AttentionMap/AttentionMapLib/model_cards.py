"""Model-card checks: every field's type and range, and the memory the card asks for, before anything is built.

A card is data from a file: a field of the wrong type, a zero head count or a network of terabytes
must be refused with the field's name, not crash inside MONAI or exhaust the machine. ``check_card``
runs before the network is constructed or any weights are read; ``estimate_memory`` is a closed-form
estimate (no network is built) compared with ``MEMORY_LIMIT_BYTES``.

Weights: the card names its weights by a path relative to the card, and that path must resolve
(symbolic links included) inside the card's folder: a card downloaded from elsewhere can make the tool
read only files shipped with it. To use weights from another place, write a card next to them.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .errors import AttentionMapError
from .io import check_input_path

# A card may ask for at most this much memory (network parameters twice: the checkpoint and the
# network; attention and activations of one forward+backward pass of a batch; the preprocessed volume).
MEMORY_LIMIT_BYTES = 8 * 2 ** 30
# The volume a card's resampling is sized against: a chest-abdomen CT field of view, and, for cards that
# keep the input spacing, a 512 x 512 x 400 scan.
TYPICAL_FIELD_OF_VIEW_MM = (400.0, 400.0, 400.0)
TYPICAL_INPUT_VOXELS = 512 * 512 * 400
SPACING_RANGE_MM = (0.1, 50.0)  # preprocessing.spacing per axis, inclusive
MAX_CARD_BYTES = 2 ** 20  # a card is a small JSON file
MAX_CARD_DEPTH = 32  # nesting of a card's JSON (the demo card's is 5); deeper is no card and could exhaust the stack
_FLOAT32 = 4
BLOCKWISE_SLAB_BYTES = 64 * 2 ** 20  # blockwise: the row slab of one block's attention read out at a time
_PREPROCESSING_COPIES = 3  # input as float32, the resampled MetaTensor, the scaled copy
UNETR_PATCH = 16  # UNETR's fixed patch size (monai.networks.nets.UNETR: self.patch_size = ensure_tuple_rep(16, ...))

# Integer network arguments: (low, high) inclusive; high bounds are generous sanity limits, memory is checked apart.
_INT_RANGES: Dict[str, Tuple[int, int]] = {
    "in_channels": (1, 64), "out_channels": (1, 1024), "num_classes": (1, 100_000),
    "hidden_size": (1, 65_536), "mlp_dim": (1, 262_144), "num_layers": (1, 1024), "num_heads": (1, 1024),
    "feature_size": (1, 4096), "deconv_chns": (1, 4096), "spatial_dims": (3, 3),
}
_BOOL_ARGS = ("classification", "qkv_bias", "save_attn", "conv_block", "res_block")
_POST_ACTIVATIONS = (None, "Tanh")  # MONAI ViT adds Tanh for "Tanh" and silently nothing for any other value
_REQUIRED = {"ViT": ("in_channels", "img_size", "patch_size"), "UNETR": ("in_channels", "out_channels", "img_size"),
             "ViTAutoEnc": ("in_channels", "img_size", "patch_size")}
_TEXT_FIELDS = ("name", "description", "training_data")


def _field_error(field: str, expected: str, got: Any) -> AttentionMapError:
    shown = repr(got)
    return AttentionMapError(f"{field}: expected {expected}, got {shown[:80] + '...' if len(shown) > 80 else shown}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sizes(args: Mapping[str, Any], key: str, default: Any = None) -> Tuple[int, int, int]:
    """img_size / patch_size: one positive int or three."""
    value = args.get(key, default)
    values = [value] * 3 if _is_int(value) else value
    if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(_is_int(v) and v >= 1 for v in values)):
        raise _field_error(f"network.args.{key}", "a positive integer or a list of three", value)
    return tuple(values)  # type: ignore[return-value]


def check_network_args(name: str, args: Mapping[str, Any]) -> Dict[str, Any]:
    """Types and ranges of MONAI `name`'s constructor arguments (MONAI 1.6.1 signatures); the argument
    values the memory estimate needs, defaults filled in. Raises AttentionMapError naming the field."""
    import monai.networks.nets as nets
    from monai.networks.blocks.patchembedding import SUPPORTED_PATCH_EMBEDDING_TYPES, SUPPORTED_POS_EMBEDDING_TYPES

    accepted = [p for p in inspect.signature(getattr(nets, name)).parameters if p != "self"]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise AttentionMapError(f"network.args: unknown argument(s) {unknown} for MONAI {name}; accepted: {accepted}")
    missing = [k for k in _REQUIRED[name] if k not in args]
    if missing:
        raise AttentionMapError(f"network.args: missing {missing} (required by MONAI {name})")
    defaults = {p.name: p.default for p in inspect.signature(getattr(nets, name)).parameters.values()
                if p.default is not inspect.Parameter.empty}
    values = {**defaults, **args}
    for key, (low, high) in _INT_RANGES.items():
        if key in values and not (_is_int(values[key]) and low <= values[key] <= high):
            raise _field_error(f"network.args.{key}", f"an integer in {low}..{high}", values[key])
    for key in _BOOL_ARGS:
        if key in values and not isinstance(values[key], bool):
            raise _field_error(f"network.args.{key}", "true or false", values[key])
    choices_of = {"proj_type": sorted(SUPPORTED_PATCH_EMBEDDING_TYPES), "post_activation": list(_POST_ACTIVATIONS),
                  "pos_embed_type": sorted(SUPPORTED_POS_EMBEDDING_TYPES)}
    for key, choices in choices_of.items():
        if key in values and values[key] not in choices:
            raise _field_error(f"network.args.{key}", f"one of {list(choices)}", values[key])
    rate = values.get("dropout_rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise _field_error("network.args.dropout_rate", "a number in [0, 1]", rate)
    if values["hidden_size"] % values["num_heads"]:
        raise AttentionMapError(f"network.args.num_heads: {values['num_heads']} does not divide hidden_size "
                                f"{values['hidden_size']}; expected a divisor (each head gets hidden_size / num_heads)")
    values["img_size"] = _sizes(values, "img_size")
    values["patch_size"] = _sizes(values, "patch_size", UNETR_PATCH) if name != "UNETR" else (UNETR_PATCH,) * 3
    for size, patch in zip(values["img_size"], values["patch_size"]):
        if size % patch:
            field = "img_size" if name == "UNETR" else "patch_size"
            raise AttentionMapError(f"network.args.{field}: the patch size {values['patch_size']} must divide img_size "
                                    f"{values['img_size']} along every axis (whole patches only)")
    return values


# SwinUNETR (MONAI 1.5.2 / 1.6.1 signatures): the constructor arguments a card may give, as JSON
_SWIN_DEFAULTS: Dict[str, Any] = {
    "patch_size": 2, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 7, "qkv_bias": True,
    "mlp_ratio": 4.0, "feature_size": 24, "norm_name": "instance", "drop_rate": 0.0, "attn_drop_rate": 0.0,
    "dropout_path_rate": 0.0, "normalize": True, "patch_norm": False, "use_checkpoint": False, "spatial_dims": 3,
    "downsample": "merging", "use_v2": False}
_SWIN_BOOLS = ("qkv_bias", "normalize", "patch_norm", "use_checkpoint", "use_v2", "use_flash_attention")
SWIN_DECODER_PARAMETERS_PER_F2 = 23_510
"""SwinUNETR's convolutional decoder has about this many parameters per feature_size^2 (MONAI 1.6.1: 23,492-23,502
for feature sizes 12-48 and 1-4 input, 2-14 output channels)."""
SWIN_ACTIVATION_FLOATS_PER_VOXEL_FEATURE = 34
"""Forward + backward activations of SwinUNETR per input voxel and feature_size (benchmarks/bench_swin.py: 96^3,
feature size 48, 5,292 MiB: 32.7)."""


def check_swin_args(args: Mapping[str, Any], img_size: Any) -> Dict[str, Any]:
    """Types and ranges of a SwinUNETR card's network.args and its top-level ``img_size`` (the window the network
    runs on: SwinUNETR does not take it, and needs it divisible by patch_size ** 5). Raises AttentionMapError
    naming the field; returns the values with defaults filled in."""
    accepted = ["in_channels", "out_channels", *_SWIN_DEFAULTS, "use_flash_attention"]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise AttentionMapError(f"network.args: unknown argument(s) {unknown} for MONAI SwinUNETR (Hyena stages and "
                                f"Python objects are not card data); accepted: {accepted}")
    missing = [k for k in ("in_channels", "out_channels") if k not in args]
    if missing:
        raise AttentionMapError(f"network.args: missing {missing} (required by MONAI SwinUNETR)")
    values = {**_SWIN_DEFAULTS, **args}
    for key, (low, high) in {"in_channels": (1, 64), "out_channels": (1, 1024), "feature_size": (12, 4096),
                             "patch_size": (1, 16), "spatial_dims": (3, 3)}.items():
        if not (_is_int(values[key]) and low <= values[key] <= high):
            raise _field_error(f"network.args.{key}", f"an integer in {low}..{high}", values[key])
    if values["feature_size"] % 12:
        raise _field_error("network.args.feature_size", "a multiple of 12 (MONAI SwinUNETR)", values["feature_size"])
    for key, high in (("depths", 64), ("num_heads", 1024)):
        value = values[key]
        if not (isinstance(value, list) and len(value) == 4 and all(_is_int(v) and 1 <= v <= high for v in value)):
            raise _field_error(f"network.args.{key}", f"a list of four integers in 1..{high}", value)
    for stage, heads in enumerate(values["num_heads"]):
        if (values["feature_size"] * 2 ** stage) % heads:
            raise AttentionMapError(f"network.args.num_heads: {heads} heads do not divide stage {stage}'s "
                                    f"{values['feature_size'] * 2 ** stage} channels (feature_size * 2^{stage})")
    window = values["window_size"]
    window = [window] * 3 if _is_int(window) else window
    if not (isinstance(window, list) and len(window) == 3 and all(_is_int(v) and 1 <= v <= 64 for v in window)):
        raise _field_error("network.args.window_size", "an integer or a list of three in 1..64", values["window_size"])
    for key in _SWIN_BOOLS:
        if key in values and not isinstance(values[key], bool):
            raise _field_error(f"network.args.{key}", "true or false", values[key])
    for key in ("drop_rate", "attn_drop_rate", "dropout_path_rate"):
        if isinstance(values[key], bool) or not isinstance(values[key], (int, float)) or not 0 <= values[key] <= 1:
            raise _field_error(f"network.args.{key}", "a number in [0, 1]", values[key])
    ratio = values["mlp_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 64:
        raise _field_error("network.args.mlp_ratio", "a number in (0, 64]", ratio)
    for key, choices in (("norm_name", ("instance", "batch")), ("downsample", ("merging", "mergingv2"))):
        if values[key] not in choices:
            raise _field_error(f"network.args.{key}", f"one of {list(choices)}", values[key])
    values["window_size"] = tuple(window)
    values["img_size"] = _sizes({"img_size": img_size}, "img_size")
    step = values["patch_size"] ** 5  # monai.networks.nets.SwinUNETR._check_input_size
    if any(size % step for size in values["img_size"]):
        raise AttentionMapError(f"img_size: {list(values['img_size'])} must be divisible by patch_size ** 5 = {step} "
                                "along every axis (SwinUNETR refuses other sizes)")
    return values


def _volume_voxels(spacing: Optional[Sequence[float]]) -> int:
    """Voxels of the typical volume after the card's resampling (TYPICAL_INPUT_VOXELS when it keeps the spacing)."""
    if spacing is None:
        return TYPICAL_INPUT_VOXELS
    return math.prod(math.ceil(fov / s) for fov, s in zip(TYPICAL_FIELD_OF_VIEW_MM, spacing))


def estimate_swin_memory(values: Mapping[str, Any], spacing: Optional[Sequence[float]],
                         batch: int = 1) -> Dict[str, int]:
    """Bytes a SwinUNETR card needs, by part (as :func:`estimate_memory`): parameters in closed form (the encoder
    exactly, the decoder by :data:`SWIN_DECODER_PARAMETERS_PER_F2`); attention: each block's fused window
    attention and relevance, (windows x n^2) x 2 floats, windows x n = the stage's (padded) tokens; activations
    by :data:`SWIN_ACTIVATION_FLOATS_PER_VOXEL_FEATURE`."""
    feature, window = values["feature_size"], values["window_size"]
    slots = math.prod(window)
    parameters = values["in_channels"] * values["patch_size"] ** 3 * feature + feature
    attention = 0
    grid = [s // values["patch_size"] for s in values["img_size"]]
    for stage, (depth, heads) in enumerate(zip(values["depths"], values["num_heads"])):
        dim = feature * 2 ** stage
        table = math.prod(2 * w - 1 for w in window) * heads
        parameters += depth * (12 * dim * dim + 13 * dim + table) + 16 * dim * dim + 16 * dim
        padded = math.prod(-(-g // w) * w for g, w in zip(grid, window))
        attention += 2 * depth * padded * slots
        grid = [-(-g // 2) for g in grid]
    parameters += SWIN_DECODER_PARAMETERS_PER_F2 * feature * feature
    voxels = math.prod(values["img_size"])
    volume_voxels = _volume_voxels(spacing)
    return {
        "parameters": 2 * _FLOAT32 * parameters,
        "attention": _FLOAT32 * batch * attention,
        "activations": _FLOAT32 * batch * voxels * feature * SWIN_ACTIVATION_FLOATS_PER_VOXEL_FEATURE,
        "preprocessing": _FLOAT32 * _PREPROCESSING_COPIES * volume_voxels,
    }


def estimate_memory(name: str, values: Mapping[str, Any], spacing: Optional[Sequence[float]],
                    batch: int = 1) -> Dict[str, int]:
    """Bytes a card needs, by part: parameters, attention, activations, preprocessing (see MEMORY_LIMIT_BYTES).

    `values`: :func:`check_network_args`' result. Parameters are counted in closed form (the ViT part
    exactly up to a few vectors; UNETR / ViTAutoEnc decoders by a fit to MONAI 1.6.1, within 1 %).
    Attention, for gradient rollout (the largest): the full path keeps heads + 2 matrices N x N per
    block (``engine.full_path_bytes``), the block-wise path each block's input and dO, 2 N x hidden,
    plus one slab of ``BLOCKWISE_SLAB_BYTES``; ``engine`` takes the block-wise path when the full one
    exceeds its budget, so the smaller of the two counts. Activations include the model input (and
    its gradient). `batch`: windows per forward pass (sw_batch_size). SwinUNETR: :func:`estimate_swin_memory`.
    """
    if name == "SwinUNETR":
        return estimate_swin_memory(values, spacing, batch)
    h, m, heads = values["hidden_size"], values["mlp_dim"], values["num_heads"]
    layers = values.get("num_layers", 12)
    tokens = math.prod(s // p for s, p in zip(values["img_size"], values["patch_size"]))
    sequence = tokens + int(bool(values.get("classification")))  # + CLS
    patch_voxels = math.prod(values["patch_size"])
    parameters = values["in_channels"] * patch_voxels * h + h + tokens * h + h
    parameters += layers * (4 * h * h + 2 * h * m + 9 * h) + 2 * h
    if values.get("classification"):
        parameters += (h + 1) * values["num_classes"]
    voxels = math.prod(values["img_size"])
    decoder_activations = 2 * values["in_channels"] * voxels  # the input and its gradient
    if name == "UNETR":
        parameters += 8910 * values["feature_size"] ** 2 + 176 * h * values["feature_size"]
        decoder_activations += 6 * voxels * values["feature_size"]
    elif name == "ViTAutoEnc":
        parameters += 64 * values["deconv_chns"] * (h + values["out_channels"])
        decoder_activations += 2 * voxels * values["deconv_chns"]
    volume_voxels = _volume_voxels(spacing)
    return {
        "parameters": 2 * _FLOAT32 * parameters,
        "attention": min(_FLOAT32 * batch * layers * (heads + 2) * sequence * sequence,
                         _FLOAT32 * batch * layers * 2 * sequence * h + BLOCKWISE_SLAB_BYTES),
        "activations": _FLOAT32 * batch * (layers * tokens * (6 * h + 2 * m) + decoder_activations),
        "preprocessing": _FLOAT32 * _PREPROCESSING_COPIES * volume_voxels,
    }


def _gib(count: int) -> str:
    return f"{count / 2 ** 30:.3g} GiB"


def _memory_drivers(name: str, values: Mapping[str, Any]) -> Dict[str, str]:
    """The card fields behind each part of the memory estimate, for the refusal message."""
    if name == "SwinUNETR":
        size = f"img_size={list(values['img_size'])}, feature_size={values['feature_size']}"
        return {"parameters": f"network.args (feature_size={values['feature_size']}, depths={values['depths']})",
                "attention": f"img_size / network.args ({size}, window_size={list(values['window_size'])})",
                "activations": f"img_size / network.args ({size})"}
    return {
        "parameters": f"network.args (hidden_size={values['hidden_size']}, mlp_dim={values['mlp_dim']}, "
                      f"num_layers={values.get('num_layers', 12)})",
        "attention": f"network.args (img_size={list(values['img_size'])}, patch_size={list(values['patch_size'])}, "
                     f"num_heads={values['num_heads']})",
        "activations": f"network.args (img_size={list(values['img_size'])}, hidden_size={values['hidden_size']})",
    }


def check_memory(name: str, values: Mapping[str, Any], spacing: Optional[Sequence[float]], batch: int) -> None:
    """Refuse a card whose estimated memory exceeds MEMORY_LIMIT_BYTES, naming the fields that drive it."""
    parts = estimate_memory(name, values, spacing, batch)
    total = sum(parts.values())
    if total <= MEMORY_LIMIT_BYTES:
        return
    drivers = _memory_drivers(name, values)
    drivers["preprocessing"] = (f"preprocessing.spacing {list(spacing) if spacing is not None else None} "
                                f"(a {TYPICAL_FIELD_OF_VIEW_MM[0]:g} mm field of view)")
    largest = max(parts, key=parts.__getitem__)
    breakdown = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())
    raise AttentionMapError(f"{drivers[largest]}: the card would need about {_gib(total)} ({breakdown}); the limit "
                            f"is {_gib(MEMORY_LIMIT_BYTES)} (model_cards.MEMORY_LIMIT_BYTES)")


def check_spacing(spacing: Any) -> None:
    """preprocessing.spacing within SPACING_RANGE_MM (after preprocess.parse_preprocessing checked its form)."""
    low, high = SPACING_RANGE_MM
    if spacing is not None and not all(low <= float(s) <= high for s in spacing):
        raise _field_error("preprocessing.spacing", f"three spacings in {low:g}..{high:g} mm, or null", spacing)


def weights_path(card_path: Path, weights: Any) -> Path:
    """The card's `weights` resolved inside the card's folder, or AttentionMapError (see the module docstring)."""
    if not isinstance(weights, str) or not weights.strip():
        raise _field_error("weights", "a file name relative to the card (a non-empty string)", weights)
    if os.path.isabs(weights):
        raise AttentionMapError(f"weights: {weights!r} is an absolute path; a card may only name weights inside its "
                                "own folder (write a card next to the weights to use them)")
    folder = card_path.parent.resolve()
    resolved = (folder / weights).resolve()
    if folder not in resolved.parents:
        raise AttentionMapError(f"weights: {weights!r} resolves to {resolved}, outside the card's folder {folder}; "
                                "a card may only name weights inside its own folder (write a card next to the weights)")
    return resolved


def check_card(card: Mapping[str, Any], supported: Sequence[str]) -> Tuple[str, Dict[str, Any]]:
    """Every field of a model card (not the weights file itself): returns (network name, checked args).

    Raises AttentionMapError naming the field. Unknown top-level keys are kept for the record (cards
    carry training notes and metrics) and never used.
    """
    from .core.preprocess import parse_preprocessing

    network = card.get("network")
    if not isinstance(network, Mapping) or not isinstance(network.get("name"), str):
        raise _field_error("network", "an object with 'name' (string) and 'args' (object)", network)
    name = network["name"]
    if name not in supported:
        raise AttentionMapError(f"network.name: {name!r} is not supported; expected one of {', '.join(supported)}")
    args = network.get("args", {})
    if not isinstance(args, Mapping):
        raise _field_error("network.args", "an object of constructor arguments", args)
    values = check_swin_args(args, card.get("img_size")) if name == "SwinUNETR" else check_network_args(name, args)
    preprocessing = card.get("preprocessing")
    if not isinstance(preprocessing, Mapping):
        raise _field_error("preprocessing", "an object (orientation, spacing, intensity, spatial)", preprocessing)
    prep = parse_preprocessing(preprocessing)
    check_spacing(prep.spacing)
    classes = card.get("classes")
    if classes is not None:
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c.strip() for c in classes)):
            raise _field_error("classes", "a list of class names (non-empty strings)", classes)
        if len(set(c.lower() for c in classes)) != len(classes):
            raise _field_error("classes", "distinct names", classes)
        outputs = values["num_classes"] if values.get("classification") else values.get("out_channels")
        if name != "ViT" or values.get("classification"):
            if outputs != len(classes):
                raise AttentionMapError(f"classes: {len(classes)} name(s) for {outputs} network output(s); "
                                        "expected one name per output")
    target = card.get("target")
    if target is not None and not (_is_int(target) or isinstance(target, str)):
        raise _field_error("target", "a class name, a class index, or null", target)
    for key in _TEXT_FIELDS:
        if card.get(key) is not None and not isinstance(card[key], str):
            raise _field_error(key, "a string", card[key])
    check_inference_defaults(card)
    batch = prep.sw_batch_size if prep.mode == "sliding_window" else 1
    check_memory(name, values, prep.spacing, batch)
    return name, dict(args)


_CALIBRATION_FRACTIONS = ("ece", "ece_uncalibrated")  # expected calibration errors, in [0, 1]
_CALIBRATION_TEXT = ("fitted_on", "ece_on")


def check_inference_defaults(card: Mapping[str, Any]) -> None:
    """``default_region`` (read by region.card_default_region), ``default_flip_axes`` (flips.card_flip_axes),
    ``default_shift_average`` (shifts.card_shift_average) and
    ``calibration`` (temperature read by calibration.card_temperature; the recorded ECEs and their data
    descriptions) and ``domain`` (domain.card_domain; it needs a HU range in preprocessing.intensity) when the
    card has them."""
    from .core.calibration import card_temperature
    from .core.domain import card_domain
    from .core.flips import card_flip_axes
    from .core.region import card_default_region
    from .core.shifts import card_shift_average

    source = "model card"
    try:
        card_default_region(card, source)
        card_flip_axes(card, source)
        card_shift_average(card, source)
        card_temperature(card, source)
        if card_domain(card, source) is not None:
            intensity = (card.get("preprocessing") or {}).get("intensity") or {}
            if not isinstance(intensity, Mapping) or "a_min" not in intensity:
                raise AttentionMapError(f"{source}: domain: needs preprocessing.intensity with a HU range (a_min, "
                                        "a_max, b_min, b_max)")
    except AttentionMapError as exc:  # the loader names the card file itself
        raise AttentionMapError(str(exc)[len(source) + 2:] if str(exc).startswith(source) else str(exc)) from None
    section = card.get("calibration")
    if section is None:
        return
    for key in _CALIBRATION_FRACTIONS:
        value = section.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0.0 <= value <= 1.0):
            raise _field_error(f"calibration.{key}", "a number in [0, 1]", value)
    for key in _CALIBRATION_TEXT:
        if section.get(key) is not None and not isinstance(section[key], str):
            raise _field_error(f"calibration.{key}", "a string", section[key])


def _depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (iterative: no recursion of its own)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json_object(path: Path) -> Dict[str, Any]:
    """A model card (or a bundle's metadata) as a JSON object: a regular file of at most MAX_CARD_BYTES, nested at
    most MAX_CARD_DEPTH deep; anything else (JSON nested past the parser's recursion limit, an integer of thousands
    of digits, which Python refuses to convert) raises AttentionMapError naming the file."""
    path = Path(path)
    check_input_path(path, folders=False)
    if path.stat().st_size > MAX_CARD_BYTES:
        raise AttentionMapError(f"{path}: {path.stat().st_size} bytes; expected a JSON file of at most "
                                f"{MAX_CARD_BYTES} bytes (model_cards.MAX_CARD_BYTES)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise AttentionMapError(f"{path}: not a model card: JSON nested too deeply to read") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, or an integer too long
        raise AttentionMapError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise AttentionMapError(f"{path}: expected a JSON object")
    if _depth(data) > MAX_CARD_DEPTH:
        raise AttentionMapError(f"{path}: not a model card: JSON nested more than {MAX_CARD_DEPTH} deep")
    return data
