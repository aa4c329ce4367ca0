"""The fitting maths of `soda-scaling fit`: Approaches 2 and 3 of Chinchilla's compute-optimal scaling laws.

Both give seeded bootstrap 95% intervals (points resampled within each budget):

- Approach 2: per budget, loss as a parabola in ln N (and separately in ln D), fitted by
  Huber-weighted least squares so one bad run cannot drag the minimum; the minima N*(C), D*(C)
  then give power laws N* = k_N C^a and D* = k_D C^b, fitted in log space.
- Approach 3: L = E + A/N^alpha + B/D^beta. E, A, B enter linearly, so a grid over (alpha, beta)
  solves them by non-negative least squares (no bad local minima, no negative terms); the best
  grid point starts a Huber fit on log L. Its exponents a = beta/(alpha+beta), b = alpha/(alpha+beta)
  are those of a constant C = k N D; `scaling.frontier` finds the optima along the real cost curve.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import least_squares, nnls

from scaling.results import MIN_BUDGETS, Results

HUBER_K = 1.345  # Huber threshold in robust standard deviations (95% efficiency for normal errors)
EXPONENT_GRID = np.linspace(0.02, 1.5, 60)
EXPONENT_BOUNDS = (0.005, 3.0)
CONFIDENCE = 95.0
SODA_PUBLISHED = {"a": 0.367, "b": 0.579}  # SODA's Approach 2 exponents (N* and D* vs C)


def interval(values) -> list | None:
    """The central CONFIDENCE% interval of bootstrap `values` (non-finite ones dropped); None if none are finite."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [(100 - CONFIDENCE) / 2, (100 + CONFIDENCE) / 2])
    return [float(lo), float(hi)]


def json_number(v) -> float | None:
    """JSON has no inf or nan: a degenerate fit's undefined value is None."""
    v = float(v)
    return v if math.isfinite(v) else None


# --- Approach 2: IsoFLOP parabolas -----------------------------------------------------------

