"""What `make demo` runs: fetch the sample CTs, explain the whole lung2 scan with the demo model, say where the peak is.

    python -m tools.demo [--model demo] [--case lung2] [--method rollout] [--output-dir demo-output]
                         [--no-default-region]

Runs `attention-map run <case>_image.nrrd --model demo --method rollout --label <case>_label.nrrd` on the
whole scan as a user loads it (the CLI's own code, AttentionMapLib.cli). The demo card names a default
region, the automatic lung field (shown in the output; ``--no-default-region`` passes ``--roi none``).
It writes <case>_image_attention.nrrd (the token grid with its geometry: load it over the CT in 3D Slicer),
<case>_image_overlay.png and summary.json, then prints where they are, the volume-level P(lesion) and its
window, and where the attention peak lies relative to the tumour label. Exit status as the CLI's.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from AttentionMapLib.cli import main as attention_map
from AttentionMapLib.core.method_registry import method_names
from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.sample_data import fetch_sample_data


def describe(summary: Dict[str, Any]) -> List[str]:
    """Lines telling where the outputs are and where the peak lies relative to the tumour."""
    case = summary["cases"][0]
    label = case["label"]
    x, y, z = case["peak_ras_mm"]
    outputs = case["outputs"]
    lines = [
        f"Token grid {'x'.join(map(str, case['grid_shape']))} with its geometry (load over the CT in 3D Slicer): "
        f"{outputs['attention']}",
        f"Overlay (axial / coronal / sagittal through the peak, tumour outlined in cyan): {outputs['overlay']}",
        f"Summary: {Path(outputs['attention']).parent / 'summary.json'}",
    ]
    region = case.get("region")
    lines.append(f"Region: {region['description']}; {region['windows_run']} windows run, {region['windows_skipped']} "
                 "outside it skipped; the map is 0 outside it" if region else "Region: the whole scan")
    prediction = case.get("prediction")
    if prediction:
        x0, y0, z0 = prediction["window_centre_ras_mm"]
        lines.append(
            f"Volume-level P({prediction['class']}) = {prediction['probability']:.2f}: {prediction['rule']} "
            f"(temperature {prediction['temperature']:.2f}); that window is centred at RAS ({x0:.1f}, {y0:.1f}, "
            f"{z0:.1f}) mm"
        )
    where = ("INSIDE the tumour label" if label["peak_inside"] else
             f"outside the tumour label, {label['peak_to_nearest_label_voxel_mm']:.1f} mm from its nearest voxel")
    lines += [
        f"Attention peak ({summary['options']['method']}) at RAS ({x:.1f}, {y:.1f}, {z:.1f}) mm: {where}; "
        f"{label['peak_to_label_centroid_mm']:.1f} mm from the tumour centroid.",
        f"Attention mass inside the tumour: {100 * label['mass_fraction']:.1f} % for "
        f"{100 * label['volume_fraction']:.1f} % of the volume ({label['mass_ratio']:.1f} x a uniform map).",
    ]
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo', a model card .json, or a bundle folder")
    parser.add_argument("--case", default="lung2", choices=("lung1", "lung2"))
    parser.add_argument("--method", default="rollout", choices=method_names())
    parser.add_argument("--output-dir", default="demo-output", type=Path)
    parser.add_argument("--no-default-region", action="store_true",
                        help="explain the whole scan without the card's default region (--roi none)")
    args = parser.parse_args(argv)
    try:
        paths = fetch_sample_data()
        image, label = paths[f"{args.case}_image"], paths[f"{args.case}_label"]
    except AttentionMapError as exc:
        print(f"demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    status = attention_map(["run", str(image), "--model", args.model, "--method", args.method,
                            "--label", str(label), "--output-dir", str(args.output_dir)]
                           + (["--roi", "none"] if args.no_default_region else []))
    if status == 0:
        summary = json.loads((args.output_dir / "summary.json").read_text())
        print("\n".join(describe(summary)))
    return status


if __name__ == "__main__":
    sys.exit(main())
