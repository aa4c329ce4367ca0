"""The LightningModule: the training step around `soda.train.loss.lm_loss`, NLL by token type, optimiser.

Per optimizer step the module logs the loss and the NLL of text, special markers, the semantic codebook and
each acoustic codebook, averaged over all micro-batches and ranks, and with several data sources each one's
share of the step's tokens.

Either model family: the flat `Qwen3ForCausalLM` (`lm_loss` on the flat ids) or `soda.hierarchical`'s
`HierarchicalModel` (its own loss on a batch of steps, `"codes"` [B, S, K], which the loader reads as such:
`soda.train.data.StepReader`). `_sums` is the one place they differ; both give the loss and the unweighted NLL vector in
`Vocabulary.nll_groups()` order, so everything downstream (logs, validation, skips) is shared.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys

import lightning as L
import torch
import torch.distributed as dist

from soda.hierarchical import HierarchicalModel
from soda.loss_weights import loss_weights
from soda.train.config import TrainConfig
from soda.train.loss import lm_loss
from soda.train.optim import CautiousAdamW, clip_by_global_norm, is_sharded, local_tensors, lr_factor, param_groups
from tokenize_audio.errors import SodaError
from tokenize_audio.vocab import Vocabulary


DIGEST_MODULUS = 2**31 - 1


def windows_digest(ids: torch.Tensor) -> int:
    """A fingerprint of a micro-batch's windows whose sum over a step does not depend on how the step's windows were
    split over ranks, workers and micro-batches: two runs trained on the same windows log the same
    `data/windows_digest` at every step (exact: integers below 2**53 in float64)."""
    weights = (torch.arange(1, ids.shape[1] + 1, device=ids.device, dtype=torch.int64) * 40503) % 16777213
    return int(((ids.long() * weights).sum(dim=1) % DIGEST_MODULUS).sum())


class NonFiniteLoss(SodaError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class SodaModule(L.LightningModule):
    def __init__(self, model, cfg: TrainConfig, vocab: Vocabulary, steps: int, micro_per_step: int,
                 flops_per_token: float, audio_tokens_per_second: float | None = None, codec: dict | None = None,
                 source_names: list[str] | None = None):
        super().__init__()
        # with several data sources, each step logs the share of its tokens that came from each (data/share_NAME)
        self.source_names = list(source_names or []) if len(source_names or []) > 1 else []
        self.codec = codec  # the data's codec description: generation and evaluation decode/encode with it
        self.model = model
        self.cfg, self.vocab, self.steps, self.micro_per_step = cfg, vocab, steps, micro_per_step
        self.flops_per_token = flops_per_token
        self.audio_tokens_per_second = audio_tokens_per_second
        self.groups = vocab.nll_groups()
        self.hierarchical = isinstance(model, HierarchicalModel)
        self.width = model.config.shape.backbone.width if self.hierarchical else model.config.hidden_size
        # flat family: per-kind loss weights (None: uniform, the plain mean); the hierarchical model holds its own
        self.kind_weights = None if cfg.loss_weights == "uniform" or self.hierarchical else torch.tensor(
            loss_weights(cfg.loss_weights, vocab.n_codebooks))
        self._acc = None  # [3, G] sums: NLL, count; plus loss terms, over the micro-batches of one step
        self._val = None
        self._micro = 0
        self.grad_norm = None
        self.step_metrics = None  # the last step's training metrics, until StepMetrics writes them
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient norm
        self._nonfinite = None  # why the current step must not update the weights

    # --- loss ----------------------------------------------------------------------------------
    def _sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, [2, G] float64 unweighted NLL sums and target counts by `self.groups`) of a micro-batch."""
        if self.hierarchical:
            return self.model(batch, self.cfg.z_loss)
        loss, nll, targets, valid = lm_loss(self.model, batch, self.cfg.z_loss, self.kind_weights, self.vocab)
        g = self.vocab.nll_group_of(targets)[valid]
        sums = torch.zeros(2, len(self.groups), device=nll.device, dtype=torch.float64)
        sums[0].index_add_(0, g, nll.detach()[valid].double())
        sums[1].index_add_(0, g, torch.ones_like(g, dtype=torch.float64))
        return loss, sums

    def training_step(self, batch, batch_idx):
        loss, sums = self._sums(batch)
        finite = torch.isfinite(loss.detach())
        if self.trainer.world_size > 1:  # every rank decides alike: all skip the update, or none
            flag = finite.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        self._micro += 1
        if finite:
            ids = batch["codes"].flatten(1) if "codes" in batch else batch["input_ids"]  # a window's ids, flat
            stats = [sums.flatten(), torch.tensor([loss.item(), 1.0, windows_digest(ids)],
                                                  dtype=torch.float64, device=sums.device)]
            if self.source_names:  # tokens (steps) per source: a window holds one source's
                windows = torch.bincount(batch["source"].flatten(), minlength=len(self.source_names))
                stats.append(windows.to(sums.device, torch.float64) * batch["doc_ids"].shape[1])
            stats = torch.cat(stats)
            self._acc = stats if self._acc is None else self._acc + stats
        elif self._nonfinite is None:  # no backward for it; the whole optimizer step is then skipped
            self._nonfinite = f"loss is {loss.item()}"
        if self._micro % self.micro_per_step == 0:
            self._log_step()
        return loss if finite else None

    def _log_step(self) -> None:
        """The step's metrics, reduced over micro-batches and ranks, for `StepMetrics` to write after the optimizer
        step (it adds that step's gradient norm and throughput). A step whose every micro-batch was non-finite has
        no loss to report, only its skip."""
        acc, self._acc = self._acc, None
        if acc is None:
            self.step_metrics = {"lr": float(self.trainer.optimizers[0].param_groups[0]["lr"])}
            return
        if self.trainer.world_size > 1:
            dist.all_reduce(acc)
        g = len(self.groups)
        nll, count = acc[:g], acc[g:2 * g]
        scored = count.sum().clamp(min=1)
        loss = float(acc[2 * g] / acc[2 * g + 1])
        metrics = {"train/loss": loss, "train/nll": float(nll.sum() / scored)}
        for i, name in enumerate(self.groups):
            if count[i] > 0:
                metrics[f"train/nll_{name}"] = float(nll[i] / count[i])
        metrics["data/windows_digest"] = float(acc[2 * g + 2] % DIGEST_MODULUS)
        if self.source_names:
            tokens = acc[2 * g + 3:]
            for name, n in zip(self.source_names, tokens):
                metrics[f"data/share_{name}"] = float(n / tokens.sum())
        metrics["lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.step_metrics = metrics
        self.log("loss", loss, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip to --grad-clip, and guard the update: a step whose loss or gradient norm is not finite changes
        nothing. Its gradients are dropped, so the optimizer skips every parameter (weights, moments and step
        counts stay as they were); the skip is counted and logged, or with --on-nonfinite stop the run stops here
        and keeps the last checkpoint, which therefore never holds a non-finite value."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.grad_norm = None
        if grads:  # sharded (FSDP) gradients: each rank holds a shard, the norm is over all of them
            sharded = any(is_sharded(g) for g in grads)
            self.grad_norm = clip_by_global_norm(local_tensors(grads), self.cfg.grad_clip,
                                                 dist.all_reduce if sharded else None)
        reason, self._nonfinite = self._nonfinite, None
        if reason is None and self.grad_norm is not None and not torch.isfinite(self.grad_norm):
            reason = f"gradient norm is {float(self.grad_norm)}"
        if reason is not None:
            for p in self.parameters():
                p.grad = None
            self._skip_step(reason)

    def _skip_step(self, reason: str) -> None:
        step = self.trainer.global_step
        if self.cfg.on_nonfinite == "stop":
            from soda.checkpoints import last_checkpoint

            kept, out = last_checkpoint(self.cfg.out), shlex.quote(str(self.cfg.out))
            how = (f"the last checkpoint, {kept}, holds only finite values. Continue with: soda-train --out {out} "
                   f"--resume --lr LOWER" if kept else "no checkpoint was saved yet: run again with a lower --lr")
            raise NonFiniteLoss(f"{reason} at step {step}; stopped before updating the weights; {how} (or "
                                f"--on-nonfinite skip to skip such steps)")
        self.skipped_steps += 1
        if self.step_metrics is not None:
            self.step_metrics["train/skipped_steps"] = self.skipped_steps
        if self.global_rank == 0:
            print(f"soda-train: warning: {reason} at step {step}; update skipped (weights and optimizer state "
                  f"unchanged; {self.skipped_steps} skipped so far)", file=sys.stderr)

    def configure_model(self) -> None:
        """--strategy fsdp (Lightning's ModelParallelStrategy): shard with FSDP2, one unit per decoder layer, one for
        the LM head and one for the rest. Flat: the rest is the embedding and final norm. Hierarchical: a unit per
        backbone and depth decoder layer, one for the unified head (its loss runs through the head's own call), and
        the whole model for the rest (the embeddings, norms, depth projection and the acoustic heads, which the
        model's forward uses directly). Other strategies need nothing here."""
        if getattr(self, "_device_mesh", None) is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        if self.hierarchical:
            units = [*self.model.backbone.layers, *self.model.depth.layers, self.model.unified_head]
            rest = self.model
        else:
            units = [*self.model.model.layers, self.model.get_output_embeddings()]
            rest = self.model.model
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(rest, mesh=mesh)
        self._sharded = True

    # --- validation ----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, len(self.groups), dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        _, sums = self._sums(batch)
        self._val += sums

    def on_validation_epoch_end(self) -> None:
        val = self._val
        if self.trainer.world_size > 1:  # ranks may have scored different numbers of windows
            dist.all_reduce(val)
        nll, count = val
        if count.sum() == 0:
            return
        metrics = {"val/loss": nll.sum() / count.sum()}
        metrics.update({f"val/nll_{name}": nll[i] / count[i] for i, name in enumerate(self.groups) if count[i] > 0})
        audio = count[2:].sum()
        if audio > 0 and self.audio_tokens_per_second:  # audio NLL in nats/token -> bits per second of audio
            metrics["val/bits_per_audio_second"] = nll[2:].sum() / audio / math.log(2) * self.audio_tokens_per_second
        self.log_dict({k: v.float() for k, v in metrics.items()}, sync_dist=False, rank_zero_only=True)

    # --- optimiser -----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.cfg
        peak = cfg.peak_lr(self.width)
        opt = CautiousAdamW(param_groups(self.model, cfg.weight_decay), lr=peak, betas=cfg.betas, eps=cfg.eps,
                            cautious=cfg.cautious, weight_decay_mode=cfg.weight_decay_mode)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(cfg.schedule, step, self.steps, cfg.warmup, cfg.decay))
        self._weight_decays = [group["weight_decay"] for group in opt.param_groups]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        """After a resume restored the optimizer and scheduler, which carry the LR and weight decay they were saved
        with: this run's settings replace them (a resume may lower --lr or change --weight-decay; see
        soda.train.config.ADJUSTABLE_ON_RESUME). A fresh run is unchanged by this."""
        cfg, opt = self.cfg, self.trainer.optimizers[0]
        sched = self.trainer.lr_scheduler_configs[0].scheduler
        peak = cfg.peak_lr(self.width)
        factor = lr_factor(cfg.schedule, self.trainer.global_step, self.steps, cfg.warmup, cfg.decay)
        for group, wd in zip(opt.param_groups, self._weight_decays):
            group.update(lr=peak * factor, peak_lr=peak, initial_lr=peak, weight_decay=wd)
        sched.base_lrs = [peak] * len(opt.param_groups)
        sched._last_lr = [group["lr"] for group in opt.param_groups]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Lightning counts micro-batches and steps the optimizer when the count reaches a multiple of the
        accumulation. A run resumed on another number of GPUs accumulates another number of micro-batches per step
        (the global batch stays), so the count saved with the checkpoint would end its first steps early: it is
        shifted to what this accumulation would have counted (checkpoints are taken between steps)."""
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        # before the global data order, the loader saved each rank's stream position here (SodaData now holds it)
        fit_loop.get("state_dict", {}).pop("combined_loader", None)
        progress = fit_loop.get("epoch_loop.batch_progress")
        if not progress:
            return
        batches = checkpoint["global_step"] * self.trainer.accumulate_grad_batches
        for counts in (progress["total"], progress["current"]):
            shift = batches - counts["ready"]
            for key in ("ready", "started", "processed", "completed"):
                counts[key] += shift

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Enough to rebuild the model for an HF export without the run's config (primitives only). A hierarchical
        # model's architecture and config are recorded: soda.checkpoints exports and loads it from them.
        checkpoint["soda"] = {"vocab": self.vocab.to_dict(), "codec": self.codec}
        if self.hierarchical:
            checkpoint["soda"] |= {"architecture": "hierarchical",
                                   "hierarchical_config": dataclasses.asdict(self.model.config)}
        else:
            checkpoint["soda"]["model_config"] = self.model.config.to_dict()
