"""Carry out a planned IsoFLOP sweep with soda-train and gather its results for `soda-scaling fit`.

Each run is a separate `python -m soda.train` process: a crash or a leak costs one run, not the
sweep, and `scaling` imports of the trainer only its settings declaration (the command line is the
interface, the same one a SLURM job array runs; see `scaling.slurm`). Everything is resumable from the files in
SWEEP_DIR (`scaling.runs`): a run counts as finished only once the sweep has written its marker after exit code 0,
a run with a checkpoint continues with `--resume`, and an attempt that died before its first
checkpoint starts again.

Results one can trust: flags that would change what a run computes are refused in any spelling
soda-train accepts; each run directory records what the run is trained with, and a re-run that would continue or
reuse a run with other settings is refused (or, asked to, trains it again from scratch; `scaling.records`);
results.csv holds the steps and tokens each run really trained, read from the run, and a fingerprint of its
settings, so `fit` can refuse rows of differently trained sweeps. One runner at a time works on a sweep and on a run
(`scaling.locks`).
"""

from __future__ import annotations

import csv
import io
import math
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scaling.locks import lock, run_lock_path
from scaling.plan import run_name
from scaling.records import DEFAULT_VAL_TOKENS, SWEEP_RECIPE, Setting, check_records, read_record, write_record
from scaling.runs import DONE, HIERARCHICAL_COLUMNS, PLAN_COLUMNS, TRAIN_CONFIG, PlannedRun, state
from soda.shape import ModelShape, hierarchical_training_flops_per_step, training_flops
from soda.train.config import sweep_flags
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_write_json, atomic_write_text

TRAINER = (sys.executable, "-m", "soda.train")  # tests put a stand-in trainer here
# From soda-train's settings (`soda.train.config`): the flags the plan fixes or the sweep sets per run (passing them
# after `--` would break the IsoFLOP design).
# The model family's flags are the plan's too (a hierarchical row's depth; refused after `--` for a flat plan as well).
RESERVED_FLAGS = sweep_flags("reserved")  # the plan's family and depth among them
RESULTS_FILE = "results.csv"
RESULT_COLUMNS = ("name", "budget", "width", "params", "tokens", "steps", "flops", "loss", "loss_source",
                  "fingerprint")
TRAIN_LOSS_WINDOW = 5  # logged train losses averaged when a run has no final validation loss
PREEMPTED, INTERRUPTED = 143, 130


def load_plan(path: Path) -> list[PlannedRun]:
    """The usable (not skipped) rows of a `soda-scaling plan` CSV; without an `architecture` column, flat ones."""
    path = Path(path)
    if not path.is_file():
        raise SodaError(f"plan {path} not found (write one with `soda-scaling plan`)")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PLAN_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SodaError(f"{path}: missing column{'s' * (len(missing) > 1)} {', '.join(missing)}; "
                            "is it a `soda-scaling plan` CSV?")
        family = "architecture" in (reader.fieldnames or [])
        missing = [c for c in HIERARCHICAL_COLUMNS if family and c not in reader.fieldnames]
        if missing:
            raise SodaError(f"{path}: an `architecture` column but no {', '.join(missing)}; is it a "
                            "`soda-scaling plan` CSV?")
        runs = []
        for row in reader:
            if row["skipped"].strip():
                continue
            try:
                shape = ModelShape(*(int(row[k]) for k in PLAN_COLUMNS[1:9]))
                budget = float(row["budget"])
                architecture = row["architecture"].strip() if family else "flat"
                if architecture not in ("flat", "hierarchical"):
                    raise ValueError(f"architecture {architecture!r}: flat or hierarchical")
                model = {} if architecture == "flat" else {
                    "depth_width": int(row["depth_width"]), "depth_layers": int(row["depth_layers"]),
                    "n_codebooks": int(row["n_codebooks"]), "codebook_size": int(row["codebook_size"]),
                    "frames_per_step": float(row["frames_per_step"])}
                run = PlannedRun(row.get("name") or run_name(budget, shape.width), budget, shape,
                                 int(row["params"]), int(row["batch"]), int(row["steps"]), float(row["lr"]),
                                 float(row["beta2"]), architecture, **model)
                if run.hierarchical:
                    run.hierarchical_shape  # noqa: B018 (a vocabulary too small for its codebooks fails here)
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
            found = Vocabulary.load(Path(location))
            size = found.size
            if size != vocab:
                raise SodaError(f"--data {entry}: its vocabulary has {size:,} ids but the plan counted {vocab:,}; "
                                f"plan again with --vocab {size}")
            codes = (found.n_codebooks, found.codebook_size)
            if runs[0].hierarchical and codes != (runs[0].n_codebooks, runs[0].codebook_size):
                raise SodaError(f"--data {entry}: {codes[0]} codebooks of {codes[1]} codes, but the hierarchical plan "
                                f"counted {runs[0].n_codebooks} of {runs[0].codebook_size}")


