"""How a run writes its checkpoints: a single file renamed into place (DDP, one device) or a sharded directory that
every rank writes (FSDP), each refused when it would hold a NaN, and with --async-checkpoint written in the
background while training goes on. Reading them back is `soda.checkpoints`."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_utilities.core.apply_func import apply_to_collection

from tokenize_audio.errors import SodaError, first_line
from tokenize_audio.shards import atomic_file


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
