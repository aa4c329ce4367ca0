"""The shard index: each source's documents located once, so any window of the run is read by seeking.

`index_sources` turns every source's train and validation shards into a `Stream`: the shards' paths and, per
shard, an `INDEX_DTYPE` table (where each document's ids lie) and its token count. Tables are cached in
`RUN/data_index/` (one `.npy` per shard, memory-mapped by every reader, so workers share one copy in the page
cache), keyed by the shard's path, size and modification time: a resume finds them, a changed shard is indexed
again. Shards named by URL (`http://`, `pipe:`) are copied once into `RUN/data_index/shards/` first, since seeking
needs a file. Indexing reads only tar and `.npy` headers.

The hierarchical family (`soda.hierarchical`) counts its windows in *steps* (one per text or special token, one per
whole audio frame), so its streams are `StepStream`s: `index_steps` reads every document once more and keeps, per
shard, each document's step count and the flat offset of every `STEP_MARK`-th step (`{key}.steps.npy`,
`{key}.marks.npy`, keyed by the shard and the vocabulary's audio layout), so a window of steps is read by seeking too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soda.train.sources import Source
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import (BadShard, atomic_file, atomic_write_json, index_shard, is_url, open_shard,
                                   read_ids)

INDEX_DIR = "data_index"
SUMMARY = "summary.json"  # shard key -> [documents, tokens]: the token counts without opening every table


@dataclass
class Stream:
    """One source's split as one token stream: its readable shards in order, their tables and token counts."""
    name: str
    shards: list[str]  # as named in --data (messages)
    paths: list[str]  # local files to read (a URL's cached copy)
    tables: list[str]  # the `.npy` index table of each
    tokens: np.ndarray  # int64 per shard
    skipped: list[str] = field(default_factory=list)  # shards left out (--skip-bad-shards), with why

    @property
    def total(self) -> int:
        return int(self.tokens.sum())


STEP_MARK = 1024  # a document's flat offset is kept every this many steps: a window reads at most this many more


@dataclass
class StepStream(Stream):
    """One source's split as a stream of steps (`soda.hierarchical.regroup`'s): `tokens` counts each shard's steps;
    per shard, `steps` names the table of its documents' step counts and `marks` the flat offsets of their steps 0,
    STEP_MARK, 2 x STEP_MARK, ... (documents in order); `dropped` audio ids belong to no whole frame."""
    steps: list[str] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)
    dropped: int = 0
    vocab: object = None  # the tokenize_audio.vocab.Vocabulary the steps were counted with


def shard_key(shard: str) -> str:
    """What identifies a shard's contents cheaply: a local file's path, size and modification time; a URL itself."""
    if is_url(shard):
        ident = shard
    else:
        st = os.stat(shard)
        ident = f"{Path(shard).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(ident.encode()).hexdigest()[:20]


def index_sources(sources: list[Source], cache: Path, skip_bad: bool = False, quiet: bool = False
                  ) -> tuple[list[Stream], list[Stream]]:
    """(train streams, validation streams), one per source, from the cache in `cache` or by indexing the shards
    (in parallel; a progress bar when there are many; `quiet`: neither it nor warnings). A shard that cannot be indexed stops the run with one line
    naming it, or with `skip_bad` is left out and named in a warning (and in `Stream.skipped`)."""
    cache = Path(cache)
    summary = _read_summary(cache)
    keys = {s: shard_key(s) for src in sources for s in src.train + src.validation}  # a stat per shard, once
    todo = [s for s in sorted(keys) if keys[s] not in summary or not (cache / f"{keys[s]}.npy").is_file()]
    failed: dict[str, str] = {}
    if todo:
        bar = None
        if len(todo) >= 20 and not quiet:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="soda-train: indexing shards", unit="shard", file=sys.stderr)
        with ThreadPoolExecutor(min(8, len(todo))) as pool:
            for shard, result in zip(todo, pool.map(lambda s: _index_one(s, keys[s], cache), todo)):
                if isinstance(result, str):
                    failed[shard] = result
                else:
                    summary[keys[shard]] = result
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        _write_summary(cache, summary)
    _stop_or_skip(failed, skip_bad, quiet)

    def stream(source: Source, shards: list[str]) -> Stream:
        good = [s for s in shards if s not in failed]
        return Stream(source.name, good, [_local_copy(s, cache) if is_url(s) else s for s in good],
                      [str(cache / f"{keys[s]}.npy") for s in good],
                      np.array([summary[keys[s]][1] for s in good], dtype=np.int64),
                      [failed[s] for s in shards if s in failed])

    return [stream(s, s.train) for s in sources], [stream(s, s.validation) for s in sources]


