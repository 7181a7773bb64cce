"""Train the demo lung-nodule SwinUNETR (segments synthetic and real nodules in 32^3 windows at 2 mm).

    nohup nice -n 5 .venv/bin/python -m tools.train_segmentation_demo --out-dir build/segmentation_training \\
        --minutes 40 > build/segmentation_training.out 2>&1 &
    .venv/bin/python -m tools.train_segmentation_demo --out-dir build/segmentation_training --evaluate --ship

Data: the classification demo's crops (`attentionmap_dev.demo_data.CropSampler`: lung1 / lung2 at 2 mm RAS, a
synthetic nodule of radius 3-15 mm inserted into lung parenchyma, 30 % on the lung's rim; each crop once with and
once without its nodule, so half the windows hold no nodule), cut to a random 32^3 window holding the whole
nodule; random flips; `--varied-fraction` of the pairs with a nodule of `lesions.VARIED` (lobulated, ground-glass,
calcified, sharp-edged) instead of the solid ellipsoid; `--scan-negatives` lesion-free windows per step cut from
anywhere in the whole scans (`demo_data.WholeScanSampler`: mediastinum, bone, the scan's faces), all background.
Crops never meet a widened real tumour box and never the held-out slabs. Network: MONAI
SwinUNETR, feature size 12, depths 2-2-2-2, 3 heads per stage, 4^3 windows, batch norm (a 32^3 input ends in a
1-voxel bottleneck, which instance norm refuses); DiceCE loss (Dice of the nodule channel only; per window, where a
window without nodule scores about 1 whatever it predicts, softmax never being exactly 0, so only cross-entropy
trains it; or, `--batch-dice`, over the whole batch as nnU-Net does, where its false positives enter the
denominator); AdamW, linear warm-up then a constant rate.
Checkpoints (`checkpoint.pt`: model, optimiser, counters, RNG) every `--checkpoint-minutes` and at the end;
`--resume` continues; `--init WEIGHTS.safetensors` starts a new run from weights (the shipped card's, to train on).

`--evaluate`: Dice of the held-out synthetic pairs (the classification demo's held-out slabs) and of lung1 /
lung2's real tumours over the whole scan (sliding windows over the card's default region, the lung field; the
network's own labels stitched as `explain_volume` does); `--ship` writes the weights and the card
(`demo_model/demo_lung_nodule_swinunetr.*`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from attentionmap_dev import demo_data, lesions

WINDOW = 32
NETWORK_ARGS: Dict[str, Any] = {"in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [2, 2, 2, 2],
                                "num_heads": [3, 3, 3, 3], "window_size": [4, 4, 4], "norm_name": "batch"}
CARD_PATH = Path(__file__).resolve().parent.parent / "AttentionMap" / "AttentionMapLib" / "demo_model"
CARD_NAME = "demo_lung_nodule_swinunetr"
LUNG_FIELD_ARGS = {"hu_threshold": -400.0, "margin_mm": 16.0}  # the card's default region: windows meeting the lungs


def build_network() -> torch.nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(**NETWORK_ARGS)


def windows_of(crops: demo_data.CropSet, rng: np.random.Generator) -> "tuple[np.ndarray, np.ndarray]":
    """(images (N, 1, 32, 32, 32), labels (N, 32, 32, 32) int64): each pair cut at one random offset that keeps
    the positive's whole nodule inside the window."""
    images, labels = [], []
    for pair in range(0, len(crops.labels), 2):
        found = np.argwhere(crops.masks[pair])
        low = np.maximum(found.max(0) + 1 - WINDOW, 0) if len(found) else np.zeros(3, int)
        high = np.minimum(found.min(0), demo_data.CROP - WINDOW) if len(found) else np.full(3, demo_data.CROP - WINDOW)
        origin = [int(rng.integers(lo, max(lo, hi) + 1)) for lo, hi in zip(low, high)]
        box = tuple(slice(o, o + WINDOW) for o in origin)
        for index in (pair, pair + 1):
            images.append(crops.images[index][(slice(None),) + box])
            labels.append(crops.masks[index][box].astype(np.int64))
    return np.stack(images), np.stack(labels)


def scan_windows(scans: demo_data.WholeScanSampler, rng: np.random.Generator,
                 n: int) -> "tuple[np.ndarray, np.ndarray]":
    """(images (n, 1, 32, 32, 32), labels (n, 32, 32, 32) all 0): a random 32^3 part of `n` lesion-free whole-scan
    windows."""
    crops = scans.sample(rng, n)
    images = []
    for image in crops.images:
        origin = rng.integers(0, demo_data.CROP - WINDOW + 1, size=3)
        images.append(image[(slice(None),) + tuple(slice(o, o + WINDOW) for o in origin)])
    return np.stack(images), np.zeros((n,) + (WINDOW,) * 3, dtype=np.int64)


