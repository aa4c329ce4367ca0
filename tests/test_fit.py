"""`soda-scaling fit` / `plot`: known loss surfaces recovered, intervals cover the truth, bad input, plots."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy.optimize import least_squares

from scaling import fit as F
from scaling.cli import main
from scaling.plan import PAPER_BUDGETS
from tokenize_audio.errors import SodaError

TRUTH = {"E": 1.7, "A": 400.0, "B": 1500.0, "alpha": 0.34, "beta": 0.28}  # Chinchilla-like
A_TRUE = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
K = 6.0  # C = 6 N D


def optimum(c: float) -> float:
    t = TRUTH
    g = (t["alpha"] * t["A"] / (t["beta"] * t["B"])) ** (1 / (t["alpha"] + t["beta"]))
    return g * (c / K) ** A_TRUE


def sweep(noise=0.0, seed=0, per=9, span=1.5, budgets=PAPER_BUDGETS, jitter=0.0) -> list[dict]:
    """`per` runs per budget, log-spaced over N* e^[-span, span]; loss times exp(noise * normal)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for u in np.linspace(-span, span, per):
            n = optimum(c) * math.exp(u)
            d = c / (K * n)
            loss = TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]
            flops = c * (1 + jitter * rng.uniform(-1, 1))
            rows.append({"name": f"run{len(rows)}", "budget": c, "flops": flops, "params": n, "tokens": d,
                         "loss": loss * math.exp(noise * rng.standard_normal())})
    return rows


def write(path, rows, columns=None):
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def fit_rows(tmp_path, rows, bootstrap=0, **kw):
    return F.fit_scaling(F.load_results(write(tmp_path / "results.csv", rows)), bootstrap=bootstrap, **kw)