def check_extra(extra: list[str]) -> None:
    """Refuse reserved flags after `--` in every spelling soda-train's argparse would take for them: the flag, any
    prefix of it (argparse expands an unambiguous one, and a run would leave the plan), and their `=value` forms."""
    for arg in extra:
        name = arg.split("=", 1)[0]
        if not name.startswith("--") or name == "--":
            continue
        meant = sorted(f for f in RESERVED_FLAGS if f.startswith(name))
        if meant:
            short = "" if meant == [name] else f" (short for {', '.join(meant)})"
            raise SodaError(f"{name} after `--`{short}: the sweep sets {'it' if len(meant) == 1 else 'them'} (each "
                            "run trains the plan's shape for its whole budget); add only other soda-train flags")


def write_run_config(run: PlannedRun, sweep: Path) -> Path:
    """The optimizer settings soda-train has no flags for (betas), with SODA's sweep wd and z-loss."""
    path = run.config_path(sweep)
    atomic_write_text(path, f"# {run.name}: SODA's sweep recipe, written by soda-scaling run\n"
                            f"betas: [{SWEEP_RECIPE['beta1']}, {run.beta2!r}]\n"
                            f"weight_decay: {SWEEP_RECIPE['weight_decay']}\n"
                            f"z_loss: {SWEEP_RECIPE['z_loss']}\n")
    return path


def train_command(run: PlannedRun, sweep: Path, data: list[str], extra: list[str],
                  val_tokens: int = DEFAULT_VAL_TOKENS) -> list[str]:
    """The soda-train command line of a run (without --resume). Validation runs once, at the last step,
    over about `val_tokens` tokens whatever the batch, so every run is scored on the same data. A hierarchical run
    adds its family and depth flags; its window, tokens and batch count steps, in the plan as in soda-train."""
    s, seq_len = run.shape, run.shape.seq_len
    val_batches = max(1, math.ceil(val_tokens / (run.batch * seq_len)))
    family = (["--architecture", "hierarchical", "--depth-width", str(run.depth_width), "--depth-layers",
               str(run.depth_layers)] if run.hierarchical else [])
    return [*TRAINER, "--config", str(run.config_path(sweep)), "--out", str(run.run_dir(sweep)),
            "--width", str(s.width), "--layers", str(s.layers), "--heads", str(s.heads),
            "--kv-heads", str(s.kv_heads), "--head-dim", str(s.head_dim), "--ffn", str(s.ffn), *family,
            "--seq-len", str(seq_len), "--tokens", str(run.tokens), "--batch-tokens", str(run.batch * seq_len),
            "--lr", repr(run.lr), *(a for d in data for a in ("--data", d)),
            "--val-every", str(run.steps), "--val-batches", str(val_batches), "--no-export",
            "--sample-every", "0", *extra]  # listening samples cost time and tell a loss fit nothing (extra may ask)


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


