"""Demo model data and shipped model: synthetic nodules, crop sampling and the held-out split on the real
pyradiomics lung CTs, and the shipped weights reproducing the numbers their card records.

Needs the pyradiomics sample data (fetched once and cached by sample_data.fetch_sample_data).
"""
import json

import numpy as np
import pytest
import torch

from attentionmap_dev import demo_data
from AttentionMapLib import explain
from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.models import DEMO_CARD as CARD


@pytest.fixture(scope="module")
def cts():
    return demo_data.load_demo_cts()


@pytest.fixture(scope="module")
def card():
    return json.loads(CARD.read_text())


def test_nodule_weight_size_shape_and_blur():
    rng = np.random.default_rng(3)
    for radius in (3.0, 8.0, 15.0):
        centre = np.array([31.3, 30.6, 32.2])
        w = demo_data.nodule_weight((64, 64, 64), centre, radius, rng)
        assert w.dtype == np.float32 and w.min() >= 0 and w.max() <= 1
        mask = w > 0.5
        volume_mm3 = mask.sum() * demo_data.SPACING_MM ** 3
        equivalent_radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
        assert 0.7 * radius <= equivalent_radius <= 1.3 * radius
        assert np.allclose(np.argwhere(mask).mean(0), centre, atol=1.0)
        # nothing beyond the documented reach
        far = np.ones_like(mask)
        c = np.floor(centre).astype(int)
        r = demo_data.MAX_REACH_VOX
        far[c[0] - r : c[0] + r + 2, c[1] - r : c[1] + r + 2, c[2] - r : c[2] + r + 2] = False
        assert not w[far].any()
    # blurred along K only: the K profile through the centre is smoother than a hard edge
    w = demo_data.nodule_weight((64, 64, 64), (32, 32, 32), 10.0, np.random.default_rng(0))
    assert 0.05 < w[32, 32, :].max() - w[32, 32, :][w[32, 32, :] > 0.02].min()


def test_insert_nodule_changes_only_the_nodule_and_not_the_input():
    rng = np.random.default_rng(1)
    hu = np.full((64, 64, 64), -850.0, dtype=np.float32)
    before = hu.copy()
    w = demo_data.nodule_weight(hu.shape, (30, 34, 32), 9.0, rng)
    out = demo_data.insert_nodule(hu, w, rng)
    assert np.array_equal(hu, before)
    assert np.array_equal(out[w == 0], hu[w == 0])
    core = w > 0.99
    lo, hi = demo_data.NODULE_HU
    assert lo - 60 < out[core].mean() < hi + 60


def test_token_labels_match_the_mask():
    masks = np.zeros((2, 64, 64, 64), dtype=bool)
    masks[0, 17, 40, 63] = True
    tokens = demo_data.token_labels(masks)
    assert tokens.shape == (2, 8, 8, 8)
    assert tokens[0].sum() == 1 and tokens[0, 2, 5, 7] and not tokens[1].any()


def test_lung_mask_is_plausible(cts):
    for ct in cts:
        lung_ml = ct.lung.sum() * 8e-3
        assert 1500 < lung_ml < 8000, (ct.name, lung_ml)
        assert np.median(ct.hu[ct.lung]) < -700


def test_training_pairs_keep_tumours_and_heldout_slab_out(cts):
    sampler = demo_data.CropSampler(cts, "train")
    rng = np.random.default_rng(5)
    by_name = {ct.name: ct for ct in cts}
    for _ in range(12):
        pos, neg, mask, origin, name, radius = sampler.sample_pair(rng)
        ct = by_name[name]
        sl = tuple(slice(o, o + demo_data.CROP) for o in origin)
        assert np.array_equal(neg, ct.hu[sl])
        assert not ct.tumour[
            tuple(
                slice(max(o - demo_data.TUMOUR_MARGIN, 0), o + demo_data.CROP + demo_data.TUMOUR_MARGIN) for o in origin
            )
        ].any()
        changed = pos != neg
        assert mask.any() and np.all(changed[mask])
        centre_in_crop = np.argwhere(mask).mean(0)
        assert np.abs(np.argwhere(changed) - centre_in_crop).max() <= demo_data.MAX_REACH_VOX + 2
        centre = np.round(centre_in_crop).astype(int) + origin
        assert ct.lung[tuple(centre)]
        z0, z1 = demo_data.HELDOUT_SLABS[name]
        k = np.argwhere(mask)[:, 2] + origin[2]
        assert np.all((k < z0) | (k >= z1)), "a training nodule touches the held-out slab"
        assert 3.0 <= radius <= 15.0


