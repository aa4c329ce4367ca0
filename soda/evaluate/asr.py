"""ASR: the model transcribes speech 0-shot (`<|audio_start|>A<|audio_end|><|text_start|>`, greedy);
word error rate with jiwer after SODA's normalisation, over the whole set (errors / reference words).

Data: a LibriSpeech-style directory (`*.trans.txt` or same-stem `.txt` beside the audio), a JSONL
manifest (`audio`, `text`), or `hf:NAME[:CONFIG]:SPLIT`; default LibriSpeech test-clean from the hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from soda.evaluate.scoring import check_length
from soda.evaluate.tasks import Skips, Task, entry, register, share
from tokenize_audio.errors import SodaError

DEFAULT_DATA = "hf:openslr/librispeech_asr:clean:test"
# SODA's WER normalisation: drop these marks (straight and curly quotes included), collapse spaces, lower-case.
PUNCTUATION = re.compile(r"[.,!?;:\"'\-()\[\]{}\u2018\u2019\u201c\u201d]")


def normalize(text: str) -> str:
    return " ".join(PUNCTUATION.sub("", text).split()).lower()


def word_errors(references: list[str], hypotheses: list[str]) -> dict:
    """Corpus WER of normalised texts (references must be non-empty after normalising)."""
    import jiwer

    out = jiwer.process_words([normalize(r) for r in references], [normalize(h) for h in hypotheses])
    words = out.hits + out.substitutions + out.deletions
    return {"wer": out.wer, "substitutions": out.substitutions, "deletions": out.deletions,
            "insertions": out.insertions, "reference_words": words}


def check_jiwer(task: str) -> None:
    try:
        import jiwer  # noqa: F401
    except ImportError:
        raise SodaError(f"{task}: word error rates need jiwer (pip install jiwer)") from None


def generation_settings(ctx, **overrides):
    from soda.generate.prompts import GenerationSettings

    return GenerationSettings(seed=ctx.settings.seed, batch_size=ctx.settings.generation_batch, **overrides)


@dataclass
class Speech:
    utterances: list
    skips: Skips
    source: str


def load_speech(ctx, spec: str | None) -> Speech:
    from tokenize_audio.sources import read_inputs

    check_jiwer("asr")
    spec = spec or DEFAULT_DATA
    try:
        corpus = read_inputs([spec])
    except SodaError as err:
        hint = "; without hub access, pass --data-for asr=DIR (LibriSpeech-style)" if spec.startswith("hf:") else ""
        raise SodaError(f"asr: {err}{hint}") from None
    skips = Skips().extend(corpus.skipped, key="path")
    utterances = ctx.limited(corpus.utterances)
    if not utterances:
        raise SodaError(f"asr: no usable utterances in {spec}")
    return Speech(utterances, skips, spec)


def run_asr(ctx, data: Speech) -> dict:
    from soda.generate.prompts import Request

    usable, requests = [], []
    codes = ctx.audio_codes([(u.audio, u.start, u.end) for u in data.utterances], "asr: encoding")
    for u, c in zip(data.utterances, codes):
        reason = c if isinstance(c, str) else check_length(c.size + 4, ctx.settings.max_len)
        if not normalize(u.text):
            reason = "empty reference after normalisation"
        if reason is not None:
            data.skips.add(u.where, reason)
            continue
        usable.append(u)
        requests.append(Request("asr", audio=c, id=u.id))
    results = ctx.generate(requests, generation_settings(ctx, max_text_tokens=ctx.settings.max_text_tokens),
                       ctx.codec, progress=ctx.settings.progress) if requests else []
    how = {"data": data.source, "prompt": "BOS <|audio_start|>A<|audio_end|><|text_start|>", "decoding": "greedy",
           "max_text_tokens": ctx.settings.max_text_tokens, "codec": ctx.loaded.codec_label}
    return asr_entry(data, usable, [(r.text, r.ended) for r in results], how)


def asr_entry(data: Speech, usable: list, transcripts: list[tuple[str, str]], how: dict) -> dict:
    """The results entry of transcripts, for every model family: `transcripts` holds (text, why it stopped) per
    utterance of `usable`; `how` says how they were asked for."""
    refs, hyps = [u.text for u in usable], [text for text, _ in transcripts]
    scores = word_errors(refs, hyps) if refs else {"wer": None, "reference_words": 0}
    ended = {}
    for _, why in transcripts:
        ended[why] = ended.get(why, 0) + 1
    items = [{"id": u.id, "reference": ref, "hypothesis": hyp, "reference_normalized": normalize(ref),
              "hypothesis_normalized": normalize(hyp), "ended": why}
             for u, ref, hyp, (_, why) in zip(usable, refs, hyps, transcripts)]
    how = {**how, "normalisation": "SODA's: punctuation and quotes removed, spaces collapsed, lower-cased"}
    result = entry("WER (corpus, normalised)", scores.pop("wer"), len(usable), data.skips, how, **scores,
                   ended=ended, termination_rate=share(ended.get("text_end", 0), len(transcripts)))
    result["_items"] = items
    return result


register(Task("asr", "ASR (WER)", load_speech, run_asr, data_help="LibriSpeech-style directory, JSONL manifest or "
              f"hf:NAME[:CONFIG]:SPLIT; default {DEFAULT_DATA}", soda_key="asr", audio=True, lower_is_better=True))
