"""`soda-finetune instruct --architecture encoder-projector`: the second model family's instruction-tuning run.

The model is `soda.audio_llm` (frozen Whisper encoder, 2x pooling, linear projector, LoRA'd instruction-tuned LLM);
the data is the same `--data` manifests as the native path (raw audio files, read by `instruct_data.read_items`),
and the run is soda-train's machinery around its own LightningModule: atomic step checkpoints, `last.ckpt`,
SIGTERM/SIGINT pre-emption, `--resume`, CSV/TensorBoard/W&B logs, metrics.csv and loss.png, DDP or FSDP2, bf16 on GPU.

* Preparation (rank 0, once): every clip is read once; unreadable ones are skipped and counted in
  RUN/data_report.json beside the rows skipped for other reasons, the caps, the contamination check against
  `--eval-sets` (by file id and by a hash of the 16 kHz waveform: this family has no codec tokens) and the hours.
  The items kept are written to RUN/data/{train,validation}.jsonl; a --resume refuses a --data file edited since.
* Order: the items of every step are a function of the seed and the step (`step_plan`): whole passes over the
  items in a fresh seeded order each, or, with `--mix`/`--temperature`, seeded draws of the source by its weight
  (shares of items). A resumed run therefore sees exactly the batches an uninterrupted one would, and LoRA dropout
  is seeded per step, so resuming is exact.
* Checkpoints hold only what trains (projector + LoRA), the optimizer and the loop state, plus the model config;
  the frozen encoder and LLM come back from the ids the config names. The export (RUN/hf) is `save_pretrained`'s
  layout; `soda-finetune merge` folds the LoRA into the LLM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

from soda.settings import resumed
from tokenize_audio.errors import SkipItem, SodaError, first_line
from tokenize_audio.shards import atomic_write_json, atomic_write_text

ARCHITECTURE = "encoder-projector"
DATA_DIR, REPORT, CONFIG = "data", "data_report.json", "config.yaml"
SPLITS = ("train", "validation")
WHISPER_SECONDS = 30.0  # Whisper's window: longer clips are cut there (as Whisper and Qwen2-Audio do)


def _f(default, help: str, resumable: bool = False, model: bool = False):
    return field(default=default, metadata={"help": help, "resumable": resumable, "model": model})


@dataclass
class EncoderProjectorSettings:
    """Everything this run is made of, with its default; `resumable` ones may change on --resume, `model` ones are
    the `EncoderProjectorConfig`'s. LoRA and projector runs use a larger LR than SODA's full fine-tuning (2e-5);
    Falcon3-Audio's hyperparameters are not published: the defaults are AudioMCQ's schedule (2 epochs, 5% warm-up)
    with a common LoRA LR."""

    encoder: str = _f("openai/whisper-medium", "Whisper checkpoint (hub id or local directory): its encoder, frozen",
                      model=True)
    llm: str = _f("tiiuae/Falcon3-1B-Instruct", "instruction-tuned causal LM with a chat template (hub id or local "
                                                "directory); LoRA'd", model=True)
    pooling: str = _f("stack", "2x temporal pooling: stack (concatenate adjacent frames) or mean", model=True)
    lora_r: int = _f(8, "LoRA rank", model=True)
    lora_alpha: int = _f(16, "LoRA alpha", model=True)
    lora_dropout: float = _f(0.05, "LoRA dropout", model=True)
    lora_targets: list = _f(None, "LLM linear layers LoRA adapts, comma-separated (default "
                                  "q_proj,k_proj,v_proj,o_proj)", model=True)
    data: list = _f(None, "[NAME=]FILE instruction or MCQ rows (as the native instruct path)")
    cap: str | None = _f(None, "at most N items per source (N) or per named source (NAME=N,...)")
    eval_sets: list = _f(None, "evaluation files whose clips must not be trained on")
    contamination: str = _f("refuse", "refuse, warn or drop training clips found in --eval-sets")
    validation_fraction: float = _f(0.02, "clips held out for validation loss, chosen by hashing them")
    mix: dict = _f(None, "source weights (shares of items); default: natural proportions")
    temperature: float | None = _f(None, "without --mix: weight sources by item count^(1/T)")
    epochs: float = _f(2.0, "passes over the training items the schedule spans (AudioMCQ: 2)")
    batch_size: int = _f(32, "items per optimizer step over all devices")
    micro_batch: int | None = _f(None, "items per device per forward (default: the whole per-device batch); the "
                                       "rest is gradient accumulation", resumable=True)
    lr: float = _f(1e-4, "peak learning rate of the projector and LoRA, cosine to 0 after the warm-up")
    warmup: float = _f(0.05, "warm-up, a fraction of the steps (AudioMCQ: 0.05)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "clip the gradient's global norm (0: off)")
    seed: int = _f(0, "seed of the item order, LoRA's initialisation and dropout")
    max_steps: int | None = _f(None, "stop at this step this time (the schedule stays); --resume goes on",
                               resumable=True)
    ckpt_every: int = _f(500, "checkpoint every N steps", resumable=True)
    log_every: int = _f(10, "a metrics row every N steps", resumable=True)
    val_every: int = _f(200, "validation loss every N steps", resumable=True)
    val_batches: int = _f(20, "validation batches each time (0: none)", resumable=True)
    workers: int = _f(2, "data-loading worker processes per device (reading audio, log-mel features)",
                      resumable=True)
    accelerator: str = _f("auto", "auto, cpu, gpu", resumable=True)
    devices: str = _f("auto", "devices per node", resumable=True)
    num_nodes: int = _f(1, "nodes", resumable=True)
    strategy: str = _f("auto", "auto, ddp (a whole copy of the frozen encoder and LLM per device) or fsdp (FSDP2: "
                                "every weight sharded over the devices, one unit per encoder and LLM layer)", resumable=True)
    precision: str = _f("auto", "auto (bf16-mixed on GPU, 32-true on CPU) or a Lightning precision", resumable=True)
    wandb: str | None = _f(None, "also log to this Weights & Biases project", resumable=True)
    export: bool = _f(True, "write the export RUN/hf at the end", resumable=True)
    out: str | None = _f(None, "run directory")

    def model_config(self):
        from soda.audio_llm import EncoderProjectorConfig

        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["model"]}
        if not given["lora_targets"]:
            given.pop("lora_targets")
        return EncoderProjectorConfig(**given)

    def check(self) -> None:
        bad = [(self.batch_size >= 1, "--batch-size must be positive"),
               (self.micro_batch is None or self.micro_batch >= 1, "--micro-batch must be positive"),
               (self.epochs > 0, "--epochs must be positive"), (self.lr > 0, "--lr must be positive"),
               (0 <= self.warmup < 1, "--warmup must be in [0, 1)"),
               (0 <= self.validation_fraction < 1, "--validation-fraction must be in [0, 1)"),
               (self.max_steps is None or self.max_steps >= 1, "--max-steps must be positive"),
               (min(self.ckpt_every, self.log_every, self.val_every) >= 1,
                "--ckpt-every, --log-every and --val-every must be positive"),
               (self.strategy in ("auto", "ddp", "fsdp"), f"--strategy {self.strategy}: use auto, ddp or fsdp")]
        for ok, message in bad:
            if not ok:
                raise SodaError(message)
        self.model_config()  # a bad --pooling is one line now, not after the data is prepared


# soda-train flags the instruct parser has that this family has no use for (its own model, data and optimizer)
NOT_APPLICABLE = {"init_from", "codec", "items_per_shard", "seq_len", "batch_tokens", "z_loss", "schedule", "decay",
                  "cautious", "weight_decay_mode", "attention", "compile", "activation_checkpointing", "sample_every",
                  "sample_max_seconds", "async_checkpoint", "peak_flops", "on_nonfinite", "skip_bad_shards", "vocab",
                  "tokens", "config"}
FAMILY_FLAGS = ("encoder", "llm", "pooling", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "batch_size")


def add_family_arguments(p) -> None:
    """The instruct subcommand's flags for choosing and shaping this family."""
    g = p.add_argument_group("model family (--architecture encoder-projector: Falcon3-Audio's design)")
    g.add_argument("--architecture", choices=("native", ARCHITECTURE), default="native",
                   help="native (default: the discrete-audio model of --init-from) or encoder-projector (a frozen "
                        "Whisper --encoder, a linear projector and a LoRA'd --llm; no --init-from; its own defaults: "
                        "--lr 1e-4 cosine, --warmup 0.05, 2 epochs, --batch-size 32 items, --weight-decay 0; "
                        "--seq-len and --batch-tokens do not apply)")
    defaults = {f.name: f for f in dataclasses.fields(EncoderProjectorSettings)}
    for name in FAMILY_FLAGS:
        f = defaults[name]
        kind = {"lora_r": int, "lora_alpha": int, "lora_dropout": float, "batch_size": int}.get(name, str)
        shown = f" (default {f.default})" if f.default is not None else ""
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f.metadata["help"] + shown)


