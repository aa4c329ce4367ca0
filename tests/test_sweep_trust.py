"""`soda-scaling run` results one can trust (issue 23): no flag spelling leaves the plan, results.csv holds what each
run trained, a run trained with other settings is refused (or re-trained), a second runner on one sweep is refused,
and SLURM scripts survive spaces in paths. Uses test_sweep's stand-in trainer, which parses flags as soda-train."""

from __future__ import annotations

import csv
import json
import os
import shlex
import socket
import subprocess
import sys
import time

import pytest
from test_sweep import FAKE_TRAINER, fake, make_plan, results, run  # noqa: F401 -- fake: fixture

from scaling import locks, records, sweep
from scaling.cli import main
from scaling.runs import DONE, RECORD
from soda.shape import training_flops

HOST = socket.gethostname()


def refused(capsys, *argv) -> str:
    """The one line a refused command prints (exit code 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def sweep_args(plan, out, data, *extra):
    return ["run", str(plan), "--data", str(data), "--out", str(out), *extra]


@pytest.fixture
def data(tmp_path):
    """A tokenized directory as soda-train sees it: its manifest.json is what a run's data fingerprint reads."""
    d = tmp_path / "tokens"
    d.mkdir()
    (d / "manifest.json").write_text('{"shards": 1}')
    return d


# --------------------------------------------------------------------------------------------
# 1. flags after `--` in any spelling argparse accepts; results from the runs themselves
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--max-st", "3"], "--max-st after `--` (short for --max-steps)"),
    (["--max-st=3"], "--max-st after `--` (short for --max-steps)"),
    (["--tok", "5M"], "--tok after `--` (short for --tokens)"),
    (["--batch", "1024"], "--batch after `--` (short for --batch-tokens)"),
    (["--workers", "0", "--l=0.1"], "--l after `--` (short for --layers, --lr)"),
])
def test_an_abbreviated_reserved_flag_is_refused(extra, message, fake, tmp_path, data, capsys):
    plan = make_plan(tmp_path, "1e13", "64")
    err = refused(capsys, *sweep_args(plan, tmp_path / "sweep", data, "--", *extra))
    assert message in err and "the sweep sets" in err
    assert not fake()


