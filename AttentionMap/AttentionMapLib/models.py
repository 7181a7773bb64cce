"""Load a network with its preprocessing and class names: a model card, a MONAI bundle, or "demo".

Model card (JSON; paths relative to the card)::

    {"network": {"name": "ViT", "args": {"in_channels": 1, "img_size": [64, 64, 64], ...}},
     "weights": "model.safetensors",        # or .pt/.pth/.ckpt (torch.load weights_only=True; torch >= 2.6)
     "preprocessing": {...},                # the section read by volume.explain_volume
     "classes": ["no lesion", "lesion"], "target": 1,
     "description": "...", "training_data": "...", "metrics": {...}}

`network.name` is one of the MONAI classes in SUPPORTED_NETWORKS. Every field is checked, and the memory the
card asks for estimated, before the network is built (`model_cards.check_card`); weights must lie inside the
card's folder (`model_cards.weights_path`). Weights never run code on load:
pickles that need arbitrary objects are refused. A MONAI bundle folder (configs/inference.json|yaml
with `network_def`, models/model.pt) is loaded only with trust_bundle=True, because bundle configs
evaluate Python expressions; its preprocessing/classes/target/img_size come from an optional
configs/attentionmap.json (card keys), else from configs/metadata.json, else BUNDLE_DEFAULT_PREPROCESSING.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .dependencies import parse_version
from .errors import AttentionMapError
from .io import check_input_path
from .model_cards import check_card, check_spacing, read_json_object, weights_path

SUPPORTED_NETWORKS = ("ViT", "UNETR", "ViTAutoEnc", "SwinUNETR")
# inside the package, so the wheel and the Slicer module (CMakeLists.txt) carry it
DEMO_CARD = Path(__file__).resolve().parent / "demo_model" / "demo_lung_nodule_vit.json"
SEGMENTATION_DEMO_CARD = DEMO_CARD.with_name("demo_lung_nodule_swinunetr.json")
DEMO_SOURCES = {"demo": DEMO_CARD, "demo-segmentation": SEGMENTATION_DEMO_CARD}
"""Model sources that name a shipped card: the classification demo (a ViT) and the segmentation demo (a SwinUNETR)."""
# Used for a bundle without configs/attentionmap.json: the bundle's own transforms are not run (they
# may be arbitrary code), so the volume is only reoriented, z-scored and resized to the network input.
BUNDLE_DEFAULT_PREPROCESSING: Dict[str, Any] = {
    "orientation": "RAS",
    "spacing": None,
    "intensity": {"normalize": "zscore"},
    "spatial": {"mode": "resize"},
}
_MAX_LISTED_KEYS = 8


@dataclass
class LoadedModel:
    """A network in eval mode with what is needed to feed it and to name its outputs."""

    network: Any  # torch.nn.Module
    preprocessing: Dict[str, Any]
    classes: List[str]
    target: Optional[int]
    img_size: Tuple[int, ...]
    card: Dict[str, Any]
    source: str
    notes: List[str] = field(default_factory=list)  # e.g. keys dropped when mapping an old checkpoint


def load_model(source: str, trust_bundle: bool = False, device: str = "cpu") -> LoadedModel:
    """Load "demo", a model card JSON file, or a MONAI bundle folder.

    Args:
        source: "demo" (the bundled classification demo, a ViT), "demo-segmentation" (the bundled segmentation
            demo, a SwinUNETR), a model card .json path, or a MONAI bundle folder.
        trust_bundle: must be True for a bundle (its configs can run Python code); cards are data only
            (weights read with ``torch.load(..., weights_only=True)``).
        device: where the network goes ("cpu", "cuda", or a torch device).

    Returns:
        LoadedModel: the network in eval mode, its preprocessing section, class names, default target
        and input size.

    Raises:
        AttentionMapError: naming the file (and the card field) for every unusable model.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise AttentionMapError(f"model: expected 'demo', a model card path or a bundle folder, got {source!r}")
    shipped = DEMO_SOURCES.get(source) if isinstance(source, str) else None
    path = shipped or Path(source)
    if shipped is not None and not path.is_file():
        raise AttentionMapError(f"{source}: the bundled model card {path} is missing from this installation")
    if not os.path.lexists(path):
        raise AttentionMapError(
            f"{source}: no such model; expected 'demo', 'demo-segmentation', a model card .json file or a MONAI "
            "bundle folder"
        )
    check_input_path(path)  # a pipe or device is refused before it is opened
    loaded = _load_bundle(path, trust_bundle) if path.is_dir() else _load_card(path)
    loaded.network.to(device).eval()
    return loaded


DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    """True when PyTorch can use Apple's Metal GPU (MPS) here."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str, name: str = "device") -> str:
    """'auto' -> 'cuda' when a CUDA GPU is usable, else 'mps' when Apple's Metal GPU is, else 'cpu'; 'cpu',
    'cuda' and 'mps' are checked (``name``: the option named in the message). The command line and the worker
    process both use this."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if device not in DEVICES:
        raise AttentionMapError(f"{name}: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise AttentionMapError(f"{name} 'cuda': no CUDA GPU is available to PyTorch; choose 'auto' or 'cpu'")
    if device == "mps" and not mps_available():
        raise AttentionMapError(f"{name} 'mps': Apple's Metal GPU is not available to PyTorch; choose 'auto' or 'cpu'")
    return device


def _load_card(card_path: Path) -> LoadedModel:
    card = read_json_object(card_path)
    try:
        name, args = check_card(card, SUPPORTED_NETWORKS)
        weights = weights_path(card_path, card.get("weights"))
    except AttentionMapError as exc:
        raise AttentionMapError(f"{card_path}: {exc}") from None
    network = _build_network(card_path, name, args)
    _declare(network, card, card_path)
    notes = load_weights(network, weights)
    classes = _class_names(card_path, card.get("classes"), network)
    return LoadedModel(
        network=network,
        preprocessing=card["preprocessing"],
        classes=classes,
        target=class_index(card.get("target"), classes, str(card_path)),
        img_size=_img_size(card_path, card.get("img_size") if name == "SwinUNETR" else args.get("img_size"),
                           args.get("spatial_dims", 3)),
        card=card,
        source=str(card_path),
        notes=notes,
    )


def _declare(network: Any, card: Mapping[str, Any], source: Path) -> None:
    """A card's (or a bundle's attentionmap.json) ``attention`` section attached to the network (core/declared.py)."""
    if card.get("attention") is None:
        return
    from .core.declared import declare_attention

    try:
        declare_attention(network, card["attention"])
    except AttentionMapError as exc:
        raise AttentionMapError(f"{source}: {exc}") from None


def _load_bundle(folder: Path, trust_bundle: bool) -> LoadedModel:
    configs = folder / "configs"
    candidates = [configs / name for name in ("inference.json", "inference.yaml", "inference.yml")]
    config_file = next((c for c in candidates if c.is_file()), None)
    if config_file is None:
        raise AttentionMapError(
            f"{folder}: not a MONAI bundle (configs/inference.json or configs/inference.yaml is missing)"
        )
    if not trust_bundle:
        raise AttentionMapError(
            f"{folder}: MONAI bundle configs can run Python code ('$' expressions, '_target_'); refused. "
            "Load it only if you trust its source: trust_bundle=True (CLI: --trust-bundle)"
        )
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(folder)
    if "network_def" not in parser.get():
        raise AttentionMapError(f"{config_file}: no 'network_def' entry")
    try:
        network = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as exc:  # the bundle's own code: report, do not hide the cause
        raise AttentionMapError(f"{config_file}: 'network_def' could not be built: {exc}") from exc
    weights = next((w for w in (folder / "models" / n for n in ("model.pt", "model.safetensors")) if w.is_file()), None)
    if weights is None:
        raise AttentionMapError(f"{folder}: models/model.pt (or models/model.safetensors) is missing")
    notes = load_weights(network, weights)

    extra_file = configs / "attentionmap.json"
    extra = read_json_object(extra_file) if extra_file.is_file() else {}
    _declare(network, extra, extra_file)
    meta_file = configs / "metadata.json"
    meta = read_json_object(meta_file) if meta_file.is_file() else {}
    data_format = meta.get("network_data_format", {})
    image_format = data_format.get("inputs", {}).get("image", {})
    img_size = extra.get("img_size")
    if img_size is None and isinstance(parser.get("network_def"), dict) and "img_size" in parser.get("network_def"):
        img_size = parser.get_parsed_content("network_def#img_size")
    if img_size is None and all(isinstance(s, int) for s in image_format.get("spatial_shape", [None])):
        img_size = image_format["spatial_shape"]
    if extra.get("classes") is not None:
        class_source = extra.get("classes")
    else:
        channel_def = data_format.get("outputs", {}).get("pred", {}).get("channel_def")
        class_source = [channel_def[k] for k in sorted(channel_def, key=int)] if channel_def else None
    classes = _class_names(folder, class_source, network)
    card = {"bundle": str(folder), "metadata": meta, **extra}
    if "description" not in card and meta.get("description"):
        card["description"] = meta["description"]
    return LoadedModel(
        network=network,
        preprocessing=_checked_preprocessing(extra_file, extra.get("preprocessing", BUNDLE_DEFAULT_PREPROCESSING)),
        classes=classes,
        target=class_index(extra.get("target"), classes, str(folder)),
        img_size=_img_size(folder, img_size, 3),
        card=card,
        source=str(folder),
        notes=notes,
    )


def _unused_cross_attention(key: str) -> bool:
    return ".cross_attn." in key or ".norm_cross_attn." in key


def _uses_cross_attention(network: Any) -> bool:
    """True when a block of ``network`` was built with_cross_attention (its cross-attention weights are used)."""
    return any(getattr(module, "with_cross_attention", False) for module in network.modules())


def load_weights(network: Any, weights_path: Path) -> List[str]:
    """Load a checkpoint into `network` without running code from it.

    Accepts a plain state dict, {"state_dict": ...} or {"model": ...}, keys prefixed by "module."
    (DataParallel), and ViT checkpoints of older MONAI versions (ViT.load_old_state_dict). Returns
    notes about mappings applied; raises AttentionMapError listing missing / unexpected / mis-shaped keys.
    """
    state = read_state_dict(weights_path)
    notes: List[str] = []
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        notes.append("removed the 'module.' prefix (DataParallel checkpoint)")
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    # MONAI 1.4 / 1.5 keep unused cross-attention weights in every TransformerBlock (used only with
    # with_cross_attention=True); MONAI 1.6 drops them. Either way round they are never used, so they are dropped
    # from a 1.4 / 1.5 checkpoint, or left at the network's own values for a 1.6 checkpoint on MONAI 1.5.
    stale = [k for k in unexpected if _unused_cross_attention(k)]
    absent = [k for k in missing if _unused_cross_attention(k) and not _uses_cross_attention(network)]
    if not shapes and (unexpected or missing) and len(stale) == len(unexpected) and len(absent) == len(missing):
        if stale and not missing and hasattr(network, "load_old_state_dict"):
            network.load_old_state_dict(dict(state))
        else:
            network.load_state_dict({**{k: expected[k] for k in absent},
                                     **{k: v for k, v in state.items() if k not in stale}})
        if stale:
            notes.append(f"older MONAI checkpoint: dropped {len(stale)} unused cross-attention keys")
        if absent:
            notes.append(f"this MONAI keeps {len(absent)} unused cross-attention weights the checkpoint lacks "
                         "(a newer MONAI's): left as built, they take no part in the forward pass")
        return notes
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                shown = ", ".join(keys[:_MAX_LISTED_KEYS])
                more = f" (+{len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else ""
                parts.append(f"{label} {len(keys)}: {shown}{more}")
        raise AttentionMapError(
            f"{weights_path}: checkpoint does not match the network ({'; '.join(parts)}); "
            "check the card's network args"
        )
    network.load_state_dict(state)
    return notes


# torch.load(weights_only=True) can run code from a crafted file before PyTorch 2.6 (CVE-2025-32434)
SAFE_TORCH_LOAD = (2, 6)


def torch_load_is_safe(version: str) -> bool:
    """True when ``version`` (torch.__version__, e.g. "2.6.0+cpu") is 2.6 or later: weights_only=True is safe."""
    return (parse_version(version) or ())[:2] >= SAFE_TORCH_LOAD


def read_state_dict(weights_path: Path) -> Dict[str, Any]:
    """A state dict of tensors from a .safetensors file (any torch), or a .pt / .pth checkpoint read with
    ``torch.load(weights_only=True)``, refused on torch < 2.6 (CVE-2025-32434) and when it needs arbitrary
    unpickling. Raises AttentionMapError naming the file."""
    import torch

    if not os.path.lexists(weights_path):
        raise AttentionMapError(f"{weights_path}: weights file not found")
    check_input_path(weights_path, folders=False)
    if weights_path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AttentionMapError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    if not torch_load_is_safe(torch.__version__):
        raise AttentionMapError(
            f"{weights_path}: refused, PyTorch {torch.__version__} is older than 2.6, where torch.load(weights_only="
            "True) can run code from a crafted checkpoint (CVE-2025-32434); use PyTorch 2.6 or later, or convert the "
            "weights to .safetensors (accepted with any PyTorch)"
        )
    try:
        loaded = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AttentionMapError(
            f"{weights_path}: refused, the file needs unpickling of arbitrary Python objects, which can run "
            f"code (torch.load weights_only=True: {reason}); re-save it as a plain state_dict or .safetensors"
        ) from None
    except Exception as exc:
        raise AttentionMapError(f"{weights_path}: not a readable PyTorch checkpoint ({exc})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise AttentionMapError(
            f"{weights_path}: expected a state dict of tensors (optionally under 'state_dict' or 'model')"
        )
    return dict(loaded)


def _checked_preprocessing(source: Path, preprocessing: Any) -> Dict[str, Any]:
    """The card's preprocessing section, checked now (preprocess.parse_preprocessing) so a bad card fails at load."""
    from .core.preprocess import parse_preprocessing

    if not isinstance(preprocessing, dict):
        raise AttentionMapError(
            f"{source}: 'preprocessing' must be an object (orientation, spacing, intensity, spatial)"
        )
    try:
        check_spacing(parse_preprocessing(preprocessing).spacing)
    except AttentionMapError as exc:
        raise AttentionMapError(f"{source}: {exc}") from None
    return preprocessing


def _build_network(card_path: Path, name: Any, args: Any) -> Any:
    if name not in SUPPORTED_NETWORKS:
        raise AttentionMapError(
            f"{card_path}: network.name {name!r} is not supported; expected one of {', '.join(SUPPORTED_NETWORKS)}"
        )
    if not isinstance(args, dict):
        raise AttentionMapError(f"{card_path}: network.args must be an object of constructor arguments")
    import monai.networks.nets as nets

    try:
        return getattr(nets, name)(**args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise AttentionMapError(f"{card_path}: MONAI {name} rejects network.args: {exc}") from None


def _class_names(source: Path, classes: Any, network: Any) -> List[str]:
    if classes is None:
        head = getattr(network, "classification_head", None)
        linear = head[0] if hasattr(head, "__getitem__") else head
        count = getattr(linear, "out_features", 0)
        return [f"class {i}" for i in range(count)]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise AttentionMapError(f"{source}: 'classes' must be a list of names")
    return list(classes)


def class_index(target: Any, classes: List[str], source: str) -> Optional[int]:
    """A class index from None, an int, a digit string, or a class name (case-insensitive)."""
    if target is None:
        return None
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        lowered = [c.lower() for c in classes]
        if target.lower() not in lowered:
            raise AttentionMapError(f"{source}: target {target!r} is not a class; classes are {classes}")
        return lowered.index(target.lower())
    index = int(target)
    if classes and not 0 <= index < len(classes):
        raise AttentionMapError(f"{source}: target index {index} out of range 0..{len(classes) - 1} ({classes})")
    return index


def _img_size(source: Path, img_size: Any, spatial_dims: int) -> Tuple[int, ...]:
    if isinstance(img_size, int):
        return (img_size,) * spatial_dims
    if isinstance(img_size, (list, tuple)) and img_size and all(isinstance(s, int) for s in img_size):
        return tuple(img_size)
    raise AttentionMapError(f"{source}: the network input size 'img_size' is missing or not a list of ints")


