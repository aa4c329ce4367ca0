"""Settings declared once: a dataclass field carries its flag, help, bounds and resume rule (`setting`), and the
CLIs' argparse arguments (`add_arguments`), the bounds check (`check_bounds`) and the resume rules (`names_with`) are
read from it, so a new setting is one field, not six places that must agree."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import MISSING

from tokenize_audio.errors import SodaError

# How a setting may differ when a run is resumed: not at all (what the run computes), freely (how it runs: devices,
# logging, --max-steps), or as a recorded recovery step (a lower LR after a divergence).
FIXED, RESUMABLE, ADJUSTABLE = "fixed", "resumable", "adjustable"
ARGPARSE_KEYS = ("type", "choices", "metavar", "action", "nargs", "const", "dest")


def setting(default=MISSING, *, factory=MISSING, flag: str | bool | None = None, help: str | None = None,
            group: str | None = None, resume: str = FIXED, at_least=None, positive: bool = False,
            predates=MISSING, sweep: str | None = None, **argparse_kwargs) -> dataclasses.Field:
    """A dataclass field with its command-line and checking metadata.

    flag: the option (default: `--` + the name with dashes); False: a file-only setting (YAML, no flag).
    group: the help section of its flag; by default the one of the field before it (None: no section).
    at_least / positive: bounds `check_bounds` enforces (None always passes: "not given").
    predates: the value runs saved before the setting existed were trained with.
    sweep: "reserved" (the IsoFLOP sweep sets it) or "how" (how a run runs: a sweep may change it).
    argparse_kwargs: type, choices, metavar, action, nargs, const, dest, as for `add_argument`."""
    unknown = set(argparse_kwargs) - set(ARGPARSE_KEYS)
    if unknown:
        raise TypeError(f"setting(): unknown argument(s) {', '.join(sorted(unknown))}")
    if resume not in (FIXED, RESUMABLE, ADJUSTABLE):
        raise ValueError(f"setting(): resume={resume!r}")
    metadata = {"flag": flag, "help": help, "group": group, "resume": resume, "at_least": at_least,
                "positive": positive, "sweep": sweep, "argparse": argparse_kwargs}
    if predates is not MISSING:
        metadata["predates"] = predates
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def flag_of(f: dataclasses.Field) -> str | None:
    """The field's option, or None for a file-only setting (or a plain field without metadata)."""
    if "flag" not in f.metadata or f.metadata["flag"] is False:
        return None
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def names_with(cls, key: str, value) -> tuple[str, ...]:
    """Field names (in declaration order) whose metadata `key` equals `value`."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(key) == value)


def add_arguments(parser: argparse.ArgumentParser, *classes, skip=frozenset(), helps: dict | None = None,
                  unset=()) -> None:
    """Each flagged field of `classes` as an argument, in the field's `group` (argument groups appear in the order
    their first field does). Classes in `unset` default to None ("not given": the layers under the flags decide);
    the others to the field's default. `helps` replaces a field's help text; flags in `skip` are left out."""
    sections: dict = {}  # group name -> fields, in the order each group first appears
    for cls in classes:
        name = None
        for f in dataclasses.fields(cls):
            name = f.metadata.get("group") or name
            if flag_of(f) is not None and flag_of(f) not in skip:
                sections.setdefault(name, []).append((cls, f))
    for name, fields in sections.items():
        group = parser.add_argument_group(name) if name else parser
        for cls, f in fields:
            kwargs = {"dest": f.name, **f.metadata["argparse"]}
            kwargs["help"] = (helps or {}).get(f.name, f.metadata["help"])
            kwargs["default"] = None if cls in unset else default_of(f)
            group.add_argument(flag_of(f), **kwargs)


def from_args(cls, args: argparse.Namespace, **values):
    """`cls` from the parsed flags of its fields (those `args` has), then `values`."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **values})


def check_bounds(obj) -> None:
    """Refuse a value below a field's `at_least`, then a non-positive or non-finite one where `positive`, naming
    the setting as its flag."""
    fields = [f for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None]
    for f in fields:
        low, value = f.metadata.get("at_least"), getattr(obj, f.name)
        if low is not None and not value >= low:
            raise SodaError(f"--{f.name.replace('_', '-')} {value}: must be at least {low}")
    for f in fields:
        value = getattr(obj, f.name)
        if f.metadata.get("positive") and not (math.isfinite(value) and value > 0):
            raise SodaError(f"--{f.name.replace('_', '-')} {value}: must be positive")


def resumed(cls, saved_values: dict, given: dict, saved_path, keep=frozenset(), how: str = ""):
    """A `cls` settings dataclass for a --resume: the run's saved values, with the flags `given` now only where the
    field's metadata says `resumable` (fields in `keep` may be given again unchanged or not: they name what the run
    was made from). Any other flag that differs is refused in one line naming it and `saved_path`; `max_steps` is
    not carried over (a stop asked for once is not asked again: the run goes on to its --steps unless told)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in saved_values.items() if k in fields}
    resumable = {k for k, f in fields.items() if f.metadata.get("resumable")}
    changed = sorted(k for k, v in given.items() if k not in resumable | set(keep) and values.get(k) != v)
    if changed:
        raise SodaError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from the run's "
                        f"{saved_path} (only how the run runs may change{how}); start a new run into another --out")
    values["max_steps"] = None
    return cls(**(values | {k: v for k, v in given.items() if k in resumable}))
