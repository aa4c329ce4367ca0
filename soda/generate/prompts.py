"""What generation is asked and gives back (`GenerationSettings`, `Request`, `Result`) and the prompt each request
becomes (`build_plan`); the decoding itself is `soda.generate.decode`.

Prompts are SODA's (each starts with BOS, as the training documents do):

    continue  <|audio_start|> A ...                                    -> audio
    tts       [<|text_start|> Tv <|text_end|> <|audio_start|> Av <|audio_end|>]   (voice prompt, optional)
              <|text_start|> T <|text_end|> <|audio_start|>           -> audio until <|audio_end|>
    asr       <|audio_start|> A <|audio_end|> <|text_start|>          -> text until <|text_end|>
    instruct  <|audio_start|> A <|audio_end|> <|text_start|> I <|text_end|> <|text_start|>
                                                                       -> response text until <|text_end|>
              (I the instruction; the prompt of `tokenize_audio.documents.instruct_document`)
    s2st      <|audio_start|> SRC <|audio_end|> <|text_start|><language>xx</language>src text <|text_end|>
              <|text_start|><language>en</language>                   -> target text, <|text_end|>,
              then <|audio_start|> is forced                          -> target audio until <|audio_end|>
              (without a source text the model first writes it, as ASR, before the translation)

S2ST prompts are prefixes of SODA's documents tokenized whole, where the tag and its text are one string:
a given source text is encoded with its tag, and a prompt that stops before a text the model writes stops
before the tag's last pre-tokenizer piece when the text can join it (Llama-3: `>Bonjour` is one piece), so
the model writes `>` with the text's first token (`tokenize_audio.documents.language_prompt`; with a byte
tokenizer nothing joins and the prompt keeps the whole tag). That `>` is not part of `Result.text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokenize_audio.documents import language_prompt, s2st_text
from tokenize_audio.errors import SodaError

TASKS = ("continue", "tts", "asr", "s2st", "instruct")
TERMINATED = ("audio_end", "text_end")  # the model stopped by itself
ENDINGS = ("audio_end", "text_end", "silence", "text_length_cap", "max_seconds", "max_tokens")


@dataclass
class GenerationSettings:
    """How to decode. `temperature` 0 means greedy; text (ASR, translation) is greedy unless `text_temperature`."""

    temperature: float = 0.8        # audio tokens
    text_temperature: float = 0.0   # text tokens
    top_k: int = 250                # 0: off
    top_p: float = 1.0              # 1: off
    seed: int = 0                   # same requests + same batch_size -> same outputs
    max_seconds: float = 30.0       # audio cap for every audio output
    cap_base_seconds: float = 2.0   # TTS / S2ST audio cap: base + per_char * characters of the text spoken
    cap_seconds_per_char: float = 0.2   # (5 characters/s, a third of a normal speaking rate)
    max_text_tokens: int = 256      # text cap
    silence_seconds: float = 2.0    # stop after this much silence in a row; 0: off
    silence_codes: frozenset | None = None  # codebook-0 codes that mean silence; None: found from the codec
    use_cache: bool = True          # KV cache (False recomputes the whole sequence each step: for checks)
    batch_size: int = 8
    frame_rate: float = 12.5        # used only when no codec is given (Mimi's rate)

    def __post_init__(self):
        if self.temperature < 0 or self.text_temperature < 0:
            raise SodaError("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise SodaError(f"top_p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0 or self.batch_size < 1 or self.max_text_tokens < 1 or self.max_seconds <= 0:
            raise SodaError("top_k must be >= 0; batch_size, max_text_tokens and max_seconds must be positive")
        if min(self.cap_base_seconds, self.cap_seconds_per_char, self.silence_seconds) < 0:
            raise SodaError("cap_base_seconds, cap_seconds_per_char and silence_seconds must be >= 0 "
                            "(silence_seconds 0: no silence stop)")


@dataclass
class Request:
    """One thing to generate. Audio is a mono float wave at the codec's sample rate, or codes [K, F] (ints)."""

    task: str                               # continue | tts | asr | s2st | instruct
    text: str | None = None                 # tts: the text to speak; instruct: the instruction
    audio: np.ndarray | None = None         # continue: the prompt; asr: the speech; s2st: the source speech;
                                            # instruct: the audio the instruction is about
    voice_audio: np.ndarray | None = None   # tts: a sample of the target voice ...
    voice_text: str | None = None           # ... and its transcript
    source_language: str | None = None      # s2st: e.g. "fr"
    source_text: str | None = None          # s2st: the source transcript (None: the model writes it first)
    target_language: str = "en"
    max_seconds: float | None = None        # this request's audio cap (e.g. continuation length)
    id: str | None = None


