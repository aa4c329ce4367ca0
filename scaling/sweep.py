"""Carry out a planned IsoFLOP sweep with soda-train and gather its results for `soda-scaling fit`.

Each run is a separate `python -m soda.train` process: a crash or a leak costs one run, not the
sweep, and `scaling` imports of the trainer only its settings declaration (the command line is the
interface, the same one a SLURM job array runs; see `scaling.slurm`). Everything is resumable from the files in
SWEEP_DIR: a run counts as finished only once the sweep has written its marker after exit code 0,
a run with a checkpoint continues with `--resume`, and an attempt that died before its first
checkpoint starts again.

Results one can trust: flags that would change what a run computes are refused in any spelling
soda-train accepts; each run directory records what the run is trained with (its plan row, its data
and what the data held, the flags after `--`), and a re-run that would continue or reuse a run with
other settings is refused (or, asked to, trains it again from scratch); results.csv holds the steps
and tokens each run really trained, read from the run, and a fingerprint of its settings, so `fit`
can refuse rows of differently trained sweeps. One runner at a time works on a sweep and on a run
(a lock that SLURM tasks take too, released by the kernel when its holder dies).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

from scaling.plan import run_name
from soda.shape import ModelShape, training_flops
from soda.train.config import sweep_flags
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_write_json, atomic_write_text

TRAINER = (sys.executable, "-m", "soda.train")  # tests put a stand-in trainer here
PLAN_COLUMNS = ("budget", "width", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab", "seq_len", "params",
                "batch", "steps", "lr", "beta2", "skipped")
SWEEP_RECIPE = {"beta1": 0.95, "weight_decay": 0.1, "z_loss": 0.0}  # SODA's sweep; beta2 comes from the plan
# From soda-train's settings (`soda.train.config`): the flags the plan fixes or the sweep sets per run (passing them
# after `--` would break the IsoFLOP design), and those that change how a run runs, not what it computes (left out
# of the settings a re-run compares, so a sweep may continue on other hardware).
RESERVED_FLAGS = sweep_flags("reserved")
HOW_IT_RUNS = sweep_flags("how")
DEFAULT_VAL_TOKENS = 2**22
DONE, TRAIN_CONFIG, RECORD = "sweep-done.json", "config.yaml", "sweep-run.json"
LOCKS = "locks"  # SWEEP/locks/sweep.lock and one NAME.lock per run, outside the run directories a restart removes
# soda-train resumes from its highest-numbered checkpoints/stepN.ckpt, else checkpoints/last.ckpt: a run holding
# either can continue (the link alone may lag behind when a kill lands between a save and the link).
CHECKPOINTS = ("checkpoints/step*.ckpt", "checkpoints/last.ckpt")
RESULTS_FILE = "results.csv"
RESULT_COLUMNS = ("name", "budget", "width", "params", "tokens", "steps", "flops", "loss", "loss_source",
                  "fingerprint")
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
    over about `val_tokens` tokens whatever the batch, so every run is scored on the same data."""
    s = run.shape
    val_batches = max(1, math.ceil(val_tokens / (run.batch * s.seq_len)))
    return [*TRAINER, "--config", str(run.config_path(sweep)), "--out", str(run.run_dir(sweep)),
            "--width", str(s.width), "--layers", str(s.layers), "--heads", str(s.heads),
            "--kv-heads", str(s.kv_heads), "--head-dim", str(s.head_dim), "--ffn", str(s.ffn),
            "--seq-len", str(s.seq_len), "--tokens", str(run.tokens), "--batch-tokens", str(run.batch * s.seq_len),
            "--lr", repr(run.lr), *(a for d in data for a in ("--data", d)),
            "--val-every", str(run.steps), "--val-batches", str(val_batches), "--no-export",
            "--sample-every", "0", *extra]  # listening samples cost time and tell a loss fit nothing (extra may ask)


def state(run: PlannedRun, sweep: Path) -> str:
    """done | resume (a checkpoint to continue from) | stale (started, no checkpoint yet) | new."""
    d = run.run_dir(sweep)
    if (d / DONE).is_file():
        return "done"
    if any(any(d.glob(pattern)) for pattern in CHECKPOINTS):
        return "resume"
    return "stale" if (d / TRAIN_CONFIG).exists() else "new"


