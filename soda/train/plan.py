"""The plan of a run before it starts: devices, batch layout, memory, FLOPs and wall-clock (`--dry-run`)."""

from __future__ import annotations

import dataclasses

from soda.shape import (SODA_VOCAB, HierarchicalShape, ModelShape, hierarchical_params,
                        hierarchical_training_flops_per_step, params, training_flops_per_token)
from soda.train.config import TrainConfig
from soda.train.optim import STATE_BYTES_PER_PARAMETER, schedule_phases
from tokenize_audio.errors import SodaError


def world_size(cfg: TrainConfig) -> int:
    import torch

    n = cfg.device_count
    if n is None:
        n = torch.cuda.device_count() if cfg.uses_gpu() else 1
    return n * cfg.num_nodes


def batch_layout(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro-batch sequences per device, gradient-accumulation steps) that make the global batch exactly."""
    batch = cfg.batch_sequences
    if batch % world:
        raise SodaError(f"the global batch of {batch} sequences does not split over {world} devices; change "
                        f"--batch-tokens (a multiple of {world} x {cfg.seq_len} tokens)")
    per_device = batch // world
    micro = cfg.micro_batch or per_device
    if per_device % micro:
        raise SodaError(f"--micro-batch {micro} does not divide the {per_device} sequences each device gets per "
                        f"step; choose a divisor of {per_device}")
    return micro, per_device // micro


def flops_per_token_of(cfg: TrainConfig, shape: ModelShape | HierarchicalShape) -> float:
    """Training FLOPs (3 x forward) per unit of a window (what MFU and --dry-run count): a flat token, or a
    hierarchical step (its windows count steps), charged one backbone step and one depth pass (every step a frame:
    text steps skip the depth pass, so a text share is over-counted by the depth decoder's share)."""
    if isinstance(shape, ModelShape):
        return training_flops_per_token(shape, "3x-forward")
    steps = dataclasses.replace(shape, backbone=dataclasses.replace(shape.backbone, seq_len=cfg.seq_len))
    return hierarchical_training_flops_per_step(steps, "3x-forward", frames_per_step=1.0)


def model_params(shape: ModelShape | HierarchicalShape, definition: str = "total") -> int:
    return params(shape, definition) if isinstance(shape, ModelShape) else hierarchical_params(shape, definition)


def width_of(shape: ModelShape | HierarchicalShape) -> int:
    """The width SODA's LR rule reads: the model's, or the hierarchical backbone's."""
    return shape.width if isinstance(shape, ModelShape) else shape.backbone.width


def describe_shape(shape: ModelShape | HierarchicalShape) -> str:
    from soda.model import describe

    if isinstance(shape, ModelShape):
        return describe(shape)
    b = shape.backbone
    return (f"hierarchical: backbone width {b.width}, {b.layers} layers, {b.heads} heads ({b.kv_heads} kv, dim "
            f"{b.head_dim}), FFN {b.ffn}, input table {b.vocab:,} ids, unified head {shape.unified_vocab:,}; depth "
            f"decoder width {shape.depth_width}, {shape.depth_layers} layers, {shape.depth_heads} heads, FFN "
            f"{shape.depth_ffn}, {shape.n_codebooks - 1} heads of {shape.codebook_size}; "
            f"{hierarchical_params(shape) / 1e6:,.1f}M parameters "
            f"({hierarchical_params(shape, 'non-embedding') / 1e6:,.1f}M non-embedding)")


def model_label(cfg: TrainConfig) -> str:
    if cfg.init_from:
        return f"from {cfg.init_from}"
    return f"sweep width {cfg.sweep_width}" if cfg.sweep_width else (cfg.size or "custom shape")


def memory_line(parameters: int, world: int) -> str:
    """Memory per device for the model's state under DDP (replicated) and FSDP (sharded over the ranks)."""
    state = parameters * STATE_BYTES_PER_PARAMETER / 2**30
    split = f" with DDP, {state / world:,.1f} GiB with --strategy fsdp over {world} devices" if world > 1 else ""
    return (f"memory per device for weights, gradients and AdamW moments (fp32, {STATE_BYTES_PER_PARAMETER} B per "
            f"parameter): {state:,.1f} GiB{split}; activations and bf16 working copies come on top (they "
            f"grow with --micro-batch x --seq-len; --activation-checkpointing shrinks them)")


def audio_line(tokens: int, codec_rate: float | None, audio_tokens_per_second: float = 100.0) -> str:
    """How much raw audio the run's tokens stand for, and the codec GPU-hours to tokenize it. An upper bound: every
    token counted as audio at Mimi's 8 x 12.5 tokens per second (text, markers and a text share need less)."""
    hours = tokens / audio_tokens_per_second / 3600
    line = (f"raw audio for {tokens / 1e9:,.1f}B tokens: at most {hours:,.0f} hours (every token audio, "
            f"{audio_tokens_per_second:g} tokens per audio-second)")
    if codec_rate is None:
        return line + "; give --codec-rate (audio-s per GPU-s) for the GPU-hours to tokenize it"
    if not codec_rate > 0:
        raise SodaError(f"--codec-rate {codec_rate}: give audio-seconds per GPU-second, e.g. 2000")
    return line + f"; tokenizing it: {hours / codec_rate:,.1f} GPU-hours at {codec_rate:g} audio-s per GPU-s"


def dry_run(cfg: TrainConfig, mfu: float, codec_rate: float | None = None) -> int:
    from soda.train.callbacks import NAMED_GPUS

    if not 0 < mfu <= 1:
        raise SodaError(f"--mfu {mfu}: give a fraction in (0, 1], e.g. 0.4")
    vocab_size, codebooks = SODA_VOCAB, (8, 2048)
    if cfg.data:
        from soda.train.sources import resolve_sources

        vocab = resolve_sources(cfg.data, cfg.val_data, cfg.mix, cfg.vocab)[1]
        vocab_size, codebooks = vocab.size, (vocab.n_codebooks, vocab.codebook_size)
    shape = cfg.shape(vocab_size)
    if cfg.architecture == "hierarchical":
        shape = HierarchicalShape(shape, *codebooks, depth_width=cfg.depth_width, depth_layers=cfg.depth_layers)
    world = world_size(cfg)
    micro, accumulate = batch_layout(cfg, world)
    steps = cfg.steps
    tokens = steps * cfg.batch_sequences * cfg.seq_len
    per_token = flops_per_token_of(cfg, shape)
    total = per_token * tokens
    phases = schedule_phases(steps, cfg.warmup, cfg.decay, cfg.schedule)
    flat = isinstance(shape, ModelShape)
    unit = "tokens" if flat else "steps"
    counted = (f"FLOPs per token (training, 3 x forward incl. attention at seq {cfg.seq_len} and the LM head)"
               if flat else
               f"FLOPs per step (training, 3 x forward: a backbone step attending over {cfg.seq_len} steps and a "
               f"depth pass over {shape.n_codebooks} codebooks, as if every step were an audio frame)")
    six_n = f"6N: {6 * model_params(shape, 'total'):.4g}"
    lines = [
        f"model: {model_label(cfg)}: {describe_shape(shape)}",
        f"parameters: {model_params(shape, 'total'):,} total, {model_params(shape, 'non-embedding'):,} non-embedding"
        f"{' (SODA vocabulary; give --data for yours)' if not cfg.data else ''}",
        f"{counted}: {per_token:.4g}  ({six_n})",
        f"{unit}: {tokens:,} ({tokens / 1e9:,.1f}B) in {steps:,} steps of {cfg.batch_sequences} x {cfg.seq_len} = "
        f"{cfg.batch_sequences * cfg.seq_len:,} {unit}",
        f"total training FLOPs: {total:.4g}",
        f"devices: {world}; micro-batch {micro} sequences, gradient accumulation {accumulate}",
        memory_line(model_params(shape, "total"), world),
        f"LR: peak {cfg.peak_lr(width_of(shape)):.3g} ({'given' if cfg.lr is not None else 'SODA rule'}); "
        f"{cfg.schedule.upper()}: warm-up {phases['warmup']:,} steps, stable {phases['stable']:,}, "
        f"{'cosine ' if cfg.schedule == 'cosine' else ''}decay to 0 over {phases['decay']:,}",
        f"optimizer: {'cautious ' if cfg.cautious else ''}AdamW betas {tuple(cfg.betas)}, eps {cfg.eps:g}, "
        f"weight decay {cfg.weight_decay:g} ({cfg.weight_decay_mode}), clip {cfg.grad_clip:g}, z-loss {cfg.z_loss:g}",
        audio_line(tokens if flat else tokens * shape.n_codebooks, codec_rate),
        f"wall-clock at {mfu:.0%} MFU (bf16 dense peak):",
    ]
    for name, peak in NAMED_GPUS.items():
        for n in sorted({1, 8, world}):
            hours = total / (peak * mfu * n) / 3600
            lines.append(f"  {n:>4} x {name:<9} {hours:>12,.1f} h  ({hours / 24:,.1f} days)")
    print("\n".join(lines))
    return 0

