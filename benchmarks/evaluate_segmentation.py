"""'Why this segment' on the segmentation demo: attention maps against Grad-CAM and occlusion. Writes the
``segmentation`` section of docs/EVALUATION.md and docs/evaluation_segmentation.json.

    nice -n 5 .venv/bin/python -m benchmarks.evaluate_segmentation              # every case (about 15 min)
    .venv/bin/python -m benchmarks.evaluate_segmentation --pairs 2 --out /tmp/e  # a few cases, to try the script

Model: the card ``demo-segmentation`` (a MONAI SwinUNETR, 32^3 windows at 2 mm). Target of every map:
``SegmentTarget(nodule, segment)``, the segment being the lesion's true mask (what a user picks in Slicer's
segment selector): the gradient methods differentiate the nodule logit summed over the segment, the readout row of
the attention maps is the segment's tokens.

Cases (one model input each, with the lesion's mask on the same voxels):
- held-out synthetic nodules: the positive windows of ``tools.train_segmentation_demo.windows_of`` on the first
  ``--pairs`` pairs of ``demo_data.heldout_set`` (nodule centres in z-slabs no training window touches);
- the real tumours of lung1 / lung2 (never in training): a window centred on the label's centroid and six
  windows shifted by a quarter window along each axis, on the model-input grid (2 mm RAS).
Whole volumes (lung1, lung2 from their files): ``explain_volume`` with the card's sliding windows and the tumour
label as a ``MaskRegion`` (only the windows meeting it run), the map resampled onto the label's grid.

Maps on the first stage's token grid (16^3 tokens of 2^3 voxels; later stages spread onto it): ``raw`` (last block,
head mean), ``rollout``, ``grad_rollout`` (``AttentionMapLib.explain``); Grad-CAM (MONAI ``GradCAM`` on the input of
the last Swin block, the encoder's deepest stage), occlusion (MONAI ``OcclusionSensitivity``: the drop of the
segment's summed logit), random. Metrics: pointing game (the peak token holds segment voxels; within one token),
mass inside the segment and within ``AROUND_MM`` of it (each token's value over its voxels, min-max normalised), RISE
deletion / insertion AUC of the nodule's mean probability over the segment (``metrics.deletion_insertion`` with the
segment target), and the CPU seconds of each map.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from benchmarks import measure
from benchmarks.evaluate import (
    Case,
    Settings,
    _commit,
    _dilate,
    _pct,
    _to_voxels,
    mean_ci,
    paired,
    saved_result,
    settings_from_arguments,
    sign_test_p,
    wilson,
)
from tools.train_segmentation_demo import dice, windows_of

SECTION = "segmentation"
MAPS = ("raw", "rollout", "grad_rollout", "gradcam", "occlusion", "random")
ATTENTION = ("raw", "rollout", "grad_rollout")
LABELS = {"raw": "raw (last block)", "rollout": "rollout", "grad_rollout": "grad_rollout", "gradcam": "Grad-CAM",
          "occlusion": "occlusion", "random": "random"}
GROUPS = ("held-out synthetic nodules", "lung1 tumour windows", "lung2 tumour windows")
AROUND_MM = 8.0  # "around the segment": voxel centres within this distance of a segment voxel's centre
BASELINE_CASES = 8


def build_cases(cts, pairs: int, window: int) -> List[Case]:
    from attentionmap_dev import demo_data

    crops = demo_data.heldout_set(cts, pairs=pairs)
    images, labels = windows_of(crops, np.random.default_rng(0))
    cases = [Case(f"heldout-{i // 2:03d}", GROUPS[0], images[i], labels[i] > 0, float(crops.radii_mm[i]))
             for i in range(0, len(images), 2)]
    for ct in cts:
        centre = np.round(np.argwhere(ct.tumour).mean(axis=0)).astype(int)
        shift = window // 4
        offsets = [np.zeros(3, int)] + [sign * shift * np.eye(3, dtype=int)[a] for a in range(3) for sign in (-1, 1)]
        for offset in offsets:
            origin = np.clip(centre + offset - window // 2, 0, np.array(ct.hu.shape) - window)
            box = tuple(slice(o, o + window) for o in origin)
            mask = ct.tumour[box]
            if mask.any():
                label = "centred" if not offset.any() else "shift " + ",".join(f"{o:+d}" for o in offset)
                image = demo_data.scale_intensity(ct.hu[box])[None].astype(np.float32)
                cases.append(Case(f"{ct.name} {label}", GROUPS[1 + cts.index(ct)], image, mask.copy(), float("nan")))
    return cases


class Scorer:
    """The model and the baselines, built once; ``score(case)`` gives every map and metric of one case."""

    def __init__(self, settings: Settings):
        import torch

        from attentionmap_dev.baselines import GradCAM, OcclusionSensitivity
        from AttentionMapLib.core.engine import model_spec
        from AttentionMapLib.models import load_model

        torch.set_num_threads(settings.workers)  # one process, this many torch threads
        self.settings = settings
        self.loaded = load_model(settings.model)
        self.spec = model_spec(self.loaded.network, self.loaded.img_size)
        self.gradcam = GradCAM(self.loaded.network, "tokens")
        self.occlusion = OcclusionSensitivity(self.loaded.network, mask_size=[settings.occlusion_mask] * 3,
                                              overlap=settings.occlusion_overlap, mode="gaussian")

    def maps(self, index: int) -> Dict[str, Callable[[Any, Any], np.ndarray]]:
        from attentionmap_dev.baselines import RandomMap
        from AttentionMapLib import explain

        model = self.loaded.network
        functions: Dict[str, Callable[[Any, Any], np.ndarray]] = {
            m: (lambda x, t, m=m: explain(model, x, method=m, target=t).grid[0]) for m in ATTENTION}
        functions["gradcam"] = lambda x, t: self.gradcam(x, t)[0]
        functions["occlusion"] = lambda x, t: self.occlusion(x, t)[0]
        random_map = RandomMap(model, seed=self.settings.seed + index)
        functions["random"] = lambda x, t: random_map(x)[0]
        return functions

    def score(self, index: int, case: Case) -> Dict[str, Any]:
        import torch

        from AttentionMapLib import SegmentTarget
        from AttentionMapLib.core.metrics import deletion_insertion, mask_statistics, pointing_game, within_mm

        model, channel = self.loaded.network, int(self.loaded.target)
        x = torch.from_numpy(case.image[None])
        target = SegmentTarget(channel, case.mask)
        token = tuple(int(p) for p in self.spec.patch_size)
        grid = tuple(s // p for s, p in zip(case.mask.shape, token))
        tokens_mask = case.mask.reshape(grid[0], token[0], grid[1], token[1], grid[2], token[2]).any(axis=(1, 3, 5))
        spacing = np.diag(list(self.loaded.preprocessing["spacing"]) + [1.0])
        close = within_mm(case.mask, spacing, AROUND_MM)
        with torch.no_grad():
            probability = torch.softmax(model(x)[0].float(), dim=0)[channel].numpy()
        record: Dict[str, Any] = {
            "name": case.name, "group": case.group, "mask_voxels": int(case.mask.sum()),
            "volume_fraction": float(case.mask.mean()), "near_fraction": float(close.mean()),
            "dice": dice(probability > 0.5, case.mask), "p_segment": float(probability[case.mask].mean()),
            "chance_pointing": float(tokens_mask.mean()), "chance_pointing_1": float(_dilate(tokens_mask).mean()),
            "maps": {}}
        for name, function in self.maps(index).items():
            holder: Dict[str, np.ndarray] = {}
            wall, seconds = measure.timed(lambda holder=holder, f=function: holder.update(tokens=f(x, target)))
            tokens = self.spec.on_first_grid(holder["tokens"])  # raw of a later stage's block is on its grid
            voxels = _to_voxels(tokens, token)
            stats = mask_statistics(voxels, case.mask)
            total = float(voxels.sum())
            scores = deletion_insertion(model, x, tokens, target=target, steps=self.settings.steps,
                                        baseline=self.settings.baseline, batch_size=self.settings.steps + 1)
            record["maps"][name] = {
                "seconds": seconds, "wall_seconds": wall, "flat": bool(np.ptp(tokens) == 0),
                "pointing": pointing_game(tokens, tokens_mask), "pointing_1": pointing_game(tokens, tokens_mask, 1),
                "mass_fraction": stats["mass_fraction"], "mass_ratio": stats["mass_ratio"],
                "mass_around": float(voxels[close].sum() / total) if total > 0 else float("nan"),
                "deletion_auc": scores["deletion_auc"], "insertion_auc": scores["insertion_auc"]}
        return record

    def baseline_probabilities(self, cases: List[Case]) -> Dict[str, float]:
        """Mean P(nodule) over the segment of each fully replaced window (the end of a one-step deletion curve)."""
        import torch

        from AttentionMapLib import SegmentTarget
        from AttentionMapLib.core.metrics import BASELINES, deletion_insertion

        values: Dict[str, List[float]] = {"original": []}
        flat = np.ones(self.spec.grid_shape)
        for case in cases:
            x = torch.from_numpy(case.image[None])
            for mode in BASELINES:
                curve = deletion_insertion(self.loaded.network, x, flat, target=SegmentTarget(self.loaded.target,
                                           case.mask), steps=1, baseline=mode)["deletion_curve"]
                values.setdefault(mode, []).append(curve[-1])
            values["original"].append(curve[0])
        return {mode: float(np.mean(v)) for mode, v in values.items()}


def score_volumes(scorer: Scorer, paths: Dict[str, Path], log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Whole volumes: one sweep with gradients over the windows meeting the tumour, raw / rollout re-read from it."""
    return [row for name in ("lung1", "lung2") for row in volume_rows(scorer, name, paths, log)]


