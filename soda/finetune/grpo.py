"""`soda-finetune grpo`: GRPO with AudioMCQ's verifiable multiple-choice rewards, as a Lightning run.

    soda-finetune grpo --init-from RUN_SFT --data strong.json --out RUN [--generations 8 --beta 0.001 --lr 1e-6]

Each step takes `prompts_per_step` questions (a fixed shuffled order of the prepared items, reshuffled every
pass, a function of the step number alone, so a resumed run asks what the uninterrupted one would), samples
`generations` answers to each with soda's own decoder (`soda.generate.decode.decode_batch`: KV-cached, text
only inside the response segment; AudioMCQ's temperature 1.5 and top-k 4, at most 128 tokens), scores them
with AudioMCQ's rewards (`soda.finetune.rewards`), normalises the rewards within each question's group and
takes one gradient step of the GRPO loss with one iteration per batch (TRL/ms-swift's `num_iterations 1`):

    A_i      = (r_i - mean(r_group)) / (std(r_group) + 1e-4)            (std with Bessel's correction, as TRL)
    loss     = mean over completions of  mean over its tokens t of  [ -exp(l_t - sg(l_t)) * A_i + beta * KL_t ]
    KL_t     = exp(ref_t - l_t) - (ref_t - l_t) - 1                       (k3 estimator; >= 0, 0 when equal)

with l_t / ref_t the policy's / frozen reference's log-probability of completion token t. The ratio
exp(l - sg(l)) is 1 in value, so the policy-gradient term is -A * grad l (PPO clipping never acts with one
iteration). Log-probabilities are over the ids the decoder may sample in a text segment (text ids and
<|text_end|>), with the logits divided by the temperature as TRL divides them (top-k is not applied to them,
as in TRL). The sequence-then-batch mean is TRL's `loss_type="grpo"` (ms-swift's default, so the one
AudioMCQ's ms-swift run used).

Why a LightningModule and not TRL's GRPOTrainer on the exported model: the prompts here are token ids with
audio ids in them (no chat template or processor can make them), sampling must be the codebook-aware decoder
that keeps a text segment text, and the run should be soda's: resume from the last step, DDP, pre-emption
checkpoints on SIGTERM/SIGUSR1, metrics.csv and the Hugging Face export, all reused from soda.train.

Run directory: `data/` (prompts.jsonl: each question's prompt ids and solution; the vocabulary),
`data_report.json` (items used and skipped, with reasons), `config.yaml` (these settings; `--resume` reads
them back), `checkpoints/`, `logs/`, `metrics.csv`, `hf/`; `init/` when --init-from was a .ckpt.
"""

from __future__ import annotations

import argparse
import dataclasses
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
import torch.distributed as dist
import yaml

from soda.settings import resumed
from tokenize_audio.errors import SodaError, first_line
from tokenize_audio.shards import atomic_write_json, atomic_write_text

DATA_DIR, PROMPTS, REPORT, CONFIG = "data", "prompts.jsonl", "data_report.json", "config.yaml"
REFUSED = "data_refused.txt"  # rank 0's one-line reason, for the other ranks
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def _f(default, help: str, resumable: bool = False, flag: str | None = None):
    return field(default=default, metadata={"help": help, "resumable": resumable, "flag": flag})


