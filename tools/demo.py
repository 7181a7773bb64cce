"""What `make demo` runs: fetch the sample CTs, explain lung2 with the demo model, say where the peak is.

    python tools/demo.py [--model demo] [--case lung2] [--method rollout] [--output-dir demo-output] [--whole-scan]

Cuts the scan and its tumour label to the lung field (`<case>_lung_field.nrrd`, geometry kept; the demo
model knows only lung crops), then runs `attention-map run <case>_lung_field.nrrd --model demo --method
rollout --label <case>_lung_field_label.nrrd` (the CLI's own code, AttentionMapLib.cli), which writes
<case>_lung_field_attention.nrrd (the token grid with its geometry: load it over the CT in 3D Slicer),
<case>_lung_field_overlay.png and summary.json, then prints where they are and where the attention peak
lies relative to the tumour label. Exit status as the CLI's.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "AttentionMap"))  # works without pip install too

from AttentionMapLib.cli import main as attention_map  # noqa: E402
from AttentionMapLib.errors import AttentionMapError  # noqa: E402
from AttentionMapLib.sample_data import fetch_sample_data  # noqa: E402


def crop_to_lung_field(image: Path, label: Path, output_dir: Path) -> Tuple[Path, Path]:
    """Write the scan and its label cut to the lung field's bounding box (geometry kept) into `output_dir`.

    The demo model was trained on crops inside the lungs: windows over the neck, shoulders or air
    are outside what it has seen, and it answers "lesion" there with confidence (measured on the
    whole lung2 scan: the top windows reach P(lesion) 0.998 and take the peak).
    """
    from AttentionMapLib.demo_data import lung_field_box
    from AttentionMapLib.geometry import crop
    from AttentionMapLib.io import read_volume, write_volume

    array, ijk_to_ras = read_volume(image)
    mask, mask_ijk_to_ras = read_volume(label)
    start, stop = lung_field_box(array)
    output_dir.mkdir(parents=True, exist_ok=True)
    case = image.name.split("_image")[0]
    return (write_volume(output_dir / f"{case}_lung_field.nrrd", *crop(array, ijk_to_ras, start, stop)),
            write_volume(output_dir / f"{case}_lung_field_label.nrrd", *crop(mask, mask_ijk_to_ras, start, stop)))


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
    if case["probabilities"]:
        over = f" (each the highest of {case['num_windows']} windows)" if case["num_windows"] > 1 else ""
        lines.append(f"Model output{over}: " + ", ".join(f"P({c}) = {p:.2f}" for c, p in case["probabilities"].items()))
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
    parser.add_argument("--method", default="rollout", choices=("raw", "rollout", "grad_rollout"))
    parser.add_argument("--output-dir", default="demo-output", type=Path)
    parser.add_argument("--whole-scan", action="store_true",
                        help="explain the whole scan instead of the lung field's bounding box")
    args = parser.parse_args(argv)
    try:
        paths = fetch_sample_data()
        image, label = paths[f"{args.case}_image"], paths[f"{args.case}_label"]
        if not args.whole_scan:
            image, label = crop_to_lung_field(image, label, args.output_dir)
    except AttentionMapError as exc:
        print(f"demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    status = attention_map(["run", str(image), "--model", args.model, "--method", args.method,
                            "--label", str(label), "--output-dir", str(args.output_dir)])
    if status == 0:
        summary = json.loads((args.output_dir / "summary.json").read_text())
        print("\n".join(describe(summary)))
    return status


if __name__ == "__main__":
    sys.exit(main())
