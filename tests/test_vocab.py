"""Id layout (incl. SODA's exact ids), string form, round trips, token types, HF export."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from tokenize_audio.errors import SodaError
from tokenize_audio.vocab import (ACOUSTIC, AUDIO_END, AUDIO_START, BOS, EOS, SEMANTIC, SPECIAL, TEXT, TEXT_END,
                                  TEXT_START, Vocabulary, byte_tokenizer, export_hf_tokenizer, load_text_tokenizer,
                                  train_bpe_tokenizer)


def llama3_sized_tokenizer() -> Tokenizer:
    """Same id layout as Llama-3's: 128,000 BPE ids, then 256 specials starting with BOS/EOS."""
    vocab = {"[UNK]": 0} | {f"w{i}": i for i in range(1, 128000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [BOS, EOS] + [f"<|reserved_special_token_{i}|>" for i in range(254)]
    tok.add_special_tokens(specials)
    return tok


@pytest.fixture(scope="module")
def soda_vocab():
    return Vocabulary.build(llama3_sized_tokenizer(), 8, 2048, (0,), "llama3-layout")


@pytest.fixture(scope="module")
def byte_vocab():
    return Vocabulary.build(byte_tokenizer(), 8, 2048, (0,), "bytes")


def test_soda_ids_exact(soda_vocab):
    v = soda_vocab
    assert (v.text_size, v.bos_id, v.eos_id) == (128256, 128000, 128001)
    assert (v.text_start, v.text_end, v.audio_start, v.audio_end) == (128256, 128257, 128258, 128259)
    assert v.audio_base == 128260 and v.size == 144644
    assert v.audio_id(0, 0) == 128260 and v.audio_id(0, 2047) == 130307
    assert v.audio_id(1, 0) == 130308 and v.audio_id(7, 2047) == 144643
    assert v.audio_char(v.audio_id(3, 17)) == chr(0xE000 + 3 * 2048 + 17)


def test_generic_layout_follows_text_size(byte_vocab):
    v = byte_vocab
    assert (v.bos_id, v.eos_id, v.text_size) == (256, 257, 258)
    assert v.special_ids == {BOS: 256, EOS: 257, TEXT_START: 258, TEXT_END: 259, AUDIO_START: 260, AUDIO_END: 261}
    assert v.audio_base == 262 and v.size == 262 + 8 * 2048
    # A 4-codebook, 1024-code codec shrinks the audio range accordingly.
    small = Vocabulary.build(byte_tokenizer(), 4, 1024, (), "bytes")
    assert small.size == 262 + 4 * 1024


def test_frame_major_flattening(byte_vocab):
    codes = np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [15, 16]])
    ids = byte_vocab.codes_to_ids(codes)
    base = byte_vocab.audio_base
    assert list(ids[:8]) == [base + k * 2048 + codes[k, 0] for k in range(8)]  # frame 0: cb0..cb7
    assert list(ids[8:]) == [base + k * 2048 + codes[k, 1] for k in range(8)]
    np.testing.assert_array_equal(byte_vocab.ids_to_codes(ids), codes)
    with pytest.raises(ValueError):
        byte_vocab.codes_to_ids(np.full((8, 2), 2048))


codes_strategy = st.integers(1, 8).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(st.lists(st.integers(0, 2047), min_size=k, max_size=k), max_size=30))
)


@given(codes_strategy)
@settings(max_examples=60, deadline=None)
def test_codes_ids_string_round_trip(spec):
    k, frames = spec
    v = Vocabulary.build(llama3_sized_tokenizer_cached(), k, 2048, (0,), "llama3-layout")
    codes = np.array(frames, dtype=np.int64).reshape(-1, k).T if frames else np.zeros((k, 0), np.int64)
    ids = v.codes_to_ids(codes)
    string = v.ids_to_string(ids)
    assert len(string) == len(ids)  # one character per audio token
    np.testing.assert_array_equal(v.string_to_ids(string), ids)
    np.testing.assert_array_equal(v.ids_to_codes(v.string_to_ids(string)), codes)


_CACHE = {}


def llama3_sized_tokenizer_cached():
    if "t" not in _CACHE:
        _CACHE["t"] = llama3_sized_tokenizer()
    return _CACHE["t"]


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0xDFFF), max_size=40),
       st.lists(st.lists(st.integers(0, 2047), min_size=8, max_size=8), max_size=5))
