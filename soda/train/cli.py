"""`soda-train`: pre-train a Qwen3-style model on interleaved audio/text shards with SODA's recipe.

Plain `soda-train` tokenizes the bundled demo corpus (with an explicitly random, offline Mimi)
and trains the tiny model on it in a few CPU minutes. `soda-train --size 1b --tokens 500B
--data ...` is the same program at cluster scale: Lightning runs it under DDP or FSDP, across
nodes with torchrun or SLURM, and `--resume` continues exactly where a run stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soda.shape import SIZES
from soda.train.config import (ADJUSTABLE_ON_RESUME, CHANGES_FILE, CONFIG_FILE, DEMO_CONFIG, DEMO_CORPUS, PREDATES,
                               RESUMABLE_CHANGES, TrainConfig, add_train_arguments, config_fields, load_yaml,
                               make_config)
from soda.train.plan import dry_run
from soda.train.run import is_rank_zero, run, save_config
from tokenize_audio.errors import SodaError, Stopped, cli_errors
from tokenize_audio.shards import atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soda-train", allow_abbrev=False,
        description="Pre-train a native discrete-audio model (transformers Qwen3ForCausalLM) by next-token "
                    "prediction on soda-tokenize shards, with SODA's recipe as the defaults: cautious AdamW "
                    "(0.98, 0.98, eps 1e-16, wd 0.033), WSD schedule (10% warm-up, 20% decay), z-loss 1e-4, "
                    "peak LR 0.003*sqrt(batch/256)*sqrt(1024/width). Without --data: the bundled demo corpus "
                    "and the tiny model. Settings: defaults < --config YAML < flags.",
        epilog="examples:\n"
               "  soda-train                                   # demo: tiny model, bundled corpus, CPU minutes\n"
               "  soda-train --size 1b --tokens 500B --dry-run  # the plan of a SODA-scale run\n"
               "  soda-train --size 600m --data speech=tok/speech --data text=tok/text --mix speech=0.95,text=0.05 \\\n"
               "             --micro-batch 8 --devices 8 --num-nodes 4 --strategy fsdp --out runs/600m\n"
               "  soda-train --out runs/600m --resume           # continue after a stop or pre-emption\n"
               "  soda-train export runs/600m --step 20000      # any saved step as a Hugging Face model "
               "(see soda-train export --help)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    return p


def flag_values(args) -> dict:
    fields = config_fields()
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "data" in values:
        values["data"] = list(values["data"])
    if "mix" in values:
        from soda.train.sources import parse_mix

        values["mix"] = parse_mix(values["mix"])
    return values


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soda-train export", allow_abbrev=False,
        description="Export a saved checkpoint of a soda-train run as one Hugging Face model directory (config, "
                    "safetensors weights, tokenizer and vocabulary) that transformers, soda-generate, soda-eval and "
                    "soda-finetune --init-from load. Works for single-file checkpoints (DDP, one device) and sharded "
                    "ones (--strategy fsdp: read a few tensors at a time, without the optimizer state).",
        epilog="examples:\n"
               "  soda-train export runs/600m                    # the newest checkpoint -> runs/600m/hf\n"
               "  soda-train export runs/600m --step 20000       # -> runs/600m/hf-step20000\n"
               "  soda-train export runs/600m --step 20000 --out models/600m-20k",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the run directory (soda-train --out)")
    p.add_argument("--step", type=int, help="the step to export (default: the newest checkpoint)")
    p.add_argument("--out", type=Path, help="the directory to write (default: RUN/hf for the newest checkpoint, "
                                            "RUN/hf-stepN for an earlier one); replaced whole if it exists")
    p.add_argument("--vocab", type=Path, help="directory with the run's vocab.json (default: found in the run's "
                                              "data directories)")
    return p


def export_main(argv: list[str]) -> int:
    """`soda-train export RUN [--step N] [--out DIR]`."""
    from soda.checkpoints import export_step

    args = build_export_parser().parse_args(argv)
    out = export_step(args.run, args.step, args.out, args.vocab)
    print(f"soda-train: exported {out}", file=sys.stderr)
    return 0


@cli_errors("soda-train")
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    flags = flag_values(args)
    out = run_directory(flags, args.config)
    stop_on_signals(out, "soda-train")
    args.resume = resolve_resume(args.resume, out)
    given = {**(load_yaml(args.config) if args.config else {}), **flags}
    defaults = []
    if not args.resume and not args.dry_run and not given.get("data"):
        beyond = beyond_demo(given)
        if beyond:
            return plan_without_data(flags, out, args.config, args.mfu, beyond)
        defaults.append(load_yaml(DEMO_CONFIG))  # under the user's settings: flags and --config still win
    cfg = resolve_config(flags, out, args.resume, args.config, defaults)
    if args.dry_run:
        return dry_run(cfg, args.mfu, args.codec_rate)
    return train(cfg, resume=args.resume)


def beyond_demo(given: dict) -> str | None:
    """The setting (as its flag) that asks for more than the demo can be, or None: a model other than `tiny`, or
    more tokens than the demo's. Such a run without data would train a real shape on 0.2M demo tokens."""
    from soda.shape import SHAPE_FIELDS
    from soda.train.config import parse_count

    for key in ("size", "sweep_width", *SHAPE_FIELDS, "init_from"):
        value = given.get(key)
        if value is not None and not (key == "size" and value == "tiny"):
            return f"--{key.replace('_', '-')} {value}"
    if given.get("tokens") is not None and parse_count(given["tokens"], "--tokens") > parse_count(
            load_yaml(DEMO_CONFIG)["tokens"]):
        return f"--tokens {given['tokens']}"
    return None


