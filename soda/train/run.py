"""Assemble a run from its config (data, model, module, Lightning Trainer) and carry it out."""

from __future__ import annotations

import shlex
import signal
import sys
import warnings
from pathlib import Path

import torch
import yaml

from soda.checkpoints import checkpoint_dir, export_hf, link_last, resumable_checkpoint
from soda.model import (build_model, count_parameters, default_attention, load_pretrained,
                        load_pretrained_hierarchical, prepare_for_training, shape_of)
from soda.shape import HierarchicalShape, ModelShape
from soda.train.config import CONFIG_FILE, TrainConfig
from soda.train.plan import batch_layout, describe_shape, flops_per_token_of, width_of, world_size
from tokenize_audio.errors import SodaError, first_line
from tokenize_audio.shards import atomic_write_text


def model_for_run(cfg: TrainConfig, vocab) -> tuple[torch.nn.Module, ModelShape | HierarchicalShape]:
    """The model this run trains (new from --size, or --init-from's weights) with its attention kernel and training
    preparation (activation checkpointing, torch.compile), and its shape; --architecture hierarchical: a
    `soda.hierarchical.HierarchicalModel` (new or --init-from's) and its `HierarchicalShape`. --init-from's model must
    be of the run's family."""
    if cfg.architecture == "hierarchical":
        return hierarchical_for_run(cfg, vocab)
    attention = cfg.attention if cfg.attention != "auto" else default_attention("cuda" if cfg.uses_gpu() else "cpu")
    if attention == "flex_attention" and not cfg.uses_gpu():
        raise SodaError("--attention flex_attention: torch has no flex attention backward on the CPU; use sdpa (the "
                        "CPU default) or train on a GPU")
    try:
        if cfg.init_from:
            model = load_pretrained(cfg.init_from, vocab, attention)
            shape = shape_of(model)
        else:
            shape = cfg.shape(vocab.size)
            model = build_model(shape, vocab, cfg.seed, rope_theta=cfg.rope_theta, rope_factor=cfg.rope_factor,
                                attention=attention)
    except (ValueError, ImportError) as e:  # transformers refuses an unknown or uninstalled attention kernel
        if "attn_implementation" not in str(e) and "Attention" not in str(e):
            raise
        raise SodaError(f"--attention {attention}: transformers cannot use it here ({first_line(e)[:300]})") from None
    prepare_for_training(model, cfg.activation_checkpointing, cfg.compile)
    return model, shape


def hierarchical_for_run(cfg: TrainConfig, vocab) -> tuple[torch.nn.Module, HierarchicalShape]:
    """A new hierarchical model (seeded) of the backbone --size/shape flags give, with --depth-width/--depth-layers
    and --loss-weights, or --init-from's (its shape; this run's --loss-weights); sdpa attention unless --attention
    eager (its masks are dense [S, S] step masks); with --activation-checkpointing and --compile
    (`soda.hierarchical.prepare_for_training`)."""
    from soda.hierarchical import HierarchicalConfig, HierarchicalModel, prepare_for_training as prepare_hierarchical

    attention = "sdpa" if cfg.attention == "auto" else cfg.attention
    if attention not in ("sdpa", "eager"):
        raise SodaError(f"--attention {attention}: --architecture hierarchical runs sdpa or eager attention only")
    if cfg.init_from:
        model = load_pretrained_hierarchical(cfg.init_from, vocab, attention, cfg.loss_weights)
    else:
        try:
            config = HierarchicalConfig.from_vocab(
                cfg.shape(vocab.size), vocab, depth_width=cfg.depth_width, depth_layers=cfg.depth_layers,
                loss_weights=cfg.loss_weights, attention=attention, rope_theta=cfg.rope_theta,
                rope_factor=cfg.rope_factor)
        except ValueError as e:
            raise SodaError(f"--architecture hierarchical: {first_line(e)}") from None
        torch.manual_seed(cfg.seed)
        model = HierarchicalModel(config)
    prepare_hierarchical(model, cfg.activation_checkpointing, cfg.compile)
    return model, model.config.shape


def parameter_counts(model) -> dict[str, int]:
    """Counted on the module, either family: total and non-embedding (input tables and output heads left out)."""
    from soda.hierarchical import HierarchicalModel, count_parameters as hierarchical_count

    return hierarchical_count(model) if isinstance(model, HierarchicalModel) else count_parameters(model)


