"""Lightning pieces of a run: per-step metrics rows (throughput, MFU), pre-emption checkpoints, atomic single-file
and sharded (FSDP) checkpoints, saved in the background with --async-checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_utilities.core.apply_func import apply_to_collection

from tokenize_audio.errors import SodaError, Stopped, first_line
from tokenize_audio.shards import atomic_file

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
    """

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint straight into a temporary file beside its destination, then rename: a kill never
    leaves half a file, and nothing is staged elsewhere. (Lightning's own save builds the whole checkpoint in
    memory, then copies it through fsspec's temporary file in $TMPDIR: a node-local /tmp too small for a 70 GB
    4B checkpoint fails with ENOSPC although the run directory has room.)

    A checkpoint holding a NaN or Inf is refused (the module never applies such an update; this is the last
    guard), and a failed write (disk full, read-only or vanished directory) is one line naming the file, with the
    temporary file removed and the previous checkpoints untouched.

    `background`: the write happens in a thread while training goes on (a copy of the state is taken first), one
    at a time; `last.ckpt` is pointed at each file once it is whole."""

    def __init__(self, background: bool = False):
        super().__init__()
        self.saves = BackgroundSaves() if background else None

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if self.saves is None:
            return self._write(checkpoint, Path(path))
        self.saves.wait()  # one in flight: memory for one copy
        checkpoint = apply_to_collection(checkpoint, torch.Tensor, _snapshot)
        self.saves.submit(Path(path), lambda: self._write(checkpoint, Path(path)))

    def _write(self, checkpoint, path: Path) -> None:
        from soda.checkpoints import first_nonfinite

        if (bad := first_nonfinite({"state_dict": checkpoint.get("state_dict", {}),
                                    "optimizer_states": checkpoint.get("optimizer_states", [])})) is not None:
            raise SodaError(f"{path}: not saved: {bad} holds a NaN or Inf; the previous checkpoints are kept")
        try:
            with atomic_file(path) as f:
                torch.save(checkpoint, f)
        except OSError as e:
            raise SodaError(f"{path}: cannot write the checkpoint ({e.strerror or e}); nothing was written and the "
                            f"previous checkpoints are kept") from None

    def load_checkpoint(self, path, *args, **kwargs):
        from soda.checkpoints import unreadable_reason

        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except Exception as e:
            if isinstance(e, SodaError):
                raise
            reason = unreadable_reason(Path(path)) or first_line(e, 200, with_type=True)
            raise SodaError(f"{path}: cannot load the checkpoint ({reason})") from None

    def teardown(self) -> None:
        if self.saves is not None:  # Lightning calls this at the end of fit: finish's own save still follows
            self.saves.wait()


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    """A point-in-time copy for a background write (training changes the weights in place meanwhile)."""
    return t.detach().clone()


class BackgroundSaves:
    """Checkpoint writes in one background thread, one at a time. `wait` blocks until the last one is whole (or
    raises its error); a write that completes points `last.ckpt` at its checkpoint when it is the newest."""

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, write, link: bool = True) -> None:
        def job():
            from soda.checkpoints import link_newest

            write()
            if link:
                link_newest(path)

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soda-checkpoint")
        self._pending = self._executor.submit(job)

    def wait(self) -> None:
        """Block until the write in flight is done; its error (a SodaError: one line) is raised once, here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except BaseException as e:
                self._error = e
        error, self._error = self._error, None
        if error is not None:
            raise error


def wait_for_checkpoints(trainer) -> None:
    """Every rank: wait until the checkpoint being written in the background (--async-checkpoint) is whole, then
    stop all ranks together if any rank's write failed. Nothing to wait for without --async-checkpoint."""
    _wait_for_saves(trainer.strategy)


def _wait_for_saves(strategy) -> None:
    saves = [s for s in (getattr(strategy, "saves", None), getattr(strategy.checkpoint_io, "saves", None)) if s]
    error = None
    for background in saves:
        try:
            background.wait()
        except SodaError as e:
            error = error or e
    if strategy.reduce_boolean_decision(error is not None, all=False):
        raise error or SodaError("another rank failed to write the last checkpoint (its error is in its log); the "
                                 "previous checkpoints are kept")


