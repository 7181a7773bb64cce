"""The demo card knows its domain: the automatic lung field is lungs, a scan without lungs is refused, and windows
unlike the training windows give no confident answer.

Phantoms (a chest above the diaphragm, an abdomen below it with bowel gas larger than the lungs) on oblique,
anisotropic, non-cubic grids; real scans of other body regions and modalities (the upper abdomen of lung2 cut out,
the InVesalius head CT, the pyradiomics MRs), as shipped and re-gridded, through the shipped demo card.
"""
import itertools
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib.cli import main
from AttentionMapLib.core.domain import card_domain, lung_fractions
from AttentionMapLib.core.geometry import apply_affine, rotation, voxel_spacing
from AttentionMapLib.core.preprocess import preprocess_volume
from AttentionMapLib.core.region import LungFieldRegion, NoLungsFound, find_lungs, hu_from_model_input, region_mask
from AttentionMapLib.core.volume import explain_volume, window_starts
from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.io import read_volume, write_volume

INTENSITY = {"a_min": -1000.0, "a_max": 400.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
IMG, PATCH = (32, 32, 32), (8, 8, 8)
PREP = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "intensity": INTENSITY,
        "spatial": {"mode": "sliding_window", "overlap": 0.5, "sw_batch_size": 8}}
DOMAIN = {"kind": "lung_content", "min_lung_fraction": 0.03, "hu_threshold": -400.0,
          "training": {"lung_volume_ml": [2809, 3840], "field_of_view_mm": [[292, 518], [292, 523], [240, 487]],
                       "intensity_hu_p1_p99": [-1013, 392]}}


