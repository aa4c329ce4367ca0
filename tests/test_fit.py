"""`soda-scaling fit` / `plot`: known loss surfaces recovered, intervals cover the truth, bad input, plots."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy.optimize import least_squares, minimize_scalar

from scaling.cli import main
from scaling.fit import fit_scaling
from scaling.laws import _grid_start, _log_residuals, _refine_batched
from scaling.plan import PAPER_BUDGETS, plan_sweep
from scaling.results import load_results
from scaling.summary import summary
from soda.shape import ModelShape, params, training_flops_per_token
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
    return fit_scaling(load_results(write(tmp_path / "results.csv", rows)), bootstrap=bootstrap, **kw)


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
    r = load_results(write(tmp_path / "r.csv", sweep(noise=0.01, seed=2)))
    ln_n, ln_d, log_loss = np.log(r.params) - 20, np.log(r.tokens) - 23, np.log(r.loss)
    start = _grid_start(ln_n, ln_d, r.loss)
    delta = 0.01
    ref = least_squares(lambda t: _log_residuals(t, ln_n, ln_d, log_loss)[0], start,
                        jac=lambda t: _log_residuals(t, ln_n, ln_d, log_loss)[1], loss="huber", f_scale=delta,
                        bounds=([0, 0, 0, 0.005, 0.005], [np.inf, np.inf, np.inf, 3, 3])).x
    batched = _refine_batched(start[None], ln_n[None], ln_d[None], log_loss[None], delta)[0]
    np.testing.assert_allclose(batched, ref, rtol=1e-4)


def test_grouping_without_budget_column_matches(tmp_path):
    rows = sweep(noise=0.005, seed=3, jitter=0.01)
    with_budget = load_results(write(tmp_path / "a.csv", rows))
    without = load_results(write(tmp_path / "b.csv", rows, ["name", "flops", "params", "tokens", "loss"]))
    for c in PAPER_BUDGETS:
        members = with_budget.budget == c
        assert len(np.unique(without.budget[members])) == 1
        assert np.unique(without.budget[members])[0] == pytest.approx(c, rel=0.01)
    assert len(without.budgets) == len(PAPER_BUDGETS)
    fa, fb = (fit_scaling(r, bootstrap=0) for r in (with_budget, without))
    assert fb["approach2"]["a"] == pytest.approx(fa["approach2"]["a"], abs=0.01)
    assert fb["approach3"]["a"] == pytest.approx(fa["approach3"]["a"], abs=1e-9)  # uses runs, not budgets


def test_chained_flops_need_a_budget_column(tmp_path):
    rows = sweep(budgets=(1e18, 1e19, 1e20))
    for i, row in enumerate(rows[:9]):  # 1e18 runs creeping up 4% at a time: no clear budget
        row["flops"] = 1e18 * 1.04 ** i
    write(tmp_path / "r.csv", rows, ["flops", "params", "tokens", "loss"])
    with pytest.raises(SodaError, match="chain into one budget.*add a `budget` column"):
        load_results(tmp_path / "r.csv")


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
    assert len(load_results(tmp_path / "bom.csv").loss) == 63
    (tmp_path / "utf16.csv").write_text(text, encoding="utf-16")
    with pytest.raises(SodaError, match="utf16.csv: not a UTF-8 CSV"):
        load_results(tmp_path / "utf16.csv")


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


# --- Approach 3's frontier: optima along the real cost of (N, D), not C = k N D -------------------

SODA_TRUTH = {"E": 1.6, "A": 7430.0, "B": 609.0, "alpha": 0.5, "beta": 0.3}  # optimum inside SODA's grid
FAR = (3e22, 1e24)  # 100x SODA's largest budget, and further


def soda_loss(n, d):
    t = SODA_TRUTH
    return t["E"] + t["A"] / n ** t["alpha"] + t["B"] / d ** t["beta"]


def soda_grid_rows(noise=0.0, seed=0) -> list[dict]:
    """SODA's 66 planned runs (7 budgets, its widths and target runs, vocab 144,644, seq 4096): their real
    params, tokens and FLOPs (3 x forward, so FLOPs/(N D) runs from 3.6 to 6.3) and the surface's loss."""
    rng = np.random.default_rng(seed)
    return [{"name": r.name, "budget": r.budget, "width": r.shape.width, "params": r.params, "tokens": r.tokens,
             "flops": r.flops, "loss": soda_loss(r.params, r.tokens) * math.exp(noise * rng.standard_normal())}
            for r in plan_sweep(PAPER_BUDGETS, paper_targets=True) if not r.skipped]


def family_optimum(c: float) -> tuple[float, float]:
    """The truth: the surface minimised along SODA's sweep rule, width continuous (scipy, one budget)."""
    def along(log_w):
        shape = ModelShape.sweep_continuous(math.exp(log_w))
        return params(shape), c / training_flops_per_token(shape)
    log_w = minimize_scalar(lambda u: soda_loss(*along(u)), bounds=(math.log(64), math.log(2**17)),
                            method="bounded", options={"xatol": 1e-10}).x
    return tuple(float(v) for v in along(log_w))


def errors(prediction, truth) -> np.ndarray:
    """|ln| errors of N* and D* against the truth."""
    return np.abs(np.log([prediction["params"] / truth[0], prediction["tokens"] / truth[1]]))