def train(command: list[str], log: Path, keep: tuple[int, ...] = ()) -> int:
    """Run soda-train, output appended to `log`; it inherits the file descriptors `keep` (its locks, held while it
    runs). SIGTERM and SIGUSR1 are passed on so the run checkpoints (exit 143); on Ctrl-C the run got the same signal
    from the terminal: wait for it to checkpoint and return its exit code (130), as for a pre-emption."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, pass_fds=keep)
        forward = lambda signum, _: proc.send_signal(signum)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the run checkpoints on the same Ctrl-C; a second one stops it at once
            return proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_sweep(runs: list[PlannedRun], sweep: Path, data: list[str], extra: list[str],
              val_tokens: int = DEFAULT_VAL_TOKENS, dry_run: bool = False, rerun_changed: bool = False) -> int:
    """Train every run not yet finished; 0 if all finished, 1 if any failed or was left to another runner, 143 if
    pre-empted (130 for Ctrl-C). Runs trained with other settings are refused up front, or with `rerun_changed` trained again from
    scratch (see `check_records`)."""
    setting = Setting(tuple(data), tuple(extra), val_tokens)
    changed = check_records(runs, sweep, setting, rerun_changed)
    failures: list[Failure] = []
    busy: list[str] = []
    n = len(runs)
    for k, run in enumerate(runs, 1):
        tag = f"[{k}/{n}] {run.name}"
        if dry_run:
            status = "changed" if run.name in changed else state(run, sweep)
            if status == "done":
                print(f"{tag}: finished earlier", flush=True)
            else:
                doing = {"resume": "continue", "changed": "re-train from scratch"}.get(status, "start")
                command = train_command(run, sweep, data, extra, val_tokens) + ["--resume"] * (status == "resume")
                print(f"{tag}: would {doing}: {shlex.join(command)}")
            continue
        try:
            with lock(run_lock_path(run, sweep), run.run_dir(sweep)) as held:
                code = train_run(run, sweep, setting, changed.get(run.name), tag, held)
        except SodaError as err:  # another runner or SLURM task is training it
            busy.append(f"{run.name}: {err}")
            print(f"{tag}: left alone: {err}", flush=True)
            continue
        if code in (PREEMPTED, INTERRUPTED, -signal.SIGTERM, -signal.SIGINT):
            return INTERRUPTED if code in (INTERRUPTED, -signal.SIGINT) else PREEMPTED
        if code not in (0, None):
            failures.append(Failure(run.name, code, last_line(run.log_path(sweep)), run.log_path(sweep)))
    for f in failures:
        print(f"failed: {f.name} (exit {f.exit_code}): {f.last_line}; log {f.log}", file=sys.stderr)
    for line in busy:
        print(f"left alone: {line}", file=sys.stderr)
    return 1 if failures or busy else 0


def train_run(run: PlannedRun, sweep: Path, setting: Setting, change: tuple[list[str], list[str]] | None, tag: str,
              held: int) -> int | None:
    """Train (start, continue or start over) one run whose lock `held` is ours; its exit code, None if it had finished.
    A new run's directory first gets its record; a continued one keeps the record it started with."""
    status = "changed" if change else state(run, sweep)
    if status == "done":
        print(f"{tag}: finished earlier", flush=True)
        return None
    if status in ("stale", "changed"):  # died before its first checkpoint, or trained otherwise: start again
        shutil.rmtree(run.run_dir(sweep))
    if status != "resume":
        write_record(run, sweep, setting)
    write_run_config(run, sweep)
    command = train_command(run, sweep, list(setting.data), list(setting.extra), setting.val_tokens)
    doing = {"resume": "resuming", "stale": "restarting (no checkpoint from the last attempt)",
             "changed": f"re-training from scratch ({', '.join(change[1])}; it was trained with {', '.join(change[0])})"
             if change else ""}.get(status, "training")
    counted = f"{run.tokens:,} backbone steps" if run.hierarchical else f"{run.tokens:,} tokens"
    print(f"{tag}: {doing} ({run.params / 1e6:.2f}M parameters, {counted}, {run.steps:,} steps) ...", flush=True)
    start = time.monotonic()
    code = train(command + ["--resume"] * (status == "resume"), run.log_path(sweep), keep=(held,))
    elapsed = time.monotonic() - start
    if code == 0:
        atomic_write_json(run.run_dir(sweep) / DONE, {"exit_code": 0, "elapsed_s": round(elapsed, 1),
                                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"{tag}: done in {elapsed:.1f} s", flush=True)
    elif code in (PREEMPTED, INTERRUPTED, -signal.SIGTERM, -signal.SIGINT):
        kept = ("its checkpoint is kept" if state(run, sweep) == "resume"
                else "it had saved no checkpoint yet and will start over")  # a stop during soda-train's start-up
        print(f"{tag}: stopped (exit {code}) after {elapsed:.1f} s; {kept}: run the same command again to continue "
              f"the sweep", file=sys.stderr)
    else:
        log = run.log_path(sweep)
        print(f"{tag}: FAILED (exit {code}) after {elapsed:.1f} s: {last_line(log)}; log {log}", flush=True)
    return code


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def final_loss(rows: list[dict]) -> tuple[float, str]:
    """The validation loss at the run's last logged step, or (said so) the mean of its last train losses."""
    last_step = max((int(r["step"]) for r in rows if r.get("step")), default=None)
    val = [r for r in rows if r.get("val/loss")]
    if val and int(val[-1]["step"]) == last_step:
        return float(val[-1]["val/loss"]), "val"
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")][-TRAIN_LOSS_WINDOW:]
    if not train_losses:
        return math.nan, "none logged"
    return sum(train_losses) / len(train_losses), f"train (mean of last {len(train_losses)} logged)"


def trained(run_dir: Path, rows: list[dict]) -> tuple[int, int]:
    """(steps, tokens) a finished run trained, read from the run, whatever reached soda-train: its metrics' last step
    (soda-train always writes a row for it, numbered from 0) times its config.yaml's batch (batch_tokens in whole
    sequences of seq_len, as soda-train rounds it)."""
    import yaml

    path = run_dir / TRAIN_CONFIG
    try:
        config = yaml.safe_load(path.read_text()) or {}
        seq_len = int(config["seq_len"])
        per_step = max(1, round(float(config["batch_tokens"]) / seq_len)) * seq_len
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, ZeroDivisionError):
        raise SodaError(f"{path}: no readable seq_len and batch_tokens (soda-train writes both)") from None
    steps = max((int(r["step"]) for r in rows if r.get("step")), default=-1) + 1
    return steps, steps * per_step


