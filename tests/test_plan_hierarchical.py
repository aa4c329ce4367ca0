"""`soda-scaling plan --architecture hierarchical`: SODA's rules counted in backbone steps, the depth rule, the CSV
and the soda-train command line of a hierarchical run; flat plans exactly as before."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from scaling import records, sweep
from scaling.cli import main
from scaling.plan import as_rows, plan_hierarchical_run, plan_run, plan_sweep
from soda.shape import (HierarchicalShape, ModelShape, backbone_forward_flops_per_step, hierarchical_params,
                        hierarchical_training_flops_per_step)
from test_sweep import fake  # noqa: F401 -- fixture: the stand-in soda-train

FIXTURES = Path(__file__).parent / "fixtures"


def hierarchical_plan(tmp_path, *flags, budgets="3e18,9e18", widths="256,768,1536"):
    out = tmp_path / "plan.csv"
    assert main(["plan", "--budgets", budgets, "--widths", widths, "--architecture", "hierarchical", *flags,
                 "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("budget", [3e18, 9e18, 3e19])
@pytest.mark.parametrize("width", [256, 768, 1536])
def test_each_run_spends_its_budget_within_the_batch_rounding(budget, width):
    """As for flat: steps are rounded to whole batches, so the run's FLOPs miss the budget by at most half a batch."""
    r = plan_hierarchical_run(budget, width)
    per_step = hierarchical_training_flops_per_step(HierarchicalShape(r.shape), "3x-forward", 1.0)
    assert r.forward_flops_per_token * 3 == pytest.approx(per_step, rel=1e-12)
    assert r.flops == pytest.approx(per_step * r.tokens, rel=1e-12) and r.tokens == r.steps * r.batch * 4096
    assert abs(r.flops - budget) <= per_step * r.batch * 4096 / 2 * (1 + 1e-9)
    flat = plan_run(budget, width)
    assert abs(flat.flops - budget) <= 3 * flat.forward_flops_per_token * flat.batch * 4096 / 2 * (1 + 1e-9)


def test_params_are_the_built_models_and_the_rules_are_flats_in_steps():
    r = plan_hierarchical_run(3e18, 768)
    shape = HierarchicalShape(ModelShape.sweep(768))
    assert r.params == hierarchical_params(shape)
    assert r.non_embedding_params == hierarchical_params(shape, "non-embedding")
    assert r.backbone_params + r.depth_params == r.params and r.non_embedding_params < r.params
    assert r.shape == ModelShape.sweep(768) and (r.shape.layers, r.shape.heads) == (8, 6)
    # batch and LR: SODA's rules with steps for tokens and the backbone's width
    assert (r.batch, r.lr, r.beta2) == (8, pytest.approx(0.33 * 8 ** 0.5 / 768), pytest.approx(0.98 ** (8 / 128)))
    assert r.steps == round(3e18 / (3 * r.forward_flops_per_token) / (8 * 4096))
    assert r.forward_flops_per_audio_second == pytest.approx(12.5 * r.forward_flops_per_token)
    assert r.name == "C3.0e18-d768" and not r.skipped


def test_depth_rule_defaults_and_overrides():
    r = plan_hierarchical_run(3e18, 768)
    assert (r.depth_width, r.depth_layers, r.depth_heads, r.depth_ffn) == (384, 4, 3, 1536)
    r = plan_hierarchical_run(3e18, 768, depth_width=256, depth_layers=2)
    assert (r.depth_width, r.depth_layers, r.depth_heads, r.depth_ffn) == (256, 2, 2, 1024)
    assert r.params == hierarchical_params(HierarchicalShape(ModelShape.sweep(768), depth_width=256, depth_layers=2))
    runs = plan_sweep([3e18], [256, 1024], architecture="hierarchical", depth_layers=6)
    assert [(r.depth_width, r.depth_layers) for r in runs] == [(128, 6), (512, 6)]
    with pytest.raises(ValueError, match="hierarchical architecture only"):
        plan_sweep([3e18], [256], depth_layers=6)


