"""Compute-optimal scaling laws from an IsoFLOP sweep's results (DESIGN.md §2-3).

Two estimators, each with seeded bootstrap 95% intervals (points resampled within each budget):

- Approach 2: per budget, loss as a parabola in ln N (and separately in ln D), fitted by
  Huber-weighted least squares so one bad run cannot drag the minimum; the minima N*(C), D*(C)
  then give power laws N* = k_N C^a and D* = k_D C^b, fitted in log space.
- Approach 3: L = E + A/N^alpha + B/D^beta. E, A, B enter linearly, so a grid over (alpha, beta)
  solves them by non-negative least squares (no bad local minima, no negative terms); the best
  grid point starts a Huber fit on log L. Its exponents a = beta/(alpha+beta), b = alpha/(alpha+beta)
  are those of a constant C = k N D, but the real FLOPs per parameter-token k vary with N (3.6 to 6.4
  on SODA's grid: small models spend theirs on the embeddings, large ones on attention), so N*, D*
  at a budget minimise L along the real cost curve (the frontier, see `frontier`): SODA's sweep
  shapes when the runs have them, else k(N) fitted to the runs, or a constant k on request.

Input problems: a missing column, a run whose `flops`, `params`, `tokens` or `budget` is not a
positive finite number or lies outside what any real run has (PLAUSIBLE), FLOPs / (N D) orders of
magnitude from ~6 (other units), or a loss that is zero, negative, above MAX_LOSS nats (or twice ln V
with a `vocab` column) or not a number at all means the file is wrong, so the fit stops (SodaError
naming the file, line and column). A loss that is empty, nan or inf (a run that diverged or has not
finished) only loses that run: it is excluded and listed under `excluded` with its line and reason.
A row repeating an earlier one (gathers concatenated) would count twice and narrow the bootstrap
intervals: exact copies are dropped unless asked to keep them, and every repeat is counted and named.
Fewer than 3 budgets, or a budget with fewer than 3 usable runs, cannot be fitted and stops the fit.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.optimize import least_squares, nnls

from soda.shape import ModelShape, attention_flops_per_token, forward_flops_per_token, params, training_flops_per_token
from tokenize_audio.errors import SodaError

FIT_FILE = "fit.json"
REQUIRED = ("flops", "params", "tokens", "loss")
SHAPE_COLUMNS = ("width", "vocab", "seq_len")  # optional: SODA's sweep rule at `width` gives the frontier's cost
GROUP_TOLERANCE = 0.05  # runs whose FLOPs agree within 5% form one budget when there is no `budget` column
MIN_BUDGETS = MIN_POINTS = 3
HUBER_K = 1.345  # Huber threshold in robust standard deviations (95% efficiency for normal errors)
EXPONENT_GRID = np.linspace(0.02, 1.5, 60)
EXPONENT_BOUNDS = (0.005, 3.0)
CONFIDENCE = 95.0
SODA_PUBLISHED = {"a": 0.367, "b": 0.579}  # SODA's Approach 2 exponents (N* and D* vs C)
# What a real run can hold. Beyond it a value is a typo or in other units, and the fit's powers and products of
# it leave float64's range (1e300 gave a LinAlgError or a silently absurd law). 1e15 parameters is ~1000x the
# largest models, 1e18 tokens ~1e4x the largest corpora.
PLAUSIBLE = {"flops": (1.0, 1e35), "budget": (1.0, 1e35), "params": (1.0, 1e15), "tokens": (1.0, 1e18)}
MAX_LOSS = 100.0  # nats per token: an untrained model scores ln V (11.9 for SODA's 144,644 ids)
LOSS_VOCAB_MARGIN = 2.0  # with a `vocab` column, a loss above 2 ln V (twice a uniform guess) is not a cross-entropy
# Training FLOPs per parameter-token: about 6 (3.6 to 6.4 on SODA's grid); outside this, a column is in other units.
FLOPS_PER_PARAM_TOKEN = (0.1, 1e4)


@dataclass
class Results:
    """A sweep's usable runs (one array entry each), their budgets, and the runs left out."""

    path: str
    line: np.ndarray
    flops: np.ndarray
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    budget: np.ndarray  # the budget C of each run's group
    excluded: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shapes: dict[str, np.ndarray] = field(default_factory=dict)  # SHAPE_COLUMNS present; nan where not a number
    duplicates: list[dict] = field(default_factory=list)  # {line, repeats, exact, dropped}, see `_repeats`

    @property
    def budgets(self) -> np.ndarray:
        return np.unique(self.budget)