def attention_of(model) -> str:
    config = model.config
    return getattr(config, "_attn_implementation", None) or getattr(config, "attention", "sdpa")


def strategy_for(cfg: TrainConfig, world: int):
    if cfg.strategy == "fsdp":
        from soda.train.checkpointing import ShardedCheckpoints

        # FSDP2 (fully_shard, applied per decoder layer in SodaModule.configure_model) over all ranks; each rank
        # saves its own shards (a checkpoint is a directory; see soda.checkpoints); the export is one model.
        return ShardedCheckpoints(data_parallel_size=world, tensor_parallel_size=1, background=cfg.async_checkpoint)
    if cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(gradient_as_bucket_view=True)  # gradients live in DDP's buckets: no extra copy
    return cfg.strategy


def precision_for(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16-mixed" if cfg.uses_gpu() else "32-true"


def run(cfg: TrainConfig, resume: bool) -> int:
    """Train the run `cfg` describes, or continue it from its newest readable checkpoint (`resume`); the exit code."""
    import lightning as L

    from soda.train.data import stop_loader_workers
    from soda.train.sources import resolve_sources

    # a non-finite step returns no loss on purpose (SodaModule skips its update and says so)
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`")
    sources, vocab = resolve_sources(cfg.data, cfg.val_data, cfg.mix, cfg.vocab)
    world = world_size(cfg)
    micro, accumulate = batch_layout(cfg, world)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.uses_gpu():
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32 (Lightning's advice)
    module = build_module(cfg, vocab, sources, world, micro, accumulate)
    trainer, preemption = build_trainer(cfg, module, sources, world, accumulate)
    if is_rank_zero() and not resume:
        save_config(cfg)
    data = build_data(cfg, sources, vocab, micro, accumulate)
    log_hyperparams(trainer.loggers, cfg, module)
    ckpt_path = checkpoint_to_resume(Path(cfg.out)) if resume else None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    finally:
        stop_loader_workers()
    return finish(cfg, trainer, module, preemption)


def steps_this_run(cfg: TrainConfig) -> int:
    """The step this invocation stops at: --steps, or --max-steps when that comes first (the schedule stays --steps)."""
    return min(cfg.steps, cfg.max_steps or cfg.steps)


def build_module(cfg: TrainConfig, vocab, sources: list, world: int, micro: int, accumulate: int):
    """The LightningModule around `model_for_run`'s model; rank zero first says what is about to be trained."""
    from soda.train.module import SodaModule

    model, shape = model_for_run(cfg, vocab)
    if is_rank_zero():
        describe_run(cfg, model, shape, sources, world, micro, accumulate)
    audio_rate = next((s.audio_tokens_per_second for s in sources if s.audio_tokens_per_second), None)
    codec = next((s.codec for s in sources if s.codec), None)
    return SodaModule(model, cfg, vocab, cfg.steps, accumulate, flops_per_token_of(cfg, shape),
                      audio_rate, codec, source_names=[s.name for s in sources])


def describe_run(cfg: TrainConfig, model, shape: ModelShape | HierarchicalShape, sources: list, world: int, micro: int,
                 accumulate: int) -> None:
    """The model, kernels, parameters, data and batch on stderr, with warnings about the data."""
    say = lambda msg: print(f"soda-train: {msg}", file=sys.stderr)  # noqa: E731
    counted, max_steps = parameter_counts(model), steps_this_run(cfg)
    say(f"model: {describe_shape(shape)}")
    say(f"kernels: {attention_of(model)} attention"
        f"{', torch.compile (layers and loss)' if cfg.compile else ''}"
        f"{', activation checkpointing' if cfg.activation_checkpointing else ''}")
    say(f"parameters: {counted['total']:,} total, {counted['non_embedding']:,} non-embedding")
    say("data (weights are shares of tokens): " + "; ".join(
        f"{s.name} {s.weight:.1%} ({len(s.train)} train / {len(s.validation)} validation shards)" for s in sources))
    if not any(s.validation for s in sources):
        say("warning: the data has no validation shards: this run will report no validation loss (tokenize with "
            "--validation-fraction above 0, or give --val-data)")
    width = width_of(shape)
    unit = "tokens" if isinstance(shape, ModelShape) else "steps"
    say(f"batch: {cfg.batch_sequences} x {cfg.seq_len} {unit} = {world} devices x {micro} sequences x "
        f"{accumulate} accumulation; {max_steps:,} of {cfg.steps:,} steps; peak LR {cfg.peak_lr(width):.3g}")
    if not isinstance(shape, ModelShape):
        say(f"hierarchical windows: {cfg.seq_len} steps each (a text or special token, or an audio frame of "
            f"{shape.n_codebooks} codes: {cfg.seq_len * shape.n_codebooks:,} flat tokens of audio); --tokens and "
            f"--batch-tokens count steps; loss weights {cfg.loss_weights}")


def build_trainer(cfg: TrainConfig, module, sources: list, world: int, accumulate: int):
    """The Lightning Trainer with this run's callbacks, loggers and atomic checkpoint writes, and its `Preemption`
    callback (which `finish` asks whether the run stopped early). Lightning's refusals become SodaErrors."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from soda.train.checkpointing import AtomicCheckpointIO

    max_steps = steps_this_run(cfg)
    log_every = max(1, min(cfg.log_every, max_steps // 2))  # a short run still logs a curve
    callbacks, preemption = callbacks_for(cfg, module, sources, log_every)
    has_val = any(s.validation for s in sources)
    try:
        trainer = L.Trainer(
            accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
            strategy=strategy_for(cfg, world), precision=precision_for(cfg), max_steps=max_steps, max_epochs=-1,
            accumulate_grad_batches=accumulate, log_every_n_steps=log_every, num_sanity_val_steps=0,
            val_check_interval=cfg.val_every * accumulate if has_val else None, check_val_every_n_epoch=None,
            limit_val_batches=1.0 if has_val and cfg.val_batches else 0, callbacks=callbacks, logger=loggers_for(cfg),
            plugins=[AtomicCheckpointIO(background=cfg.async_checkpoint)],
            enable_model_summary=False, use_distributed_sampler=False, default_root_dir=Path(cfg.out),
            gradient_clip_val=None,
        )
    except (ValueError, TypeError, MisconfigurationException) as e:
        raise SodaError(f"Lightning refused these settings: {first_line(e)}") from None
    return trainer, preemption


def callbacks_for(cfg: TrainConfig, module, sources: list, log_every: int) -> tuple[list, object]:
    """Checkpoints, per-step metrics, pre-emption, the progress bar and (when the codec is known) audio samples."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from soda.train.callbacks import Preemption, StepCheckpoint, StepMetrics

    out = Path(cfg.out)
    ckpt_dir = checkpoint_dir(out)
    preemption = Preemption(ckpt_dir)
    callbacks = [
        StepCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                       every_n_train_steps=cfg.ckpt_every, save_top_k=-1, save_last="link"),
        StepMetrics(cfg.batch_sequences * cfg.seq_len, module.flops_per_token, cfg.peak_flops, log_every),
        preemption,
        TQDMProgressBar(refresh_rate=1),
    ]
    sample_every = cfg.ckpt_every if cfg.sample_every is None else cfg.sample_every
    codec = module.codec
    if sample_every and codec and codec.get("spec"):
        from soda.train.samples import Samples

        callbacks.append(Samples(out, sample_every, cfg.sample_max_seconds, sources, codec, cfg.seed))
    elif sample_every and cfg.sample_every and is_rank_zero():
        print("soda-train: --sample-every: no samples: the data's codec is not recorded", file=sys.stderr)
    return callbacks, preemption


def loggers_for(cfg: TrainConfig) -> list:
    """CSV and TensorBoard in the run directory, plus W&B with --wandb."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    out = Path(cfg.out)
    loggers = [CSVLogger(out, name="logs"), TensorBoardLogger(out, name="tensorboard")]
    if cfg.wandb:
        from lightning.pytorch.loggers import WandbLogger

        # One W&B run per run directory: a --resume continues the same W&B run instead of starting another.
        id_file = out / "wandb_run_id"
        if is_rank_zero() and not id_file.is_file():
            import secrets

            out.mkdir(parents=True, exist_ok=True)
            id_file.write_text(secrets.token_hex(4))
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        loggers.append(WandbLogger(project=cfg.wandb, save_dir=str(out), id=run_id, resume="allow"))
    return loggers


def build_data(cfg: TrainConfig, sources: list, vocab, micro: int, accumulate: int):
    """The run's data module: the global window order (`soda.train.data`), this rank's slice of it."""
    from soda.train.datamodule import SodaData
    from soda.train.index import INDEX_DIR

    return SodaData(sources, cfg.seq_len, cfg.seed, cfg.batch_sequences, micro, accumulate, cfg.workers,
                    Path(cfg.out) / INDEX_DIR,
                    skip_bad=cfg.skip_bad_shards, vocab_size=vocab.size,
                    loss_after=getattr(vocab, cfg.loss_after) if cfg.loss_after else None,
                    run_tokens=steps_this_run(cfg) * cfg.batch_sequences * cfg.seq_len, val_batches=cfg.val_batches,
                    steps_vocab=vocab if cfg.architecture == "hierarchical" else None)


def log_hyperparams(loggers: list, cfg: TrainConfig, module) -> None:
    """hparams.yaml / TensorBoard's hparams: the settings and the model's size."""
    counted = parameter_counts(module.model)
    for logger in loggers:
        logger.log_hyperparams({**cfg.to_dict(), "parameters_total": counted["total"],
                                "parameters_non_embedding": counted["non_embedding"],
                                "flops_per_token": module.flops_per_token,
                                "attention": attention_of(module.model), "steps": cfg.steps})


def checkpoint_to_resume(out: Path) -> Path:
    """The newest checkpoint that loads (rank zero moved unreadable ones aside in resolve_resume)."""
    ckpt_path = resumable_checkpoint(out, move_aside=False, say=lambda msg: None)
    if ckpt_path is None:
        raise SodaError(f"--resume: no readable checkpoint in {checkpoint_dir(out)}; start the run again without "
                        f"--resume (into another --out to keep this one)")
    return ckpt_path


def finish(cfg: TrainConfig, trainer, module, preemption) -> int:
    """After `trainer.fit`: the pre-emption's exit code and how to continue, or the final checkpoint, the reports,
    the export (--export) and exit code 0."""
    out = Path(cfg.out)
    done = wrap_up(out, trainer, preemption, "soda-train", f"soda-train --out {shlex.quote(str(out))} --resume")
    if done is None:
        return preemption.exit_code
    final, reports = done
    export = cfg.export
    if is_rank_zero():
        if export:  # either family (soda.checkpoints.export_hf: a hierarchical run's has its own config.json)
            export_hf(final, out / "hf", vocab_dir_of(cfg))
        skipped = (f" ({module.skipped_steps} skipped for a non-finite loss or gradient norm)"
                   if module.skipped_steps else "")
        print(f"soda-train: done: {trainer.global_step} steps{skipped}; {reports}; checkpoint {final}"
              f"{'; Hugging Face export ' + str(out / 'hf') if export else ''}", file=sys.stderr)
    return 0


def wrap_up(out: Path, trainer, preemption, tool: str, again: str) -> tuple[Path, str] | None:
    """The end of a run, for every command that trains: after a pre-emption, the reports and how to continue (`again`)
    and None (exit with `preemption.exit_code`); else the final checkpoint (saved unless the step's own was), and on
    rank 0 `last.ckpt` and the reports: (final checkpoint, the reports' line; "" on other ranks)."""
    from soda.train.checkpointing import wait_for_checkpoints
    from soda.train.report import write_reports

    ckpt_dir = checkpoint_dir(out)
    if preemption.saved_at is not None:
        if is_rank_zero():
            write_reports(out)
            how = "interrupted" if preemption.requested == signal.SIGINT else "pre-empted"
            print(f"{tool}: {how} at step {preemption.saved_at}; checkpoint saved in {ckpt_dir}; continue with: "
                  f"{again}", file=sys.stderr)
        return None
    wait_for_checkpoints(trainer)  # a background save of the last step may still be under way
    final = ckpt_dir / f"step{trainer.global_step:07d}.ckpt"
    if not final.exists():
        trainer.save_checkpoint(final, weights_only=False)
        wait_for_checkpoints(trainer)
    reports = ""
    if is_rank_zero():
        link_last(final)
        reports = write_reports(out)
    return final, reports


def vocab_dir_of(cfg: TrainConfig) -> Path | None:
    """The directory whose vocab.json the export copies: the first --data directory that has one, else --vocab."""
    return next((Path(str(d).split("=", 1)[-1]) for d in cfg.data
                 if isinstance(d, str) and (Path(str(d).split("=", 1)[-1]) / "vocab.json").is_file()),
                Path(cfg.vocab) if cfg.vocab else None)


def is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def save_config(cfg: TrainConfig) -> None:
    """The resolved settings, which --resume reads back."""
    atomic_write_text(Path(cfg.out) / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
