"""Training sources: what --data, --val-data, --vocab and --mix name, resolved into shard lists with weights.

A *source* is a list of shards (a `soda-tokenize` output directory, a local glob or brace pattern, or URLs
webdataset can open) with a mixture weight: a share of the training *tokens* (`soda.train.data` packs each
source into windows of its own and picks the source of every window by weight). Every shard, however named,
is checked against the run's vocabulary (`ShardVocabularies`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenize_audio.errors import SodaError, first_line
from tokenize_audio.shards import expand_shards, is_url, open_shard
from tokenize_audio.vocab import Vocabulary

MANIFEST = "manifest.json"
KINDS = ("speech", "text")


@dataclass
class Source:
    name: str
    train: list[str]
    validation: list[str] = field(default_factory=list)
    weight: float | None = None
    train_tokens: int | None = None  # known for soda-tokenize directories; the default weights use it
    audio_tokens_per_second: float | None = None  # from the manifest (100 for Mimi with 8 codebooks)
    codec: dict | None = None  # the manifest's codec description (spec, label, sample rate...)
    by_size: bool = False  # the weight is the source's share of the data (no --mix): windows of steps re-weigh it


# --------------------------------------------------------------------------------------------
# Resolving --data into sources
# --------------------------------------------------------------------------------------------
def _parse_entry(entry) -> dict:
    if isinstance(entry, dict):
        if "path" not in entry:
            raise SodaError(f"data entry {entry}: needs a 'path'")
        return dict(entry)
    name, sep, location = str(entry).partition("=")
    if not sep or is_url(name) or "/" in name:
        name, location = "", str(entry)
    return {"name": name, "path": location}


def _from_directory(directory: Path, name: str, kind: str | None) -> tuple[Source, Vocabulary]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise SodaError(f"--data {directory}: no {MANIFEST} (expected a soda-tokenize output directory)") from None
    except json.JSONDecodeError as e:
        raise SodaError(f"--data {directory}: {MANIFEST} is not valid JSON ({e})") from None
    lists = manifest["shards_by_kind"][kind] if kind else manifest["shards"]
    tokens = {s["file"]: s["tokens"] for s in manifest.get("shard_stats", [])}
    train = [str(directory / f) for f in lists["train"]]
    for f in train + [str(directory / f) for f in lists["validation"]]:
        if not Path(f).is_file():
            raise SodaError(f"--data {directory}: shard {f} listed in {MANIFEST} is missing")
    if not train:
        raise SodaError(f"--data {directory}: no {kind + ' ' if kind else ''}training shards")
    source = Source(name, train, [str(directory / f) for f in lists["validation"]],
                    train_tokens=sum(tokens.get(f, 0) for f in lists["train"]) or None,
                    codec=manifest.get("codec"))
    audio_formats = [f for f in manifest.get("formats", []) if f != "text-only"]
    if manifest.get("audio_seconds") and audio_formats:
        audio = manifest["tokens"].get("semantic", 0) + manifest["tokens"].get("acoustic", 0)
        source.audio_tokens_per_second = audio / len(audio_formats) / manifest["audio_seconds"]
    return source, Vocabulary.load(directory)


def resolve_sources(data: list, val_data: list, mix: dict, vocab_dir: str | None) -> tuple[list[Source], Vocabulary]:
    """Turn `--data`/`--val-data`/`--mix` (or their YAML forms) into sources and the shared vocabulary; every
    shard, however named, is checked against it (`ShardVocabularies`)."""
    sources: list[Source] = []
    vocabs: list[tuple[str, Vocabulary]] = []
    named: list[tuple[str, list[str]]] = []  # (the flag and value that named them, shards) for the check
    for i, entry in enumerate(data):
        e = _parse_entry(entry)
        location, name = str(e["path"]), e.get("name") or ""
        kind = e.get("kind") or (name if name in KINDS else None)
        if not is_url(location) and Path(location).is_dir():
            source, vocab = _from_directory(Path(location), name or Path(location).name, kind)
            vocabs.append((location, vocab))
        else:
            source = Source(name or f"source{i}", expand_shards(location))
        named.append((f"--data {location}", source.train + source.validation))
        if e.get("weight") is not None:
            source.weight = float(e["weight"])
        sources.append(source)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise SodaError(f"--data: source names must differ (got {', '.join(names)}); name them NAME=LOCATION")
    for entry in val_data:
        e = _parse_entry(entry)
        target = next((s for s in sources if s.name == e.get("name")), None) if e.get("name") else sources[0]
        if target is None:
            raise SodaError(f"--val-data {entry}: no --data source named {e['name']!r}")
        target.validation = expand_shards(str(e["path"]))
        named.append((f"--val-data {e['path']}", target.validation))
    _apply_mix(sources, mix)
    if vocab_dir:
        vocabs.insert(0, (vocab_dir, Vocabulary.load(Path(vocab_dir))))
    if not vocabs:
        raise SodaError("--data gives only shard patterns: also give --vocab DIR (a soda-tokenize output directory)")
    where, vocab = vocabs[0]
    for other_where, other in vocabs[1:]:
        if not other.matches(vocab):
            raise SodaError(f"--data {other_where}: its vocabulary differs from {where}'s (tokenized with another "
                            f"text tokenizer or codec)")
    check = ShardVocabularies(vocab, "the run's", where)
    for flag, shards in named:
        check(shards, flag)
    check.warn()
    return sources, vocab


def describe_vocabulary(vocab: Vocabulary) -> str:
    """How a vocabulary is named in messages: what differs when shards and model disagree."""
    k = vocab.n_codebooks
    return (f"{vocab.size:,} ids: {k} codebook{'s' * (k != 1)} of {vocab.codebook_size:,}, text "
            f"{vocab.text_tokenizer_source or '?'}")


class ShardVocabularies:
    """Checks shards against one vocabulary (the run's or the model's), whatever named them: a directory,
    manifest, glob, brace pattern, single tar or URL.

    A shard's vocabulary is that of the soda-tokenize directory holding it (its vocab.json and
    text_tokenizer.json; neither the shards' sidecars nor their samples record one): read once per directory,
    for a URL from beside it through the same opener. Equal means `Vocabulary.matches`. A shard whose
    directory has no vocabulary (copied alone, or read through a `pipe:` command) cannot be checked: it is
    used, and `warn` says so once."""

    def __init__(self, vocab: Vocabulary, whose: str, where: str):
        self.vocab, self.whose, self.where = vocab, whose, where  # e.g. "the run's", "--vocab DIR"
        self.found: dict[str, tuple[str, Vocabulary] | None] = {}  # directory -> (where, its vocabulary)
        self.unchecked: list[str] = []

    def __call__(self, shards: list[str], what: str) -> None:
        """Raise a SodaError naming the first of `shards` (named by `what`, e.g. "--data DIR/*.tar") whose
        vocabulary differs."""
        for shard in shards:
            found = self._beside(shard)
            if found is None:
                self.unchecked.append(shard)
            elif not found[1].matches(self.vocab):
                raise SodaError(f"{what}: shard {shard} was tokenized with another vocabulary "
                                f"({describe_vocabulary(found[1])}; {found[0]}) than {self.whose} "
                                f"({describe_vocabulary(self.vocab)}; {self.where}); tokenize it with the same "
                                f"codec, codebooks and text tokenizer")

    def warn(self) -> None:
        """One line for the shards that could not be checked (on the first rank only: every rank resolves --data)."""
        unchecked = list(dict.fromkeys(self.unchecked))
        if unchecked:
            from lightning.fabric.utilities.rank_zero import rank_zero_only

            if getattr(rank_zero_only, "rank", 0) != 0:
                return
            print(f"warning: cannot check the vocabulary of {len(unchecked)} shard{'s' * (len(unchecked) != 1)} "
                  f"(no vocab.json beside them, e.g. {unchecked[0]}); they must have been tokenized with "
                  f"{self.whose} vocabulary ({describe_vocabulary(self.vocab)}; {self.where})", file=sys.stderr)

    def _beside(self, shard: str) -> tuple[str, Vocabulary] | None:
        if shard.startswith("pipe:"):
            return None
        directory = shard.rsplit("/", 1)[0] if is_url(shard) else str(Path(shard).resolve().parent)
        if directory not in self.found:
            self.found[directory] = _remote_vocabulary(directory) if is_url(shard) else _local_vocabulary(directory)
        return self.found[directory]


def _local_vocabulary(directory: str) -> tuple[str, Vocabulary] | None:
    path = Path(directory) / "vocab.json"
    if not path.is_file():
        return None
    try:
        return str(path), Vocabulary.load(Path(directory))
    except (ValueError, KeyError, OSError, SodaError) as e:  # a damaged vocab.json cannot vouch for the shards
        raise SodaError(f"{path}: unreadable ({first_line(e, 200, with_type=True)}); it gives the "
                        f"vocabulary of the shards beside it") from None


def _remote_vocabulary(directory: str) -> tuple[str, Vocabulary] | None:
    """The vocabulary beside remote shards, or None when it cannot be read (not there, no network)."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("vocab.json", "text_tokenizer.json"):
                with open_shard(f"{directory}/{name}") as stream:
                    (Path(tmp) / name).write_bytes(stream.read())
            return f"{directory}/vocab.json", Vocabulary.load(Path(tmp))
    except Exception:  # noqa: BLE001 -- whatever the scheme's opener raises, the shards are just unchecked
        return None


