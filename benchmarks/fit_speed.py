"""How long `soda-scaling fit` takes: a synthetic sweep (default 500 runs over 10 budgets, 1% noise)
fitted with 1000 bootstrap resamples, timed end to end (CSV read, both approaches, predictions)
and per approach. Prints a Markdown table for benchmarks/RESULTS.md.

    python benchmarks/fit_speed.py [--runs 500] [--budgets 10] [--bootstrap 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from scaling.fit import fit_scaling
from scaling.laws import approach2, approach3
from scaling.results import load_results

TRUTH = {"E": 1.7, "A": 400.0, "B": 1500.0, "alpha": 0.34, "beta": 0.28}


def synthetic_sweep(path: Path, runs: int, budgets: int, noise: float, seed: int) -> None:
    """Runs log-spaced over N*/e^2 .. N* e^2 at each budget (C = 6 N D), loss times exp(noise * normal)."""
    rng = np.random.default_rng(seed)
    t = TRUTH
    a = t["beta"] / (t["alpha"] + t["beta"])
    g = (t["alpha"] * t["A"] / (t["beta"] * t["B"])) ** (1 / (t["alpha"] + t["beta"]))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["budget", "flops", "params", "tokens", "loss"])
        for c, per in zip(np.geomspace(1e18, 1e21, budgets), np.diff(np.linspace(0, runs, budgets + 1).round())):
            for u in np.linspace(-2, 2, int(per)):
                n = g * (c / 6) ** a * np.exp(u)
                d = c / (6 * n)
                loss = t["E"] + t["A"] / n ** t["alpha"] + t["B"] / d ** t["beta"]
                loss *= np.exp(noise * rng.standard_normal())
                writer.writerow([f"{c:.6g}", f"{c:.6g}", f"{n:.6g}", f"{d:.6g}", f"{loss:.6f}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--budgets", type=int, default=10)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.csv"
        synthetic_sweep(path, args.runs, args.budgets, args.noise, args.seed)
        rows = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            results = load_results(path)
            t1 = time.perf_counter()
            fit = fit_scaling(results, args.bootstrap, args.seed)
            t2 = time.perf_counter()
            approach2(results, args.bootstrap, np.random.default_rng(args.seed))
            t3 = time.perf_counter()
            approach3(results, args.bootstrap, np.random.default_rng(args.seed))
            t4 = time.perf_counter()
            rows.append((t2 - t0, t1 - t0, t3 - t2, t4 - t3))

    a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}; {len(results.loss)} runs over {len(results.budgets)} budgets, "
          f"{args.bootstrap} resamples, {args.noise:.0%} noise; true a = {a_true:.4f}")
    print("\n| run | total s (read + fit + predictions) | read CSV s | Approach 2 s | Approach 3 s |")
    print("|---|---|---|---|---|")
    for i, (total, read, a2, a3) in enumerate(rows, 1):
        print(f"| {i} | {total:.2f} | {read:.3f} | {a2:.2f} | {a3:.2f} |")
    for approach in ("approach2", "approach3"):
        lo, hi = fit[approach]["a_ci"]
        print(f"\n{approach}: a = {fit[approach]['a']:.4f} [{lo:.4f}, {hi:.4f}]", end="")
    print()


if __name__ == "__main__":
    main()
