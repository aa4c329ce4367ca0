"""Lightning callbacks of a run: per-step metrics rows (throughput, MFU), step checkpoints and `last.ckpt`,
pre-emption checkpoints. How a checkpoint is written is `soda.train.checkpointing`."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ModelCheckpoint

from soda.train.checkpointing import wait_for_checkpoints
from tokenize_audio.errors import Stopped

# Dense bf16 peak FLOP/s per GPU, for --dry-run wall-clock estimates (MFU during training uses
# Lightning's table for the device it finds, or --peak-flops).
NAMED_GPUS = {"H100-SXM": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


class StepMetrics(L.Callback):
    """Writes each logged optimizer step's row: the module's loss and NLL by type, LR, this step's gradient
    norm, tokens/s (all ranks together, over the steps since the last row) and MFU.

    It runs at the step's `on_train_batch_end`, after the optimizer step (so the gradient norm is this
    step's) and before Lightning's ModelCheckpoint (which Lightning always runs last), and flushes the
    loggers: a checkpoint on disk never precedes its step's row, so a kill cannot lose a row that a
    resume will not re-run.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None, every: int = 1):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops, self.every = peak_flops, max(1, every)
        self._t0 = None
        self._step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if self.peak_flops is None:
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = get_available_flops(trainer.strategy.root_device, dtype)
        self._restart(trainer)

    def _restart(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart(trainer)  # validation time is not training throughput

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics, pl_module.step_metrics = pl_module.step_metrics, None
        if metrics is None:  # inside an accumulation, or a skipped batch
            return
        step = trainer.global_step - 1  # rows are numbered from 0, as Lightning numbers them
        if (step + 1) % self.every and trainer.global_step < trainer.max_steps:  # the last step always has a row
            return
        if pl_module.grad_norm is not None:
            metrics["grad_norm"] = float(pl_module.grad_norm)
        steps = trainer.global_step - self._step0
        if steps > 0:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            tokens_per_s = steps * self.tokens_per_step / (time.perf_counter() - self._t0)
            metrics["tokens_per_s"] = tokens_per_s
            if self.peak_flops:
                metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * trainer.world_size)
            pl_module.log("tok/s", float(tokens_per_s), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                logger.save()
        self._restart(trainer)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (a `stepN.ckpt` every `every_n_train_steps`), with `last.ckpt` always a link.

    Its own `save_last` writes a *full* file `last-v1.ckpt` beside an existing `last.ckpt` whenever it has not
    saved that link itself (after a resume, or a pre-emption checkpoint): one full-size copy per requeue at real
    scale. Here "saving last" only points `last.ckpt` at the newest step file, and is nothing otherwise.

    Nor does it save again the step a run resumed at: Lightning forgets which step it saved last, so with gradient
    accumulation the first micro-batch after a resume (still at that step) wrote a full `stepN-v1.ckpt` copy,
    holding half an accumulation.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # 0 for a new run; a resumed run's step is saved

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        from soda.checkpoints import link_last

        # a file, or a sharded directory; not yet there while --async-checkpoint writes it (its writer links it)
        if trainer.global_rank == 0 and self._last_checkpoint_saved and Path(self._last_checkpoint_saved).exists():
            link_last(Path(self._last_checkpoint_saved))


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1 (schedulers' pre-emption notices) or SIGINT (Ctrl-C): finish the step, checkpoint,
    stop; `exit_code` is then 143 (130 for Ctrl-C). A second Ctrl-C stops at once.

    Lightning's own SIGTERM handling stops mid-accumulation without a checkpoint; this replaces it for the
    duration of training and restores the previous handlers afterwards. Data-loader workers ignore these
    signals (`soda.train.data.dataloader`): a signal sent to the whole process group, as SLURM and `timeout` send it,
    must not kill them before the main process has checkpointed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, checkpoint_dir: Path):
        self.dir = Path(checkpoint_dir)
        self.requested: int | None = None  # the signal received
        self.saved_at: int | None = None
        self._previous: dict = {}

    @property
    def exit_code(self) -> int:
        """143 (128 + SIGTERM) for a scheduler's notice, SIGUSR1 included: job scripts requeue on one code; 130 for
        Ctrl-C."""
        return 128 + (signal.SIGINT if self.requested == signal.SIGINT else signal.SIGTERM)

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:  # Ctrl-C twice: stop now, without the
            from soda.checkpoints import kept_message  # step's checkpoint (not KeyboardInterrupt: Lightning exits 1)

            raise Stopped(f"interrupted: {kept_message(self.dir.parent)}", 128 + signal.SIGINT, "soda-train")
        if self.requested is None:
            self.requested = signum
            if signum == signal.SIGINT:
                print("\nsoda: interrupted: saving a checkpoint at the end of this step (Ctrl-C again to stop "
                      "without it)", file=sys.stderr)

    def on_train_start(self, trainer, pl_module) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only between optimizer steps: a checkpoint must not hold half an accumulation
        if trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            from soda.checkpoints import link_last

            path = self.dir / f"step{trainer.global_step:07d}.ckpt"
            wait_for_checkpoints(trainer)  # a background save of this step may still be under way
            if not path.exists():
                trainer.save_checkpoint(path, weights_only=False)
                wait_for_checkpoints(trainer)  # exit only once it is whole
            if trainer.global_rank == 0:
                link_last(path)
            for callback in trainer.checkpoint_callbacks:  # this step is saved: ModelCheckpoint must not save
                callback._last_global_step_saved = trainer.global_step  # it again
            self.saved_at = trainer.global_step
            trainer.should_stop = True