@dataclass
class Result:
    """What one request produced, and how it ended."""

    id: str | None
    task: str
    ended: str                  # why the output stopped (see soda.generate.decode)
    text: str = ""              # asr: transcript; s2st: translation
    source_text: str = ""       # s2st without a given source text: what the model transcribed
    codes: np.ndarray | None = None   # generated audio codes [K, F] (tts, continue, s2st)
    wave: np.ndarray | None = None    # decoded `codes` at the codec's sample_rate (when a codec is given)
    seconds: float = 0.0        # generated audio duration
    ids: list = field(default_factory=list)  # every id after the prompt, forced ones included
    prompt_tokens: int = 0
    phase_endings: list = field(default_factory=list)  # per segment generated, e.g. ["text_end", "audio_end"]

    @property
    def terminated(self) -> bool:
        return self.ended in TERMINATED


def summarize(results: list[Result]) -> dict:
    """How the outputs ended: counts per reason, and the termination rate (model stopped by itself)."""
    counts = {e: 0 for e in ENDINGS}
    for r in results:
        counts[r.ended] += 1
    n = len(results)
    return {"outputs": n, "ended": counts, "termination_rate": sum(r.terminated for r in results) / n if n else None,
            "audio_seconds": round(sum(r.seconds for r in results), 3)}


@dataclass
class Phase:
    """One segment to generate after the prompt, in text or audio."""

    mode: str                   # "text" or "audio"
    prefix: list                # ids forced before it (e.g. <|audio_start|>)
    spoken: str | None = None   # audio: the text it speaks (for the length cap); None: no text cap
    max_seconds: float | None = None
    speaks_previous: bool = False  # audio: it speaks the text generated just before (S2ST)
    rest: str = ""              # text: tag text the model writes before the text itself (`language_prompt`)


@dataclass
class Plan:
    """A request's prompt ids and the segments to generate after it, in order."""

    prompt: list
    phases: list


def build_plan(vocab, request: Request, codes: dict) -> Plan:
    """The prompt ids and the segments to generate; `codes` holds the request's audio as codes [K, F]."""
    v, r = vocab, request
    audio = lambda c: [v.audio_start, *v.codes_to_ids(c).tolist()]  # noqa: E731
    text = lambda t: [v.text_start, *v.encode_text(t).tolist(), v.text_end]  # noqa: E731
    p = [v.bos_id]
    if r.task == "continue":
        return Plan(p + audio(codes["audio"]), [Phase("audio", [], None, r.max_seconds)])
    if r.task == "tts":
        if r.voice_audio is not None:
            p += text(r.voice_text) + audio(codes["voice_audio"]) + [v.audio_end]
        return Plan(p + text(r.text) + [v.audio_start], [Phase("audio", [], r.text, r.max_seconds)])
    if r.task == "asr":
        return Plan(p + audio(codes["audio"]) + [v.audio_end, v.text_start], [Phase("text", [])])
    if r.task == "instruct":
        return Plan(p + audio(codes["audio"]) + [v.audio_end] + text(r.text) + [v.text_start], [Phase("text", [])])
    # s2st: [source text,] target text, target audio (its length cap follows the generated translation);
    # prefixes of SODA's whole-string tokenization (module docstring)
    p += audio(codes["audio"]) + [v.audio_end, v.text_start]
    target_tag, target_rest = language_prompt(v, r.target_language)
    target = [v.text_start, *target_tag.tolist()]
    audio_phase = Phase("audio", [v.audio_start], None, r.max_seconds, speaks_previous=True)
    if r.source_text is not None:
        p += s2st_text(v, r.source_language, r.source_text).tolist() + [v.text_end] + target
        return Plan(p, [Phase("text", [], rest=target_rest), audio_phase])
    source_tag, source_rest = language_prompt(v, r.source_language)
    return Plan(p + source_tag.tolist(), [Phase("text", [], rest=source_rest),
                                           Phase("text", target, rest=target_rest), audio_phase])


def segment_text(vocab, ids: list, phase: Phase) -> str:
    """A generated text segment, without the tag text the model wrote first (`Phase.rest`)."""
    text = vocab.decode_text(ids)
    return text[len(phase.rest):] if text.startswith(phase.rest) else text


def check_request(r: Request) -> None:
    """Raise SodaError for a request that cannot be built (missing fields, unknown task)."""
    if r.task not in TASKS:
        raise SodaError(f"unknown task {r.task!r}; choose from {', '.join(TASKS)}")
    need = {"continue": ["audio"], "tts": ["text"], "asr": ["audio"], "s2st": ["audio", "source_language"],
            "instruct": ["audio", "text"]}[r.task]
    missing = [name for name in need if getattr(r, name) is None]
    if missing:
        raise SodaError(f"{r.task} request{f' {r.id}' if r.id else ''} needs {' and '.join(missing)}")
    if r.task == "tts" and (r.voice_audio is None) != (r.voice_text is None):
        raise SodaError("a TTS voice prompt needs both its audio and its transcript (voice_audio, voice_text)")
