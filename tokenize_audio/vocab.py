"""The token-id layout: text ids first, then four specials, then audio ids `base + k*codebook_size + code`.

With a Llama-3 text tokenizer (128,256 ids) this reproduces SODA's ids exactly: `<|text_start|>`
128256 … `<|audio_end|>` 128259, audio from 128260, 144,644 in total. SODA's released tokenizer
writes each audio token as one character `chr(0xE000 + k*2048 + code)`; `ids_to_string` /
`string_to_ids` convert to and from that form, and `export_hf_tokenizer` writes a tokenizer that
`transformers.PreTrainedTokenizerFast` loads with the same ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tokenize_audio.errors import SodaError, first_line

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
TEXT_START, TEXT_END, AUDIO_START, AUDIO_END = SPECIALS = (
    "<|text_start|>",
    "<|text_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
)
AUDIO_CHAR_BASE = 0xE000
LLAMA3_HUB_ID = "meta-llama/Meta-Llama-3-8B"
# Llama-3's pre-tokenizer regex (from its tokenizer.json). `bpe:N` splits text with it too, so an offline BPE
# cuts SODA's strings where Llama-3 does (e.g. `</language>Bonjour` -> `</`, `language`, `>Bonjour`).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
TEXT_TOKENIZER_CHOICES = "bytes, bpe:N (trained on the corpus text), llama3, a tokenizer.json file, a tokenizer directory, or a hub id"

# Token types used for counting and for the NLL vector.
TEXT, SPECIAL, SEMANTIC, ACOUSTIC = 0, 1, 2, 3
TYPE_NAMES = {TEXT: "text", SPECIAL: "special", SEMANTIC: "semantic", ACOUSTIC: "acoustic"}
_BOS_CANDIDATES = (BOS, "<s>", "<bos>", "<|startoftext|>")
_EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|endoftext|>")


# --------------------------------------------------------------------------------------------
# Text tokenizers
# --------------------------------------------------------------------------------------------
def byte_tokenizer() -> Tokenizer:
    """A plain byte tokenizer (256 byte ids, no merges) with BOS/EOS: needs no data and no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_order = sorted(alphabet, key=lambda ch: _byte_of_char()[ch])
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_order)}, merges=[]))
    _byte_level(tok)
    tok.add_special_tokens([BOS, EOS])
    return tok


def _byte_of_char() -> dict[str, int]:
    # GPT-2's bytes_to_unicode mapping, inverted: printable stand-in character -> byte value.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_level(tok: Tokenizer) -> None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()


def llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Llama-3's pre-tokenizer: its regex split (pieces kept whole), then the byte-level map without GPT-2's regex."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_bpe_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on the corpus text: an offline stand-in for Llama-3's, pre-tokenized as it is."""
    if vocab_size < 260:
        raise SodaError(f"bpe:{vocab_size}: a byte-level BPE needs a vocabulary of at least 260")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = llama3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_text_tokenizer(spec: str, corpus_texts=None) -> Tokenizer:
    """Resolve `--text-tokenizer`: bytes | bpe:N | llama3 | FILE.json | DIR | hub id."""
    if spec == "bytes":
        return byte_tokenizer()
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise SodaError(f"--text-tokenizer {spec}: expected bpe:N with N an integer, e.g. bpe:8000") from None
        if corpus_texts is None:
            raise SodaError("--text-tokenizer bpe:N needs corpus text to train on")
        return train_bpe_tokenizer(corpus_texts, size)
    source = LLAMA3_HUB_ID if spec == "llama3" else spec
    path = Path(source).expanduser()
    if path.is_file():
        return _tokenizer_from_file(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise SodaError(f"text tokenizer directory {path} has no tokenizer.json")
        return _tokenizer_from_file(path / "tokenizer.json")
    if source.startswith((".", "/", "~")) or source.endswith(".json") or source.count("/") != 1:
        raise SodaError(f"text tokenizer {spec!r} not found; choose {TEXT_TOKENIZER_CHOICES}")
    try:
        return Tokenizer.from_pretrained(source)
    except Exception as err:
        reason = first_line(err, 200) or type(err).__name__
        raise SodaError(
            f"could not load the text tokenizer {source!r} from the hub ({reason}); download its tokenizer.json "
            f"and pass the file or directory, or use --text-tokenizer bytes / bpe:N offline"
        ) from None


def _tokenizer_from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise SodaError(f"{path}: not a tokenizers JSON file ({str(err)[:200]})") from None


# --------------------------------------------------------------------------------------------
# The vocabulary
# --------------------------------------------------------------------------------------------
@dataclass
class Vocabulary:
    """Maps text, the four specials and codec codes into one id space (see module docstring)."""

    text_tokenizer: Tokenizer
    text_size: int
    bos_id: int
    eos_id: int
    n_codebooks: int
    codebook_size: int
    semantic_codebooks: tuple[int, ...] = (0,)
    text_tokenizer_source: str = ""
    _added_bos_eos: bool = field(default=False, repr=False)

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def build(cls, text_tokenizer: Tokenizer, n_codebooks: int, codebook_size: int,
              semantic_codebooks=(0,), source: str = "") -> "Vocabulary":
        """Lay out ids after `text_tokenizer`; BOS/EOS are found in it or appended as text ids."""
        vocab = text_tokenizer.get_vocab(with_added_tokens=True)
        if TEXT_START in vocab:  # a SODA-style tokenizer that already holds the specials (and audio)
            text_size = vocab[TEXT_START]
            for i, name in enumerate(SPECIALS):
                if vocab.get(name) != text_size + i:
                    raise SodaError(f"text tokenizer {source}: {name} is not at id {text_size + i} as the layout needs")
        else:
            text_size = max(vocab.values()) + 1
        added = False
        bos = next((vocab[t] for t in _BOS_CANDIDATES if t in vocab), None)
        eos = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
        if bos is None or eos is None:
            if TEXT_START in vocab:
                raise SodaError(f"text tokenizer {source}: has the SODA specials but no BOS/EOS token")
            # No document markers: append SODA's own as the last text ids.
            missing = [t for t, have in ((BOS, bos), (EOS, eos)) if have is None]
            text_tokenizer.add_special_tokens(missing)
            vocab = text_tokenizer.get_vocab(with_added_tokens=True)
            bos = vocab[BOS] if bos is None else bos
            eos = vocab[EOS] if eos is None else eos
            text_size = max(vocab.values()) + 1
            added = True
        return cls(text_tokenizer, text_size, bos, eos, n_codebooks, codebook_size,
                   tuple(semantic_codebooks), source, added)

    # --- the layout ----------------------------------------------------------------------------
    @property
    def text_start(self) -> int:
        return self.text_size

    @property
    def text_end(self) -> int:
        return self.text_size + 1

    @property
    def audio_start(self) -> int:
        return self.text_size + 2

    @property
    def audio_end(self) -> int:
        return self.text_size + 3

    @property
    def audio_base(self) -> int:
        return self.text_size + 4

    @property
    def size(self) -> int:
        return self.audio_base + self.n_codebooks * self.codebook_size

    @property
    def special_ids(self) -> dict[str, int]:
        ids = {BOS: self.bos_id, EOS: self.eos_id}
        ids.update({name: self.text_size + i for i, name in enumerate(SPECIALS)})
        return ids

    def audio_id(self, codebook: int, code: int) -> int:
        return self.audio_base + codebook * self.codebook_size + code

    # --- codes <-> ids -------------------------------------------------------------------------
    def codes_to_ids(self, codes: np.ndarray) -> np.ndarray:
        """codes [K, F] -> frame-major ids (cb0, cb1, ..., cbK-1 of frame 0, then frame 1, ...)."""
        codes = np.asarray(codes, dtype=np.int64)
        k = codes.shape[0]
        if k != self.n_codebooks:
            raise ValueError(f"expected {self.n_codebooks} codebooks, got {k}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        offsets = self.audio_base + np.arange(k)[:, None] * self.codebook_size
        return (codes + offsets).T.reshape(-1)

    def ids_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """Frame-major audio ids -> codes [K, F]; a trailing partial frame is dropped."""
        ids = np.asarray(ids, dtype=np.int64)
        k = self.n_codebooks
        frames = len(ids) // k
        ids = ids[: frames * k].reshape(frames, k).T
        codes = ids - self.audio_base - np.arange(k)[:, None] * self.codebook_size
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError("ids are not frame-major audio ids of this vocabulary")
        return codes

    # --- text ----------------------------------------------------------------------------------
    def encode_text(self, text: str) -> np.ndarray:
        return np.asarray(self.text_tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode_text(self, ids) -> str:
        return self.text_tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # --- token types ---------------------------------------------------------------------------
    def token_types(self, ids: np.ndarray) -> np.ndarray:
        """TEXT / SPECIAL / SEMANTIC / ACOUSTIC per id (BOS, EOS and the four markers are SPECIAL)."""
        ids = np.asarray(ids, dtype=np.int64)
        types = np.full(ids.shape, TEXT, dtype=np.int8)
        types[(ids >= self.text_size) & (ids < self.audio_base)] = SPECIAL
        types[(ids == self.bos_id) | (ids == self.eos_id)] = SPECIAL
        audio = ids >= self.audio_base
        cb = self.codebook_of(ids)
        types[audio] = ACOUSTIC
        types[audio & np.isin(cb, list(self.semantic_codebooks))] = SEMANTIC
        return types

    def codebook_of(self, ids: np.ndarray) -> np.ndarray:
        """Codebook index of each audio id, -1 elsewhere."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.where(ids >= self.audio_base, (ids - self.audio_base) // self.codebook_size, -1)

    def nll_groups(self) -> list[str]:
        """Names of the groups the NLL vector is reported in: text, special, then one per codebook (the semantic
        one named so). Training logs and soda-eval's NLL task use the same groups, so their figures compare."""
        names = ["text", "special"]
        for k in range(self.n_codebooks):
            names.append("semantic" if k in self.semantic_codebooks and len(self.semantic_codebooks) == 1
                         else f"{'semantic' if k in self.semantic_codebooks else 'acoustic'}_cb{k}")
        return names

    def nll_group_of(self, targets):
        """Index into `nll_groups()` of every target id: 0 text, 1 special (BOS/EOS/markers), 2+k codebook k.
        Works on torch tensors (on any device) and numpy arrays alike."""
        special = ((targets >= self.text_size) & (targets < self.audio_base)) | (targets == self.bos_id)
        special = special | (targets == self.eos_id)
        audio = targets >= self.audio_base
        return special * 1 + audio * (2 + (targets - self.audio_base) // self.codebook_size)

    def count_types(self, ids: np.ndarray) -> dict[str, int]:
        counts = np.bincount(self.token_types(ids), minlength=4)
        return {TYPE_NAMES[t]: int(counts[t]) for t in TYPE_NAMES}

    # --- SODA's string form --------------------------------------------------------------------
    def audio_char(self, audio_id: int) -> str:
        return chr(AUDIO_CHAR_BASE + audio_id - self.audio_base)

    def ids_to_string(self, ids) -> str:
        """ids -> SODA's string: text decoded, specials by name, one character per audio token."""
        names = {v: k for k, v in self.special_ids.items()}
        out: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            if i in names or i >= self.audio_base:
                if run:
                    out.append(self.decode_text(run))
                    run = []
                out.append(names[i] if i in names else self.audio_char(i))
            elif 0 <= i < self.text_size:
                run.append(i)
            else:
                raise ValueError(f"id {i} is outside the vocabulary (size {self.size})")
        if run:
            out.append(self.decode_text(run))
        return "".join(out)

    def _string_pattern(self) -> re.Pattern:
        lo = chr(AUDIO_CHAR_BASE)
        hi = chr(AUDIO_CHAR_BASE + self.n_codebooks * self.codebook_size - 1)
        names = sorted(self.special_ids, key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(n) for n in names) + f"|[{lo}-{hi}])")

    def string_to_ids(self, text: str) -> np.ndarray:
        """SODA's string form -> ids (inverse of `ids_to_string` for audio and specials)."""
        specials = self.special_ids
        out: list[int] = []
        for piece in self._string_pattern().split(text):
            if not piece:
                continue
            if piece in specials:
                out.append(specials[piece])
            elif len(piece) == 1 and ord(piece) >= AUDIO_CHAR_BASE and ord(piece) - AUDIO_CHAR_BASE < self.n_codebooks * self.codebook_size:
                out.append(self.audio_base + ord(piece) - AUDIO_CHAR_BASE)
            else:
                out.extend(int(i) for i in self.encode_text(piece))
        return np.asarray(out, dtype=np.int64)

    # --- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "text_tokenizer": self.text_tokenizer_source,
            "text_size": self.text_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "specials": {n: self.text_size + i for i, n in enumerate(SPECIALS)},
            "audio_base": self.audio_base,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "semantic_codebooks": list(self.semantic_codebooks),
            "audio_char_base": AUDIO_CHAR_BASE,
            "size": self.size,
        }

    def save(self, directory: Path) -> None:
        """Write `vocab.json`, `text_tokenizer.json` and an HF tokenizer in `tokenizer/` (atomically)."""
        from tokenize_audio.shards import atomic_write_text

        directory = Path(directory)
        atomic_write_text(directory / "text_tokenizer.json", self.text_tokenizer.to_str())
        atomic_write_text(directory / "vocab.json", json.dumps(self.to_dict(), indent=2))
        export_hf_tokenizer(self, directory / "tokenizer")

    @classmethod
    def load(cls, directory: Path) -> "Vocabulary":
        directory = Path(directory)
        try:
            meta = json.loads((directory / "vocab.json").read_text())
            tok = Tokenizer.from_file(str(directory / "text_tokenizer.json"))
        except FileNotFoundError as err:
            raise SodaError(f"{directory}: no vocabulary here ({Path(err.filename).name} missing)") from None
        return cls(tok, meta["text_size"], meta["bos_id"], meta["eos_id"], meta["n_codebooks"],
                   meta["codebook_size"], tuple(meta["semantic_codebooks"]), meta.get("text_tokenizer", ""))

    def matches(self, other: "Vocabulary") -> bool:
        return self.to_dict() | {"text_tokenizer": ""} == other.to_dict() | {"text_tokenizer": ""}


def hf_tokenizer_object(vocab: Vocabulary) -> Tokenizer:
    """The text tokenizer extended with the four specials and one added token per audio id."""
    tok = Tokenizer.from_str(vocab.text_tokenizer.to_str())
    have = tok.get_vocab(with_added_tokens=True)
    if TEXT_START not in have:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    first_audio = vocab.audio_char(vocab.audio_base)
    if first_audio not in have:
        n_audio = vocab.n_codebooks * vocab.codebook_size
        tok.add_tokens([AddedToken(chr(AUDIO_CHAR_BASE + i), normalized=False, special=False) for i in range(n_audio)])
    got = tok.get_vocab(with_added_tokens=True)
    if got.get(TEXT_START) != vocab.text_start or got.get(first_audio) != vocab.audio_base:
        raise SodaError("text tokenizer has holes in its ids; the exported tokenizer would not match the layout")
    if vocab._added_bos_eos or vocab.text_tokenizer_source in ("bytes",) or vocab.text_tokenizer_source.startswith("bpe:"):
        # Like Llama-3's tokenizer (and SODA's), prepend BOS when asked for special tokens.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab.bos_id)]
        )
    return tok


def export_hf_tokenizer(vocab: Vocabulary, directory: Path) -> Path:
    """Save a `PreTrainedTokenizerFast` directory whose ids equal this vocabulary's."""
    from transformers import PreTrainedTokenizerFast

    from tokenize_audio.shards import atomic_directory

    id_to_token = {v: k for k, v in vocab.text_tokenizer.get_vocab(with_added_tokens=True).items()}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer_object(vocab),
        bos_token=id_to_token[vocab.bos_id],
        eos_token=id_to_token[vocab.eos_id],
        pad_token=id_to_token[vocab.eos_id],
        additional_special_tokens=list(SPECIALS),
    )
    with atomic_directory(Path(directory)) as tmp:
        fast.save_pretrained(str(tmp))
    return Path(directory)
