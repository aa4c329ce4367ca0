"""Training data: one global order of windows, the same whatever the number of ranks and workers.

Each source (`soda.train.sources`) is one endless token stream: its documents concatenated, shard after shard, in
an order shuffled anew every epoch, and cut into `seq_len` windows. The run's window `g` (`g = step x batch +
i`) is a function of the seed, the sources, the mixture and `g` alone:

- `Mixture` says which source it comes from, and which of that source's windows: each source's windows are due at
  evenly spaced times (1 / weight apart, shifted by a seeded phase) and taken in order of due time, so every
  source's share of the windows, and so of the tokens, stays within a window or two of its weight at any point
  (SODA's 95/5 is a share of tokens), whatever its documents' lengths.
- `StreamReader` reads that window by seeking (`soda.train.index`): a source's windows are shuffled within blocks
  of `SHUFFLE_BLOCK`, so a step's batch mixes documents from all over the corpus, and a reader touches only the
  windows it serves. The hierarchical family's streams count *steps* (a text token or a whole audio frame:
  `soda.hierarchical`), and `StepReader` reads `seq_len` steps per window, as codes [S, K].

Each rank takes its contiguous slice of every step's batch, one micro-batch at a time, and its loader workers
take turns by micro-batch. The position saved in a checkpoint is the step and each source's window count
(`SodaData.state_dict`): a run resumed on another number of GPUs or workers continues with exactly the windows
it would have seen. Each window carries document ids, so attention and positions restart at document boundaries.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from soda.train.index import STEP_MARK, Stream, StepStream
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import BadShard, read_ids

SHUFFLE_BLOCK = 1 << 20  # windows of a source shuffled together: 4.3B tokens at 4,096 (many shards), or an epoch


class Mixture:
    """Which source each of the run's windows comes from, and which of that source's windows it is.

    Source i's j-th window is due at `(j + phase_i) / weight_i`; the run takes windows in order of due time (ties
    by source). From the per-source counts at any point, the next windows follow without reading anything, so the
    position of a run is its counts."""

    def __init__(self, weights, seed: int):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.active = np.flatnonzero(self.weights > 0)
        if not len(self.active):
            raise SodaError("no source has a positive weight")
        self.phase = np.random.default_rng([seed, 7]).random(len(self.weights))

    def take(self, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source of each of the next `n` windows, its index within its source, the counts after them)."""
        src = np.repeat(self.active, n)
        j = counts[src] + np.tile(np.arange(n), len(self.active))
        due = (j + self.phase[src]) / self.weights[src]
        first = np.lexsort((src, due))[:n]
        src, j = src[first], j[first]
        return src, j, counts + np.bincount(src, minlength=len(self.weights))

    def advance(self, counts, windows: int, chunk: int = 1 << 16) -> np.ndarray:
        """The per-source counts `windows` windows after `counts` (None: the start of the run)."""
        counts = np.zeros(len(self.weights), np.int64) if counts is None else np.asarray(counts, np.int64)
        while windows > 0:
            _, _, counts = self.take(counts, min(chunk, windows))
            windows -= chunk
        return counts


