"""Make the extension's screenshot and icon from what Slicer's slice views would really draw.

A real chest CT (pyradiomics lung2, the whole scan) and its tumour label go into a slicer-core MRML scene; the
model explains the CT (with the card's default region, as `make demo` does); AttentionMapLib.mrml writes the
overlay node exactly as the module does; three window-less vtkMRMLSliceLogic views (axial, coronal, sagittal
through the tumour) composite CT + overlay + label outline, and their RGBA images are saved side by side. Nothing
is painted by hand.

    .venv/bin/python -m tools.make_slicer_screenshot [--model demo|CARD.json] [--data DIR]

Writes Resources/Screenshots/AttentionMap-lung2.png and Resources/Icons/AttentionMap.png (128 x 128,
also copied to AttentionMap/Resources/Icons/).
"""
import argparse
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VIEW_SIZE = 360


def _scene():
    from AttentionMapLib import mrml

    scene, app = mrml.headless_scene()
    views = [mrml.add_slice_view(scene, app, name, orientation)
             for name, orientation in (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal"))]
    return scene, app, views  # keep app alive: the slice logics do not hold a reference to it


def _add_volume(scene, array_ijk, ijk_to_ras, name, class_name="vtkMRMLScalarVolumeNode"):
    import slicer

    node = scene.AddNewNodeByClass(class_name, name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


def _render(logic, ras):
    from AttentionMapLib import mrml

    node = logic.GetSliceNode()
    node.SetDimensions(VIEW_SIZE, VIEW_SIZE, 1)
    logic.FitSliceToBackground()
    normal = np.array([node.GetSliceToRAS().GetElement(r, 2) for r in range(3)])
    logic.SetSliceOffset(float(normal @ ras))
    return mrml.render_slice(logic)[::-1, :, :3].copy()  # VTK rows go bottom-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", default=None, help="folder with lung2_image.nrrd and lung2_label.nrrd")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from AttentionMapLib import mrml
    from AttentionMapLib.core.calibration import card_temperature
    from AttentionMapLib.core.flips import card_flip_axes
    from AttentionMapLib.core.region import card_default_region
    from AttentionMapLib.core.shifts import card_shift_average
    from AttentionMapLib.core.volume import explain_volume
    from AttentionMapLib.io import read_volume
    from AttentionMapLib.models import load_model

    torch.set_num_threads(1)
    if args.data:
        data = Path(args.data)
        paths = {name: data / f"{name}.nrrd" for name in ("lung2_image", "lung2_label")}
    else:
        from AttentionMapLib.sample_data import fetch_sample_data

        paths = fetch_sample_data()
    image, image_affine = read_volume(paths["lung2_image"])
    label, label_affine = read_volume(paths["lung2_label"])

    scene, app, views = _scene()
    ct = _add_volume(scene, image.astype(np.float32), image_affine, "lung2 CT")
    display = ct.GetDisplayNode()
    display.SetAutoWindowLevel(0)
    display.SetWindowLevel(1500, -500)  # lung window
    tumour = _add_volume(scene, (label > 0).astype(np.uint8), label_affine, "tumour",
                         "vtkMRMLLabelMapVolumeNode")
    tumour.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeLabels")  # 0 transparent, 1 green

    model = load_model(args.model, device="cpu")
    array, ijk_to_ras = mrml.volume_to_array(ct)  # the whole scan, as in `make demo`, with the card's defaults
    attention = explain_volume(model.network, array, ijk_to_ras, model.preprocessing, img_size=model.img_size,
                               method="rollout", target=model.target, normalize="percentile",
                               region=card_default_region(model.card), temperature=card_temperature(model.card),
                               flip_axes=card_flip_axes(model.card), shift_average=card_shift_average(model.card))
    overlay = mrml.attention_to_volume(attention, scene, name="lung2 attention")
    mrml.configure_display(overlay, threshold=0.4)  # the module's defaults: threshold 0.4, opacity 0.5
    mrml.show_overlay(overlay, ct, opacity=0.5)
    peak = attention.peak_ras()
    centre = np.argwhere(label > 0).mean(axis=0)
    tumour_ras = (label_affine @ np.append(centre, 1.0))[:3]
    panels = []
    for logic in views:  # slices through the tumour, its outline drawn from the label
        logic.GetSliceCompositeNode().SetLabelVolumeID(tumour.GetID())
        logic.GetSliceNode().SetUseLabelOutline(True)
        panels.append(_render(logic, tumour_ras))
    screenshot = np.concatenate([np.pad(p, ((0, 0), (0, 4), (0, 0))) for p in panels], axis=1)[:, :-4]
    out = ROOT / "Resources" / "Screenshots" / "AttentionMap-lung2.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(screenshot).save(out)

    # icon: the axial view around the tumour, 128 x 128
    axial = panels[0]
    node = views[0].GetSliceNode()
    xy = np.linalg.solve(np.array([[node.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)]),
                         np.append(tumour_ras, 1.0))
    cx, cy = int(round(xy[0])), VIEW_SIZE - 1 - int(round(xy[1]))
    half = 64
    cx, cy = min(max(cx, half), VIEW_SIZE - half), min(max(cy, half), VIEW_SIZE - half)
    icon = ROOT / "Resources" / "Icons" / "AttentionMap.png"
    icon.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(axial[cy - half:cy + half, cx - half:cx + half]).save(icon)
    module_icon = ROOT / "AttentionMap" / "Resources" / "Icons" / "AttentionMap.png"
    module_icon.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(icon, module_icon)
    print(f"model {args.model}: {attention.prediction(model.classes)}, peak RAS {np.round(peak, 1)}, "
          f"tumour centroid {np.round(tumour_ras, 1)}, distance {np.linalg.norm(peak - tumour_ras):.1f} mm, "
          f"{attention.num_windows} windows")
    print(f"wrote {out} and {icon}")


if __name__ == "__main__":
    main()
