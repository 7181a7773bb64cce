"""Other synthetic lesion generators (`attentionmap_dev/lesions.py`): shapes, densities and slice blur; their
use in the crop sampler (training mixture) and in the held-out evaluation. Real pyradiomics lung CTs."""
import numpy as np
import pytest

from attentionmap_dev import demo_data, lesions

SHAPE = (64, 64, 64)
CENTRE = np.array([31.4, 30.7, 32.2])


def _equivalent_radius_mm(mask: np.ndarray) -> float:
    return float((3 * mask.sum() * demo_data.SPACING_MM ** 3 / (4 * np.pi)) ** (1 / 3))


@pytest.mark.parametrize("family", (lesions.VARIED,) + lesions.FAMILIES, ids=lambda f: f.name)
def test_every_family_draws_a_lesion_of_about_its_radius_inside_the_reach(family):
    rng = np.random.default_rng(4)
    for radius in (3.0, 8.0, 15.0):
        w = family.weight(SHAPE, CENTRE, radius, rng)
        assert w.dtype == np.float32 and w.shape == SHAPE and w.min() >= 0 and w.max() <= 1
        mask = w > 0.5
        assert mask.any(), f"{family.name}: no nodule voxel at radius {radius}"
        assert 0.35 * radius <= _equivalent_radius_mm(mask) <= 1.4 * radius
        # the lesion sits on its centre and nothing reaches beyond MAX_REACH_VOX (+1 for the box's far side)
        assert np.linalg.norm(np.argwhere(mask).mean(0) - CENTRE) < 0.4 * radius / demo_data.SPACING_MM + 1.5
        reach = np.abs(np.argwhere(w > 0) - np.floor(CENTRE)).max()
        assert reach <= demo_data.MAX_REACH_VOX + 1


def _family(name):
    return next(f for f in lesions.FAMILIES if f.name == name)


def test_shapes_differ_as_named():
    rng = np.random.default_rng(7)
    spiculated = _family("spiculated").weight(SHAPE, CENTRE, 10.0, rng)
    core = np.linalg.norm((np.argwhere(spiculated > 0.5) - CENTRE) * demo_data.SPACING_MM, axis=1)
    assert core.max() > 10.0, "spikes reach beyond the 8 mm core sphere"
    gauss = _family("Gaussian profile").weight(SHAPE, CENTRE, 10.0, rng)
    centre = tuple(np.round(CENTRE).astype(int))
    profile = gauss[centre[0], centre[1], centre[2]:]
    assert np.all(np.diff(profile[profile > 0]) < 0) and 0.3 < profile[3] < 0.95, "a smooth fall-off, no edge"
    sharp = _family("sharp solid ellipsoid")
    assert sharp.slice_blur == 0
    w = sharp.weight(SHAPE, CENTRE, 8.0, rng)
    edge = np.abs(np.diff(w, axis=2)).max()
    blurred = demo_data.slice_blur(w)
    assert edge > np.abs(np.diff(blurred, axis=2)).max(), "the sharp family is not blurred along K"


@pytest.mark.parametrize("density", sorted(lesions.DENSITY_HU))
def test_insert_blends_the_density_and_leaves_the_input_alone(density):
    lo, hi = lesions.DENSITY_HU[density]
    family = lesions.LesionFamily(density, ("ellipsoid",), (density,), 0.0, True)
    rng = np.random.default_rng(2)
    hu = np.full(SHAPE, -850.0, dtype=np.float32)
    before = hu.copy()
    w = family.weight(SHAPE, CENTRE, 10.0, rng)
    out = family.insert(hu, w, rng)
    assert np.array_equal(hu, before)
    core = out[w > 0.99]
    assert lo - 40 < np.median(core) < hi + 40
    assert np.array_equal(out[w == 0], hu[w == 0])


def test_varied_mixture_draws_every_density_and_shape():
    rng = np.random.default_rng(0)
    levels = []
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    for _ in range(60):
        w = lesions.VARIED.weight(SHAPE, CENTRE, 9.0, rng)
        levels.append(float(np.median(lesions.VARIED.insert(hu, w, rng)[w >= w.max() - 0.05])))
    levels = np.array(levels)
    assert (levels < -400).any() and ((levels > -300) & (levels < 100)).any() and (levels > 200).any()
    assert set(lesions.VARIED.shapes) == {"ellipsoid", "lobulated"}
    assert not {f.shapes[0] for f in lesions.FAMILIES if not f.trained} & set(lesions.VARIED.shapes)


@pytest.fixture(scope="module")
def cts():
    return demo_data.load_demo_cts()


