"""`soda-scaling fit` input checks: repeated rows, and values no real run can have (issue 14, item 14)."""

from __future__ import annotations

import json

import pytest
from test_fit import run, sweep, write

from scaling.plan import PAPER_BUDGETS

BUDGETS = PAPER_BUDGETS[:4]


def _fit(tmp_path, name, rows, *flags):
    out = tmp_path / name
    code = run("fit", write(tmp_path / f"{name}.csv", rows), "--out", out, "--bootstrap", "200", "--seed", "1",
               "--target-flops", "3e21", *flags)
    return code, (json.loads((out / "fit.json").read_text()) if code == 0 else None)


def test_exact_duplicate_rows_are_dropped_counted_and_said(tmp_path, capsys):
    """The same runs listed twice (two gathers concatenated) would make the bootstrap believe in twice the
    evidence and narrow every interval; they are dropped, counted and named, and the fit equals the clean one."""
    rows = sweep(noise=0.01, seed=2, per=7, budgets=BUDGETS)
    assert _fit(tmp_path, "clean", rows)[0] == 0
    clean = json.loads((tmp_path / "clean" / "fit.json").read_text())
    capsys.readouterr()
    doubled = rows + [dict(r) for r in rows[:10]]  # lines 30..39 repeat lines 2..11
    code, fit = _fit(tmp_path, "doubled", doubled)
    assert code == 0
    out = capsys.readouterr().out
    assert "10 exact duplicate rows dropped (line 30 repeats line 2, line 31 repeats line 3" in out
    assert "--keep-duplicates" in out
    assert fit["input"]["runs"] == len(rows) and fit["input"]["duplicates"] == 10
    assert [d["line"] for d in fit["duplicates"]] == list(range(30, 40))
    assert all(d["dropped"] and d["repeats"] == d["line"] - 28 for d in fit["duplicates"])
    for key in ("a_ci", "b_ci", "E_ci"):
        assert fit["approach3"][key] == clean["approach3"][key]
    assert fit["predictions"] == clean["predictions"]


def test_keep_duplicates_keeps_them_with_a_warning(tmp_path):
    rows = sweep(noise=0.01, seed=2, per=7, budgets=BUDGETS)
    clean = _fit(tmp_path, "clean", rows)[1]
    doubled = rows + [dict(r) for r in rows]
    code, fit = _fit(tmp_path, "kept", doubled, "--keep-duplicates")
    assert code == 0
    assert fit["input"]["runs"] == 2 * len(rows) and not any(d["dropped"] for d in fit["duplicates"])
    assert any("28 exact duplicate rows kept (--keep-duplicates)" in w for w in fit["warnings"])
    lo, hi = fit["predictions"][0]["approach3"]["params_ci"]
    clean_lo, clean_hi = clean["predictions"][0]["approach3"]["params_ci"]
    assert hi - lo < 0.9 * (clean_hi - clean_lo)  # why they are dropped by default: the intervals narrow


def test_the_same_run_under_another_name_is_warned_about(tmp_path):
    """Rows whose flops, params, tokens and loss all agree but whose other columns differ (a run gathered under
    two names): most likely one run twice, so the warning names them; they are not exact copies, so kept."""
    rows = sweep(noise=0.01, seed=2, per=7, budgets=BUDGETS)
    rows.append(dict(rows[3], name="renamed"))
    code, fit = _fit(tmp_path, "renamed", rows)
    assert code == 0
    assert any("flops, params, tokens and loss" in w and "line 30 repeats line 5" in w for w in fit["warnings"])
    assert fit["input"]["runs"] == len(rows) and fit["input"]["duplicates"] == 1
    assert fit["duplicates"] == [{"line": 30, "repeats": 5, "exact": False, "dropped": False}]


@pytest.mark.parametrize("column, value, message", [
    ("flops", 1e300, "line 7: flops is '1e+300'"),
    ("params", 1e300, "line 7: params is '1e+300'"),
    ("tokens", 1e300, "line 7: tokens is '1e+300'"),
    ("budget", 1e300, "line 7: budget is '1e+300'"),
    ("loss", 1e300, "line 7: loss is '1e+300'"),
    ("loss", 150, "line 7: loss is '150'"),
    ("params", 0.5, "line 7: params is '0.5'"),
    ("tokens", "-inf", "line 7: tokens is '-inf'"),
])
def test_values_no_real_run_has_are_refused_naming_the_row(column, value, message, tmp_path, capsys):
    """1e300 used to reach the solvers (a LinAlgError traceback, or a silently absurd fit); a loss of 1e300 was
    accepted. Each is one line naming the file, the line and the column."""
    rows = sweep(budgets=BUDGETS)
    rows[5][column] = value
    path = write(tmp_path / "results.csv", rows)
    assert run("fit", path, "--out", tmp_path / "fit", "--bootstrap", "5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"soda-scaling: error: {path}: {message}"), err
    assert "Traceback" not in err and not (tmp_path / "fit").exists()


def test_loss_above_twice_ln_vocab_is_refused_when_the_vocabulary_is_known(tmp_path, capsys):
    rows = sweep(budgets=BUDGETS)
    for r in rows:
        r["vocab"] = 2310  # ln 2310 = 7.7: a model that guesses uniformly scores that
    rows[5]["loss"] = 20.0
    path = write(tmp_path / "results.csv", rows)
    assert run("fit", path, "--out", tmp_path / "fit", "--bootstrap", "5") == 2
    err = capsys.readouterr().err
    assert "line 7: loss is '20.0'" in err and "vocab 2310" in err and err.count("\n") == 1


def test_flops_inconsistent_with_params_and_tokens_by_orders_of_magnitude(tmp_path, capsys):
    """params in millions: FLOPs / (N D) comes out a million times too large; named, with the likely cause."""
    rows = sweep(budgets=BUDGETS)
    rows[5]["params"] = rows[5]["params"] / 1e6
    path = write(tmp_path / "results.csv", rows)
    assert run("fit", path, "--out", tmp_path / "fit", "--bootstrap", "5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 7: flops / (params x tokens) is 6e+06" in err and "units" in err
