"""`soda-scaling`: plan an IsoFLOP sweep (plan), train it with soda-train (run), fit scaling laws to its
results (fit), plot a fit (plot). A new subcommand is a parser in `build_parser` plus an entry in COMMANDS;
the work itself lives in the modules (plan, sweep, slurm, fit, plots).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shlex
import sys
import textwrap
from pathlib import Path

from scaling.fit import FIT_FILE, fit_scaling
from scaling.frontier import FRONTIER_COSTS
from scaling.locks import lock, sweep_lock_path
from scaling.plan import ARCHITECTURES, MIN_BATCH, MIN_SEQ_LEN, PAPER_BUDGETS, as_rows, plan_sweep
from scaling.records import DEFAULT_VAL_TOKENS, HOW_IT_RUNS
from scaling.results import load_results
from scaling.runs import state
from scaling.summary import human_count, summary
from scaling.sweep import check_data, check_extra, gather, load_plan, run_sweep
from soda.shape import SODA_VOCAB
from tokenize_audio.errors import SodaError, cli_errors
from tokenize_audio.shards import atomic_write_json, atomic_write_text

FIT_HELP = """Approach 2: per budget, loss is fitted as a parabola in ln N (and in ln D) by Huber-weighted
least squares; the minima give N* = k C^a and D* = k C^b (and, for predictions, a pure power law
of the minimum loss). Approach 3: L = E + A/N^alpha + B/D^beta, with E, A, B >= 0 solved by
non-negative least squares over an (alpha, beta) grid, then a Huber fit on log L; a = beta/(alpha+beta),
b = alpha/(alpha+beta). Its N*, D* at a budget minimise L along what the budget really buys (--cost).
FLOPs/(N D) is not a constant (3.6 to 6.4 on SODA's grid), so when a `width` column holds SODA
sweep-rule shapes (vocab and seq_len from their columns, or solved from params and FLOPs) the optimum
walks that shape family, width continuous, D = C/(3 x forward FLOPs per token) ("shape-family");
otherwise ln(FLOPs/(N D)) is fitted as a quadratic in ln N over the runs ("fitted"); "constant" is
C = k N D with k the runs' median. fit.json says which (approach3.frontier_cost). 95% intervals
come from resampling runs within each budget (--bootstrap, --seed).

RESULTS.csv needs columns flops, params, tokens, loss. An optional `budget` column groups the runs
(its value is C); without it, runs whose FLOPs agree within 5% form one budget (C = their median).
Optional `width`, `vocab`, `seq_len` give the shapes; other columns are ignored. A run with an
empty, nan or inf loss (diverged or unfinished) is excluded and listed in fit.json and the summary.
Any other bad value stops with an error naming the line and column: a missing column, a non-numeric,
non-positive or implausible flops/params/tokens/budget (e.g. 1e300, or params in millions: FLOPs /
(N D) should be about 6), a loss <= 0 or above 100 nats (2 ln V with a `vocab` column). So do fewer
than 3 budgets or a budget with fewer than 3 usable runs. A row that repeats an earlier one would
count twice and narrow the intervals: exact duplicates are dropped (--keep-duplicates keeps them),
and every repeat is counted in fit.json and named in a warning.
Writes OUT/fit.json; see `plot`."""

RUN_HELP = f"""Trains each usable row of PLAN with soda-train, one run after another, in OUT/runs/NAME (its
log in OUT/logs/NAME.log), then writes OUT/results.csv (name, budget, width, params, tokens, steps,
flops, loss, loss_source, fingerprint) for `soda-scaling fit`. Each run gets the row's shape, tokens, batch,
LR and seq_len, SODA's sweep optimizer (betas 0.95 and the row's beta2, weight decay 0.1, no z-loss; in
OUT/configs/NAME.yaml) and one validation at its last step over about --val-tokens tokens; its loss is
that validation loss (or, if it has none, the mean of its last train losses, said in loss_source). Steps,
tokens and flops are what the run trained, read from the run (its metrics.csv and config.yaml). A hierarchical
plan's runs also get --architecture hierarchical and the row's --depth-width/--depth-layers; soda-train counts their
windows, tokens and batch in steps, as the plan does, and results.csv counts their backbone steps as tokens and
3 x forward FLOPs per step.

Resumable: run the same command again and finished runs are skipped, a run with a checkpoint
continues with --resume, and one that died before its first checkpoint starts again. A failed run is
reported and the sweep goes on (exit code 1 at the end); a pre-empted or interrupted run stops the
sweep: SIGTERM/SIGUSR1 exit 143, Ctrl-C 130, and the run's checkpoint is kept (or the sweep says it had
none yet). Flags after `--` go to every soda-train run (e.g. -- --workers 0
--mix speech=0.9,text=0.1); those the plan fixes (shape, tokens, batch, LR, --max-steps, ...) are refused,
abbreviated or not.

