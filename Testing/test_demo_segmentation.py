"""The shipped segmentation demo (a MONAI SwinUNETR, tools/train_segmentation_demo.py): its card loads and checks,
it segments held-out synthetic nodules as its card says, and "why this segment" reads its own nodule segment.

Needs the pyradiomics sample data (fetched once and cached by sample_data.fetch_sample_data)."""
import json

import numpy as np
import pytest
import torch

from attentionmap_dev import demo_data
from AttentionMapLib import SegmentTarget, explain, load_model
from AttentionMapLib.models import SEGMENTATION_DEMO_CARD as CARD
from tools.train_segmentation_demo import dice, windows_of

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded():
    return load_model("demo-segmentation")


@pytest.fixture(scope="module")
def heldout():
    crops = demo_data.heldout_set(demo_data.load_demo_cts(), pairs=8)
    return windows_of(crops, np.random.default_rng(0))


def test_the_card_names_a_swinunetr_and_its_measured_dice(loaded):
    from monai.networks.nets import SwinUNETR

    card = json.loads(CARD.read_text())
    assert isinstance(loaded.network, SwinUNETR) and loaded.img_size == (32, 32, 32)
    assert loaded.classes == ["background", "nodule"] and loaded.target == 1
    metrics = card["metrics"]
    assert set(metrics["real_tumours"]) == {"lung1", "lung2"} and 0.0 <= metrics["heldout_dice_mean"] <= 1.0


def test_it_segments_held_out_synthetic_nodules_as_its_card_says(loaded, heldout):
    images, labels = heldout
    with torch.no_grad():
        predicted = loaded.network(torch.from_numpy(images)).argmax(1).numpy().astype(bool)
    scores = [dice(p, t.astype(bool)) for p, t in zip(predicted[0::2], labels[0::2])]
    recorded = json.loads(CARD.read_text())["metrics"]["heldout_dice_mean"]
    assert np.mean(scores) > recorded - 0.2  # 8 of the card's 64 pairs: within sampling noise of its mean


def test_why_this_segment_reads_its_own_nodule(loaded, heldout):
    """grad_rollout of the network's own nodule segment on a held-out positive: a map on the 16^3 token grid
    whose peak lies within two tokens (8 mm) of the nodule."""
    images, labels = heldout
    with torch.no_grad():
        found = loaded.network(torch.from_numpy(images[0::2])).argmax(1).flatten(1).sum(1).numpy()
    best = 2 * int(found.argmax())  # the positive the network labels most of
    assert found.max() > 0
    x = torch.from_numpy(images[best:best + 1])
    result = explain(loaded.network, x, method="grad_rollout", target=SegmentTarget(1), normalize="none")
    assert result.grid.shape == (1, 16, 16, 16) and result.target == [1]
    peak = np.array(np.unravel_index(result.grid[0].argmax(), (16, 16, 16)))
    nodule_tokens = np.argwhere(labels[best]) // 2
    assert np.abs(nodule_tokens - peak).max(axis=1).min() <= 2
