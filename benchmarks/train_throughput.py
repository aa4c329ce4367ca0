"""Training throughput: soda-train's Lightning step vs a bare PyTorch loop, and the data loader alone.

    python benchmarks/train_throughput.py --data runs/demo/tokens                       # CPU, tiny model
    python benchmarks/train_throughput.py --data TOKENS --size 135m --seq-len 4096 --micro-batch 8 --compile  # GPU

Both loops run the same model, loss (next-token NLL + z-loss over packed windows with document
masks), cautious AdamW, gradient clipping and data; the difference is the framework's overhead.
The loader line shows how many tokens/s the streaming pipeline can supply, to compare with what
the model consumes. On a GPU it also prints MFU (analytic FLOPs incl. attention and the LM head,
over the bf16 dense peak from Lightning's device table, or --peak-flops) and peak GPU memory.
`--attention` and `--compile` are soda-train's own flags (auto attention: flex on GPU, sdpa on CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soda.model import build_model, default_attention, prepare_for_training  # noqa: E402
from soda.shape import training_flops_per_token  # noqa: E402
from soda.train.config import make_config  # noqa: E402
from soda.train.datamodule import training_loader  # noqa: E402
from soda.train.loss import lm_loss  # noqa: E402
from soda.train.module import SodaModule  # noqa: E402
from soda.train.optim import CautiousAdamW, param_groups  # noqa: E402
from soda.train.sources import resolve_sources  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a soda-tokenize output directory")
    p.add_argument("--size", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--peak-flops", type=float, help="per-device peak FLOP/s for MFU")
    p.add_argument("--attention", default="auto", help="auto (flex_attention on GPU, sdpa on CPU), sdpa, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the layers and the loss (soda-train --compile)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in the backward pass")
    p.add_argument("--vocab-size", type=int, help="model vocabulary (default: the data's; e.g. 144644, SODA's, "
                                                  "whose LM head is much of a small model's FLOPs)")
    p.add_argument("--skip-bare", action="store_true", help="time only the loader and soda-train's step")
    return p.parse_args()


def setup(args):
    sources, vocab = resolve_sources([f"speech={args.data}", f"text={args.data}"], [], {"speech": 0.95, "text": 0.05},
                                     None)
    cfg = make_config({"size": args.size, "seq_len": args.seq_len, "batch_tokens": args.micro_batch * args.seq_len,
                       "tokens": 10**12, "lr": 1e-3, "workers": args.workers, "data": [args.data]})
    if args.vocab_size is not None and args.vocab_size < vocab.size:
        sys.exit(f"--vocab-size {args.vocab_size}: the data's vocabulary has {vocab.size:,} ids")
    shape = cfg.shape(args.vocab_size or vocab.size)
    return cfg, sources, vocab, shape


def loader(cfg, sources, vocab, micro):
    import tempfile

    index = Path(tempfile.mkdtemp(prefix="soda-bench-index-"))  # the shard index, as a run keeps in RUN/data_index
    return training_loader(sources, cfg.seq_len, cfg.seed, micro, cfg.workers, index, vocab.size)


def bench_loader(cfg, sources, vocab, micro, batches: int) -> float:
    it = iter(loader(cfg, sources, vocab, micro))
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * micro * cfg.seq_len / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_model(cfg, vocab, shape, args, device):
    attention = args.attention if args.attention != "auto" else default_attention(device.type)
    model = build_model(shape, vocab, cfg.seed, attention=attention)
    prepare_for_training(model, args.activation_checkpointing, args.compile)
    return model


def bench_bare(cfg, sources, vocab, shape, args, device, dtype, precision) -> float:
    model = make_model(cfg, vocab, shape, args, device).to(device)
    opt = CautiousAdamW(param_groups(model, cfg.weight_decay), lr=1e-3, betas=cfg.betas, eps=cfg.eps)
    it = iter(loader(cfg, sources, vocab, args.micro_batch))
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = lm_loss(model, batch, cfg.z_loss)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return args.steps * args.micro_batch * cfg.seq_len / (time.perf_counter() - start)


def bench_lightning(cfg, sources, vocab, shape, args, device, dtype, precision) -> float:
    import lightning as L

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == args.warmup:
                sync(trainer.strategy.root_device)
                self.start = time.perf_counter()

        def on_train_end(self, trainer, *_):
            sync(trainer.strategy.root_device)
            self.end = time.perf_counter()

    clock = Clock()
    model = make_model(cfg, vocab, shape, args, device)
    module = SodaModule(model, cfg, vocab, steps=10**6, micro_per_step=1,
                        flops_per_token=training_flops_per_token(shape))
    trainer = L.Trainer(accelerator="auto", devices=1, precision=precision, max_steps=args.warmup + args.steps,
                        max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock], num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=loader(cfg, sources, vocab, args.micro_batch))
    return args.steps * args.micro_batch * cfg.seq_len / (clock.end - clock.start)


def main() -> None:
    args = parse()
    cfg, sources, vocab, shape = setup(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    per_token = training_flops_per_token(shape)
    peak = args.peak_flops
    if peak is None and device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        peak = get_available_flops(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model {args.size} ({shape.width}x{shape.layers}, vocab {shape.vocab:,}); seq "
          f"{cfg.seq_len}, micro-batch {args.micro_batch}; {precision}; {per_token / 1e6:.1f} MFLOP/token")
    attention = args.attention if args.attention != "auto" else default_attention(device.type)
    print(f"attention: {attention}; {'torch.compile (layers and loss)' if args.compile else 'eager'}"
          f"{'; activation checkpointing' if args.activation_checkpointing else ''}")
    rows = [("data loader alone", bench_loader(cfg, sources, vocab, args.micro_batch, 50), None)]
    runs = [] if args.skip_bare else [("bare PyTorch loop", bench_bare)]
    runs.append(("soda-train (Lightning)", bench_lightning))
    for label, bench in runs:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tps = bench(cfg, sources, vocab, shape, args, device, dtype, precision)
        rows.append((label, tps, torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None))
    print(f"{'':<24}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    for label, tps, mem in rows:
        mfu = f"{tps * per_token / peak:.1%}" if peak and label != rows[0][0] else "-"
        print(f"{label:<24}{tps:>12,.0f}{mfu:>8}{f'{mem:.1f}' if mem is not None else '-':>10}")
    if len(rows) == 3:
        print(f"Lightning / bare: {rows[2][1] / rows[1][1]:.2f}x", end="; ")
    print(f"loader / model: {rows[0][1] / rows[-1][1]:.1f}x")


if __name__ == "__main__":
    main()
