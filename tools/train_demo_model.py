"""Train the demo lung-nodule ViT ("is there a lung nodule in this 48^3 crop at 2 mm?").

The shipped model came from these two commands (CPU, 2 shared cores; 80 min at lr 2e-4, then a
resumed 14 min at lr 6e-5; the card records samples and wall time):

    nohup nice -n 10 .venv/bin/python -m tools.train_demo_model --out-dir build/demo_training \\
        > build/demo_training.out 2>&1 &
    nohup nice -n 10 .venv/bin/python -m tools.train_demo_model --out-dir build/demo_training --resume --lr 6e-5 \\
        --minutes 14 > build/demo_training_phase2.out 2>&1 &

then the weights and the card are written from the final checkpoint by
``tools/evaluate_demo_model.py --checkpoint build/demo_training/checkpoint.pt --ship``.

Recipe (see docs in the model card): fixed seed; paired batches (every crop once with and once without
a synthetic nodule, same place); AdamW, linear warm-up then a constant learning rate (or, with
`--decay-samples`, a linear fall to 0); large-nodule curriculum (radius 8-15 mm for the first
`--curriculum-samples`, then 3-15 mm); random flips;
a per-patch auxiliary "token labelling" loss: a Linear head (lives only here, not shipped) on the last
block's patch tokens (after the ViT's final LayerNorm) predicts whether each 8^3 patch contains nodule.
Optional `--cls-attention-weight`: a loss pulling the last layer's CLS attention (head mean) onto the
nodule's patches for positives (off by default; it shapes the attention, and the card says so if used).

The network itself is a plain MONAI ViT; its classification head and attention are not changed.
Checkpoints (`checkpoint.pt`: model, token head, optimiser, counters, RNG) are written every
`--checkpoint-minutes` and at the end, so an interrupted run leaves a usable model; `--resume` continues.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from attentionmap_dev import demo_data, lesions, scan_faces
from AttentionMapLib.core.capture import hooked_attention
from AttentionMapLib.models import read_state_dict

NETWORK_ARGS: Dict[str, object] = {
    "in_channels": 1,
    "img_size": [demo_data.CROP] * 3,
    "patch_size": [8, 8, 8],
    "hidden_size": 96,
    "mlp_dim": 192,
    "num_layers": 4,
    "num_heads": 4,
    "proj_type": "conv",
    "classification": True,
    "num_classes": 2,
    "dropout_rate": 0.0,
    "post_activation": None,
}
VALIDATION_SEED = 7  # monitoring crops, drawn from the training region (never the held-out slab)


def build_network(args: Optional[Dict[str, object]] = None) -> torch.nn.Module:
    """The demo MONAI ViT from its keyword arguments (default `NETWORK_ARGS`)."""
    from monai.networks.nets import ViT

    return ViT(**(args or NETWORK_ARGS))


def patch_logits(model: torch.nn.Module, token_head: torch.nn.Module, hidden_last: torch.Tensor) -> torch.Tensor:
    """Token-labelling logits (B, n_patches) from the last block's output (B, 1 + n_patches, hidden)."""
    return token_head(model.norm(hidden_last[:, 1:])).squeeze(-1)


def forward_losses(model, token_head, images, labels, token_targets, nodule_tokens, weights):
    """Classification, token-labelling and (optional) CLS-attention losses for one batch: (losses dict, logits).

    images (B, 1, *img_size); labels (B,); token_targets (B, n_patches) float; nodule_tokens (B, n_patches) bool.
    """
    captured: List[torch.Tensor] = []
    if weights["cls_attention"] > 0:
        with hooked_attention(model, lambda i, a: captured.append(a) if i == model_layers(model) - 1 else None):
            logits, hidden = model(images)
    else:
        logits, hidden = model(images)
    losses = {"cls": torch.nn.functional.cross_entropy(logits, labels)}
    tok = patch_logits(model, token_head, hidden[-1])
    pos_weight = torch.tensor(weights["token_pos_weight"])
    losses["token"] = torch.nn.functional.binary_cross_entropy_with_logits(tok, token_targets, pos_weight=pos_weight)
    if captured:
        cls_row = captured[0][:, :, 0, 1:].mean(1)  # (B, n_patches)
        positive = labels == 1
        mass = (cls_row * nodule_tokens).sum(1)[positive]
        losses["cls_attention"] = -torch.log(mass + 1e-6).mean() if positive.any() else cls_row.sum() * 0
    losses["total"] = (
        losses["cls"]
        + weights["token"] * losses["token"]
        + weights["cls_attention"] * losses.get("cls_attention", torch.tensor(0.0))
    )
    return losses, logits


