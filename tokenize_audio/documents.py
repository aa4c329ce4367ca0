"""Interleaving formats: one recording's utterances (text ids, audio ids) -> one token document.

text-first:  BOS (<|text_start|> T <|text_end|> <|audio_start|> A <|audio_end|>)* EOS
audio-first: BOS (<|audio_start|> A <|audio_end|> <|text_start|> T <|text_end|>)* EOS
audio-only:  BOS (<|audio_start|> A <|audio_end|>)* EOS
text-only:   BOS (<|text_start|> T <|text_end|>)* EOS
A plain text corpus document (the text share of the mixture) is BOS T EOS, as in SODA.

Speech-to-speech translation (SODA's fine-tuning on CVSS-T), one document per pair:
s2st:        BOS <|audio_start|> SRC <|audio_end|> <|text_start|> <language>xx</language> S <|text_end|>
             <|text_start|> <language>en</language> T <|text_end|> <|audio_start|> TGT <|audio_end|> EOS
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .vocab import Vocabulary

FORMATS = ("text-first", "audio-first", "audio-only", "text-only")
DEFAULT_FORMATS = ("text-first", "audio-first")


@dataclass
class Segment:
    """A run of one kind inside a document: text ids or audio codes."""

    kind: str  # "text" or "audio"
    ids: np.ndarray


def build_document(vocab: Vocabulary, utterances: list[tuple[np.ndarray, np.ndarray]], fmt: str) -> np.ndarray:
    """`utterances` = [(text_ids, audio_ids), ...] in time order -> uint32 document ids."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    text_open, text_close = [vocab.text_start], [vocab.text_end]
    audio_open, audio_close = [vocab.audio_start], [vocab.audio_end]
    parts: list = [[vocab.bos_id]]
    for text_ids, audio_ids in utterances:
        text = [text_open, text_ids, text_close]
        audio = [audio_open, audio_ids, audio_close]
        parts += {"text-first": text + audio, "audio-first": audio + text,
                  "audio-only": audio, "text-only": text}[fmt]
    parts.append([vocab.eos_id])
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]).astype(np.uint32)


def language_tag(vocab: Vocabulary, code: str) -> np.ndarray:
    """`<language>xx</language>` as text ids, encoded on its own (the S2ST documents and prompts share it)."""
    return vocab.encode_text(f"<language>{code}</language>").astype(np.int64)


def s2st_document(vocab: Vocabulary, source_audio: np.ndarray, source_language: str, source_text: np.ndarray,
                  target_language: str, target_text: np.ndarray, target_audio: np.ndarray) -> tuple[np.ndarray, int]:
    """One S2ST pair (audio ids, text ids) -> (uint32 document ids, index of the first target token).

    The target is everything after the source text's `<|text_end|>`: the target text segment, the target
    audio segment and EOS (what `--target-only-loss` scores).
    """
    source = [[vocab.bos_id, vocab.audio_start], source_audio, [vocab.audio_end, vocab.text_start],
              language_tag(vocab, source_language), source_text, [vocab.text_end]]
    target = [[vocab.text_start], language_tag(vocab, target_language), target_text,
              [vocab.text_end, vocab.audio_start], target_audio, [vocab.audio_end, vocab.eos_id]]
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in source + target]).astype(np.uint32)
    return ids, sum(len(p) for p in source)


def text_document(vocab: Vocabulary, text_ids: np.ndarray) -> np.ndarray:
    return np.concatenate([[vocab.bos_id], np.asarray(text_ids, dtype=np.int64), [vocab.eos_id]]).astype(np.uint32)


def split_segments(vocab: Vocabulary, ids: np.ndarray) -> list[Segment]:
    """Undo `build_document`: the text and audio segments of a document, in order.

    Audio segments are cut to whole frames. Tokens outside any segment (BOS, EOS, plain text of a
    text-corpus document) come back as text segments too.
    """
    out: list[Segment] = []
    kind, run = "text", []

    def flush():
        nonlocal run
        if run:
            arr = np.asarray(run, dtype=np.int64)
            if kind == "audio":
                arr = arr[: len(arr) // vocab.n_codebooks * vocab.n_codebooks]
            out.append(Segment(kind, arr))
        run = []

    for i in (int(x) for x in ids):
        if i in (vocab.text_start, vocab.audio_start):
            flush()
            kind = "text" if i == vocab.text_start else "audio"
        elif i in (vocab.text_end, vocab.audio_end):
            flush()
            kind = "text"
        elif i not in (vocab.bos_id, vocab.eos_id):
            run.append(i)
    flush()
    return out


def holdout_score(recording_id: str) -> float:
    """A stable number in [0, 1) from the recording id: the same id always lands on the same side."""
    digest = hashlib.sha1(recording_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def validation_recordings(recording_ids, fraction: float) -> set[str]:
    """Recordings held out for validation: score < fraction; at least one if there are any."""
    ids = sorted(set(recording_ids))
    held = {r for r in ids if holdout_score(r) < fraction}
    if not held and ids and fraction > 0:
        held = {min(ids, key=holdout_score)}
    return held
