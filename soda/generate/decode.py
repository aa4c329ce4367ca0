"""Prompt a trained model: audio continuation, TTS (optionally voice-prompted), ASR and speech-to-speech
translation, with codebook-aware, KV-cached decoding that always stops.

Use it from Python (evaluation and fine-tuning call this; `soda-generate` is its command line)::

    from soda.checkpoints import load_model
    from soda.generate.decode import generate, synthesize, transcribe, translate
    from soda.generate.prompts import GenerationSettings, Request, summarize

    loaded = load_model("runs/demo")                  # run dir, .ckpt, HF directory or hub id
    codec = loaded.load_codec()                       # the codec the model's audio ids came from
    texts = transcribe(loaded, codec, waves)          # ASR, greedy; waves at codec.sample_rate
    waves, ended = synthesize(loaded, codec, ["Hello there."], voice_prompts=[(voice_wave, "Its transcript.")])
    results = generate(loaded, [Request("s2st", audio=src_wave, source_language="fr", source_text="Bonjour.")],
                       GenerationSettings(temperature=0.8, seed=1), codec)
    results[0].text, results[0].wave, results[0].ended   # translation, target speech, "audio_end" / "silence" / ...
    translate(loaded, codec, waves, "fr", source_texts)  # S2ST for many waves -> Results
    summarize(results)                                   # endings counted, termination rate

Requests may mix tasks; they are decoded `GenerationSettings.batch_size` at a time and come back in input order.
Without a codec, requests must carry codes [K, F]; Results then hold codes, no waves (and silence is only
detected with `GenerationSettings.silence_codes`).

Prompts and requests are `soda.generate.prompts`.

Decoding is constrained: in audio, the k-th token of each frame may only be a codebook-k id and
`<|audio_end|>` may only come between frames (so frames are always whole); in text, only text ids (not
BOS/EOS) and `<|text_end|>`. Every output stops and says why (`Result.ended`):

    audio_end / text_end   the model closed the segment itself (this is "terminated")
    silence                `silence_seconds` of silence frames in a row (the run is cut from the audio)
    text_length_cap        TTS / S2ST audio reached `cap_base_seconds + cap_seconds_per_char * len(text)`
    max_seconds            audio reached `max_seconds` (or the request's own `max_seconds`)
    max_tokens             text reached `max_text_tokens`
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import deque

import numpy as np
import torch

from soda.generate.prompts import (GenerationSettings, Plan, Request, Result, build_plan, check_request,
                                   segment_text)
from tokenize_audio.errors import SodaError


class SequenceState:
    """One request's decoding state: which segment it is in, its position in the frame, caps, endings."""

    def __init__(self, plan: Plan, vocab, settings: GenerationSettings, frame_rate: float, silence: frozenset | None):
        self.v, self.s, self.frame_rate, self.silence = vocab, settings, frame_rate, silence
        self.phases = plan.phases
        self.generated: list[int] = []
        self.segments: list[list[int]] = []   # ids of each generated segment
        self.endings: list[str] = []
        self.trim = 0                         # silent frames to cut from the last audio segment
        self.done = False
        self.forced: deque = deque()
        self._start(0)

    def _start(self, i: int):
        self.phase, self.mode = i, self.phases[i].mode
        self.forced.extend(self.phases[i].prefix)
        self.segments.append([])
        self.silent_run = 0
        ph = self.phases[i]
        seconds = min(self.s.max_seconds, ph.max_seconds or math.inf)
        self.cap_reason = "max_seconds"
        if ph.spoken is not None or ph.speaks_previous:
            spoken = segment_text(self.v, self.segments[-2], self.phases[i - 1]) if ph.speaks_previous else ph.spoken
            text_cap = self.s.cap_base_seconds + self.s.cap_seconds_per_char * len(spoken)
            if text_cap < seconds:
                seconds, self.cap_reason = text_cap, "text_length_cap"
        self.max_frames = max(1, math.floor(seconds * self.frame_rate + 1e-6))

    @property
    def row(self) -> int:
        """Which allowed-id row applies now: codebook k in audio, n_codebooks in text."""
        return len(self.segments[-1]) % self.v.n_codebooks if self.mode == "audio" else self.v.n_codebooks

    def push(self, token: int, forced: bool):
        self.generated.append(token)
        if forced:
            return
        seg, v = self.segments[-1], self.v
        if self.mode == "text":
            if token == v.text_end:
                return self._end("text_end", [])
            seg.append(token)
            if len(seg) >= self.s.max_text_tokens:
                self._end("max_tokens", [v.text_end])
            return
        if token == v.audio_end:
            return self._end("audio_end", [])
        seg.append(token)
        if len(seg) % v.n_codebooks:
            return
        frames = len(seg) // v.n_codebooks
        if self.silence is not None and self.s.silence_seconds > 0:
            self.silent_run = self.silent_run + 1 if seg[-v.n_codebooks] - v.audio_base in self.silence else 0
            if self.silent_run >= max(1, round(self.s.silence_seconds * self.frame_rate)):
                self.trim = self.silent_run
                return self._end("silence", [v.audio_end])
        if frames >= self.max_frames:
            self._end(self.cap_reason, [v.audio_end])

    def _end(self, reason: str, closing: list):
        self.endings.append(reason)
        if self.phase + 1 == len(self.phases):
            self.done = True
        else:
            self.forced.extend(closing)
            self._start(self.phase + 1)


