"""`soda-scaling plan`: SODA's sweep rules, the worked d768 row, skipped runs reported, bad input."""

from __future__ import annotations

import csv
import math

import pytest

from scaling.cli import main
from scaling.plan import PAPER_BUDGETS, default_widths, plan_run, plan_sweep


def test_worked_row():
    r = plan_run(3e18, 768)
    assert (r.shape.layers, r.shape.heads, r.batch, r.steps) == (8, 6, 8, 64326)
    assert r.lr == pytest.approx(0.00122, abs=5e-6)
    assert r.beta2 == pytest.approx(0.9987, abs=1e-4)
    assert r.tokens == pytest.approx(2.11e9, rel=2e-3)
    assert r.flops == pytest.approx(3e18, rel=1e-4) and not r.skipped


def test_lr_cap_halves_batch():
    r = plan_run(3e20, 640)
    assert r.lr <= 0.01 and 0.33 * math.sqrt(2 * r.batch) / 640 > 0.01


def test_grids_and_skips():
    assert default_widths(3e18) == list(range(128, 2049, 128))
    assert default_widths(9e19)[:3] == [128, 384, 640]
    runs = plan_sweep(PAPER_BUDGETS, paper_targets=True)
    kept = [r for r in runs if not r.skipped]
    assert {r.budget for r in kept} == set(PAPER_BUDGETS)
    assert all(r.batch >= 8 and r.steps < 400_000 for r in kept)
    assert {r.skipped.split()[0] for r in runs if r.skipped} <= {"batch"} | {str(r.steps) for r in runs}
    assert min(r.params for r in kept) == pytest.approx(77e6, rel=0.01)  # d256 / 3 layers, as in SODA
    widths_3e20 = {r.shape.width for r in kept if r.budget == 3e20}
    assert {2048, 2304, 2816, 3072} <= widths_3e20
    assert 55 <= len(kept) <= 70  # SODA reports 64 models; its exact exclusions are not published


def test_cli_writes_csv(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    assert main(["plan", "--budgets", "3e18,9e18", "--widths", "256,768,2048", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6
    row = next(r for r in rows if r["width"] == "768" and float(r["budget"]) == 3e18)
    assert (row["layers"], row["batch"], row["steps"], row["skipped"]) == ("8", "8", "64326", "")
    assert next(r for r in rows if r["width"] == "2048" and float(r["budget"]) == 3e18)["skipped"] == "batch 1 < 8"
    assert "2 skipped" in capsys.readouterr().out  # d2048 at both budgets


@pytest.mark.parametrize("args, message", [
    (["plan", "--out", "x.csv"], "give --budgets"),
    (["plan", "--budgets", "3e18,abc", "--out", "x.csv"], "expected comma-separated numbers"),
    (["plan", "--budgets", "-1", "--out", "x.csv"], "must be positive"),
    (["plan", "--budgets", "1e11", "--min-batch", "0", "--out", "x.csv"], "--min-batch 0: must be at least 1"),
    (["plan", "--budgets", "3e18", "--seq-len", "0", "--out", "x.csv"], "--seq-len 0: must be at least 2"),
    (["plan", "--budgets", "3e18", "--seq-len", "-128", "--out", "x.csv"], "--seq-len -128: must be at least 2"),
    (["plan", "--budgets", "inf", "--out", "x.csv"], "--budgets 'inf': values must be positive finite numbers"),
    (["plan", "--budgets", "3e18,nan", "--out", "x.csv"], "--budgets '3e18,nan': values must be positive finite"),
    (["plan", "--budgets", "3e18", "--vocab", "-5", "--out", "x.csv"], "--vocab -5: must be at least 1"),
    (["plan", "--budgets", "3e18", "--widths", "256,0.5", "--out", "x.csv"], "--widths '256,0.5': widths must be "
                                                                               "whole numbers"),
])
def test_bad_input(args, message, capsys, tmp_path, monkeypatch):
    """One line naming the flag, exit code 2, no traceback, no CSV."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()


def test_micro_runs_need_min_batch(tmp_path):
    """At CPU-demo budgets SODA's batch rule gives 1 sequence (an integer, never a fraction): skipped unless
    --min-batch allows it."""
    r = plan_run(1e11, 32, vocab=16646, seq_len=128)
    assert r.batch == 1 and isinstance(r.batch, int) and r.skipped == "batch 1 < 8"
    r = plan_run(1e11, 32, vocab=16646, seq_len=128, min_batch=1)
    assert not r.skipped and r.steps == r.tokens // 128 and r.lr == 0.01
    out = tmp_path / "plan.csv"
    assert main(["plan", "--budgets", "1e11", "--widths", "32,64", "--vocab", "16646", "--seq-len", "128",
                 "--min-batch", "1", "--out", str(out)]) == 0
    assert [r["skipped"] for r in csv.DictReader(out.open())] == ["", ""]


def test_batch_floor_raises_micro_batches(tmp_path, capsys):
    """--batch-floor lifts the rule's 1-sequence batch to the floor (not skipped), keeps the budget's tokens
    and re-derives the LR from the raised batch (capped); larger batches are left alone."""
    r = plan_run(1e11, 32, vocab=2310, seq_len=128, batch_floor=8)
    assert r.batch == 8 and not r.skipped
    assert r.steps == round(r.tokens / (8 * 128)) and r.lr == min(0.01, 0.33 * math.sqrt(8) / 32)
    assert plan_run(3e18, 768, batch_floor=4).batch == 8  # already above the floor
    out = tmp_path / "plan.csv"
    assert main(["plan", "--budgets", "1e11", "--widths", "32,64", "--vocab", "2310", "--seq-len", "128",
                 "--batch-floor", "8", "--out", str(out)]) == 0
    assert [(r["batch"], r["skipped"]) for r in csv.DictReader(out.open())] == [("8", ""), ("8", "")]
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--budgets", "1e11", "--batch-floor", "0", "--out", str(out)])
    assert exc.value.code == 2 and "--batch-floor 0: must be at least 1" in capsys.readouterr().err