class StreamReader:
    """Reads window k of a source's stream (seq_len tokens from token k x seq_len on, across documents, shards and
    epochs): per epoch a seeded shard order (`shuffle`), and the windows shuffled within blocks."""

    def __init__(self, stream: Stream, seq_len: int, seed: int, shuffle: bool, vocab_size: int | None,
                 loss_after: int | None):
        if stream.total <= 0:
            raise SodaError(f"source {stream.name!r}: its shards hold no tokens")
        self.stream, self.seq_len, self.seed, self.shuffle = stream, seq_len, seed, shuffle
        self.vocab_size, self.loss_after = vocab_size, loss_after
        self._orders: OrderedDict = OrderedDict()  # epoch -> (shard order, cumulative tokens)
        self._tables: OrderedDict = OrderedDict()  # shard -> (index table, cumulative document lengths)
        self._block: tuple[int, np.ndarray] | None = None
        # a source smaller than SHUFFLE_BLOCK windows is shuffled an epoch at a time: every document once per epoch
        self.block = max(1, min(SHUFFLE_BLOCK, stream.total // seq_len))

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, document ids 0, 1, ..., loss mask) of window k."""
        ids, docs, masks = [], [], []
        for n, (shard, d, a, b) in enumerate(self.pieces(self.shuffled(k))):
            path, row = self.stream.paths[shard], self._table(shard)[0][d]
            if self.loss_after is None:
                part, mask = read_ids(path, row, a, b, self.vocab_size), np.ones(b - a, dtype=bool)
            else:  # the mask depends on where (and whether) the document holds its marker: read it whole
                whole = read_ids(path, row, 0, int(row["length"]), self.vocab_size)
                mask, part = loss_mask(whole, self.loss_after)[a:b], whole[a:b]
            ids.append(part)
            docs.append(np.full(b - a, n, np.int64))
            masks.append(mask)
        return np.concatenate(ids), np.concatenate(docs), np.concatenate(masks)

    def shuffled(self, k: int) -> int:
        """Which window of the stream is the k-th read: shuffled within blocks (or k itself, unshuffled)."""
        if not self.shuffle:
            return k
        size = self.block
        block = k // size
        if self._block is None or self._block[0] != block:
            self._block = (block, np.random.default_rng([self.seed, block, 1]).permutation(size))
        return block * size + int(self._block[1][k % size])

    def pieces(self, k: int):
        """(shard, document, first, end) of the documents holding window k of the endless stream, in the stream's
        unit (a `Stream`'s ids; a `StepStream`'s steps)."""
        start, stop = k * self.seq_len, (k + 1) * self.seq_len
        total = self.stream.total
        while start < stop:
            epoch, offset = divmod(start, total)
            order, cum = self._order(epoch)
            p = int(np.searchsorted(cum, offset, side="right"))
            shard = int(order[p])
            within = offset - (int(cum[p - 1]) if p else 0)
            doc_cum = self._table(shard)[1]
            d = int(np.searchsorted(doc_cum, within, side="right"))
            first = int(doc_cum[d - 1]) if d else 0
            a = within - first
            b = min(int(doc_cum[d]) - first, a + stop - start)
            yield shard, d, a, b
            start += b - a

    def _order(self, epoch: int):
        if epoch not in self._orders:
            idx = np.arange(len(self.stream.paths))
            if self.shuffle:
                idx = np.random.default_rng([self.seed, epoch]).permutation(idx)
            self._orders[epoch] = (idx, np.cumsum(self.stream.tokens[idx]))
            if len(self._orders) > 4:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def _table(self, shard: int):
        """(index table, cumulative document lengths in the stream's unit, more the subclass keeps) of a shard."""
        if shard not in self._tables:
            self._tables[shard] = self._load_table(shard)
            if len(self._tables) > 64:
                self._tables.popitem(last=False)
        return self._tables[shard]

    def _load_table(self, shard: int) -> tuple:
        table = np.load(self.stream.tables[shard], mmap_mode="r", allow_pickle=False)
        return table, np.cumsum(table["length"])


class StepReader(StreamReader):
    """Window k of a `StepStream` (soda.hierarchical's family): `seq_len` *steps* from step k x seq_len on, as
    `(codes [S, K], document ids, loss mask)`; the same shard order and shuffle as `StreamReader`. A piece of a
    document is read from its nearest step mark (`soda.train.index.STEP_MARK`) and regrouped (`regroup` is exact
    from any step boundary)."""

    def __init__(self, stream: StepStream, seq_len: int, seed: int, shuffle: bool, loss_after: int | None):
        super().__init__(stream, seq_len, seed, shuffle, stream.vocab.size, loss_after)
        self.vocab = stream.vocab

    def _load_table(self, shard: int) -> tuple:
        table = np.load(self.stream.tables[shard], mmap_mode="r", allow_pickle=False)
        steps = np.load(self.stream.steps[shard], allow_pickle=False)
        marks = np.load(self.stream.marks[shard], mmap_mode="r", allow_pickle=False)
        first_mark = np.concatenate([[0], np.cumsum(-(-steps // STEP_MARK))[:-1]]).astype(np.int64)
        return table, np.cumsum(steps), first_mark, marks

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        codes, docs, masks = [], [], []
        for n, (shard, d, a, b) in enumerate(self.pieces(self.shuffled(k))):
            part = self.steps(shard, d, a, b)
            codes.append(part.codes)
            docs.append(np.full(b - a, n, np.int64))
            masks.append(np.ones(b - a, dtype=bool) if part.loss_mask is None else part.loss_mask)
        return np.concatenate(codes), np.concatenate(docs), np.concatenate(masks)

    def steps(self, shard: int, d: int, a: int, b: int):
        """Steps a:b of document d of a shard (`soda.hierarchical.Steps`)."""
        from soda.hierarchical import regroup

        table, _, first_mark, marks = self._table(shard)
        path, row, k = self.stream.paths[shard], table[d], self.vocab.n_codebooks
        length, j = int(row["length"]), a // STEP_MARK
        start, skip, need = int(marks[first_mark[d] + j]), a - j * STEP_MARK, b - j * STEP_MARK
        if self.loss_after is None:
            stop = min(length, start + need * k)  # enough unless audio ids outside whole frames lie between
            got = regroup(read_ids(path, row, start, stop, self.vocab_size), self.vocab)
            if len(got) < need and stop < length:
                got = regroup(read_ids(path, row, start, length, self.vocab_size), self.vocab)
        else:  # the mask depends on where (and whether) the document holds its marker: read it whole
            whole = read_ids(path, row, 0, length, self.vocab_size)
            got = regroup(whole[start:], self.vocab, loss_mask=loss_mask(whole, self.loss_after)[start:])
        if len(got) < need:
            raise BadShard(f"shard {path} is not what it was when its steps were counted (changed since?)")
        got.codes = got.codes[skip:need]
        got.loss_mask = None if got.loss_mask is None else got.loss_mask[skip:need]
        return got


def reader_for(stream: Stream, seq_len: int, seed: int, shuffle: bool, vocab_size: int | None,
               loss_after: int | None) -> StreamReader:
    """A `StepReader` for a `StepStream`, else a `StreamReader`."""
    if isinstance(stream, StepStream):
        return StepReader(stream, seq_len, seed, shuffle, loss_after)
    return StreamReader(stream, seq_len, seed, shuffle, vocab_size, loss_after)


def loss_mask(tokens: np.ndarray, after: int | None) -> np.ndarray:
    """Per token of one document: is it a scored target? With `after` (a marker id), only the tokens after
    the document's first such marker (all of them when there is none: nothing would be learnt otherwise)."""
    mask = np.ones(len(tokens), dtype=bool)
    if after is not None:
        hits = np.flatnonzero(tokens == after)
        if len(hits):
            mask[: hits[0] + 1] = False
    return mask


@dataclass(frozen=True)
class Layout:
    """How a step's batch of windows is split: this rank's slice of `batch`, in `accumulate` micro-batches of
    `micro` windows (the same for every rank)."""
    batch: int
    micro: int
    accumulate: int = 1
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.batch != self.world * self.micro * self.accumulate:
            raise SodaError(f"a batch of {self.batch} windows does not split into {self.world} ranks x "
                            f"{self.micro} x {self.accumulate}")


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _item(src: int, ids: np.ndarray, docs: np.ndarray, mask: np.ndarray, loss_after: int | None) -> dict:
    """A window as the loader yields it: `input_ids` [S] flat ids, or `codes` [S, K] a `StepReader`'s steps."""
    window = {"codes" if ids.ndim == 2 else "input_ids": torch.from_numpy(ids), "doc_ids": torch.from_numpy(docs),
              "source": torch.tensor(src)}
    if loss_after is not None:
        window["loss_mask"] = torch.from_numpy(mask)
    return window


class TrainWindows(IterableDataset):
    """This rank's windows `{"input_ids": [S], "doc_ids": [S], "source": index}` (`"codes": [S, K]` for
    `StepStream`s, in place of the ids; plus `"loss_mask"` with
    `loss_after`, a marker id such as `<|text_end|>`: fine-tuning on what follows it), from step `step` on, whose
    windows start after `counts` windows of each source. Endless; the loader batches them by `layout.micro`."""

    def __init__(self, streams: list[Stream], weights, seq_len: int, seed: int, layout: Layout, step: int = 0,
                 counts=None, vocab_size: int | None = None, loss_after: int | None = None):
        self.streams, self.seq_len, self.seed, self.layout = streams, seq_len, seed, layout
        self.mixture = Mixture(weights, seed)
        self.step = step
        self.counts = np.zeros(len(streams), np.int64) if counts is None else np.asarray(counts, np.int64)
        self.vocab_size, self.loss_after = vocab_size, loss_after

    def __iter__(self):
        worker, workers = _worker()
        readers = {i: reader_for(self.streams[i], self.seq_len, self.seed * 1000 + i, True, self.vocab_size,
                                 self.loss_after) for i in self.mixture.active}
        lay = self.layout
        step, counts, plan = self.step - 1, self.counts, None
        for j in itertools.count(worker, workers):  # this rank's micro-batches, dealt out to the workers in turn
            target, a = self.step + j // lay.accumulate, j % lay.accumulate
            while step < target:
                src, k, counts = self.mixture.take(counts, lay.batch)
                plan, step = (src, k), step + 1
            first = (lay.rank * lay.accumulate + a) * lay.micro
            for g in range(first, first + lay.micro):
                src, k = int(plan[0][g]), int(plan[1][g])
                yield _item(src, *readers[src].window(k), self.loss_after)


class ValidationWindows(IterableDataset):
    """The first `limit` of every source's validation windows in turn (unshuffled, a source's last partial window
    dropped), dealt out by micro-batch: rank r takes micro-batches r, r + world, ...; every rank takes the same
    number of them (under FSDP each forward needs every rank). With `limit` a multiple of micro x world (a number of
    global batches), every number of ranks validates on the same windows."""

    def __init__(self, streams: list[Stream], seq_len: int, micro: int, rank: int = 0, world: int = 1,
                 vocab_size: int | None = None, loss_after: int | None = None, limit: int | None = None):
        self.streams, self.seq_len, self.micro, self.rank, self.world = streams, seq_len, micro, rank, world
        self.vocab_size, self.loss_after = vocab_size, loss_after
        self.windows = [(i, k) for i, s in enumerate(streams) if s.paths for k in range(s.total // seq_len)]
        self.windows = self.windows[:limit]

    def batches_per_rank(self) -> int:
        return len(self.windows) // (self.micro * self.world)

    def __iter__(self):
        worker, workers = _worker()
        readers = {i: reader_for(s, self.seq_len, 0, False, self.vocab_size, self.loss_after)
                   for i, s in enumerate(self.streams) if s.paths}
        for b in range(worker, self.batches_per_rank(), workers):
            first = (b * self.world + self.rank) * self.micro
            for src, k in self.windows[first:first + self.micro]:
                yield _item(src, *readers[src].window(k), self.loss_after)
def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a loader worker: ignore SIGTERM, SIGINT and SIGUSR1. Sent to the whole process group (SLURM, `timeout`,
    Ctrl-C), they would kill the workers before the main process checkpoints, and the main process would then die
    of "DataLoader worker killed"; the main process shuts its workers down itself."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def stop_loader_workers() -> None:
    """End this process's loader workers (after training; they ignore SIGTERM, which is how torch and
    multiprocessing would otherwise stop them, so the process would wait for them at exit forever). The run's
    state is already saved, and workers only read: killing them loses nothing. torch's SIGCHLD watch, which
    reports a dying worker as an error, is switched off first."""
    import multiprocessing
    import signal

    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if not workers:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in workers:
        p.kill()
    for p in workers:
        p.join(timeout=10)