def fit_parabolas(x: np.ndarray, y: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Huber-IRLS fits of y = c0 + c1 x + c2 x^2, batched over leading axes: (..., n) -> (..., 3).

    The Huber scale comes from the residuals' median absolute deviation over the first few
    iterations, then stays fixed, so the remaining iterations solve a convex problem and converge;
    each fit stops once its coefficients move by less than 1e-9 of the loss scale.
    """
    shape = y.shape[:-1]
    powers = x.reshape(-1, x.shape[-1], 1) ** np.arange(5)  # normal equations: sums of w x^0 .. w x^4
    y = y.reshape(-1, y.shape[-1])
    hankel = np.add.outer(np.arange(3), np.arange(3))
    tol = 1e-9 * np.abs(y).mean(-1)
    coef, w, scale = np.zeros((len(y), 3)), np.ones_like(y), np.zeros((len(y), 1))
    live = np.arange(len(y))
    for i in range(iterations):
        p, wl, yl = powers[live], w[live], y[live]
        moments = np.einsum("mn,mnk->mk", wl, p)
        new = np.linalg.solve(moments[:, hankel], np.einsum("mn,mnk->mk", wl * yl, p[..., :3])[..., None])[..., 0]
        moved = np.abs(new - coef[live]).max(-1) > tol[live]
        coef[live] = new
        r = np.abs(yl - np.einsum("mnk,mk->mn", p[..., :3], new))
        if i < 5:
            scale[live] = np.maximum(1.4826 * np.median(r, -1, keepdims=True), tol[live, None])
        else:
            live, r = live[moved], r[moved]
            if not len(live):
                break
        w[live] = np.minimum(1.0, HUBER_K * scale[live] / np.maximum(r, 1e-300))
    return coef.reshape(shape + (3,))


def parabola_minimum(coef: np.ndarray):
    """(x*, y*) of each parabola; nan where it opens downwards (no minimum)."""
    c0, c1, c2 = np.moveaxis(coef, -1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(c2 > 0, -c1 / (2 * c2), np.nan)
    return x, c0 + c1 * x + c2 * x * x


def power_law(log_c: np.ndarray, log_y: np.ndarray):
    """Least-squares line log y = log k + slope * log C over the last axis: (slope, log k)."""
    lc = log_c - log_c.mean(-1, keepdims=True)
    slope = (lc * log_y).sum(-1) / (lc * lc).sum(-1)
    return slope, log_y.mean(-1) - slope * log_c.mean(-1)


def _distinct(x: np.ndarray) -> np.ndarray:
    s = np.sort(x, -1)
    return 1 + (np.diff(s, axis=-1) != 0).sum(-1)


def _isoflop_fits(r: Results, indices: list[np.ndarray]):
    """Per budget j and resample, Huber parabolas of loss in centred ln N and ln D.

    Returns the coefficients (2, R, J, 3), the centres (2, J) and the optima ln N*, ln D*, L*
    (3, R, J); optima are nan where a resample has < 3 distinct runs or a parabola opens downwards.
    """
    budgets = r.budgets
    coefs = np.full((2, len(indices[0]), len(budgets), 3), np.nan)
    centers = np.zeros((2, len(budgets)))
    optima = np.full((3, len(indices[0]), len(budgets)), np.nan)
    for j, c in enumerate(budgets):
        members = np.flatnonzero(r.budget == c)
        ok = _distinct(indices[j]) >= 3
        idx = np.where(ok[:, None], indices[j], np.arange(len(members)))  # placeholder rows keep solves regular
        for k, v in enumerate((r.params, r.tokens)):
            lv = np.log(v[members])
            centers[k, j] = lv.mean()
            coefs[k, :, j] = fit_parabolas(lv[idx] - centers[k, j], r.loss[members][idx])
            x_star, y_star = parabola_minimum(coefs[k, :, j])
            optima[k, :, j] = np.where(ok, x_star + centers[k, j], np.nan)
            if k == 0:
                optima[2, :, j] = np.where(ok, y_star, np.nan)
    return coefs, centers, optima


def approach2(r: Results, bootstrap: int, rng: np.random.Generator) -> tuple[dict, dict, dict | None]:
    """IsoFLOP optima and their power laws; returns the JSON part, the laws and bootstrap replicates."""
    budgets = r.budgets
    sizes = [int((r.budget == c).sum()) for c in budgets]
    coefs, centers, (ln_n, ln_d, loss) = _isoflop_fits(r, [np.arange(s)[None] for s in sizes])
    ln_n, ln_d, loss = ln_n[0], ln_d[0], loss[0]
    keep = np.isfinite(ln_n) & np.isfinite(ln_d)
    optima, excluded = [], []
    for j, c in enumerate(budgets):
        lv = [np.log(v[r.budget == c]) for v in (r.params, r.tokens)]
        entry = {"budget": float(c), "points": sizes[j], "params": None, "tokens": None, "loss": None,
                 "interior": False, "params_parabola": {"center": centers[0, j], "coef": coefs[0, 0, j].tolist()},
                 "tokens_parabola": {"center": centers[1, j], "coef": coefs[1, 0, j].tolist()}}
        if keep[j]:
            entry.update(params=float(np.exp(ln_n[j])), tokens=float(np.exp(ln_d[j])), loss=float(loss[j]),
                         interior=bool(lv[0].min() <= ln_n[j] <= lv[0].max() and lv[1].min() <= ln_d[j] <= lv[1].max()))
        else:
            excluded.append({"budget": float(c), "reason": "loss does not curve upwards in ln N or ln D (no minimum)"})
        optima.append(entry)
    if keep.sum() < MIN_BUDGETS:  # no law, but the per-budget parabolas are still worth showing
        error = (f"only {keep.sum()} budget(s) have a loss minimum in their parabola fit; Approach 2 needs at "
                 f"least {MIN_BUDGETS} (widen the sweep around the optimum, or train longer: noisy losses)")
        return {"a": None, "b": None, "error": error, "optima": optima, "excluded_budgets": excluded}, None, None
    log_c = np.log(budgets[keep])
    laws = _laws(log_c, ln_n[keep], ln_d[keep], loss[keep])
    out = {"a": float(laws["a"]), "b": float(laws["b"]), "params_coefficient": float(np.exp(laws["log_kn"])),
           "tokens_coefficient": float(np.exp(laws["log_kd"])), "loss_coefficient": float(np.exp(laws["log_kl"])),
           "loss_exponent": float(laws["g"]), "optima": optima, "excluded_budgets": excluded}
    reps = None
    if bootstrap:
        bn, bd, bl = _isoflop_fits(r, [rng.integers(0, s, (bootstrap, s)) for s in sizes])[2][:, :, keep]
        valid = np.isfinite(bn).all(1) & np.isfinite(bd).all(1)
        if valid.any():
            reps = _laws(log_c, bn[valid], bd[valid], bl[valid])
            out.update(a_ci=interval(reps["a"]), b_ci=interval(reps["b"]))
        out["bootstrap_valid"] = int(valid.sum())
    return out, laws, reps


def _laws(log_c, ln_n, ln_d, loss) -> dict:
    """N* = k_N C^a, D* = k_D C^b and, for predictions only, L* = k_L C^g (no irreducible term)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        log_loss = np.log(loss)
    (a, log_kn), (b, log_kd), (g, log_kl) = (power_law(log_c, v) for v in (ln_n, ln_d, log_loss))
    return {"a": a, "b": b, "log_kn": log_kn, "log_kd": log_kd, "log_kl": log_kl, "g": g}


def approach2_predict(laws, flops):
    log_c = np.log(flops)
    return (np.exp(laws["log_kn"] + laws["a"] * log_c), np.exp(laws["log_kd"] + laws["b"] * log_c),
            np.exp(laws["log_kl"] + laws["g"] * log_c))


# --- Approach 3: parametric loss surface -----------------------------------------------------

def _surface(theta, ln_n, ln_d):
    """Model loss and its Jacobian in (E, A', B', alpha, beta); A' = A/N_ref^alpha on centred ln N."""
    e, a, b, alpha, beta = (t[..., None] for t in np.moveaxis(theta, -1, 0))
    tn, td = np.exp(-alpha * ln_n), np.exp(-beta * ln_d)
    pred = e + a * tn + b * td
    ones = np.ones_like(pred)
    jac = np.stack([ones, tn * ones, td * ones, -a * tn * ln_n, -b * td * ln_d], -1)
    return pred, jac


def _log_residuals(theta, ln_n, ln_d, log_loss):
    pred, jac = _surface(theta, ln_n, ln_d)
    return np.log(pred) - log_loss, jac / pred[..., None]


def _huber_cost(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, r * r, 2 * delta * a - delta * delta).sum(-1)


def _grid_start(ln_n, ln_d, loss):
    """Best (E, A', B', alpha, beta) over EXPONENT_GRID, E, A', B' >= 0 by NNLS on relative errors."""
    best = (np.inf, None)
    tn, td = np.exp(-EXPONENT_GRID[:, None] * ln_n), np.exp(-EXPONENT_GRID[:, None] * ln_d)
    ones = np.ones_like(loss)
    for i, alpha in enumerate(EXPONENT_GRID):
        for j, beta in enumerate(EXPONENT_GRID):
            coef, rnorm = nnls(np.stack([ones, tn[i], td[j]], 1) / loss[:, None], ones)
            if rnorm < best[0]:
                best = (rnorm, np.array([*coef, alpha, beta]))
    return best[1]


def _refine_batched(theta, ln_n, ln_d, log_loss, delta, iterations: int = 100):
    """Levenberg-Marquardt with Huber weights on log residuals, batched over resamples (R, n).

    Solves the same problem as the single fit's scipy least_squares(loss='huber') in one vectorised
    loop: a thousand 5-parameter fits in well under a second instead of one at a time.
    """
    lo = np.array([0.0, 0.0, 0.0, EXPONENT_BOUNDS[0], EXPONENT_BOUNDS[0]])
    hi = np.array([np.inf, np.inf, np.inf, EXPONENT_BOUNDS[1], EXPONENT_BOUNDS[1]])
    theta = theta.copy()
    lam = np.full(len(theta), 1e-3)
    r, jac = _log_residuals(theta, ln_n, ln_d, log_loss)
    cost = _huber_cost(r, delta)
    active = np.ones(len(theta), bool)
    for _ in range(iterations):
        i = np.flatnonzero(active)
        if not len(i):
            break
        w = np.minimum(1.0, delta / np.maximum(np.abs(r[i]), 1e-300))
        jtw = jac[i].swapaxes(-1, -2) * w[:, None, :]
        h = jtw @ jac[i]
        diag = np.diagonal(h, axis1=-2, axis2=-1)
        h = h + (lam[i, None] * diag + 1e-12 * diag.sum(-1, keepdims=True) + 1e-300)[..., None] * np.eye(5)
        step = np.linalg.solve(h, -(jtw @ r[i][..., None]))[..., 0]
        trial = np.clip(theta[i] + step, lo, hi)
        tr, tj = _log_residuals(trial, ln_n[i], ln_d[i], log_loss[i])
        tc = _huber_cost(tr, delta)
        better = tc <= cost[i]
        done = better & (cost[i] - tc <= 1e-12 * cost[i] + 1e-20)
        k = i[better]
        theta[k], r[k], jac[k], lam[k] = trial[better], tr[better], tj[better], lam[k] / 3
        lam[i[~better]] *= 4
        cost[i[better]] = tc[better]
        active[i[done | (lam[i] > 1e10)]] = False
    return theta


def approach3(r: Results, bootstrap: int, rng: np.random.Generator) -> tuple[dict, dict, dict | None]:
    """Grid + NNLS start, Huber fit on log L, batched bootstrap refits; returns JSON part, terms, replicates.

    ln N and ln D are centred on their means so the fitted scales A', B' are O(loss) and the
    problem stays well conditioned; A and B are reported in the data's own units. The Huber
    threshold is 1.345 robust standard deviations (MAD) of the grid start's log residuals.
    """
    ref_n, ref_d = np.log(r.params).mean(), np.log(r.tokens).mean()
    ln_n, ln_d, log_loss = np.log(r.params) - ref_n, np.log(r.tokens) - ref_d, np.log(r.loss)
    start = _grid_start(ln_n, ln_d, r.loss)
    start[:3] = np.maximum(start[:3], 1e-6 * r.loss.min())  # strictly inside the bounds
    resid = _log_residuals(start, ln_n, ln_d, log_loss)[0]
    delta = max(HUBER_K * 1.4826 * float(np.median(np.abs(resid))), 1e-5)
    lo = [0, 0, 0, EXPONENT_BOUNDS[0], EXPONENT_BOUNDS[0]]
    hi = [np.inf, np.inf, np.inf, EXPONENT_BOUNDS[1], EXPONENT_BOUNDS[1]]
    sol = least_squares(lambda t: _log_residuals(t, ln_n, ln_d, log_loss)[0], start,
                        jac=lambda t: _log_residuals(t, ln_n, ln_d, log_loss)[1],
                        loss="huber", f_scale=delta, bounds=(lo, hi), x_scale="jac")
    k = float(np.median(r.flops / (r.params * r.tokens)))
    main = _surface_terms(sol.x, ref_n, ref_d)
    out = {name: float(v) for name, v in main.items()}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # the constant-k law N* = G (C/k)^a
        g = (main["alpha"] * main["A"] / (main["beta"] * main["B"])) ** (1 / (main["alpha"] + main["beta"]))
        out.update(params_coefficient=json_number(g * k ** -main["a"]),
                   tokens_coefficient=json_number(k ** -main["b"] / g))
    out.update(flops_per_param_token=k, huber_delta=delta, exponent_bounds=list(EXPONENT_BOUNDS),
               at_bound=[n for n, v in zip(("alpha", "beta"), sol.x[3:]) if np.isclose(v, EXPONENT_BOUNDS).any()])
    reps = None
    if bootstrap:
        idx = np.concatenate([rng.choice(np.flatnonzero(r.budget == c), (bootstrap, int((r.budget == c).sum())))
                              for c in r.budgets], axis=1)
        theta = _refine_batched(np.repeat(sol.x[None], bootstrap, 0), ln_n[idx], ln_d[idx], log_loss[idx], delta)
        reps = _surface_terms(theta, ref_n, ref_d)
        out.update({f"{name}_ci": interval(v) for name, v in reps.items()},
                   bootstrap_valid=int(np.isfinite(theta).all(-1).sum()))
    return out, main, reps


def _surface_terms(theta, ref_n, ref_d) -> dict:
    """E, A, B in the data's own units, the exponents, and the compute-optimal exponents a, b."""
    e, a, b, alpha, beta = np.moveaxis(np.asarray(theta), -1, 0)
    return {"E": e, "A": a * np.exp(alpha * ref_n), "B": b * np.exp(beta * ref_d), "alpha": alpha, "beta": beta,
            "a": beta / (alpha + beta), "b": alpha / (alpha + beta)}
