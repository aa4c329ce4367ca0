"""Codec throughput: audio-seconds encoded per wall-second, batched vs one file at a time.

Measures only the codec wrapper (`tokenize_audio.codecs.Codec`): audio is read, resampled and
trimmed to whole codec frames (as the pipeline does) before the clock starts. For each codec it
times `codec.encode` per file ("one-by-one") and `codec.encode_batch` over duration-sorted batches
of at most `--batch-seconds` padded audio ("batched", the pipeline's batching rule), checks that
both give the same codes, and prints a Markdown table.

Reproduce (from the repository root):

    python benchmarks/tokenize_throughput.py                                  # small random Mimi + EnCodec
    python benchmarks/tokenize_throughput.py --codecs mimi:random-full --limit 40
    python benchmarks/tokenize_throughput.py --codecs mimi:random-full --device cuda --repeat 8   # GPU
    python benchmarks/tokenize_throughput.py --codecs mimi --device cuda      # real kyutai/mimi (hub access)

Random codecs need no downloads (set HF_HUB_OFFLINE=1 to be sure); `mimi:/path` reads a local copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenize_audio.audio import load_audio  # noqa: E402
from tokenize_audio.codecs import load_codec  # noqa: E402
from tokenize_audio.errors import SodaError  # noqa: E402
from tokenize_audio.sources import AUDIO_EXTENSIONS  # noqa: E402

DEFAULT_AUDIO = Path(__file__).resolve().parents[1] / "demo" / "corpus" / "speech"


def timed(fn, device):
    """Run fn() and return (result, wall seconds), synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def batches(waves, limit):
    """Indices in duration order, grouped so that n * longest <= limit samples (the pipeline's rule)."""
    batch = []
    for i in sorted(range(len(waves)), key=lambda i: len(waves[i])):
        if batch and len(waves[i]) * (len(batch) + 1) > limit:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def encode_batched(codec, waves, batch_seconds):
    codes = [None] * len(waves)
    for idx in batches(waves, max(1, int(batch_seconds * codec.sample_rate))):
        for i, c in zip(idx, codec.encode_batch([waves[i] for i in idx])):
            codes[i] = c
    return codes


def bench(spec, files, args):
    codec = load_codec(spec, args.codebooks, args.device)
    spf, sr = codec.samples_per_frame, codec.sample_rate
    waves = [load_audio(f, sr) for f in files]
    waves = [w[: len(w) // spf * spf] for w in waves if len(w) >= spf]
    audio_s = sum(len(w) for w in waves) / sr
    codec.encode(waves[0]), codec.encode_batch(waves[:4])  # warm-up (kernels, allocator)
    single, t_single = timed(lambda: [codec.encode(w) for w in waves], codec.device)
    batched, t_batched = timed(lambda: encode_batched(codec, waves, args.batch_seconds), codec.device)
    equal = sum(int((a == b).sum()) for a, b in zip(single, batched)) / sum(a.size for a in single)
    base = dict(spec=spec, codec=codec.describe()["label"], device=str(codec.device),
                threads=torch.get_num_threads(), files=len(waves), audio_s=round(audio_s, 2))
    return [dict(base, mode=mode, wall_s=round(t, 3), audio_s_per_s=round(audio_s / t, 2),
                 speedup=round(t_single / t, 2), codes_equal=round(equal, 6))
            for mode, t in (("one-by-one", t_single), ("batched", t_batched))]


def markdown(rows):
    cols = ["codec", "device", "mode", "files", "audio_s", "wall_s", "audio_s_per_s", "speedup", "codes_equal"]
    heads = ["codec", "device", "mode", "files", "audio s", "wall s", "audio-s / wall-s",
             "speed-up vs one-by-one", "batched codes == one-by-one"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r[c] for c in cols]
        cells[1] = f"{r['device']} ({r['threads']} threads)" if r["device"] == "cpu" else r["device"]
        cells[-1] = f"{r['codes_equal']:.2%}" if r["mode"] == "batched" else "(reference)"
        cells[-2] = f"{r['speedup']:.2f}x"
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--codecs", default="mimi:random,encodec:random",
                   help="comma-separated codec specs: mimi, mimi:random, mimi:random-full, encodec:random, mimi:/dir")
    p.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="folder searched recursively for audio files")
    p.add_argument("--limit", type=int, default=0, help="use only the first N files (0 = all)")
    p.add_argument("--repeat", type=int, default=1, help="tile the file list R times for a longer run")
    p.add_argument("--batch-seconds", type=float, default=120.0, help="max padded audio seconds per batch")
    p.add_argument("--codebooks", type=int, default=8, help="codebooks to keep")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = p.parse_args(argv)

    files = sorted(f for f in args.audio.rglob("*") if f.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        p.error(f"no audio files under {args.audio}")
    files = (files[: args.limit] if args.limit > 0 else files) * max(1, args.repeat)
    rows = []
    for spec in filter(None, (s.strip() for s in args.codecs.split(","))):
        try:
            rows += bench(spec, files, args)
        except SodaError as err:
            p.exit(2, f"error: {err}\n")
        print(f"done: {spec}", file=sys.stderr)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