def _number(text, path, line, column) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise SodaError(f"{path}: line {line}: {column} is {text!r}, not a number") from None


def _optional_number(text) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _loss_limit(row: dict) -> tuple[float, str]:
    """The largest believable loss of a row, and why: MAX_LOSS, or LOSS_VOCAB_MARGIN x ln V with a `vocab`."""
    vocab = _optional_number(row.get("vocab", ""))
    if math.isfinite(vocab) and vocab >= 2 and LOSS_VOCAB_MARGIN * math.log(vocab) < MAX_LOSS:
        return LOSS_VOCAB_MARGIN * math.log(vocab), (f"{LOSS_VOCAB_MARGIN:g} x ln(vocab {vocab:g}) = "
                                                     f"{LOSS_VOCAB_MARGIN * math.log(vocab):.3g}, where a model "
                                                     f"guessing uniformly scores {math.log(vocab):.3g}")
    return MAX_LOSS, f"{MAX_LOSS:g} nats (an untrained model scores ln V, 11.9 for SODA's vocabulary)"


def _check_row(path, line, row: dict, values: dict, loss: float) -> None:
    """Refuse values no real run has (PLAUSIBLE, MAX_LOSS, FLOPS_PER_PARAM_TOKEN), naming the line and column."""
    for column, v in values.items():
        lo, hi = PLAUSIBLE[column]
        if not lo <= v <= hi:
            raise SodaError(f"{path}: line {line}: {column} is {row[column]!r}, outside what a real run has "
                            f"({lo:g} to {hi:.0e}); a typo, or other units?")
    limit, why = _loss_limit(row)
    if loss > limit:
        raise SodaError(f"{path}: line {line}: loss is {row['loss']!r}, above {why}; the loss must be a "
                        f"cross-entropy in nats per token (a diverged run: leave its loss empty)")
    k = values["flops"] / (values["params"] * values["tokens"])
    if not FLOPS_PER_PARAM_TOKEN[0] <= k <= FLOPS_PER_PARAM_TOKEN[1]:
        raise SodaError(f"{path}: line {line}: flops / (params x tokens) is {k:.3g}, where training costs about 6 "
                        f"(3.6 to 6.4 on SODA's grid); check the units of flops, params and tokens (counted one by "
                        f"one, not in millions or billions)")