def run(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


def test_noise_free_recovers_exponents(tmp_path):
    fit = fit_rows(tmp_path, sweep(), bootstrap=20)
    for approach in ("approach2", "approach3"):
        assert fit[approach]["a"] == pytest.approx(A_TRUE, rel=0.02)
        assert fit[approach]["b"] == pytest.approx(1 - A_TRUE, rel=0.02)
    a3 = fit["approach3"]
    for name, value in TRUTH.items():
        assert a3[name] == pytest.approx(value, rel=1e-3), name
    assert a3["flops_per_param_token"] == pytest.approx(K)
    assert a3["params_coefficient"] * 1e22 ** a3["a"] == pytest.approx(optimum(1e22), rel=1e-3)
    assert a3["tokens_coefficient"] * 1e22 ** a3["b"] == pytest.approx(1e22 / (K * optimum(1e22)), rel=1e-3)
    for o in fit["approach2"]["optima"]:  # symmetric sampling: the parabola's minimum is N* itself
        assert o["params"] == pytest.approx(optimum(o["budget"]), rel=0.02) and o["interior"]
    p = fit["predictions"][-1]
    assert p["flops"] == pytest.approx(100 * PAPER_BUDGETS[-1])
    assert p["approach3"]["params"] == pytest.approx(optimum(p["flops"]), rel=1e-3)
    assert p["approach2"]["params"] == pytest.approx(optimum(p["flops"]), rel=0.05)
    assert fit["warnings"] == [] and fit["excluded"] == []


def test_noisy_intervals_contain_truth(tmp_path):
    """1% noise, 11 runs per budget over a 55x range of N (about 19 in 20 data seeds cover the truth)."""
    fit = fit_rows(tmp_path, sweep(noise=0.01, seed=1, per=11, span=2.0), bootstrap=400, seed=0)
    truth = {"a": A_TRUE, "b": 1 - A_TRUE}
    for approach, width in (("approach2", 0.15), ("approach3", 0.08)):
        for key, value in truth.items():
            lo, hi = fit[approach][f"{key}_ci"]
            assert lo < value < hi and hi - lo < width, (approach, key, lo, hi)
    for key in ("alpha", "beta", "E"):
        lo, hi = fit["approach3"][f"{key}_ci"]
        assert lo < TRUTH[key] < hi, (key, lo, hi)
    assert fit["approach3"]["bootstrap_valid"] == 400 and fit["approach2"]["bootstrap_valid"] > 360


def test_one_bad_run_does_not_drag_the_fit(tmp_path):
    rows = sweep()
    rows[3 * 9 + 8]["loss"] *= 1.05  # the largest model of one budget, 5% worse (e.g. a bad LR)
    fit = fit_rows(tmp_path, rows)
    for approach in ("approach2", "approach3"):
        assert fit[approach]["a"] == pytest.approx(A_TRUE, rel=0.01), approach


def test_batched_bootstrap_refit_matches_scipy(tmp_path):
    """The fast batched Huber refit solves the same problem as scipy's least_squares."""
    r = F.load_results(write(tmp_path / "r.csv", sweep(noise=0.01, seed=2)))
    ln_n, ln_d, log_loss = np.log(r.params) - 20, np.log(r.tokens) - 23, np.log(r.loss)
    start = F._grid_start(ln_n, ln_d, r.loss)
    delta = 0.01
    ref = least_squares(lambda t: F._log_residuals(t, ln_n, ln_d, log_loss)[0], start,
                        jac=lambda t: F._log_residuals(t, ln_n, ln_d, log_loss)[1], loss="huber", f_scale=delta,
                        bounds=([0, 0, 0, 0.005, 0.005], [np.inf, np.inf, np.inf, 3, 3])).x
    batched = F._refine_batched(start[None], ln_n[None], ln_d[None], log_loss[None], delta)[0]
    np.testing.assert_allclose(batched, ref, rtol=1e-4)


def test_grouping_without_budget_column_matches(tmp_path):
    rows = sweep(noise=0.005, seed=3, jitter=0.01)
    with_budget = F.load_results(write(tmp_path / "a.csv", rows))
    without = F.load_results(write(tmp_path / "b.csv", rows, ["name", "flops", "params", "tokens", "loss"]))
    for c in PAPER_BUDGETS:
        members = with_budget.budget == c
        assert len(np.unique(without.budget[members])) == 1
        assert np.unique(without.budget[members])[0] == pytest.approx(c, rel=0.01)
    assert len(without.budgets) == len(PAPER_BUDGETS)
    fa, fb = (F.fit_scaling(r, bootstrap=0) for r in (with_budget, without))
    assert fb["approach2"]["a"] == pytest.approx(fa["approach2"]["a"], abs=0.01)
    assert fb["approach3"]["a"] == pytest.approx(fa["approach3"]["a"], abs=1e-9)  # uses runs, not budgets


def test_chained_flops_need_a_budget_column(tmp_path):
    rows = sweep(budgets=(1e18, 1e19, 1e20))
    for i, row in enumerate(rows[:9]):  # 1e18 runs creeping up 4% at a time: no clear budget
        row["flops"] = 1e18 * 1.04 ** i
    write(tmp_path / "r.csv", rows, ["flops", "params", "tokens", "loss"])
    with pytest.raises(SodaError, match="chain into one budget.*add a `budget` column"):
        F.load_results(tmp_path / "r.csv")


def test_unfinished_runs_are_reported_not_dropped(tmp_path, capsys):
    rows = sweep()
    rows[4]["loss"], rows[20]["loss"] = "nan", ""
    out = tmp_path / "fit"
    assert run("fit", write(tmp_path / "r.csv", rows), "--out", out, "--bootstrap", "10") == 0
    fit = json.loads((out / "fit.json").read_text())
    assert [e["line"] for e in fit["excluded"]] == [6, 22]  # header is line 1
    assert "nan" in fit["excluded"][0]["reason"] and "empty" in fit["excluded"][1]["reason"]
    assert fit["input"]["runs"] == len(rows) - 2
    text = capsys.readouterr().out
    assert "2 excluded" in text and "line 6: loss is nan" in text


def test_optimum_outside_the_sweep_is_flagged(tmp_path):
    rows = [r for i, r in enumerate(sweep()) if i % 9 < 4]  # only the smaller half of every budget
    fit = fit_rows(tmp_path, rows)
    assert not any(o["interior"] for o in fit["approach2"]["optima"])
    assert sum("optimum outside the sampled range" in w for w in fit["warnings"]) == len(PAPER_BUDGETS)
    assert any(w.startswith("Approach 3: N* lies outside the sampled model sizes") for w in fit["warnings"])


def test_undetermined_approach2_still_gives_approach3_and_plots(tmp_path, capsys):
    """Budgets whose losses do not curve upwards (a noisy micro sweep) leave Approach 2 without a law: said
    in fit.json, the summary and a warning, while Approach 3, the parabolas and all plots still come out."""
    rows = sweep(budgets=PAPER_BUDGETS[:3], per=7)
    for i, r in enumerate(rows[7:], 7):  # budgets 2 and 3: loss falls with N throughout (no minimum)
        r["loss"] = 5.0 - 0.1 * (i % 7)
    out = tmp_path / "fit"
    assert run("fit", write(tmp_path / "r.csv", rows), "--out", out, "--bootstrap", "20") == 0
    fit = json.loads((out / "fit.json").read_text())
    a2 = fit["approach2"]
    assert a2["a"] is None and a2["b"] is None and "only 1 budget(s) have a loss minimum" in a2["error"]
    assert [o["params"] is not None for o in a2["optima"]] == [True, False, False]
    assert all(p["approach2"]["params"] is None for p in fit["predictions"])
    assert fit["approach3"]["a"] is not None and fit["predictions"][0]["approach3"]["params"] > 0
    text = capsys.readouterr().out
    assert "N* ~ C^undefined" in text and "warning: Approach 2 not determined" in text
    assert run("plot", out) == 0
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in ("isoflop.png", "optima.png", "residuals.png"))


