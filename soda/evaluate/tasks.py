"""The task registry and what every task shares: the model, its codec, the scoring settings.

A task is two functions: `load(ctx, data)` reads its inputs and raises SodaError for user
mistakes (so a wrong path fails in seconds, before any scoring), and `run(ctx, loaded)` scores
them and returns one results entry. A benchmark (likelihood-scored, or generated through `soda.generate`
as ASR, TTS and S2ST are) joins by calling `register` from its own module, listed in `BUILTIN_MODULES`.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from soda.evaluate.hierarchical import FAMILY, hierarchical_log_probs, is_hierarchical
from soda.evaluate.scoring import token_log_probs
from soda.settings import setting
from tokenize_audio.encoding import audio_codes, codec_wave, encode_waves

BUILTIN_MODULES = ("pairs", "nll", "mcq", "asr", "tts", "s2st", "lm_eval")
MAX_LISTED_SKIPS = 1000  # results.json lists this many skipped items per task (all are counted)


def _judges(text: str) -> list[str]:
    return [j.strip() for j in text.split(",") if j.strip()]


@dataclass
class EvalSettings:
    """How tasks score and generate; each field with a flag is a soda-eval option (`soda.settings.setting`)."""

    device: str = setting("auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    codec: str | None = setting(  # overrides the codec recorded with the model (and its judges)
        None, help="codec for audio inputs when the model does not record one (e.g. mimi, mimi:DIR)")
    batch_tokens: int = setting(16384, type=int, at_least=1, help="padded tokens per forward pass (default 16384)")
    max_len: int = setting(  # longer sequences are skipped (pairs, MCQ) or scored in windows (NLL)
        4096, type=int, at_least=1,
        help="longest sequence scored (default 4096, SODA's context): longer pairs/questions are skipped and "
             "reported; NLL documents are scored in windows of this length")
    reduction: str = setting("mean", flag="--score", choices=("mean", "sum"),
                             help="a pair's score: mean (SODA) or sum of its tokens' log-probs")
    codebooks: str = setting("all", help="audio tokens a pair's score counts: all, semantic, or N (the first N "
                                         "codebooks)")
    limit: int | None = setting(None, type=int, at_least=1, help="at most N items per task (quick checks)")
    mcq_template: str = setting("{question}\nAnswer:",
                                help="question text before each option; {question} and {choices} are filled in "
                                     "(default: '{question}\\nAnswer:')")
    mcq_format: str = setting(
        "plain", choices=("plain", "instruct"),
        help="mcq likelihood: plain (default: each option after --mcq-template) or instruct (each option as "
             "'OPTION</answer>' after the instruction document's prompt and '<answer>': for models tuned by "
             "soda-finetune instruct)")
    mcq_mode: str = setting(
        "likelihood", choices=("likelihood", "generate"),
        help="mcq: likelihood (default; any model: each option's log-prob) or generate (instruction-tuned models: "
             "the model writes its answer, judged by the benchmarks' official scorers and a strict parser)")
    mcq_prompt: str = setting(
        "answer", choices=("answer", "mmsu"),
        help="mcq generate: answer (default; AudioMCQ/R1-AQA's '<answer> </answer>' instruction, as soda-finetune "
             "instruct trains; scored by MMAU/MMAR string_match) or mmsu (MMSU's 'A. ...' letter prompt and letter "
             "parser)")
    mcq_max_tokens: int = setting(128, type=int, at_least=1, metavar="N",
                                  help="mcq generate: longest answer in tokens (default 128)")
    mcq_permutations: int = setting(
        1, type=int, at_least=1, metavar="K",
        help="mcq likelihood: ask each item with its options in K orders (the original first, then seeded ones; "
             "only a --mcq-template with {choices} makes the order matter); reports the mean accuracy and the share "
             "right under all orders (default 1)")
    split_weak_strong: bool = setting(
        False, action="store_true",
        help="mcq: write OUT/mcq_weak.json (answerable without audio) and OUT/mcq_strong.json")
    judges: list = setting(  # checkpoints (or LoadedModel objects); default: the model
        factory=list, type=_judges, help="mcq: comma-separated judge checkpoints for the split (default: CHECKPOINT)")
    weak_votes: int | None = setting(  # weak = correct without audio for >= this many judges (default ceil(n/2))
        None, type=int, help="mcq: an item is weak when at least this many judges answer it without audio (default: "
                             "half of them, rounded up: 2 of 3)")
    codec_batch_seconds: float | None = setting(None, flag=False)  # audio per codec call (5 s on CPU, 120 s on GPU)
    generation_batch: int = setting(8, flag=False)  # prompts decoded together
    max_text_tokens: int = setting(256, flag=False)  # ASR transcript cap
    tts_asr: str = setting("whisper", help="tts: ASR backend for intelligibility: whisper[:MODEL] (default "
                                           "openai/whisper-large-v3, as SODA), pocketsphinx (offline, rough), self "
                                           "(the model's own ASR)")
    tts_speaker: str = setting("wavlm", help="tts: speaker encoder for similarity: wavlm[:MODEL] (default "
                                             "microsoft/wavlm-base-plus-sv), resemblyzer (offline), none")
    s2st_asr: str = setting("whisper", help="s2st: ASR backend for ASR-BLEU of the generated speech (as --tts-asr; "
                                            "default whisper)")
    s2st_speaker: str = setting("wavlm", help="s2st: speaker encoder for similarity of output and source speech (as "
                                              "--tts-speaker)")
    s2st_source_text: str = setting(
        "generated", choices=("generated", "given"),
        help="s2st: the model writes the source transcript itself (default, as trained) or is given the reference one")
    s2st_source_language: str | None = setting(  # for manifests without a source_language column
        None, flag="--source-language", metavar="SOURCE_LANGUAGE",
        help="s2st: source language for manifest rows without one (e.g. fr)")
    s2st_max_seconds: float = setting(
        30.0, type=float, help="s2st: longest target speech generated (default 30; a cap tied to the translation's "
                               "length applies too)")
    seed: int = setting(0, type=int, help="sampling seed of generation tasks (tts, s2st)")
    lm_eval_include: str | None = setting(None, metavar="DIR", help="a directory of lm-eval task YAMLs of your own")
    progress: bool = setting(True, flag="--quiet", action="store_false", help="no progress bars")

    def public(self) -> dict:
        return {"batch_tokens": self.batch_tokens, "max_len": self.max_len, "device": self.device,
                "codec_override": self.codec, "seed": self.seed}


class Context:
    """The model under evaluation and the shared machinery of its tasks."""

    def __init__(self, loaded, settings: EvalSettings, out: Path | None = None, codec=None):
        self.loaded, self.settings, self.out = loaded, settings, out
        if codec is not None:
            self.__dict__["codec"] = codec

    @property
    def vocab(self):
        return self.loaded.vocab

    def limited(self, items: list) -> list:
        """The first --limit items (all of them without a limit)."""
        return items[: self.settings.limit] if self.settings.limit else items

    @cached_property
    def codec(self):
        return self.loaded.load_codec()

    @property
    def family(self) -> str:
        """The model family: "flat" (a causal LM over flat ids) or "hierarchical" (`soda.hierarchical`)."""
        return FAMILY if is_hierarchical(self.loaded.model) else "flat"

    def log_probs(self, sequences, masks, desc: str) -> list[np.ndarray]:
        """Per-token log-probs of the marked positions (t >= 1) of flat id sequences, for either family; NaN where
        the hierarchical family gives none (`soda.evaluate.hierarchical`)."""
        if is_hierarchical(self.loaded.model):
            return hierarchical_log_probs(self.loaded.model, self.vocab, sequences, masks, self.settings.batch_tokens,
                                          self.settings.progress, desc)
        return token_log_probs(self.loaded.model, sequences, masks, self.settings.batch_tokens,
                               self.settings.progress, desc, pad_id=self.vocab.eos_id)

    def generate(self, requests: list, settings, codec=None, progress: bool = False) -> list:
        """`soda.generate.decode.generate` with the decoder of this model's family."""
        from soda.generate.decode import generate  # looked up now: tests replace it
        from soda.generate.hierarchical import decoder_for

        decoder = decoder_for(self.loaded.model)
        return generate(self.loaded, requests, settings, codec, progress,
                        **({"decoder": decoder} if decoder is not None else {}))

    # --- audio ---------------------------------------------------------------------------------
    @property
    def codec_batch_seconds(self) -> float:
        return self.settings.codec_batch_seconds or (120.0 if str(self.loaded.device).startswith("cuda") else 5.0)

    def load_wave(self, source, start: float | None = None, end: float | None = None) -> np.ndarray:
        """Audio at the codec's rate, cut to whole frames; SkipItem if unusable."""
        return codec_wave(self.codec, source, start, end)

    def encode(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Codes [K, F] per wave, encoded in batches of similar length (whole frames: batching is exact)."""
        return encode_waves(self.codec, waves, self.codec_batch_seconds, longest_first=True)

    def audio_codes(self, sources: list, desc: str = "encoding audio") -> list:
        """Codes for each source (a path, HFAudio, wave, or (source, start, end)), or why it is unusable (str)."""
        return audio_codes(self.codec, sources, self.codec_batch_seconds, desc, self.settings.progress)


@dataclass
class Task:
    name: str
    title: str  # shown in the Markdown table
    load: Callable  # (ctx, data: str | None) -> inputs; SodaError for user mistakes
    run: Callable  # (ctx, inputs) -> results entry (dict)
    data_help: str = ""
    soda_key: str | None = None  # column of SODA's published table
    percent: bool = True  # the metric is a share, shown in %
    audio: bool = False  # encodes audio: the codec is loaded before any task runs (a missing codec fails early)
    lower_is_better: bool = False


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def available() -> dict[str, Task]:
    """Every registered task (a task module not written yet is simply not offered)."""
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module}":
                raise  # a task module imports optional dependencies lazily, so this is a real bug
    return TASKS


# --- results entries ---------------------------------------------------------------------------
class Skips:
    """Items a task could not use, with reasons: counted in every result, never silently dropped."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, item, reason: str) -> None:
        self.items.append({"item": str(item), "reason": reason})

    def extend(self, records: list[dict], key: str = "item") -> "Skips":
        """Take over a reader's skip records ({key: ..., "reason": ...})."""
        for r in records:
            self.add(r[key], r["reason"])
        return self

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> dict:
        reasons = Counter(s["reason"].split(" (")[0] for s in self.items)
        return {"skipped_count": len(self.items), "skipped_reasons": dict(reasons.most_common()),
                "skipped": self.items[:MAX_LISTED_SKIPS]}


def entry(metric: str, value, count: int, skips: Skips, settings: dict, **extra) -> dict:
    """One task's results: its metric, how many items it rests on, what was skipped, how it was computed."""
    value = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return {"metric": metric, "value": value, "count": count, "total": count + len(skips), **extra,
            "settings": settings, **skips.summary()}


def share(numerator: int, denominator: int):
    return numerator / denominator if denominator else None