def test_sampler_uses_the_family_for_the_first_pairs_only_and_changes_nothing_without_it(cts):
    sampler = demo_data.CropSampler(cts, "train")
    calcified = _family("calcified")
    batch = sampler.batches(np.random.default_rng(5), 4, (10.0, 12.0), flip=False, lesion=calcified, lesion_pairs=2)
    hu = batch.images[:, 0] * 1400.0 - 1000.0  # the card's intensity window clips at 400 HU
    for i in range(4):
        core = np.percentile(hu[2 * i][batch.masks[2 * i]], 75)
        if i < 2:
            assert core > 180, "calcified nodules in the first pairs"
        else:
            assert core < 180, "the demo generator's solid nodules after them"
    plain = sampler.batches(np.random.default_rng(5), 4, flip=False)
    again = sampler.batches(np.random.default_rng(5), 4, flip=False, lesion=calcified, lesion_pairs=0)
    assert np.array_equal(plain.images, again.images) and np.array_equal(plain.masks, again.masks)


def test_heldout_family_pairs_sit_in_the_heldout_slabs(cts):
    chunk = next(demo_data.heldout_batches(cts, 4, lesion=_family("ground glass")))
    by_name = {ct.name: ct for ct in cts}
    for i in range(4):
        name, origin, mask = chunk.sources[2 * i], chunk.origins[2 * i], chunk.masks[2 * i]
        k = np.argwhere(mask)[:, 2].mean() + origin[2]
        lo, hi = demo_data.HELDOUT_SLABS[name]
        assert lo - demo_data.MAX_REACH_VOX <= k < hi + demo_data.MAX_REACH_VOX and name in by_name
        hu = chunk.images[2 * i, 0] * 1400.0 - 1000.0
        assert -760 < np.median(hu[mask]) < -340


@pytest.mark.evaluation  # the shipped model on every lesion family (15-25 s): `make test-evaluation`
def test_family_metrics_of_the_shipped_model_reach_the_evaluation_report(cts):
    from benchmarks.evaluate import lesion_family_report
    from tools.evaluate_demo_model import CARD_NAME, MODELS_DIR, lesion_family_metrics, load_shipped

    metrics = lesion_family_metrics(load_shipped(MODELS_DIR / CARD_NAME), cts, pairs=3)
    assert list(metrics) == [f.name for f in lesions.FAMILIES]
    for family in lesions.FAMILIES:
        m = metrics[family.name]
        assert m["pairs"] == 3 and m["in_training_mixture"] == family.trained
        assert all(0.0 <= m[k] <= 1.0 for k in ("auc", "sensitivity", "rollout_pointing_game",
                                                 "grad_rollout_pointing_game"))
    report = "\n".join(lesion_family_report(metrics, False))
    assert "this model was not trained with it" in report
    assert "| spiculated: spiculated; solid -300..100 HU (1/1); slice blur p=0.5; noise sd 0-30 HU | no | 3 |" in report
    assert report.count("\n| ") == len(lesions.FAMILIES) + 1


def test_weight_on_an_oblique_anisotropic_grid_sits_on_its_ras_centre_with_partial_volume():
    from AttentionMapLib.core.geometry import apply_affine, rotation

    affine = np.eye(4)
    affine[:3, :3] = np.asarray(rotation(2, 12.0)) @ np.asarray(rotation(0, 8.0)) @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-40.0, 25.0, -300.0]
    centre = apply_affine(affine, np.array([41.3, 37.8, 15.6]))
    shape = (90, 80, 32)
    for family in lesions.FAMILIES:
        w = family.weight_on_grid(shape, affine, centre, 9.0, np.random.default_rng(1))
        assert w.dtype == np.float32 and w.shape == shape and 0 <= w.min() and w.max() <= 1
        mask = w > 0.5
        assert np.linalg.norm(apply_affine(affine, np.argwhere(mask).mean(0)) - centre) < 3.0, family.name
        ras = apply_affine(affine, np.argwhere(w > 0).astype(float))
        assert np.linalg.norm(ras - centre, axis=1).max() <= lesions.REACH_MM + 1e-6
    sphere = lesions.LesionFamily("sphere", ("ellipsoid",), ("solid",), 0.0, True)
    vol = sphere.weight_on_grid(shape, affine, centre, 9.0, np.random.default_rng(2)).sum() * 0.7 * 0.9 * 2.5
    assert 0.45 * 4 / 3 * np.pi * 9.0 ** 3 < vol < 2.1 * 4 / 3 * np.pi * 9.0 ** 3  # axes 0.8-1.25 x radius
    # a 10 mm slice through the middle of a 4 mm-radius lesion is only partly filled: averaged, not point-sampled
    thick = np.diag([0.5, 0.5, 10.0, 1.0])
    w = lesions.FAMILIES[-1].weight_on_grid((60, 60, 5), thick, [15.0, 15.0, 20.0], 4.0, np.random.default_rng(3))
    point = np.exp(-0.5 * 0.0)  # the Gaussian profile at its centre
    assert 0.3 < w[30, 30, 2] < 0.9 * point


