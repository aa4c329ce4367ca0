"""Reading an IsoFLOP sweep's results CSV for `soda-scaling fit`: the runs, their budgets, and what is wrong with them.

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

import numpy as np

from tokenize_audio.errors import SodaError

REQUIRED = ("flops", "params", "tokens", "loss")
SHAPE_COLUMNS = ("width", "vocab", "seq_len")  # optional: SODA's sweep rule at `width` gives the frontier's cost
GROUP_TOLERANCE = 0.05  # runs whose FLOPs agree within 5% form one budget when there is no `budget` column
MIN_BUDGETS = MIN_POINTS = 3
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
