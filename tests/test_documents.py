"""Interleaving formats, segment splitting, and the hashed validation hold-out."""

from __future__ import annotations

import numpy as np
import pytest

from tokenize_audio.documents import build_document, holdout_score, split_segments, text_document, validation_recordings
from tokenize_audio.vocab import Vocabulary, byte_tokenizer


@pytest.fixture(scope="module")
def v():
    return Vocabulary.build(byte_tokenizer(), 2, 4, (0,), "bytes")  # 2 codebooks x 4 codes: easy to read


def test_formats(v):
    a1 = v.codes_to_ids(np.array([[0, 1], [2, 3]]))  # two frames
    a2 = v.codes_to_ids(np.array([[3], [0]]))
    utts = [(np.array([104, 105]), a1), (np.array([33]), a2)]
    B, E, TS, TE, AS, AE = v.bos_id, v.eos_id, v.text_start, v.text_end, v.audio_start, v.audio_end
    assert list(build_document(v, utts, "text-first")) == [
        B, TS, 104, 105, TE, AS, *a1, AE, TS, 33, TE, AS, *a2, AE, E]
    assert list(build_document(v, utts, "audio-first")) == [
        B, AS, *a1, AE, TS, 104, 105, TE, AS, *a2, AE, TS, 33, TE, E]
    assert list(build_document(v, utts, "audio-only")) == [B, AS, *a1, AE, AS, *a2, AE, E]
    assert list(build_document(v, utts, "text-only")) == [B, TS, 104, 105, TE, TS, 33, TE, E]
    assert list(text_document(v, np.array([1, 2]))) == [B, 1, 2, E]
    assert build_document(v, utts, "text-first").dtype == np.uint32
    with pytest.raises(ValueError):
        build_document(v, utts, "interleaved")


def test_split_segments_inverts_documents(v):
    a1 = v.codes_to_ids(np.array([[0, 1], [2, 3]]))
    doc = build_document(v, [(v.encode_text("hi"), a1), (v.encode_text("yo"), a1)], "audio-first")
    segs = split_segments(v, doc)
    assert [s.kind for s in segs] == ["audio", "text", "audio", "text"]
    assert v.decode_text(segs[1].ids) == "hi" and v.decode_text(segs[3].ids) == "yo"
    np.testing.assert_array_equal(v.ids_to_codes(segs[0].ids), [[0, 1], [2, 3]])
    # A cut-off audio segment keeps whole frames only.
    truncated = doc[: 1 + 1 + 3]  # BOS, audio_start, 3 audio ids
    assert len(split_segments(v, truncated)[0].ids) == 2


def test_holdout_is_stable_and_independent_of_other_recordings():
    ids = [f"speaker{i}/chapter{j}" for i in range(50) for j in range(40)]
    held = validation_recordings(ids, 0.05)
    # Same id -> same side, whatever else is in the corpus.
    assert validation_recordings(ids[:700], 0.05) == {r for r in held if r in set(ids[:700])}
    assert held == validation_recordings(list(reversed(ids)), 0.05)
    assert 0.03 < len(held) / len(ids) < 0.07
    assert all((holdout_score(r) < 0.05) == (r in held) for r in ids)


def test_tiny_corpus_holds_out_at_least_one():
    assert len(validation_recordings(["a", "b", "c"], 0.002)) == 1
    assert validation_recordings(["a", "b", "c"], 0.0) == set()
    assert validation_recordings([], 0.002) == set()
