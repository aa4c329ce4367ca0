"""Generation speed: audio-seconds generated per wall-second, with and without the KV cache.

    python benchmarks/generate_throughput.py                              # tiny model, CPU
    python benchmarks/generate_throughput.py --size 135m --seconds 3      # SODA's smallest shape
    python benchmarks/generate_throughput.py --size 600m --device cuda --batch 16 --seconds 20

A random-init Qwen3 of the preset's shape, on a vocabulary with SODA's audio layout (8 codebooks of
2048; byte-level text, so the LM head is 16,646 wide rather than SODA's 144,644), continues a
`--prompt-seconds` audio prompt for `--seconds` (greedy, so both modes generate the same tokens; the
silence detector is off and a random model rarely emits <|audio_end|>, so outputs run to the cap).
Without the cache every step recomputes the whole sequence, so its cost grows with the length.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soda.checkpoints import LoadedModel, default_dtype  # noqa: E402
from soda.generate.decode import generate  # noqa: E402
from soda.generate.prompts import GenerationSettings, Request  # noqa: E402
from soda.model import build_model  # noqa: E402
from soda.shape import (
    SIZES,  # noqa: E402
    ModelShape,  # noqa: E402
)
from tokenize_audio.codecs import resolve_device  # noqa: E402
from tokenize_audio.vocab import Vocabulary, byte_tokenizer  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--seconds", type=float, default=5.0, help="audio to generate per request")
    p.add_argument("--prompt-seconds", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=4, help="requests decoded together")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per mode (best is reported)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-no-cache", action="store_true", help="only time the cached decoder")
    return p.parse_args()


def main() -> None:
    args = parse()
    device = resolve_device(args.device)
    vocab = Vocabulary.build(byte_tokenizer(), 8, 2048)
    shape = ModelShape(*SIZES[args.size], vocab=vocab.size)
    model = build_model(shape, vocab, seed=0).to(device, default_dtype(device)).eval()
    loaded = LoadedModel(model, vocab, None, "none", f"random {args.size}", device)
    rng = np.random.default_rng(0)
    frames = int(args.prompt_seconds * 12.5)
    requests = [Request("continue", audio=rng.integers(0, 2048, (8, frames))) for _ in range(args.batch)]
    print(f"# {args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary "
          f"{vocab.size:,}), {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f} at start), {model.dtype}; batch {args.batch}, "
          f"prompt {args.prompt_seconds} s, generate {args.seconds} s")
    print("| KV cache | audio s generated | wall s | audio s / wall s | tokens / s |")
    print("|---|---|---|---|---|")
    figures = {}
    for cache in ([True] if args.skip_no_cache else [True, False]):
        settings = GenerationSettings(temperature=0, max_seconds=args.seconds, silence_seconds=0, use_cache=cache,
                            batch_size=args.batch)
        generate(loaded, requests[:1], GenerationSettings(**{**vars(settings), "max_seconds": 0.16}))  # warm-up
        best, outputs = float("inf"), None
        for _ in range(args.repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs = generate(loaded, requests, settings)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        audio = sum(r.seconds for r in outputs)
        tokens = sum(len(r.ids) for r in outputs)
        figures[cache] = audio / best
        print(f"| {'yes' if cache else 'no'} | {audio:.1f} | {best:.2f} | {audio / best:.2f} | {tokens / best:,.0f} |")
    if len(figures) == 2:
        print(f"KV cache speed-up: {figures[True] / figures[False]:.1f}x")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
