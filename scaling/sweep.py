"""Carry out a planned IsoFLOP sweep with soda-train and gather its results for `soda-scaling fit`.

Each run is a separate `python -m soda.train` process: a crash or a leak costs one run, not the
sweep, and `scaling` stays free of the trainer's imports (the command line is the interface, the
same one a SLURM job array runs; see `scaling.slurm`). Everything is resumable from the files in
SWEEP_DIR: a run counts as finished only once the sweep has written its marker after exit code 0,
a run with a checkpoint continues with `--resume`, and an attempt that died before its first
checkpoint starts again. Runs train exactly the plan's steps (flags that would change what a run
computes are refused), so a finished run's FLOPs are the plan's budget-consistent count.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_write_json, atomic_write_text

from .accounting import ModelShape, training_flops
from .plan import run_name

TRAINER = (sys.executable, "-m", "soda.train")  # tests put a stand-in trainer here
PLAN_COLUMNS = ("budget", "width", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab", "seq_len", "params",
                "batch", "steps", "lr", "beta2", "skipped")
SWEEP_RECIPE = {"beta1": 0.95, "weight_decay": 0.1, "z_loss": 0.0}  # DESIGN.md §2; beta2 comes from the plan
# Flags the plan fixes (or the sweep sets per run): passing them after `--` would break the IsoFLOP design.
RESERVED_FLAGS = {"--out", "--resume", "--config", "--data", "--size", "--sweep-width", "--width", "--layers",
                  "--heads", "--kv-heads", "--head-dim", "--ffn", "--seq-len", "--tokens", "--batch-tokens",
                  "--lr", "--max-steps", "--init-from", "--dry-run"}
DEFAULT_VAL_TOKENS = 2**22
DONE, TRAIN_CONFIG = "sweep-done.json", "config.yaml"
# soda-train resumes from its highest-numbered checkpoints/stepN.ckpt, else checkpoints/last.ckpt: a run holding
# either can continue (the link alone may lag behind when a kill lands between a save and the link).
CHECKPOINTS = ("checkpoints/step*.ckpt", "checkpoints/last.ckpt")
RESULTS_FILE = "results.csv"
RESULT_COLUMNS = ("name", "budget", "width", "params", "tokens", "steps", "flops", "loss", "loss_source")
TRAIN_LOSS_WINDOW = 5  # logged train losses averaged when a run has no final validation loss
PREEMPTED, INTERRUPTED = 143, 130


@dataclass(frozen=True)
class PlannedRun:
    """One usable plan row and where its files live in the sweep directory."""

    name: str
    budget: float
    shape: ModelShape
    params: int
    batch: int
    steps: int
    lr: float
    beta2: float

    @property
    def tokens(self) -> int:
        """Exactly the steps' tokens (the plan's `tokens` column is this product too)."""
        return self.steps * self.batch * self.shape.seq_len

    def run_dir(self, sweep: Path) -> Path:
        return sweep / "runs" / self.name

    def config_path(self, sweep: Path) -> Path:
        return sweep / "configs" / f"{self.name}.yaml"

    def log_path(self, sweep: Path) -> Path:
        return sweep / "logs" / f"{self.name}.log"


def load_plan(path: Path) -> list[PlannedRun]:
    """The usable (not skipped) rows of a `soda-scaling plan` CSV."""
    path = Path(path)
    if not path.is_file():
        raise SodaError(f"plan {path} not found (write one with `soda-scaling plan`)")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PLAN_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SodaError(f"{path}: missing column{'s' * (len(missing) > 1)} {', '.join(missing)}; "
                            "is it a `soda-scaling plan` CSV?")
        runs = []
        for row in reader:
            if row["skipped"].strip():
                continue
            try:
                shape = ModelShape(*(int(row[k]) for k in PLAN_COLUMNS[1:9]))
                budget = float(row["budget"])
                run = PlannedRun(row.get("name") or run_name(budget, shape.width), budget, shape,
                                 int(row["params"]), int(row["batch"]), int(row["steps"]), float(row["lr"]),
                                 float(row["beta2"]))
            except ValueError as err:
                raise SodaError(f"{path}: line {reader.line_num}: {err}") from None
            runs.append(run)
    if not runs:
        raise SodaError(f"{path}: no usable runs (every row is skipped; see its `skipped` column)")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SodaError(f"{path}: duplicate run names {sorted({n for n in names if names.count(n) > 1})}")
    return runs


def check_data(data: list[str], runs: list[PlannedRun]) -> None:
    """--data must exist, and a tokenized directory's vocabulary must be the one the plan counted."""
    from tokenize_audio.vocab import Vocabulary

    if not data:
        raise SodaError("give --data [NAME=]DIR (a soda-tokenize output directory; repeatable)")
    vocab = runs[0].shape.vocab
    for entry in data:
        location = entry.split("=", 1)[-1]
        if "://" in location or location.startswith("pipe:") or any(c in location for c in "*?[{"):
            continue  # URLs and shard patterns: soda-train checks them
        if not Path(location).exists():
            raise SodaError(f"--data {entry}: {location} not found")
        if (Path(location) / "vocab.json").is_file():
            size = Vocabulary.load(Path(location)).size
            if size != vocab:
                raise SodaError(f"--data {entry}: its vocabulary has {size:,} ids but the plan counted {vocab:,}; "
                                f"plan again with --vocab {size}")