def _read_rows(path: Path):
    """Parse and check every row: (line, flops, params, tokens, loss, budget, shape values) tuples, the
    excluded runs, whether there is a budget column, the shape columns present, and each row's key for
    `_repeats` (its fitted values, then its other columns' text)."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise SodaError(f"{path}: missing column{'s' * (len(missing) > 1)} {', '.join(missing)} "
                            f"(found: {', '.join(columns) or 'no header'}); need {', '.join(REQUIRED)}")
        grouped = "budget" in columns
        shape_columns = [c for c in SHAPE_COLUMNS if c in columns]
        fitted = ("flops", "params", "tokens") + (("budget",) if grouped else ())
        others = [c for c in columns if c not in fitted + ("loss",)]
        rows, excluded, keys = [], [], []
        for raw in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            line = reader.line_num
            values = {}
            for column in fitted:
                v = _number(row[column], path, line, column)
                if not (math.isfinite(v) and v > 0):
                    raise SodaError(f"{path}: line {line}: {column} is {row[column]!r}; "
                                    "it must be a positive finite number")
                values[column] = v
            loss = _number(row["loss"] or "nan", path, line, "loss")
            if not math.isfinite(loss):
                excluded.append({"line": line, "reason": f"loss is {row['loss'] or 'empty'} "
                                                         "(diverged or unfinished run?)"})
                continue
            if loss <= 0:
                raise SodaError(f"{path}: line {line}: loss is {row['loss']!r}; a cross-entropy must be positive")
            _check_row(path, line, row, values, loss)
            rows.append((line, values["flops"], values["params"], values["tokens"], loss, values.get("budget"),
                         tuple(_optional_number(row[c]) for c in shape_columns)))
            keys.append((tuple(values.values()) + (loss,), tuple(row.get(c, "") for c in others)))
    return rows, excluded, grouped, shape_columns, keys


def _repeats(rows: list, keys: list, keep: bool) -> tuple[list, list[dict], list[str]]:
    """Rows repeating an earlier row's flops, params, tokens, loss (and budget): each would count twice in the
    fits and narrow the bootstrap intervals. Exact copies (every column equal) are dropped unless `keep`; rows
    differing only in other columns (e.g. a name) are kept but named, as they are most likely one run twice.
    Returns the rows kept, one {line, repeats, exact, dropped} per repeat, and the warnings."""
    first_fit: dict = {}  # fitted values -> the line that first had them
    first_row: dict = {}  # fitted values and other columns -> the line that first had them
    kept, repeats = [], []
    for row, key in zip(rows, keys):
        line, repeat = row[0], None
        if key in first_row:
            repeat = {"line": line, "repeats": first_row[key], "exact": True, "dropped": not keep}
        elif key[0] in first_fit:
            repeat = {"line": line, "repeats": first_fit[key[0]], "exact": False, "dropped": False}
        first_fit.setdefault(key[0], line)
        first_row.setdefault(key, line)
        if repeat:
            repeats.append(repeat)
        if not (repeat and repeat["dropped"]):
            kept.append(row)

    def listed(items):
        pairs = [f"line {d['line']} repeats line {d['repeats']}" for d in items]
        return ", ".join(pairs[:5]) + (", ..." if len(pairs) > 5 else "")
    warnings = []
    exact = [d for d in repeats if d["exact"]]
    if exact and not keep:
        warnings.append(f"{len(exact)} exact duplicate rows dropped ({listed(exact)}): each run counts once in the "
                        f"fits and intervals; --keep-duplicates keeps them")
    elif exact:
        warnings.append(f"{len(exact)} exact duplicate rows kept (--keep-duplicates) ({listed(exact)}): they count "
                        f"twice, narrowing the intervals")
    similar = [d for d in repeats if not d["exact"]]
    if similar:
        warnings.append(f"{len(similar)} row(s) repeat an earlier row's flops, params, tokens and loss with other "
                        f"columns differing, kept ({listed(similar)}): if one run is listed twice, remove the copy "
                        f"(it narrows the intervals)")
    return kept, repeats, warnings


def _check_fingerprints(path: Path) -> None:
    """Refuse rows of differently trained sweeps: `soda-scaling run` writes each run's `fingerprint` (its data, the
    soda-train flags that change what it computes, validation tokens, recipe), and one law must not be fitted across
    them. Rows without one (written by hand) are not compared."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "fingerprint" not in [c.strip() for c in reader.fieldnames or []]:
            return
        lines: dict[str, list[int]] = {}
        for raw in reader:
            value = next((v or "" for k, v in raw.items() if (k or "").strip() == "fingerprint"), "").strip()
            if value:
                lines.setdefault(value, []).append(reader.line_num)
    if len(lines) > 1:
        def spans(numbers):
            runs = [[numbers[0], numbers[0]]]
            for n in numbers[1:]:
                if n == runs[-1][1] + 1:
                    runs[-1][1] = n
                else:
                    runs.append([n, n])
            text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
            return f"line{'s' * (len(numbers) > 1)} {text}"
        groups = "; ".join(f"{spans(numbers)} have {value}" for value, numbers in lines.items())
        raise SodaError(f"{path}: rows trained with different settings (fingerprint column: data, soda-train flags, "
                        f"validation tokens): {groups}; fit one sweep's rows, or pass --allow-mixed")