def allowed_table(vocab, n_logits: int, device) -> torch.Tensor:
    """[n_codebooks + 1, n_logits] bool: row k = what position k of an audio frame may emit; last row = text."""
    K, size = vocab.n_codebooks, vocab.codebook_size
    table = torch.zeros(K + 1, n_logits, dtype=torch.bool, device=device)
    for k in range(K):
        table[k, vocab.audio_base + k * size: vocab.audio_base + (k + 1) * size] = True
    table[0, vocab.audio_end] = True  # only between frames
    table[K, : vocab.text_size] = True
    table[K, [vocab.bos_id, vocab.eos_id]] = False
    table[K, vocab.text_end] = True
    return table


def sample_next(logits: torch.Tensor, table: torch.Tensor, seqs: list, live: list[int], settings: GenerationSettings,
                gen) -> torch.Tensor:
    """Each live row's next id: its logits limited to what its sequence may emit now (its `allowed_table` row),
    sampled at its phase's temperature (text or audio). Both families' decoders call it."""
    rows = torch.tensor([seqs[i].row for i in live], device=logits.device)
    temps = {"text": settings.text_temperature, "audio": settings.temperature}
    temperature = torch.tensor([temps[seqs[i].mode] for i in live], device=logits.device)
    return sample_ids(logits.masked_fill(~table[rows], -math.inf), temperature, settings.top_k, settings.top_p, gen)


def sample_ids(logits: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: float, gen) -> torch.Tensor:
    """One id per row: argmax where temperature is 0, else top-k / top-p sampling at that temperature."""
    greedy = logits.argmax(-1)
    if not bool((temperature > 0).any()):
        return greedy
    logits = logits / temperature.clamp(min=1e-5)[:, None]
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p   # keep the smallest set reaching top_p (always the first)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    sampled = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
    return torch.where(temperature > 0, sampled, greedy)


