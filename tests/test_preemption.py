"""Pre-emption as SLURM sends it (SIGTERM to the whole process group, loader workers included) for the two commands
that drive soda-train's run from outside: `soda-finetune` and `soda-scaling run`."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_finetune import s2st_corpus  # noqa: F401 -- fixture: the synthetic French-English S2ST corpus
from test_sweep import make_plan
from test_train import _wait_for, losses

pytestmark = pytest.mark.slow  # every test here drives soda-train in subprocesses and signals them

PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _stop_group_when(path: Path, command: list[str], sig=signal.SIGTERM) -> subprocess.CompletedProcess:
    """Start `command` as its own process group (as sbatch starts a job step), wait until `path` exists, then send
    `sig` to the whole group."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for(path, proc)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_finetune_stopped_by_a_group_sigterm_resumes_exactly(tiny_run, s2st_corpus, tmp_path):  # noqa: F811
    def command(out: Path) -> list[str]:
        return [PY, "-m", "soda.finetune", "s2st", "--init-from", str(tiny_run), "--data", str(s2st_corpus), "--out",
                str(out), "--validation-fraction", "0", "--seq-len", "256", "--batch-tokens", "1024",
                "--micro-batch", "2", "--tokens", str(12 * 1024), "--workers", "2", "--log-every", "1",
                "--ckpt-every", "100", "--no-export", "--quiet", "--resume", "auto"]

    reference = subprocess.run(command(tmp_path / "reference"), env=ENV, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "stopped"
    stopped = _stop_group_when(out / "logs" / "version_0" / "metrics.csv", command(out))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "killed by signal" not in stopped.stderr
    assert "pre-empted at step" in stopped.stderr
    resumed = subprocess.run(command(out), env=ENV, capture_output=True, text=True, timeout=600)  # the requeue
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = losses(tmp_path / "reference"), losses(out)
    assert set(got) == set(want) == set(range(12))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sweep_stopped_by_a_group_signal_checkpoints_its_run_and_continues(train_tokens, tmp_path, sig, code):
    """SIGTERM as SLURM sends it, or Ctrl-C at the terminal: both reach the runner and the run it is training."""
    plan = make_plan(tmp_path, "3e10", "32")
    out = tmp_path / "sweep"
    command = [PY, "-m", "scaling.cli", "run", str(plan), "--data", str(train_tokens), "--out", str(out),
               "--val-tokens", "256", "--", "--workers", "2", "--log-every", "1"]
    run_dir = out / "runs" / "C3.0e10-d32"
    stopped = _stop_group_when(run_dir / "logs" / "version_0" / "metrics.csv", command, sig)
    assert stopped.returncode == code, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "its checkpoint is kept" in stopped.stderr and "Traceback" not in stopped.stderr
    log = (out / "logs" / "C3.0e10-d32.log").read_text() if (out / "logs").is_dir() else ""
    assert list((run_dir / "checkpoints").glob("step*.ckpt")), log[-2000:]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resuming" in done.stdout
    with open(out / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    steps = int(row["steps"])
    assert sorted(losses(run_dir)) == list(range(steps)) and float(row["loss"]) > 0


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "stopped"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_during_start_up_says_no_checkpoint_was_saved(tmp_path, sig, code, word):
    """Plain soda-train first tokenizes the demo corpus: a pre-emption notice (or Ctrl-C) then must exit with the
    code a job script requeues on and must not claim a checkpoint that does not exist."""
    out = tmp_path / "demo run"
    proc = subprocess.Popen([PY, "-m", "soda.train", "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        if "tokenizing the bundled demo corpus" in line:
            break
    os.killpg(proc.pid, sig)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == code, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"soda-train: {word} before training: no checkpoint was saved yet: "
                                            f"nothing to resume; run the same command again to start over")
    assert not (out / "checkpoints").exists() and not list(out.rglob("*.tmp"))
