"""The LM-head loss three ways: full logits (HF's way), soda's chunked loss, and chunked + torch.compile.

    python benchmarks/lm_loss.py                                   # CPU: 2,048 tokens, width 256
    python benchmarks/lm_loss.py --tokens 32768 --width 512        # GPU: one 8 x 4096 micro-batch of 135m

Each variant runs forward + backward of the loss (mean NLL + z-loss over SODA's 144,644-id
vocabulary) from random hidden states in its own process, and prints seconds per iteration and
peak memory (CUDA's allocator peak on a GPU; the process's peak resident set on the CPU, which
includes the ~0.3 GB of an imported torch).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("full-logits", "chunked", "chunked+compile")


def one(args) -> dict:
    import torch

    from soda.train.loss import chunked_lm_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.width, device=device, generator=g, requires_grad=True)
    weight = (torch.randn(args.vocab, args.width, device=device, generator=g) / args.width**0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    valid = torch.ones(args.tokens, dtype=torch.bool, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if args.variant == "full-logits":
                logits = torch.nn.functional.linear(hidden, weight).float()
                lse = torch.logsumexp(logits, -1)
                loss = (lse - logits.gather(-1, targets[:, None]).squeeze(-1)).mean() + 1e-4 * lse.square().mean()
            else:
                loss = chunked_lm_loss(hidden, weight, targets, valid, 1e-4,
                                       compiled=args.variant == "chunked+compile")[0]
        loss.backward()
        hidden.grad = weight.grad = None

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.variant, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "seconds": seconds, "peak_gib": peak / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=144_644)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    args = p.parse_args()
    if args.variant:
        print(json.dumps(one(args)))
        return
    print(f"{args.tokens:,} tokens x width {args.width} -> vocabulary {args.vocab:,}; forward + backward")
    print(f"{'variant':<18}{'s / iteration':>15}{'peak GiB':>10}")
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{variant:<18} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{variant:<18}{r['seconds']:>15.3f}{r['peak_gib']:>10.2f}")


if __name__ == "__main__":
    main()