def test_spreadsheet_exports(tmp_path):
    text = write(tmp_path / "r.csv", sweep()).read_text()
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")
    assert len(F.load_results(tmp_path / "bom.csv").loss) == 63
    (tmp_path / "utf16.csv").write_text(text, encoding="utf-16")
    with pytest.raises(SodaError, match="utf16.csv: not a UTF-8 CSV"):
        F.load_results(tmp_path / "utf16.csv")


def test_seeded_bootstrap_is_reproducible(tmp_path):
    rows = sweep(noise=0.01, seed=4)
    one, two, other = (fit_rows(tmp_path, rows, bootstrap=50, seed=s) for s in (7, 7, 8))
    assert one == two
    assert one["approach3"]["a_ci"] != other["approach3"]["a_ci"]


def test_cli_fit_then_plot(tmp_path, capsys):
    results = write(tmp_path / "results.csv", sweep(noise=0.005, seed=5))
    out = tmp_path / "fit"
    assert run("fit", results, "--out", out, "--target-flops", "1e21,1e22", "--bootstrap", "50", "--seed", "3") == 0
    text = capsys.readouterr().out
    assert "Approach 2" in text and "Approach 3" in text and "0.367" in text and "At 1e+22 FLOPs" in text
    fit = json.loads((out / "fit.json").read_text())
    assert [p["flops"] for p in fit["predictions"]] == [1e21, 1e22]
    for key in ("a", "b", "a_ci", "b_ci", "optima", "params_coefficient", "tokens_coefficient"):
        assert key in fit["approach2"], key
    for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert key in fit["approach3"] and len(fit["approach3"][f"{key}_ci"]) == 2, key
    assert not list(out.glob(".*.tmp"))  # atomic write leaves no temp file
    assert run("plot", out) == 0
    for name in ("isoflop.png", "optima.png", "residuals.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bad_rows(kind):
    rows = sweep(budgets=PAPER_BUDGETS[:3])
    columns = None
    if kind == "missing":
        columns = ["budget", "flops", "params", "loss"]
    elif kind == "zero":
        rows[5]["params"] = 0
    elif kind == "negative":
        rows[5]["flops"] = -3e18
    elif kind == "inf":
        rows[5]["tokens"] = "inf"
    elif kind == "text":
        rows[5]["params"] = "125M"
    elif kind == "loss":
        rows[5]["loss"] = -1
    elif kind == "budgets":
        rows = rows[:18]
    elif kind == "points":
        rows = rows[:9] + rows[9:11] + rows[18:]
    elif kind == "sizes":
        for row in rows[10:18]:
            row["params"], row["tokens"] = rows[9]["params"], rows[9]["tokens"]
    elif kind == "points-excluded":
        rows[9]["loss"] = rows[10]["loss"] = rows[11]["loss"] = rows[12]["loss"] = "nan"
        rows[13]["loss"] = rows[14]["loss"] = rows[15]["loss"] = "inf"
    return rows, columns


@pytest.mark.parametrize("kind, message", [
    ("missing", "missing column tokens"),
    ("zero", "line 7: params is '0'; it must be a positive finite number"),
    ("negative", "line 7: flops is '-3e+18'; it must be a positive"),
    ("inf", "line 7: tokens is 'inf'; it must be a positive finite number"),
    ("text", "line 7: params is '125M', not a number"),
    ("loss", "line 7: loss is '-1'; a cross-entropy must be positive"),
    ("budgets", "2 budget(s) (3e+18, 9e+18 FLOPs); a scaling law needs at least 3"),
    ("points", "budget 9e+18 FLOPs has 2 usable run(s) (line 11, 12); a parabola needs at least 3"),
    ("points-excluded", "budget 9e+18 FLOPs has 2 usable run(s) (line 18, 19); a parabola needs at least 3; "
                        "7 run(s) were excluded for an empty, nan or inf loss (line 11, 12, 13, 14, 15, 16, 17)"),
    ("sizes", "budget 9e+18 FLOPs has only 1 distinct model size(s) or token count(s)"),
])
def test_bad_input(kind, message, tmp_path, capsys):
    rows, columns = _bad_rows(kind)
    path = write(tmp_path / "results.csv", rows, columns)
    assert run("fit", path, "--out", tmp_path / "fit", "--bootstrap", "5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("soda-scaling: error: ")
    assert str(path) in err and message in err
    assert not (tmp_path / "fit").exists()


@pytest.mark.parametrize("args, message", [
    (["fit", "nope.csv", "--out", "fit"], "results file nope.csv not found"),
    (["fit", "r.csv", "--out", "fit", "--target-flops", "1e21,x"], "expected comma-separated numbers"),
    (["fit", "r.csv", "--out", "fit", "--bootstrap", "-1"], "--bootstrap must be >= 0"),
    (["plot", "nothing-here"], "nothing-here/fit.json not found"),
])
def test_cli_usage_errors(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "r.csv", sweep(budgets=PAPER_BUDGETS[:3]))
    assert run(*args) == 2
    assert message in capsys.readouterr().err
