"""What each run of a sweep is trained with: recorded in its directory, compared on every re-run.

A run's record (SWEEP/runs/NAME/sweep-run.json) holds its plan row, its data and what the data held, the flags after
`--` and the validation tokens, with the sweep recipe. A re-run that would continue or reuse a run with other
settings is refused (or, asked to, trains it again from scratch), and the record's fingerprint goes into
results.csv so that `fit` can refuse rows of differently trained sweeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from scaling.runs import HIERARCHICAL_COLUMNS, PLAN_COLUMNS, RECORD, PlannedRun, state
from soda.train.config import sweep_flags
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_write_json

SWEEP_RECIPE = {"beta1": 0.95, "weight_decay": 0.1, "z_loss": 0.0}  # SODA's sweep; beta2 comes from the plan
# From soda-train's settings (`soda.train.config`): the flags that change how a run runs, not what it computes (left
# out of the settings a re-run compares, so a sweep may continue on other hardware).
HOW_IT_RUNS = sweep_flags("how")
DEFAULT_VAL_TOKENS = 2**22


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
    """The plan's values for a run: what an edited plan.csv would change (a flat run's as before the hierarchical
    family, so its older records still agree)."""
    family = {k: getattr(run, k) for k in HIERARCHICAL_COLUMNS} if run.hierarchical else {}
    return {"budget": run.budget, **{k: getattr(run.shape, k) for k in PLAN_COLUMNS[1:9]}, "params": run.params,
            "batch": run.batch, "steps": run.steps, "lr": run.lr, "beta2": run.beta2, **family}


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
    sequence length, and a hierarchical run's architecture (a flat run's key is as before it). results.csv carries it,
    and `fit` refuses rows whose fingerprints differ."""
    key = {**{part: compare(record[part]) for part, compare in COMPARED.items()},
           "vocab": record["plan"]["vocab"], "seq_len": record["plan"]["seq_len"]}
    if record["plan"].get("architecture", "flat") != "flat":
        key["architecture"] = record["plan"]["architecture"]
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