def torso(shape=(150, 120, 70), spacing=(1.6, 1.7, 5.0), lungs=True, gas=True, seed=0):
    """A torso: body (40 HU) in air; above the diaphragm (S > 0 mm) two lungs of parenchyma (-850 HU with
    vessels, ~0.5 L each); below it bowel loops of gas (-1000 HU, more air in all than the lungs) in soft
    tissue. Stored with K inferior -> superior, rotated 10 degrees about A. Returns (hu, ijk_to_ras, lungs,
    gas) with the masks on the same grid."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = rotation(1, 10.0) @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ c
    s = apply_affine(affine, np.stack([i, j, k], axis=-1).reshape(-1, 3))[:, 2].reshape(shape)
    body = ((i - c[0]) / 70) ** 2 + ((j - c[1]) / 52) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 12, shape)
    lung = np.zeros(shape, bool)
    if lungs:
        for side in (-1, 1):
            lung |= (((i - c[0] - side * 33) / 27) ** 2 + ((j - c[1]) / 36) ** 2 < 1) & (s > 10) & (s < 70)
        hu[lung] = -850.0 + rng.normal(0, 40, int(lung.sum()))
        vessels = lung & (rng.random(shape) < 0.04)
        hu[vessels] = 30.0
        lung &= ~vessels
    bowel = np.zeros(shape, bool)
    if gas:
        for angle in np.linspace(0, 2 * np.pi, 7)[:-1]:  # six gas-filled loops around the abdomen
            ci, cj = c[0] + 38 * np.cos(angle), c[1] + 26 * np.sin(angle)
            bowel |= (((i - ci) / 16) ** 2 + ((j - cj) / 14) ** 2 < 1) & (s < -10) & (s > -150)
        hu[bowel] = -1000.0 + rng.normal(0, 8, int(bowel.sum()))
    return hu.astype(np.float32), affine, lung, bowel


def _model_input(hu, affine):
    image = preprocess_volume(hu, affine, PREP, IMG, PATCH)
    return image.as_tensor()[0].numpy(), image.affine.numpy()


def test_the_lungs_are_found_and_bowel_gas_larger_than_them_is_not_lung():
    hu, affine, lung, bowel = torso()
    volume_ml = np.prod(voxel_spacing(affine)) / 1000
    assert bowel.sum() > lung.sum()  # more gas below the diaphragm than air in the lungs
    found = find_lungs(hu, voxel_spacing(affine))
    assert (found & lung).sum() > 0.95 * lung.sum() and not (found & bowel).any()
    assert 800 < found.sum() * volume_ml < 1200
    # the lung field on the model input (2 mm, the scan's own tilted axes): the lungs' box, widened by the margin
    image, model_affine = _model_input(hu, affine)
    field = region_mask(LungFieldRegion(margin_mm=16.0), image, model_affine, INTENSITY)
    lungs_k = np.argwhere(find_lungs(hu_from_model_input(image, INTENSITY, "test"), voxel_spacing(model_affine)))[:, 2]
    field_k = np.argwhere(field)[:, 2]
    assert field_k.min() == max(lungs_k.min() - 8, 0) and field_k.max() == min(lungs_k.max() + 8, image.shape[2] - 1)
    gas_k = np.argwhere(np.isin(np.arange(image.shape[2]), field_k, invert=True))[:, 0]
    assert len(gas_k) > 0.4 * image.shape[2]  # the abdomen's slices (half the scan) are outside the field


@pytest.mark.parametrize("kind", ["abdomen", "sinuses", "mr"])
def test_a_scan_without_lungs_is_refused_naming_what_the_model_expects(kind):
    hu, affine, _, _ = torso(lungs=False)
    if kind == "sinuses":  # a head: small pockets of air
        hu = np.where(hu > -500, 40.0, -1000.0).astype(np.float32)
        hu[70:80, 60:70, 30:34] = -1000.0
    if kind == "mr":  # positive intensities only
        hu = np.abs(hu).astype(np.float32)
    image, model_affine = _model_input(hu, affine)
    with pytest.raises(NoLungsFound, match=r"no lungs found .*the model expects a chest CT"):
        region_mask(LungFieldRegion(), image, model_affine, INTENSITY)


def test_window_lung_fractions_equal_counting_each_window():
    rng = np.random.default_rng(2)
    lungs = rng.random((37, 29, 21)) > 0.6
    starts = np.array(list(itertools.product([0, 5, 13], [0, 7], [0, 3, 5])))
    window = (24, 22, 16)
    expected = [lungs[a:a + 24, b:b + 22, c:c + 16].mean() for a, b, c in starts]
    np.testing.assert_allclose(lung_fractions(lungs, starts, window), expected)


def test_card_domain_is_checked():
    domain = card_domain({"domain": DOMAIN})
    assert domain.min_lung_fraction == 0.03 and domain.field_of_view_mm[2] == (240.0, 487.0)
    assert card_domain({}) is None
    for bad, field in [({"kind": "anything"}, "lung_content"), ({**DOMAIN, "min_lung_fraction": 2}, "min_lung"),
                       ({**DOMAIN, "min_lung_fraction": True}, "min_lung"), ({**DOMAIN, "extra": 1}, "unknown"),
                       ({**DOMAIN, "training": {**DOMAIN["training"], "lung_volume_ml": [3, float("nan")]}},
                        "lung_volume"),
                       ({**DOMAIN, "training": {**DOMAIN["training"], "field_of_view_mm": [[1, 2]]}}, "field_of"),
                       ({**DOMAIN, "hu_threshold": "low"}, "hu_threshold")]:
        with pytest.raises(AttentionMapError, match=field):
            card_domain({"domain": bad}, "card.json")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return ViT(1, IMG, PATCH, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, classification=True,
               num_classes=2, post_activation=None).eval()


def test_only_windows_holding_lung_can_decide_and_the_input_is_compared_with_training(vit):
    hu, affine, lung, _ = torso()
    domain = card_domain({"domain": DOMAIN})
    result = explain_volume(vit, hu, affine, PREP, img_size=IMG, target=1, domain=domain)
    image, model_affine = _model_input(hu, affine)
    starts = np.array(list(itertools.product(*[window_starts(s, w, p, 0.5)
                                               for s, w, p in zip(image.shape, IMG, PATCH)])))
    lungs = find_lungs(hu_from_model_input(image, INTENSITY, "test"), voxel_spacing(model_affine))
    fractions = np.array([lungs[tuple(slice(a, a + w) for a, w in zip(s, IMG))].mean() for s in starts])
    assert np.array_equal(result.window_eligible, fractions >= 0.03)
    assert 0 < result.window_eligible.sum() < len(starts)  # the abdomen's windows hold no lung
    best = np.where(result.window_eligible, result.window_probabilities[:, 1], -1).argmax()
    assert result.decisive_window == best
    prediction = result.prediction(["no", "yes"])
    assert prediction["confident"] and prediction["probability"] == pytest.approx(result.window_probabilities[best, 1])
    assert "not counted" in prediction["rule"]
    report = prediction["domain"]
    assert report["windows_with_lung"] == int(result.window_eligible.sum())
    assert 800 < report["lungs_ml"] < 1200 and "lungs" in report["summary"]  # far less lung than the training scans
    json.dumps(prediction)  # plain data, as the worker sends it


def test_an_input_without_lungs_gets_no_confident_answer(vit):
    hu, affine, _, _ = torso(lungs=False)
    result = explain_volume(vit, hu, affine, PREP, img_size=IMG, target=1, domain=card_domain({"domain": DOMAIN}))
    prediction = result.prediction(["no", "yes"])
    assert prediction["probability"] is None and prediction["confident"] is False
    assert prediction["highest_probability_unlike_training"] == pytest.approx(result.window_probabilities[:, 1].max())
    assert prediction["rule"].startswith("no confident answer")
    assert prediction["domain"]["lungs_ml"] == 0 and prediction["domain"]["windows_with_lung"] == 0
    assert prediction["domain"]["summary"].startswith("unlike the training scans: no lungs")
    # without a domain, the same run answers as before
    plain = explain_volume(vit, hu, affine, PREP, img_size=IMG, target=1).prediction(["no", "yes"])
    assert plain["probability"] == pytest.approx(prediction["highest_probability_unlike_training"])
    assert "domain" not in plain


def test_the_cli_refuses_a_scan_without_lungs_and_states_an_answer_it_cannot_give(vit, tmp_path, capsys):
    hu, affine, _, _ = torso(lungs=False)
    write_volume(tmp_path / "abdomen.nrrd", hu.astype(np.int16), affine)
    folder = tmp_path / "card"
    folder.mkdir()
    torch.save(vit.state_dict(), folder / "weights.pt")
    args = {"in_channels": 1, "img_size": list(IMG), "patch_size": list(PATCH), "hidden_size": 32, "mlp_dim": 64,
            "num_layers": 2, "num_heads": 2, "classification": True, "num_classes": 2, "post_activation": None}
    card = {"network": {"name": "ViT", "args": args}, "weights": "weights.pt", "preprocessing": PREP,
            "classes": ["no lesion", "lesion"], "target": "lesion", "domain": DOMAIN,
            "default_region": {"kind": "lung_field"}}
    (folder / "card.json").write_text(json.dumps(card))
    run = ["run", str(tmp_path / "abdomen.nrrd"), "--model", str(folder / "card.json")]
    assert main(run + ["--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "no lungs found" in err and "chest CT" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    assert main(run + ["--roi", "none", "--output-dir", str(tmp_path / "b")]) == 0
    assert "no confident answer" in capsys.readouterr().err
    case = json.loads((tmp_path / "b" / "summary.json").read_text())["cases"][0]
    assert case["prediction"]["probability"] is None and case["prediction"]["domain"]["lungs_ml"] == 0


# ---- real scans through the shipped demo card -------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    from AttentionMapLib.models import load_model

    return load_model("demo")


def _regridded(array, affine, kind):
    """(array, ijk_to_ras) as shipped, or resampled onto an oblique (12 and 8 degrees) or anisotropic grid."""
    from attentionmap_dev.whole_scan import _regridded_array

    return (array, affine) if kind == "as shipped" else _regridded_array(array, affine, kind)


@pytest.fixture(scope="module")
def other_scans():
    """name -> (array, ijk_to_ras): lung2's upper abdomen (below its lungs and five slices of their bases), the
    head CT, the MRs; read once for the module (nothing here writes into them)."""
    from AttentionMapLib.sample_data import fetch_head_ct, fetch_sample_data

    paths = fetch_sample_data()
    array, affine = read_volume(paths["lung2_image"])
    lungs_k = np.argwhere(find_lungs(array.astype(np.float32), voxel_spacing(affine)))[:, 2]
    scans = {"lung2 upper abdomen": (array[:, :, : lungs_k.min() + 5].copy(), affine),  # and its lungs' bases
             "head CT": read_volume(fetch_head_ct())}
    for name in ("brain1", "brain2", "breast1"):
        scans[f"{name} MR"] = read_volume(paths[f"{name}_image"])
    return scans


@pytest.mark.parametrize("kind", ["as shipped", "oblique", "anisotropic"])
def test_other_body_regions_and_modalities_are_refused_by_the_demo_lung_field(demo, other_scans, kind):
    from AttentionMapLib.core.region import card_default_region

    for array, affine in other_scans.values():
        array, affine = _regridded(array, affine, kind)
        with pytest.raises(NoLungsFound, match="no lungs found"):
            explain_volume(demo.network, array, affine, demo.preprocessing, img_size=demo.img_size,
                           region=card_default_region(demo.card))


def test_the_demo_lung_field_of_lung2_leaves_its_stomach_gas_out():
    """lung2's upper abdomen holds a gas pocket larger than its lung bases (the stomach): not lung."""
    from AttentionMapLib.sample_data import fetch_sample_data

    array, affine = read_volume(fetch_sample_data()["lung2_image"])
    hu = array.astype(np.float32)
    lungs = find_lungs(hu, voxel_spacing(affine))
    from AttentionMapLib.core.region import enclosed_air

    pocket = 400.0 / np.prod(voxel_spacing(affine)[:2])
    air = enclosed_air(hu < -400, int(pocket), keep_fraction=0.0)
    gas = air & ~lungs
    assert np.median(hu[gas]) < -950 and gas.sum() * np.prod(voxel_spacing(affine)) / 1000 > 30
    assert np.argwhere(gas)[:, 2].min() < np.argwhere(lungs)[:, 2].min()  # it reaches below the lung bases


@pytest.mark.evaluation  # about 3 min of the shipped model with its 15 views: `make test-evaluation`, not `make test`
def test_with_no_region_the_other_scans_get_no_confident_lesion(demo, other_scans):
    """Switching the lung field off does not turn a scan of another body region or modality into a lesion: the
    answer is either below 0.5 or not a confident one, and the input statement says why."""
    from AttentionMapLib.core.calibration import card_temperature
    from AttentionMapLib.core.flips import card_flip_axes
    from AttentionMapLib.core.shifts import card_shift_average

    for name, (array, affine) in other_scans.items():
        result = explain_volume(demo.network, array, affine, demo.preprocessing, img_size=demo.img_size,
                                target=demo.target, temperature=card_temperature(demo.card),
                                flip_axes=card_flip_axes(demo.card), shift_average=card_shift_average(demo.card),
                                domain=card_domain(demo.card))
        prediction = result.prediction(demo.classes)
        assert prediction["probability"] is None or prediction["probability"] < 0.5, (name, prediction)
        assert prediction["domain"]["unlike_training"], name