def test_frames_per_step_charges_the_depth_pass_to_that_share_of_steps():
    full, mixed, text = (plan_hierarchical_run(3e18, 768, frames_per_step=f) for f in (1.0, 0.5, 0.0))
    backbone = backbone_forward_flops_per_step(HierarchicalShape(ModelShape.sweep(768)))
    assert text.forward_flops_per_token == backbone
    assert mixed.forward_flops_per_token == pytest.approx((full.forward_flops_per_token + backbone) / 2)
    assert full.tokens < mixed.tokens < text.tokens  # fewer FLOPs a step: more steps for the budget


def test_cli_csv_round_trips_into_the_runner(tmp_path, capsys):
    plan = hierarchical_plan(tmp_path, "--depth-layers", "3")
    printed = capsys.readouterr().out
    assert "5 runs over 2 budgets (1 skipped" in printed
    assert "backbone_steps (not tokens) per run, a depth pass charged to 100% of steps" in printed
    rows = list(csv.DictReader(plan.open()))
    expected = as_rows(plan_sweep([3e18, 9e18], [256, 768, 1536], architecture="hierarchical", depth_layers=3))
    assert rows == [{k: str(v) for k, v in row.items()} for row in expected]
    assert list(rows[0])[:2] == ["budget", "architecture"] and {"depth_width", "depth_layers", "backbone_steps",
                                                                "forward_flops_per_step", "params"} <= set(rows[0])
    assert "tokens" not in rows[0] and "forward_flops_per_token" not in rows[0]
    loaded = sweep.load_plan(plan)
    planned = [r for r in plan_sweep([3e18, 9e18], [256, 768, 1536], architecture="hierarchical", depth_layers=3)
               if not r.skipped]
    assert len(loaded) == len(planned) == 5  # d1536 at 3e18: batch 4 < 8
    for run, r in zip(loaded, planned):
        assert run.hierarchical and (run.depth_width, run.depth_layers, run.frames_per_step) == (r.depth_width, 3, 1.0)
        assert (run.shape, run.params, run.batch, run.steps, run.lr, run.beta2, run.tokens) == \
            (r.shape, r.params, r.batch, r.steps, r.lr, r.beta2, r.tokens)
        assert hierarchical_params(run.hierarchical_shape) == run.params


def test_a_hierarchical_runs_soda_train_command(tmp_path):
    """Family and depth flags; --seq-len, --tokens and --batch-tokens count steps, in the plan as in soda-train."""
    (run, *_) = sweep.load_plan(hierarchical_plan(tmp_path, "--depth-width", "192", widths="768"))
    argv = sweep.train_command(run, tmp_path / "sweep", ["speech=/data"], ["--loss-weights", "graded"])
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert (flag("--architecture"), flag("--depth-width"), flag("--depth-layers")) == ("hierarchical", "192", "4")
    assert (flag("--width"), flag("--layers"), flag("--seq-len")) == ("768", "8", "4096")
    assert int(flag("--tokens")) == run.tokens and int(flag("--batch-tokens")) == run.batch * 4096
    assert argv[-2:] == ["--loss-weights", "graded"]


def test_flat_plans_are_byte_identical_and_old_plans_read_as_flat(tmp_path):
    out = tmp_path / "plan.csv"
    assert main(["plan", "--budgets", "3e18,1e11", "--widths", "32,256,768,2048", "--vocab", "16646",
                 "--out", str(out)]) == 0
    assert out.read_bytes() == (FIXTURES / "plan_flat.csv").read_bytes()  # written before the hierarchical family
    assert main(["plan", "--budgets", "3e18,1e11", "--widths", "32,256,768,2048", "--vocab", "16646",
                 "--architecture", "flat", "--out", str(out)]) == 0
    assert out.read_bytes() == (FIXTURES / "plan_flat.csv").read_bytes()
    (a, b) = sweep.load_plan(FIXTURES / "plan_flat.csv")
    assert a.architecture == b.architecture == "flat" and a.shape.seq_len == 4096
    argv = sweep.train_command(a, tmp_path, ["/data"], [])
    assert "--architecture" not in argv and "--depth-width" not in argv
    row = records.plan_row(a)
    assert list(row) == ["budget", "width", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab", "seq_len",
                         "params", "batch", "steps", "lr", "beta2"]  # what older sweeps recorded