def test_summarise_inserted_counts_by_family():
    from attentionmap_dev.whole_scan import summarise_inserted

    rows = [
        {"family": "a", "peak_patch_holds_tumour": True, "p_lesion": 0.9, "peak_to_tumour_mm": 0.0},
        {"family": "a", "peak_patch_holds_tumour": False, "p_lesion": 0.4, "peak_to_tumour_mm": 30.0},
        {"family": "b", "peak_patch_holds_tumour": True, "p_lesion": 0.6, "peak_to_tumour_mm": 2.0},
    ]
    rows[1]["peak_moved_mm"] = 12.5
    out = summarise_inserted(rows)
    assert out["a"] == {"lesions": 2, "peak_patch_holds_lesion": 1, "p_lesion_above_half": 1,
                        "median_peak_to_lesion_mm": 15.0, "largest_peak_move_mm": 12.5}
    assert out["all"] == {"lesions": 3, "peak_patch_holds_lesion": 2, "p_lesion_above_half": 2,
                          "median_peak_to_lesion_mm": 2.0, "largest_peak_move_mm": 12.5}


@pytest.mark.evaluation  # 3-7 min of the shipped model on whole scans: `make test-evaluation`, not `make test`
def test_inserted_lesions_in_the_lesion_free_slabs_with_the_shipped_model(cts):
    from attentionmap_dev import whole_scan
    from AttentionMapLib.core.geometry import apply_affine
    from AttentionMapLib.models import load_model
    from AttentionMapLib.sample_data import fetch_sample_data
    from benchmarks.evaluate import inserted_report

    loaded = load_model("demo")
    paths = fetch_sample_data()
    families = (_family("sharp solid ellipsoid"), _family("spiculated"))
    rows = whole_scan.inserted_lesion_rows(loaded, 1.0, paths, cts, log=lambda m: None, per_family=1,
                                           families=families)
    scans = ("lung1 below its tumour", "lung2 above its tumour")
    assert [(r["scan"], r["family"], r["regridding"]) for r in rows] == [
        row for scan in scans for row in
        [(scan, whole_scan.NO_LESION, kind) for kind in ("as shipped", "oblique")]
        + [(scan, f.name, kind) for f in families for kind in ("as shipped", "oblique")]]
    baseline = [r for r in rows if r["family"] == whole_scan.NO_LESION]
    assert all(0.0 <= r["p_lesion"] <= 1.0 and "peak_patch_holds_tumour" not in r for r in baseline)
    rows = [r for r in rows if r["family"] != whole_scan.NO_LESION]
    for shipped, oblique in zip(rows[::2], rows[1::2]):  # the same lesion on the re-gridded slab
        assert shipped["centre_ras_mm"] == oblique["centre_ras_mm"] and shipped["radius_mm"] == oblique["radius_mm"]
        assert shipped["peak_moved_mm"] == 0.0
        assert np.isclose(oblique["peak_moved_mm"],
                          np.linalg.norm(np.subtract(oblique["peak_ras_mm"], shipped["peak_ras_mm"])))
    free = whole_scan.lesion_free_scans(paths)
    s_range = {ct.name: ct.heldout_s_mm for ct in cts}
    for r in rows[::2]:
        lo, hi = s_range[r["scan"].split()[0]]
        assert lo <= r["centre_ras_mm"][2] <= hi
        array, affine = free[r["scan"]]
        ijk = np.round(np.linalg.solve(affine[:3, :3], np.asarray(r["centre_ras_mm"]) - affine[:3, 3])).astype(int)
        assert array[tuple(ijk)] < -400, "centred in lung"
        assert np.allclose(apply_affine(affine, ijk.astype(float)), r["centre_ras_mm"], atol=5.0)
        assert 5.0 <= r["radius_mm"] <= 15.0 and 0.0 <= r["p_lesion"] <= 1.0 and r["windows"] > 0
    report = "\n".join(inserted_report(baseline + rows))
    assert "| as shipped | all | 4 |" in report and "| oblique | spiculated | 2 |" in report
    assert f"- lung2 above its tumour, oblique: {baseline[-1]['p_lesion']:.3f}; peak at RAS (" in report


def test_training_with_the_varied_mixture_records_it_in_the_checkpoint_and_the_recipe(tmp_path):
    import torch

    from tools.evaluate_demo_model import recipe_text
    from tools.train_demo_model import main

    assert main(["--out-dir", str(tmp_path), "--threads", "1", "--max-samples", "16", "--pairs-per-batch", "2",
                 "--validation-pairs", "2", "--curriculum-samples", "0", "--warmup-samples", "4",
                 "--varied-fraction", "0.5", "--scan-negatives", "0"]) == 0
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["samples"] == 16 and checkpoint["phases"][0]["settings"]["varied_fraction"] == "0.5"
    assert "a share 0.5 of the pairs with a nodule from the mixture `lesions.VARIED`" in recipe_text(
        checkpoint["phases"], total=checkpoint["samples"])
