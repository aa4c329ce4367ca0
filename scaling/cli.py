"""`soda-scaling`: IsoFLOP sweep planning (plan). Running, fitting and plotting are tracked separately."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from tokenize_audio.errors import SodaError, cli_errors
from tokenize_audio.shards import atomic_write_text

from .accounting import SODA_VOCAB
from .plan import PAPER_BUDGETS, as_rows, plan_sweep


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SodaError(f"{what} {text!r}: expected comma-separated numbers, e.g. 3e18,9e18") from None
    if not values or any(not v > 0 for v in values):
        raise SodaError(f"{what} {text!r}: values must be positive")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soda-scaling",
        description="Plan IsoFLOP scaling sweeps by SODA's rules (C = 3 x analytic forward FLOPs, "
                    "N = total parameters including both embedding matrices).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser(
        "plan", help="write the sweep grid (one row per budget x width) as CSV",
        description="The sweep grid: layers = round(d/(64+4*log2 d-7)), heads = kv = max(1, d/128), FFN 4d; "
                    "tokens D = C/(3*forward FLOPs per token); batch = next power of two of D/(2^16*seq) halved "
                    "while LR = 0.33*sqrt(B)/d > 0.01; beta2 = 0.98^(B/128). Runs with batch < 8 or >= 400k "
                    "steps are kept in the CSV with a `skipped` reason (use --drop-skipped to leave them out).",
    )
    plan.add_argument("--budgets", help="comma list of training-FLOP budgets, e.g. 3e18,9e18,1.8e19")
    plan.add_argument("--paper", action="store_true", help="SODA's seven budgets and its wider target runs")
    plan.add_argument("--widths", help="comma list of widths (default: SODA's grid for each budget)")
    plan.add_argument("--vocab", type=int, default=SODA_VOCAB, help=f"vocabulary size (default {SODA_VOCAB:,})")
    plan.add_argument("--seq-len", type=int, default=4096)
    plan.add_argument("--drop-skipped", action="store_true", help="leave skipped runs out of the CSV")
    plan.add_argument("--out", type=Path, required=True, help="CSV to write")
    return p


@cli_errors("soda-scaling")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        return plan_command(args)
    return 2


def plan_command(args) -> int:
    if not args.budgets and not args.paper:
        raise SodaError("give --budgets (e.g. 3e18,9e18,1.8e19) or --paper")
    budgets = _floats(args.budgets, "--budgets") if args.budgets else list(PAPER_BUDGETS)
    widths = [int(w) for w in _floats(args.widths, "--widths")] if args.widths else None
    runs = plan_sweep(budgets, widths, args.vocab, args.seq_len, paper_targets=args.paper)
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
            print(f"  C={budget:.2e}: {len(sizes)} runs, {min(sizes) / 1e6:.0f}M-{max(sizes) / 1e6:.0f}M parameters")
        else:
            print(f"  C={budget:.2e}: no usable runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