def check_extra(extra: list[str]) -> None:
    clash = sorted({a.split("=", 1)[0] for a in extra} & RESERVED_FLAGS)
    if clash:
        raise SodaError(f"{', '.join(clash)} after `--`: the sweep sets {'it' if len(clash) == 1 else 'them'} "
                        "(each run trains the plan's shape for its whole budget); add only other soda-train flags")


def write_run_config(run: PlannedRun, sweep: Path) -> Path:
    """The optimizer settings soda-train has no flags for (betas), with SODA's sweep wd and z-loss."""
    path = run.config_path(sweep)
    atomic_write_text(path, f"# {run.name}: SODA's sweep recipe (DESIGN.md §2), written by soda-scaling run\n"
                            f"betas: [{SWEEP_RECIPE['beta1']}, {run.beta2!r}]\n"
                            f"weight_decay: {SWEEP_RECIPE['weight_decay']}\n"
                            f"z_loss: {SWEEP_RECIPE['z_loss']}\n")
    return path


def train_command(run: PlannedRun, sweep: Path, data: list[str], extra: list[str],
                  val_tokens: int = DEFAULT_VAL_TOKENS) -> list[str]:
    """The soda-train command line of a run (without --resume). Validation runs once, at the last step,
    over about `val_tokens` tokens whatever the batch, so every run is scored on the same data."""
    s = run.shape
    val_batches = max(1, math.ceil(val_tokens / (run.batch * s.seq_len)))
    return [*TRAINER, "--config", str(run.config_path(sweep)), "--out", str(run.run_dir(sweep)),
            "--width", str(s.width), "--layers", str(s.layers), "--heads", str(s.heads),
            "--kv-heads", str(s.kv_heads), "--head-dim", str(s.head_dim), "--ffn", str(s.ffn),
            "--seq-len", str(s.seq_len), "--tokens", str(run.tokens), "--batch-tokens", str(run.batch * s.seq_len),
            "--lr", repr(run.lr), *(a for d in data for a in ("--data", d)),
            "--val-every", str(run.steps), "--val-batches", str(val_batches), "--no-export", *extra]


def state(run: PlannedRun, sweep: Path) -> str:
    """done | resume (a checkpoint to continue from) | stale (started, no checkpoint yet) | new."""
    d = run.run_dir(sweep)
    if (d / DONE).is_file():
        return "done"
    if any(any(d.glob(pattern)) for pattern in CHECKPOINTS):
        return "resume"
    return "stale" if (d / TRAIN_CONFIG).exists() else "new"


# --------------------------------------------------------------------------------------------
# Running locally, one run after another
# --------------------------------------------------------------------------------------------
@dataclass
class Failure:
    name: str
    exit_code: int
    last_line: str
    log: Path