def model_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks."""
    return len(model.blocks)


def to_tensors(batch: demo_data.CropSet):
    tokens = demo_data.token_labels(batch.masks)
    n = tokens.shape[0]
    return (
        torch.from_numpy(batch.images),
        torch.from_numpy(batch.labels),
        torch.from_numpy(tokens.reshape(n, -1).astype(np.float32)),
        torch.from_numpy(tokens.reshape(n, -1)),
    )


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def auc_interval(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, draws: int = 2000,
                 level: float = 0.95, seed: int = 0) -> Tuple[float, float]:
    """Bootstrap interval of `auc` (percentile method): `draws` resamples of whole groups with replacement
    (groups (N,): one id per crop; the crops of a held-out pair, with and without its nodule, share one).
    O(draws * N^2) comparisons."""
    ids = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in ids]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        take = np.concatenate([members[g] for g in rng.integers(0, len(ids), len(ids))])
        values.append(auc(scores[take], labels[take]))
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


@torch.no_grad()
def validate(model, token_head, batch: demo_data.CropSet) -> Dict[str, float]:
    """Monitoring numbers on fixed training-region crops: AUC, accuracy, token-head hit, CLS-attention hit."""
    captured: List[torch.Tensor] = []
    images, labels, _, nodule_tokens = to_tensors(batch)
    last = model_layers(model) - 1
    probs, tok_hits, att_hits = [], [], []
    for s in range(0, len(labels), 16):
        with hooked_attention(model, lambda i, a: captured.append(a) if i == last else None):
            logits, hidden = model(images[s : s + 16])
        probs.append(torch.softmax(logits, 1)[:, 1])
        tok = patch_logits(model, token_head, hidden[-1])
        att = captured.pop()[:, :, 0, 1:].mean(1)
        nod = nodule_tokens[s : s + 16]
        pos = labels[s : s + 16] == 1
        tok_hits.append(nod[torch.arange(len(nod)), tok.argmax(1)][pos])
        att_hits.append(nod[torch.arange(len(nod)), att.argmax(1)][pos])
    p = torch.cat(probs).numpy()
    y = labels.numpy()
    return {
        "val_auc": auc(p, y),
        "val_acc": float(((p > 0.5) == (y == 1)).mean()),
        "val_token_peak_hit": float(torch.cat(tok_hits).float().mean()),
        "val_last_cls_attention_peak_hit": float(torch.cat(att_hits).float().mean()),
    }


@torch.no_grad()
def lesion_probabilities(model: torch.nn.Module, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """P(lesion) (N,) of the model (eval mode) for images float32 (N, 1, *img_size)."""
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        logits, _ = model(torch.from_numpy(np.ascontiguousarray(images[s : s + batch])))
        out.append(torch.softmax(logits.float(), 1)[:, 1])
    return torch.cat(out).numpy()


def mine_hard_negatives(model: torch.nn.Module, scans: demo_data.WholeScanSampler, stride: int,
                        threshold: float) -> np.ndarray:
    """False alarms of `model`: allowed whole-scan windows on a `stride`-voxel start grid and on the inference
    grid (whose last windows sit flush with the scan's faces) with P(lesion) > threshold.

    Returns int (H, 4) rows (scan index, start I, J, K), for `WholeScanSampler.sample(hard=...)`.
    """
    rows = []
    for ci, allowed in enumerate(scans.allowed):
        starts = np.unique(np.concatenate([np.argwhere(allowed[::stride, ::stride, ::stride]) * stride,
                                           scans.inference_grid(ci)]), axis=0)
        for s in range(0, len(starts), 64):
            chunk = starts[s : s + 64]
            images = np.stack([scans.window(ci, start) for start in chunk])[:, None]
            p = lesion_probabilities(model, images)
            rows += [(ci, *start) for start in chunk[p > threshold]]
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def phase_lr_factor(phase_samples: int, warmup: int, decay: int) -> float:
    """Learning-rate multiplier after `phase_samples` samples of a phase: linear warm-up over `warmup` samples, then
    1 (`decay` 0) or a linear fall to 0 at `decay` samples (the lower of the two ramps)."""
    factor = min(1.0, phase_samples / max(warmup, 1))
    if decay:
        factor = min(factor, max(0.0, 1.0 - phase_samples / decay))
    return factor


def save_checkpoint(path: Path, state: Dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("build/demo_training"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs-per-batch", type=int, default=8, help="batch = 2 x pairs crops")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-samples", type=int, default=1500)
    p.add_argument(
        "--decay-samples", type=int, default=0,
        help="after the warm-up, lower the learning rate linearly so that it reaches 0 at this many samples of the "
        "phase (counted from the phase's start, warm-up included), then stop (0: constant learning rate)",
    )
    p.add_argument("--curriculum-samples", type=int, default=6000, help="radius 8-15 mm until this many samples")
    p.add_argument(
        "--small-fraction", type=float, default=0.0,
        help="share of each step's nodule pairs drawn with radius 3-7 mm (after the curriculum)",
    )
    p.add_argument(
        "--varied-fraction", type=float, default=0.0,
        help="share of each step's nodule pairs drawn from attentionmap_dev.lesions.VARIED (other shapes, "
        "densities and slice blur) instead of the demo generator",
    )
    p.add_argument(
        "--face-fraction", type=float, default=0.0,
        help="share of the nodule pairs and of the whole-scan negatives cut by a random scan face "
        "(attentionmap_dev.scan_faces: a partial scan's border inside the body)",
    )
    p.add_argument("--max-samples", type=int, default=200000)
    p.add_argument("--minutes", type=float, default=80.0, help="wall-clock budget (stops early, checkpointed)")
    p.add_argument("--token-weight", type=float, default=1.0)
    p.add_argument("--token-pos-weight", type=float, default=10.0)
    p.add_argument("--cls-attention-weight", type=float, default=0.0)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--validation-pairs", type=int, default=32)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    p.add_argument("--init-weights", type=Path, default=None, help="start from these ViT weights (fine-tuning)")
    p.add_argument("--scan-negatives", type=int, default=0, help="whole-scan negative windows per step")
    p.add_argument(
        "--hard-fraction", type=float, default=0.5, help="share of whole-scan negatives from mined false alarms"
    )
    p.add_argument(
        "--wall-fraction", type=float, default=0.0, help="share of nodules on the lung rim (pleura, mediastinum)"
    )
    p.add_argument("--mine-stride", type=int, default=8, help="start grid (voxels) on which false alarms are mined")
    p.add_argument("--mine-threshold", type=float, default=0.5)
    p.add_argument(
        "--remine-minutes", type=float, default=0.0, help="mine again with the current model this often (0: once)"
    )
    p.add_argument("--regridded-scans", type=int, default=0,
                   help="whole-scan negatives also from this many random re-griddings of each scan")
    p.add_argument("--regrid-seed", type=int, default=1, help="seed of the re-griddings (same seed, same scans)")
    p.add_argument("--scan-heldout", nargs="+", default=None, metavar="CT",
                   help="scans whose held-out slab no whole-scan negative may meet (default: all)")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = a.out_dir / "train.log"
    ckpt_path = a.out_dir / "checkpoint.pt"

    cts = demo_data.load_demo_cts()
    sampler = demo_data.CropSampler(cts, "train")
    validation = sampler.batches(np.random.default_rng(VALIDATION_SEED), a.validation_pairs, flip=False)

    scan_cts = list(cts)
    if a.scan_negatives and a.regridded_scans:
        scan_cts += demo_data.load_regridded_cts(cts, a.regridded_scans, a.regrid_seed)
    scans = demo_data.WholeScanSampler(scan_cts, "train", a.scan_heldout) if a.scan_negatives else None
    scan_validation = (
        scans.sample(np.random.default_rng(VALIDATION_SEED), 4 * a.validation_pairs, flip=False) if scans else None
    )

    model = build_network()
    if a.init_weights is not None:
        model.load_state_dict(read_state_dict(a.init_weights))
    token_head = torch.nn.Linear(NETWORK_ARGS["hidden_size"], 1)
    params = list(model.parameters()) + list(token_head.parameters())
    optimiser = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    rng = np.random.default_rng(a.seed)
    samples, step, elapsed_before = 0, 0, 0.0
    phases: List[Dict[str, object]] = []
    if a.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        token_head.load_state_dict(state["token_head"])
        optimiser.load_state_dict(state["optimiser"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        samples, step, elapsed_before = state["samples"], state["step"], state["wall_time_s"]
        phases = state.get("phases", [])
    hard = None  # mined at the start of every phase (a resumed phase may change the allowed windows)
    phases.append({"from_samples": samples, "argv": sys.argv[1:], "settings": {k: str(v) for k, v in vars(a).items()}})
    weights = {"token": a.token_weight, "token_pos_weight": a.token_pos_weight, "cls_attention": a.cls_attention_weight}

    def state_dict() -> Dict[str, object]:
        return {
            "model": model.state_dict(),
            "token_head": token_head.state_dict(),
            "optimiser": optimiser.state_dict(),
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "samples": samples,
            "step": step,
            "wall_time_s": elapsed_before + time.time() - start,
            "network_args": NETWORK_ARGS,
            "phases": phases,
            "seed": a.seed,
            "hard_negatives": torch.from_numpy(hard if hard is not None else np.zeros((0, 4), dtype=np.int64)),
        }

    start = time.time()
    last_ckpt = start
    last_mine = start
    running: Dict[str, float] = {}
    batch_size = 2 * a.pairs_per_batch + a.scan_negatives
    samples_at_start = samples
    with open(log_path, "a") as log:

        def mine() -> np.ndarray:
            t = time.time()
            rows = mine_hard_negatives(model, scans, a.mine_stride, a.mine_threshold)
            counts = {ct.name: int((rows[:, 0] == i).sum()) for i, ct in enumerate(scans.cts)}
            log.write(json.dumps({"step": step, "samples": samples, "mined_false_alarms": counts,
                                  "mine_s": round(time.time() - t, 1)}) + "\n")
            log.flush()
            return rows

        if scans is not None and hard is None:
            hard = mine()
        while (samples < a.max_samples and time.time() - start < a.minutes * 60
               and not (a.decay_samples and samples - samples_at_start >= a.decay_samples)):
            radius = (8.0, demo_data.RADIUS_MM[1]) if samples < a.curriculum_samples else demo_data.RADIUS_MM
            lr = a.lr * phase_lr_factor(samples - samples_at_start + batch_size, a.warmup_samples, a.decay_samples)
            for group in optimiser.param_groups:
                group["lr"] = lr
            small = round(a.pairs_per_batch * a.small_fraction) if samples >= a.curriculum_samples else 0
            batch = sampler.batches(rng, a.pairs_per_batch, radius, wall_fraction=a.wall_fraction, small_pairs=small,
                                    lesion=lesions.VARIED, lesion_pairs=round(a.pairs_per_batch * a.varied_fraction))
            if a.face_fraction:
                batch = scan_faces.cut_faces(batch, rng, a.face_fraction, group=2)
            if scans is not None:
                negatives = scans.sample(rng, a.scan_negatives, hard, a.hard_fraction)
                if a.face_fraction:
                    negatives = scan_faces.cut_faces(negatives, rng, a.face_fraction)
                batch = demo_data.concatenate([batch, negatives])
            images, labels, token_targets, nodule_tokens = to_tensors(batch)
            model.train()
            losses, _ = forward_losses(model, token_head, images, labels, token_targets, nodule_tokens, weights)
            optimiser.zero_grad()
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            samples += batch_size
            step += 1
            for k, v in losses.items():
                running[k] = 0.98 * running.get(k, float(v.detach())) + 0.02 * float(v.detach())
            now = time.time()
            if step % 25 == 0:
                rate = samples / max(elapsed_before + now - start, 1e-9)
                line = {"step": step, "samples": samples, "lr": lr, "wall_s": round(elapsed_before + now - start, 1)}
                line.update({f"loss_{k}": round(v, 4) for k, v in running.items()})
                line["samples_per_s"] = round(rate, 2)
                log.write(json.dumps(line) + "\n")
                log.flush()
            if scans is not None and a.remine_minutes > 0 and now - last_mine > a.remine_minutes * 60:
                hard = mine()
                last_mine = time.time()
            if now - last_ckpt > a.checkpoint_minutes * 60:
                metrics = validate(model, token_head, validation)
                if scan_validation is not None:
                    p_scan = lesion_probabilities(model, scan_validation.images)
                    metrics["val_scan_false_alarm_rate"] = float((p_scan > 0.5).mean())
                log.write(json.dumps({"step": step, "samples": samples, **metrics}) + "\n")
                log.flush()
                save_checkpoint(ckpt_path, state_dict())
                last_ckpt = time.time()
        metrics = validate(model, token_head, validation)
        log.write(json.dumps({"step": step, "samples": samples, "final": True, **metrics}) + "\n")
        save_checkpoint(ckpt_path, state_dict())
    print(f"done: {samples} samples, {step} steps, checkpoint {ckpt_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
