"""IsoFLOP sweep planning by the rules of SODA's scaling study (its budgets, sweep shapes, batch and LR rule).

For each budget C and width d: the sweep shape from d, tokens D = C / (3 x forward FLOPs per token),
batch B (sequences) = next power of two of D / (2^16 * seq_len), halved while LR = 0.33*sqrt(B)/d
exceeds 0.01; runs with B < 8 or >= 400k steps are skipped (and reported, not dropped silently).
Micro sweeps on a CPU may raise small batches to a floor instead (`--batch-floor`).

The hierarchical family (`soda.hierarchical`; `plan_hierarchical_run`) follows the same rules counted in backbone
*steps* (one text/special token or one whole audio frame each) instead of tokens: the backbone is the sweep shape of
d, the depth decoder `HierarchicalShape`'s rule (width d // 2, 4 layers) unless given, steps
D = C / (3 x forward FLOPs per step), the batch in sequences of `seq_len` steps, the LR from the backbone's width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from soda.shape import (SODA_VOCAB, HierarchicalShape, ModelShape, forward_flops_per_token,
                        hierarchical_forward_flops_per_audio_second, hierarchical_forward_flops_per_step,
                        hierarchical_params, layer_params, params, training_flops_per_token)

PAPER_BUDGETS = (3e18, 9e18, 1.8e19, 3e19, 9e19, 1.8e20, 3e20)
# SODA's wider "target" runs at the top budgets.
PAPER_TARGETS = {9e19: (2048,), 1.8e20: (2048, 2304), 3e20: (2048, 2304, 2816, 3072)}
FINE_GRID_MAX_BUDGET = 1.8e19
MIN_BATCH, MAX_STEPS, LR_CAP = 8, 400_000, 0.01
MIN_SEQ_LEN = 2  # soda-train's shortest sequence (a sequence predicts its tokens from the ones before)
ARCHITECTURES = ("flat", "hierarchical")
FRAME_RATE = 12.5  # audio frames per second (Mimi), for the hierarchical plan's FLOPs per audio-second
# A hierarchical row's CSV names for the Run fields that count steps there, not tokens.
STEP_COLUMNS = {"forward_flops_per_token": "forward_flops_per_step", "tokens": "backbone_steps"}


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


@dataclass
class HierarchicalRun(Run):
    """A hierarchical run: `shape` is the backbone, `tokens` counts backbone steps (D) and `forward_flops_per_token`
    is forward FLOPs per step (the CSV names them backbone_steps and forward_flops_per_step); `steps` stays optimizer
    steps. `params` is `hierarchical_params` (backbone + projection + depth), `non_embedding_params` the same without
    any vocabulary-sized table: the backbone's input table and unified head, the depth's codebook table and its K-1
    heads (the projection from backbone to depth width is kept, as the flat count keeps the layers)."""

    architecture: str = "hierarchical"
    depth_width: int = 0
    depth_layers: int = 0
    depth_heads: int = 0
    depth_ffn: int = 0
    n_codebooks: int = 8
    codebook_size: int = 2048
    frames_per_step: float = 1.0
    backbone_params: int = 0
    depth_params: int = 0  # the projection into the depth width, the depth decoder and its heads
    forward_flops_per_audio_second: float = 0.0

    @property
    def hierarchical_shape(self) -> HierarchicalShape:
        return HierarchicalShape(self.shape, self.n_codebooks, self.codebook_size, self.depth_width, self.depth_layers)


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


def batch_and_lr(positions: float, width: int, seq_len: int, batch_floor: int = 1) -> tuple[int, float]:
    """SODA's batch (sequences of `seq_len` positions: tokens, or a hierarchical model's steps) and capped LR for
    `positions` training positions at `width`."""
    batch = 2 ** max(0, math.ceil(math.log2(positions / (2**16 * seq_len))))
    while sweep_lr(batch, width) > LR_CAP and batch > 1:
        batch //= 2
    batch = max(batch, batch_floor)
    return batch, min(LR_CAP, sweep_lr(batch, width))


def skip_reason(positions: float, steps: int, batch: int, min_batch: int, unit: str = "tokens") -> str:
    if batch < min_batch:
        return f"batch {batch} < {min_batch}"
    if steps < 1:
        return f"{positions:.0f} {unit}: less than one batch"
    if steps >= MAX_STEPS:
        return f"{steps} steps >= {MAX_STEPS}"
    return ""


def plan_run(budget: float, width: int, vocab: int = SODA_VOCAB, seq_len: int = 4096,
             min_batch: int = MIN_BATCH, batch_floor: int = 1) -> Run:
    """One run by SODA's rules; `batch_floor` raises smaller batches to it (LR re-derived from the raised
    batch) instead of leaving them to the `min_batch` skip: micro sweeps on a CPU need it, since the rule
    gives them a batch of one sequence and losses too noisy to fit."""
    shape = ModelShape.sweep(width, vocab, seq_len)
    fwd = forward_flops_per_token(shape)
    tokens = budget / training_flops_per_token(shape)
    batch, lr = batch_and_lr(tokens, width, seq_len, batch_floor)
    steps = round(tokens / (batch * seq_len))
    skipped = skip_reason(tokens, steps, batch, min_batch)
    trained = steps * batch * seq_len
    return Run(budget, shape, params(shape), params(shape, "non-embedding"), fwd, int(trained), batch, steps, lr,
               0.95, 0.98 ** (batch / 128), 0.1, 3.0 * fwd * trained, run_name(budget, width),
               skipped)


def depth_params(shape: HierarchicalShape) -> int:
    """The part of `hierarchical_params` after the backbone: the projection into the depth width, the depth decoder's
    layers and final norm, its codebook table and its K-1 heads."""
    d = shape.depth
    return shape.backbone.width * d.width + d.layers * layer_params(d) + d.width + 2 * d.vocab * d.width


def plan_hierarchical_run(budget: float, width: int, vocab: int = SODA_VOCAB, seq_len: int = 4096,
                          min_batch: int = MIN_BATCH, batch_floor: int = 1, depth_width: int | None = None,
                          depth_layers: int = 4, frames_per_step: float = 1.0, n_codebooks: int = 8,
                          codebook_size: int = 2048) -> HierarchicalRun:
    """One hierarchical run by `plan_run`'s rules counted in backbone steps (`seq_len` steps a sequence). A step's
    forward FLOPs are the backbone's plus `frames_per_step` depth passes: 1.0 charges one at every step (an
    all-audio corpus; the upper bound), a mix with text steps lowers it, and planning with 1.0 for such a mix
    trains fewer steps than the budget would buy, never more."""
    shape = HierarchicalShape(ModelShape.sweep(width, vocab, seq_len), n_codebooks, codebook_size, depth_width,
                              depth_layers)
    fwd = hierarchical_forward_flops_per_step(shape, frames_per_step)
    positions = budget / (3.0 * fwd)
    batch, lr = batch_and_lr(positions, width, seq_len, batch_floor)
    steps = round(positions / (batch * seq_len))
    trained = steps * batch * seq_len
    total = hierarchical_params(shape)
    return HierarchicalRun(
        budget, shape.backbone, total, hierarchical_params(shape, "non-embedding"), fwd, int(trained), batch, steps,
        lr, 0.95, 0.98 ** (batch / 128), 0.1, 3.0 * fwd * trained, run_name(budget, width),
        skip_reason(positions, steps, batch, min_batch, "steps"), "hierarchical", shape.depth_width,
        shape.depth_layers, shape.depth_heads, shape.depth_ffn, n_codebooks, codebook_size, frames_per_step,
        total - depth_params(shape), depth_params(shape),
        hierarchical_forward_flops_per_audio_second(shape, FRAME_RATE))


def plan_sweep(budgets, widths=None, vocab: int = SODA_VOCAB, seq_len: int = 4096,
               paper_targets: bool = False, min_batch: int = MIN_BATCH, batch_floor: int = 1,
               architecture: str = "flat", **hierarchical) -> list[Run]:
    """All (budget, width) runs, skipped ones included with their reason; `hierarchical` holds
    `plan_hierarchical_run`'s depth_width, depth_layers and frames_per_step for that architecture."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {ARCHITECTURES}")
    if hierarchical and architecture == "flat":
        raise ValueError(f"{', '.join(hierarchical)}: settings of the hierarchical architecture only")
    runs = []
    for budget in budgets:
        ws = list(widths) if widths else default_widths(budget)
        if paper_targets:
            ws += [w for b, extra in PAPER_TARGETS.items() if math.isclose(b, budget) for w in extra if w not in ws]
        if architecture == "flat":
            runs += [plan_run(budget, w, vocab, seq_len, min_batch, batch_floor) for w in ws]
        else:
            runs += [plan_hierarchical_run(budget, w, vocab, seq_len, min_batch, batch_floor, **hierarchical)
                     for w in ws]
    return runs


def as_rows(runs: list[Run]) -> list[dict]:
    """Flat CSV rows: the run's numbers with its shape's fields (width, layers, ...) spliced in. A hierarchical row
    has its architecture after the budget, its depth and accounting columns after the backbone's shape and
    STEP_COLUMNS' names for the fields that count steps."""
    rows = []
    for r in runs:
        row = asdict(r)
        shape = row.pop("shape")
        shape.pop("tied")
        if not isinstance(r, HierarchicalRun):
            rows.append({"budget": row.pop("budget"), **shape, **row})
            continue
        extra = {k: row.pop(k) for k in ("depth_width", "depth_layers", "depth_heads", "depth_ffn", "n_codebooks",
                                          "codebook_size", "frames_per_step")}
        counts = {k: row.pop(k) for k in ("backbone_params", "depth_params", "forward_flops_per_audio_second")}
        head = {"budget": row.pop("budget"), "architecture": row.pop("architecture"), **shape, **extra}
        body = {STEP_COLUMNS.get(k, k): v for k, v in row.items()}
        params_at = list(body).index("non_embedding_params") + 1
        items = list(body.items())
        rows.append({**head, **dict(items[:params_at]), **counts, **dict(items[params_at:])})
    return rows
