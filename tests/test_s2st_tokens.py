"""S2ST documents and prompts are token for token SODA's: its document string tokenized whole, where each
`<language>xx</language>text` is one string (under Llama-3's pre-tokenizer `</language>Bonjour` ends in the
piece `>Bonjour`, not `>` + `Bonjour`). Checked offline with byte-level BPEs split by Llama-3's regex."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from soda.generate.decode import generate
from soda.generate.prompts import GenerationSettings, Request, build_plan
from tokenize_audio.documents import language_prompt, language_tag, s2st_document, s2st_text
from tokenize_audio.vocab import BOS, EOS, Vocabulary, byte_tokenizer, train_bpe_tokenizer

K, CODES = 8, 64
# Copied from Meta-Llama-3's tokenizer.json (pre_tokenizer: Split isolated, then ByteLevel without its regex).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PAIRS = [  # (source language, source text, target language, target text): text starts of every regex class
    ("fr", "Bonjour tout le monde.", "en", "Hello everyone."),
    ("de", "1998 war ein gutes Jahr.", "en", "1998 was a good year."),
    ("es", "¿Dónde está la estación?", "en", '"Where is the station?"'),
    ("zh-CN", "你好，世界", "en", " Hi, world"),
    ("it", "'s Morgens", "en", "it's morning\nnow"),
]
CORPUS = [language_tag(lang) + text for s, st, t, tt in PAIRS for lang, text in ((s, st), (t, tt))] * 30 + [
    "<language>fr</language>Bonjour, merci beaucoup.", "<language>en</language>Hello, thank you very much."] * 30


def llama3_style_tokenizer() -> Tokenizer:
    """A byte-level BPE trained here, pre-tokenized exactly as Llama-3's tokenizer.json says."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, special_tokens=[BOS, EOS], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def no_pre_tokenizer() -> Tokenizer:
    """A BPE whose merges may cross anything: nothing of a tag is known to survive the text after it."""
    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.Fuse()  # pieces are raw text: decoding concatenates them
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=[BOS, EOS], show_progress=False))
    return tok


TOKENIZERS = {"llama3-style": llama3_style_tokenizer, "bpe:N": lambda: train_bpe_tokenizer(CORPUS, 700),
              "bytes": byte_tokenizer, "no-pre-tokenizer": no_pre_tokenizer}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def vocab(request):
    return Vocabulary.build(TOKENIZERS[request.param](), K, CODES, source=request.param)


@pytest.fixture(scope="module")
def hf_tokenizer(vocab, tmp_path_factory):
    """The exported `PreTrainedTokenizerFast` (audio one character per token): SODA's string tokenizer."""
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("vocab")
    vocab.save(directory)
    return PreTrainedTokenizerFast.from_pretrained(str(directory / "tokenizer"))


def codes(seed: int, frames: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CODES, (K, frames))


def soda_string(vocab, src, source_language, source_text, target_language, target_text, tgt) -> str:
    """SODA's S2ST document as the string it tokenizes (DESIGN.md §2)."""
    audio = lambda c: "".join(vocab.audio_char(i) for i in vocab.codes_to_ids(c))  # noqa: E731
    return (f"<|begin_of_text|><|audio_start|>{audio(src)}<|audio_end|><|text_start|><language>{source_language}"
            f"</language>{source_text}<|text_end|><|text_start|><language>{target_language}</language>{target_text}"
            f"<|text_end|><|audio_start|>{audio(tgt)}<|audio_end|><|end_of_text|>")


# --------------------------------------------------------------------------------------------
# The tokenizers under test
# --------------------------------------------------------------------------------------------
def test_bpe_n_splits_text_as_llama3_does():
    ours, reference = train_bpe_tokenizer(CORPUS, 700).pre_tokenizer, llama3_style_tokenizer().pre_tokenizer
    pieces = lambda pre, s: [p for p, _ in pre.pre_tokenize_str(s)]  # noqa: E731
    assert pieces(ours, "<language>fr</language>Bonjour") == ["<language", ">fr", "</", "language", ">Bonjour"]
    for text in CORPUS[:10] + ["I'LL pay 12345 dollars!!\n\n  ok  ", "tab\there"]:
        assert pieces(ours, text) == pieces(reference, text), text


