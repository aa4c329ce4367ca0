"""`soda-scaling fit`: compute-optimal scaling laws from an IsoFLOP sweep's results, as one JSON-ready dict.

The method is Chinchilla's (Hoffmann et al., 2022) as SODA's scaling study applies it: the runs come from
`scaling.results`, Approaches 2 and 3 from `scaling.laws`, Approach 3's optima along the real cost curve
from `scaling.frontier`; this module joins them with predictions and warnings (`scaling.summary` prints them).
"""

from __future__ import annotations

import numpy as np

from scaling.frontier import frontier, frontier_optimum
from scaling.laws import (CONFIDENCE, EXPONENT_BOUNDS, HUBER_K, SODA_PUBLISHED, approach2, approach2_predict,
                          approach3, interval, json_number)
from scaling.results import GROUP_TOLERANCE, Results
from tokenize_audio.errors import SodaError

FIT_FILE = "fit.json"


def _prediction(values, reps, i) -> dict:
    out = {}
    for name, v, rv in zip(("params", "tokens", "loss"), values, reps or (None,) * 3):
        out[name] = json_number(v[..., i].squeeze())
        if rv is not None:
            out[f"{name}_ci"] = interval(rv[:, i])
    return out


def _curve(values, reps, part) -> dict:
    """Compute-optimal N*, D*, L* along a FLOPs grid, with pointwise bootstrap bands for the plots."""
    out = {}
    for name, v, rv in zip(("params", "tokens", "loss"), values, reps or (None,) * 3):
        out[name] = [json_number(x) for x in np.ravel(v[..., part])]
        if rv is not None:
            bands = [interval(col) or [None, None] for col in rv[:, part].T]
            out[f"{name}_band"] = [[lo for lo, _ in bands], [hi for _, hi in bands]]
    return out


def _warnings(r: Results, a2: dict, a3: dict, bootstrap: int, n_star3) -> list[str]:
    """What should make a reader distrust a law: extrapolated optima, degenerate fits, few valid resamples."""
    warnings = [f"Approach 2: budget {o['budget']:.3g}: optimum outside the sampled range (extrapolated)"
                for o in a2["optima"] if o["params"] is not None and not o["interior"]]
    warnings += [f"Approach 2: budget {e['budget']:.3g} left out: {e['reason']}" for e in a2["excluded_budgets"]]
    if "error" in a2:
        warnings.append(f"Approach 2 not determined: {a2['error']}")
    elif bootstrap and a2["bootstrap_valid"] < 0.9 * bootstrap:
        warnings.append(f"Approach 2: only {a2['bootstrap_valid']}/{bootstrap} resamples gave a minimum in every "
                        "budget (too few runs per budget); its intervals are unreliable")
    warnings += [f"Approach 3: {name} reached its search bound {EXPONENT_BOUNDS}" for name in a3["at_bound"]]
    warnings += [f"Approach 3: {term} = 0, the loss does not fall with {what} here: no compute-optimal allocation"
                 for term, what in (("A", "N"), ("B", "D")) if a3[term] <= 0]
    outside = [f"{c:.3g}" for c, n in zip(r.budgets, n_star3)
               if np.isfinite(n) and not r.params[r.budget == c].min() <= n <= r.params[r.budget == c].max()]
    if outside:
        warnings.append(f"Approach 3: N* lies outside the sampled model sizes at budget(s) {', '.join(outside)} "
                        "(extrapolated)")
    return warnings


def fit_scaling(results: Results, bootstrap: int = 1000, seed: int = 0, target_flops=None,
                cost: str = "auto") -> dict:
    """Both approaches, bootstrap intervals, predictions at `target_flops` (default 10x and 100x the
    largest budget) with Approach 3's optima along the `cost` frontier (see `frontier`), and the
    per-point data the plots need, as one JSON-ready dict."""
    if bootstrap < 0:
        raise SodaError(f"--bootstrap must be >= 0, got {bootstrap}")
    rng = np.random.default_rng(seed)
    r = results
    front = frontier(r, cost)
    a2, laws, reps2 = approach2(r, bootstrap, rng)
    a3, terms, reps3 = approach3(r, bootstrap, rng)
    a3.update(frontier_cost=front.cost, frontier=front.info)
    targets = sorted(float(t) for t in (target_flops or r.budgets.max() * np.array([10.0, 100.0])))
    curve = np.geomspace(r.budgets.min() / 2, max(targets + [r.budgets.max() * 2]), 60)
    grid = np.concatenate([targets, curve])
    p2 = approach2_predict(laws, grid) if laws else np.full((3, len(grid)), np.nan)
    p3 = frontier_optimum(terms, front, grid)
    rp2 = approach2_predict({n: v[:, None] for n, v in reps2.items()}, grid) if reps2 else None
    rp3 = frontier_optimum(reps3, front, grid) if reps3 else None
    warnings = r.warnings + _warnings(r, a2, a3, bootstrap, frontier_optimum(terms, front, r.budgets)[0])
    e, A, B, alpha, beta = (terms[n] for n in ("E", "A", "B", "alpha", "beta"))
    surface = e + A * r.params ** -alpha + B * r.tokens ** -beta
    tail = slice(len(targets), None)
    return {
        "input": {"path": r.path, "runs": int(len(r.loss)), "budgets": [float(c) for c in r.budgets],
                  "duplicates": len(r.duplicates)},
        "settings": {"bootstrap": bootstrap, "seed": seed, "confidence": CONFIDENCE, "cost": cost,
                     "group_tolerance": GROUP_TOLERANCE, "huber_k": HUBER_K},
        "points": [{"line": int(ln), "budget": float(c), "flops": float(f), "params": float(n), "tokens": float(d),
                    "loss": float(lv), "approach3_loss": float(s)}
                   for ln, c, f, n, d, lv, s in zip(r.line, r.budget, r.flops, r.params, r.tokens, r.loss, surface)],
        "excluded": r.excluded,
        "duplicates": r.duplicates,
        "approach2": a2,
        "approach3": a3,
        "predictions": [{"flops": t, "approach2": _prediction(p2, rp2, i),
                         "approach3": {**_prediction(p3, rp3, i),  # k at the optimum, for comparison with the runs'
                                       "flops_per_param_token":
                                           json_number(t / (p3[0][..., i] * p3[1][..., i]).squeeze())}}
                        for i, t in enumerate(targets)],
        "curves": {"flops": curve.tolist(), "approach2": _curve(p2, rp2, tail), "approach3": _curve(p3, rp3, tail)},
        "warnings": warnings,
        "reference": {"soda_published": SODA_PUBLISHED},
    }