def refuse_native_family_flags(args) -> None:
    """The family's flags without --architecture encoder-projector would be silently ignored: refuse them."""
    given = [n for n in FAMILY_FLAGS if getattr(args, n, None) is not None]
    if given:
        raise SodaError(f"--{given[0].replace('_', '-')} applies to --architecture {ARCHITECTURE}")


def settings_from(args, out: Path, resume: bool) -> EncoderProjectorSettings:
    """Flags over defaults; on --resume the saved settings, which flags may change only where resumable."""
    from soda.train.cli import flag_values

    flags = flag_values(args)
    odd = sorted(k for k in flags if k in NOT_APPLICABLE and k != "config")
    if odd or args.config:
        name = odd[0].replace("_", "-") if odd else "config"
        raise SodaError(f"--{name} does not apply to --architecture {ARCHITECTURE} (its model comes from --encoder "
                        f"and --llm, its batch from --batch-size)")
    known = {f.name for f in dataclasses.fields(EncoderProjectorSettings)}
    given = {k: v for k, v in flags.items() if k in known}
    given |= {n: getattr(args, n) for n in FAMILY_FLAGS if getattr(args, n, None) is not None}
    for name, value in (("data", args.instruct_data), ("cap", args.cap), ("eval_sets", args.eval_sets or None),
                        ("temperature", args.temperature)):
        if value is not None:
            given[name] = value
    if "contamination" in vars(args) and args.contamination != "refuse":
        given["contamination"] = args.contamination
    if args.validation_fraction != 0.02:
        given["validation_fraction"] = args.validation_fraction
    if args.epochs is not None:
        given["epochs"] = args.epochs
    if isinstance(given.get("lora_targets"), str):
        given["lora_targets"] = [t.strip() for t in given["lora_targets"].split(",") if t.strip()]
    if "devices" in given:
        given["devices"] = str(given["devices"])
    if not resume:
        s = EncoderProjectorSettings(**given)
    else:
        saved = out / CONFIG
        base = yaml.safe_load(saved.read_text()) if saved.is_file() else None
        if not base or base.get("architecture") != ARCHITECTURE:
            raise SodaError(f"--resume: {out} is not a soda-finetune instruct --architecture {ARCHITECTURE} run")
        s = resumed(EncoderProjectorSettings, base, given, saved, {"out", "data"})
    s.out = str(out)
    s.data, s.eval_sets, s.mix = list(s.data or []), list(s.eval_sets or []), dict(s.mix or {})
    s.check()
    return s


