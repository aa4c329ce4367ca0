"""Write notebooks/example_results.csv: a SYNTHETIC IsoFLOP sweep for the scaling-law notebook.

The runs are SODA's sweep grid (`soda-scaling plan --paper --drop-skipped`: seven budgets
3e18-3e20, SODA's FLOP and parameter counts), each given the loss of a known surface
L = E + A/N^alpha + B/D^beta times 0.5% log-normal noise, so a fit can be checked against the truth
(a = beta/(alpha+beta) = 0.375, close to SODA's published 0.367). One run is marked as diverged
(loss nan) to show how unusable runs are reported. Deterministic: the same file on every run.

    python notebooks/make_example_results.py [--out notebooks/example_results.csv]
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np

from scaling.plan import PAPER_BUDGETS, plan_sweep

TRUTH = {"E": 1.6, "A": 7430.0, "B": 609.0, "alpha": 0.5, "beta": 0.3}
NOISE = 0.005
SEED = 2602
DIVERGED = "C3.0e20-d3072"


def example_rows() -> list[dict]:
    rng = np.random.default_rng(SEED)
    rows = []
    for run in plan_sweep(PAPER_BUDGETS, paper_targets=True):
        if run.skipped:
            continue
        loss = TRUTH["E"] + TRUTH["A"] / run.params ** TRUTH["alpha"] + TRUTH["B"] / run.tokens ** TRUTH["beta"]
        loss *= np.exp(NOISE * rng.standard_normal())
        rows.append({"name": run.name, "budget": f"{run.budget:.3g}", "width": run.shape.width,
                     "layers": run.shape.layers, "params": run.params, "tokens": run.tokens,
                     "flops": f"{run.flops:.6g}", "loss": "nan" if run.name == DIVERGED else f"{loss:.4f}"})
    return rows


def example_csv() -> str:
    buf = io.StringIO()
    rows = example_rows()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("example_results.csv"))
    args = p.parse_args()
    args.out.write_text(example_csv(), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
