"""Calibrated class probabilities: temperature scaling (Guo et al. 2017) and the expected calibration error.

A model card may carry ``"calibration": {"temperature": T, ...}``; window probabilities are then
``softmax(logits / T)``. T is fitted on held-out windows by minimising the negative log-likelihood
(`fit_temperature`); the expected calibration error (`expected_calibration_error`) says how far the
stated probabilities are from the observed frequencies.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from ..errors import AttentionMapError

_LOG_T_RANGE = (-4.0, 4.0)  # T in [e^-4, e^4] ~ [0.018, 55]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, float64; logits (..., K)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean -log softmax(logits / T)[label]; logits (N, K), labels (N,) int in 0..K-1."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(z)), np.asarray(labels, dtype=int)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tolerance: float = 1e-6) -> float:
    """The temperature T > 0 minimising `negative_log_likelihood` (golden-section search on log T in [-4, 4]).

    The NLL of temperature scaling is convex in 1/T, hence unimodal in log T, so the search finds its minimum.
    logits (N, K) float, labels (N,) int. Raises AttentionMapError for empty or mismatched input.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) == 0 or labels.shape != (len(logits),):
        raise AttentionMapError(
            f"fit_temperature: expected logits (N, K) and labels (N,), got {logits.shape} and {labels.shape}"
        )
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    lo, hi = _LOG_T_RANGE
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = (negative_log_likelihood(logits, labels, np.exp(x)) for x in (a, b))
    while hi - lo > tolerance:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = negative_log_likelihood(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = negative_log_likelihood(logits, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2.0))


def expected_calibration_error(probability: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE of binary predictions: sum over equal-width bins of P(target) of |mean P - observed frequency| x share.

    probability (N,) the stated probability of the positive class; labels (N,) 1 = positive. Bin b holds
    probabilities in [b/bins, (b+1)/bins) (the last bin includes 1.0).
    """
    p = np.asarray(probability, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            error += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return float(error)


def card_temperature(card: Optional[Mapping[str, Any]], source: str = "model card") -> float:
    """The card's ``calibration.temperature`` (1.0 when the card has no calibration); AttentionMapError if invalid."""
    section = (card or {}).get("calibration")
    if section is None:
        return 1.0
    value = section.get("temperature") if isinstance(section, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise AttentionMapError(f"{source}: calibration.temperature: expected a positive number, got {value!r}")
    return float(value)
