"""Generation speed: audio-seconds generated per wall-second, with and without the KV cache, for the flat family,
the hierarchical family (soda.hierarchical: one backbone step per frame + a depth pass) or both side by side.

    python benchmarks/generate_throughput.py                              # tiny model, CPU
    python benchmarks/generate_throughput.py --size 135m --seconds 3      # SODA's smallest shape
    python benchmarks/generate_throughput.py --size 600m --device cuda --batch 16 --seconds 20
    python benchmarks/generate_throughput.py --family both --skip-no-cache    # flat vs hierarchical, < 1 min on CPU

A random-init Qwen3 of the preset's shape, on a vocabulary with SODA's audio layout (8 codebooks of
2048; byte-level text, so the LM head is 16,646 wide rather than SODA's 144,644), continues a
`--prompt-seconds` audio prompt for `--seconds` (greedy, so both modes generate the same tokens; the
silence detector is off and a random model rarely emits <|audio_end|>, so outputs run to the cap).
Without the cache every step recomputes the whole sequence, so its cost grows with the length.

`--family hierarchical` / `both`: a random HierarchicalModel whose backbone is the preset's shape (the depth
decoder by `soda.shape.HierarchicalShape`'s rule: half the width, 4 layers), decoded by
`soda.generate.hierarchical` on the same requests. The FLOPs column is analytic (forward, KV-cached, at the mean
attended context: `soda.generate.hierarchical.decoding_flops_per_audio_second`); the speed columns are measured.
On CPU with tiny sizes the figures demonstrate the pipeline: per-call overhead, not FLOPs, sets the wall time.
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
from soda.generate.hierarchical import decoding_flops_per_audio_second, generate_hierarchical  # noqa: E402
from soda.generate.prompts import GenerationSettings, Request  # noqa: E402
from soda.hierarchical import HierarchicalConfig, HierarchicalModel  # noqa: E402
from soda.model import build_model  # noqa: E402
from soda.shape import SIZES, ModelShape  # noqa: E402
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
    p.add_argument("--family", default="flat", choices=["flat", "hierarchical", "both"],
                   help="which model family to decode (both: side by side at the same backbone shape)")
    return p.parse_args()


def build(family: str, size: str, vocab, device, seq_len: int):
    """A random-init model of `family` with the preset's (backbone) shape, in eval mode, and a decode function."""
    shape = ModelShape(*SIZES[size], vocab=vocab.size, seq_len=seq_len)
    if family == "flat":
        model = build_model(shape, vocab, seed=0).to(device, default_dtype(device)).eval()
    else:
        torch.manual_seed(0)
        model = HierarchicalModel(HierarchicalConfig.from_vocab(shape, vocab)).to(device, default_dtype(device)).eval()
    return model, decoder_for(family, model, vocab, device, f"random {size}")


def decoder_for(family: str, model, vocab, device, label: str = "model"):
    """`run(requests, settings) -> results`: the decoder of `family` (soda.generate's for flat, soda.generate.
    hierarchical's) on `model`, an eval-mode model on `device` (random here; a trained one in family_comparison)."""
    if family == "flat":
        loaded = LoadedModel(model, vocab, None, "none", label, device)
        return lambda requests, settings: generate(loaded, requests, settings)
    return lambda requests, settings: generate_hierarchical(model, vocab, requests, settings)


def time_decoding(run, requests, settings, repeat: int, device) -> tuple[float, list]:
    """(best wall seconds of `repeat` timed runs, the last run's results), after one short warm-up call."""
    run(requests[:1], GenerationSettings(**{**vars(settings), "max_seconds": 0.16}))
    best, outputs = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = run(requests, settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, outputs


def continuation_requests(n: int, frames: int, codebooks: int = 8, codebook_size: int = 2048) -> list[Request]:
    """`n` continuation requests, each a seeded random audio prompt of `frames` frames (codes, no codec needed)."""
    rng = np.random.default_rng(0)
    return [Request("continue", audio=rng.integers(0, codebook_size, (codebooks, frames))) for _ in range(n)]


def model_steps(family: str, outputs) -> int:
    """Model steps taken: a flat token each; hierarchical: a backbone step per frame or text/special id."""
    steps = sum(len(r.ids) for r in outputs)
    if family == "hierarchical":
        steps -= sum(7 * r.codes.shape[1] for r in outputs if r.codes is not None)
    return steps


def main() -> None:
    args = parse()
    device = resolve_device(args.device)
    vocab = Vocabulary.build(byte_tokenizer(), 8, 2048)
    frames = int(args.prompt_seconds * 12.5)
    requests = continuation_requests(args.batch, frames)
    families = ["flat", "hierarchical"] if args.family == "both" else [args.family]
    seq_len = 8 * (frames + int(args.seconds * 12.5) + 2)
    print(f"# {args.size} backbone, vocabulary {vocab.size:,}, {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start), "
          f"{default_dtype(device)}; batch {args.batch}, prompt {args.prompt_seconds} s, generate {args.seconds} s"
          + ("; CPU: a pipeline demonstration, not a speed claim" if device.type == "cpu" else ""))
    print("| family | parameters | KV cache | audio s generated | wall s | audio s / wall s | steps / s "
          "| forward GFLOP / audio s |")
    print("|---|---|---|---|---|---|---|---|")
    cached = {}
    for family in families:
        model, run = build(family, args.size, vocab, device, seq_len)
        hshape = HierarchicalConfig.from_vocab(ModelShape(*SIZES[args.size]), vocab).shape
        # mean attended context while generating: the prompt and half the output (frames)
        flops = decoding_flops_per_audio_second(hshape, frames + args.seconds * 12.5 / 2)[family]
        n_params = sum(p.numel() for p in model.parameters())
        for cache in ([True] if args.skip_no_cache else [True, False]):
            settings = GenerationSettings(temperature=0, max_seconds=args.seconds, silence_seconds=0, use_cache=cache,
                                          batch_size=args.batch)
            best, outputs = time_decoding(run, requests, settings, args.repeat, device)
            audio = sum(r.seconds for r in outputs)
            steps = model_steps(family, outputs)
            if cache:
                cached[family] = audio / best
            print(f"| {family} | {n_params / 1e6:.1f}M | {'yes' if cache else 'no'} | {audio:.1f} | {best:.2f} "
                  f"| {audio / best:.2f} | {steps / best:,.0f} | {flops / 1e9:.3g} |")
            if not cache:
                print(f"KV cache speed-up ({family}): {cached[family] / (audio / best):.1f}x")
    if len(cached) == 2:
        ratio = decoding_flops_per_audio_second(hshape, frames + args.seconds * 12.5 / 2)
        print(f"hierarchical vs flat (KV-cached): {cached['hierarchical'] / cached['flat']:.2f}x audio s / wall s, "
              f"{ratio['flat'] / ratio['hierarchical']:.2f}x fewer forward FLOPs per audio second")
        context = frames + args.seconds * 12.5 / 2
        print(f"\nAnalytic forward GFLOP per audio second, KV-cached, {context:g} frames of context, this vocabulary:")
        print("| backbone | flat | hierarchical | flat / hierarchical |")
        print("|---|---|---|---|")
        for size in SIZES:
            f = decoding_flops_per_audio_second(HierarchicalConfig.from_vocab(ModelShape(*SIZES[size]), vocab).shape,
                                                context)
            print(f"| {size} | {f['flat'] / 1e9:.3g} | {f['hierarchical'] / 1e9:.3g} "
                  f"| {f['flat'] / f['hierarchical']:.2f} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