Each run directory records what the run is trained with (OUT/runs/NAME/sweep-run.json): its plan row, its
--data and a hash of what the data held (manifest.json, or the files' names and sizes), the flags after `--`
and --val-tokens. A re-run that would continue or keep a run trained with other settings (an edited plan
row, other data, other flags) is refused with the difference named, or with --rerun-changed trains such
runs again from scratch. Flags that change only how a run runs may differ:
{textwrap.fill(", ".join(sorted(HOW_IT_RUNS)), 100)}.
The fingerprint column hashes the other settings: `fit` refuses rows with different ones.

One runner at a time: a second `soda-scaling run` on OUT is refused while the first runs (OUT/locks/; a
lock left by a killed runner is taken over), and a run a SLURM task is training is left alone.

--emit slurm writes OUT/sweep.sbatch (a job array, one task per run, with the same resume rules and
locks) and OUT/commands.txt instead of training; gather their results later with --gather-only."""


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SodaError(f"{what} {text!r}: expected comma-separated numbers, e.g. 3e18,9e18") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise SodaError(f"{what} {text!r}: values must be positive finite numbers")
    return values


def _at_least(value: int, minimum: int, flag: str) -> None:
    if value < minimum:
        raise SodaError(f"{flag} {value}: must be at least {minimum}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soda-scaling",
        description="Plan IsoFLOP scaling sweeps by SODA's rules (C = 3 x analytic forward FLOPs, "
                    "N = total parameters including both embedding matrices), fit compute-optimal scaling "
                    "laws to their results and plot the fits.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser(
        "plan", help="write the sweep grid (one row per budget x width) as CSV",
        description="The sweep grid: layers = round(d/(64+4*log2 d-7)), heads = kv = max(1, d/128), FFN 4d; "
                    "tokens D = C/(3*forward FLOPs per token); batch = next power of two of D/(2^16*seq) halved "
                    "while LR = 0.33*sqrt(B)/d > 0.01; beta2 = 0.98^(B/128). Runs with batch < 8 or >= 400k "
                    "steps are kept in the CSV with a `skipped` reason (use --drop-skipped to leave them out). "
                    "--architecture hierarchical plans the same way in backbone steps (one text token or one audio "
                    "frame each): backbone = the sweep shape, depth decoder width d//2 and 4 layers unless given, "
                    "steps D = C/(3*forward FLOPs per step), batch in sequences of --seq-len steps.",
    )
    plan.add_argument("--budgets", help="comma list of training-FLOP budgets, e.g. 3e18,9e18,1.8e19")
    plan.add_argument("--paper", action="store_true", help="SODA's seven budgets and its wider target runs")
    plan.add_argument("--widths", help="comma list of widths (default: SODA's grid for each budget)")
    plan.add_argument("--vocab", type=int, default=SODA_VOCAB, help=f"vocabulary size (default {SODA_VOCAB:,})")
    plan.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence (default 4096)")
    plan.add_argument("--min-batch", type=int, default=MIN_BATCH,
                      help=f"skip runs whose batch is below this many sequences (default {MIN_BATCH}, SODA's rule; "
                           "1 keeps the micro runs of a CPU demo sweep)")
    plan.add_argument("--batch-floor", type=int, default=1,
                      help="raise batches below this many sequences to it instead of skipping them (LR from the "
                           "raised batch); e.g. 8 for a CPU micro sweep, whose rule batch is 1 and too noisy")
    plan.add_argument("--architecture", choices=ARCHITECTURES, default="flat",
                      help="flat (default: one Qwen3 over the flat token stream) or hierarchical (soda.hierarchical: "
                           "a backbone over steps plus a depth decoder per audio frame; --seq-len then counts steps)")
    plan.add_argument("--depth-width", type=int,
                      help="hierarchical: the depth decoder's width (default: half the backbone width)")
    plan.add_argument("--depth-layers", type=int, help="hierarchical: the depth decoder's layers (default 4)")
    plan.add_argument("--frames-per-step", type=float,
                      help="hierarchical: the share of backbone steps that are audio frames, each charged a depth "
                           "pass (default 1.0, every step: the upper bound; a corpus with text lowers it)")
    plan.add_argument("--drop-skipped", action="store_true", help="leave skipped runs out of the CSV")
    plan.add_argument("--out", type=Path, required=True, help="CSV to write")

    fit = sub.add_parser("fit", help="fit compute-optimal scaling laws (Approaches 2 and 3) to a sweep's results",
                         description=FIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("results", type=Path, help="results CSV (one row per finished run)")
    fit.add_argument("--out", type=Path, required=True, help="directory for fit.json (and later the plots)")
    fit.add_argument("--target-flops", help="comma list of budgets to predict N*, D*, loss for "
                                            "(default: 10x and 100x the largest budget)")
    fit.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals (0: none)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed (same seed, same intervals)")
    fit.add_argument("--cost", choices=FRONTIER_COSTS, default="auto",
                     help="what a budget buys along Approach 3's frontier: shape-family (SODA's sweep rule at the "
                          "runs' widths), fitted (FLOPs/(N D) as a function of N from the runs), constant "
                          "(median FLOPs/(N D)); default auto: shape-family when the runs are sweep-rule shapes, "
                          "else fitted")
    fit.add_argument("--keep-duplicates", action="store_true",
                     help="keep rows that repeat an earlier row exactly (default: drop them, with a warning; "
                          "a run listed twice narrows the bootstrap intervals)")
    fit.add_argument("--allow-mixed", action="store_true",
                     help="fit rows whose `fingerprint` column differs (runs trained with other data, soda-train "
                          "flags or validation tokens, e.g. two sweeps' results.csv joined); refused by default")

    run = sub.add_parser("run", help="train a plan's runs with soda-train (here, or as a SLURM job array) and "
                                     "gather their results.csv", description=RUN_HELP,
                         usage="soda-scaling run PLAN --data [NAME=]DIR --out SWEEP_DIR [options] [-- soda-train flags]",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("plan", type=Path, help="plan CSV written by `soda-scaling plan`")
    run.add_argument("--data", action="append", default=[], help="[NAME=]DIR (a soda-tokenize output directory) "
                                                                 "or shard pattern, for every run; repeatable")
    run.add_argument("--out", type=Path, required=True, help="sweep directory (runs/, logs/, configs/, results.csv)")
    run.add_argument("--val-tokens", type=int, default=DEFAULT_VAL_TOKENS,
                     help=f"validation tokens per run (default {DEFAULT_VAL_TOKENS:,}, or the whole validation split "
                          "if smaller)")
    run.add_argument("--emit", choices=["slurm"], help="write a SLURM job array instead of training")
    run.add_argument("--dry-run", action="store_true", help="print what each run would do and train nothing")
    run.add_argument("--gather-only", action="store_true", help="only write results.csv from the finished runs")
    run.add_argument("--rerun-changed", action="store_true",
                     help="train again from scratch the runs trained (or partly trained) with other settings than "
                          "now: an edited plan row, other --data or data contents, other flags after `--`, other "
                          "--val-tokens (by default such a re-run is refused, naming the difference)")

    plot = sub.add_parser("plot", help="draw a fit's PNGs (IsoFLOP curves, optima vs compute, residuals)")
    plot.add_argument("fit_dir", type=Path, help="directory holding fit.json, written by `soda-scaling fit`")
    for parser in (p, *sub.choices.values()):
        parser.allow_abbrev = False  # `--budget` must not pass for --budgets, nor `--max-st` for a flag it is not
    return p


@cli_errors("soda-scaling")
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:len(argv) - len(extra) - 1] if "--" in argv else argv)
    if extra and args.command != "run":
        raise SodaError(f"arguments after `--` are soda-train flags for `run`, not `{args.command}`")
    args.train_args = extra
    return COMMANDS[args.command](args)


def plan_command(args) -> int:
    if not args.budgets and not args.paper:
        raise SodaError("give --budgets (e.g. 3e18,9e18,1.8e19) or --paper")
    budgets = _floats(args.budgets, "--budgets") if args.budgets else list(PAPER_BUDGETS)
    widths = _floats(args.widths, "--widths") if args.widths else None
    if widths and any(w != int(w) for w in widths):
        raise SodaError(f"--widths {args.widths!r}: widths must be whole numbers")
    widths = widths and [int(w) for w in widths]
    for value, minimum, flag in ((args.min_batch, 1, "--min-batch"), (args.batch_floor, 1, "--batch-floor"),
                                 (args.vocab, 1, "--vocab"), (args.seq_len, MIN_SEQ_LEN, "--seq-len")):
        _at_least(value, minimum, flag)
    hierarchical = hierarchical_settings(args)
    runs = plan_sweep(budgets, widths, args.vocab, args.seq_len, paper_targets=args.paper, min_batch=args.min_batch,
                      batch_floor=args.batch_floor, architecture=args.architecture, **hierarchical)
    kept = [r for r in runs if not r.skipped]
    rows = as_rows(kept if args.drop_skipped else runs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["budget"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.out, buf.getvalue())
    print(f"wrote {args.out}: {len(kept)} runs over {len(budgets)} budgets "
          f"({len(runs) - len(kept)} skipped{' and left out' if args.drop_skipped else ', listed with a reason'})")
    for budget in budgets:
        sizes = [r.params for r in kept if r.budget == budget]
        if sizes:
            print(f"  C={budget:.2e}: {len(sizes)} runs, {human_count(min(sizes))}-{human_count(max(sizes))} parameters")
        else:
            print(f"  C={budget:.2e}: no usable runs")
    if hierarchical:
        share = hierarchical["frames_per_step"]
        print(f"  hierarchical: backbone_steps (not tokens) per run, a depth pass charged to {share:.0%} of steps "
              f"(--frames-per-step); parameters: backbone + depth decoder")
    return 0


def hierarchical_settings(args) -> dict:
    """`plan_hierarchical_run`'s depth and frames-per-step settings from the flags ({} for a flat plan, which refuses
    them)."""
    given = {"--depth-width": args.depth_width, "--depth-layers": args.depth_layers,
             "--frames-per-step": args.frames_per_step}
    if args.architecture == "flat":
        named = [flag for flag, value in given.items() if value is not None]
        if named:
            raise SodaError(f"{', '.join(named)}: for --architecture hierarchical only")
        return {}
    for flag in ("--depth-width", "--depth-layers"):
        if given[flag] is not None:
            _at_least(given[flag], 1, flag)
    fps = 1.0 if args.frames_per_step is None else args.frames_per_step
    if not 0 <= fps <= 1:
        raise SodaError(f"--frames-per-step {fps:g}: give the share of steps that are audio frames, 0 to 1")
    codebooks, size = 8, 2048  # SODA's Mimi codes, as soda-tokenize writes them
    if args.vocab < codebooks * size:
        raise SodaError(f"--vocab {args.vocab}: a hierarchical model's vocabulary holds {codebooks} codebooks of "
                        f"{size} codes: at least {codebooks * size} ids")
    return {"depth_width": args.depth_width, "depth_layers": 4 if args.depth_layers is None else args.depth_layers,
            "frames_per_step": fps}


def fit_command(args) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise SodaError(f"--out {args.out} is a file; give a directory")
    targets = _floats(args.target_flops, "--target-flops") if args.target_flops else None
    results = load_results(args.results, keep_duplicates=args.keep_duplicates, allow_mixed=args.allow_mixed)
    fit = fit_scaling(results, args.bootstrap, args.seed, targets, args.cost)
    atomic_write_json(args.out / FIT_FILE, fit)
    print(summary(fit))
    print(f"wrote {args.out / FIT_FILE}; draw it with `soda-scaling plot {args.out}`")
    return 0


def run_command(args) -> int:
    runs = load_plan(args.plan)
    if args.gather_only:
        return gather_command(runs, args.out)
    check_data(args.data, runs)
    check_extra(args.train_args)
    if args.val_tokens < 1:
        raise SodaError(f"--val-tokens {args.val_tokens}: must be positive")
    if args.dry_run:
        return run_sweep(runs, args.out, args.data, args.train_args, args.val_tokens, True, args.rerun_changed)
    with lock(sweep_lock_path(args.out), args.out):
        if args.emit:
            from scaling.slurm import emit_slurm

            hint = shlex.join(["soda-scaling", "run", str(args.plan), "--out", str(args.out), "--gather-only"])
            sbatch, commands = emit_slurm(runs, args.out, args.data, args.train_args, args.val_tokens, args.plan, hint,
                                          args.rerun_changed)
            print(f"wrote {sbatch} ({len(runs)} array tasks) and {commands}; add your cluster's resources to the "
                  f"#SBATCH lines, submit with `{shlex.join(['sbatch', str(sbatch)])}`, then: {hint}")
            return 0
        print(f"sweep {args.out}: {len(runs)} runs from {args.plan}", flush=True)
        code = run_sweep(runs, args.out, args.data, args.train_args, args.val_tokens, False, args.rerun_changed)
        if any(state(r, args.out) == "done" for r in runs):
            gather_command(runs, args.out)
    return code


def gather_command(runs, out: Path) -> int:
    path, rows, unfinished = gather(runs, out)
    print(f"wrote {path}: {len(rows)} finished runs"
          + (f"; not finished: {', '.join(unfinished)}" if unfinished else ""))
    planned = {r.name: r.steps for r in runs}
    for row in rows:
        if row["steps"] != planned[row["name"]]:
            print(f"  {row['name']}: trained {row['steps']:,} of its {planned[row['name']]:,} planned steps "
                  f"(results.csv has what it trained)")
        if row["loss_source"] != "val":
            print(f"  {row['name']}: no validation loss at its last step; loss is the {row['loss_source']}")
    print(f"fit it with: {shlex.join(['soda-scaling', 'fit', str(path), '--out', str(out / 'fit')])}")
    return 0


def plot_command(args) -> int:
    from scaling.plots import write_plots  # matplotlib (and its font cache) only when plotting

    for path in write_plots(args.fit_dir):
        print(f"wrote {path}")
    return 0


COMMANDS = {"plan": plan_command, "run": run_command, "fit": fit_command, "plot": plot_command}


if __name__ == "__main__":
    sys.exit(main())
