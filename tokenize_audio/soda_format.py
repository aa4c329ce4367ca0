"""The SODA string format: one document as a string of specials, text and one character per audio token
(`chr(0xE000 + k*2048 + code)`), taken apart and turned into the ids SODA's own tokenizer gives it.

Kept apart from the import (soda_strings.py) so a benchmark or a check can parse strings without reading corpora.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from tokenize_audio.errors import SkipItem
from tokenize_audio.vocab import AUDIO_CHAR_BASE, AUDIO_END, AUDIO_START, BOS, EOS, TEXT_END, TEXT_START, Vocabulary

SODA_CODEBOOK_SIZE = 2048  # code c of codebook k is chr(0xE000 + k*2048 + c) in SODA's strings
SODA_AUDIO_CHARS = 8 * SODA_CODEBOOK_SIZE  # the 16,384 audio characters of SODA's tokenizer
_AUDIO_CHAR = re.compile(f"[{chr(AUDIO_CHAR_BASE)}-{chr(AUDIO_CHAR_BASE + SODA_AUDIO_CHARS - 1)}]")
_SPECIAL = re.compile(r"(<\|[^<>|\s]*\|>)")  # anything shaped like a special; unknown names are errors
_SPAN_END = {TEXT_START: TEXT_END, AUDIO_START: AUDIO_END}


@dataclass
class Parsed:
    """A SODA string taken apart: (kind, text | audio character indices) spans in order, or plain text."""

    spans: list  # [("text", str) | ("audio", np.ndarray of k*2048+c) | ("plain", str)]
    form: str  # "text-first", "audio-first" or "text" (no spans: a text-corpus document)

    def recording_key(self) -> str:
        """The same for both forms of one document: its text spans in order and its audio spans in order."""
        texts = [s for kind, s in self.spans if kind != "audio"]
        digest = hashlib.sha1(json.dumps(texts, ensure_ascii=False).encode("utf-8"))
        for kind, s in self.spans:
            if kind == "audio":
                digest.update(len(s).to_bytes(8, "little") + s.astype("<u4").tobytes())
        return digest.hexdigest()


def parse_soda_string(text) -> Parsed:
    """Split a SODA string into spans; raise SkipItem (with the reason) for anything SODA's layout forbids."""
    if not isinstance(text, str) or not text:
        raise SkipItem("empty or not a string")
    spans: list = []
    open_span = None
    pieces = _SPECIAL.split(text)
    last = max((i for i, p in enumerate(pieces) if p), default=0)
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        if i % 2:  # a special
            if piece == BOS:
                if spans or open_span or any(pieces[:i]):
                    raise SkipItem(f"broken special: {BOS} inside the document")
            elif piece == EOS:
                if i != last:
                    raise SkipItem(f"broken special: {EOS} before the end of the document")
            elif piece in _SPAN_END:
                if open_span:
                    raise SkipItem(f"broken special: {piece} inside an open {open_span}")
                open_span = piece
                spans.append([("text" if piece == TEXT_START else "audio"), ""])
            elif piece in (TEXT_END, AUDIO_END):
                if open_span is None or _SPAN_END[open_span] != piece:
                    raise SkipItem(f"broken special: {piece} without its opening marker")
                open_span = None
            else:
                raise SkipItem(f"unknown special {piece[:40]}")
            continue
        if "<|" in piece or "|>" in piece:
            raise SkipItem(f"broken special near {piece[max(0, piece.find('<|')):][:30]!r}")
        if open_span == TEXT_START:
            if _AUDIO_CHAR.search(piece):
                raise SkipItem("audio character inside a text span")
            spans[-1][1] += piece
        elif open_span == AUDIO_START:
            spans[-1][1] += piece
        else:
            spans.append(["plain", piece])
    if open_span:
        raise SkipItem(f"broken special: {open_span} never closed")
    kinds = {kind for kind, _ in spans}
    if "plain" in kinds and kinds != {"plain"}:
        raise SkipItem("text outside <|text_start|>...<|text_end|> in a speech document")
    out = []
    for kind, body in spans:
        if kind == "audio":
            idx = np.frombuffer(body.encode("utf-32-le"), dtype="<u4").astype(np.int64) - AUDIO_CHAR_BASE
            if idx.size and (idx.min() < 0 or idx.max() >= SODA_AUDIO_CHARS):
                raise SkipItem("text inside an audio span")
            body = idx
        out.append((kind, body))
    if _AUDIO_CHAR.search("".join(b for k, b in out if k == "plain")):
        raise SkipItem("audio character outside an audio span")
    form = "text" if not out or out[0][0] == "plain" else f"{out[0][0]}-first"
    return Parsed(out, form)


def document_ids(vocab: Vocabulary, parsed: Parsed) -> np.ndarray:
    """The ids SODA's tokenizer gives the string (BOS/EOS once each); SkipItem for audio our vocabulary lacks."""
    k_per_frame = vocab.n_codebooks
    texts = [body for kind, body in parsed.spans if kind != "audio"]
    encoded = iter(vocab.text_tokenizer.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
    parts: list = [[vocab.bos_id]]
    for kind, body in parsed.spans:
        if kind == "audio":
            k, c = body // SODA_CODEBOOK_SIZE, body % SODA_CODEBOOK_SIZE
            bad = (k >= vocab.n_codebooks) | (c >= vocab.codebook_size)
            if bad.any():
                j = int(np.argmax(bad))
                raise SkipItem(f"audio character outside the vocabulary (codebook {k[j]}, code {c[j]}; "
                               f"{vocab.n_codebooks} codebooks of {vocab.codebook_size} kept)")
            if len(body) % k_per_frame:
                raise SkipItem(f"audio span of {len(body)} tokens cuts a frame ({k_per_frame} codebooks per frame)")
            order = k != np.arange(len(k)) % k_per_frame
            if order.any():
                j = int(np.argmax(order))
                raise SkipItem(f"audio span not frame-major (codebook {k[j]} at position {j}, expected "
                               f"{j % k_per_frame})")
            parts += [[vocab.audio_start], vocab.audio_base + k * vocab.codebook_size + c, [vocab.audio_end]]
        else:
            ids = next(encoded).ids
            parts += [ids] if kind == "plain" else [[vocab.text_start], ids, [vocab.text_end]]
    parts.append([vocab.eos_id])
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]).astype(np.uint32)


def text_pieces(text: str):
    """The text between a string's specials, audio characters removed (what `bpe:N` trains on)."""
    for piece in _SPECIAL.split(text)[::2]:
        piece = _AUDIO_CHAR.sub("", piece)
        if piece.strip():
            yield piece