def test_continuous_sweep_family_runs_through_the_real_shapes():
    """What the frontier walks: at SODA's widths the unrounded rule is within 4% of the real shapes' N and
    FLOPs per token, and the best real shape at a far budget is a near neighbour of its optimum."""
    for width in range(128, 8193, 128):
        real, smooth = ModelShape.sweep(width), ModelShape.sweep_continuous(width)
        assert params(smooth) == pytest.approx(params(real), rel=0.04), width
        assert training_flops_per_token(smooth) == pytest.approx(training_flops_per_token(real), rel=0.04), width
    n_true, _ = family_optimum(FAR[0])
    shapes = [ModelShape.sweep(w) for w in range(128, 32769, 128)]
    best = min(shapes, key=lambda s: soda_loss(params(s), FAR[0] / training_flops_per_token(s)))
    assert params(best) == pytest.approx(n_true, rel=0.08)


def test_frontier_follows_the_sweep_shapes_not_a_constant_k(tmp_path):
    """The runs carry `width` only (as a sweep's results.csv does): vocab and seq_len are solved from their
    params and FLOPs, Approach 3 walks the shape family, and its far optima land within 0.5% of the truth
    where the constant-k conversion (k = 5.46, the median) misses N* or D* by 7-10%."""
    path = write(tmp_path / "results.csv", soda_grid_rows())
    fits = {}
    for cost in ("auto", "constant"):
        out = tmp_path / cost
        assert run("fit", path, "--out", out, "--bootstrap", "10", "--target-flops", ",".join(map(str, FAR)),
                   "--cost", cost) == 0
        fits[cost] = json.loads((out / "fit.json").read_text())
    a3 = fits["auto"]["approach3"]
    assert a3["frontier_cost"] == "shape-family" and fits["auto"]["settings"]["cost"] == "auto"
    assert (a3["frontier"]["vocab"], a3["frontier"]["seq_len"]) == (144_644, 4096)
    assert fits["constant"]["approach3"]["frontier_cost"] == "constant"
    assert fits["constant"]["approach3"]["frontier"]["flops_per_param_token"] == pytest.approx(5.46, abs=0.01)
    lo, hi = a3["frontier"]["flops_per_param_token_range"]
    assert lo < 3.7 and hi > 6.2
    for name in ("alpha", "beta", "E"):
        assert a3[name] == pytest.approx(SODA_TRUTH[name], rel=1e-3)
    for shapes, constant in zip(fits["auto"]["predictions"], fits["constant"]["predictions"]):
        truth = family_optimum(shapes["flops"])
        new, old = errors(shapes["approach3"], truth), errors(constant["approach3"], truth)
        assert (new < 0.005).all() and (new < old).all() and old.max() > 0.05, (shapes["flops"], new, old)
    assert "optima along SODA's sweep shapes (vocab 144,644, seq_len 4,096" in summary(fits["auto"])


def test_frontier_bootstrap_intervals_cover_the_truth(tmp_path):
    """0.5% noise on SODA's grid: the intervals of the shape-family optima at 100x the largest budget hold
    the truth, and every resample gives an optimum."""
    fit = fit_rows(tmp_path, soda_grid_rows(noise=0.005, seed=6), bootstrap=200, target_flops=[FAR[0]])
    p = fit["predictions"][0]["approach3"]
    n_true, d_true = family_optimum(FAR[0])
    assert p["params_ci"][0] < n_true < p["params_ci"][1] and p["tokens_ci"][0] < d_true < p["tokens_ci"][1]
    assert fit["approach3"]["bootstrap_valid"] == 200
    bands = fit["curves"]["approach3"]["params_band"]
    assert all(lo < hi for lo, hi in zip(*bands))


def test_without_shapes_the_frontier_fits_k_of_n(tmp_path):
    """No `width` column: FLOPs/(N D) is fitted as a function of N from the runs (said in fit.json and the
    summary), which still beats the constant k at far budgets."""
    rows = soda_grid_rows()
    path = write(tmp_path / "results.csv", rows, ["name", "budget", "params", "tokens", "flops", "loss"])
    fitted, constant = (fit_scaling(load_results(path), bootstrap=0, target_flops=FAR, cost=c)
                        for c in ("auto", "constant"))
    a3 = fitted["approach3"]
    assert a3["frontier_cost"] == "fitted" and "no `width` column" in a3["frontier"]["reason"]
    assert "fitted to the runs" in summary(fitted)
    for new_p, old_p in zip(fitted["predictions"], constant["predictions"]):
        truth = family_optimum(new_p["flops"])
        new, old = errors(new_p["approach3"], truth), errors(old_p["approach3"], truth)
        assert (new < 0.03).all() and new.max() < old.max(), (new_p["flops"], new, old)


def test_widths_that_are_not_the_sweep_rule_fall_back_to_fitted(tmp_path):
    rows = soda_grid_rows()
    for r in rows:
        r["params"] *= 1.1  # some other family: the rule's counts no longer match
    fit = fit_rows(tmp_path, rows)
    assert fit["approach3"]["frontier_cost"] == "fitted"
    assert "not that shape family" in fit["approach3"]["frontier"]["reason"]


def test_constant_cost_is_the_old_closed_form(tmp_path):
    fit = fit_rows(tmp_path, soda_grid_rows(), cost="constant")
    a3, p = fit["approach3"], fit["predictions"][-1]
    assert p["approach3"]["params"] == pytest.approx(a3["params_coefficient"] * p["flops"] ** a3["a"], rel=1e-6)
    assert p["approach3"]["tokens"] == pytest.approx(a3["tokens_coefficient"] * p["flops"] ** a3["b"], rel=1e-6)


def test_shape_family_without_widths_is_a_one_line_error(tmp_path, capsys):
    path = write(tmp_path / "results.csv", soda_grid_rows(), ["budget", "params", "tokens", "flops", "loss"])
    assert run("fit", path, "--out", tmp_path / "fit", "--cost", "shape-family") == 2
    err = capsys.readouterr().err
    assert err == f"soda-scaling: error: --cost shape-family: {path} has no `width` column; use --cost fitted\n"
    assert not (tmp_path / "fit").exists()
