"""Interleaving formats: one recording's utterances (text ids, audio ids) -> one token document.

text-first:  BOS (<|text_start|> T <|text_end|> <|audio_start|> A <|audio_end|>)* EOS
audio-first: BOS (<|audio_start|> A <|audio_end|> <|text_start|> T <|text_end|>)* EOS
audio-only:  BOS (<|audio_start|> A <|audio_end|>)* EOS
text-only:   BOS (<|text_start|> T <|text_end|>)* EOS
A plain text corpus document (the text share of the mixture) is BOS T EOS, as in SODA.

Speech-to-speech translation (SODA's fine-tuning on CVSS-T), one document per pair:
s2st:        BOS <|audio_start|> SRC <|audio_end|> <|text_start|> <language>xx</language>S <|text_end|>
             <|text_start|> <language>en</language>T <|text_end|> <|audio_start|> TGT <|audio_end|> EOS
             (each `<language>xx</language>S` is encoded as one string, as SODA does)

Audio instruction following (`soda-finetune instruct`, `soda-generate instruct`), one document per item:
instruct:    BOS <|audio_start|> A <|audio_end|> <|text_start|> I <|text_end|> <|text_start|> R <|text_end|> EOS
             (I the instruction, R the response; the loss scores R, its <|text_end|> and EOS: everything after
             the document's first <|text_end|>, the same rule as S2ST's --target-only-loss)
A multiple-choice item becomes an instruction with AudioMCQ's (R1-AQA's) template and the response
`<answer>OPTION TEXT</answer>` (`mcq_instruction`, `mcq_response`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from tokenize_audio.vocab import Vocabulary

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


def language_tag(code: str) -> str:
    """SODA's language tag, `<language>xx</language>`: plain text, written straight before the text it labels."""
    return f"<language>{code}</language>"


def s2st_text(vocab: Vocabulary, code: str, text: str) -> np.ndarray:
    """One S2ST text segment's ids: the tag and the text encoded as one string, as SODA tokenizes its documents.

    Not the tag's ids followed by the text's: under Llama-3's pre-tokenizer `</language>Bonjour` ends in the
    piece `>Bonjour`, which the tag encoded alone would end as `>`.
    """
    return vocab.encode_text(language_tag(code) + text).astype(np.int64)


def language_prompt(vocab: Vocabulary, code: str) -> tuple[np.ndarray, str]:
    """(ids, rest): the ids that begin `s2st_text(vocab, code, text)` for every text, and the tag's remainder.

    A prompt that stops at a language tag (the model writes the text after it) must still be a prefix of
    the training documents. Tokens never cross a pre-tokenizer split, so all the tag's pieces but the last
    are fixed; the last (`>` under Llama-3's regex) can join the text (`>Bonjour`), so when some vocabulary
    entry could run past it the prompt stops before it and `rest` (`">"`) is the tag text the model writes
    with its first token. Where nothing can (a byte tokenizer) the whole tag is fixed and `rest` is "".
    """
    tag, tok = language_tag(code), vocab.text_tokenizer
    normalized = tok.normalizer.normalize_str(tag) if tok.normalizer else tag
    if tok.pre_tokenizer is None or normalized != tag:  # offsets unknown: only the empty prefix is safe
        pieces = [(tag, (0, len(tag)))]
    else:
        pieces = tok.pre_tokenizer.pre_tokenize_str(tag)
    last, (start, _) = pieces[-1]
    if not _may_join_next(tok, last):
        return vocab.encode_text(tag), ""
    return vocab.encode_text(tag[:start]), tag[start:]


@functools.lru_cache(maxsize=8)  # per tokenizer object: Llama-3's scan is 128k entries, and prompts ask per request
def _may_join_next(tokenizer, piece: str) -> bool:
    """Whether a vocabulary entry starts inside `piece` (pre-tokenized form) and runs past its end.

    A token crossing the piece's end must start inside it, so without one the piece's tokens are fixed.
    """
    ends = [piece[i:] for i in range(len(piece))]
    return any(len(t) > len(e) and t.startswith(e) for t in tokenizer.get_vocab(with_added_tokens=False) for e in ends)


def s2st_document(vocab: Vocabulary, source_audio: np.ndarray, source_language: str, source_text: str | np.ndarray,
                  target_language: str, target_text: str | np.ndarray, target_audio: np.ndarray) -> tuple[np.ndarray, int]:
    """One S2ST pair (audio ids, texts) -> (uint32 document ids, index of the first target token).

    Token for token SODA's document string tokenized whole: specials and audio atomic, each text segment
    (`<language>xx</language>text`) one string (`s2st_text`). Texts given as ids are decoded first (exact
    where decoding is lossless, as with byte-level BPEs). The target is everything after the source text's
    `<|text_end|>`: the target text segment, the target audio segment and EOS (what `--target-only-loss`
    scores).
    """
    text = lambda t: t if isinstance(t, str) else vocab.decode_text(t)  # noqa: E731
    source = [[vocab.bos_id, vocab.audio_start], source_audio, [vocab.audio_end, vocab.text_start],
              s2st_text(vocab, source_language, text(source_text)), [vocab.text_end]]
    target = [[vocab.text_start], s2st_text(vocab, target_language, text(target_text)),
              [vocab.text_end, vocab.audio_start], target_audio, [vocab.audio_end, vocab.eos_id]]
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in source + target]).astype(np.uint32)
    return ids, sum(len(p) for p in source)


def instruct_document(vocab: Vocabulary, audio: np.ndarray, instruction: str, response: str
                      ) -> tuple[np.ndarray, int]:
    """One instruction item (audio ids, texts) -> (uint32 document ids, index of the first response token).

    The prompt (everything before the response) is exactly `soda.generate`'s `instruct` prompt, so a model
    tuned on these documents is asked the way it was taught."""
    prompt = [[vocab.bos_id, vocab.audio_start], audio, [vocab.audio_end, vocab.text_start],
              vocab.encode_text(instruction), [vocab.text_end, vocab.text_start]]
    answer = [vocab.encode_text(response), [vocab.text_end, vocab.eos_id]]
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompt + answer]).astype(np.uint32)
    return ids, sum(len(p) for p in prompt) - 1  # the response segment's <|text_start|> is scored too


# AudioMCQ's prompt (R1-AQA's dataset.py; its system line is not used: the native model has no chat roles)
MCQ_INSTRUCTION = ("{question} Please choose the answer from the following options: {options}. "
                   "Output the final answer in <answer> </answer>.")


def mcq_instruction(question: str, choices: list[str]) -> str:
    """A multiple-choice question as an instruction (the options as Python writes a list, as R1-AQA does)."""
    return MCQ_INSTRUCTION.format(question=question.strip(), options=str([c.strip() for c in choices]))


def mcq_response(answer: str) -> str:
    """The trained (and rewarded) answer form: the option's text inside <answer> tags."""
    return f"<answer>{answer.strip()}</answer>"


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
