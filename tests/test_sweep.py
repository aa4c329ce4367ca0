"""`soda-scaling run`: a real two-run sweep through soda-train, and (with a stand-in trainer that keeps
soda-train's contract but trains nothing) resumption, failures, pre-emption, SLURM tasks and bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from scaling import records, sweep
from scaling.cli import main
from scaling.results import load_results
from scaling.runs import DONE
from tokenize_audio.errors import SodaError

# soda-train's contract: refuses a used --out without --resume, writes config.yaml (its settings), checkpoints/last.ckpt
# and metrics.csv (a row per step, val/loss at the last step), exit 0 when done. Its flags are parsed by argparse as
# soda-train's are, abbreviations included, and --max-steps stops it early. FAKE_FAIL / FAKE_PREEMPT name runs that
# exit 1 (after a last stderr line) or 143 (after a checkpoint; FAKE_PREEMPT_EARLY: before one); FAKE_NO_VAL drops the validation loss; FAKE_SLEEP
# makes every run take that many seconds.
FAKE_TRAINER = textwrap.dedent("""
    import argparse, json, os, sys, time
    from pathlib import Path
    argv = sys.argv[1:]
    p = argparse.ArgumentParser()
    for flag in ("--out", "--tokens", "--batch-tokens", "--seq-len"):
        p.add_argument(flag)
    for flag in ("--width", "--max-steps"):
        p.add_argument(flag, type=int)
    p.add_argument("--resume", action="store_true")
    args = p.parse_known_args(argv)[0]
    out = Path(args.out)
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({"name": out.name, "resume": args.resume, "argv": argv}) + "\\n")
    if not args.resume and (out / "config.yaml").exists():
        sys.exit("soda-train: error: already holds a run")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(json.dumps({"tokens": args.tokens, "batch_tokens": args.batch_tokens,
                                                 "seq_len": int(args.seq_len), "max_steps": args.max_steps}))
    if out.name == os.environ.get("FAKE_FAIL"):
        print("step 1 of many", flush=True)
        sys.exit("soda-train: error: boom")
    time.sleep(float(os.environ.get("FAKE_SLEEP", 0)))
    if out.name == os.environ.get("FAKE_PREEMPT_EARLY"):  # stopped during start-up, before any checkpoint
        sys.exit(143)
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "last.ckpt").write_text("")
    if out.name == os.environ.get("FAKE_PREEMPT"):
        sys.exit(143)
    width, tokens = args.width, int(args.tokens)
    steps = min(tokens // int(args.batch_tokens), args.max_steps or tokens)
    loss = 1.7 + 40 / width ** 0.7 + 300 / tokens ** 0.4
    rows = ["step,train/loss,val/loss"] + [f"{s},{loss + 1 / (s + 1)}," for s in range(steps)]
    if not os.environ.get("FAKE_NO_VAL"):
        rows.append(f"{steps - 1},,{loss}")
    (out / "metrics.csv").write_text("\\n".join(rows) + "\\n")
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Swap soda-train for the stand-in; returns a function listing its calls (name, resume, argv)."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINER)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setattr(sweep, "TRAINER", (sys.executable, str(script)))

    def read():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return read


def make_plan(tmp_path, budgets="1e13,3e13,1e14", widths="64,128,256", name="plan.csv", vocab="16646"):
    out = tmp_path / name
    assert main(["plan", "--budgets", budgets, "--widths", widths, "--vocab", vocab, "--seq-len", "128",
                 "--min-batch", "1", "--out", str(out)]) == 0
    return out


def run(plan, out, data, *extra):
    try:
        return main(["run", str(plan), "--data", str(data), "--out", str(out), *extra])
    except SystemExit as exc:
        return exc.code


def results(out):
    return list(csv.DictReader((out / "results.csv").open()))


@pytest.mark.slow
def test_real_sweep(train_tokens, tmp_path, capsys):
    """Two micro models trained by soda-train, results read from the runs (the plan's steps and tokens: nothing else
    reached soda-train); a second invocation trains nothing."""
    plan = make_plan(tmp_path, "1e10", "32,64")
    out = tmp_path / "sweep"
    assert run(plan, out, train_tokens, "--val-tokens", "256", "--", "--workers", "0") == 0
    printed = capsys.readouterr().out
    assert "[1/2] C1.0e10-d32: done in" in printed and "[2/2] C1.0e10-d64: done in" in printed
    rows = results(out)
    assert list(rows[0]) == list(sweep.RESULT_COLUMNS) and [r["name"] for r in rows] == ["C1.0e10-d32", "C1.0e10-d64"]
    for r, planned in zip(rows, sweep.load_plan(plan)):
        assert r["loss_source"] == "val" and 0 < float(r["loss"]) < 12
        assert float(r["flops"]) == pytest.approx(1e10, rel=0.05)
        assert (int(r["steps"]), int(r["tokens"])) == (planned.steps, planned.tokens)
    assert len({r["fingerprint"] for r in rows}) == 1
    config = (out / "configs" / "C1.0e10-d32.yaml").read_text()
    assert "betas: [0.95, 0.9998" in config and "weight_decay: 0.1" in config and "z_loss: 0.0" in config
    with pytest.raises(SodaError, match="2 usable run"):  # parsed as fit input; only too few runs to fit
        load_results(out / "results.csv")

    assert run(plan, out, train_tokens, "--val-tokens", "256", "--", "--workers", "1") == 0
    assert capsys.readouterr().out.count("finished earlier") == 2


def test_resume_failure_and_rerun(fake, tmp_path, capsys, monkeypatch):
    plan = make_plan(tmp_path)
    out, data = tmp_path / "sweep", tmp_path / "tokens"
    data.mkdir()
    names = [r.name for r in sweep.load_plan(plan)]
    stale, interrupted, failing = (out / "runs" / n for n in names[:3])
    stale.mkdir(parents=True)
    (stale / "config.yaml").write_text("from an attempt killed before its first checkpoint")
    (interrupted / "checkpoints").mkdir(parents=True)
    records.write_record(sweep.load_plan(plan)[1], out, records.Setting((str(data),)))  # what it started with
    (interrupted / "config.yaml").write_text("x")
    (interrupted / "checkpoints" / "last.ckpt").write_text("")
    monkeypatch.setenv("FAKE_FAIL", failing.name)

    assert run(plan, out, data) == 1
    printed = capsys.readouterr()
    calls = {c["name"]: c for c in fake()}
    assert len(calls) == 9 and calls[interrupted.name]["resume"] and not calls[stale.name]["resume"]
    assert f"{stale.name}: restarting (no checkpoint from the last attempt)" in printed.out
    assert f"[3/9] {failing.name}: FAILED (exit 1)" in printed.out and "soda-train: error: boom" in printed.out
    assert f"failed: {failing.name} (exit 1): soda-train: error: boom; log {out / 'logs' / failing.name}.log" \
        in printed.err
    assert len(results(out)) == 8 and f"not finished: {failing.name}" in printed.out

    monkeypatch.delenv("FAKE_FAIL")
    assert run(plan, out, data) == 0
    assert [c["name"] for c in fake()[9:]] == [failing.name]  # only the failed run trains again
    assert capsys.readouterr().out.count("finished earlier") == 8
    rows = results(out)
    assert len(rows) == 9 and {r["loss_source"] for r in rows} == {"val"}
    assert main(["fit", str(out / "results.csv"), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0


def test_command_line(fake, tmp_path):
    plan = make_plan(tmp_path, "1e13", "64")
    out, data = tmp_path / "sweep", tmp_path / "tokens"
    data.mkdir()
    assert run(plan, out, f"speech={data}", "--val-tokens", "1024", "--", "--workers", "0") == 0
    argv = fake()[0]["argv"]
    (r,) = sweep.load_plan(plan)
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert (flag("--width"), flag("--layers"), flag("--heads"), flag("--ffn"), flag("--seq-len")) == \
        ("64", "1", "1", "256", "128")
    assert int(flag("--tokens")) == r.tokens == r.steps * r.batch * 128
    assert (flag("--batch-tokens"), flag("--val-every"), flag("--val-batches")) == (str(r.batch * 128),
                                                                                     str(r.steps), "8")
    assert float(flag("--lr")) == r.lr and flag("--data") == f"speech={data}" and "--no-export" in argv
    assert argv[-2:] == ["--workers", "0"]


def test_preemption_stops_the_sweep(fake, tmp_path, capsys, monkeypatch):
    plan = make_plan(tmp_path, "1e13", "64,128,256")
    out, data = tmp_path / "sweep", tmp_path / "tokens"
    data.mkdir()
    names = [r.name for r in sweep.load_plan(plan)]
    monkeypatch.setenv("FAKE_PREEMPT", names[1])
    assert run(plan, out, data) == 143
    err = capsys.readouterr().err
    assert [c["name"] for c in fake()] == names[:2] and "its checkpoint is kept: run the same command again" in err
    monkeypatch.delenv("FAKE_PREEMPT")
    assert run(plan, out, data) == 0
    assert [(c["name"], c["resume"]) for c in fake()[2:]] == [(names[1], True), (names[2], False)]


def test_a_run_stopped_before_its_first_checkpoint_is_not_said_to_keep_one(fake, tmp_path, capsys, monkeypatch):
    plan = make_plan(tmp_path, "1e13", "64,128")
    out, data = tmp_path / "sweep", tmp_path / "tokens"
    data.mkdir()
    names = [r.name for r in sweep.load_plan(plan)]
    monkeypatch.setenv("FAKE_PREEMPT_EARLY", names[0])
    assert run(plan, out, data) == 143
    assert "it had saved no checkpoint yet and will start over" in capsys.readouterr().err
    monkeypatch.delenv("FAKE_PREEMPT_EARLY")
    assert run(plan, out, data) == 0
    assert [(c["name"], c["resume"]) for c in fake()[1:]] == [(names[0], False), (names[1], False)]


def test_train_loss_fallback_and_gather_only(fake, tmp_path, capsys, monkeypatch):
    plan = make_plan(tmp_path, "1e13", "64,128")
    out, data = tmp_path / "sweep", tmp_path / "tokens"
    data.mkdir()
    monkeypatch.setenv("FAKE_NO_VAL", "1")
    assert run(plan, out, data) == 0
    (out / "results.csv").unlink()
    assert main(["run", str(plan), "--out", str(out), "--gather-only"]) == 0
    rows = results(out)
    assert rows[0]["loss_source"] == "train (mean of last 5 logged)" and math.isfinite(float(rows[0]["loss"]))
    assert "no validation loss at its last step" in capsys.readouterr().out


def test_emit_slurm_and_its_tasks(fake, tmp_path, capsys):
    """The job array's commands are the local ones; its tasks skip, resume and mark runs as the local runner does
    (run here with stand-ins for srun and scontrol)."""
    plan = make_plan(tmp_path, "1e13", "64,128")
    out, data = tmp_path / "sweep", tmp_path / "tokens"
    data.mkdir()
    assert run(plan, out, data, "--emit", "slurm", "--", "--workers", "1") == 0
    assert not fake() and not list((out / "runs").rglob("config.yaml"))  # nothing trained
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=1-2" in script and "#SBATCH --requeue" in script and "--gather-only" in script
    commands = (out / "commands.txt").read_text().splitlines()
    runs = sweep.load_plan(plan)
    assert len(commands) == 2 and commands[0].endswith("--no-export --sample-every 0 --workers 1")
    assert "--resume" not in commands[0] and (out / "configs" / f"{runs[0].name}.yaml").is_file()

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)

    def task(i):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(i),
               "SLURM_ARRAY_JOB_ID": "7"}
        return subprocess.run(["bash", str(out / "sweep.sbatch")], env=env, capture_output=True, text=True)

    assert task(1).returncode == 0 and (runs[0].run_dir(out) / DONE).is_file()
    assert "finished earlier" in task(1).stdout
    second = runs[1].run_dir(out)
    (second / "checkpoints").mkdir(parents=True)
    (second / "checkpoints" / "step0000008.ckpt").write_text("")  # killed before last.ckpt pointed at it
    (second / "config.yaml").write_text("x")
    assert task(2).returncode == 0
    assert [(c["name"], c["resume"]) for c in fake()] == [(runs[0].name, False), (runs[1].name, True)]
    capsys.readouterr()
    assert main(["run", str(plan), "--out", str(out), "--gather-only"]) == 0
    assert len(results(out)) == 2


@pytest.mark.parametrize("setup, extra, message", [
    ("none", [], "plan"),
    ("columns", [], "missing columns"),
    ("skipped", [], "no usable runs"),
    ("ok", ["--no-data"], "give --data"),
    ("ok", ["--data-missing"], "not found"),
    ("vocab", [], "plan again with --vocab 16646"),
    ("ok", ["--", "--tokens", "5M"], "--tokens after `--`"),
    ("ok", ["--", "--max-steps=3"], "--max-steps after `--`"),
    ("gather", [], "no finished runs"),
])
def test_bad_input(setup, extra, message, tmp_path, capsys, fake, request):
    plan = tmp_path / "plan.csv"
    data = request.getfixturevalue("train_tokens") if setup == "vocab" else tmp_path / "tokens"
    data.mkdir(exist_ok=True)
    if setup == "columns":
        plan.write_text("budget,width\n1e13,64\n")
    elif setup == "skipped":
        main(["plan", "--budgets", "1e13", "--widths", "64", "--vocab", "16646", "--out", str(plan)])
    elif setup in ("ok", "gather"):
        make_plan(tmp_path)
    elif setup == "vocab":
        make_plan(tmp_path, vocab="20000")
    args = ["run", str(plan), "--out", str(tmp_path / "sweep")]
    if setup == "gather":
        args.append("--gather-only")
    elif "--no-data" not in extra:
        args += ["--data", str(tmp_path / "missing" if "--data-missing" in extra else data)]
    args += [a for a in extra if a not in ("--no-data", "--data-missing")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not fake()


def test_scaling_does_not_import_the_trainer():
    """soda-train is a subprocess: importing the CLI must not pull in the trainer (or torch), only the torch-free
    model accounting (soda.shape) and soda-train's settings declaration (soda.train.config, soda.settings, and the
    loss-weight schemes it names, soda.loss_weights)."""
    code = "import sys, scaling.cli, scaling.slurm; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('soda', 'torch', 'lightning')))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported == ("['soda', 'soda.loss_weights', 'soda.settings', 'soda.shape', 'soda.train', "
                        "'soda.train.config']\n")