def plan_without_data(flags: dict, out: Path, config: Path | None, mfu: float, beyond: str) -> int:
    """The plan of the run asked for (SODA's defaults under the user's settings, never the demo's), then how to give
    it data; exit code 2, nothing trained."""
    try:
        dry_run(resolve_config(flags, out, False, config, []), mfu)
    except SodaError as e:  # e.g. --tokens alone: no model shape to plan
        print(f"soda-train: {e}", file=sys.stderr)
    print(f"soda-train: {beyond} without --data: nothing was trained. Tokenize a corpus first (soda-tokenize CORPUS "
          f"--out tok, or import SODA's released pre-tokenized corpora: soda-tokenize soda:PARQUET_DIR --out tok), "
          f"then run this again with --data tok; plain soda-train runs the bundled demo", file=sys.stderr)
    return 2


def stop_on_signals(out: Path, prog: str) -> None:
    """Until training takes the signals over (`Preemption`): SIGTERM/SIGUSR1 (a scheduler's notice) stop at once with
    143, Ctrl-C with 130, each saying what the run directory actually holds. Without this, SIGTERM during start-up
    (data preparation, model build) killed the run silently and Ctrl-C claimed a checkpoint that did not exist."""
    import signal

    from soda.checkpoints import kept_message

    def stop(signum, frame):
        raise Stopped(f"{'interrupted' if signum == signal.SIGINT else 'stopped'} before training: "
                      f"{kept_message(out, prog)}", 130 if signum == signal.SIGINT else 143, prog.split()[0])

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, stop)


def resolve_resume(resume: str | None, out: Path) -> bool:
    """--resume (yes) / --resume auto (whether OUT holds a checkpoint) / absent, as a yes or no."""
    from soda.checkpoints import last_checkpoint, remove_partial_writes, resumable_checkpoint

    if resume and last_checkpoint(out) is not None:  # a newest checkpoint that does not load is moved aside here
        say = lambda msg: print(f"soda-train: warning: {msg}", file=sys.stderr)  # noqa: E731
        resumable_checkpoint(out, move_aside=is_rank_zero(), say=say if is_rank_zero() else lambda msg: None)
        if is_rank_zero():
            remove_partial_writes(out, say=lambda msg: print(f"soda-train: {msg}", file=sys.stderr))
    return resume == "yes" or (resume == "auto" and last_checkpoint(out) is not None)


def run_directory(flags: dict, config: Path | None, default: str = "runs/demo") -> Path:
    return Path(flags.get("out") or (load_yaml(config).get("out") if config else None) or default)


def resolve_config(flags: dict, out: Path, resume: bool, config: Path | None, defaults: list[dict]) -> TrainConfig:
    """Settings: `defaults` < --config YAML < flags; on --resume the saved config, which the rest may only change
    in how the run runs (RESUMABLE_CHANGES), not in what it computes."""
    layers: list[dict] = list(defaults)
    if resume:
        saved = out / CONFIG_FILE
        if not saved.is_file():
            raise SodaError(f"--resume: {out} has no {CONFIG_FILE}; nothing to resume")
        base = load_yaml(saved)
        for key, value in PREDATES.items():  # a run saved before the setting existed continues as it was trained
            base.setdefault(key, value)
        changed = sorted(k for k, v in {**(load_yaml(config) if config else {}), **flags}.items()
                         if k not in RESUMABLE_CHANGES and k not in ADJUSTABLE_ON_RESUME and base.get(k) != v)
        if changed:
            raise SodaError(f"--resume: {', '.join(changed)} differ from the run in {out}; a resumed run must "
                            f"compute the same thing (start a new --out, or --init-from its export)")
        layers = [base]
    if config:
        layers.append(load_yaml(config))
    layers.append(flags | {"out": str(out)})
    return make_config(*layers)