def load_results(path, tolerance: float = GROUP_TOLERANCE, keep_duplicates: bool = False,
                 allow_mixed: bool = False) -> Results:
    """Read a results CSV (`flops`, `params`, `tokens`, `loss`, optional `budget` and SHAPE_COLUMNS; other
    columns ignored). Exact duplicate rows are dropped unless `keep_duplicates` (see `_repeats`); rows with
    different `fingerprint`s are refused unless `allow_mixed` (see `_check_fingerprints`)."""
    path = Path(path)
    if not path.is_file():
        raise SodaError(f"results file {path} not found")
    try:
        if not allow_mixed:
            _check_fingerprints(path)
        rows, excluded, grouped, shape_columns, keys = _read_rows(path)
    except UnicodeDecodeError as err:
        raise SodaError(f"{path}: not a UTF-8 CSV ({err.reason} at byte {err.start})") from None
    rows, duplicates, warnings = _repeats(rows, keys, keep_duplicates)
    if not rows:
        note = f" ({len(excluded)} excluded: no finite loss)" if excluded else ""
        raise SodaError(f"{path}: no usable runs{note}")
    line, flops, n, d, loss, budget = (np.array(c) for c in list(zip(*rows))[:6])
    shapes = dict(zip(shape_columns, np.array([r[6] for r in rows], float).reshape(len(rows), -1).T))
    if grouped:
        budget = budget.astype(float)
        off = np.abs(flops / budget - 1) > tolerance
        if off.any():
            warnings.append(f"{off.sum()} runs' FLOPs differ from their budget by more than {tolerance:.0%} "
                            f"(lines {', '.join(map(str, line[off][:5]))}{', ...' if off.sum() > 5 else ''})")
    else:
        budget = group_budgets(flops, tolerance, path)
    results = Results(str(path), line.astype(int), flops, n.astype(float), d.astype(float), loss, budget,
                      excluded, warnings, shapes, duplicates)
    _check_groups(results)
    return results


def group_budgets(flops: np.ndarray, tolerance: float = GROUP_TOLERANCE, path="results") -> np.ndarray:
    """Each run's budget: runs sorted by FLOPs join a group while within `tolerance` of the previous run.

    The budget is the group's median FLOPs; a group whose runs stray further than `tolerance` from
    it (a chain of near neighbours) is ambiguous and stops with a hint to add a `budget` column.
    """
    order = np.argsort(flops)
    starts = np.flatnonzero(np.diff(flops[order]) > tolerance * flops[order][:-1]) + 1
    budget = np.empty_like(flops)
    for members in np.split(order, starts):
        c = float(np.median(flops[members]))
        if np.any(np.abs(flops[members] / c - 1) > tolerance):
            raise SodaError(f"{path}: runs from {flops[members].min():.3g} to {flops[members].max():.3g} FLOPs "
                            f"chain into one budget (neighbours within {tolerance:.0%}); add a `budget` column")
        budget[members] = c
    return budget


def _check_groups(r: Results) -> None:
    budgets = r.budgets
    for c in budgets:
        members = r.budget == c
        lines = r.line[members]
        sizes = min(len(np.unique(r.params[members])), len(np.unique(r.tokens[members])))
        if len(lines) >= MIN_POINTS > sizes:
            raise SodaError(f"{r.path}: budget {c:.3g} FLOPs has only {sizes} distinct model size(s) or token "
                            f"count(s) (line {', '.join(map(str, lines))}); a parabola needs at least {MIN_POINTS}")
        if len(lines) < MIN_POINTS:
            note = (f"; {len(r.excluded)} run(s) were excluded for an empty, nan or inf loss (line "
                    f"{', '.join(str(e['line']) for e in r.excluded)})" if r.excluded else "")
            raise SodaError(f"{r.path}: budget {c:.3g} FLOPs has {len(lines)} usable run(s) "
                            f"(line {', '.join(map(str, lines))}); a parabola needs at least {MIN_POINTS}{note}")
    if len(budgets) < MIN_BUDGETS:
        raise SodaError(f"{r.path}: {len(budgets)} budget(s) ({', '.join(f'{c:.3g}' for c in budgets)} FLOPs); "
                        f"a scaling law needs at least {MIN_BUDGETS}")


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
            out.update(a_ci=_ci(reps["a"]), b_ci=_ci(reps["b"]))
        out["bootstrap_valid"] = int(valid.sum())
    return out, laws, reps