# --------------------------------------------------------------------------------------------
# Data: read every clip once, skip and count what cannot be used, write the item lists
# --------------------------------------------------------------------------------------------
def wave_hash(wave: np.ndarray) -> str:
    """A clip's 16 kHz waveform (16-bit) as a hash: the same audio under another file name is the same clip."""
    pcm = np.clip(np.round(wave * 32767), -32768, 32767).astype("<i2")
    return hashlib.sha1(pcm.tobytes()).hexdigest()


def read_clips(clips: list, progress: bool, desc: str) -> dict:
    """clip key -> (seconds, waveform hash), or the reason (str) it cannot be used; each distinct clip read once."""
    from tqdm import tqdm

    from soda.audio_llm import SAMPLE_RATE
    from tokenize_audio.audio import load_audio

    first = {}
    for c in clips:
        first.setdefault(str(c), c)
    found = {}
    for key, clip in tqdm(first.items(), desc=desc, unit="clip", disable=not progress):
        try:
            wave = load_audio(clip, SAMPLE_RATE)
        except SkipItem as err:
            found[key] = str(err)
            continue
        found[key] = (len(wave) / SAMPLE_RATE, wave_hash(wave))
    return found


def _row(item) -> dict:
    return {"id": item.id, "source": item.source, "task": item.task, "audio": str(item.audio),
            "instruction": item.instruction, "response": item.response}