def last_line(log: Path) -> str:
    """The last thing a run printed (its error, usually); progress bars rewrite lines with \\r."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def train(command: list[str], log: Path) -> int:
    """Run soda-train, output appended to `log`. SIGTERM and SIGUSR1 are passed on so the run checkpoints (exit 143);
    on Ctrl-C the run got the same signal: wait for it to stop cleanly rather than kill it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        forward = lambda signum, _: proc.send_signal(signum)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_sweep(runs: list[PlannedRun], sweep: Path, data: list[str], extra: list[str],
              val_tokens: int = DEFAULT_VAL_TOKENS, dry_run: bool = False) -> int:
    """Train every run not yet finished; 0 if all finished, 1 if any failed, 143 if pre-empted."""
    failures: list[Failure] = []
    n = len(runs)
    for k, run in enumerate(runs, 1):
        tag = f"[{k}/{n}] {run.name}"
        status = state(run, sweep)
        if status == "done":
            print(f"{tag}: finished earlier", flush=True)
            continue
        command = train_command(run, sweep, data, extra, val_tokens) + (["--resume"] if status == "resume" else [])
        if dry_run:
            print(f"{tag}: would {'continue' if status == 'resume' else 'start'}: {shlex.join(command)}")
            continue
        if status == "stale":  # died before its first checkpoint: soda-train can neither resume nor reuse it
            shutil.rmtree(run.run_dir(sweep))
        write_run_config(run, sweep)
        doing = {"resume": "resuming", "stale": "restarting (no checkpoint from the last attempt)"}.get(status, "training")
        print(f"{tag}: {doing} ({run.params / 1e6:.2f}M parameters, {run.tokens:,} tokens, {run.steps:,} steps) ...",
              flush=True)
        start = time.monotonic()
        code = train(command, run.log_path(sweep))
        elapsed = time.monotonic() - start
        if code == 0:
            atomic_write_json(run.run_dir(sweep) / DONE, {"exit_code": 0, "elapsed_s": round(elapsed, 1),
                                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
            print(f"{tag}: done in {elapsed:.1f} s", flush=True)
        elif code in (PREEMPTED, INTERRUPTED, -signal.SIGTERM, -signal.SIGINT):
            print(f"{tag}: stopped (exit {code}) after {elapsed:.1f} s; its checkpoint is kept: run the same "
                  f"command again to continue the sweep", file=sys.stderr)
            return PREEMPTED
        else:
            failures.append(Failure(run.name, code, last_line(run.log_path(sweep)), run.log_path(sweep)))
            print(f"{tag}: FAILED (exit {code}) after {elapsed:.1f} s: {failures[-1].last_line}; "
                  f"log {failures[-1].log}", flush=True)
    if dry_run:
        return 0
    for f in failures:
        print(f"failed: {f.name} (exit {f.exit_code}): {f.last_line}; log {f.log}", file=sys.stderr)
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def final_loss(metrics: Path) -> tuple[float, str]:
    """The validation loss at the run's last logged step, or (said so) the mean of its last train losses."""
    with metrics.open(newline="") as f:
        rows = list(csv.DictReader(f))
    last_step = max((int(r["step"]) for r in rows if r.get("step")), default=None)
    val = [r for r in rows if r.get("val/loss")]
    if val and int(val[-1]["step"]) == last_step:
        return float(val[-1]["val/loss"]), "val"
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")][-TRAIN_LOSS_WINDOW:]
    if not train_losses:
        return math.nan, "none logged"
    return sum(train_losses) / len(train_losses), f"train (mean of last {len(train_losses)} logged)"


def gather(runs: list[PlannedRun], sweep: Path) -> tuple[Path, list[dict], list[str]]:
    """Write SWEEP_DIR/results.csv from the finished runs: its path, its rows, the runs not finished."""
    rows, unfinished = [], []
    for run in runs:
        d = run.run_dir(sweep)
        if not (d / DONE).is_file() or not (d / "metrics.csv").is_file():
            unfinished.append(run.name)
            continue
        loss, source = final_loss(d / "metrics.csv")
        rows.append({"name": run.name, "budget": run.budget, "width": run.shape.width, "params": run.params,
                     "tokens": run.tokens, "steps": run.steps, "flops": training_flops(run.shape, run.tokens),
                     "loss": "" if math.isnan(loss) else loss, "loss_source": source})
    if not rows:
        raise SodaError(f"{sweep}: no finished runs to gather yet")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    path = sweep / RESULTS_FILE
    atomic_write_text(path, buf.getvalue())
    return path, rows, unfinished
