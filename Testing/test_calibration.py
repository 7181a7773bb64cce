"""Temperature scaling and expected calibration error against plain references written from the formulas."""
import math

import numpy as np
import pytest

from AttentionMapLib.core.calibration import (
    card_temperature,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)
from AttentionMapLib.errors import AttentionMapError


def _plain_nll(logits, labels, temperature):
    total = 0.0
    for row, label in zip(logits, labels):
        exps = [math.exp(v / temperature) for v in row]
        total -= math.log(exps[label] / sum(exps))
    return total / len(labels)


def test_fitted_temperature_minimises_the_plain_negative_log_likelihood():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(300, 3))
    labels = rng.integers(0, 3, size=300)
    labels[:150] = logits[:150].argmax(1)  # partly informative, over-confident logits
    fitted = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(-4, 4, 1601))
    plain = [_plain_nll(logits, labels, t) for t in grid]
    best = grid[int(np.argmin(plain))]
    assert abs(math.log(fitted) - math.log(best)) < 0.006
    assert _plain_nll(logits, labels, fitted) <= min(plain) + 1e-9
    assert negative_log_likelihood(logits, labels, fitted) == pytest.approx(
        _plain_nll(logits, labels, fitted), abs=1e-12
    )


def test_views_are_fitted_through_the_mean_of_their_softmaxes():
    rng = np.random.default_rng(2)
    views = rng.normal(0.0, 3.0, size=(4, 200, 2))  # 4 flipped views of 200 samples
    labels = rng.integers(0, 2, size=200)
    labels[:120] = views.mean(0)[:120].argmax(1)

    def plain(t):  # -mean log of the mean over views of softmax(view / t)[label], written out
        return -sum(math.log(sum(math.exp(v[n, y] / t) / sum(math.exp(x / t) for x in v[n]) for v in views) / 4)
                    for n, y in enumerate(labels)) / len(labels)

    assert negative_log_likelihood(views, labels, 1.3) == pytest.approx(plain(1.3), abs=1e-12)
    fitted = fit_temperature(views, labels)
    grid = np.exp(np.linspace(-4, 4, 801))
    values = [negative_log_likelihood(views, labels, t) for t in grid]
    assert abs(math.log(fitted) - math.log(grid[int(np.argmin(values))])) < 0.011
    assert negative_log_likelihood(views, labels, fitted) <= min(values) + 1e-9
    same = np.repeat(views[:1], 3, axis=0)  # identical views: the single-view fit
    assert fit_temperature(same, labels) == pytest.approx(fit_temperature(views[0], labels), rel=1e-5)
    with pytest.raises(AttentionMapError, match=r"expected logits \(N, K\) or views \(V, N, K\)"):
        fit_temperature(views, labels[:10])


def test_a_known_temperature_is_recovered():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0.0, 2.0, size=(20000, 2))
    p = softmax(true_logits)
    labels = (rng.random(20000) < p[:, 1]).astype(int)
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.08)
    assert fit_temperature(true_logits / 2.0, labels) == pytest.approx(0.5, rel=0.08)


def test_softmax_with_temperature_matches_the_formula():
    logits = np.array([[2.0, -1.0, 0.5]])
    expected = np.exp(logits / 1.7) / np.exp(logits / 1.7).sum()
    assert np.allclose(softmax(logits, 1.7), expected)


def test_expected_calibration_error_by_hand():
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.55])
    y = np.array([0, 0, 1, 0, 1])
    # one per bin: |0.05-0| + |0.15-0| + |0.95-1| + |0.85-0| + |0.55-1|, each with weight 1/5
    assert expected_calibration_error(p, y) == pytest.approx((0.05 + 0.15 + 0.05 + 0.85 + 0.45) / 5)
    # two in one bin: |mean(0.92, 1.0) - mean(1, 0)| * 2/2 (1.0 falls in the last bin)
    assert expected_calibration_error(np.array([0.92, 1.0]), np.array([1, 0])) == pytest.approx(abs(0.96 - 0.5))
    assert expected_calibration_error(np.array([0.3, 0.3, 0.3]), np.array([1, 0, 0])) == pytest.approx(abs(0.3 - 1 / 3))


def test_card_temperature_is_checked():
    assert card_temperature({}) == 1.0
    assert card_temperature({"calibration": {"temperature": 1.5, "ece": 0.02}}) == 1.5
    for bad in (0, -1.0, "2", True, float("nan"), None):
        with pytest.raises(AttentionMapError, match="calibration.temperature: expected a positive number"):
            card_temperature({"calibration": {"temperature": bad}}, "card.json")
    with pytest.raises(AttentionMapError, match="expected logits"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0))