# --------------------------------------------------------------------------------------------
# What each run is trained with: recorded in its directory, compared on every re-run
# --------------------------------------------------------------------------------------------
def data_content(entry: str) -> str:
    """What a --data entry holds, as a short hash: a tokenized directory's manifest.json (soda-tokenize writes it
    whenever it writes the directory), else the names and sizes of the files a directory or shard pattern holds.
    A URL cannot be read from here: its text stands for it."""
    location = entry.split("=", 1)[-1]
    if "://" in location or location.startswith("pipe:"):
        return f"url {_digest(location.encode())}"
    path = Path(location)
    if (path / "manifest.json").is_file():
        return f"manifest {_digest((path / 'manifest.json').read_bytes())}"
    if path.is_dir():
        files = [(str(f.relative_to(path)), f.stat().st_size) for f in sorted(path.rglob("*")) if f.is_file()]
    else:
        import glob

        try:
            from braceexpand import braceexpand  # soda-train expands brace patterns the same way
        except ImportError:
            braceexpand = lambda pattern: [pattern]  # noqa: E731
        names = sorted({f for name in braceexpand(location) for f in (glob.glob(name) or [name])})
        files = [(name, os.path.getsize(name) if os.path.isfile(name) else -1) for name in names]
    return f"files {_digest(json.dumps(files).encode())}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def data_key(data: list[dict]) -> list[list[str]]:
    """Recorded data as compared: each source's NAME (empty without one) and content, not where it lies."""
    return [[d["source"].split("=", 1)[0] if "=" in d["source"] else "", d["content"]] for d in data]


def computing_flags(extra) -> list[str]:
    """The flags after `--` that change what a run computes (HOW_IT_RUNS left out), `--flag=value` as `--flag value`."""
    groups: list[list[str]] = []
    for arg in extra:
        if arg.startswith("--") or not groups:
            groups.append(arg.split("=", 1) if arg.startswith("--") else [arg])
        else:
            groups[-1].append(arg)
    return [a for group in groups if group[0] not in HOW_IT_RUNS for a in group]


@dataclass(frozen=True)
class Setting:
    """What every run of a sweep is trained with beside its plan row: the data (and what it holds), the soda-train
    flags after `--` and the validation tokens; with the sweep recipe, a run's record holds these."""

    data: tuple[str, ...]
    extra: tuple[str, ...] = ()
    val_tokens: int = DEFAULT_VAL_TOKENS

    @cached_property
    def contents(self) -> list[str]:
        return [data_content(entry) for entry in self.data]


def plan_row(run: PlannedRun) -> dict:
    """The plan's values for a run: what an edited plan.csv would change."""
    return {"budget": run.budget, **{k: getattr(run.shape, k) for k in PLAN_COLUMNS[1:9]}, "params": run.params,
            "batch": run.batch, "steps": run.steps, "lr": run.lr, "beta2": run.beta2}


def new_record(run: PlannedRun, setting: Setting | None) -> dict:
    """What `run` is trained with now; only its plan row without a `setting` (gathering knows no --data)."""
    record: dict = {"plan": plan_row(run)}
    if setting is not None:
        record |= {"data": [{"source": d, "content": c} for d, c in zip(setting.data, setting.contents)],
                   "flags": list(setting.extra), "val_tokens": setting.val_tokens, "recipe": SWEEP_RECIPE}
        record["fingerprint"] = fingerprint(record)
    return record


# The parts of a record beside the plan row that a re-run compares, each as compared: what the data held (not where it
# lies), the flags that change what a run computes, the validation tokens and the recipe.
COMPARED = {"data": data_key, "flags": computing_flags, "val_tokens": lambda v: v, "recipe": lambda v: v}


def fingerprint(record: dict) -> str:
    """A hash of what makes the losses of one sweep's runs comparable: the COMPARED parts, the vocabulary and the
    sequence length. results.csv carries it, and `fit` refuses rows whose fingerprints differ."""
    key = {**{part: compare(record[part]) for part, compare in COMPARED.items()},
           "vocab": record["plan"]["vocab"], "seq_len": record["plan"]["seq_len"]}
    return _digest(json.dumps(key, sort_keys=True).encode())


def write_record(run: PlannedRun, sweep: Path, setting: Setting) -> None:
    atomic_write_json(run.run_dir(sweep) / RECORD, new_record(run, setting))


def read_record(run: PlannedRun, sweep: Path) -> dict | None:
    path = run.run_dir(sweep) / RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def describe(part: str, value) -> str:
    """One recorded setting as a message shows it."""
    if part == "data":
        return "data " + " ".join(f"{d['source']} ({d['content']})" for d in value)
    if part == "flags":
        flags = computing_flags(value)
        return f"flags after `--` {shlex.join(flags)!r}" if flags else "no flags after `--`"
    if part == "val_tokens":
        return f"--val-tokens {value}"
    return f"{part} {value}"


