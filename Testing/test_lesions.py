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
    report = "\n".join(lesion_family_report(metrics))
    assert "| spiculated: spiculated; solid -300..100 HU (1/1); slice blur p=0.5; noise sd 0-30 HU | no | 3 |" in report
    assert report.count("\n| ") == len(lesions.FAMILIES) + 1
