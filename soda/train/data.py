"""Training data: webdataset shards streamed, mixed by weight, packed into windows, resumable exactly.

A *source* (`soda.train.sources`) is a list of shards with a mixture weight. Every rank and dataloader worker
(a *slot*) reads its own deterministic part of each source: whole shards when there are enough
of them, otherwise every n-th document of every shard. Each source's documents are concatenated
and cut into `seq_len` windows of their own; the mixture picks the source of every window by
weight, so the weights are shares of *tokens* (as SODA's trainer mixes packed sequences), not
of documents, whatever the sources' document lengths. Each window carries document ids, so
attention and positions restart at document boundaries.

The position of a slot is a small dict (per source: epoch, shard, document, the windows taken
from it, and where the document cut by its last window continues). torchdata's `StatefulDataLoader` gathers
it from the workers and Lightning stores it in checkpoints, so a resumed run sees exactly the
windows it would have seen without the interruption.
"""

from __future__ import annotations

import sys
from collections import deque

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from soda.train.sources import Source
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import BadShard, shard_documents

# --------------------------------------------------------------------------------------------
# The packed, mixed, resumable stream
# --------------------------------------------------------------------------------------------
class _Cursor:
    """Where one source is, for one slot: the next document to consider."""

    def __init__(self, shards: list[str], slot: int, n_slots: int, seed: int, shuffle: bool, state=None,
                 vocab_size: int | None = None):
        self.shards, self.slot, self.n_slots, self.seed, self.shuffle = shards, slot, n_slots, seed, shuffle
        self.vocab_size = vocab_size
        self.split_documents = len(shards) < n_slots
        self.epoch, self.shard, self.doc = state or (0, 0, 0)
        self._docs = None

    def order(self) -> list[str]:
        idx = np.arange(len(self.shards))
        if self.shuffle:
            idx = np.random.default_rng([self.seed, self.epoch]).permutation(idx)
        ordered = [self.shards[i] for i in idx]
        return ordered if self.split_documents else ordered[self.slot::self.n_slots]

    def state(self) -> tuple[int, int, int]:
        return (self.epoch, self.shard, self.doc)

    def next_document(self, skip_bad: bool, on_skip) -> tuple[tuple, np.ndarray] | None:
        """The next document of this slot and the position it was read from; None at the end of an epoch."""
        while True:
            shards = self.order()
            if self.shard >= len(shards):
                self._docs = None
                return None
            if self._docs is None:
                self._docs = shard_documents(shards[self.shard], self.doc, self.vocab_size)
            try:
                index, tokens = next(self._docs)
            except StopIteration:
                index = None
            except BadShard as e:
                if not skip_bad:
                    raise
                on_skip(str(e))
                index = None
            if index is None:
                self.shard, self.doc, self._docs = self.shard + 1, 0, None
                continue
            self.doc = index + 1
            if self.split_documents and index % self.n_slots != self.slot:
                continue
            return (self.epoch, self.shard, index), tokens

    def next_epoch(self) -> None:
        self.epoch, self.shard, self.doc, self._docs = self.epoch + 1, 0, 0, None


def loss_mask(tokens: np.ndarray, after: int | None) -> np.ndarray:
    """Per token of one document: is it a scored target? With `after` (a marker id), only the tokens after
    the document's first such marker (all of them when there is none: nothing would be learnt otherwise)."""
    mask = np.ones(len(tokens), dtype=bool)
    if after is not None:
        hits = np.flatnonzero(tokens == after)
        if len(hits):
            mask[: hits[0] + 1] = False
    return mask