def test_records_name_the_family(tmp_path):
    (h, *_) = sweep.load_plan(hierarchical_plan(tmp_path, widths="768"))
    assert records.plan_row(h)["architecture"] == "hierarchical" and records.plan_row(h)["depth_width"] == 384
    setting = records.Setting(("/data",))
    flat_like = records.new_record(h, setting) | {"plan": {**records.plan_row(h), "architecture": "flat"}}
    assert records.new_record(h, setting)["fingerprint"] != records.fingerprint(flat_like)


def test_a_hierarchical_sweep_gathers_steps_and_per_step_flops_and_fits(fake, tmp_path, capsys):  # noqa: F811
    plan = tmp_path / "plan.csv"
    assert main(["plan", "--budgets", "1e13,3e13,1e14", "--widths", "64,128,256", "--vocab", "16646", "--seq-len",
                 "32", "--min-batch", "1", "--architecture", "hierarchical", "--out", str(plan)]) == 0
    out, data = tmp_path / "sweep", tmp_path / "tokens"
    data.mkdir()
    assert main(["run", str(plan), "--data", str(data), "--out", str(out)]) == 0
    assert all("--architecture" in c["argv"] for c in fake())
    rows = list(csv.DictReader((out / "results.csv").open()))
    for row, run in zip(rows, sweep.load_plan(plan)):
        assert int(row["tokens"]) == run.tokens and int(row["params"]) == run.params
        assert float(row["flops"]) == pytest.approx(run.budget, rel=0.05)
        assert float(row["flops"]) == pytest.approx(hierarchical_training_flops_per_step(run.hierarchical_shape)
                                                    * run.tokens)
    assert len(rows) == 9 and main(["fit", str(out / "results.csv"), "--out", str(tmp_path / "fit"),
                                    "--bootstrap", "0"]) == 0
    assert "fitted" in capsys.readouterr().out  # not SODA's flat sweep shapes: the cost curve is fitted to the runs


@pytest.mark.parametrize("args, message", [
    (["--depth-width", "64"], "--depth-width: for --architecture hierarchical only"),
    (["--frames-per-step", "0.5"], "--frames-per-step: for --architecture hierarchical only"),
    (["--architecture", "hierarchical", "--depth-layers", "0"], "--depth-layers 0: must be at least 1"),
    (["--architecture", "hierarchical", "--depth-width", "0"], "--depth-width 0: must be at least 1"),
    (["--architecture", "hierarchical", "--frames-per-step", "1.5"], "--frames-per-step 1.5: give the share"),
    (["--architecture", "hierarchical", "--vocab", "2310"], "--vocab 2310: a hierarchical model's vocabulary"),
])
def test_bad_input(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--budgets", "3e18", *args, "--out", "x.csv"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("flag", ["--architecture", "--depth-width=64", "--depth-l"])
def test_the_family_flags_are_the_plans(flag, tmp_path, capsys):
    plan = hierarchical_plan(tmp_path, widths="768")
    (tmp_path / "tokens").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["run", str(plan), "--data", str(tmp_path / "tokens"), "--out", str(tmp_path / "sweep"), "--", flag, "x"])
    assert exc.value.code == 2 and "after `--`" in capsys.readouterr().err


def test_soda_trains_dry_run_counts_the_plans_budget_and_params(tmp_path):
    """Once soda-train has the family (branch hier2): its --dry-run of a planned run's command line counts the plan's
    parameters and its budget (its FLOPs per step x the steps it is given)."""
    from soda.train.config import config_fields

    if "architecture" not in config_fields():
        pytest.skip("soda-train has no --architecture yet")
    plan = hierarchical_plan(tmp_path, "--seq-len", "512", budgets="3e18", widths="768")
    (run,) = sweep.load_plan(plan)
    sweep.write_run_config(run, tmp_path / "sweep")
    argv = [*sweep.train_command(run, tmp_path / "sweep", [], []), "--dry-run"]
    printed = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert f"parameters: {run.params:,} total" in printed
    total = float(printed.split("total training FLOPs: ")[1].split()[0])
    assert total == pytest.approx(3e18, rel=1e-3) and total == pytest.approx(run.budget, rel=1e-3)
