"""The short human summary `soda-scaling fit` prints: both approaches' exponents, SODA's, the predictions."""

from __future__ import annotations

from scaling.laws import SODA_PUBLISHED


def human_count(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _with_ci(fit_part: dict, key: str, fmt=lambda v: f"{v:.3f}") -> str:
    if fit_part[key] is None:
        return "undefined"
    ci = fit_part.get(f"{key}_ci")
    return fmt(fit_part[key]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _frontier_text(a3: dict) -> str:
    f, cost = a3["frontier"], a3["frontier_cost"]
    if cost == "shape-family":
        return f"SODA's sweep shapes (vocab {f['vocab']:,}, seq_len {f['seq_len']:,}; C = 3 x forward FLOPs)"
    if cost == "fitted":
        lo, hi = f["flops_per_param_token_range"]
        why = "" if f["reason"] == "requested" else f"; not the shape family: {f['reason']}"
        return f"C = k(N) N D, ln k quadratic in ln N fitted to the runs (k {lo:.3g} to {hi:.3g}{why})"
    return f"C = {f['flops_per_param_token']:.3g} N D (the runs' median FLOPs/(N D))"


def summary(fit: dict) -> str:
    """The exponents of both approaches with 95% intervals, SODA's for reference, and the predictions."""
    a2, a3 = fit["approach2"], fit["approach3"]
    budgets = fit["input"]["budgets"]
    lines = [f"{fit['input']['runs']} runs over {len(budgets)} budgets ({budgets[0]:.3g} to {budgets[-1]:.3g} FLOPs)"
             + (f"; {len(fit['excluded'])} excluded:" if fit["excluded"] else "")]
    lines += [f"  line {e['line']}: {e['reason']}" for e in fit["excluded"]]
    n = fit["settings"]["bootstrap"]
    lines += [
        f"Approach 2 (IsoFLOP parabolas): N* ~ C^{_with_ci(a2, 'a')}  D* ~ C^{_with_ci(a2, 'b')}"
        + (f"  ({a2['bootstrap_valid']}/{n} resamples)" if n and "error" not in a2 else ""),
        f"Approach 3 (L = E + A/N^alpha + B/D^beta): N* ~ C^{_with_ci(a3, 'a')}  D* ~ C^{_with_ci(a3, 'b')}",
        f"  E {_with_ci(a3, 'E')}  alpha {_with_ci(a3, 'alpha')}  beta {_with_ci(a3, 'beta')}",
        f"  optima along {_frontier_text(a3)}",
        f"SODA (published, Approach 2): N* ~ C^{SODA_PUBLISHED['a']}  D* ~ C^{SODA_PUBLISHED['b']}",
    ]
    for p in fit["predictions"]:
        parts = [f"{name}: N {_with_ci(p[a], 'params', human_count)}, D {_with_ci(p[a], 'tokens', human_count)}, "
                 f"loss {_with_ci(p[a], 'loss')}" for name, a in (("A2", "approach2"), ("A3", "approach3"))]
        lines.append(f"At {p['flops']:.3g} FLOPs: " + "; ".join(parts))
    lines += [f"warning: {w}" for w in fit["warnings"]]
    return "\n".join(lines)