def prepare_items(s: EncoderProjectorSettings, out: Path, progress: bool) -> dict:
    """RUN/data/{train,validation}.jsonl and the data report (saved by the caller) from --data."""
    from collections import Counter, defaultdict

    from soda.finetune.instruct_data import (
        EvalIndex,
        cap_items,
        contamination_message,
        held_out_clips,
        parse_caps,
        read_items,
        temperature_weights,
    )

    if any(spec.split("=", 1)[-1].startswith("hf:") for spec in s.data):
        raise SodaError(f"--data hf:...: the {ARCHITECTURE} family reads audio files; write the dataset's rows as "
                        f"JSONL with audio paths first")
    items, skipped, file_hashes = read_items(s.data)
    items, capped = cap_items(items, parse_caps(s.cap), s.seed)
    evaluation = EvalIndex(None, s.eval_sets, progress, clip_hashes=lambda clips, desc: {
        k: None if isinstance(v, str) else v[1] for k, v in read_clips(clips, progress, desc).items()})
    clips = read_clips([i.audio for i in items], progress, "reading clips")
    kept, found, long = [], [], 0
    for item in items:
        info = clips[item.clip]
        if isinstance(info, str):
            skipped.append({"source": item.source, "item": item.id, "reason": f"audio: {info}"})
            continue
        overlaps = evaluation.matches(item, info[1])
        found += overlaps
        if overlaps and s.contamination == "drop":
            continue
        long += info[0] > WHISPER_SECONDS
        kept.append(item)
    # the native path's rule (a clip's items stay together, at least one clip held out): on the same data, both
    # families validate on the same clips
    held = held_out_clips(kept, s.validation_fraction)
    splits = {"train": [i for i in kept if i.clip not in held], "validation": [i for i in kept if i.clip in held]}
    if not splits["train"]:
        reasons = "; ".join(sorted({x["reason"].split(":")[0] for x in skipped})) or "all held out for validation"
        raise SodaError(f"--data: no usable training items ({len(skipped)} skipped: {reasons})")
    by_source = defaultdict(list)
    for item in splits["train"] + splits["validation"]:
        by_source[item.source].append(item)
    sources = {}
    for name, group in sorted(by_source.items()):
        unique = {i.clip: clips[i.clip][0] for i in group}
        sources[name] = {"items": len(group), "train_items": sum(i in splits["train"] for i in group),
                         "tasks": dict(Counter(i.task or "-" for i in group).most_common()),
                         "hours": round(sum(clips[i.clip][0] for i in group) / 3600, 4),
                         "unique_clips": len(unique), "unique_hours": round(sum(unique.values()) / 3600, 4),
                         "capped": capped.get(name, 0)}
    counts = {name: src["train_items"] for name, src in sources.items() if src["train_items"]}
    if s.mix:
        unknown = sorted(set(s.mix) - set(counts))
        if unknown:
            raise SodaError(f"--mix names {', '.join(unknown)}, but the sources are {', '.join(counts)}")
        total = sum(s.mix.get(k, 0.0) for k in counts)
        weights = {k: s.mix.get(k, 0.0) / total for k in counts}
    else:
        weights = temperature_weights(counts, s.temperature or 1.0)
    for name in sources:
        sources[name]["weight"] = round(weights.get(name, 0.0), 6)
    data = out / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    for split, group in splits.items():
        atomic_write_text(data / f"{split}.jsonl", "".join(json.dumps(_row(i)) + "\n" for i in group))
    unique = {i.clip: clips[i.clip][0] for i in splits["train"] + splits["validation"]}
    reasons = Counter(x["reason"].split(":")[0].split(" (")[0] for x in skipped)
    report = {"architecture": ARCHITECTURE, "data": s.data, "data_sha256": file_hashes, "sources": sources,
              "weights": {"rule": "--mix" if s.mix else f"item count^(1/{s.temperature or 1.0:g})",
                          "natural": not s.mix and s.temperature in (None, 1.0)},
              "total": {"items": len(splits["train"]) + len(splits["validation"]),
                        "train_items": len(splits["train"]), "validation_items": len(splits["validation"]),
                        "hours": round(sum(src["hours"] for src in sources.values()), 4),
                        "unique_clips": len(unique), "unique_hours": round(sum(unique.values()) / 3600, 4),
                        "longer_than_30s": long},
              "skipped_count": len(skipped), "skipped_reasons": dict(reasons.most_common()), "skipped": skipped,
              "contamination": {"eval_sets": s.eval_sets, "mode": s.contamination, "by": "file id, waveform hash",
                                "overlapping_items": len({(f["source"], f["item"]) for f in found}),
                                "overlaps": found}}
    report["refused"] = contamination_message(report) if s.contamination == "refuse" else None
    return report