def gather(runs: list[PlannedRun], sweep: Path) -> tuple[Path, list[dict], list[str]]:
    """Write SWEEP_DIR/results.csv from the finished runs: its path, its rows, the runs not finished. A finished run
    whose record differs from its plan row is refused (see `check_records`); steps, tokens and FLOPs are what each
    run trained (a hierarchical run's tokens are its backbone steps, its FLOPs 3 x forward per step)."""
    check_records(runs, sweep, None)
    rows, unfinished = [], []
    for run in runs:
        d = run.run_dir(sweep)
        if not (d / DONE).is_file() or not (d / "metrics.csv").is_file():
            unfinished.append(run.name)
            continue
        with (d / "metrics.csv").open(newline="") as f:
            metrics = list(csv.DictReader(f))
        loss, source = final_loss(metrics)
        steps, tokens = trained(d, metrics)
        if run.hierarchical:
            flops = hierarchical_training_flops_per_step(run.hierarchical_shape, "3x-forward",
                                                         run.frames_per_step) * tokens
        else:
            flops = training_flops(run.shape, tokens)
        rows.append({"name": run.name, "budget": run.budget, "width": run.shape.width, "params": run.params,
                     "tokens": tokens, "steps": steps, "flops": flops,
                     "loss": "" if math.isnan(loss) else loss, "loss_source": source,
                     "fingerprint": read_record(run, sweep).get("fingerprint", "")})
    if not rows:
        raise SodaError(f"{sweep}: no finished runs to gather yet")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    path = sweep / RESULTS_FILE
    atomic_write_text(path, buf.getvalue())
    return path, rows, unfinished
