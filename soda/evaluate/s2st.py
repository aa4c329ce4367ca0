"""S2ST: the model translates source speech into target speech (SODA's prompt); we judge content and voice.

Reported: ASR-BLEU (sacrebleu corpus BLEU of an ASR backend's transcript of the generated target speech
against the reference translation: the content metric of CVSS/SODA), BLEU of the generated target text
itself (what the model wrote before speaking it), speaker similarity between the source speech and the
generated speech (cosine of speaker embeddings: voice preservation), and the termination rate (outputs
the model ended itself with `<|audio_end|>`). Every pair counts in both BLEUs, stopped or not. Both
sides are normalised as SODA's WER is (punctuation dropped, lower-cased), since ASR output has no
punctuation. By default the model is given no source transcript (it writes one first, as trained);
`--s2st-source-text given` puts the reference transcript into the prompt instead. Outputs: OUT/s2st/.

Data: a CVSS-style manifest (see `tokenize_audio.s2st`): TSV or JSONL of source audio, source text, source
language, target text, target audio (the target audio is not needed here but kept for one format).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from soda.evaluate import backends
from soda.evaluate.asr import generation_settings, normalize
from soda.evaluate.tasks import Skips, Task, entry, register
from soda.evaluate.tts import judge_speech
from tokenize_audio.errors import SodaError


@dataclass
class S2STData:
    pairs: list
    skips: Skips
    source: str
    transcribe: object  # ASR backend
    embed: object  # speaker backend or None


def check_sacrebleu() -> None:
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        raise SodaError("s2st: BLEU needs sacrebleu (pip install sacrebleu)") from None


def bleu(references: list[str], hypotheses: list[str]) -> tuple[float, str]:
    """sacrebleu corpus BLEU (0-100) of normalised texts, and its signature."""
    import sacrebleu

    metric = sacrebleu.BLEU()
    score = metric.corpus_score([normalize(h) for h in hypotheses], [[normalize(r) for r in references]])
    return score.score, str(metric.get_signature())


def load_s2st(ctx, spec: str | None) -> S2STData:
    from tokenize_audio.s2st import read_pairs

    if spec is None:
        raise SodaError("s2st: give --data-for s2st=MANIFEST (a CVSS-style TSV or JSONL of pairs)")
    check_sacrebleu()
    read = read_pairs(spec, ctx.settings.s2st_source_language)
    skips = Skips().extend(read.skipped)
    pairs = ctx.limited(read.pairs)
    if not pairs:
        raise SodaError(f"s2st: no usable pairs in {spec} ({len(skips)} rows skipped)")
    transcribe = backends.build(backends.ASR, "--s2st-asr", ctx.settings.s2st_asr, ctx)
    embed = backends.build(backends.SPEAKER, "--s2st-speaker", ctx.settings.s2st_speaker, ctx)
    return S2STData(pairs, skips, read.source, transcribe, embed)


def run_s2st(ctx, data: S2STData) -> dict:
    from soda.generate.prompts import Request, summarize

    codec, settings = ctx.codec, ctx.settings
    given = settings.s2st_source_text == "given"
    codes = ctx.audio_codes([p.source_audio for p in data.pairs], "s2st: source audio")
    usable, requests = [], []
    for p, c in zip(data.pairs, codes):
        if isinstance(c, str):
            data.skips.add(p.id, f"source audio: {c}")
            continue
        if not normalize(p.target_text):
            data.skips.add(p.id, "empty reference translation after normalisation")
            continue
        usable.append(p)
        requests.append(Request("s2st", audio=c, source_language=p.source_language, target_language=p.target_language,
                                source_text=p.source_text if given else None, id=p.id))
    decoding = generation_settings(ctx, max_text_tokens=settings.max_text_tokens, max_seconds=settings.s2st_max_seconds)
    results = ctx.generate(requests, decoding, codec, progress=settings.progress) if requests else []
    transcripts, similarity = judge_speech(ctx, "s2st", [p.id for p in usable], results, codec, data.transcribe,
                                           data.embed, [p.source_audio for p in usable])
    references = [p.target_text for p in usable]
    asr_bleu, signature = bleu(references, transcripts) if usable else (None, None)
    text_bleu = bleu(references, [r.text for r in results])[0] if usable else None
    sims = [s for s in similarity if s is not None]
    mean_sim = float(np.mean(sims)) if sims else None
    summary = summarize(results)
    items = [{"id": p.id, "source_text": p.source_text, "reference": p.target_text, "translation": r.text,
              "transcribed_source": r.source_text, "asr_transcript": t, "ended": r.ended,
              "seconds": round(r.seconds, 3), "similarity": s}
             for p, r, t, s in zip(usable, results, transcripts, similarity)]
    how = {"data": data.source, "asr_backend": settings.s2st_asr, "speaker_backend": settings.s2st_speaker,
           "source_text": "given in the prompt" if given else "written by the model first",
           "decoding": "text greedy; audio temperature 0.8, top-k 250 (soda.generate defaults)",
           "max_seconds": settings.s2st_max_seconds, "seed": settings.seed,
           "bleu": signature, "normalisation": "SODA's WER normalisation on both sides", "codec": ctx.loaded.codec_label,
           "similarity_of": "generated target speech vs the source speech (items with non-empty output)"}
    also = [{"metric": "BLEU of the generated target text", "value": text_bleu, "count": len(usable),
             "soda_key": None, "percent": False},
            {"metric": "speaker similarity to the source (cosine)", "value": mean_sim, "count": len(sims),
             "soda_key": None, "percent": False},
            {"metric": "termination rate (ended with <|audio_end|>)", "value": summary["termination_rate"],
             "count": len(results), "soda_key": None, "percent": True}]
    result = entry(f"ASR-BLEU (ASR: {settings.s2st_asr})", asr_bleu, len(usable), data.skips, how,
                   asr_bleu=asr_bleu, text_bleu=text_bleu, speaker_similarity=mean_sim,
                   termination_rate=summary["termination_rate"], ended=summary["ended"],
                   audio_seconds=summary["audio_seconds"], also=also)
    result["_items"] = items
    return result


register(Task("s2st", "S2ST", load_s2st, run_s2st, data_help="CVSS-style manifest (TSV or JSONL: source_audio, "
              "source_text, source_language, target_text, target_audio)", percent=False, audio=True))
