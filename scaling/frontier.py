"""Approach 3's frontier: what a budget C really buys, and the surface's optimum along it.

The fitted surface's own exponents assume a constant C = k N D, but the real FLOPs per parameter-token k
vary with N (3.6 to 6.4 on SODA's grid: small models spend theirs on the embeddings, large ones on
attention), so N*, D* at a budget minimise L along the real cost curve: SODA's sweep shapes when the runs
have them, else k(N) fitted to the runs, or a constant k on request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from scaling.results import Results
from soda.shape import ModelShape, attention_flops_per_token, forward_flops_per_token, params, training_flops_per_token
from tokenize_audio.errors import SodaError

FRONTIER_COSTS = ("auto", "shape-family", "fitted", "constant")
FITTED_DEGREE = 2  # ln k as a quadratic in ln N follows SODA's grid (k 3.6 to 6.4) to about 1%
FAMILY_WIDTHS = (1.0, 2.0**24)  # where the optimum is searched along the shape family
SEARCH_SPAN = 25.0  # otherwise ln N is searched this far beyond the sampled sizes


@dataclass
class Frontier:
    """What a budget C buys: `curve(u)` gives ln N and ln(training FLOPs per token) along a path u in
    `bounds`, so D = C / FLOPs per token. `info` (how the cost was obtained) goes to fit.json."""

    cost: str
    curve: Callable
    bounds: tuple[float, float]
    info: dict


def sweep_family(r: Results) -> tuple[tuple[int, int] | None, str]:
    """(vocab, seq_len) with which SODA's sweep rule at each run's `width` gives its params and FLOPs, or
    None and why not. Without `vocab` / `seq_len` columns (a sweep's results.csv has only `width`) they are
    solved from the runs: N is linear in the vocabulary, forward FLOPs per token in the sequence length."""
    if "width" not in r.shapes:
        return None, f"{r.path} has no `width` column"
    width = r.shapes["width"]
    bad = ~(np.isfinite(width) & (width >= 1) & (width == np.round(width)))
    if bad.any():
        return None, f"{r.path}: line {r.line[bad][0]}: width is not a positive whole number"
    bare = [ModelShape.sweep(int(w), vocab=0, seq_len=0) for w in width]
    vocab = r.shapes.get("vocab", (r.params - np.array([params(s) for s in bare])) / (2 * width))
    per_position = np.array([attention_flops_per_token(ModelShape.sweep(int(w), seq_len=1)) for w in width])
    fwd = r.flops / (3 * r.tokens) - np.array([forward_flops_per_token(s) for s in bare]) - 2 * width * vocab
    seq_len = r.shapes.get("seq_len", fwd / per_position)
    if not (np.isfinite(vocab).all() and np.isfinite(seq_len).all()):
        return None, f"{r.path}: `vocab` or `seq_len` is not a number on every run"
    v, s = int(round(float(np.median(vocab)))), int(round(float(np.median(seq_len))))
    if v < 1 or s < 1:
        return None, f"{r.path}: no SODA sweep-rule vocabulary and sequence length fit the runs' params and FLOPs"
    for line, w, n, d, f in zip(r.line, width, r.params, r.tokens, r.flops):
        shape = ModelShape.sweep(int(w), v, s)
        if abs(params(shape) / n - 1) > 1e-6 or abs(training_flops_per_token(shape) * d / f - 1) > 1e-3:
            return None, (f"{r.path}: line {line}: SODA's sweep rule at width {int(w)} (vocab {v}, seq_len {s}) "
                          f"gives {params(shape)} parameters and {training_flops_per_token(shape) * d:.4g} FLOPs, "
                          f"the run has {n:.0f} and {f:.4g}: not that shape family")
    return (v, s), "the runs are SODA sweep-rule shapes"


def frontier(r: Results, cost: str = "auto") -> Frontier:
    """The cost curve Approach 3's optima lie on. `shape-family`: SODA's sweep rule with width continuous
    (ModelShape.sweep_continuous; the rounded layer count makes a staircase whose best step jumps by ~6% in
    N for a <0.1% change in loss). `fitted`: ln(FLOPs / (N D)) quadratic in ln N over the runs, held at its
    edge values beyond the sampled sizes (the real ratio levels off towards 6 for large models, where a
    polynomial's trend would run away). `constant`: the runs' median FLOPs / (N D). `auto`: shape-family
    when the runs are SODA-rule shapes, else fitted."""
    if cost not in FRONTIER_COSTS:
        raise SodaError(f"--cost {cost!r}: choose from {', '.join(FRONTIER_COSTS)}")
    k = r.flops / (r.params * r.tokens)
    info = {"flops_per_param_token_range": [float(k.min()), float(k.max())]}
    reason = "requested"
    if cost in ("auto", "shape-family"):
        family, reason = sweep_family(r)
        if family:
            vocab, seq_len = family

            def curve(u):
                shape = ModelShape.sweep_continuous(np.exp(u), vocab, seq_len)
                return np.log(params(shape)), np.log(training_flops_per_token(shape))
            return Frontier("shape-family", curve, tuple(np.log(FAMILY_WIDTHS)),
                            {"vocab": vocab, "seq_len": seq_len, "reason": reason, **info})
        if cost == "shape-family":
            raise SodaError(f"--cost shape-family: {reason}; use --cost fitted")
    ln_n = np.log(r.params)
    bounds = (float(ln_n.min() - SEARCH_SPAN), float(ln_n.max() + SEARCH_SPAN))
    if cost == "constant":
        ln_k = math.log(float(np.median(k)))
        return Frontier("constant", lambda u: (u, u + ln_k), bounds,
                        {"flops_per_param_token": math.exp(ln_k), "reason": reason, **info})
    lo, hi, center = float(ln_n.min()), float(ln_n.max()), float(ln_n.mean())
    coef = np.polyfit(ln_n - center, np.log(k), min(FITTED_DEGREE, len(np.unique(r.params)) - 1))
    return Frontier("fitted", lambda u: (u, u + np.polyval(coef, np.clip(u, lo, hi) - center)), bounds,
                    {"ln_k_polynomial": coef.tolist(), "center_ln_params": center,
                     "params_range": [math.exp(lo), math.exp(hi)], "reason": reason, **info})


def _golden_minimum(f, lo: np.ndarray, hi: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Elementwise minimiser of a unimodal f on [lo, hi] by golden-section search (50 steps shrink the
    bracket 3e10-fold): scipy's scalar minimisers take one problem at a time, and the bootstrap asks
    resamples x budgets of them."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo.astype(float), hi.astype(float)
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        left = fc < fd  # the minimum lies in [a, d]: old c becomes the new d
        a, b = np.where(left, a, c), np.where(left, d, b)
        new = np.where(left, b - r * (b - a), a + r * (b - a))
        f_new = f(new)
        c, d, fc, fd = (np.where(left, new, d), np.where(left, c, new),
                        np.where(left, f_new, fd), np.where(left, fc, f_new))
    return (a + b) / 2


def frontier_optimum(terms: dict, front: Frontier, flops):
    """N*, D*, L* minimising E + A/N^alpha + B/D^beta along the frontier: (..., budgets) for terms of shape
    (...); nan where A or B is 0 (the loss does not depend on N or D, so no allocation is best)."""
    e, A, B, alpha, beta = (np.asarray(terms[n], float)[..., None] for n in ("E", "A", "B", "alpha", "beta"))
    log_c = np.log(np.asarray(flops, float))

    def loss(u):
        ln_n, ln_t = front.curve(u)
        return e + A * np.exp(-alpha * ln_n) + B * np.exp(-beta * (log_c - ln_t))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        shape = np.broadcast_shapes(e.shape, log_c.shape)
        u = _golden_minimum(loss, np.full(shape, front.bounds[0]), np.full(shape, front.bounds[1]))
        ln_n, ln_t = front.curve(u)
        defined = np.isfinite(e + A + B + alpha + beta) & (A > 0) & (B > 0)
        n, d = np.where(defined, np.exp(ln_n), np.nan), np.where(defined, np.exp(log_c - ln_t), np.nan)
        return n, d, e + A * n ** -alpha + B * d ** -beta