@settings(max_examples=60, deadline=None)
def test_mixed_document_string_round_trip(byte_vocab, text, frames):
    v = byte_vocab
    codes = np.array(frames, dtype=np.int64).reshape(-1, 8).T if frames else np.zeros((8, 0), np.int64)
    ids = np.concatenate([[v.bos_id, v.text_start], v.encode_text(text), [v.text_end, v.audio_start],
                          v.codes_to_ids(codes), [v.audio_end, v.eos_id]]).astype(np.int64)
    string = v.ids_to_string(ids)
    assert string.startswith(BOS + TEXT_START + text + TEXT_END + AUDIO_START)
    np.testing.assert_array_equal(v.string_to_ids(string), ids)


def test_token_types(soda_vocab):
    v = soda_vocab
    ids = np.array([v.bos_id, 5, v.text_start, v.audio_id(0, 1), v.audio_id(1, 1), v.audio_id(7, 9), v.eos_id])
    assert list(v.token_types(ids)) == [SPECIAL, TEXT, SPECIAL, SEMANTIC, ACOUSTIC, ACOUSTIC, SPECIAL]
    assert list(v.codebook_of(ids)) == [-1, -1, -1, 0, 1, 7, -1]
    assert v.count_types(ids) == {"text": 1, "special": 3, "semantic": 1, "acoustic": 2}


def test_hf_export_matches_layout(tmp_path, byte_vocab):
    from transformers import PreTrainedTokenizerFast

    export_hf_tokenizer(byte_vocab, tmp_path / "tok")
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == byte_vocab.size
    assert tok.bos_token_id == byte_vocab.bos_id and tok.eos_token_id == byte_vocab.eos_id
    codes = np.arange(16).reshape(8, 2) * 100
    ids = np.concatenate([[byte_vocab.text_start], byte_vocab.encode_text("Hi there."), [byte_vocab.text_end,
                          byte_vocab.audio_start], byte_vocab.codes_to_ids(codes), [byte_vocab.audio_end]])
    string = byte_vocab.ids_to_string(ids)
    assert tok(string, add_special_tokens=False).input_ids == [int(i) for i in ids]
    assert tok(string).input_ids[0] == byte_vocab.bos_id  # BOS prepended, like SODA's tokenizer
    assert tok.decode([int(i) for i in ids]) == string


def test_hf_export_soda_layout(tmp_path, soda_vocab):
    from transformers import PreTrainedTokenizerFast

    export_hf_tokenizer(soda_vocab, tmp_path / "tok")
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == 144644
    assert tok.convert_tokens_to_ids([TEXT_START, AUDIO_END, chr(0xE000), chr(0xE000 + 16383)]) == [
        128256, 128259, 128260, 144643]
    # A SODA-style tokenizer (already holding specials and audio) is recognised, not extended again.
    again = Vocabulary.build(Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")), 8, 2048)
    assert (again.text_size, again.size, again.bos_id) == (128256, 144644, 128000)


def test_tokenizer_without_bos_eos_gets_them_appended():
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    v = Vocabulary.build(tok, 8, 2048, (0,), "tiny")
    assert (v.bos_id, v.eos_id, v.text_size, v.text_start) == (3, 4, 5, 5)


def test_text_tokenizer_choices(tmp_path):
    assert load_text_tokenizer("bytes").encode("A", add_special_tokens=False).ids == [65]
    bpe = load_text_tokenizer("bpe:300", iter(["hello world"] * 50 + ["the quick brown fox"] * 50))
    assert bpe.get_vocab_size() <= 300
    assert bpe.token_to_id(BOS) == 0 and bpe.token_to_id(EOS) == 1
    assert len(bpe.encode("hello world", add_special_tokens=False).ids) < len("hello world")
    path = tmp_path / "t.json"
    bpe.save(str(path))
    assert load_text_tokenizer(str(path)).to_str() == bpe.to_str()
    with pytest.raises(SodaError, match="not found"):
        load_text_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(SodaError, match="bpe:N"):
        load_text_tokenizer("bpe:many", [])


def test_hub_tokenizer_offline_is_one_clear_error():
    with pytest.raises(SodaError, match="offline"):
        load_text_tokenizer("llama3")


def test_bpe_is_deterministic():
    texts = ["one two three four", "five six seven", "the cat sat on the mat"] * 20
    assert train_bpe_tokenizer(texts, 300).to_str() == train_bpe_tokenizer(texts, 300).to_str()


def test_save_load(tmp_path, byte_vocab):
    byte_vocab.save(tmp_path)
    again = Vocabulary.load(tmp_path)
    assert again.to_dict() == byte_vocab.to_dict()
    assert list(again.encode_text("héllo")) == list(byte_vocab.encode_text("héllo"))
    with pytest.raises(SodaError, match="no vocabulary"):
        Vocabulary.load(tmp_path / "nothing")
