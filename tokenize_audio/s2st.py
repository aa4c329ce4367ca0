"""Speech-to-speech translation data: CVSS-style manifests -> SODA's S2ST documents -> token shards.

A manifest lists one (source speech, source text, target text, target speech) pair per row, as CVSS
pairs CoVoST 2 source clips with synthesized English targets. Fine-tuning (`soda-finetune s2st`) and
S2ST evaluation (`soda-eval --tasks s2st`) read it with `read_pairs`; fine-tuning then writes one
document per pair (layout in `tokenize_audio.documents.s2st_document`) as webdataset shards with a
`soda-tokenize` manifest, so `soda-train`'s data pipeline reads them unchanged.

Manifest formats (paths relative to the manifest's directory):

* TSV (or CSV, by the `.csv` suffix) with a header row naming the columns `source_audio`,
  `source_text`, `source_language`, `target_text`, `target_audio`, and optionally `id`,
  `target_language` (default `en`); without a header, five columns in that order.
* JSONL, one object per line with the same field names.

Manifests are read as UTF-8 with or without a byte-order mark (Excel and Notepad write one; left in,
it would hide the first column's name). A row that cannot be used (a missing or unreadable audio file,
an empty text, no language, an id already used by an earlier row) is skipped and reported with its
reason; it never stops the run. `Pairs.sha256` fingerprints the bytes read, so a run can tell later
whether the manifest was edited.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenize_audio.codecs import Codec
from tokenize_audio.documents import s2st_document, validation_recordings
from tokenize_audio.encoding import audio_codes, default_batch_seconds
from tokenize_audio.errors import SkipItem, SodaError
from tokenize_audio.pipeline import (ShardStats, TokenizeSettings, finished_sidecar, fingerprint, sample_key,
                                     write_manifest)
from tokenize_audio.shards import atomic_write_json, write_shard
from tokenize_audio.vocab import Vocabulary

COLUMNS = ("source_audio", "source_text", "source_language", "target_text", "target_audio")
OPTIONAL = ("id", "target_language")
ALIASES = {"src_audio": "source_audio", "src_text": "source_text", "src_lang": "source_language",
           "source_lang": "source_language", "tgt_text": "target_text", "translation": "target_text",
           "tgt_audio": "target_audio", "tgt_lang": "target_language", "target_lang": "target_language"}


@dataclass
class Pair:
    id: str
    source_audio: str  # absolute or manifest-relative path, resolved
    source_text: str
    source_language: str
    target_text: str
    target_audio: str
    target_language: str = "en"


@dataclass
class Pairs:
    pairs: list[Pair]
    skipped: list[dict]  # {"item", "reason"}
    source: str
    sha256: str = ""  # of the manifest's bytes, as read


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SodaError(f"{path}: manifest not found") from None
    except OSError as err:
        raise SodaError(f"{path}: unreadable manifest ({err})") from None


def manifest_sha256(path) -> str:
    """The fingerprint `read_pairs` records (`Pairs.sha256`): sha256 of the manifest's bytes."""
    return hashlib.sha256(_read(Path(path).expanduser())).hexdigest()


def _rows(path: Path, raw: bytes):
    """(line number, dict of fields) per row of a manifest's bytes; SodaError if they are not UTF-8 text."""
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the first column's name
    except UnicodeDecodeError as err:
        raise SodaError(f"{path}: unreadable manifest ({err})") from None
    if path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield n, f"not valid JSON ({err.msg})"
                continue
            yield n, row if isinstance(row, dict) else "a JSON line must be an object"
        return
    comma = path.suffix.lower() == ".csv"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if comma else "\t",
                        quoting=csv.QUOTE_MINIMAL if comma else csv.QUOTE_NONE)
    lines = [(reader.line_num, fields) for fields in reader]
    header = [ALIASES.get(c.strip().lower(), c.strip().lower()) for c in lines[0][1]] if lines else []
    has_header = bool(set(header) & set(COLUMNS))
    names = header if has_header else list(COLUMNS)
    missing = [c for c in COLUMNS if c not in names and c != "source_language"]
    if has_header and missing:
        raise SodaError(f"{path}: the header lacks column(s) {', '.join(missing)} (need {', '.join(COLUMNS)})")
    for n, fields in lines[1:] if has_header else lines:
        if not any(f.strip() for f in fields):
            continue
        if len(fields) < len(names):
            yield n, f"expected {len(names)} {'comma' if comma else 'tab'}-separated columns, found {len(fields)}"
            continue
        yield n, dict(zip(names, fields))


