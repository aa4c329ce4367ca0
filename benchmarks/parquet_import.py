"""SODA-string import speed: tokens converted per second, per core and with --workers processes.

Writes a synthetic corpus in SODA's released format (parquet, one document per row, text-first and
audio-first forms of each recording, 8 Mimi codebooks, ~5 s utterances with ~15-word transcripts), then
times (1) the conversion alone in this process (`parse_soda_string` + `document_ids`, no I/O: the per-core
rate) and (2) the whole `soda-tokenize soda:...` run (reading parquet, converting, writing shards and the
manifest) with each `--workers` count, checking that every count writes the same shards.

Reproduce (from the repository root; offline, byte-level text tokenizer by default):

    python benchmarks/parquet_import.py                          # 2000 recordings (~9M tokens), --workers 1 and 2
    python benchmarks/parquet_import.py --recordings 4000 --workers 1,4,16
    python benchmarks/parquet_import.py --text-tokenizer /path/to/llama3/tokenizer.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenize_audio.cli import main as soda_tokenize  # noqa: E402
from tokenize_audio.soda_format import document_ids, parse_soda_string  # noqa: E402
from tokenize_audio.vocab import AUDIO_END, AUDIO_START, BOS, EOS, TEXT_END, TEXT_START, Vocabulary, load_text_tokenizer

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def synthetic_rows(recordings: int, utterances: int, seconds: float, seed: int = 0) -> list[str]:
    """Both SODA forms of `recordings` documents with random codes and words."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * 12.5)
    rows = []
    for _ in range(recordings):
        pairs = []
        for _ in range(utterances):
            text = " ".join(rng.choice(WORDS, 15))
            codes = rng.integers(0, 2048, (frames, 8)) + np.arange(8) * 2048 + 0xE000
            pairs.append((text, "".join(map(chr, codes.reshape(-1)))))
        t = "".join(f"{TEXT_START}{x}{TEXT_END}{AUDIO_START}{a}{AUDIO_END}" for x, a in pairs)
        a = "".join(f"{AUDIO_START}{a}{AUDIO_END}{TEXT_START}{x}{TEXT_END}" for x, a in pairs)
        rows += [BOS + t + EOS, BOS + a + EOS]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recordings", type=int, default=2000)
    p.add_argument("--utterances", type=int, default=4, help="utterances per recording (default 4)")
    p.add_argument("--seconds", type=float, default=5.0, help="audio seconds per utterance (default 5)")
    p.add_argument("--workers", default="1,2", help="comma list of --workers counts to time (default 1,2)")
    p.add_argument("--text-tokenizer", default="bytes")
    p.add_argument("--texts-per-shard", type=int, default=100)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = synthetic_rows(args.recordings, args.utterances, args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        half = len(rows) // 2
        for i, part in enumerate((rows[:half], rows[half:])):
            pq.write_table(pa.table({"text": part}), data / f"part-{i}.parquet", row_group_size=256)

        vocab = Vocabulary.build(load_text_tokenizer(args.text_tokenizer, iter(WORDS)), 8, 2048, (0,), args.text_tokenizer)
        started = time.perf_counter()
        tokens = sum(len(document_ids(vocab, parse_soda_string(r))) for r in rows)
        convert = time.perf_counter() - started
        print(f"{len(rows)} documents, {tokens:,} tokens ({tokens / len(rows):,.0f} per document), "
              f"text tokenizer {args.text_tokenizer}, {os.cpu_count()} CPUs\n")
        print("| what | wall s | tokens/s | tokens/s per core |\n|---|---:|---:|---:|")
        print(f"| conversion only, 1 process | {convert:.2f} | {tokens / convert:,.0f} | {tokens / convert:,.0f} |")
        digests = set()
        for workers in (int(w) for w in args.workers.split(",")):
            out = Path(tmp) / f"out-{workers}"
            started = time.perf_counter()
            soda_tokenize([f"soda:{data}", "--out", str(out), "--text-tokenizer", args.text_tokenizer, "--quiet",
                           "--workers", str(workers), "--texts-per-shard", str(args.texts_per_shard)])
            wall = time.perf_counter() - started
            print(f"| soda-tokenize --workers {workers} (read, convert, write) | {wall:.2f} | {tokens / wall:,.0f} "
                  f"| {tokens / wall / workers:,.0f} |")
            digests.add(hashlib.sha1(b"".join(p.read_bytes() for p in sorted(out.glob("*.tar")))).hexdigest())
        print(f"\nshards identical across worker counts: {len(digests) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
