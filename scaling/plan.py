"""IsoFLOP sweep planning by the rules of SODA's scaling study (its budgets, sweep shapes, batch and LR rule).

For each budget C and width d: the sweep shape from d, tokens D = C / (3 x forward FLOPs per token),
batch B (sequences) = next power of two of D / (2^16 * seq_len), halved while LR = 0.33*sqrt(B)/d
exceeds 0.01; runs with B < 8 or >= 400k steps are skipped (and reported, not dropped silently).
Micro sweeps on a CPU may raise small batches to a floor instead (`--batch-floor`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from soda.shape import SODA_VOCAB, ModelShape, forward_flops_per_token, params, training_flops_per_token

PAPER_BUDGETS = (3e18, 9e18, 1.8e19, 3e19, 9e19, 1.8e20, 3e20)
# SODA's wider "target" runs at the top budgets.
PAPER_TARGETS = {9e19: (2048,), 1.8e20: (2048, 2304), 3e20: (2048, 2304, 2816, 3072)}
FINE_GRID_MAX_BUDGET = 1.8e19
MIN_BATCH, MAX_STEPS, LR_CAP = 8, 400_000, 0.01
MIN_SEQ_LEN = 2  # soda-train's shortest sequence (a sequence predicts its tokens from the ones before)


@dataclass
class Run:
    budget: float
    shape: ModelShape
    params: int
    non_embedding_params: int
    forward_flops_per_token: int
    tokens: int
    batch: int
    steps: int
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    flops: float
    name: str = ""
    skipped: str = ""


def default_widths(budget: float) -> list[int]:
    """128..2048 in steps of 128 up to 1.8e19; 128, 384, 640, ... (steps of 256) above."""
    step = 128 if budget <= FINE_GRID_MAX_BUDGET * (1 + 1e-9) else 256
    return list(range(128, 2048 + 1, step))


def run_name(budget: float, width: int) -> str:
    """A run's name, also its directory in a sweep: C3.0e18-d768."""
    return f"C{budget:.1e}-d{width}".replace("+", "")


def sweep_lr(batch: int, width: int) -> float:
    """SODA's sweep learning rate before the cap: 0.33 * sqrt(B) / d."""
    return 0.33 * math.sqrt(batch) / width


def plan_run(budget: float, width: int, vocab: int = SODA_VOCAB, seq_len: int = 4096,
             min_batch: int = MIN_BATCH, batch_floor: int = 1) -> Run:
    """One run by SODA's rules; `batch_floor` raises smaller batches to it (LR re-derived from the raised
    batch) instead of leaving them to the `min_batch` skip: micro sweeps on a CPU need it, since the rule
    gives them a batch of one sequence and losses too noisy to fit."""
    shape = ModelShape.sweep(width, vocab, seq_len)
    fwd = forward_flops_per_token(shape)
    tokens = budget / training_flops_per_token(shape)
    batch = 2 ** max(0, math.ceil(math.log2(tokens / (2**16 * seq_len))))
    while sweep_lr(batch, width) > LR_CAP and batch > 1:
        batch //= 2
    batch = max(batch, batch_floor)
    lr = min(LR_CAP, sweep_lr(batch, width))
    steps = round(tokens / (batch * seq_len))
    skipped = ""
    if batch < min_batch:
        skipped = f"batch {batch} < {min_batch}"
    elif steps < 1:
        skipped = f"{tokens:.0f} tokens: less than one batch"
    elif steps >= MAX_STEPS:
        skipped = f"{steps} steps >= {MAX_STEPS}"
    trained = steps * batch * seq_len
    return Run(budget, shape, params(shape), params(shape, "non-embedding"), fwd, int(trained), batch, steps, lr,
               0.95, 0.98 ** (batch / 128), 0.1, 3.0 * fwd * trained, run_name(budget, width),
               skipped)


def plan_sweep(budgets, widths=None, vocab: int = SODA_VOCAB, seq_len: int = 4096,
               paper_targets: bool = False, min_batch: int = MIN_BATCH, batch_floor: int = 1) -> list[Run]:
    """All (budget, width) runs, skipped ones included with their reason."""
    runs = []
    for budget in budgets:
        ws = list(widths) if widths else default_widths(budget)
        if paper_targets:
            ws += [w for b, extra in PAPER_TARGETS.items() if math.isclose(b, budget) for w in extra if w not in ws]
        runs += [plan_run(budget, w, vocab, seq_len, min_batch, batch_floor) for w in ws]
    return runs


def as_rows(runs: list[Run]) -> list[dict]:
    """Flat CSV rows: the run's numbers with its shape's fields (width, layers, ...) spliced in."""
    rows = []
    for r in runs:
        row = asdict(r)
        shape = row.pop("shape")
        shape.pop("tied")
        rows.append({"budget": row.pop("budget"), **shape, **row})
    return rows