def volume_rows(scorer: Scorer, name: str, paths: Dict[str, Path], log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """The three attention maps of one whole volume against its tumour label, on the label's voxel grid."""
    from AttentionMapLib import SegmentTarget
    from AttentionMapLib.core.geometry import voxel_spacing
    from AttentionMapLib.core.metrics import distance_to_mask_mm, mask_statistics, pointing_game, within_mm
    from AttentionMapLib.core.region import MaskRegion
    from AttentionMapLib.core.volume import explain_volume
    from AttentionMapLib.io import read_volume

    loaded = scorer.loaded
    image, affine = read_volume(paths[f"{name}_image"])
    label, label_affine = read_volume(paths[f"{name}_label"])
    label = label > 0
    target = SegmentTarget(int(loaded.target), MaskRegion(label.astype(np.uint8), label_affine, "tumour label"))
    log(f"whole volume {name} ...")
    holder: Dict[str, Any] = {}
    sweep = measure.timed(lambda: holder.update(grad=explain_volume(
        loaded.network, image, affine, loaded.preprocessing, img_size=loaded.img_size, method="grad_rollout",
        target=target)))[1]
    grad = holder["grad"]
    results = {"grad_rollout": (grad, sweep)}
    for method in ("raw", "rollout"):
        seconds = measure.timed(lambda m=method: holder.update(result=grad.fuse_again(method=m)))[1]
        results[method] = (holder["result"], seconds)
    tolerance = np.ceil(voxel_spacing(grad.ijk_to_ras).max() / voxel_spacing(label_affine)).astype(int)
    close = within_mm(label, label_affine, AROUND_MM)
    own = grad.segmentation_on(label.shape, label_affine) == int(loaded.target)
    rows = []
    for method in ATTENTION:
        result, seconds = results[method]
        resampled = result.resample_to(label.shape, label_affine)
        stats = mask_statistics(resampled, label)
        rows.append({
            "case": name, "map": method, "seconds": seconds, "windows": result.num_windows,
            "pointing": stats["pointing_hit"], "pointing_1": pointing_game(resampled, label, tolerance),
            "peak_to_label_mm": distance_to_mask_mm(result.peak_ras(), label, label_affine)["nearest_mm"],
            "mass_fraction": stats["mass_fraction"], "mass_ratio": stats["mass_ratio"],
            "mass_around": float(resampled[close].sum() / resampled.sum()), "dice": dice(own, label)})
    return rows


# ----------------------------------------------------------------------------------------------- report
def summarise(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    summary = {}
    for name in MAPS:
        maps = [r["maps"][name] for r in records]
        n, hits, hits1 = len(maps), sum(m["pointing"] for m in maps), sum(m["pointing_1"] for m in maps)
        summary[name] = {"n": n, "pointing": hits / n, "pointing_ci": wilson(hits, n), "pointing_1": hits1 / n,
                         "pointing_1_ci": wilson(hits1, n),
                         **{key: mean_ci([m[key] for m in maps]) for key in
                            ("mass_fraction", "mass_ratio", "mass_around", "deletion_auc", "insertion_auc")},
                         "seconds": float(np.median([m["seconds"] for m in maps]))}
    return summary


def summary_table(summary: Dict[str, Dict[str, Any]]) -> List[str]:
    lines = ["| map | pointing game | within one token | mass inside | mass / volume fraction | mass within "
             f"{AROUND_MM:g} mm | deletion AUC ↓ | insertion AUC ↑ | CPU s per case |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in MAPS:
        s = summary[name]
        ci, ci1 = s["pointing_ci"], s["pointing_1_ci"]
        mean = {k: f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ("mass_fraction", "mass_around", "deletion_auc",
                                                               "insertion_auc")}
        lines.append(f"| {LABELS[name]} | {_pct(s['pointing'])} [{_pct(ci[0])}–{_pct(ci[1])}] | "
                     f"{_pct(s['pointing_1'])} [{_pct(ci1[0])}–{_pct(ci1[1])}] | {mean['mass_fraction']} | "
                     f"{s['mass_ratio'][0]:.2f} ± {s['mass_ratio'][1]:.2f} | {mean['mass_around']} | "
                     f"{mean['deletion_auc']} | {mean['insertion_auc']} | {s['seconds']:.3f} |")
    return lines


def reading(records: List[Dict[str, Any]], summary: Dict[str, Dict[str, Any]]) -> List[str]:
    """Best map per metric, and each attention map against Grad-CAM and occlusion case by case (sign tests)."""
    metrics = (("pointing", False, "pointing game"), ("mass_ratio", False, "mass ratio"),
               ("mass_around", False, f"mass within {AROUND_MM:g} mm"), ("deletion_auc", True, "deletion AUC"),
               ("insertion_auc", False, "insertion AUC"))
    lines = []
    for key, lower, label in metrics:
        ranked = sorted(MAPS, key=lambda n: summary[n][key] if key == "pointing" else summary[n][key][0],
                        reverse=not lower)
        lines.append(f"- {label}: best {LABELS[ranked[0]]}, then " + ", ".join(LABELS[n] for n in ranked[1:]) + ".")
    for method in ("rollout", "grad_rollout"):
        for baseline in ("gradcam", "occlusion"):
            parts = []
            for key, lower, label in metrics[1:]:
                wins, ties, losses = paired(records, method, baseline, key, lower)
                parts.append(f"{label} {wins} better / {losses} worse (p = {sign_test_p(wins, losses):.2g})")
            lines.append(f"- {LABELS[method]} vs {LABELS[baseline]}, per case: " + "; ".join(parts) + ".")
    return lines


def report(result: Dict[str, Any], command: str) -> str:
    s = Settings(**result["settings"])
    records, card = result["cases"], result["model"]
    probabilities = result.get("baseline_probabilities")
    choice = ("chosen on the command line" if not probabilities else
              "chosen as the most lesion-free reference: mean P(nodule) over the segment with the whole window "
              "replaced, on the first held-out windows: " + ", ".join(f"{m} {p:.2f}" for m, p in probabilities.items()
                                                                     if m != "original")
              + f" (the windows as they are: {probabilities['original']:.2f})")
    lines = [
        "## Why this segment: the segmentation demo (SwinUNETR)",
        "",
        f"Generated by `{command}` (commit {result['commit']}, {result['started']}, {result['minutes']:.0f} min, one "
        f"process with {s.workers} torch thread(s), on a shared 2-core machine). Do not edit by hand: rerun the "
        "command.",
        "",
        f"Model: `{s.model}` — {card['description']} Card metrics: held-out synthetic Dice mean "
        f"{card['metrics']['heldout_dice_mean']:.2f}; whole-scan Dice of the real tumours "
        + ", ".join(f"{k} {v['dice']:.2f}" for k, v in card["metrics"]["real_tumours"].items()) + ".",
        "",
        "- **Target**: `SegmentTarget(nodule, segment)`, the segment being the lesion's true mask (what a user picks "
        "in the module's segment selector). raw = the last Swin block's attention, heads averaged, read from the "
        "segment's tokens; rollout through the windows and stages; grad_rollout with the gradient of the nodule "
        "logit summed over the segment. Grad-CAM = MONAI `GradCAM` on the input of the last Swin block (the encoder's "
        "deepest stage, 2^3 tokens of 16 voxels, spread onto the first stage's grid) with the same summed-logit score; "
        f"occlusion = MONAI `OcclusionSensitivity`, {s.occlusion_mask}³-voxel boxes, overlap {s.occlusion_overlap}, "
        "Gaussian, importance = the drop of the summed logit, averaged per token; random = uniform noise.",
        f"- **Grid**: {card['grid']} tokens of {card['patch']} voxels (4 mm), min-max normalised. Pointing game: the "
        "peak token holds segment voxels (*within one token*: or one of its 26 neighbours). Mass: each token's value "
        f"spread over its voxels; inside the segment / in total, its ratio to the segment's share of the window, and "
        f"the mass within {AROUND_MM:g} mm of the segment (voxel centres within {AROUND_MM:g} mm of a segment "
        "voxel's, the segment included).",
        f"- **Deletion / insertion** (`metrics.deletion_insertion` with the segment target): tokens ordered by the "
        f"map, {s.steps} steps, the curve is the nodule's mean probability over the segment; baseline `{s.baseline}`, "
        f"{choice}. Lower deletion AUC / higher insertion AUC = the map ranks first what the segment's output uses.",
        "- **CPU s per case**: median CPU seconds of the map for one window.",
        "",
    ]
    for group in GROUPS:
        subset = [r for r in records if r["group"] == group]
        if not subset:
            continue
        lines += [f"### {group} (n = {len(subset)})", "",
                  f"Network on these windows: Dice mean {np.mean([r['dice'] for r in subset]):.2f}, nodule "
                  f"probability over the segment {np.mean([r['p_segment'] for r in subset]):.2f}. Chance: pointing "
                  f"{_pct(np.mean([r['chance_pointing'] for r in subset]))}, within one token "
                  f"{_pct(np.mean([r['chance_pointing_1'] for r in subset]))}; the segment is "
                  f"{np.mean([r['volume_fraction'] for r in subset]):.4f} of the window, the segment and "
                  f"{AROUND_MM:g} mm around it {np.mean([r['near_fraction'] for r in subset]):.3f}.", ""]
        flat = {LABELS[n]: sum(r["maps"][n].get("flat", False) for r in subset) for n in MAPS}
        flat_text = ", ".join(f"{name} {count}" for name, count in flat.items() if count)
        lines += summary_table(summarise(subset)) + [""]
        if flat_text:
            lines += [f"Flat maps (one value everywhere: no peak, so a pointing miss; mass undefined, left out of the "
                      f"mass means): {flat_text} of {len(subset)}.", ""]
    lines += ["### Whole volumes (sliding windows meeting the tumour)", "",
              "`explain_volume(..., target=SegmentTarget(nodule, MaskRegion(tumour label)))` on the scan as read from "
              "its file; one sweep with gradients, raw and rollout re-read from it (`fuse_again`). The map is "
              "resampled onto the label's grid; *within one token*: the peak within one token (4 mm) of the tumour; "
              "*Dice*: the network's own segmentation over those windows against the label.", "",
              "| volume | map | windows | peak in tumour | within one token | peak to tumour (mm) | mass inside | "
              f"mass / volume fraction | mass within {AROUND_MM:g} mm | Dice (windows run) | CPU s (sweep or "
              "re-read) |",
              "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["volumes"]:
        lines.append(f"| {r['case']} | {LABELS[r['map']]} | {r['windows']} | {'yes' if r['pointing'] else 'no'} | "
                     f"{'yes' if r['pointing_1'] else 'no'} | {r['peak_to_label_mm']:.1f} | {r['mass_fraction']:.3f} | "
                     f"{r['mass_ratio']:.1f} | {r['mass_around']:.3f} | {r['dice']:.2f} | {r['seconds']:.1f} |")
    synthetic = [r for r in records if r["group"] == GROUPS[0]]
    real = [r for r in records if r["group"] != GROUPS[0]]
    for label, subset in (("held-out synthetic nodules", synthetic), ("real-tumour windows (lung1 and lung2)", real)):
        if subset:
            lines += ["", f"Reading, {label} (computed from the cases above):", ""] + reading(subset, summarise(subset))
    lines += ["", "What this can and cannot say: one small demo network, trained on synthetic nodules in two "
              "patients' CTs; the real-tumour windows are 7 per patient and overlap one another (not independent). "
              "The maps explain the network's output, including where it segments poorly (the real tumours' Dice "
              "above): a faithful map of a poor segmentation is not a well-localised one.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def run(settings: Settings, log: Callable[[str], None] = print) -> Dict[str, Any]:
    from attentionmap_dev import demo_data
    from AttentionMapLib.sample_data import fetch_sample_data

    started, stamp, commit = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), _commit()
    scorer = Scorer(settings)
    paths = fetch_sample_data()
    cts = demo_data.load_demo_cts(paths)
    cases = build_cases(cts, settings.pairs, int(scorer.loaded.img_size[0]))
    probabilities = None
    if settings.baseline == "auto":
        probabilities = scorer.baseline_probabilities([c for c in cases if c.group == GROUPS[0]][:BASELINE_CASES])
        settings.baseline = min((m for m in probabilities if m != "original"), key=probabilities.get)
        log(f"deletion/insertion baseline: {settings.baseline} ({probabilities})")
    volumes = score_volumes(scorer, paths, log)
    records = []
    for index, case in enumerate(cases):
        records.append(scorer.score(index, case))
        if len(records) % 5 == 0:
            log(f"  {len(records)}/{len(cases)} cases, {(time.perf_counter() - started) / 60:.1f} min")
    card = scorer.loaded.card
    return {"settings": asdict(settings), "commit": commit, "started": stamp,
            "minutes": (time.perf_counter() - started) / 60.0, "machine": measure.machine_description(),
            "model": {"description": card.get("description", ""), "metrics": card.get("metrics", {}),
                      "grid": "x".join(map(str, scorer.spec.grid_shape)),
                      "patch": "x".join(map(str, scorer.spec.patch_size))},
            "baseline_probabilities": probabilities, "cases": records, "volumes": volumes}


def main(argv: Optional[List[str]] = None) -> int:
    settings, args = settings_from_arguments(
        argv, __doc__.splitlines()[0], ("demo-segmentation", "'demo-segmentation' or a segmentation card"),
        {"pairs": 40, "occlusion_mask": 8, "occlusion_overlap": 0.5},
        {"pairs": "held-out synthetic nodules to score",
         "baseline": "deletion/insertion baseline; auto: the lowest mean P(nodule) over the segment on the first "
                     f"{BASELINE_CASES} held-out windows",
         "occlusion_overlap": "occlusion box overlap (0.5: 4-voxel stride)",
         "workers": "torch threads (one process)"})
    command = "python -m benchmarks.evaluate_segmentation" + (
        f" --pairs {args.pairs}" if args.pairs != 40 else "") + (
        f" --model {args.model}" if args.model != "demo-segmentation" else "")
    result = saved_result(args, lambda: run(settings), "evaluation_segmentation.json")
    measure.replace_section(args.out / "EVALUATION.md", SECTION, report(result, command))
    print(f"wrote the {SECTION} section of {args.out / 'EVALUATION.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