@torch.inference_mode()
def decode_batch(model, vocab, plans: list[Plan], settings: GenerationSettings, frame_rate: float,
                 silence: frozenset | None, gen: torch.Generator) -> list[SequenceState]:
    """Generate for several prompts at once (left-padded); finished rows leave the batch."""
    device = next(model.parameters()).device
    seqs = [SequenceState(p, vocab, settings, frame_rate, silence) for p in plans]
    longest = max(len(p.prompt) for p in plans)
    pad = vocab.eos_id
    ids = torch.full((len(plans), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(plans):
        ids[i, longest - len(p.prompt):] = torch.tensor(p.prompt, device=device)
        mask[i, longest - len(p.prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    if settings.use_cache:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    # transformers renamed `past_key_values` to `cache` during 5.x; pass it under the name this version takes
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    live = list(range(len(seqs)))  # batch row -> sequence
    inputs, input_pos, table = ids, positions, None
    while True:
        logits = model(input_ids=inputs, attention_mask=mask, position_ids=input_pos, **{cache_arg: cache},
                       use_cache=settings.use_cache, logits_to_keep=1).logits[:, -1].float()
        if table is None:
            table = allowed_table(vocab, logits.shape[-1], device)
        chosen = sample_next(logits, table, seqs, live, settings, gen).tolist()
        tokens = []
        for b, i in enumerate(live):
            s = seqs[i]
            forced = bool(s.forced)
            tokens.append(s.forced.popleft() if forced else chosen[b])
            s.push(tokens[-1], forced)
        keep = [b for b, i in enumerate(live) if not seqs[i].done]
        if not keep:
            break
        if len(keep) < len(live):  # drop finished rows from every tensor (and the cache)
            index = torch.tensor(keep, dtype=torch.long, device=device)
            if cache is not None:
                cache.batch_select_indices(index)
            ids, mask, positions = ids[index], mask[index], positions[index]
            tokens, live = [tokens[b] for b in keep], [live[b] for b in keep]
        step = torch.tensor(tokens, device=device)[:, None]
        mask = torch.cat([mask, torch.ones_like(step)], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        if cache is not None:
            inputs, input_pos = step, positions[:, -1:]
        else:
            ids = torch.cat([ids, step], 1)
            inputs, input_pos = ids, positions
    return seqs


@functools.lru_cache(maxsize=4)
def silence_codes(codec, fraction: float = 0.05) -> frozenset:
    """Codebook-0 codes the codec gives digital silence and very quiet noise (steady frames, >= `fraction`).

    Found once per codec (cached), by encoding 3 s of each; the first frames (the codec settling) are left out.
    """
    rng = np.random.default_rng(0)
    n = codec.samples_per_frame * 40
    quiet = [np.zeros(n, np.float32), (rng.standard_normal(n) * 3e-4).astype(np.float32)]
    found = np.concatenate([c[0, 5:] for c in codec.encode_batch(quiet)])
    values, counts = np.unique(found, return_counts=True)
    return frozenset(int(x) for x in values[counts >= fraction * len(found)])


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------
def _as_codes(x, codec, vocab, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
        if arr.shape[0] != vocab.n_codebooks:
            raise SodaError(f"{what}: codes have {arr.shape[0]} codebooks, the model uses {vocab.n_codebooks}")
        return arr
    if codec is None:
        raise SodaError(f"{what}: a wave needs a codec to encode it (pass codec=loaded.load_codec())")
    if arr.ndim != 1 or codec.whole_frames(len(arr)) < 1:
        raise SodaError(f"{what}: expected a mono wave of at least one codec frame "
                        f"({codec.samples_per_frame} samples at {codec.sample_rate} Hz)")
    return codec.encode(arr.astype(np.float32))


def generate(loaded, requests: list[Request], settings: GenerationSettings | None = None, codec=None,
             progress: bool = False, decoder=None) -> list[Result]:
    """Run `requests` (any mix of tasks) on `loaded` (from `soda.checkpoints.load_model`); results in input order.

    `codec` (e.g. `loaded.load_codec()`) encodes waves in the requests and decodes generated audio to
    `Result.wave`; without one, requests must carry codes and results carry codes only. Requests are
    batched `settings.batch_size` at a time (sorted by prompt length to limit padding). `progress` shows a
    tqdm bar over requests. Raises SodaError for a malformed request before generating anything. `decoder`
    replaces `decode_batch` (same arguments, returns its `SequenceState`s): the hierarchical family's
    `soda.generate.hierarchical.decode_hierarchical_batch` decodes the same plans.
    """
    results: list[Result | None] = [None] * len(requests)
    for i, result in generate_iter(loaded, requests, settings, codec, progress, decoder):
        results[i] = result
    return results


def generate_iter(loaded, requests: list[Request], settings: GenerationSettings | None = None, codec=None,
                  progress: bool = False, decoder=None):
    """`generate`, yielding (index in `requests`, Result) as each batch finishes, in the order decoded: a caller
    that writes each result out and drops it holds one batch of generated audio, whatever the number of requests."""
    settings = settings or GenerationSettings()
    vocab = loaded.vocab
    for r in requests:
        check_request(r)
    frame_rate = codec.frame_rate if codec is not None else settings.frame_rate
    silence = settings.silence_codes
    if silence is None and codec is not None and settings.silence_seconds > 0:
        silence = silence_codes(codec)
    plans = []
    for n, r in enumerate(requests):
        name = f"request {r.id if r.id is not None else n}"
        codes = {k: _as_codes(getattr(r, k), codec, vocab, f"{name} {k}") for k in ("audio", "voice_audio")
                 if getattr(r, k) is not None}
        plans.append(build_plan(vocab, r, codes))
    gen = torch.Generator(device=loaded.device).manual_seed(settings.seed)
    order = sorted(range(len(plans)), key=lambda i: len(plans[i].prompt))
    decode = decoder or decode_batch  # looked up now, so a patched `decode_batch` is the one used
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), unit="request", desc="generating")
    try:
        for start in range(0, len(order), settings.batch_size):
            chunk = order[start: start + settings.batch_size]
            seqs = decode(loaded.model, vocab, [plans[i] for i in chunk], settings, frame_rate, silence, gen)
            for i, s in zip(chunk, seqs):
                yield i, _result(requests[i], plans[i], s, vocab, codec, frame_rate)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def _result(r: Request, plan: Plan, s: SequenceState, vocab, codec, frame_rate: float) -> Result:
    out = Result(r.id, r.task, s.endings[-1], ids=s.generated, prompt_tokens=len(plan.prompt),
                 phase_endings=list(s.endings))
    texts = [segment_text(vocab, seg, ph) for seg, ph in zip(s.segments, s.phases) if ph.mode == "text"]
    if texts:
        out.text = texts[-1]
        out.source_text = texts[0] if len(texts) > 1 else ""
    if s.phases[-1].mode == "audio":
        codes = vocab.ids_to_codes(s.segments[-1])
        out.codes = codes[:, : codes.shape[1] - s.trim]
        out.seconds = out.codes.shape[1] / frame_rate
        if codec is not None:
            out.wave = codec.decode(out.codes) if out.codes.shape[1] else np.zeros(0, np.float32)
    return out


def transcribe(loaded, codec, waves, settings: GenerationSettings | None = None) -> list[str]:
    """ASR: one transcript per wave (mono, at codec.sample_rate), greedy unless settings say otherwise."""
    results = generate(loaded, [Request("asr", audio=w) for w in waves], settings, codec)
    return [r.text for r in results]


def synthesize(loaded, codec, texts, voice_prompts=None, settings: GenerationSettings | None = None):
    """TTS: (waves, endings) for `texts`; `voice_prompts` is None or one (wave, transcript) or None per text."""
    voices = voice_prompts or [None] * len(texts)
    if len(voices) != len(texts):
        raise SodaError(f"{len(texts)} texts but {len(voices)} voice prompts")
    requests = [Request("tts", text=t, voice_audio=v[0] if v else None, voice_text=v[1] if v else None)
                for t, v in zip(texts, voices)]
    results = generate(loaded, requests, settings, codec)
    return [r.wave for r in results], [r.ended for r in results]


def translate(loaded, codec, waves, source_language: str, source_texts=None, target_language: str = "en",
              settings: GenerationSettings | None = None) -> list[Result]:
    """S2ST with SODA's prompt: Result.text is the translation, Result.wave the target speech."""
    sources = source_texts or [None] * len(waves)
    requests = [Request("s2st", audio=w, source_language=source_language, source_text=t,
                        target_language=target_language) for w, t in zip(waves, sources)]
    return generate(loaded, requests, settings, codec)