class ShardedCheckpoints(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) saving sharded checkpoints: every rank writes its own shards of the
    weights and optimizer state with `torch.distributed.checkpoint` into `.stepN.ckpt.tmp/`, rank 0 adds Lightning's
    `meta.pt` (loops, data position) and renames the directory to `stepN.ckpt` once every rank's shards and the
    index are written. A kill mid-save leaves only the temporary directory, which the next save of that step
    replaces. DCP reshards on load: a run resumes on another number of ranks.

    The guarantees of AtomicCheckpointIO hold per rank: a NaN or Inf in any rank's shard refuses the save on every
    rank, and a failed write is one line with the temporary directory removed. `background`: the shards are
    copied, then written in a thread (over a process group of their own) while training goes on."""

    def __init__(self, *args, background: bool = False, **kwargs):
        super().__init__(*args, save_distributed_checkpoint=True, **kwargs)
        self.saves = BackgroundSaves() if background else None
        self._save_group = None

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        from soda.checkpoints import first_nonfinite

        path = Path(self.broadcast(str(filepath)))
        if self.saves is not None:
            _wait_for_saves(self)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        bad = [b for b in self._all_gather_object(first_nonfinite(state)) if b is not None]  # each rank's shards
        if bad:
            raise SodaError(f"{path}: not saved: {bad[0]} holds a NaN or Inf; the previous checkpoints are kept")
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during an earlier save of this step
            tmp.mkdir(parents=True)
        self.barrier()
        if self.saves is None:
            error = None
            try:
                self._write(state, checkpoint, tmp, path, group=None)
            except SodaError as e:  # rank 0 alone fails on meta.pt or the rename: every rank must stop with it
                error = e
            if self._any_rank(error is not None):
                raise error or SodaError(f"{path}: rank 0 could not complete the checkpoint (its error is in its "
                                         f"log); the previous checkpoints are kept")
            return
        if self._save_group is None:  # background collectives must not interleave with training's
            import torch.distributed as dist

            self._save_group = dist.new_group(backend="gloo")
        state, checkpoint = apply_to_collection((state, checkpoint), torch.Tensor, _snapshot)
        self.saves.submit(path, lambda: self._write(state, checkpoint, tmp, path, group=self._save_group),
                          link=self.global_rank == 0)

    def _write(self, state: dict, meta: dict, tmp: Path, path: Path, group) -> None:
        import torch.distributed.checkpoint as dcp

        from soda.checkpoints import LIGHTNING_META

        try:
            # DCP's save returns on every rank only once all ranks' shards and rank 0's index are written
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), process_group=group)
            if self.global_rank == 0:
                with atomic_file(tmp / LIGHTNING_META) as f:
                    torch.save(meta, f)
                _publish(tmp, path)
        except Exception as e:
            if self.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e, 200, with_type=True)
            raise SodaError(f"{path}: cannot write the checkpoint ({reason}); nothing was written and the previous "
                            f"checkpoints are kept") from None

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a collective: every rank returns from it together)."""
        import torch.distributed as dist

        return self.reduce_boolean_decision(flag, all=False) if dist.is_initialized() else flag

    def _all_gather_object(self, obj) -> list:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return [obj]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except Exception as e:
            if isinstance(e, SodaError):
                raise
            from soda.checkpoints import unreadable_reason

            reason = unreadable_reason(Path(checkpoint_path)) or first_line(e, 200, with_type=True)
            raise SodaError(f"{checkpoint_path}: cannot load the checkpoint ({reason})") from None

    def teardown(self) -> None:
        if self.saves is not None:
            self.saves.wait()
        super().teardown()


def _publish(tmp: Path, path: Path) -> None:
    """Rename the whole checkpoint directory into place; one there already (the same step saved again) is replaced,
    removed only after the new one stands."""
    if not path.exists() and not path.is_symlink():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
