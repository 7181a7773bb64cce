"""Test-time views of the demo model's class probability: one pass, the 8 flips, the 8 flips + the 7 half-patch shifts.

    nice -n 5 .venv/bin/python -m benchmarks.view_averaging [--pairs 1000] [--threads 2] [--pointing] [--seed S]

Forward passes only (no attention), on the card's weights at T = 1: the first ``--pairs`` held-out pairs of
`demo_data.heldout_set` (the card's evaluation uses the first 200: the half-patch shifts were chosen on those, so
the pairs after them are reported apart as the confirmation; ``--seed`` draws other held-out pairs, none of
them the card's) and the lesion-free held-out windows of
`whole_scan.heldout_scan_windows`. Per design: AUC with its 95 % bootstrap interval over whole pairs, the AUC of
the pairs whose nodule radius is 3-7 mm, sensitivity and specificity at P > 0.5, and on the lesion-free windows the
share above 0.5, the mean of the 10 highest and the highest. With ``--pointing`` also the rollout pointing game of
the positives (`evaluate_demo_model.peak_hits`) per pair range, of maps averaged over the 8 flips, over the 8
flips and the 7 half-patch shifts (the card's map: each shifted view's map spread back onto the window's tokens,
`shifts.spread_back`), and over the window and its 7 shifts. Prints markdown tables (docs/TRAINING.md). Tens of
minutes on 2 cores for 1000 pairs (15 forward passes per crop, and 15 with attention per positive for
``--pointing``).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from attentionmap_dev import demo_data
from attentionmap_dev.whole_scan import heldout_scan_windows
from AttentionMapLib import explain
from AttentionMapLib.core.flips import mean_view_probabilities
from AttentionMapLib.core.views import window_views
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


def pair_ranges(card_pairs: int) -> Dict[str, slice]:
    """The pair ranges reported: all, and with ``card_pairs`` > 0 the card's first pairs and those after them."""
    if not card_pairs:
        return {"all": slice(None)}
    return {"all": slice(None), f"first {card_pairs} (the card's)": slice(0, card_pairs),
            f"after the first {card_pairs}": slice(card_pairs, None)}


def table(logits: np.ndarray, y: np.ndarray, radius: np.ndarray, windows: np.ndarray, card_pairs: int) -> List[str]:
    """Markdown rows per design and pair range; logits (15, N, 2) of the pairs, windows (15, M, 2)."""
    lines = ["| views | pairs | AUC (95 % interval) | AUC, 3-7 mm | sensitivity / specificity | lesion-free windows "
             "above 0.5 / top-10 mean / highest |", "|---|---|---|---|---|---|"]
    ranges = {label: slice(2 * (part.start or 0), None if part.stop is None else 2 * part.stop)
              for label, part in pair_ranges(card_pairs).items()}  # two crops per pair
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


def pointing_maps(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, np.ndarray]:
    """Unnormalised rollout maps (B, 6, 6, 6) of positives x averaged over three sets of the card's views
    (`views.window_views`, each view's map put back onto the window's tokens, `WindowView.unview`)."""
    views = window_views(DEFAULT_FLIP_AXES, True, (PATCH,) * 3)
    maps = np.stack([view.unview(explain(model, view.window(x), method="rollout", target=1, normalize="none").grid)
                     for view in views]).astype(np.float64)
    return {"8 flips": maps[:8].mean(axis=0), "8 flips + 7 half-patch shifts (the card's map)": maps.mean(axis=0),
            "the window + its 7 half-patch shifts": maps[[0, *range(8, len(views))]].mean(axis=0)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pointing", action="store_true", help="also the rollout pointing game of the positives")
    parser.add_argument("--seed", type=int, default=demo_data.HELDOUT_SEED,
                        help="held-out pairs drawn with this seed (default: the card's)")
    args = parser.parse_args(argv)
    card_pairs = CARD_PAIRS if args.seed == demo_data.HELDOUT_SEED else 0
    torch.set_num_threads(args.threads)
    model = load_model("demo", device="cpu").network
    cts = demo_data.load_demo_cts()
    logits, labels, radii, hits = [], [], [], {}
    for chunk in demo_data.heldout_batches(cts, args.pairs, seed=args.seed):
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
    print("\n".join(table(np.concatenate(logits, axis=1), np.concatenate(labels), np.concatenate(radii), windows,
                           card_pairs)))
    if hits:
        small = np.concatenate(radii)[np.concatenate(labels) == 1] <= SMALL_MM
        print("\n| rollout map | pairs | pointing | 3-7 mm |\n|---|---|---|---|")
        for name, parts in hits.items():
            hit = np.concatenate(parts)
            for label, part in pair_ranges(card_pairs).items():
                if len(hit[part]):
                    print(f"| {name} | {label}: {len(hit[part])} | {hit[part].mean():.3f} | "
                          f"{hit[part][small[part]].mean():.3f} ({int(small[part].sum())}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