def changes(old: dict | None, new: dict) -> tuple[list[str], list[str]] | None:
    """The settings of `new` (a `new_record`) that differ from the run's record `old`, as (was, now) descriptions;
    None when they agree. A missing record differs from everything."""
    if old is None:
        return ["settings it did not record (an older soda-scaling)"], ["this sweep's settings"]
    was, now = [], []
    for k, v in new["plan"].items():
        if old.get("plan", {}).get(k) != v:
            was.append(describe(k, old.get("plan", {}).get(k)))
            now.append(describe(k, v))
    for part, compare in COMPARED.items():
        if part in new and (part not in old or compare(old[part]) != compare(new[part])):
            was.append(describe(part, old.get(part)) if part in old else f"no recorded {part}")
            now.append(describe(part, new[part]))
    return (was, now) if was else None


def check_records(runs: list[PlannedRun], sweep: Path, setting: Setting | None,
                  rerun_changed: bool = False) -> dict[str, tuple[list[str], list[str]]]:
    """Runs holding training (finished, or with a checkpoint) whose record differs from what they would be trained
    with now: refused with one line naming the first one's differences, or with `rerun_changed` returned (name ->
    (was, now)) to be trained again from scratch. Without a `setting` only the plan rows are compared."""
    changed = {}
    for run in runs:
        if state(run, sweep) in ("done", "resume"):
            diff = changes(read_record(run, sweep), new_record(run, setting))
            if diff:
                changed[run.name] = diff
    if changed and not rerun_changed:
        (name, (was, now)), more = next(iter(changed.items())), len(changed) - 1
        also = f" (and {more} more run{'s' * (more > 1)})" if more else ""
        raise SodaError(f"{name} was trained with {', '.join(was)}; now {', '.join(now)}{also}: one sweep must not mix "
                        f"differently trained runs; re-train {'them' if more else 'it'} from scratch with "
                        f"`soda-scaling run ... --rerun-changed`, or run with the settings {'they were' if more else 'it was'} "
                        "trained with")
    return changed


# --------------------------------------------------------------------------------------------
# One runner per sweep and per run
# --------------------------------------------------------------------------------------------
HOST = socket.gethostname()
HOLDER = re.compile(r"pid (\d+) on host (\S+)")  # what a lock file says; the SLURM task writes the same line
NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # file systems mounted without flock


def sweep_lock_path(sweep: Path) -> Path:
    return Path(sweep) / LOCKS / "sweep.lock"


def run_lock_path(run: PlannedRun, sweep: Path) -> Path:
    return Path(sweep) / LOCKS / f"{run.name}.lock"


def _running(holder: str) -> bool:
    """Whether a lock's holder may still run: only a process of this host can be seen to be gone."""
    m = HOLDER.fullmatch(holder)
    if not m or m.group(2) != HOST:
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextmanager
def lock(path: Path, what: Path) -> Iterator[int]:
    """Hold `path` as the lock on `what` (a sweep or one run directory), refused with one line while another runner
    or SLURM task holds it. It is an flock(2), which the kernel drops when its holder dies however it dies, so a
    killed runner's lock is free (and said to be taken over); the file names the holder for the message. On a
    file system without flock the holder's pid decides alone. Yields the file descriptor: a child given it (pass_fds)
    keeps the lock while it runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock = True
        except BlockingIOError:
            flock = False
        except OSError as err:
            if err.errno not in NO_FLOCK:
                raise
            flock = None
        f.seek(0)
        holder = f.read().strip()
        if flock is False or (flock is None and holder and _running(holder)):
            gone = " (gone; a soda-train it started still runs)" if flock is False and not _running(holder) else ""
            remove = f", or delete {path} if it is no longer running" if flock is None else ""
            raise SodaError(f"another soda-scaling run ({holder or 'unknown'}{gone}) is using {what}; wait for it to "
                            f"finish, or stop it{remove}")
        if holder:
            print(f"{what}: taking over the lock of {holder} (no longer running)", flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {HOST}\n")
        f.flush()
        try:
            yield f.fileno()
        finally:
            f.seek(0)
            f.truncate()  # released cleanly: no holder to name


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
    print(f"{tag}: {doing} ({run.params / 1e6:.2f}M parameters, {run.tokens:,} tokens, {run.steps:,} steps) ...",
          flush=True)
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
    run trained."""
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
        rows.append({"name": run.name, "budget": run.budget, "width": run.shape.width, "params": run.params,
                     "tokens": tokens, "steps": steps, "flops": training_flops(run.shape, tokens),
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