@dataclass
class GRPOSettings:
    """Each setting once: its default, its help (the CLI's), whether a --resume may change it. Defaults are
    AudioMCQ's training_scripts/grpo.sh where it sets them (ms-swift `--rlhf_type grpo`)."""

    init_from: str | None = _f(None, "the model to train: run directory, .ckpt, Hugging Face directory or hub id "
                                     "(e.g. the SFT run: soda-finetune instruct --out RUN_SFT)")
    data: str | None = _f(None, "multiple-choice questions: MMAU/MMAR/MMSU/AudioMCQ-style JSON or JSONL (question, "
                                "choices, answer, audio path) or hf:NAME[:CONFIG]:SPLIT, e.g. the strong half "
                                "from soda-eval --tasks mcq --split-weak-strong")
    out: str | None = _f(None, "run directory (required): data/, checkpoints, logs, metrics.csv, hf/")
    generations: int = _f(8, "answers sampled per question, one group (grpo.sh --num_generations 8)")
    prompts_per_step: int = _f(8, "questions per optimizer step over all devices (grpo.sh: 8 completions per device "
                                  "= one question per GPU; 8 for 8 GPUs); must divide by the number of devices")
    steps: int = _f(2000, "optimizer steps the schedule spans (grpo.sh --max_steps 2000; AudioMCQ's paper reports "
                          "100 to 900)")
    max_steps: int | None = _f(None, "stop at this step (the schedule stays --steps); --resume continues",
                               resumable=True)
    lr: float = _f(1e-6, "peak learning rate, cosine to 0 after the warm-up (grpo.sh 1e-6)")
    warmup: float = _f(0.01, "warm-up, a fraction of --steps (grpo.sh --warmup_ratio 0.01)")
    beta: float = _f(0.001, "weight of the KL to the frozen reference (k3 estimator; grpo.sh --beta 0.001; 0: no "
                            "reference model is loaded)")
    temperature: float = _f(1.5, "sampling temperature (grpo.sh 1.5); log-probabilities use it too, as TRL")
    top_k: int = _f(4, "sample among the k likeliest ids (grpo.sh --top_k 4; 0: all)")
    max_completion_tokens: int = _f(128, "longest answer sampled, in tokens (grpo.sh --max_completion_length 128)")
    max_length: int = _f(2048, "prompt + answer tokens at most; longer questions are skipped (grpo.sh --max_length)")
    weight_decay: float = _f(0.1, "AdamW weight decay, not on norms or embeddings (ms-swift's default 0.1)")
    grad_clip: float = _f(1.0, "clip the gradient's global norm (transformers' default 1.0; 0: no clipping)")
    seed: int = _f(0, "seed of the question order and the sampling")
    limit: int | None = _f(None, "use only the first N questions of --data")
    codec: str | None = _f(None, "codec to encode the audio with (default: the one recorded with the checkpoint)")
    ckpt_every: int = _f(100, "checkpoint every N steps (grpo.sh --save_steps 100)", resumable=True)
    log_every: int = _f(1, "a metrics row every N steps (grpo.sh --logging_steps 1)", resumable=True)
    accelerator: str = _f("auto", "auto, cpu, gpu", resumable=True)
    devices: str = _f("auto", "devices per node (auto: all)", resumable=True)
    strategy: str = _f("auto", "auto or ddp (fsdp is not supported: sampling needs whole weights)", resumable=True)
    precision: str = _f("auto", "auto (bf16-mixed on GPU, 32-true on CPU) or a Lightning precision",
                        resumable=True)
    wandb: str | None = _f(None, "also log to this Weights & Biases project", resumable=True)
    export: bool = _f(True, "write the Hugging Face export RUN/hf at the end (--no-export: not)", resumable=True)

    def check(self) -> None:
        bad = [(self.generations >= 2, "--generations must be at least 2 (advantages compare answers in a group)"),
               (self.prompts_per_step >= 1, "--prompts-per-step must be positive"),
               (self.steps >= 1, "--steps must be positive"),
               (self.max_steps is None or self.max_steps >= 1, "--max-steps must be positive"),
               (self.lr > 0, "--lr must be positive"), (0 <= self.warmup < 1, "--warmup must be in [0, 1)"),
               (self.beta >= 0, "--beta must be >= 0"), (self.temperature > 0, "--temperature must be positive"),
               (self.top_k >= 0, "--top-k must be >= 0"),
               (self.max_completion_tokens >= 1, "--max-completion-tokens must be positive"),
               (self.grad_clip >= 0 and self.weight_decay >= 0, "--grad-clip and --weight-decay must be >= 0"),
               (self.ckpt_every >= 1 and self.log_every >= 1, "--ckpt-every and --log-every must be positive"),
               (self.strategy in ("auto", "ddp"), f"--strategy {self.strategy}: use auto or ddp (fsdp shards the "
                                                  f"weights, and sampling needs them whole on every device)")]
        for ok, message in bad:
            if not ok:
                raise SodaError(message)


