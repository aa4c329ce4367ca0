"""TTS: the model speaks texts (optionally in the voice of a prompt); we judge what came out.

Reported: intelligibility (WER of an ASR backend's transcript against the text, SODA's normalisation),
speaker similarity (cosine of speaker embeddings of the output and the voice prompt), and the
termination rate (share of outputs the model ended itself with `<|audio_end|>` before a cap). Every
prompt counts in the WER, stopped or not, so a model that never stops cannot look better by it.
Sampling follows SODA's script (temperature 0.9, top-p 0.8, and transformers' default top-k 50, which
it left on); the outputs are kept in OUT/tts/.

Data: seed-tts-eval's `meta.lst` (`id|prompt text|prompt wav|text`, paths relative to the file), a
JSONL of `{"text", "voice_audio"?, "voice_text"?, "id"?}`, or a .txt file with one text per line.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soda.evaluate import backends
from soda.evaluate.asr import check_jiwer, generation_settings, normalize, word_errors
from soda.evaluate.tasks import Skips, Task, entry, register, share
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_write_bytes


@dataclass
class Prompt:
    id: str
    text: str
    voice_audio: str | None = None
    voice_text: str | None = None


@dataclass
class Prompts:
    prompts: list[Prompt]
    skips: Skips
    source: str
    transcribe: object  # ASR backend
    embed: object  # speaker backend or None


def read_prompts(spec: str, skips: Skips) -> list[Prompt]:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SodaError(f"--data-for tts={spec}: no such file (a seed-tts-eval meta.lst, .jsonl or .txt)")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is not part of the first field
    except (UnicodeDecodeError, OSError) as err:
        raise SodaError(f"{path}: unreadable ({err})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        where = f"{path.name}:{n}"
        if not line.strip():
            continue
        if path.suffix == ".lst":
            fields = line.split("|")
            if len(fields) < 4 or not fields[3].strip():
                skips.add(where, "expected id|prompt text|prompt wav|text")
                continue
            prompts.append(Prompt(fields[0], fields[3].strip(), str(path.parent / fields[2]), fields[1].strip()))
        elif path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                text = row.get("text")
            except (json.JSONDecodeError, AttributeError):
                skips.add(where, "not a JSON object")
                continue
            if not isinstance(text, str) or not text.strip():
                skips.add(row.get("id", where), "no text")
                continue
            voice = row.get("voice_audio")
            prompts.append(Prompt(str(row.get("id", where)), text.strip(), voice and str(path.parent / voice),
                                  row.get("voice_text")))
        else:
            prompts.append(Prompt(where, line.strip()))
    return prompts


def load_tts(ctx, spec: str | None) -> Prompts:
    if spec is None:
        raise SodaError("tts: give --data-for tts=FILE (seed-tts-eval's en/meta.lst, a .jsonl or a .txt of texts)")
    check_jiwer("tts")
    skips = Skips()
    prompts = ctx.limited(read_prompts(spec, skips))
    if not prompts:
        raise SodaError(f"tts: no usable prompts in {spec}")
    transcribe = backends.build(backends.ASR, "--tts-asr", ctx.settings.tts_asr, ctx)
    embed = backends.build(backends.SPEAKER, "--tts-speaker", ctx.settings.tts_speaker, ctx)
    return Prompts(prompts, skips, spec, transcribe, embed)


def _wav_bytes(wave: np.ndarray, sr: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV")
    return buf.getvalue()


def judge_speech(ctx, folder: str, ids: list[str], results, codec, transcribe, embed, voices: list) -> tuple:
    """What TTS and S2ST share once speech is generated: each output saved as OUT/FOLDER/ID.wav, the non-empty
    ones transcribed by the ASR backend (empty outputs get ""), and the cosine similarity of each output's
    speaker embedding to its voice reference (an audio path; None where there is no reference or output)."""
    waves = [r.wave if r.wave is not None else np.zeros(0, np.float32) for r in results]
    if ctx.out is not None:
        for item_id, wave in zip(ids, waves):
            name = re.sub(r"[^\w.-]", "_", item_id)
            atomic_write_bytes(ctx.out / folder / f"{name}.wav", _wav_bytes(wave, codec.sample_rate))
    heard = [i for i, w in enumerate(waves) if len(w)]
    texts = [""] * len(waves)
    for i, text in zip(heard, transcribe([waves[i] for i in heard], codec.sample_rate) if heard else []):
        texts[i] = text
    similarity = [None] * len(waves)
    pairs = [i for i in heard if voices[i]]
    if embed is not None and pairs:
        generated = embed([waves[i] for i in pairs], codec.sample_rate)
        reference = embed([ctx.load_wave(voices[i]) for i in pairs], codec.sample_rate)
        for i, a, b in zip(pairs, generated, reference):
            similarity[i] = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return texts, similarity


def run_tts(ctx, data: Prompts) -> dict:
    from soda.generate.prompts import Request

    codec, settings = ctx.codec, ctx.settings
    voiced = [p for p in data.prompts if p.voice_audio]
    codes = dict(zip((id(p) for p in voiced), ctx.audio_codes([p.voice_audio for p in voiced], "tts: voice prompts")))
    usable, requests = [], []
    for p in data.prompts:
        voice = codes.get(id(p))
        if not normalize(p.text):
            reason = "empty text after normalisation"
        elif voice is not None and not p.voice_text:
            reason = "a voice prompt needs its transcript"
        else:
            reason = f"voice prompt: {voice}" if isinstance(voice, str) else None
        if reason is not None:
            data.skips.add(p.id, reason)
            continue
        usable.append(p)
        requests.append(Request("tts", text=p.text, voice_audio=voice, voice_text=p.voice_text, id=p.id))
    sampling = generation_settings(ctx, temperature=0.9, top_p=0.8, top_k=50)
    results = ctx.generate(requests, sampling, codec, progress=settings.progress)
    texts, similarity = judge_speech(ctx, "tts", [p.id for p in usable], results, codec, data.transcribe,
                                     data.embed, [p.voice_audio for p in usable])
    scores = word_errors([p.text for p in usable], texts) if usable else {"wer": None}
    sims = [s for s in similarity if s is not None]
    ended = {}
    for r in results:
        ended[r.ended] = ended.get(r.ended, 0) + 1
    termination = share(ended.get("audio_end", 0), len(results))
    mean_sim = float(np.mean(sims)) if sims else None
    items = [{"id": p.id, "text": p.text, "transcript": t, "ended": r.ended, "seconds": round(r.seconds, 3),
              "similarity": s} for p, t, r, s in zip(usable, texts, results, similarity)]
    how = {"data": data.source, "asr_backend": settings.tts_asr, "speaker_backend": settings.tts_speaker,
           "sampling": "temperature 0.9, top-p 0.8, top-k 50 (SODA's script with transformers' default top-k)",
           "seed": settings.seed, "codec": ctx.loaded.codec_label,
           "similarity_of": "output vs its voice prompt (items with a voice prompt and non-empty output)"}
    also = [{"metric": "speaker similarity (cosine)", "value": mean_sim, "count": len(sims), "soda_key": "tts_sim",
             "percent": False},
            {"metric": "termination rate (ended with <|audio_end|>)", "value": termination, "count": len(results),
             "soda_key": None, "percent": True}]
    result = entry(f"WER (ASR: {settings.tts_asr})", scores.pop("wer"), len(usable), data.skips, how, **scores,
                   speaker_similarity=mean_sim, termination_rate=termination, ended=ended,
                   audio_seconds=round(sum(r.seconds for r in results), 3), also=also)
    result["_items"] = items
    return result


register(Task("tts", "TTS", load_tts, run_tts, data_help="seed-tts-eval meta.lst (id|prompt text|prompt wav|text), "
              ".jsonl or .txt of texts", soda_key="tts_wer", audio=True, lower_is_better=True))