def prepare_demo_data(out: Path) -> None:
    """Tokenize the bundled demo corpus into OUT/tokens once (random Mimi: offline, labelled RANDOM)."""
    tokens = out / "tokens"
    if (tokens / "manifest.json").is_file():
        return
    if not DEMO_CORPUS.is_dir():
        raise SodaError(f"the bundled demo corpus {DEMO_CORPUS} is missing; give --data")
    from tokenize_audio.cli import tokenize

    print(f"soda-train: no --data: tokenizing the bundled demo corpus into {tokens} "
          f"(codec mimi:random, an offline RANDOM codec; byte-level text)", file=sys.stderr)
    tokenize([DEMO_CORPUS / "speech", DEMO_CORPUS / "text" / "kjv_proverbs.txt"], tokens, codec="mimi:random",
             text_tokenizer="bytes", quiet=True)


def record_resume_changes(cfg: TrainConfig) -> None:
    """A resume that changes an ADJUSTABLE_ON_RESUME setting: say so, append it (with the step it applies from) to
    the run's change history, and save the config so later resumes continue with the new value."""
    import json
    import time

    from soda.checkpoints import last_checkpoint

    out = Path(cfg.out)
    saved, now = load_yaml(out / CONFIG_FILE), cfg.to_dict()
    changes = {k: (saved.get(k), now[k]) for k in ADJUSTABLE_ON_RESUME if saved.get(k) != now[k]}
    if not changes:
        return
    ckpt = last_checkpoint(out)
    step = int(ckpt.stem.removeprefix("step")) if ckpt and ckpt.stem.removeprefix("step").isdigit() else None
    history = out / CHANGES_FILE
    lines = history.read_text() if history.is_file() else ""
    for key, (old, new) in changes.items():
        print(f"soda-train: --resume: {key} changed from {old} to {new} from step {step} on (recorded in {history})",
              file=sys.stderr)
        lines += json.dumps({"step": step, "setting": key, "from": old, "to": new,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    atomic_write_text(history, lines)
    save_config(cfg)


def check_run_directory(out: Path, resume: bool) -> None:
    """A resume needs a checkpoint in OUT; a new run needs OUT free of one."""
    from soda.checkpoints import checkpoint_dir, last_checkpoint

    if resume and last_checkpoint(out) is None:
        aside = sorted(p.name for p in checkpoint_dir(out).glob("*.corrupt*"))
        if aside:
            raise SodaError(f"--resume: no readable checkpoint in {checkpoint_dir(out)} (unreadable, moved aside: "
                            f"{', '.join(aside)}); start the run again without --resume, into another --out")
        raise SodaError(f"--resume: no checkpoint in {checkpoint_dir(out)} yet; start the run again without --resume")
    if not resume and last_checkpoint(out) is not None:
        raise SodaError(f"{out} already holds a run; continue it with --resume, or choose another --out")


def check_checkpoint_layout(out: Path, strategy: str) -> None:
    """A sharded (FSDP) checkpoint resumes under --strategy fsdp only (on any number of devices: it is resharded);
    under DDP or one device, Lightning would fail on the directory with a traceback."""
    from soda.checkpoints import is_sharded, last_checkpoint

    ckpt = last_checkpoint(out)
    if strategy != "fsdp" and ckpt is not None and is_sharded(ckpt):
        raise SodaError(f"--resume: {ckpt} is a sharded (FSDP) checkpoint; resume with --strategy fsdp (any number "
                        f"of devices), or export it (soda-train export {out}) and start a new run from it with "
                        f"--init-from")


def train(cfg: TrainConfig, resume: bool) -> int:
    out = Path(cfg.out)
    if resume:
        check_checkpoint_layout(out, cfg.strategy)
    if is_rank_zero():
        check_run_directory(out, resume)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            record_resume_changes(cfg)
        if not cfg.data:
            prepare_demo_data(out)
    if not cfg.data:  # the demo: its speech and text shards as two sources (weights from configs/demo.yaml)
        cfg.data = [f"speech={out / 'tokens'}", f"text={out / 'tokens'}"]
    if cfg.size is None and cfg.sweep_width is None and cfg.width is None and not cfg.init_from:
        raise SodaError(f"give --size ({', '.join(SIZES)}), --sweep-width or an explicit shape")
    return run(cfg, resume)


if __name__ == "__main__":
    sys.exit(main())