def index_steps(streams: list[Stream], vocab, cache: Path, skip_bad: bool = False, quiet: bool = False
                ) -> list[StepStream]:
    """`streams` (from `index_sources`) as streams of steps: each shard's documents are read once (in parallel, a
    progress bar when there are many) and their steps counted, or the counts come from the cache. A shard that
    cannot be read stops the run with one line naming it, or with `skip_bad` is left out with a warning."""
    cache = Path(cache)
    summary = _read_summary(cache)
    layout = f"steps|{vocab.size}|{vocab.audio_base}|{vocab.codebook_size}|{vocab.n_codebooks}"
    keys = {t: "steps-" + hashlib.sha1(f"{Path(t).stem}|{layout}".encode()).hexdigest()[:20]
            for s in streams for t in s.tables}
    jobs = {t: p for s in streams for t, p in zip(s.tables, s.paths)
            if keys[t] not in summary or not (cache / f"{keys[t]}.marks.npy").is_file()}
    failed: dict[str, str] = {}
    if jobs:
        from tqdm import tqdm

        with ThreadPoolExecutor(min(8, len(jobs))) as pool, tqdm(
                total=len(jobs), desc="soda-train: counting steps", unit="shard", file=sys.stderr,
                disable=quiet or len(jobs) < 20) as bar:
            for t, result in zip(jobs, pool.map(lambda t: _steps_one(jobs[t], t, keys[t], vocab, cache), jobs)):
                if isinstance(result, str):
                    failed[t] = result
                else:
                    summary[keys[t]] = result
                bar.update()
        _write_summary(cache, summary)
    _stop_or_skip(failed, skip_bad, quiet)

    def stream(s: Stream) -> StepStream:
        keep = [i for i, t in enumerate(s.tables) if t not in failed]
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return StepStream(s.name, pick(s.shards), pick(s.paths), pick(s.tables),
                          np.array([summary[keys[s.tables[i]]][1] for i in keep], dtype=np.int64),
                          s.skipped + [failed[t] for t in s.tables if t in failed],
                          [str(cache / f"{keys[s.tables[i]]}.steps.npy") for i in keep],
                          [str(cache / f"{keys[s.tables[i]]}.marks.npy") for i in keep],
                          sum(summary[keys[s.tables[i]]][2] for i in keep), vocab)

    return [stream(s) for s in streams]


def _steps_one(path: str, table_path: str, key: str, vocab, cache: Path) -> list[int] | str:
    """Count one shard's steps into the cache: [documents, steps, audio ids in no whole frame], or why it cannot."""
    from soda.hierarchical import regroup

    table = np.load(table_path, allow_pickle=False)
    steps, marks, dropped = np.zeros(len(table), np.int64), [], 0
    try:
        for d, row in enumerate(table):
            grouped = regroup(read_ids(path, row, 0, int(row["length"]), vocab.size), vocab)
            steps[d], dropped = len(grouped), dropped + grouped.dropped
            marks.append(grouped.starts[::STEP_MARK])
    except BadShard as e:
        return str(e)
    with atomic_file(cache / f"{key}.steps.npy") as f:
        np.save(f, steps, allow_pickle=False)
    with atomic_file(cache / f"{key}.marks.npy") as f:  # written last: its presence says the pair is whole
        np.save(f, np.concatenate(marks) if marks else np.zeros(0, np.int64), allow_pickle=False)
    return [len(table), int(steps.sum()), dropped]


def _stop_or_skip(failed: dict[str, str], skip_bad: bool, quiet: bool) -> None:
    """Shards that could not be read (shard -> why): the run stops with one line naming the first, or with
    `skip_bad` they are left out, each named in a warning (said once, where the index is built: the first rank)."""
    if failed and not skip_bad:
        why = next(iter(failed.values()))
        raise SodaError(f"{why}; remove it from the data, or pass --skip-bad-shards to train without it"
                        + (f" ({len(failed) - 1} more unreadable)" if len(failed) > 1 else ""))
    for why in failed.values() if not quiet else ():
        print(f"soda-train: warning: skipping {why}", file=sys.stderr)


def _index_one(shard: str, key: str, cache: Path) -> list[int] | str:
    """Index one shard (its `shard_key` is `key`) into the cache: [documents, tokens], or why it cannot be read."""
    try:
        path = _download(shard, cache) if is_url(shard) else shard
        table = index_shard(path)
    except BadShard as e:
        return str(e)
    with atomic_file(cache / f"{key}.npy") as f:
        np.save(f, table, allow_pickle=False)
    return [len(table), int(table["length"].sum())]


def _local_copy(url: str, cache: Path) -> str:
    return str(cache / "shards" / f"{shard_key(url)}.tar")  # a URL's key is itself: no I/O


def _download(url: str, cache: Path) -> str:
    path = Path(_local_copy(url, cache))
    if not path.is_file():
        try:
            with open_shard(url) as stream, atomic_file(path) as f:
                shutil.copyfileobj(stream, f, 1 << 20)
        except OSError as e:
            raise BadShard(f"shard {url} cannot be fetched ({e})") from None
        except Exception as e:  # noqa: BLE001 -- whatever the scheme's opener raises names the shard here
            raise BadShard(f"shard {url} cannot be fetched ({type(e).__name__}: {e})") from None
    return str(path)


def _read_summary(cache: Path) -> dict:
    try:
        return json.loads((cache / SUMMARY).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_summary(cache: Path, summary: dict) -> None:
    """Merged with what another rank may have written meanwhile (every entry is a fact about one shard)."""
    atomic_write_json(cache / SUMMARY, _read_summary(cache) | summary)
