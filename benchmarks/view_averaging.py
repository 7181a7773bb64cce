"""Test-time views of the demo model's class probability: one pass, the 8 flips, the 8 flips + the 7 half-patch shifts.

    nice -n 5 .venv/bin/python -m benchmarks.view_averaging [--pairs 1000] [--threads 2] [--pointing]

Forward passes only (no attention), on the card's weights at T = 1: the first ``--pairs`` held-out pairs of
`demo_data.heldout_set` (the card's evaluation uses the first 200: the half-patch shifts were chosen on those, so
the pairs after them are reported apart as the confirmation) and the lesion-free held-out windows of
`whole_scan.heldout_scan_windows`. Per design: AUC with its 95 % bootstrap interval over whole pairs, the AUC of
the pairs whose nodule radius is 3-7 mm, sensitivity and specificity at P > 0.5, and on the lesion-free windows the
share above 0.5, the mean of the 10 highest and the highest. With ``--pointing`` also the rollout pointing game of
the positives (the card's map: 8 flips averaged, `evaluate_demo_model.peak_hits`; the shifts do not change maps) per
pair range. Prints markdown tables (docs/TRAINING.md). Tens of minutes on 2 cores for 1000 pairs (15 forward
passes per crop, and 8 with attention per positive for ``--pointing``).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from attentionmap_dev import demo_data
from attentionmap_dev.whole_scan import heldout_scan_windows
from AttentionMapLib.core.flips import explain_flip_averaged, mean_view_probabilities
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pointing", action="store_true", help="also the rollout pointing game of the positives")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model("demo", device="cpu").network
    cts = demo_data.load_demo_cts()
    logits, labels, radii, hits = [], [], [], []
    for chunk in demo_data.heldout_batches(cts, args.pairs):
        logits.append(card_view_logits(model, chunk.images))
        labels.append(chunk.labels)
        radii.append(chunk.radii_mm)
        if args.pointing:
            pos = chunk.labels == 1
            grid, _ = explain_flip_averaged(model, torch.from_numpy(np.ascontiguousarray(chunk.images[pos])),
                                            DEFAULT_FLIP_AXES, normalize="none", method="rollout", target=1)
            hits.append(peak_hits(grid, demo_data.token_labels(chunk.masks[pos], PATCH))["hit"])
    windows = card_view_logits(model, heldout_scan_windows(cts)[0])
    print("\n".join(table(np.concatenate(logits, axis=1), np.concatenate(labels), np.concatenate(radii), windows)))
    if hits:
        hit = np.concatenate(hits)
        small = np.concatenate(radii)[np.concatenate(labels) == 1] <= SMALL_MM
        print("\n| rollout pointing (8 flips) | pairs | hit rate | 3-7 mm |\n|---|---|---|---|")
        for label, part in ((f"first {CARD_PAIRS}", slice(0, CARD_PAIRS)), (f"after the first {CARD_PAIRS}",
                            slice(CARD_PAIRS, None)), ("all", slice(None))):
            if len(hit[part]):
                print(f"| | {label}: {len(hit[part])} | {hit[part].mean():.3f} | {hit[part][small[part]].mean():.3f} "
                      f"({int(small[part].sum())}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