def test_heldout_set_is_deterministic_and_in_its_slab(cts):
    a = demo_data.heldout_set(cts, pairs=4)
    b = demo_data.heldout_set(cts, pairs=4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert a.images.shape == (8, 1) + (demo_data.CROP,) * 3 and a.images.min() >= 0 and a.images.max() <= 1
    assert a.labels.tolist() == [1, 0] * 4
    chunks = list(demo_data.heldout_batches(cts, pairs=4, chunk=3))
    assert np.array_equal(np.concatenate([c.images for c in chunks]), a.images)
    for i in range(0, 8, 2):
        z0, z1 = demo_data.HELDOUT_SLABS[a.sources[i]]
        centre_k = np.argwhere(a.masks[i])[:, 2].mean() + a.origins[i][2]
        assert z0 - 1 <= centre_k <= z1
        assert not a.masks[i + 1].any()


def test_bad_region_is_refused(cts):
    with pytest.raises(AttentionMapError, match="region"):
        demo_data.CropSampler(cts, "test")


def _shipped_network(card):
    from monai.networks.nets import ViT

    assert card["network"]["name"] == "ViT"
    net = ViT(**card["network"]["args"])
    weights = torch.load(CARD.parent / card["weights"], weights_only=True)
    net.load_state_dict({k: v.float() for k, v in weights.items()})
    return net.eval()


def test_card_matches_the_preprocessing_used_in_training(card):
    pre = card["preprocessing"]
    assert pre["orientation"] == "RAS" and pre["spacing"] == [demo_data.SPACING_MM] * 3
    assert (pre["intensity"]["a_min"], pre["intensity"]["a_max"]) == demo_data.HU_RANGE
    assert card["network"]["args"]["img_size"] == [demo_data.CROP] * 3
    assert card["classes"][card["target"]] == "lesion"
    assert (CARD.parent / card["weights"]).stat().st_size <= 20 * 2 ** 20


def test_card_rewrite_keeps_the_shipped_card_and_changes_only_what_it_is_given(card, tmp_path):
    """`update_card` with the card's own calibration and metrics writes the shipped file byte for byte (its
    description and inference defaults are the evaluation tool's); new metrics change the metrics alone."""
    from tools.evaluate_demo_model import evaluated_fields, update_card

    path = tmp_path / CARD.name
    path.write_text(CARD.read_text())
    assert update_card(path, card["metrics"], card["calibration"]).read_text() == CARD.read_text()
    update_card(path, {"auc": 0.5}, card["calibration"])
    rewritten = json.loads(path.read_text())
    assert list(rewritten) == list(card) and rewritten["metrics"] == {"auc": 0.5}
    assert {k: v for k, v in rewritten.items() if k != "metrics"} == {k: v for k, v in card.items() if k != "metrics"}
    assert set(evaluated_fields({}, {})) <= set(card)


def test_shipped_model_reproduces_its_card_on_the_fixed_subset(cts, card):
    """The card's numbers are of its default inference: every crop's map and probability averaged over the card's
    flips and half-patch shifts."""
    from AttentionMapLib.core.flips import card_flip_axes, mean_view_probabilities
    from AttentionMapLib.core.shifts import card_shift_average
    from AttentionMapLib.core.views import explain_views_averaged

    torch.set_num_threads(1)
    assert card_flip_axes(card) == (0, 1, 2) and card_shift_average(card)
    subset_card = card["metrics"]["heldout_subset"]
    subset = demo_data.heldout_set(cts, pairs=subset_card["pairs"])
    network, x = _shipped_network(card), torch.from_numpy(subset.images)
    grid, view_logits = explain_views_averaged(network, x, card_flip_axes(card), card_shift_average(card),
                                               method="rollout", target=1, normalize="none")
    assert view_logits.shape[0] == 15
    p = mean_view_probabilities(view_logits)[:, 1]
    assert np.allclose(p, subset_card["p_lesion"], atol=2e-3)
    assert grid.reshape(len(p), -1).argmax(1).tolist() == subset_card["rollout_peak_token"]
    plain = explain(network, x, method="rollout", target=1, normalize="none")  # the first of the 8 views
    assert np.allclose(view_logits[0], plain.logits.detach().numpy(), atol=1e-5)


def test_training_losses_with_and_without_the_attention_loss():
    from tools.train_demo_model import build_network, forward_losses

    torch.manual_seed(0)
    args = {"in_channels": 1, "img_size": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 32, "mlp_dim": 64,
            "num_layers": 2, "num_heads": 2, "classification": True, "num_classes": 2, "post_activation": None}
    model = build_network(args)
    head = torch.nn.Linear(32, 1)
    images = torch.rand(4, 1, 16, 16, 16)
    labels = torch.tensor([1, 0, 1, 0])
    nodule = torch.zeros(4, 8, dtype=torch.bool)
    nodule[0, 3] = nodule[2, 5] = True
    for weight in (0.0, 0.5):
        weights = {"token": 1.0, "token_pos_weight": 10.0, "cls_attention": weight}
        losses, logits = forward_losses(model, head, images, labels, nodule.float(), nodule, weights)
        assert logits.shape == (4, 2) and torch.isfinite(losses["total"])
        assert ("cls_attention" in losses) == (weight > 0)
        model.zero_grad()
        head.zero_grad()
        losses["total"].backward()
        assert head.weight.grad.abs().sum() > 0
        assert model.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0


def test_whole_scan_windows_are_what_inference_cuts(cts):
    """Windows of the whole-scan sampler equal windows of preprocess_volume's output (the card's chain on the
    file as read), at the same starts, padding included."""
    from AttentionMapLib.core.preprocess import preprocess_volume
    from AttentionMapLib.core.volume import window_starts
    from AttentionMapLib.io import read_volume
    from AttentionMapLib.sample_data import fetch_sample_data

    scans = demo_data.WholeScanSampler(cts, "train")
    array, affine = read_volume(fetch_sample_data()["lung1_image"])
    model_input = preprocess_volume(array, affine, demo_data.CARD_PREPROCESSING, (48,) * 3, (8,) * 3)[0].numpy()
    assert model_input.shape == scans.volumes[0].shape and np.array_equal(model_input, scans.volumes[0])
    axes = [window_starts(n, 48, 8, 0.5) for n in model_input.shape]
    grid = {tuple(s) for s in scans.inference_grid(0)}
    assert grid and grid <= {(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]}
    face = [s for s in grid if s[0] == 0 or s[0] == model_input.shape[0] - 48]
    assert face and (scans.volumes[0][0] == 0).all()  # the padded face: intensity 0 (= -1000 HU and below)


def test_whole_scan_negatives_keep_tumours_and_heldout_slabs_out(cts):
    rng = np.random.default_rng(3)
    for heldout in (None, ["lung1"]):
        train = demo_data.WholeScanSampler(cts, "train", heldout)
        names = [ct.name for ct in cts] if heldout is None else heldout
        for ci, ct in enumerate(cts):
            _, offset = demo_data.model_input_volume(ct)
            lo, hi = ct.tumour_box()
            z0, z1 = demo_data.HELDOUT_SLABS[ct.name]
            starts = [train.draw_start(rng, ci, kind) for kind in demo_data.WINDOW_KINDS for _ in range(20)]
            for start in starts:
                box = np.asarray(start) - offset, np.asarray(start) - offset + 48
                assert not np.all((box[0] < hi) & (box[1] > lo)), "a training window meets a tumour box"
                if ct.name in names:
                    assert box[1][2] <= z0 or box[0][2] >= z1, "a training window meets the held-out slab"
            assert any(s[2] + 48 > z0 + offset[2] and s[2] < z1 + offset[2] for s in starts) == (ct.name not in names)
    held = demo_data.WholeScanSampler(cts, "heldout", ["lung1"])
    assert [ct.name for ct in held.cts] == ["lung1"]
    z0, z1 = demo_data.HELDOUT_SLABS["lung1"]
    offset = demo_data.model_input_volume(cts[0])[1]
    assert all(s[2] + 48 > z0 + offset[2] and s[2] < z1 + offset[2] for s in held.inference_grid(0))
    batch = train.sample(rng, 6, hard=np.array([[1, 0, 0, 0]]), hard_fraction=1.0, jitter=0)
    assert batch.images.shape == (6, 1, 48, 48, 48) and not batch.labels.any() and not batch.masks.any()
    assert (batch.origins == 0).all() and batch.sources == ["lung2"] * 6


def _window_s_range(ct, offset, start):
    """S range (mm) of the voxel centres of the 48^3 window at `start` of `ct`'s padded model input, from all
    8 corners through the affine (the plain way, to check the sampler's vectorised test)."""
    corners = np.array([[a, b, c] for a in (0, 47) for b in (0, 47) for c in (0, 47)]) + np.asarray(start) - offset
    s = corners @ ct.ijk_to_ras[2, :3] + ct.ijk_to_ras[2, 3]
    return s.min(), s.max()


def test_regridded_scans_keep_the_geometry_the_tumour_and_the_heldout_slab_out(cts):
    from AttentionMapLib.core.geometry import apply_affine

    variants = demo_data.load_regridded_cts(cts[:1], 1, seed=5)
    lung1, variant = cts[0], variants[0]
    assert variant.name == "lung1~1" and variant.scan == "lung1" and variant.heldout_s_mm == lung1.heldout_s_mm
    assert not np.allclose(variant.ijk_to_ras[:3, :3], lung1.ijk_to_ras[:3, :3])  # an oblique grid
    shift = apply_affine(variant.ijk_to_ras, np.argwhere(variant.tumour).mean(0)) - apply_affine(
        lung1.ijk_to_ras, np.argwhere(lung1.tumour).mean(0))
    assert np.linalg.norm(shift) < 3.0, "the re-gridded tumour label must stay where it was (RAS mm)"
    assert abs(variant.lung.sum() / lung1.lung.sum() - 1) < 0.1
    rng = np.random.default_rng(8)
    train = demo_data.WholeScanSampler([lung1, variant], "train")
    slab_low, slab_high = lung1.heldout_s_mm
    for ci, ct in enumerate(train.cts):
        _, offset = demo_data.model_input_volume(ct)
        lo, hi = ct.tumour_box()
        for kind in demo_data.WINDOW_KINDS:
            for _ in range(20):
                start = train.draw_start(rng, ci, kind)
                s_low, s_high = _window_s_range(ct, offset, start)
                assert s_high < slab_low or s_low > slab_high, "a training window meets the held-out slab"
                box = np.asarray(start) - offset, np.asarray(start) - offset + 48
                assert not np.all((box[0] < hi) & (box[1] > lo)), "a training window meets a tumour box"
    held = demo_data.WholeScanSampler([variant], "heldout")
    _, offset = demo_data.model_input_volume(variant)
    grid = held.inference_grid(0)
    assert len(grid)
    for start in grid:
        s_low, s_high = _window_s_range(variant, offset, start)
        assert s_high >= slab_low - 1e-3 and s_low <= slab_high + 1e-3


def test_small_pairs_draw_small_nodules_and_leave_the_default_draw_unchanged(cts):
    sampler = demo_data.CropSampler(cts, "train")
    batch = sampler.batches(np.random.default_rng(5), 6, flip=False, small_pairs=4)
    radii = batch.radii_mm[0::2]
    lo, hi = demo_data.SMALL_RADIUS_MM
    assert np.all((radii[2:] >= lo) & (radii[2:] <= hi)) and np.all(batch.radii_mm[1::2] == 0)
    assert all(batch.masks[2 * i].sum() > 0 for i in range(6))
    plain = sampler.batches(np.random.default_rng(5), 6, flip=False)
    again = sampler.batches(np.random.default_rng(5), 6, flip=False, small_pairs=0)
    assert np.array_equal(plain.images, again.images) and np.array_equal(plain.radii_mm, again.radii_mm)


def test_recipe_names_the_small_nodule_varied_lesion_and_face_shares():
    from tools.evaluate_demo_model import recipe_text

    settings = {"cls_attention_weight": "0.0", "scan_negatives": "0", "curriculum_samples": "0", "threads": "2",
                "pairs_per_batch": "8", "wall_fraction": "0.25", "weight_decay": "0.05", "warmup_samples": "300",
                "lr": "5e-05", "token_weight": "1.0", "token_pos_weight": "10.0", "init_weights": "None"}
    assert "small nodule" not in recipe_text([{"from_samples": 0, "settings": settings}])
    text = recipe_text([{"from_samples": 0, "settings": {**settings, "small_fraction": "0.375"}}])
    assert "a share 0.375 of the pairs with a small nodule (radius 3-7 mm)" in text
    assert "lesions.VARIED" not in text
    text = recipe_text([{"from_samples": 0, "settings": {**settings, "varied_fraction": "0.5"}}])
    assert "a share 0.5 of the pairs with a nodule from the mixture `lesions.VARIED`" in text
    assert "ground glass -700..-400 HU (1/6)" in text and "slice blur p=0.5" in text
    assert "scan face" not in text
    text = recipe_text([{"from_samples": 0, "settings": {**settings, "face_fraction": "0.3"}}])
    assert "a share 0.3 of the pairs (both crops alike, clear of the nodule) and of the whole-scan windows cut" in text


def test_learning_rate_warms_up_then_stays_or_falls_to_zero():
    from tools.evaluate_demo_model import recipe_text
    from tools.train_demo_model import phase_lr_factor

    constant = [phase_lr_factor(n, 300, 0) for n in (0, 150, 300, 10**6)]
    assert constant == [0.0, 0.5, 1.0, 1.0]
    decaying = [phase_lr_factor(n, 300, 1000) for n in (150, 300, 500, 900, 1000, 2000)]
    assert np.allclose(decaying, [0.5, 0.7, 0.5, 0.1, 0.0, 0.0])
    settings = {"cls_attention_weight": "0.0", "scan_negatives": "0", "curriculum_samples": "0", "threads": "1",
                "pairs_per_batch": "8", "wall_fraction": "0.25", "weight_decay": "0.05", "warmup_samples": "300",
                "lr": "3e-05", "token_weight": "1.0", "token_pos_weight": "10.0", "init_weights": "None"}
    assert "then constant (no cosine)" in recipe_text([{"from_samples": 0, "settings": settings}])
    text = recipe_text([{"from_samples": 0, "settings": {**settings, "decay_samples": "110000"}}])
    assert "to lr 3e-05, then a linear fall to 0 at 110000 samples;" in text and "constant" not in text


def test_auc_interval_holds_the_estimate_narrows_with_more_pairs_and_resamples_whole_pairs():
    from tools.train_demo_model import auc, auc_interval

    rng = np.random.default_rng(3)

    def pairs(n):  # interleaved (with, without) as the held-out set: positives score higher on average
        scores = np.empty(2 * n)
        scores[0::2], scores[1::2] = rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)
        return scores, np.tile([1, 0], n), np.arange(2 * n) // 2

    scores, labels, groups = pairs(50)
    lo, hi = auc_interval(scores, labels, groups, draws=400)
    assert lo < auc(scores, labels) < hi and 0.5 < lo and hi < 1.0
    wide = hi - lo
    lo, hi = auc_interval(*pairs(800), draws=200)
    assert hi - lo < wide / 2  # the interval shrinks like 1 / sqrt(pairs)
    assert auc_interval(scores, labels, groups, draws=100) == auc_interval(scores, labels, groups, draws=100)
    separated = np.tile([1.0, 0.0], 20)
    assert auc_interval(separated, np.tile([1, 0], 20), np.arange(40) // 2, draws=50) == (1.0, 1.0)


def test_rim_nodules_sit_next_to_the_chest_wall_or_mediastinum(cts):
    sampler = demo_data.CropSampler(cts, "train")
    rng = np.random.default_rng(11)
    by_name = {ct.name: ct for ct in cts}
    for _ in range(6):
        pos, neg, mask, origin, name, _ = sampler.sample_pair(rng, wall_fraction=1.0)
        ct = by_name[name]
        centre = np.round(np.argwhere(mask).mean(0)).astype(int) + origin
        near = ct.lung[tuple(slice(max(c - 3, 0), c + 4) for c in centre)]
        assert ct.lung[tuple(centre)] or near.any()
        assert not near.all(), "a rim nodule should touch tissue outside the lung"


def test_automatic_lung_field_holds_the_lungs_and_both_tumours(cts):
    from AttentionMapLib.core.region import LungFieldRegion, region_mask

    for ct in cts:
        volume, offset = demo_data.model_input_volume(ct)
        affine = ct.ijk_to_ras.copy()
        affine[:3, 3] -= affine[:3, :3] @ offset
        field = region_mask(LungFieldRegion(margin_mm=4.0), volume, affine, demo_data.CARD_PREPROCESSING["intensity"])
        inside = field[tuple(slice(o, o + n) for o, n in zip(offset, ct.hu.shape))]
        assert inside[ct.lung].all() and inside[ct.tumour].all(), ct.name
        assert inside.mean() < 0.9  # it does cut something away
