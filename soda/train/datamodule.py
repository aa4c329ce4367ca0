"""The run's data as Lightning sees it: the shards indexed once, this rank's loaders, the saved position.

`SodaData` is a LightningDataModule: `prepare_data` indexes the shards on the first rank (`soda.train.index`;
the run directory is shared, so the others find the index), `setup` reads the index on every rank, and
`state_dict` is the global position of the data (`soda.train.data`): the step and each source's window count.
With `steps_vocab` (the hierarchical family) the streams and windows count steps (`soda.train.index.index_steps`).
On resume, the loaders start at the restored step, whatever the number of ranks and workers now.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

from soda.train.data import Layout, Mixture, TrainWindows, ValidationWindows, ignore_stop_signals
from soda.train.index import index_sources, index_steps
from soda.train.sources import repeat_warnings
from tokenize_audio.errors import SodaError

ORDER = "global"  # what a checkpoint's data position is; earlier ones held each rank's own stream position


class SodaData(L.LightningDataModule):
    def __init__(self, sources: list, seq_len: int, seed: int, batch: int, micro: int, accumulate: int,
                 workers: int, cache: Path, skip_bad: bool = False, vocab_size: int | None = None,
                 loss_after: int | None = None, run_tokens: int | None = None, val_batches: int | None = None,
                 steps_vocab=None):
        super().__init__()
        self.steps_vocab = steps_vocab  # a Vocabulary: windows of steps (soda.hierarchical's family), not of ids
        self.prepare_data_per_node = False  # the index lives in the (shared) run directory
        self.sources, self.seq_len, self.seed, self.batch, self.micro = sources, seq_len, seed, batch, micro
        self.accumulate, self.workers, self.cache = accumulate, workers, Path(cache)  # the shard index: OUT/data_index
        self.skip_bad, self.vocab_size, self.loss_after, self.run_tokens = skip_bad, vocab_size, loss_after, run_tokens
        self.val_windows = None if val_batches is None else val_batches * batch  # global batches: any GPU count
        self.mixture = Mixture([s.weight or 0.0 for s in sources], seed)
        self.train_streams = self.val_streams = None
        self._saved: dict | None = None
        self._known: tuple[int, np.ndarray] | None = None  # (step, counts at its start), to advance from

    # --- Lightning hooks -----------------------------------------------------------------------
    @property
    def unit(self) -> str:
        """What a window's `seq_len` counts."""
        return "tokens" if self.steps_vocab is None else "steps"

    def prepare_data(self) -> None:
        self._index(quiet=False)

    def setup(self, stage: str) -> None:
        if self.train_streams is None:  # the other ranks: the index rank 0 built in prepare_data
            self._index(quiet=True)
        if self.trainer is None or self.trainer.is_global_zero:
            for source, stream in zip(self.sources, self.train_streams):
                source.train_tokens = stream.total  # exact now, for every kind of source
            for line in repeat_warnings(self.sources, self.run_tokens or 0, self.unit):
                print(f"soda-train: warning: {line}", file=sys.stderr)

    def _index(self, quiet: bool) -> None:
        train, val = index_sources(self.sources, self.cache, self.skip_bad, quiet=quiet)
        if self.steps_vocab is not None:
            train, val = (index_steps(s, self.steps_vocab, self.cache, self.skip_bad, quiet) for s in (train, val))
            dropped = sum(s.dropped for s in train + val)
            if dropped and not quiet:
                print(f"soda-train: warning: {dropped:,} audio ids belong to no whole frame (a document's frame cut "
                      f"short?); the hierarchical model leaves them out", file=sys.stderr)
            if len(self.sources) > 1 and all(s.by_size for s in self.sources):  # no --mix: each source's steps
                total = sum(s.total for s in train)
                for source, stream in zip(self.sources, train):
                    source.weight = stream.total / total
                self.mixture = Mixture([s.weight for s in self.sources], self.seed)
                if not quiet:
                    print("soda-train: mixture by steps (no --mix): " + ", ".join(
                        f"{s.name} {s.weight:.1%}" for s in self.sources), file=sys.stderr)
        self.train_streams, self.val_streams = train, val

    def train_dataloader(self):
        rank, world = self._rank_and_world()
        step = self.trainer.global_step if self.trainer is not None else 0
        windows = TrainWindows(self.train_streams, self.mixture.weights, self.seq_len, self.seed,
                               Layout(self.batch, self.micro, self.accumulate, rank, world), step,
                               self.counts_at(step), self.vocab_size, self.loss_after)
        return loader(windows, self.micro, self.workers)

    def val_dataloader(self):
        if not any(s.paths for s in self.val_streams):
            return []
        rank, world = self._rank_and_world()
        windows = ValidationWindows(self.val_streams, self.seq_len, self.micro, rank, world, self.vocab_size,
                                    self.loss_after, self.val_windows)
        return loader(windows, self.micro, min(self.workers, 1))

    def state_dict(self) -> dict:
        step = self.trainer.global_step
        return {"order": ORDER, "step": step, "counts": self.counts_at(step).tolist(), "batch": self.batch,
                "seq_len": self.seq_len, "unit": self.unit}

    def load_state_dict(self, state: dict) -> None:
        if state.get("unit", "tokens") != self.unit:  # the same counts would name other windows
            raise SodaError(f"--resume: the checkpoint's windows count {state.get('unit', 'tokens')}, this run's "
                            f"count {self.unit} (hierarchical runs count steps since this version); start a new run "
                            f"(another --out), or --init-from its checkpoint")
        self._saved = dict(state)

    # --- the position --------------------------------------------------------------------------
    def counts_at(self, step: int) -> np.ndarray:
        """Each source's windows before `step`: from the checkpoint's position, or advanced from the nearest known
        one (the mixture decides them without reading data)."""
        saved = self._saved
        if saved and saved.get("order") == ORDER and saved.get("batch") == self.batch and saved["step"] <= step:
            start = (saved["step"], np.asarray(saved["counts"], np.int64))
        else:
            if self._known is None and step and (self.trainer is None or self.trainer.is_global_zero):
                print(f"soda-train: warning: the checkpoint's data position predates the global data order (it was "
                      f"per rank); the data continues from step {step} of the global order, so some windows may "
                      f"repeat or be skipped once", file=sys.stderr)
            start = (0, None)
        if self._known is not None and start[0] <= self._known[0] <= step:
            start = self._known
        counts = self.mixture.advance(start[1], (step - start[0]) * self.batch)
        self._known = (step, counts)
        return counts

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size


def loader(windows, micro: int, workers: int):
    """A DataLoader over an iterable of windows: `workers` processes, which take micro-batches in turn (the order
    `TrainWindows` and `ValidationWindows` deal them in), ignoring the stop signals the main process handles."""
    return torch.utils.data.DataLoader(
        windows, batch_size=micro, num_workers=workers, pin_memory=torch.cuda.is_available(),
        **({"prefetch_factor": 2, "worker_init_fn": ignore_stop_signals} if workers else {}))


def training_loader(sources: list, seq_len: int, seed: int, micro: int, workers: int, cache: Path,
                    vocab_size: int | None = None, loss_after: int | None = None, accumulate: int = 1):
    """The loader of a one-device run's training windows outside a Trainer (benchmarks, checks): micro-batches of
    `micro` windows, `accumulate` of them per step, from step 0; the shard index is kept in `cache`."""
    data = SodaData(sources, seq_len, seed, micro * accumulate, micro, accumulate, workers, Path(cache),
                    vocab_size=vocab_size, loss_after=loss_after)
    data.setup("fit")
    return data.train_dataloader()