@pytest.mark.parametrize("argv", [
    ["plan", "--budget", "1e13", "--out", "plan.csv"],
    ["run", "plan.csv", "--da", "tokens", "--out", "sweep"],
    ["fit", "results.csv", "--out", "fit", "--boot", "0"],
])
def test_scaling_takes_no_abbreviated_flags(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert not (tmp_path / "plan.csv").exists()


def test_results_hold_the_steps_and_tokens_each_run_trained(fake, tmp_path, data):
    """Whatever reached soda-train, results.csv reports what the run did (its metrics and config.yaml), never the
    plan's numbers: here a run stopped at 3 of its steps."""
    plan = make_plan(tmp_path, "1e13", "64,128")
    out = tmp_path / "sweep"
    runs = sweep.load_plan(plan)
    assert sweep.run_sweep(runs, out, [str(data)], ["--max-steps", "3"]) == 0
    _, rows, _ = sweep.gather(runs, out)
    for r, row in zip(runs, rows):
        assert r.steps > 3 and row["steps"] == 3 and row["tokens"] == 3 * r.batch * 128
        assert row["flops"] == training_flops(r.shape, 3 * r.batch * 128)


# --------------------------------------------------------------------------------------------
# 2. what each run was trained with, checked on every re-run
# --------------------------------------------------------------------------------------------
def edit_plan(plan, name, **values):
    rows = list(csv.DictReader(plan.open()))
    for row in rows:
        if row["name"] == name:
            row.update({k: str(v) for k, v in values.items()})
    with plan.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_an_edited_plan_row_of_a_finished_run_is_refused(fake, tmp_path, data, capsys):
    plan = make_plan(tmp_path, "1e13", "64,128")
    out = tmp_path / "sweep"
    assert run(plan, out, data) == 0
    first, second = sweep.load_plan(plan)
    before = (out / "results.csv").read_text()
    edit_plan(plan, first.name, steps=first.steps // 2, lr=0.002)
    err = refused(capsys, *sweep_args(plan, out, data))
    assert f"{first.name} was trained with steps {first.steps}, lr {first.lr!r}; now steps {first.steps // 2}, " \
           "lr 0.002" in err and "--rerun-changed" in err
    err = refused(capsys, "run", str(plan), "--out", str(out), "--gather-only")
    assert f"{first.name} was trained with steps {first.steps}" in err
    assert (out / "results.csv").read_text() == before and len(fake()) == 2

    assert run(plan, out, data, "--rerun-changed") == 0
    assert [(c["name"], c["resume"]) for c in fake()[2:]] == [(first.name, False)]  # from scratch; the other kept
    assert f"{first.name}: re-training from scratch (steps" in capsys.readouterr().out
    row = results(out)[0]
    assert int(row["steps"]) == first.steps // 2 and float(row["tokens"]) == first.steps // 2 * first.batch * 128


def test_other_data_or_flags_are_refused_for_trained_runs(fake, tmp_path, data, capsys, monkeypatch):
    """A partly trained run (pre-empted) and a finished one: another --data, a re-tokenized data directory or other
    soda-train flags would mix settings in one sweep; flags that only change how a run runs (workers) are fine."""
    plan = make_plan(tmp_path, "1e13", "64,128,256")
    out = tmp_path / "sweep"
    names = [r.name for r in sweep.load_plan(plan)]
    monkeypatch.setenv("FAKE_PREEMPT", names[1])
    assert run(plan, out, data, "--", "--seed", "1", "--workers", "0") == 143
    monkeypatch.delenv("FAKE_PREEMPT")
    other = tmp_path / "other tokens"
    other.mkdir()
    (other / "manifest.json").write_text('{"shards": 2}')

    err = refused(capsys, *sweep_args(plan, out, other, "--", "--seed", "1"))
    assert f"{names[0]} was trained with data {data} (manifest" in err and f"now data {other} (manifest" in err
    assert "(and 1 more run)" in err
    err = refused(capsys, *sweep_args(plan, out, data, "--", "--seed", "2"))
    assert f"{names[0]} was trained with flags after `--` '--seed 1'; now flags after `--` '--seed 2'" in err
    err = refused(capsys, *sweep_args(plan, out, data, "--val-tokens", "1024", "--", "--seed", "1"))
    assert f"{names[0]} was trained with --val-tokens {records.DEFAULT_VAL_TOKENS}; now --val-tokens 1024" in err
    (data / "manifest.json").write_text('{"shards": 3}')  # tokenized again in place
    err = refused(capsys, *sweep_args(plan, out, data, "--", "--seed", "1"))
    assert f"{names[0]} was trained with data {data} (manifest" in err
    (data / "manifest.json").write_text('{"shards": 1}')
    assert len(fake()) == 2

    moved = tmp_path / "moved"
    data.rename(moved)  # the same data elsewhere is the same data
    assert run(plan, out, moved, "--", "--seed=1", "--workers", "2") == 0
    assert [(c["name"], c["resume"]) for c in fake()[2:]] == [(names[1], True), (names[2], False)]
    assert len({r["fingerprint"] for r in results(out)}) == 1


def test_fit_refuses_results_of_differently_trained_sweeps(fake, tmp_path, data, capsys):
    plan = make_plan(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(plan, a, data) == 0
    assert run(plan, b, data, "--", "--seed", "7") == 0
    rows = results(a)[:6] + results(b)[6:]
    mixed = tmp_path / "mixed.csv"
    with mixed.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    err = refused(capsys, "fit", str(mixed), "--out", str(tmp_path / "fit"), "--bootstrap", "0")
    assert "different settings" in err and "lines 2-7" in err and "lines 8-10" in err and "--allow-mixed" in err
    assert main(["fit", str(mixed), "--out", str(tmp_path / "fit"), "--bootstrap", "0", "--allow-mixed"]) == 0


# --------------------------------------------------------------------------------------------
# 3. one runner per sweep (and per run)
# --------------------------------------------------------------------------------------------
def test_a_second_runner_on_one_sweep_is_refused(fake, tmp_path, data, capsys):
    plan = make_plan(tmp_path, "1e13", "64")
    out = tmp_path / "sweep"
    first = subprocess.Popen(
        [sys.executable, "-c", "import sys; from scaling import sweep; sweep.TRAINER = (sys.executable, sys.argv[1]); "
                               "from scaling.cli import main; sys.exit(main(sys.argv[2:]))",
         str(tmp_path / "fake_train.py"), *sweep_args(plan, out, data)],
        env={**os.environ, "FAKE_SLEEP": "3"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not fake() and time.monotonic() < deadline:  # the first runner's soda-train has started
            time.sleep(0.05)
        err = refused(capsys, *sweep_args(plan, out, data))
        assert f"another soda-scaling run (pid {first.pid} on host {HOST}) is using {out}" in err
    finally:
        assert first.wait(timeout=60) == 0, first.stderr.read()
    assert len(fake()) == 1 and len(results(out)) == 1


def test_a_stale_lock_of_a_killed_runner_is_taken_over(fake, tmp_path, data, capsys):
    plan = make_plan(tmp_path, "1e13", "64")
    out = tmp_path / "sweep"
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    lock = locks.sweep_lock_path(out)
    lock.parent.mkdir(parents=True)
    lock.write_text(f"pid {gone.pid} on host {HOST}\n")
    assert run(plan, out, data) == 0
    assert f"taking over the lock of pid {gone.pid} on host {HOST} (no longer running)" in capsys.readouterr().out
    assert len(results(out)) == 1


# --------------------------------------------------------------------------------------------
# 5. SLURM scripts and printed commands with spaces in every path
# --------------------------------------------------------------------------------------------
def slurm_task(script, i, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(i),
           "SLURM_ARRAY_JOB_ID": "7"}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)


def test_emit_slurm_with_spaces_in_every_path(fake, tmp_path, monkeypatch, capsys):
    root = tmp_path / "my work"
    (root / "plans").mkdir(parents=True)
    monkeypatch.chdir(root)
    plan = make_plan(root / "plans", "1e13", "64")
    out, data = root / "sweep S", root / "tok ens"
    data.mkdir()
    capsys.readouterr()
    assert run(plan, out, data, "--emit", "slurm", "--", "--wandb", "a project") == 0
    printed = capsys.readouterr().out
    script = out / "sweep.sbatch"
    submit, gather = printed.split("`")[1], printed.split("then: ")[1].strip()
    assert shlex.split(submit) == ["sbatch", str(script)]
    assert shlex.split(gather) == ["soda-scaling", "run", str(plan), "--out", str(out), "--gather-only"]
    lines = script.read_text().splitlines()
    options = dict(shlex.split(line)[1].split("=", 1) for line in lines if line.startswith("#SBATCH") and "=" in line)
    assert options["--output"] == f"{out}/logs/slurm-%A_%a.out"
    assert shlex.split(next(ln for ln in lines if ln.startswith("#   sbatch"))[1:]) == ["sbatch", str(script)]
    assert shlex.split(next(ln for ln in lines if ln.startswith("#   soda-scaling"))[1:]) == shlex.split(gather)
    assert slurm_task(script, 1, tmp_path).returncode == 0
    argv = fake()[0]["argv"]
    assert argv[argv.index("--data") + 1] == str(data) and argv[-2:] == ["--wandb", "a project"]
    assert argv[argv.index("--out") + 1] == str(sweep.load_plan(plan)[0].run_dir(out))


def test_a_line_break_in_an_argument_is_refused(fake, tmp_path, data, capsys):
    """commands.txt holds one command per line: a line break inside an argument would shift every task's command."""
    plan = make_plan(tmp_path, "1e13", "64,128")
    err = refused(capsys, *sweep_args(plan, tmp_path / "sweep", data, "--emit", "slurm", "--", "--wandb", "a\nb"))
    assert "'a\\nb' contains a line break" in err
    assert not (tmp_path / "sweep" / "commands.txt").exists()


def test_a_slurm_task_leaves_a_locked_run_alone(fake, tmp_path, data):
    plan = make_plan(tmp_path, "1e13", "64")
    out = tmp_path / "sweep"
    assert run(plan, out, data, "--emit", "slurm") == 0
    (r,) = sweep.load_plan(plan)
    with locks.lock(locks.run_lock_path(r, out), r.run_dir(out)):
        task = slurm_task(out / "sweep.sbatch", 1, tmp_path)
    assert task.returncode == 1 and not fake()
    assert f"another soda-scaling run (pid {os.getpid()} on host {HOST}) is using {r.run_dir(out)}" in task.stderr
    task = slurm_task(out / "sweep.sbatch", 1, tmp_path)
    assert task.returncode == 0 and len(fake()) == 1


def test_flags_that_only_change_how_a_run_runs_are_ones_soda_train_lets_a_resume_change():
    """HOW_IT_RUNS (derived from soda-train's settings) lies within RESUMABLE_CHANGES: no flag that changes what a
    run computes may slip out of a run's record."""
    from soda.train.config import RESUMABLE_CHANGES

    assert {f.removeprefix("--").replace("-", "_") for f in records.HOW_IT_RUNS} <= RESUMABLE_CHANGES
    assert not records.HOW_IT_RUNS & sweep.RESERVED_FLAGS
    assert records.computing_flags(["--workers=2", "--seed", "3", "--devices", "8", "--mix", "a=1,b=2"]) == \
        ["--seed", "3", "--mix", "a=1,b=2"]


def test_a_lock_on_a_file_system_without_flock_goes_by_its_pid(tmp_path, monkeypatch, capsys):
    """Some cluster file systems refuse flock: a lock file naming a live process (or one on another host) is
    respected, one naming a process gone from this host is taken over."""
    def no_flock(*_):
        raise OSError(38, "Function not implemented")  # ENOSYS
    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    path = tmp_path / "locks" / "sweep.lock"
    path.parent.mkdir()
    for holder in (f"pid {os.getpid()} on host {HOST}", "pid 1 on host another-node"):
        path.write_text(holder + "\n")
        with pytest.raises(locks.SodaError, match=f"another soda-scaling run \\({holder}\\) is using .*, or delete"):
            with locks.lock(path, tmp_path):
                pass
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    path.write_text(f"pid {gone.pid} on host {HOST}\n")
    with locks.lock(path, tmp_path):
        assert path.read_text() == f"pid {os.getpid()} on host {HOST}\n"
    assert "taking over the lock of pid" in capsys.readouterr().out and path.read_text() == ""


def test_the_local_runner_leaves_a_run_a_slurm_task_holds_alone(fake, tmp_path, data, capsys):
    plan = make_plan(tmp_path, "1e13", "64,128")
    out = tmp_path / "sweep"
    held, other = sweep.load_plan(plan)
    with locks.lock(locks.run_lock_path(held, out), held.run_dir(out)):
        assert run(plan, out, data) == 1
    printed = capsys.readouterr()
    assert f"[1/2] {held.name}: left alone: another soda-scaling run (pid {os.getpid()} on host {HOST})" in printed.out
    assert f"left alone: {held.name}" in printed.err and [c["name"] for c in fake()] == [other.name]
    assert run(plan, out, data) == 0 and [c["name"] for c in fake()][1:] == [held.name]


def test_emit_slurm_checks_what_trained_runs_were_trained_with(fake, tmp_path, data, capsys):
    plan = make_plan(tmp_path, "1e13", "64,128")
    out = tmp_path / "sweep"
    first, second = sweep.load_plan(plan)
    assert run(plan, out, data, "--emit", "slurm") == 0
    assert slurm_task(out / "sweep.sbatch", 1, tmp_path).returncode == 0
    assert json.loads((first.run_dir(out) / RECORD).read_text())["plan"]["steps"] == first.steps
    edit_plan(plan, first.name, lr=0.003)
    err = refused(capsys, *sweep_args(plan, out, data, "--emit", "slurm"))
    assert f"{first.name} was trained with lr {first.lr!r}; now lr 0.003" in err
    assert run(plan, out, data, "--emit", "slurm", "--rerun-changed") == 0
    assert not (first.run_dir(out) / DONE).exists()  # to be trained again by its task
    assert json.loads((first.run_dir(out) / RECORD).read_text())["plan"]["lr"] == 0.003
    assert slurm_task(out / "sweep.sbatch", 1, tmp_path).returncode == 0
    assert [(c["name"], c["resume"]) for c in fake()] == [(first.name, False), (first.name, False)]