def read_pairs(manifest, source_language: str | None = None, target_language: str = "en") -> Pairs:
    """The usable pairs of `manifest` and the rows skipped (with reasons); audio is checked to exist only.

    `source_language` fills rows without one (CVSS manifests are one language each). An id used by an earlier
    row is skipped ("duplicate id"): the hold-out and the shards key pairs by id.
    """
    path = Path(manifest).expanduser()
    base = path.parent
    raw = _read(path)
    pairs, skipped, first_line = [], [], {}
    for n, row in _rows(path, raw):
        where = f"{path.name}:{n}"
        if isinstance(row, str):
            skipped.append({"item": where, "reason": row})
            continue
        row = {ALIASES.get(k, k): v for k, v in row.items()}
        try:
            fields = {}
            for name in COLUMNS + OPTIONAL:
                value = row.get(name)
                fields[name] = " ".join(str(value).split()) if value is not None else ""
            fields["source_language"] = fields["source_language"] or (source_language or "")
            fields["target_language"] = fields["target_language"] or target_language
            for name in ("source_text", "target_text"):
                if not fields[name]:
                    raise SkipItem(f"empty {name.replace('_', ' ')}")
            if not fields["source_language"]:
                raise SkipItem("no source language (add the column or pass --source-language)")
            for name in ("source_audio", "target_audio"):
                if not fields[name]:
                    raise SkipItem(f"no {name.replace('_', ' ')} path")
                audio = Path(fields[name]).expanduser()
                audio = audio if audio.is_absolute() else base / audio
                if not audio.is_file():
                    raise SkipItem(f"{name.replace('_', ' ')} not found: {audio}")
                fields[name] = str(audio)
        except SkipItem as err:
            skipped.append({"item": where, "reason": str(err)})
            continue
        pair_id = fields["id"] or f"{path.stem}-{n:06d}"
        if pair_id in first_line:
            skipped.append({"item": where, "reason": f"duplicate id: {pair_id} (first on line {first_line[pair_id]})"})
            continue
        first_line[pair_id] = n
        pairs.append(Pair(pair_id, fields["source_audio"], fields["source_text"], fields["source_language"],
                          fields["target_text"], fields["target_audio"], fields["target_language"]))
    return Pairs(pairs, skipped, str(path), hashlib.sha256(raw).hexdigest())


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------
def _fingerprint(settings: dict, pairs: list[Pair]) -> str:
    stat = lambda p: (Path(p).stat().st_size, Path(p).stat().st_mtime_ns)  # noqa: E731 -- changed audio re-encodes
    return fingerprint(settings, [(asdict(p), stat(p.source_audio), stat(p.target_audio)) for p in pairs])


