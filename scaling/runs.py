"""A planned run of a sweep: its plan row and where its files live in the sweep directory.

The files are the interface between the runners (`scaling.sweep` locally, `scaling.slurm`'s job array) and the
gathering of results: a run counts as finished only once a runner has written its marker after exit code 0, a run
with a checkpoint continues with `--resume`, and an attempt that died before its first checkpoint starts again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from soda.shape import HierarchicalShape, ModelShape

PLAN_COLUMNS = ("budget", "width", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab", "seq_len", "params",
                "batch", "steps", "lr", "beta2", "skipped")
# A hierarchical plan's further columns (a plan without an `architecture` column is flat, as plans before it were).
HIERARCHICAL_COLUMNS = ("architecture", "depth_width", "depth_layers", "n_codebooks", "codebook_size",
                        "frames_per_step")
DONE, TRAIN_CONFIG, RECORD = "sweep-done.json", "config.yaml", "sweep-run.json"
# soda-train resumes from its highest-numbered checkpoints/stepN.ckpt, else checkpoints/last.ckpt: a run holding
# either can continue (the link alone may lag behind when a kill lands between a save and the link).
CHECKPOINTS = ("checkpoints/step*.ckpt", "checkpoints/last.ckpt")


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
    architecture: str = "flat"  # hierarchical: `shape` is the backbone, `seq_len` and `tokens` count backbone steps
    depth_width: int = 0
    depth_layers: int = 0
    n_codebooks: int = 8
    codebook_size: int = 2048
    frames_per_step: float = 1.0

    @property
    def hierarchical(self) -> bool:
        return self.architecture == "hierarchical"

    @property
    def hierarchical_shape(self) -> HierarchicalShape:
        return HierarchicalShape(self.shape, self.n_codebooks, self.codebook_size, self.depth_width, self.depth_layers)

    @property
    def tokens(self) -> int:
        """Exactly the steps' tokens (the plan's `tokens` column is this product too); a hierarchical run's backbone
        steps (its `backbone_steps` column)."""
        return self.steps * self.batch * self.shape.seq_len

    def run_dir(self, sweep: Path) -> Path:
        return sweep / "runs" / self.name

    def config_path(self, sweep: Path) -> Path:
        return sweep / "configs" / f"{self.name}.yaml"

    def log_path(self, sweep: Path) -> Path:
        return sweep / "logs" / f"{self.name}.log"


def state(run: PlannedRun, sweep: Path) -> str:
    """done | resume (a checkpoint to continue from) | stale (started, no checkpoint yet) | new."""
    d = run.run_dir(sweep)
    if (d / DONE).is_file():
        return "done"
    if any(any(d.glob(pattern)) for pattern in CHECKPOINTS):
        return "resume"
    return "stale" if (d / TRAIN_CONFIG).exists() else "new"