def add_grpo_arguments(p) -> None:
    """One flag per GRPOSettings field (help and default from the field)."""
    for f in dataclasses.fields(GRPOSettings):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"]
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        metavar = {"init_from": "CHECKPOINT", "data": "QUESTIONS", "out": "RUN"}.get(f.name)
        shown = f" (default {f.default})" if f.default is not None and f.name not in ("init_from", "data") else ""
        p.add_argument(flag, dest=f.name, type=kind, default=None, metavar=metavar, help=help + shown)
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"),
                   help="continue the run in --out from its newest checkpoint (auto: only if there is one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------------------------
# Rewards -> advantages -> loss (pure functions: the tests check them by hand)
# --------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """[n * group] rewards (each group's answers together) -> advantages, normalised within each group."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + STD_EPS)).view(-1)


def grpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean per-token KL) for [B, T] completion log-probs of the policy and reference, [B] advantages and
    the [B, T] mask of real completion tokens; one iteration per batch (the ratio is 1 in value)."""
    per_token = -torch.exp(logp - logp.detach()) * advantages[:, None]
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    mask = mask.to(logp.dtype)
    loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return loss, (kl.detach() * mask).sum() / mask.sum().clamp(min=1)


def text_ids_mask(vocab, n_logits: int, device) -> torch.Tensor:
    """[n_logits] bool: what the decoder may sample inside a text segment (its own table's text row)."""
    from soda.generate.decode import allowed_table

    return allowed_table(vocab, n_logits, device)[vocab.n_codebooks]


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], allowed: torch.Tensor,
                        temperature: float, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, C] log-probs of each completion's tokens under `model`, [B, C] mask of real tokens).

    Prompts are left-padded and completions right-padded, so every completion starts at the same column and
    only the last C + 1 positions' logits are computed."""
    device = allowed.device
    width, c = max(map(len, prompts)), max(map(len, completions))
    ids = torch.full((len(prompts), width + c), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, (p, comp) in enumerate(zip(prompts, completions)):
        ids[b, width - len(p): width] = torch.tensor(p, device=device)
        ids[b, width: width + len(comp)] = torch.tensor(comp, device=device)
        mask[b, width - len(p): width + len(comp)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=c + 1).logits[:, :-1]
    logits = logits.float().masked_fill(~allowed, -math.inf) / temperature
    targets = ids[:, width:]
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    return logp.masked_fill(mask[:, width:] == 0, 0.0), mask[:, width:]


def step_prompts(n_items: int, per_step: int, step: int, seed: int) -> list[int]:
    """The item indices of `step`: the items in a shuffled order, reshuffled each pass (a function of the step)."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n_items)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_items)[pos]))
    return out


# --------------------------------------------------------------------------------------------
# Data: questions -> prompt ids (encoded once, into RUN/data)
# --------------------------------------------------------------------------------------------
def prepare_prompts(s: GRPOSettings, out: Path, loaded, codec, quiet: bool) -> dict:
    """Encode the questions' audio with the checkpoint's codec into `instruct` prompts (soda.generate's, the
    instruct documents' prefix) in RUN/data; unreadable audio and over-long items are skipped and counted in
    RUN/data_report.json. Returns the report."""
    from soda.evaluate.mcq_items import read_questions
    from soda.finetune.prepare import summarize_skips
    from soda.generate.prompts import Request, build_plan
    from tokenize_audio.documents import mcq_instruction, mcq_response
    from tokenize_audio.encoding import audio_codes, default_batch_seconds

    check_data(s.data)
    questions = read_questions(s.data, s.limit)
    skipped = list(questions.skips.items)
    vocab = loaded.vocab
    codes = audio_codes(codec, [i.audio for i in questions.items], default_batch_seconds(codec), "grpo: encoding",
                        progress=not quiet)
    rows = []
    for item, c in zip(questions.items, codes):
        if isinstance(c, str):
            skipped.append({"item": item.id, "reason": f"audio: {c}"})
            continue
        prompt = build_plan(vocab, Request("instruct", audio=c, text=mcq_instruction(item.question, item.choices)),
                            {"audio": c}).prompt
        if len(prompt) + s.max_completion_tokens > s.max_length:
            skipped.append({"item": item.id, "reason": f"longer than --max-length: {len(prompt)} prompt tokens + "
                                                       f"{s.max_completion_tokens} for the answer > {s.max_length}"})
            continue
        rows.append({"id": item.id, "prompt": [int(x) for x in prompt],
                     "solution": mcq_response(item.choices[item.answer]), "domain": item.domain})
    if not rows:
        reasons = "; ".join(sorted({r["reason"].split(":")[0] for r in skipped})) or "none read"
        raise SodaError(f"--data {s.data}: no usable questions ({len(skipped)} skipped: {reasons})")
    data = out / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    vocab.save(data)
    atomic_write_text(data / PROMPTS, "".join(json.dumps(r) + "\n" for r in rows))
    report = {"data": s.data, "questions": len(rows), "codec": codec.describe(), **summarize_skips(skipped)}
    atomic_write_json(out / REPORT, report)
    return report


def check_data(data: str) -> None:
    if not str(data).startswith("hf:") and not Path(data).expanduser().is_file():
        raise SodaError(f"--data {data}: no such file (expected a JSON/JSONL file of multiple-choice questions, "
                        f"or hf:NAME:SPLIT)")


def read_prompts(out: Path) -> list[dict]:
    path = out / DATA_DIR / PROMPTS
    if not path.is_file():
        raise SodaError(f"--resume: {path} is missing; start the run again without --resume")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:  # 4 bytes an id, not a Python int's 28: a large set's prompts stay in memory on every rank
        r["prompt"] = np.asarray(r["prompt"], dtype=np.int32)
    return rows


# --------------------------------------------------------------------------------------------
# The Lightning module
# --------------------------------------------------------------------------------------------
class GRPOModule(L.LightningModule):
    """The policy (`model`, trained and checkpointed) and a frozen reference (held outside the module's state:
    not checkpointed, not DDP-wrapped; rebuilt from --init-from on resume)."""

    def __init__(self, model, reference, vocab, prompts: list[dict], s: GRPOSettings, codec: dict | None):
        super().__init__()
        self.model, self.vocab, self.prompts, self.s, self.codec = model, vocab, prompts, s, codec
        self._reference = [reference] if reference is not None else []
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.step_metrics = None
        self.grad_norm = None

    def on_fit_start(self) -> None:
        for ref in self._reference:
            ref.to(self.device)

    def _sample(self, rows: list[dict], step: int) -> list[list[int]]:
        """`generations` completions per row (token ids the model chose; <|text_end|> when it closed the answer)."""
        from soda.generate.decode import decode_batch
        from soda.generate.prompts import GenerationSettings, Phase, Plan

        s, v = self.s, self.vocab
        plans = [Plan(r["prompt"].tolist(), [Phase("text", [])]) for r in rows for _ in range(s.generations)]
        settings = GenerationSettings(text_temperature=s.temperature, top_k=s.top_k,
                                      max_text_tokens=s.max_completion_tokens, silence_seconds=0,
                                      batch_size=len(plans))
        seed = int(np.random.SeedSequence([s.seed, step, self.global_rank]).generate_state(1)[0])
        gen = torch.Generator(device=self.device).manual_seed(seed)
        training = self.model.training
        self.model.eval()
        try:
            seqs = decode_batch(self.model, v, plans, settings, 12.5, None, gen)
        finally:
            self.model.train(training)
        return [q.segments[-1] + ([v.text_end] if q.endings[-1] == "text_end" else []) for q in seqs]

    def training_step(self, batch, batch_idx):
        from soda.finetune.rewards import mcq_rewards

        s, v = self.s, self.vocab
        step, world, rank = self.trainer.global_step, self.trainer.world_size, self.global_rank
        rows = [self.prompts[i] for i in step_prompts(len(self.prompts), s.prompts_per_step, step, s.seed)[rank::world]]
        completions = self._sample(rows, step)
        prompts = [r["prompt"].tolist() for r in rows for _ in range(s.generations)]
        solutions = [r["solution"] for r in rows for _ in range(s.generations)]
        texts = [v.decode_text([t for t in c if t != v.text_end]) for c in completions]
        scored = [mcq_rewards(t, sol) for t, sol in zip(texts, solutions)]
        rewards = torch.tensor([x["reward"] for x in scored], device=self.device, dtype=torch.float32)
        advantages = group_advantages(rewards, s.generations)
        allowed = text_ids_mask(v, self.model.config.vocab_size, self.device)
        logp, mask = completion_logprobs(self.model, prompts, completions, allowed, s.temperature, v.eos_id)
        ref_logp = None
        if self._reference and s.beta:
            with torch.no_grad():
                ref_logp, _ = completion_logprobs(self._reference[0], prompts, completions, allowed, s.temperature,
                                                  v.eos_id)
        loss, kl = grpo_loss(logp, ref_logp, advantages, mask, s.beta)
        grouped = rewards.view(-1, s.generations)
        sums = torch.tensor([sum(x["reward"] for x in scored), sum(x["accuracy"] for x in scored),
                             sum(x["format"] for x in scored), float(mask.sum()), float(kl) * len(scored),
                             float(loss.detach()) * len(scored), float((grouped.std(1) == 0).sum()),
                             float(sum(c[-1] == v.text_end for c in completions)), float(len(scored)),
                             float(len(rows))], dtype=torch.float64, device=self.device)
        if world > 1:
            dist.all_reduce(sums)
        n = float(sums[8])
        self.step_metrics = {"train/loss": float(sums[5]) / n, "reward/mean": float(sums[0]) / n,
                             "reward/accuracy": float(sums[1]) / n, "reward/format": float(sums[2]) / n,
                             "kl": float(sums[4]) / n, "completion/mean_tokens": float(sums[3]) / n,
                             "completion/terminated": float(sums[7]) / n,
                             "groups/zero_std": float(sums[6]) / float(sums[9]),
                             "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"])}
        self.log("reward", self.step_metrics["reward/mean"], prog_bar=True, logger=False, on_step=True,
                 on_epoch=False)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from soda.train.optim import clip_by_global_norm

        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.grad_norm = clip_by_global_norm(grads, self.s.grad_clip or None, None) if grads else None
        if self.grad_norm is not None and not torch.isfinite(self.grad_norm):  # as soda-train: no update from it
            for p in self.parameters():
                p.grad = None
            if self.global_rank == 0:
                say(f"warning: gradient norm is {float(self.grad_norm)} at step {self.trainer.global_step}; update "
                    f"skipped")

    def configure_optimizers(self):
        from soda.train.optim import cosine_factor, param_groups

        s = self.s
        opt = torch.optim.AdamW(param_groups(self.model, s.weight_decay), lr=s.lr, betas=(0.9, 0.999), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, s.steps, s.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what soda.checkpoints needs to export or load the policy without this run's settings (as SodaModule)
        checkpoint["soda"] = {"model_config": self.model.config.to_dict(), "vocab": self.vocab.to_dict(),
                              "codec": self.codec}


class GRPOMetrics(L.Callback):
    """Writes the step's row (rewards, KL, lengths, LR, gradient norm, seconds per step) after the optimizer step
    and before the step's checkpoint (Lightning runs ModelCheckpoint last), as soda-train's StepMetrics does."""

    def __init__(self, every: int):
        self.every, self._t0 = max(1, every), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics, pl_module.step_metrics = pl_module.step_metrics, None
        step = trainer.global_step - 1
        if metrics is None or ((step + 1) % self.every and trainer.global_step < trainer.max_steps):
            return
        if pl_module.grad_norm is not None:
            metrics["grad_norm"] = float(pl_module.grad_norm)
        metrics["seconds_per_step"] = time.perf_counter() - self._t0
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                logger.save()


class _Steps(torch.utils.data.IterableDataset):
    """The loader Lightning steps through: one placeholder per step (the module picks the step's questions)."""

    def __iter__(self):
        while True:
            yield 0


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"soda-finetune: {message}", file=sys.stderr)


def resolve_settings(args, out: Path, resume: bool) -> GRPOSettings:
    """Flags over defaults; on --resume the saved settings, which flags may change only where resumable."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOSettings)
             if getattr(args, f.name, None) is not None}
    if not resume:
        s = GRPOSettings(**given)
    else:
        saved = out / CONFIG
        if not saved.is_file():
            raise SodaError(f"--resume: {out} has no {CONFIG}; nothing to resume")
        base = yaml.safe_load(saved.read_text()) or {}
        if base.get("task") != "grpo":
            raise SodaError(f"--resume: {out} is not a soda-finetune grpo run")
        # the same command line again (a requeued job) is fine: --init-from/--data name what the run was made from
        data = given.get("data")
        if data and (data if data.startswith("hf:") else str(Path(data).expanduser().resolve())) != base.get("data"):
            raise SodaError(f"--resume: --data {given['data']} is not the questions this run was prepared from "
                            f"({base.get('data')})")
        s = resumed(GRPOSettings, base, given, saved, {"out", "init_from", "data"},
                    ": --max-steps, devices, logging")
    s.out = str(out)
    s.check()
    return s


def save_settings(s: GRPOSettings, init: str, vocab_dir: Path) -> None:
    # `vocab`: where soda.checkpoints finds the vocabulary of this run's .ckpt files (as soda-train's config.yaml)
    atomic_write_text(Path(s.out) / CONFIG, yaml.safe_dump(
        {"task": "grpo", **dataclasses.asdict(s), "init_model": init, "vocab": str(vocab_dir)}, sort_keys=False))


def run_grpo(args) -> int:
    """`soda-finetune grpo`: prepare (or reuse) RUN/data, then train; the exit code."""
    from soda.checkpoints import load_model
    from soda.finetune.prepare import init_model_dir
    from soda.train.run import is_rank_zero
    from soda.train.cli import check_run_directory, resolve_resume, stop_on_signals

    started = time.time()
    if not args.out:
        raise SodaError("grpo: give --out RUN_DIR")
    out = Path(args.out)
    stop_on_signals(out, "soda-finetune grpo")
    resume = resolve_resume(args.resume, out)
    if not resume:
        missing = [f for f, v in (("--init-from", args.init_from), ("--data", args.data)) if not v]
        if missing:
            raise SodaError(f"grpo: give {' and '.join(missing)} (or --resume a run)")
    check_run_directory(out, resume)
    s = resolve_settings(args, out, resume)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if resume or not is_rank_zero():  # under torchrun, rank 0 prepares RUN/data and RUN/init; the others wait
        if not resume:
            wait_for_rank_zero(out, started)
        saved = yaml.safe_load((out / CONFIG).read_text())
        init, prompts = saved["init_model"], read_prompts(out)
        report = json.loads((out / REPORT).read_text())
        from tokenize_audio.vocab import Vocabulary

        vocab, codec_meta = Vocabulary.load(out / DATA_DIR), report.get("codec")
    else:
        try:
            check_data(s.data)
            if not str(s.data).startswith("hf:"):
                s.data = str(Path(s.data).expanduser().resolve())
            loaded = load_model(s.init_from, device="cpu", codec=s.codec, weights=False)
            codec = loaded.load_codec()
            say(f"encoding the questions of {s.data} with {loaded.codec_label}")
            report = prepare_prompts(s, out, loaded, codec, args.quiet)
            vocab, codec_meta = loaded.vocab, report["codec"]
            init = init_model_dir(s.init_from, out, vocab)
        except SodaError as e:  # the other ranks (under torchrun) stop with it instead of waiting
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / REFUSED, str(e))
            raise
        prompts = read_prompts(out)
        save_settings(s, init, out / DATA_DIR)
        (out / REFUSED).unlink(missing_ok=True)  # an earlier attempt's
        say(f"data: {report['questions']:,} questions used, {report['skipped_count']:,} skipped"
            + (f" ({', '.join(f'{n} {r}' for r, n in report['skipped_reasons'].items())})" if report['skipped_count']
               else "") + f"; details in {out / REPORT}")
    return train_grpo(s, init, vocab, prompts, codec_meta, resume, args.quiet)


def wait_for_rank_zero(out: Path, started: float, timeout: float = 24 * 3600) -> None:
    """Ranks other than 0 wait for rank 0's config.yaml (data prepared) or its refusal, written during this launch
    (files older than this process's start, left by an earlier attempt, are not taken for this one's)."""
    fresh = lambda p: p.is_file() and p.stat().st_mtime >= started - 2  # noqa: E731 -- ranks start together
    while not fresh(out / CONFIG):
        if fresh(out / REFUSED):
            raise SodaError(f"rank 0 could not prepare the data: {(out / REFUSED).read_text().strip()}")
        if time.time() - started > timeout:
            raise SodaError(f"waited {timeout:.0f} s for rank 0 to write {out / CONFIG}")
        time.sleep(1)


def train_grpo(s: GRPOSettings, init: str, vocab, prompts: list[dict], codec: dict | None, resume: bool,
               quiet: bool = False) -> int:
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from soda.checkpoints import checkpoint_dir
    from soda.model import load_pretrained
    from soda.train.callbacks import Preemption, StepCheckpoint
    from soda.train.checkpointing import AtomicCheckpointIO
    from soda.train.run import checkpoint_to_resume, loggers_for

    out = Path(s.out)
    L.seed_everything(s.seed, verbose=False)
    gpu = s.accelerator in ("gpu", "cuda") or (s.accelerator == "auto" and torch.cuda.is_available())
    precision = s.precision if s.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    model = load_pretrained(init, vocab, "sdpa")
    reference = load_pretrained(init, vocab, "sdpa") if s.beta else None
    if reference is not None and precision.startswith("bf16"):
        reference.to(torch.bfloat16)  # only read under bf16 autocast: no fp32 master copy needed
    module = GRPOModule(model, reference, vocab, prompts, s, codec)
    max_steps = min(s.steps, s.max_steps or s.steps)
    preemption = Preemption(checkpoint_dir(out))
    callbacks = [StepCheckpoint(dirpath=checkpoint_dir(out), filename="step{step:07d}", auto_insert_metric_name=False,
                                every_n_train_steps=s.ckpt_every, save_top_k=-1, save_last="link"),
                 GRPOMetrics(s.log_every), preemption]
    if not quiet:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    strategy = s.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy()
    devices = int(s.devices) if str(s.devices).isdigit() else s.devices
    try:
        trainer = L.Trainer(accelerator=s.accelerator, devices=devices, strategy=strategy, precision=precision,
                            max_steps=max_steps, max_epochs=-1, log_every_n_steps=s.log_every, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=callbacks, logger=loggers_for(s),
                            plugins=[AtomicCheckpointIO()], enable_model_summary=False, use_distributed_sampler=False,
                            enable_progress_bar=not quiet, default_root_dir=out, gradient_clip_val=None)
    except (ValueError, TypeError, MisconfigurationException) as e:
        raise SodaError(f"Lightning refused these settings: {first_line(e)}") from None
    if s.prompts_per_step % trainer.world_size:
        raise SodaError(f"--prompts-per-step {s.prompts_per_step}: must divide by the {trainer.world_size} devices")
    if trainer.is_global_zero:
        say(f"GRPO: {len(prompts):,} questions, {s.prompts_per_step} per step x {s.generations} answers, "
            f"{max_steps:,} of {s.steps:,} steps, LR {s.lr:g} cosine, beta {s.beta:g}, temperature {s.temperature:g}, "
            f"top-k {s.top_k}, answers of at most {s.max_completion_tokens} tokens")
    for logger in trainer.loggers:  # hparams.yaml / TensorBoard's hparams, as soda-train's
        logger.log_hyperparams(dataclasses.asdict(s) | {"questions": len(prompts), "init_model": init})
    loader = torch.utils.data.DataLoader(_Steps(), batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=checkpoint_to_resume(out) if resume else None,
                weights_only=True)
    return finish(s, trainer, preemption, vocab)


def finish(s: GRPOSettings, trainer, preemption, vocab) -> int:
    from soda.checkpoints import export_hf
    from soda.train.run import is_rank_zero, wrap_up

    out = Path(s.out)
    again = f"soda-finetune grpo --out {shlex.quote(str(out))} --resume"
    done = wrap_up(out, trainer, preemption, "soda-finetune", again)
    if done is None:
        return preemption.exit_code
    final, reports = done
    if is_rank_zero():
        if s.export:
            export_hf(final, out / "hf", vocab=vocab)
        left = f"; continue to step {s.steps} with: {again}" if trainer.global_step < s.steps else ""
        say(f"done: {trainer.global_step} of {s.steps} steps; {reports}; checkpoint {final}"
            + (f"; Hugging Face export {out / 'hf'}" if s.export else "") + left)
    return 0
