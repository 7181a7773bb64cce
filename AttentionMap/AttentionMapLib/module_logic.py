"""Decisions of the Slicer module that need neither Qt nor torch (so they are tested without Slicer).

- card_summary: class names, layer and head counts read from a model card before any run (the
  layer slider and head box get their ranges from it);
- fusion_differs: whether the map shown was made with other fusion options than those on screen
  (changes made while a job ran are then applied by one more re-fusion);
- self_test_phantom: the synthetic chest CT with a nodule that the module's self-test explains.
"""
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .model_cards import read_json_object

# MONAI's defaults when a card's network args leave them out (monai.networks.nets.ViT / UNETR / ViTAutoEnc;
# SwinUNETR: depths 2-2-2-2 = 8 blocks, num_heads 3-6-12-24: a single head index must exist in every stage)
DEFAULT_LAYERS_HEADS = {"ViT": (12, 12), "UNETR": (12, 12), "ViTAutoEnc": (12, 12), "SwinUNETR": (8, 3)}


class CardSummary(NamedTuple):
    classes: List[str]
    num_layers: Optional[int]
    num_heads: Optional[int]


def card_summary(card_path: Path) -> CardSummary:
    """Class names, layer count and head count of a model card (JSON only, no network is built).

    Unknown values are [] / None (e.g. a card without "classes"); an unreadable card raises
    AttentionMapError naming the file.
    """
    card = read_json_object(Path(card_path))  # size, depth and type checked as the worker checks them
    classes = card.get("classes")
    network = card.get("network") if isinstance(card.get("network"), dict) else {}
    args = network.get("args") if isinstance(network.get("args"), dict) else {}
    layers, heads = DEFAULT_LAYERS_HEADS.get(network.get("name"), (None, None))
    if isinstance(args.get("depths"), list) and all(isinstance(d, int) for d in args["depths"]):
        layers = sum(args["depths"])  # Swin: blocks across the stages
    heads = args.get("num_heads", heads)
    if isinstance(heads, list) and heads and all(isinstance(h, int) for h in heads):
        heads = min(heads)  # Swin: heads per stage
    layers = args.get("num_layers", layers)
    return CardSummary([str(c) for c in classes] if isinstance(classes, list) else [],
                       int(layers) if isinstance(layers, int) else None, int(heads) if isinstance(heads, int) else None)


def fusion_differs(attention: Any, options: Dict[str, Any], num_layers: int) -> bool:
    """True when ``attention`` (a worker.AttentionData) was not made with ``options`` (the fusion
    options on screen: method, layer (-1 = last), discard_ratio, normalize, query_ras)."""
    layer = options["layer"] % num_layers if num_layers else options["layer"]
    if (attention.method, attention.layer, attention.normalize) != (options["method"], layer, options["normalize"]):
        return True
    if abs(float(attention.discard_ratio) - float(options["discard_ratio"])) > 1e-9:
        return True
    made, shown = attention.query_ras, options.get("query_ras")
    if made is None or shown is None:
        return (made is None) != (shown is None)
    return not np.allclose(np.asarray(made, dtype=float), np.asarray(shown, dtype=float), atol=1e-6)


def self_test_phantom(seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small chest CT for the self-test: (array (I, J, K) float32 HU, ijk_to_ras (4, 4), nodule centre RAS (3,)).

    Lung parenchyma (-850 HU, Gaussian noise of 40 HU) inside a 9 mm chest wall (40 HU) on every side of each
    axial slice, with an 8 mm radius nodule (30 HU) off the centre, 100 x 84 x 44 voxels of 1.1 x 1.3 x 2.5 mm
    rotated 15 degrees about S (not axis-aligned, not isotropic, not cubic): lung as the demo model was trained
    on (its crops are lung), enclosed by a body, so the automatic lung field finds it (about 0.9 L).
    """
    rng = np.random.default_rng(seed)
    shape, spacing = (100, 84, 44), np.array([1.1, 1.3, 2.5])
    ijk_mm = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1) * spacing
    nodule = np.array(shape) * spacing / 2 + [-18.0, 10.0, 12.0]
    array = (-850.0 + rng.normal(0.0, 40.0, shape)).astype(np.float32)
    wall = np.ceil(9.0 / spacing[:2]).astype(int)
    array[: wall[0]], array[-wall[0]:], array[:, : wall[1]], array[:, -wall[1]:] = 40.0, 40.0, 40.0, 40.0
    array[np.linalg.norm(ijk_mm - nodule, axis=-1) < 8.0] = 30.0
    angle = np.radians(15)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                                   [0, 0, 1]]) @ np.diag(spacing)
    ijk_to_ras[:3, 3] = -ijk_to_ras[:3, :3] @ (np.array(shape) / 2)
    return array, ijk_to_ras, (ijk_to_ras @ np.append(nodule / spacing, 1.0))[:3]


def patch_size_mm(ijk_to_ras: np.ndarray) -> float:
    """The largest edge (mm) of one token's patch: the columns of a token grid's ijk_to_ras."""
    return float(np.max(np.linalg.norm(np.asarray(ijk_to_ras)[:3, :3], axis=0)))