def _apply_mix(sources: list[Source], mix: dict) -> None:
    unknown = sorted(set(mix) - {s.name for s in sources})
    if unknown:
        raise SodaError(f"--mix names {', '.join(unknown)}, but the sources are {', '.join(s.name for s in sources)}")
    for s in sources:
        if s.name in mix:
            s.weight = float(mix[s.name])
    if any(s.weight is None for s in sources):
        if all(s.weight is None for s in sources) and all(s.train_tokens for s in sources):
            for s in sources:  # natural proportions
                s.weight, s.by_size = float(s.train_tokens), True
        else:
            unset = [s.name for s in sources if s.weight is None]
            if len(sources) > 1 and len(unset) < len(sources):
                raise SodaError(f"--mix gives weights for some sources but not {', '.join(unset)}")
            for s in sources:
                s.weight = 1.0 if s.weight is None else s.weight
    if any(not np.isfinite(s.weight) or s.weight < 0 for s in sources) or sum(s.weight for s in sources) <= 0:
        raise SodaError(f"--mix weights must be non-negative and not all zero: {mix}")
    total = sum(s.weight for s in sources)
    for s in sources:
        s.weight /= total


def repeat_warnings(sources: list[Source], run_tokens: int, unit: str = "tokens") -> list[str]:
    """One line per source of a mixture whose weight takes more tokens (`unit`) over `run_tokens` than it holds: a
    weight is a share of tokens, so such a source's documents repeat (its size is known for soda-tokenize
    directories)."""
    lines = []
    for s in sources if len(sources) > 1 else []:
        if s.train_tokens and s.weight * run_tokens > s.train_tokens:
            lines.append(f"source {s.name!r} holds {s.train_tokens:,} {unit}, but its weight {s.weight:.1%} takes "
                         f"{s.weight * run_tokens:,.0f} of this run's {run_tokens:,}: its documents repeat about "
                         f"{s.weight * run_tokens / s.train_tokens:,.1f} times")
    return lines


def parse_mix(text: str | None) -> dict:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SodaError(f"--mix {text!r}: expected NAME=WEIGHT,... e.g. speech=0.95,text=0.05")
    return out