def read_split(out: Path, split: str) -> list[dict]:
    path = out / DATA_DIR / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def step_plan(sources: list[str], weights: dict | None, batch: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) item indices: each step's items, a function of the seed alone (so a resume sees the same).

    `weights` None: whole passes over the items, each in a fresh seeded order. Otherwise each slot's source is a
    seeded draw by its weight and the source's items come in passes of their own seeded orders."""
    rng = np.random.default_rng(seed)
    n, need = len(sources), steps * batch
    if weights is None:
        passes = math.ceil(need / n)
        return np.concatenate([rng.permutation(n) for _ in range(passes)])[:need].reshape(steps, batch)
    names = sorted(weights)
    members = {k: np.flatnonzero(np.asarray(sources) == k) for k in names}
    names = [k for k in names if len(members[k]) and weights[k] > 0]
    p = np.asarray([weights[k] for k in names], dtype=np.float64)
    draw = rng.choice(len(names), size=need, p=p / p.sum())
    plan = np.empty(need, dtype=np.int64)
    for j, name in enumerate(names):
        slots = np.flatnonzero(draw == j)
        group = members[name]
        passes = math.ceil(len(slots) / len(group)) if len(slots) else 0
        order = np.concatenate([group[rng.permutation(len(group))] for _ in range(passes)]) if passes else group[:0]
        plan[slots] = order[:len(slots)]
    return plan.reshape(steps, batch)


class PlannedBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches from step `start` on: step s's items are plan[s], this rank's share of them, cut
    into `accumulate` micro-batches; worker w of N collates micro-batches w, w+N, ... (the loader keeps the order)."""

    def __init__(self, items: list[dict], plan: np.ndarray, start: int, rank: int, world: int, accumulate: int,
                 collate):
        self.items, self.plan, self.start, self.collate = items, plan, start, collate
        self.rank, self.world, self.accumulate = rank, world, accumulate

    def micro_batches(self):
        per_rank = self.plan.shape[1] // self.world
        micro = per_rank // self.accumulate
        for step in range(self.start, len(self.plan)):
            mine = self.plan[step, self.rank * per_rank:(self.rank + 1) * per_rank]
            for k in range(self.accumulate):
                yield [self.items[i] for i in mine[k * micro:(k + 1) * micro]]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for n, chosen in enumerate(self.micro_batches()):
            if n % workers == worker:
                yield collate_or_refuse(self.collate, chosen)


def collate_or_refuse(collate, items: list[dict]) -> dict:
    """A batch; a clip that became unreadable after preparation is one line naming it (not a worker traceback)."""
    try:
        return collate(items)
    except SkipItem as err:
        raise SodaError(f"a clip of {', '.join(i['audio'] for i in items)} can no longer be read ({err}); it was "
                        f"readable when the run's data was prepared") from None


# --------------------------------------------------------------------------------------------
# The Lightning module
# --------------------------------------------------------------------------------------------
class EncoderProjectorModule(L.LightningModule):
    """The model, its loss, its optimizer; checkpoints hold only its trainable tensors (`strict_loading` off: the
    frozen encoder and LLM are rebuilt from the config)."""

    def __init__(self, model, s: EncoderProjectorSettings, steps: int, train_items: list[dict],
                 validation_items: list[dict], plan: np.ndarray, accumulate: int):
        super().__init__()
        self.model, self.s, self.steps = model, s, steps
        self.train_items, self.validation_items, self.plan, self.accumulate = train_items, validation_items, plan, \
            accumulate
        self.strict_loading = False
        self._started, self._tokens = None, 0.0

    def state_dict(self, *args, **kwargs):
        """Only what trains (projector + LoRA): what every checkpoint holds, single-file or sharded (FSDP), and what a
        resume loads back (`strict_loading` off); the frozen encoder and LLM come from the ids the config names."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = {f"{prefix}model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        for key in [k for k in full if k not in keep]:
            del full[key]
        return full

    def configure_model(self) -> None:
        """--strategy fsdp (Lightning's ModelParallelStrategy): FSDP2, one unit per encoder layer and per LLM
        decoder layer, the root for the rest (projector, embeddings, norms); frozen weights are sharded too."""
        if getattr(self, "_device_mesh", None) is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in [*self.model.encoder.layers, *decoder_layers(self.model.llm)]:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._sharded = True

    def full_trainable_state(self) -> dict:
        """The trainable tensors whole on every rank (gathered from their FSDP shards: a collective), on the CPU."""
        state = {}
        for name, value in self.model.trainable_state_dict().items():
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            state[name] = value.detach().float().cpu()
        return state

    def collate(self):
        from soda.audio_llm import Collate

        return Collate(self.model.tokenizer, self.model.feature_extractor, self.model.config)

    def train_dataloader(self):
        start = self.trainer.global_step  # restored before the loaders are built: a resume starts there
        data = PlannedBatches(self.train_items, self.plan, start, self.global_rank, self.trainer.world_size,
                              self.accumulate, self.collate())
        return torch.utils.data.DataLoader(data, batch_size=None, num_workers=self.s.workers,
                                           persistent_workers=False)

    def val_dataloader(self):
        per_device = max(1, self.s.batch_size // self.trainer.world_size // self.accumulate)
        mine = self.validation_items[self.global_rank::self.trainer.world_size]
        chunks = [mine[i:i + per_device] for i in range(0, len(mine), per_device)]
        collate = self.collate()
        return torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=0,
                                           collate_fn=lambda chosen: collate_or_refuse(collate, chosen))

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # LoRA dropout drawn from the step (and rank, micro-batch): a resumed run repeats an uninterrupted one
        torch.manual_seed(hash((self.s.seed, self.trainer.global_step, self.global_rank, batch_idx)) % 2**63)
        if self._started is None:
            self._started = time.perf_counter()

    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        self._tokens += float(batch["attention_mask"].sum())  # LLM positions, audio embeddings included
        self.log("train/loss", out.loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch["labels"]))
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.accumulate or self._started is None:
            return
        seconds = time.perf_counter() - self._started
        tokens, self._started, self._tokens = self._tokens * self.trainer.world_size, None, 0.0
        opt = self.trainer.optimizers[0]
        self.log_dict({"lr": opt.param_groups[0]["lr"], "seconds_per_step": seconds,
                       "items_per_second": self.s.batch_size / seconds, "tokens_per_s": tokens / seconds},
                      on_step=True, on_epoch=False)

    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch["labels"]))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from soda.train.optim import clip_by_global_norm

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = clip_by_global_norm(grads, self.s.grad_clip or None, None)
        self.log("grad_norm", norm, on_step=True, on_epoch=False)
        if not torch.isfinite(norm):  # as soda-train: no update from a non-finite gradient
            for p in self.model.parameters():
                p.grad = None

    def configure_optimizers(self):
        from soda.train.optim import cosine_factor

        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.s.lr, weight_decay=self.s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, self.steps, self.s.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from soda.audio_llm import FORMAT

        checkpoint["soda"] = {"family": FORMAT, "config": self.model.config.to_json()}