def test_the_tag_encoded_alone_is_not_sodas_tokenization():
    """Why the tag and its text are encoded together: a Llama-3-style BPE merges across the tag's end."""
    v = Vocabulary.build(llama3_style_tokenizer(), K, CODES)
    whole = s2st_text(v, "fr", "Bonjour tout le monde.").tolist()
    apart = v.encode_text("<language>fr</language>").tolist() + v.encode_text("Bonjour tout le monde.").tolist()
    assert whole != apart
    assert ">Bonjour" in [v.decode_text([i]) for i in whole]


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(len(PAIRS)))
def test_s2st_document_is_sodas_string_tokenized_whole(vocab, hf_tokenizer, n):
    source_language, source_text, target_language, target_text = PAIRS[n]
    src, tgt = codes(n, 2), codes(n + 10, 3)
    ids, target_start = s2st_document(vocab, vocab.codes_to_ids(src), source_language, source_text,
                                      target_language, target_text, vocab.codes_to_ids(tgt))
    string = soda_string(vocab, src, source_language, source_text, target_language, target_text, tgt)
    assert ids.tolist() == hf_tokenizer(string, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == vocab.string_to_ids(string).tolist()
    assert vocab.ids_to_string(ids) == string
    assert ids[target_start - 1] == vocab.text_end and ids[target_start] == vocab.text_start
    # texts given as ids (decoded, then encoded with their tag) make the same document
    again, _ = s2st_document(vocab, vocab.codes_to_ids(src), source_language, vocab.encode_text(source_text),
                             target_language, vocab.encode_text(target_text), vocab.codes_to_ids(tgt))
    assert again.tolist() == ids.tolist()


def test_language_prompt_stops_where_every_text_agrees(vocab):
    for lang in ("fr", "en", "zh-CN"):
        tag, rest = language_prompt(vocab, lang)
        assert vocab.decode_text(tag) + rest == language_tag(lang)
        for _, text, _, other in PAIRS:
            for t in (text, other, "", "x", " ", "1", ">", "\n"):
                assert s2st_text(vocab, lang, t)[: len(tag)].tolist() == tag.tolist(), (lang, t)
    rest = language_prompt(vocab, "fr")[1]
    expected = {"llama3-style": ">", "bpe:N": ">", "bytes": "", "no-pre-tokenizer": "<language>fr</language>"}
    assert rest == expected[vocab.text_tokenizer_source]


def test_a_tokenizer_that_cannot_merge_keeps_the_plain_tag_ids():
    """Bytes: nothing joins the tag, so its ids are the tag's own and documents are the tag's ids + the text's."""
    v = Vocabulary.build(byte_tokenizer(), K, CODES)
    tag, rest = language_prompt(v, "fr")
    assert (tag.tolist(), rest) == (list(b"<language>fr</language>"), "")
    assert s2st_text(v, "fr", "Bonjour").tolist() == list(b"<language>fr</language>Bonjour")


# --------------------------------------------------------------------------------------------
# Prompts and generation
# --------------------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """A "model" whose greedy choice is always the next token of `document`; it checks that what it is fed
    (the prompt, then its own tokens and the forced ones) is that document's prefix."""

    def __init__(self, document: list[int], size: int):
        super().__init__()
        self.document, self.size = document, size
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate() reads the device from the parameters

    def forward(self, input_ids, **_):
        fed = input_ids[0].tolist()
        assert fed == self.document[: len(fed)], "the input left SODA's document"
        logits = torch.zeros(1, 1, self.size)
        logits[0, -1, self.document[len(fed)]] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("given", [True, False], ids=["source-text-given", "model-writes-source-text"])
@pytest.mark.parametrize("n", range(len(PAIRS)))
def test_s2st_prompt_is_a_prefix_and_generation_writes_sodas_document(vocab, given, n):
    source_language, source_text, target_language, target_text = PAIRS[n]
    src, tgt = codes(n, 2), codes(n + 10, 3)
    doc, _ = s2st_document(vocab, vocab.codes_to_ids(src), source_language, source_text, target_language,
                           target_text, vocab.codes_to_ids(tgt))
    doc = doc.tolist()
    request = Request("s2st", audio=src, source_language=source_language, source_text=source_text if given else None,
                      target_language=target_language)
    prompt = build_plan(vocab, request, {"audio": src}).prompt
    assert prompt == doc[: len(prompt)]
    # the prompt ends at the (fixed part of the) language tag of the text the model writes next
    tag, _ = language_prompt(vocab, target_language if given else source_language)
    assert prompt[len(prompt) - len(tag) - 1:] == [vocab.text_start, *tag.tolist()]

    loaded = SimpleNamespace(model=Oracle(doc, vocab.size), vocab=vocab, device=torch.device("cpu"))
    settings = GenerationSettings(temperature=0, use_cache=False, silence_seconds=0, cap_base_seconds=30,
                                  max_text_tokens=64)
    result = generate(loaded, [request], settings)[0]
    assert prompt + result.ids == doc[:-1]  # everything up to <|audio_end|>; EOS is never generated
    assert result.ended == "audio_end" and (result.codes == tgt).all()
    assert result.text == target_text  # the tag's remainder the model wrote is not part of the text
    assert result.source_text == ("" if given else source_text)