def train(args: argparse.Namespace) -> None:
    from monai.losses import DiceCELoss

    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    torch.manual_seed(args.seed)
    network = build_network()
    optimiser = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    state: Dict[str, Any] = {"samples": 0, "steps": 0, "seconds": 0.0}
    if args.init:
        from safetensors.torch import load_file

        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(args.init).items()})
        card = Path(args.init).with_suffix(".json")  # the weights' own training counts carry over
        done = json.loads(card.read_text()).get("training", {}) if card.is_file() else {}
        state = {"samples": int(done.get("samples", 0)), "steps": int(done.get("steps", 0)),
                 "seconds": 60.0 * float(done.get("cpu_minutes", 0.0)), "phases": list(done.get("phases", []))}
    resumed = bool(args.resume and checkpoint_path.is_file())
    if resumed:
        saved = torch.load(checkpoint_path, weights_only=True)
        network.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        state = saved["state"]
    rng = np.random.default_rng(args.seed + state["steps"])
    if not resumed:  # a resumed run goes on with its phase
        state.setdefault("phases", []).append({"from_step": state["steps"], "lr": args.lr, "pairs": args.pairs,
                                               "varied_fraction": args.varied_fraction,
                                               "scan_negatives": args.scan_negatives,
                                               "batch_dice": args.batch_dice})
    phase_start = state["phases"][-1]["from_step"] if state.get("phases") else 0
    cts = demo_data.load_demo_cts()
    sampler = demo_data.CropSampler(cts, "train")
    scans = demo_data.WholeScanSampler(cts, "train") if args.scan_negatives else None
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=args.batch_dice)
    start, last_save, before = time.perf_counter(), time.perf_counter(), float(state["seconds"])
    network.train()
    losses: List[float] = []
    while time.perf_counter() - start < args.minutes * 60:
        crops = sampler.batches(rng, args.pairs, flip=True, wall_fraction=0.3, lesion=lesions.VARIED,
                                lesion_pairs=round(args.pairs * args.varied_fraction))
        images, labels = windows_of(crops, rng)
        if scans is not None:
            more = scan_windows(scans, rng, args.scan_negatives)
            images, labels = np.concatenate([images, more[0]]), np.concatenate([labels, more[1]])
        warm = min(1.0, (state["steps"] - phase_start + 1) / args.warmup_steps)  # each phase's fresh optimiser
        for group in optimiser.param_groups:
            group["lr"] = args.lr * warm
        logits = network(torch.from_numpy(images))
        loss = loss_fn(logits, torch.from_numpy(labels)[:, None])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        state["steps"] += 1
        state["samples"] += len(images)
        losses.append(float(loss.detach()))
        if state["steps"] % 10 == 0:
            print(f"step {state['steps']} samples {state['samples']} loss {np.mean(losses[-10:]):.4f} "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        if time.perf_counter() - last_save > args.checkpoint_minutes * 60:
            _save(checkpoint_path, network, optimiser, dict(state, seconds=before + time.perf_counter() - start))
            last_save = time.perf_counter()
    _save(checkpoint_path, network, optimiser, dict(state, seconds=before + time.perf_counter() - start))


def _save(path: Path, network, optimiser, state: Dict[str, Any]) -> None:
    """Written to a temporary name, then moved: an interrupted save leaves the previous checkpoint."""
    temporary = path.with_suffix(".tmp")
    torch.save({"model": network.state_dict(), "optimiser": optimiser.state_dict(), "state": state}, temporary)
    temporary.replace(path)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return float(2.0 * np.logical_and(prediction, truth).sum() / total) if total else 1.0


def evaluate(network: torch.nn.Module, pairs: int) -> Dict[str, Any]:
    """Dice on held-out synthetic pairs and on lung1 / lung2's real tumours (whole scans)."""
    from AttentionMapLib.core.region import LungFieldRegion
    from AttentionMapLib.core.volume import explain_volume

    network.eval()
    cts = demo_data.load_demo_cts()
    crops = demo_data.heldout_set(cts, pairs=pairs)
    images, labels = windows_of(crops, np.random.default_rng(0))
    with torch.no_grad():
        predicted = torch.cat([network(torch.from_numpy(images[i:i + 16])).argmax(1)
                               for i in range(0, len(images), 16)]).numpy().astype(bool)
    positives = [dice(p, t.astype(bool)) for p, t in zip(predicted[0::2], labels[0::2])]
    false_voxels = [int(p.sum()) for p in predicted[1::2]]
    real = {}
    preprocessing = {**demo_data.CARD_PREPROCESSING, "spatial": {"mode": "sliding_window", "overlap": 0.5,
                                                                 "sw_batch_size": 8}}
    for ct in cts:
        result = explain_volume(network, ct.hu, ct.ijk_to_ras, preprocessing, img_size=(WINDOW,) * 3,
                                method="rollout", keep_cache=False, region=LungFieldRegion(**LUNG_FIELD_ARGS))
        labels_on_ct = result.segmentation_on(ct.hu.shape, ct.ijk_to_ras) == 1
        real[ct.name] = {"dice": dice(labels_on_ct, ct.tumour), "tumour_voxels": int(ct.tumour.sum()),
                         "predicted_voxels": int(labels_on_ct.sum()),
                         "predicted_outside_tumour_voxels": int((labels_on_ct & ~ct.tumour).sum())}
    return {"heldout_pairs": pairs, "heldout_dice_mean": float(np.mean(positives)),
            "heldout_dice_median": float(np.median(positives)),
            "heldout_negative_windows_with_false_voxels": int(np.count_nonzero(false_voxels)),
            "heldout_false_voxels_mean": float(np.mean(false_voxels)), "real_tumours": real}


def half(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Floating-point tensors as float16 (loaded back into the float32 network as the values they round to)."""
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def ship(network: torch.nn.Module, metrics: Dict[str, Any], state: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(half(network.state_dict()), str(CARD_PATH / f"{CARD_NAME}.safetensors"))
    card = {
        "name": "Demo lung-nodule SwinUNETR",
        "description": "Demo MONAI SwinUNETR segmenting lung nodules in 32^3 windows at 2 mm (64 mm), trained on "
                       "synthetic nodules inserted into lung1 / lung2's lung parenchyma (pyradiomics sample data), "
                       "half the windows without a nodule; a demonstration model for 'why this segment' maps, not "
                       "a clinical tool. Run in sliding windows; the network's own labels are stitched over them.",
        "network": {"name": "SwinUNETR", "args": NETWORK_ARGS},
        "img_size": [WINDOW] * 3,
        "weights": f"{CARD_NAME}.safetensors",
        "preprocessing": {**demo_data.CARD_PREPROCESSING,
                          "spatial": {"mode": "sliding_window", "overlap": 0.5, "sw_batch_size": 8}},
        "classes": ["background", "nodule"],
        "target": "nodule",
        "default_region": {"kind": "lung_field", **LUNG_FIELD_ARGS},
        "training_data": "pyradiomics 3.0.1 sample data lung1 / lung2 (BSD-3), synthetic nodules; held-out slabs "
                         "and real tumours never seen in training",
        "training": {"samples": int(state["samples"]), "steps": int(state["steps"]),
                     "cpu_minutes": round(float(state["seconds"]) / 60.0, 1), "phases": state.get("phases", []),
                     "script": "tools/train_segmentation_demo.py"},
        "metrics": metrics,
    }
    (CARD_PATH / f"{CARD_NAME}.json").write_text(json.dumps(card, indent=2) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="build/segmentation_training")
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (2 windows each)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init", help="start from these weights (.safetensors, e.g. the shipped card's)")
    parser.add_argument("--varied-fraction", type=float, default=0.0,
                        help="share of the pairs with a nodule of lesions.VARIED")
    parser.add_argument("--scan-negatives", type=int, default=0, help="lesion-free whole-scan windows per step")
    parser.add_argument("--batch-dice", action="store_true",
                        help="Dice over the whole batch (nnU-Net's batch Dice) instead of per window")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the checkpoint instead of training")
    parser.add_argument("--heldout-pairs", type=int, default=64)
    parser.add_argument("--ship", action="store_true", help="with --evaluate: write the demo weights and card")
    args = parser.parse_args(argv)
    if not args.evaluate:
        train(args)
        return 0
    torch.set_num_threads(args.threads)
    saved = torch.load(Path(args.out_dir) / "checkpoint.pt", weights_only=True)
    network = build_network()
    network.load_state_dict(saved["model"])
    if args.ship:  # the shipped weights are float16 (half the file); the card's numbers are measured with them
        network.load_state_dict(half(network.state_dict()))
    metrics = evaluate(network, args.heldout_pairs)
    print(json.dumps(metrics, indent=1))
    if args.ship:
        ship(network, metrics, saved["state"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
