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
_LOG_T_STEP = 0.25  # the grid fit_temperature starts from


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, float64; logits (..., K)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean -log P(label), P = softmax(logits / T); logits (N, K), or (V, N, K) for V flipped views of each
    sample, whose P is the mean over the views of softmax(logits / T) (as flip averaging states it); labels (N,)
    int in 0..K-1."""
    z = np.asarray(logits, dtype=np.float64)
    z = (z[None] if z.ndim == 2 else z) / float(temperature)
    log_p = z - _logsumexp(z, axis=-1)[..., None]  # log softmax per view, (V, N, K)
    picked = log_p[:, np.arange(z.shape[1]), np.asarray(labels, dtype=int)]  # (V, N)
    return float(-(_logsumexp(picked, axis=0) - np.log(len(picked))).mean())  # log of the mean over views


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(values))) along ``axis``, without overflow or underflow."""
    top = values.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.exp(values - top).sum(axis=axis))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tolerance: float = 1e-6) -> float:
    """The temperature T > 0 minimising `negative_log_likelihood`: the best of a grid over log T in [-4, 4]
    (step 0.25), refined by golden-section search within one step of it.

    With logits (N, K) the NLL is convex in 1/T, hence unimodal in log T, and the search finds its minimum; with
    views (V, N, K) (the mean of V softmaxes) it is found to within the grid's resolution of local minima.
    labels (N,) int. Raises AttentionMapError for empty or mismatched input.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim not in (2, 3) or logits.shape[-2] == 0 or labels.shape != (logits.shape[-2],):
        raise AttentionMapError(
            f"fit_temperature: expected logits (N, K) or views (V, N, K) and labels (N,), got {logits.shape} and "
            f"{labels.shape}"
        )

    def nll(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, np.exp(log_t))

    grid = np.arange(_LOG_T_RANGE[0], _LOG_T_RANGE[1] + 1e-9, _LOG_T_STEP)
    best = float(grid[int(np.argmin([nll(x) for x in grid]))])
    lo, hi = max(_LOG_T_RANGE[0], best - _LOG_T_STEP), min(_LOG_T_RANGE[1], best + _LOG_T_STEP)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > tolerance:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
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
