"""Test-time views of the demo model's class probability: one pass, the 8 flips, the 8 flips + the 7 half-patch shifts.

    nice -n 5 .venv/bin/python -m benchmarks.view_averaging [--pairs 1000] [--threads 2] [--pointing]

Forward passes only (no attention), on the card's weights at T = 1: the first ``--pairs`` held-out pairs of
`demo_data.heldout_set` (the card's evaluation uses the first 200: the half-patch shifts were chosen on those, so
the pairs after them are reported apart as the confirmation) and the lesion-free held-out windows of
`whole_scan.heldout_scan_windows`. Per design: AUC with its 95 % bootstrap interval over whole pairs, the AUC of
the pairs whose nodule radius is 3-7 mm, sensitivity and specificity at P > 0.5, and on the lesion-free windows the
share above 0.5, the mean of the 10 highest and the highest. With ``--pointing`` also the rollout pointing game of
the positives (`evaluate_demo_model.peak_hits`) per pair range: of the card's map (8 flips averaged; the card's shifts
change probabilities, not maps) and of two candidate maps that also average the shifted views' maps spread back onto
the window's tokens (`spread_back`). Prints markdown tables (docs/TRAINING.md). Tens of minutes on 2 cores for
1000 pairs (15 forward passes per crop, and 16 with attention per positive for ``--pointing``).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from attentionmap_dev import demo_data
from attentionmap_dev.whole_scan import heldout_scan_windows
from AttentionMapLib import explain
from AttentionMapLib.core.flips import explain_flip_averaged, mean_view_probabilities
from AttentionMapLib.core.shifts import half_patch_shifts, shift_window
from AttentionMapLib.models import load_model
from tools.evaluate_demo_model import DEFAULT_FLIP_AXES, PATCH, card_view_logits, peak_hits
from tools.train_demo_model import auc, auc_interval

DESIGNS = {"one pass": slice(0, 1), "8 flips": slice(0, 8), "8 flips + 7 half-patch shifts": slice(0, 15)}
SMALL_MM = 7.0
CARD_PAIRS = 200


def crop_rows(p: np.ndarray, y: np.ndarray, radius: np.ndarray) -> Dict[str, float]:
    """AUC (interval over whole pairs), small-nodule AUC, sensitivity and specificity of P(lesion) p (N,)."""
    pair = np.arange(len(y)) // 2
    small = np.isin(pair, pair[(y == 1) & (radius <= SMALL_MM)])
    low, high = auc_interval(p, y, pair)
    return {"pairs": len(y) // 2, "auc": auc(p, y), "low": low, "high": high, "small_auc": auc(p[small], y[small]),
            "small_pairs": int(small.sum()) // 2, "sensitivity": float((p[y == 1] > 0.5).mean()),
            "specificity": float((p[y == 0] <= 0.5).mean())}


def table(logits: np.ndarray, y: np.ndarray, radius: np.ndarray, windows: np.ndarray) -> List[str]:
    """Markdown rows per design and pair range; logits (15, N, 2) of the pairs, windows (15, M, 2)."""
    lines = ["| views | pairs | AUC (95 % interval) | AUC, 3-7 mm | sensitivity / specificity | lesion-free windows "
             "above 0.5 / top-10 mean / highest |", "|---|---|---|---|---|---|"]
    ranges = {"all": slice(None), f"first {CARD_PAIRS} (the card's)": slice(0, 2 * CARD_PAIRS),
              f"after the first {CARD_PAIRS}": slice(2 * CARD_PAIRS, None)}
    for name, views in DESIGNS.items():
        p = mean_view_probabilities(logits[views])[:, 1]
        w = np.sort(mean_view_probabilities(windows[views])[:, 1])
        free = f"{100 * (w > 0.5).mean():.1f} % / {w[-10:].mean():.3f} / {w[-1]:.3f}"
        for label, part in ranges.items():
            if len(y[part]) == 0:
                continue
            r = crop_rows(p[part], y[part], radius[part])
            lines.append(f"| {name} | {label}: {r['pairs']} | {r['auc']:.4f} ({r['low']:.3f}-{r['high']:.3f}) | "
                         f"{r['small_auc']:.3f} ({r['small_pairs']} pairs) | {r['sensitivity']:.3f} / "
                         f"{r['specificity']:.3f} | {free if label == 'all' else ''} |")
    return lines


def spread_back(grids: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """Token maps (B, n1, n2, n3) of a window whose content was moved by half a patch (`shifts.shift_window`,
    ``shift[a]`` voxels, 0 or patch // 2) put back onto the window's tokens: a shifted token covers half of the
    window's token t - 1 and half of token t along each moved axis, so its value goes half to each (the half
    beyond the window's low face is dropped)."""
    out = grids.astype(np.float64)
    for axis, amount in enumerate(shift):
        if amount:
            moved = 0.5 * out
            low = [slice(None)] * 4
            high = [slice(None)] * 4
            low[axis + 1], high[axis + 1] = slice(0, -1), slice(1, None)
            moved[tuple(low)] += 0.5 * out[tuple(high)]
            out = moved
    return out


def pointing_maps(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, np.ndarray]:
    """Unnormalised rollout maps (B, 6, 6, 6) of positives x: the card's (the mean over the 8 flips), and two
    candidates that also use the half-patch-shifted views' maps spread back (`spread_back`)."""
    flips, _ = explain_flip_averaged(model, x, DEFAULT_FLIP_AXES, normalize="none", method="rollout", target=1)
    plain = explain(model, x, method="rollout", target=1, normalize="none").grid.astype(np.float64)
    shifted = sum(spread_back(explain(model, shift_window(x, s), method="rollout", target=1, normalize="none").grid, s)
                  for s in half_patch_shifts((PATCH,) * 3))
    return {"8 flips (the card's map)": flips, "8 flips + 7 shifted maps": (8 * flips + shifted) / 15,
            "8 shifts (identity + 7 shifted maps)": (plain + shifted) / 8}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pointing", action="store_true", help="also the rollout pointing game of the positives")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model("demo", device="cpu").network
    cts = demo_data.load_demo_cts()
    logits, labels, radii, hits = [], [], [], {}
    for chunk in demo_data.heldout_batches(cts, args.pairs):
        logits.append(card_view_logits(model, chunk.images))
        labels.append(chunk.labels)
        radii.append(chunk.radii_mm)
        if args.pointing:
            pos = chunk.labels == 1
            tokens = demo_data.token_labels(chunk.masks[pos], PATCH)
            maps = pointing_maps(model, torch.from_numpy(np.ascontiguousarray(chunk.images[pos])))
            for name, grid in maps.items():
                hits.setdefault(name, []).append(peak_hits(grid, tokens)["hit"])
    windows = card_view_logits(model, heldout_scan_windows(cts)[0])
    print("\n".join(table(np.concatenate(logits, axis=1), np.concatenate(labels), np.concatenate(radii), windows)))
    if hits:
        small = np.concatenate(radii)[np.concatenate(labels) == 1] <= SMALL_MM
        print("\n| rollout map | pairs | pointing | 3-7 mm |\n|---|---|---|---|")
        for name, parts in hits.items():
            hit = np.concatenate(parts)
            for label, part in ((f"first {CARD_PAIRS}", slice(0, CARD_PAIRS)), (f"after the first {CARD_PAIRS}",
                                slice(CARD_PAIRS, None)), ("all", slice(None))):
                if len(hit[part]):
                    print(f"| {name} | {label}: {len(hit[part])} | {hit[part].mean():.3f} | "
                          f"{hit[part][small[part]].mean():.3f} ({int(small[part].sum())}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