class _Packer:
    """One source's documents concatenated and cut into windows: a window holds the tokens of one source only
    (Levanter, SODA's trainer, mixes packed sequences), so a source's share of windows is its share of tokens."""

    def __init__(self):
        self.tokens: list[np.ndarray] = []
        self.docs: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.buffered = 0
        self.last = None  # (position, offset in its document) of the newest piece in the buffer
        self.pending = None  # where the document cut by the last window continues, for the saved state

    def add(self, pos: tuple, tokens: np.ndarray, mask: np.ndarray, doc_id: int, offset: int = 0) -> None:
        self.tokens.append(tokens)
        self.docs.append(np.full(len(tokens), doc_id, np.int64))
        self.masks.append(mask)
        self.buffered += len(tokens)
        self.last = (pos, offset)

    def window(self, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next `seq_len` tokens, their document ids and loss mask; the rest stays for the next window."""
        flat, docs, masks = np.concatenate(self.tokens), np.concatenate(self.docs), np.concatenate(self.masks)
        rest = len(flat) - seq_len
        if rest > 0:  # the newest document continues in the next window
            pos, offset = self.last
            self.last = self.pending = (pos, offset + len(self.tokens[-1]) - rest)
            self.tokens, self.docs, self.masks = [flat[seq_len:]], [docs[seq_len:]], [masks[seq_len:]]
            self.buffered = rest
        else:
            self.tokens, self.docs, self.masks, self.buffered, self.pending = [], [], [], 0, None
        return flat[:seq_len], docs[:seq_len], masks[:seq_len]


class PackedStream(IterableDataset):
    """Windows `{"input_ids": [S], "doc_ids": [S], "source": index}` from the sources (see the module docstring).

    `infinite=True` (training) cycles epochs with a new shard order each, and picks the source of every window
    so that each source's share of the windows, and so of the tokens, follows its weight whatever its documents'
    lengths (`_choose`). `infinite=False` (validation) makes one pass over every source in turn, without
    shuffling or weights. `loss_after` (a marker id, e.g. `<|text_end|>`) adds `"loss_mask": [S]` (see
    `loss_mask`): fine-tuning on the part of each document after it, such as an S2ST document's target.
    """

    def __init__(self, sources: list[Source], seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 split: str = "train", infinite: bool = True, skip_bad: bool = False, vocab_size: int | None = None,
                 loss_after: int | None = None):
        self.sources, self.seq_len, self.seed, self.vocab_size = sources, seq_len, seed, vocab_size
        self.loss_after = loss_after
        self.rank, self.world_size, self.split, self.infinite, self.skip_bad = rank, world_size, split, infinite, skip_bad
        self.weights = np.array([s.weight or 0.0 for s in sources], dtype=np.float64)
        self._loaded: dict | None = None
        self._state: dict | None = None
        self.skipped: list[str] = []

    # --- torchdata / Lightning resume protocol -------------------------------------------------
    def state_dict(self) -> dict:
        return dict(self._state) if self._state is not None else (self._loaded or {})

    def load_state_dict(self, state: dict) -> None:
        self._loaded = dict(state) if state else None

    # --- iteration -----------------------------------------------------------------------------
    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _shards(self, source: Source) -> list[str]:
        return source.train if self.split == "train" else source.validation

    def _position(self) -> tuple[dict, list]:
        """The loaded position, and where each source's cut document continues. A position saved before windows
        were packed per source held one `pending` (source, position, offset) and no per-source counts."""
        loaded = dict(self._loaded or {})
        if "emitted" in loaded:
            return loaded, list(loaded["pending"])
        pending = [None] * len(self.sources)
        if loaded.get("pending"):
            src, pos, offset = loaded["pending"]
            pending[src] = (pos, offset)
        return loaded, pending

    def __iter__(self):
        slot, n_slots = self._slot()
        loaded, pending = self._position()
        cursors = [_Cursor(self._shards(s), slot, n_slots, self.seed * 1000 + i, self.infinite,
                           tuple(loaded["cursors"][i]) if loaded else None, self.vocab_size)
                   for i, s in enumerate(self.sources)]
        emitted = np.array(loaded.get("emitted", [0] * len(self.sources)), dtype=np.int64)
        self.skipped = list(loaded.get("skipped", []))
        active = [i for i, s in enumerate(self.sources) if self._shards(s) and (self.weights[i] > 0 or not self.infinite)]
        if not active:
            return

        def on_skip(message: str) -> None:
            self.skipped.append(message)
            print(f"soda-train: warning: skipping {message}", file=sys.stderr)

        packers = [_Packer() for _ in self.sources]
        for src, where in enumerate(pending):
            if where:  # the document the last window cut continues this source's next window
                pos, offset = where
                whole = self._read_at(src, pos, cursors[src])
                packers[src].add(pos, whole[offset:], loss_mask(whole, self.loss_after)[offset:], 0, offset)
                packers[src].pending = (pos, offset)
        doc_counter = 1
        exhausted: set[int] = set()
        phase = np.random.default_rng([self.seed, slot, 7]).random(len(self.sources))
        while True:
            src = self._choose(active, exhausted, emitted, phase)
            if src is None:
                return
            packer, empty_epochs = packers[src], 0
            while packer.buffered < self.seq_len:  # fill this source's buffer to one window
                got = cursors[src].next_document(self.skip_bad, on_skip)
                if got is not None:
                    empty_epochs = 0
                    pos, doc = got
                    packer.add(pos, doc, loss_mask(doc, self.loss_after), doc_counter)
                    doc_counter += 1
                    continue
                if not self.infinite:  # validation: this source is done; its last partial window is dropped
                    exhausted.add(src)
                    break
                empty_epochs += 1
                if empty_epochs > 1:
                    raise SodaError(f"source {self.sources[src].name!r}: no documents for rank {self.rank} "
                                    f"(slot {slot} of {n_slots}); give it more shards or documents, or use "
                                    f"fewer workers/devices")
                cursors[src].next_epoch()
                if slot == 0:
                    print(f"soda-train: warning: source {self.sources[src].name!r} starts epoch "
                          f"{cursors[src].epoch + 1}: its documents repeat (it holds fewer tokens than its weight "
                          f"takes)", file=sys.stderr)
            if src in exhausted:
                continue
            flat, flat_docs, flat_mask = packer.window(self.seq_len)
            emitted[src] += 1
            self._state = {"cursors": [c.state() for c in cursors], "pending": [p.pending for p in packers],
                           "emitted": emitted.tolist(), "skipped": list(self.skipped)}
            window = {"input_ids": torch.from_numpy(flat.copy()), "doc_ids": torch.from_numpy(_renumber(flat_docs)),
                      "source": torch.tensor(src)}
            if self.loss_after is not None:
                window["loss_mask"] = torch.from_numpy(flat_mask.copy())
            yield window

    def _choose(self, active: list[int], exhausted: set, emitted: np.ndarray, phase: np.ndarray) -> int | None:
        """The source of the next window. Training: the source furthest below its share of the windows so far
        (weight x windows + a per-slot phase in [0, 1) - its windows), so every source's count stays within about
        one window of weight x windows at any point, deterministically and from the counts alone (exact resume).
        The phase keeps the slots (ranks and workers) from all picking the small source at the same step.
        Validation: the sources in turn."""
        live = [i for i in active if i not in exhausted]
        if not live:
            return None
        if not self.infinite:
            return live[0]
        total = emitted.sum() + 1
        deficit = [self.weights[i] * total + phase[i] - emitted[i] for i in live]
        return live[int(np.argmax(deficit))]

    def _read_at(self, src: int, pos: tuple, cursor: _Cursor) -> np.ndarray:
        epoch, shard, index = pos
        saved = cursor.epoch
        cursor.epoch = epoch
        url = cursor.order()[shard]
        cursor.epoch = saved
        for i, tokens in shard_documents(url, index, self.vocab_size):
            return tokens
        raise SodaError(f"shard {url}: document {index} is gone (the data changed since the checkpoint)")


def _renumber(doc_ids: np.ndarray) -> np.ndarray:
    """Document ids 0, 1, 2, ... in order of appearance within the window."""
    change = np.ones(len(doc_ids), dtype=bool)
    change[1:] = doc_ids[1:] != doc_ids[:-1]
    return (np.cumsum(change) - 1).astype(np.int64)


class OneAheadLoader:
    """A StatefulDataLoader as Lightning sees it.

    Lightning fetches one batch ahead of the step it trains, so the position a checkpoint stores is
    the one before the last fetched batch, not after it. Every rank reads its own part of the data,
    but only rank 0 writes the checkpoint: `state_dict` gathers all ranks' positions (Lightning asks
    every rank for it while saving) and `load_state_dict` gives each rank its own back.
    """

    def __init__(self, loader):
        self.loader = loader
        self._states = deque([loader.state_dict()], maxlen=2)

    def __iter__(self):
        self._states = deque([self.loader.state_dict()], maxlen=2)
        for batch in self.loader:
            self._states.append(self.loader.state_dict())
            yield batch

    def state_dict(self) -> dict:
        _, world = _rank_and_world()
        states = [self._states[0]]
        if world > 1:
            import torch.distributed as dist

            states = [None] * world
            dist.all_gather_object(states, self._states[0])
        return {"ranks": states}

    def load_state_dict(self, state: dict) -> None:
        rank, world = _rank_and_world()
        states = state.get("ranks", [state])  # checkpoints before per-rank positions held one rank's state
        if len(states) != world:
            if rank == 0:
                print(f"soda-train: warning: the checkpoint's data position is for {len(states)} rank(s), this run "
                      f"has {world}; the model, optimizer and schedule continue exactly, but each rank starts its "
                      f"share of the data from the beginning", file=sys.stderr)
            return
        self.loader.load_state_dict(states[rank])


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dataloader(stream: PackedStream, batch_size: int, workers: int, stateful: bool = True):
    """A StatefulDataLoader (position saved in checkpoints) for training; a plain one for validation."""
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader as Loader
    else:
        from torch.utils.data import DataLoader as Loader
    return Loader(stream, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=False,
                  **({"prefetch_factor": 2, "worker_init_fn": ignore_stop_signals} if workers else {}))


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
