"""The task registry and what every task shares: the model, its codec, the scoring settings.

A task is two functions: `load(ctx, data)` reads its inputs and raises SodaError for user
mistakes (so a wrong path fails in seconds, before any scoring), and `run(ctx, loaded)` scores
them and returns one results entry. New benchmarks (ASR and TTS through `soda.generate`) plug in by
calling `register` from their own module and being listed in `BUILTIN_MODULES`.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from soda.evaluate.scoring import token_log_probs
from tokenize_audio.errors import SkipItem
from tokenize_audio.sources import load_audio

BUILTIN_MODULES = ("pairs", "nll", "mcq", "asr", "tts", "s2st", "lm_eval")
AUDIO_BLOCK = 256  # clips read and encoded at a time
MAX_LISTED_SKIPS = 1000  # results.json lists this many skipped items per task (all are counted)


@dataclass
class Settings:
    batch_tokens: int = 16384  # padded tokens per forward pass
    max_len: int = 4096  # longer sequences are skipped (pairs, MCQ) or scored in windows (NLL)
    reduction: str = "mean"  # mean | sum of the scored tokens' log-probabilities (pairs)
    codebooks: str = "all"  # all | semantic | N: which audio tokens a pair's score counts
    limit: int | None = None  # at most this many items per task
    progress: bool = True
    device: str = "auto"
    codec: str | None = None  # overrides the codec recorded with the model (and its judges)
    mcq_template: str = "{question}\nAnswer:"
    split_weak_strong: bool = False
    judges: list = field(default_factory=list)  # checkpoints (or LoadedModel objects); default: the model
    weak_votes: int | None = None  # weak = correct without audio for >= this many judges (default ceil(n/2))
    codec_batch_seconds: float | None = None  # audio per codec call (default 5 s on CPU, 120 s on GPU)
    seed: int = 0  # generation (ASR, TTS)
    generation_batch: int = 8  # prompts decoded together
    max_text_tokens: int = 256  # ASR transcript cap
    tts_asr: str = "whisper"  # how TTS output is transcribed: whisper[:MODEL], pocketsphinx, self
    tts_speaker: str = "wavlm"  # speaker embeddings for similarity: wavlm[:MODEL], resemblyzer, none
    s2st_asr: str = "whisper"  # how S2ST output speech is transcribed for ASR-BLEU (same backends as tts_asr)
    s2st_speaker: str = "wavlm"  # speaker encoder for S2ST voice preservation (same backends as tts_speaker)
    s2st_source_text: str = "generated"  # generated: the model transcribes the source first; given: the reference
    s2st_source_language: str | None = None  # for manifests without a source_language column
    s2st_max_seconds: float = 30.0  # cap on each generated target speech (the text-length cap also applies)
    lm_eval_include: str | None = None  # a directory of lm-eval task YAMLs of one's own (lm-eval tasks)

    def public(self) -> dict:
        return {"batch_tokens": self.batch_tokens, "max_len": self.max_len, "device": self.device,
                "codec_override": self.codec, "seed": self.seed}


class Context:
    """The model under evaluation and the shared machinery of its tasks."""

    def __init__(self, loaded, settings: Settings, out: Path | None = None, codec=None):
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

    def log_probs(self, sequences, masks, desc: str) -> list[np.ndarray]:
        return token_log_probs(self.loaded.model, sequences, masks, self.settings.batch_tokens,
                               self.settings.progress, desc, pad_id=self.vocab.eos_id)

    # --- audio ---------------------------------------------------------------------------------
    def load_wave(self, source, start: float | None = None, end: float | None = None) -> np.ndarray:
        """Audio at the codec's rate, cut to whole frames; SkipItem if unusable."""
        if isinstance(source, np.ndarray):
            wave = source.astype(np.float32)
        else:
            wave = load_audio(source, self.codec.sample_rate, start, end)
        frames = self.codec.whole_frames(len(wave))
        if frames < 1:
            raise SkipItem(f"shorter than one codec frame ({len(wave)} samples)")
        return wave[: frames * self.codec.samples_per_frame]

    def encode(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Codes [K, F] per wave, encoded in batches of similar length (whole frames: batching is exact)."""
        seconds = self.settings.codec_batch_seconds or (120.0 if str(self.loaded.device).startswith("cuda") else 5.0)
        budget = max(1, int(seconds * self.codec.sample_rate))
        order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
        out: list[np.ndarray | None] = [None] * len(waves)
        start = 0
        while start < len(order):
            chunk = order[start:start + max(1, budget // max(len(waves[order[start]]), 1))]
            for i, codes in zip(chunk, self.codec.encode_batch([waves[i] for i in chunk])):
                out[i] = codes
            start += len(chunk)
        return out

    def audio_codes(self, sources: list, desc: str = "encoding audio") -> list:
        """Codes for each source (a path, HFAudio, wave, or (source, start, end)), or why it is unusable (str).

        Audio is read and encoded a block at a time: only the codes of a whole benchmark stay in memory.
        """
        from tqdm import tqdm

        out: list = []
        with tqdm(total=len(sources), desc=desc, unit="clip", disable=not self.settings.progress, leave=False,
                  dynamic_ncols=True) as bar:
            for first in range(0, len(sources), AUDIO_BLOCK):
                waves, slots = [], []
                for source in sources[first:first + AUDIO_BLOCK]:
                    try:
                        waves.append(self.load_wave(*source) if isinstance(source, tuple) else self.load_wave(source))
                        slots.append(len(waves) - 1)
                    except SkipItem as err:
                        slots.append(str(err))
                codes = self.encode(waves)
                out += [slot if isinstance(slot, str) else codes[slot] for slot in slots]
                bar.update(len(slots))
        return out


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