def decoder_layers(llm) -> list:
    """The LLM's repeated blocks (any transformers causal LM, under peft or not): FSDP's units."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    layers = getattr(getattr(base, "model", base), "layers", None)
    if layers is None:
        raise SodaError(f"--strategy fsdp: cannot find the decoder layers of {type(base).__name__} (model.layers)")
    return list(layers)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"soda-finetune: {message}", file=sys.stderr)


def run_encoder_projector(args) -> int:
    """`soda-finetune instruct --architecture encoder-projector`: prepare (or reuse) RUN/data, train, export."""
    from soda.finetune.instruct_data import contamination_message, refuse_edited_data
    from soda.finetune.prepare import wait_for
    from soda.train.cli import check_run_directory, resolve_resume, stop_on_signals
    from soda.train.run import is_rank_zero

    if not args.out:
        raise SodaError("instruct: give --out RUN_DIR")
    out = Path(args.out)
    stop_on_signals(out, "soda-finetune instruct")
    resume = resolve_resume(args.resume, out)
    s = settings_from(args, out, resume)
    if not resume and not s.data:
        raise SodaError("instruct: give --data (or --resume a run)")
    check_run_directory(out, resume)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    report_file = out / REPORT
    if resume or not is_rank_zero():
        if not is_rank_zero():
            wait_for(report_file)  # rank 0 writes it after the item lists, and with its refusal if it refuses
            if not resume:
                wait_for(out / CONFIG, refused=lambda: json.loads(report_file.read_text()).get("refused"))
        if not report_file.is_file():
            raise SodaError(f"--resume: {out / DATA_DIR} holds no prepared data; start the run again without --resume")
        report = json.loads(report_file.read_text())
        if report.get("refused"):
            raise SodaError(f"{report_file}: {report['refused']}")
        refuse_edited_data(report, out / DATA_DIR)
    else:
        say(f"reading the clips of {', '.join(s.data)}")
        report = prepare_items(s, out, not args.quiet)
        atomic_write_json(report_file, report)
        if report["refused"]:
            raise SodaError(f"{report['refused']}; details in {report_file}. Use --contamination drop to leave them "
                            f"out, or warn to train on them anyway")
        if (problem := contamination_message(report)) is not None:
            say(f"warning: {problem}" + (" (dropped)" if s.contamination == "drop" else ""))
        atomic_write_text(out / CONFIG, yaml.safe_dump({"architecture": ARCHITECTURE, **dataclasses.asdict(s)},
                                                       sort_keys=False))
        t = report["total"]
        say(f"data: {t['train_items']:,} training and {t['validation_items']:,} validation items from "
            f"{len(report['sources'])} sources, {t['hours']:.2f} h ({t['unique_hours']:.2f} h unique), "
            f"{report['skipped_count']:,} rows skipped"
            + (f" ({', '.join(f'{n} {r}' for r, n in report['skipped_reasons'].items())})"
               if report["skipped_count"] else "")
            + (f"; {t['longer_than_30s']:,} clips longer than 30 s are cut there" if t["longer_than_30s"] else "")
            + f"; details in {report_file}")
    return train(s, out, report, resume, args.quiet)


def train(s: EncoderProjectorSettings, out: Path, report: dict, resume: bool, quiet: bool) -> int:
    import warnings

    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from soda.audio_llm import EncoderProjectorModel
    from soda.checkpoints import checkpoint_dir
    from soda.train.callbacks import Preemption, StepCheckpoint
    from soda.train.checkpointing import AtomicCheckpointIO
    from soda.train.run import checkpoint_to_resume, loggers_for

    # the frozen Whisper encoder is in eval mode on purpose (no dropout or LayerDrop in it)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training")
    train_items, validation_items = read_split(out, "train"), read_split(out, "validation")
    steps = max(1, math.ceil(s.epochs * len(train_items) / s.batch_size))
    max_steps = min(steps, s.max_steps or steps)
    L.seed_everything(s.seed, verbose=False)
    model = EncoderProjectorModel(s.model_config())
    gpu = s.accelerator in ("gpu", "cuda") or (s.accelerator == "auto" and torch.cuda.is_available())
    precision = s.precision if s.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    preemption = Preemption(checkpoint_dir(out))
    callbacks = [StepCheckpoint(dirpath=checkpoint_dir(out), filename="step{step:07d}", auto_insert_metric_name=False,
                                every_n_train_steps=s.ckpt_every, save_top_k=-1, save_last="link"), preemption]
    if not quiet:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    devices = int(s.devices) if str(s.devices).isdigit() else s.devices
    world = (devices if isinstance(devices, int) else torch.cuda.device_count() if gpu else 1) * s.num_nodes
    if s.batch_size % world:
        raise SodaError(f"--batch-size {s.batch_size}: must divide by the {world} devices")
    per_device = s.batch_size // world
    micro = min(s.micro_batch or per_device, per_device)
    if per_device % micro:
        raise SodaError(f"--micro-batch {micro}: must divide the {per_device} items each device takes a step")
    accumulate = per_device // micro
    strategy = s.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy()
    elif strategy == "fsdp":
        from soda.train.checkpointing import ShardedCheckpoints

        strategy = ShardedCheckpoints(data_parallel_size=world, tensor_parallel_size=1)
    has_val = bool(validation_items) and s.val_batches > 0
    try:  # validation every --val-every optimizer steps (Lightning counts micro-batches)
        trainer = L.Trainer(accelerator=s.accelerator, devices=devices, num_nodes=s.num_nodes, strategy=strategy,
                            precision=precision, max_steps=max_steps, max_epochs=-1,
                            accumulate_grad_batches=accumulate,
                            log_every_n_steps=max(1, min(s.log_every, max_steps // 2)), num_sanity_val_steps=0,
                            val_check_interval=s.val_every * accumulate if has_val else None,
                            check_val_every_n_epoch=None, limit_val_batches=s.val_batches if has_val else 0,
                            callbacks=callbacks, logger=loggers_for(s), plugins=[AtomicCheckpointIO()],
                            enable_model_summary=False, use_distributed_sampler=False,
                            enable_progress_bar=not quiet, default_root_dir=out, gradient_clip_val=None)
    except (ValueError, TypeError, MisconfigurationException) as e:
        raise SodaError(f"Lightning refused these settings: {first_line(e)}") from None
    if trainer.world_size != world:
        raise SodaError(f"{trainer.world_size} devices, not the {world} --devices x --num-nodes names; give "
                        f"--devices as a count")
    natural = report["weights"]["natural"]
    weights = None if natural else {k: v["weight"] for k, v in report["sources"].items()}
    plan = step_plan([i["source"] for i in train_items], weights, s.batch_size, steps, s.seed)
    module = EncoderProjectorModule(model, s, steps, train_items, validation_items, plan, accumulate)
    counts = model.parameter_counts()
    if trainer.is_global_zero:
        say(f"model: {model.config.encoder} encoder (frozen) -> {model.config.pooling} x{model.config.pool} -> "
            f"projector -> {model.config.llm} with LoRA r{model.config.lora_r}; parameters: {counts['trainable']:,} "
            f"trainable of {counts['total']:,}")
        say(f"batch: {s.batch_size} items = {world} devices x {micro} x {accumulate} accumulation; {max_steps:,} of "
            f"{steps:,} steps ({s.epochs:g} epochs of {len(train_items):,} items); LR {s.lr:g} cosine")
    for logger in trainer.loggers:
        logger.log_hyperparams(dataclasses.asdict(s) | {"architecture": ARCHITECTURE, "steps": steps,
                                                        "parameters_trainable": counts["trainable"],
                                                        "parameters_total": counts["total"]})
    trainer.fit(module, ckpt_path=checkpoint_to_resume(out) if resume else None, weights_only=False)
    return finish(s, out, trainer, module, preemption, steps)


def finish(s: EncoderProjectorSettings, out: Path, trainer, module, preemption, steps: int) -> int:
    from soda.audio_llm import EXPORT_DIR
    from soda.train.run import is_rank_zero, wrap_up
    from tokenize_audio.shards import atomic_directory

    again = f"soda-finetune instruct --architecture {ARCHITECTURE} --out {shlex.quote(str(out))} --resume"
    done = wrap_up(out, trainer, preemption, "soda-finetune", again)
    if done is None:
        return preemption.exit_code
    final, reports = done
    trainable = module.full_trainable_state() if s.export else None  # every rank: a collective under FSDP
    if is_rank_zero():
        if s.export:
            with atomic_directory(out / EXPORT_DIR) as tmp:
                module.model.save_pretrained(tmp, trainable=trainable)
        left = f"; continue to step {steps} with: {again}" if trainer.global_step < steps else ""
        say(f"done: {trainer.global_step} of {steps} steps; {reports}; checkpoint {final}"
            + (f"; export {out / EXPORT_DIR} (soda-eval and soda-generate load it; soda-finetune merge folds the "
               f"LoRA into the LLM)" if s.export else "") + left)
    return 0


def merge_command(args) -> int:
    """`soda-finetune merge EXPORT --out DIR`: the LoRA folded into the LLM's weights (peft merge_and_unload)."""
    from soda.audio_llm import export_of, merge

    export = export_of(args.export)
    if export is None:
        raise SodaError(f"{args.export}: not an encoder-projector export or run with one (RUN/hf/audio_llm.json)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SodaError(f"--out {out}: not empty; give a new directory")
    from tokenize_audio.shards import atomic_directory

    with atomic_directory(out) as tmp:
        merge(export, tmp)
    say(f"merged {export} into {out}: {out / 'llm'} is a plain transformers LLM directory beside the projector")
    return 0


def add_merge_parser(sub) -> None:
    m = sub.add_parser("merge", allow_abbrev=False,
                       help="fold an encoder-projector export's LoRA into its LLM's weights",
                       description="Write OUT with the LoRA merged into the LLM (OUT/llm is a plain transformers "
                                   "model directory with the tokenizer), the projector and a config naming them; "
                                   "soda-eval and soda-generate load it as they load the export.")
    m.add_argument("export", help="an encoder-projector export (RUN/hf) or its run directory")
    m.add_argument("--out", required=True, help="a new directory for the merged model")