def write_s2st_shards(pairs: Pairs, vocab: Vocabulary, codec: Codec, out: Path, validation_fraction: float = 0.0,
                      pairs_per_shard: int = 1000, progress: bool = True) -> tuple[dict, list[dict], dict]:
    """Encode every pair with `codec` into `vocab`'s ids (a checkpoint's own), write S2ST documents as shards +
    manifest + vocabulary into `out`.

    Works a shard at a time (only one shard's codes in memory); a shard whose sidecar fingerprint
    matches (same pairs, files, codec and settings) is kept from an earlier run. Returns the manifest,
    every skipped row or pair (`{"item", "reason"}`: bad rows, unreadable audio) and each document's length in
    tokens by pair id; none usable is a SodaError.
    """
    from tqdm import tqdm

    from tokenize_audio.sources import Corpus

    out = Path(out)
    held = validation_recordings([p.id for p in pairs.pairs], validation_fraction)
    settings = TokenizeSettings(codec.describe(), vocab.text_tokenizer_source, ("s2st",), validation_fraction,
                                recordings_per_shard=pairs_per_shard)
    skipped = list(pairs.skipped)
    sidecars = []
    with tqdm(total=len(pairs.pairs), unit="pair", desc="encoding S2ST pairs", disable=not progress,
              dynamic_ncols=True) as bar:
        for split in ("train", "validation"):
            chosen = [p for p in pairs.pairs if (p.id in held) == (split == "validation")]
            for first in range(0, len(chosen), pairs_per_shard):
                chunk = chosen[first:first + pairs_per_shard]
                name = f"{split}-speech-{first // pairs_per_shard:05d}"
                made_from = _fingerprint(settings.to_dict() | {"vocab": vocab.to_dict()}, chunk)
                sidecar = finished_sidecar(out, name, made_from)
                if sidecar is None:
                    sidecar = _write_shard(out, name, split, chunk, vocab, codec, bar)
                    sidecar["fingerprint"] = made_from
                    atomic_write_json(out / f"{name}.json", sidecar)
                else:
                    bar.update(len(chunk))
                sidecars.append(sidecar)
                skipped += sidecar["skipped"]
    usable = sum(s["documents"] for s in sidecars)
    if not usable:
        reasons = "; ".join(sorted({s["reason"].split(":")[0] for s in skipped})) or "the manifest has no rows"
        raise SodaError(f"{pairs.source}: no usable pairs ({len(skipped)} skipped: {reasons})")
    vocab.save(out)
    lengths = {k: n for s in sidecars for k, n in s.get("document_tokens", {}).items()}
    return write_manifest(out, codec, vocab, settings, Corpus(skipped=list(pairs.skipped)), sidecars), skipped, lengths


def _write_shard(out: Path, name: str, split: str, chunk: list[Pair], vocab: Vocabulary, codec: Codec, bar) -> dict:
    batch_seconds = default_batch_seconds(codec)
    sources = audio_codes(codec, [p.source_audio for p in chunk], batch_seconds, "source audio", progress=False)
    targets = audio_codes(codec, [p.target_audio for p in chunk], batch_seconds, "target audio", progress=False)
    samples, skipped, stats = [], [], ShardStats()
    for pair, src, tgt in zip(chunk, sources, targets):
        bar.update(1)
        bad = [f"{what} audio: {c}" for what, c in (("source", src), ("target", tgt)) if isinstance(c, str)]
        if bad:
            skipped.append({"item": pair.id, "reason": "; ".join(bad)})
            continue
        ids, target_start = s2st_document(vocab, vocab.codes_to_ids(src), pair.source_language, pair.source_text,
                                          pair.target_language, pair.target_text, vocab.codes_to_ids(tgt))
        counts = vocab.count_types(ids)
        seconds = (src.shape[1] + tgt.shape[1]) / codec.frame_rate
        stats.add_document(counts)
        stats.recordings += 1
        stats.utterances += 2
        stats.audio_seconds += seconds
        meta = {"recording": pair.id, "format": "s2st", "kind": "speech", "target_start": target_start,
                "audio_seconds": round(seconds, 3), "tokens": counts, "pair": asdict(pair)}
        samples.append((sample_key(pair.id, "s2st"), ids, meta))
    write_shard(out / f"{name}.tar", samples)
    return {"name": name, "file": f"{name}.tar", "split": split, "kind": "speech", **stats.to_dict(),
            "skipped": skipped, "document_tokens": {s[2]["recording"]: len(s[1]) for s in samples}}


def epochs_to_tokens(manifest: dict, epochs: float) -> int:
    """Training tokens for `epochs` passes over a shard directory's training documents."""
    train = sum(s["tokens"] for s in manifest.get("shard_stats", []) if s["split"] == "train")
    return max(1, math.ceil(epochs * train))