def _laws(log_c, ln_n, ln_d, loss) -> dict:
    """N* = k_N C^a, D* = k_D C^b and, for predictions only, L* = k_L C^g (no irreducible term)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        log_loss = np.log(loss)
    (a, log_kn), (b, log_kd), (g, log_kl) = (power_law(log_c, v) for v in (ln_n, ln_d, log_loss))
    return {"a": a, "b": b, "log_kn": log_kn, "log_kd": log_kd, "log_kl": log_kl, "g": g}


def _approach2_predict(laws, flops):
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
        out.update(params_coefficient=_num(g * k ** -main["a"]), tokens_coefficient=_num(k ** -main["b"] / g))
    out.update(flops_per_param_token=k, huber_delta=delta, exponent_bounds=list(EXPONENT_BOUNDS),
               at_bound=[n for n, v in zip(("alpha", "beta"), sol.x[3:]) if np.isclose(v, EXPONENT_BOUNDS).any()])
    reps = None
    if bootstrap:
        idx = np.concatenate([rng.choice(np.flatnonzero(r.budget == c), (bootstrap, int((r.budget == c).sum())))
                              for c in r.budgets], axis=1)
        theta = _refine_batched(np.repeat(sol.x[None], bootstrap, 0), ln_n[idx], ln_d[idx], log_loss[idx], delta)
        reps = _surface_terms(theta, ref_n, ref_d)
        out.update({f"{name}_ci": _ci(v) for name, v in reps.items()},
                   bootstrap_valid=int(np.isfinite(theta).all(-1).sum()))
    return out, main, reps


def _surface_terms(theta, ref_n, ref_d) -> dict:
    """E, A, B in the data's own units, the exponents, and the compute-optimal exponents a, b."""
    e, a, b, alpha, beta = np.moveaxis(np.asarray(theta), -1, 0)
    return {"E": e, "A": a * np.exp(alpha * ref_n), "B": b * np.exp(beta * ref_d), "alpha": alpha, "beta": beta,
            "a": beta / (alpha + beta), "b": alpha / (alpha + beta)}


# --- Approach 3's frontier: minimise the surface along what a budget really buys ------------------

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


def _frontier_optimum(terms: dict, front: Frontier, flops):
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


# --- both, with predictions ------------------------------------------------------------------

def _ci(values) -> list | None:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [(100 - CONFIDENCE) / 2, (100 + CONFIDENCE) / 2])
    return [float(lo), float(hi)]


def _num(v) -> float | None:
    """JSON has no inf or nan: a degenerate fit's undefined value is None."""
    v = float(v)
    return v if math.isfinite(v) else None


def _prediction(values, reps, i) -> dict:
    out = {}
    for name, v, rv in zip(("params", "tokens", "loss"), values, reps or (None,) * 3):
        out[name] = _num(v[..., i].squeeze())
        if rv is not None:
            out[f"{name}_ci"] = _ci(rv[:, i])
    return out


def _curve(values, reps, part) -> dict:
    """Compute-optimal N*, D*, L* along a FLOPs grid, with pointwise bootstrap bands for the plots."""
    out = {}
    for name, v, rv in zip(("params", "tokens", "loss"), values, reps or (None,) * 3):
        out[name] = [_num(x) for x in np.ravel(v[..., part])]
        if rv is not None:
            bands = [_ci(col) or [None, None] for col in rv[:, part].T]
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
    p2 = _approach2_predict(laws, grid) if laws else np.full((3, len(grid)), np.nan)
    p3 = _frontier_optimum(terms, front, grid)
    rp2 = _approach2_predict({n: v[:, None] for n, v in reps2.items()}, grid) if reps2 else None
    rp3 = _frontier_optimum(reps3, front, grid) if reps3 else None
    warnings = r.warnings + _warnings(r, a2, a3, bootstrap, _frontier_optimum(terms, front, r.budgets)[0])
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
                                       "flops_per_param_token": _num(t / (p3[0][..., i] * p3[1][..., i]).squeeze())}}
                        for i, t in enumerate(targets)],
        "curves": {"flops": curve.tolist(), "approach2": _curve(p2, rp2, tail), "approach3": _curve(p3, rp3, tail)},
        "warnings": warnings,
        "reference": {"soda_published": SODA_PUBLISHED},
    }


# --- a short human summary -------------------------------------------------------------------

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
