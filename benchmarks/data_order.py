"""The global window order's cost: indexing a corpus, and one rank's loader throughput at several GPU counts.

    python benchmarks/data_order.py [--shards 64] [--docs 200] [--doc-tokens 2000] [--seq-len 4096]

Writes a synthetic corpus of uint32 shards into a temporary directory, indexes it as soda-train does at the first
start (`OUT/data_index`), then times rank 0's loader (micro-batches of 8 windows, 0 and 2 workers) as one of 1, 8
and 64 ranks: a rank reads only its own slice of each step, so its throughput should not fall as ranks are added.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soda.train.data import Layout, TrainWindows  # noqa: E402
from soda.train.datamodule import loader  # noqa: E402
from soda.train.index import index_sources  # noqa: E402
from soda.train.sources import Source  # noqa: E402
from tokenize_audio.shards import write_shard  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--docs", type=int, default=200, help="documents per shard")
    p.add_argument("--doc-tokens", type=int, default=2000, help="mean document length (uniform over 2/3 to 4/3 of it)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batches", type=int, default=40, help="micro-batches timed per setting")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soda-data-order-"))
    rng = np.random.default_rng(0)
    shards = []
    for s in range(args.shards):
        lengths = rng.integers(args.doc_tokens * 2 // 3, args.doc_tokens * 4 // 3, args.docs)
        path = tmp / f"train-{s:05d}.tar"
        write_shard(path, [(f"d{s}_{i}", rng.integers(0, 16000, n, dtype=np.uint32), {}) for i, n in enumerate(lengths)])
        shards.append(str(path))
    source = Source("corpus", shards, weight=1.0)
    start = time.perf_counter()
    train, _ = index_sources([source], tmp / "data_index", quiet=True)
    took = time.perf_counter() - start
    total = train[0].total
    print(f"corpus: {args.shards} shards, {args.shards * args.docs:,} documents, {total / 1e6:,.1f}M tokens; "
          f"indexed in {took:.2f} s ({args.shards / took:,.0f} shards/s)")
    micro = 8
    print(f"| ranks | workers | one rank's windows/s | one rank's tokens/s |\n|---:|---:|---:|---:|")
    for world in (1, 8, 64):
        for workers in (0, 2):
            windows = TrainWindows(train, [1.0], args.seq_len, 0, Layout(world * micro, micro, 1, 0, world))
            it = iter(loader(windows, micro, workers))
            next(it)
            start = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            rate = args.batches * micro / (time.perf_counter() - start)
            print(f"| {world} | {workers} | {rate:,.0f} | {rate * args.seq_len / 1e6:,.1f}M |")
            del it


if __name__ == "__main__":
    main()
