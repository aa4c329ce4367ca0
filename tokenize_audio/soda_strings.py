"""Import SODA's released pre-tokenized corpora: rows of SODA-format strings -> our shards and manifest.

SODA published its pre-training data already Mimi-tokenized, as parquet files whose text column holds a
whole document per row: `<|begin_of_text|>`, the four specials, text, one character per audio token
`chr(0xE000 + k*2048 + code)`, `<|end_of_text|>`. Such inputs are named explicitly, `soda:PATH` (a parquet
file, a glob, a directory of parquet files) or `soda:hf:NAME[:CONFIG]:SPLIT` (a hub id, streamed, or a
`save_to_disk` directory): a string dataset is never guessed from an audio one.

Ids are the ones SODA's own tokenizer gives: each text span through the run's text tokenizer (spans are
bounded by specials, so encoding them one by one equals encoding the string with the specials as added
tokens), one id per audio character, the specials atomic. BOS and EOS come from the string; a string
without them gets them once (SODA's tokenizer prepends BOS; our packing separates documents at EOS).

Rows are cut into units of `texts_per_shard` rows in input order; each unit becomes up to four shards
(train/validation x speech/text) named by its index, so shard contents depend on the inputs and settings
only, never on `--workers`. A unit's fingerprint hashes the settings and its rows (location, recording
column, string), so a re-run keeps finished units (the rows are read again, but not converted again).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

from tqdm import tqdm

from tokenize_audio.documents import holdout_score
from tokenize_audio.errors import SkipItem, SodaError, first_line
from tokenize_audio.pipeline import (SETTINGS, ShardStats, TokenizeSettings, check_settings, finished_sidecar,
                                     sample_key, write_manifest)
from tokenize_audio.shards import atomic_write_json, write_shard
from tokenize_audio.soda_format import SODA_CODEBOOK_SIZE, document_ids, parse_soda_string, text_pieces
from tokenize_audio.sources import RECORDING_COLUMNS, TEXT_COLUMNS, Corpus, open_hf_dataset
from tokenize_audio.vocab import Vocabulary

PREFIX = "soda:"
INPUT_FORMAT = "soda-strings"
MIMI_FRAME_RATE = 12.5


# --------------------------------------------------------------------------------------------
# Inputs -> rows
# --------------------------------------------------------------------------------------------
def is_soda_input(item: str) -> bool:
    return item.startswith(PREFIX)


def _parquet_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise SodaError(f"{PREFIX}{spec}: no parquet files found")
    return files


def _pick_text_column(columns, string_columns, text_column, name) -> str:
    if text_column:
        if text_column not in columns:
            raise SodaError(f"{name}: no column {text_column!r} (columns: {', '.join(columns)}); check --text-column")
        return text_column
    found = next((c for c in TEXT_COLUMNS if c in string_columns), None)
    found = found or (string_columns[0] if len(string_columns) == 1 else None)
    if found is None:
        raise SodaError(f"{name}: no text column among {', '.join(columns)}; pass --text-column")
    return found


def _pick_recording_column(columns, recording_column, name):
    if recording_column and recording_column not in columns:
        raise SodaError(f"{name}: no column {recording_column!r} (columns: {', '.join(columns)})")
    return recording_column or next((c for c in RECORDING_COLUMNS if c in columns), None)


def iter_rows(inputs: list[str], text_column=None, recording_column=None):
    """Yield (where, string, recording or None) over every soda: input, in order."""
    for item in inputs:
        spec = item[len(PREFIX):]
        if spec.startswith("hf:"):
            yield from _hf_rows(spec, text_column, recording_column)
            continue
        import pyarrow as pa
        import pyarrow.parquet as pq

        for path in _parquet_files(spec):
            try:
                pf = pq.ParquetFile(path)
            except Exception as err:
                raise SodaError(f"{path}: not a readable parquet file ({str(err)[:200]})") from None
            schema = pf.schema_arrow
            strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
            text_col = _pick_text_column(schema.names, strings, text_column, str(path))
            rec_col = _pick_recording_column(schema.names, recording_column, str(path))
            row = 0
            for batch in pf.iter_batches(batch_size=4096, columns=[c for c in (text_col, rec_col) if c]):
                texts = batch.column(text_col).to_pylist()
                recs = batch.column(rec_col).to_pylist() if rec_col else [None] * len(texts)
                for text, rec in zip(texts, recs):
                    yield f"{path}[{row}]", text, rec
                    row += 1


def _hf_rows(spec: str, text_column, recording_column):
    """`hf:NAME[:CONFIG]:SPLIT`: a `save_to_disk` directory, or a hub id / data folder streamed (nothing downloaded whole)."""
    ds = open_hf_dataset(spec, PREFIX, streaming=True)
    try:
        columns = list(ds.column_names or next(iter(ds)).keys())
    except Exception as err:  # a streamed dataset reads its first row to know its columns
        reason = first_line(err, 200) or type(err).__name__
        raise SodaError(f"could not read dataset {PREFIX}{spec} ({reason})") from None
    features = ds.features or {}
    strings = [c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
    text_col = _pick_text_column(columns, strings or columns, text_column, spec)
    rec_col = _pick_recording_column(columns, recording_column, spec)
    row = 0
    for batch in ds.iter(batch_size=1024):
        recs = batch[rec_col] if rec_col else [None] * len(batch[text_col])
        for text, rec in zip(batch[text_col], recs):
            yield f"{spec}[{row}]", text, rec
            row += 1


def corpus_texts(inputs: list[str], text_column=None, recording_column=None):
    """The text spans of every row (to train `bpe:N` on): specials and audio characters removed."""
    for _, text, _ in iter_rows(inputs, text_column, recording_column):
        if isinstance(text, str):
            yield from text_pieces(text)


# --------------------------------------------------------------------------------------------
# Units of rows -> shards
# --------------------------------------------------------------------------------------------
@dataclass
class ImportSettings(TokenizeSettings):
    """TokenizeSettings plus what only an import has; the dict is the fingerprint base and settings.json."""

    text_column: str | None = None
    recording_column: str | None = None

    def to_dict(self) -> dict:
        return super().to_dict() | {"input_format": INPUT_FORMAT, "text_column": self.text_column,
                                    "recording_column": self.recording_column}


def _unit_names(index: int) -> list[tuple[str, str, str]]:
    return [(f"{split}-{kind}-{index:05d}", split, kind) for split in ("train", "validation") for kind in ("speech", "text")]


def unit_fingerprint(settings: TokenizeSettings, rows: list) -> str:
    h = hashlib.sha1(json.dumps(settings.to_dict(), sort_keys=True, default=str).encode())
    for where, text, rec in rows:
        h.update(json.dumps([where, rec], default=str).encode("utf-8"))
        h.update(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else b"\0")
    return h.hexdigest()


_WORKER: dict = {}


def _init_worker(out: str, settings: ImportSettings) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker process: --workers sets the cores
    _WORKER.update(vocab=Vocabulary.load(Path(out)), out=Path(out), settings=settings)


def _convert_unit(index: int, rows: list, fingerprint: str) -> list[dict]:
    """Convert one unit of rows and write its shards and sidecars; return the sidecars."""
    vocab, out, settings = _WORKER["vocab"], _WORKER["out"], _WORKER["settings"]
    started = time.perf_counter()
    groups = {(split, kind): ([], ShardStats(), set()) for _, split, kind in _unit_names(index)}
    keys: dict[str, int] = {}  # a row repeated in one unit gets key_1, key_2, ...: tar member names must differ
    skipped = []
    for where, text, rec in rows:
        try:
            parsed = parse_soda_string(text)
            ids = document_ids(vocab, parsed)
        except SkipItem as err:
            skipped.append({"path": where, "reason": str(err)})
            continue
        recording = str(rec) if rec is not None else parsed.recording_key()
        kind = "text" if parsed.form == "text" else "speech"
        split = "validation" if holdout_score(recording) < settings.validation_fraction else "train"
        samples, stats, seen = groups[split, kind]
        counts = vocab.count_types(ids)
        stats.add_document(counts)
        frames = [len(body) // vocab.n_codebooks for k, body in parsed.spans if k == "audio"]
        seconds = sum(frames) / MIMI_FRAME_RATE
        stats.audio_seconds += seconds
        stats.utterances += len(frames)
        if recording not in seen:
            seen.add(recording)
            stats.recordings += 1
        key = sample_key(recording, parsed.form)
        n = keys[key] = keys.get(key, -1) + 1
        meta = {"recording": recording, "format": parsed.form, "kind": kind, "row": where,
                "audio_seconds": round(seconds, 3), "tokens": counts}
        samples.append((key if n == 0 else f"{key}_{n}", ids, meta))
    sidecars = []
    for name, split, kind in _unit_names(index):
        samples, stats, _ = groups[split, kind]
        tar = out / f"{name}.tar"
        if samples:
            write_shard(tar, samples)
        else:
            tar.unlink(missing_ok=True)
        sidecar = {"name": name, "file": tar.name if samples else None, "split": split, "kind": kind,
                   "fingerprint": fingerprint, "seconds": round(time.perf_counter() - started, 3),
                   **stats.to_dict(), "skipped": skipped if (split, kind) == ("train", "speech") else []}
        atomic_write_json(out / f"{name}.json", sidecar)
        sidecars.append(sidecar)
    return sidecars


@dataclass
class PretokenizedCodec:
    """What the manifest records about a codec that this run did not run: SODA's strings hold Mimi codes."""

    spec: str
    n_codebooks: int

    def describe(self) -> dict:
        return {"spec": self.spec, "family": "mimi", "source": "pre-tokenized (soda: input)", "random": False,
                "label": f"mimi codes imported from SODA-format strings ({self.spec} decodes them)",
                "sample_rate": 24000, "frame_rate": MIMI_FRAME_RATE, "samples_per_frame": 1920,
                "codebook_size": SODA_CODEBOOK_SIZE, "codebooks": self.n_codebooks}


def import_soda(args) -> dict:
    """`soda-tokenize soda:... --out DIR`: convert every row; returns the manifest (also written to DIR) with
    `_reused_units` / `_units` (units kept from an earlier run / in all) and `_planned` (shard names) added."""
    from tokenize_audio.codecs import parse_codec_spec
    from tokenize_audio.vocab import load_text_tokenizer

    if not all(is_soda_input(i) for i in args.inputs):
        raise SodaError("soda: inputs (pre-tokenized SODA strings) cannot be mixed with audio or text inputs in one run")
    if parse_codec_spec(args.codec)[0] != "mimi":
        raise SodaError(f"--codec {args.codec}: SODA's strings hold Mimi codes; use mimi (the default) or mimi:DIR")
    if not 1 <= args.codebooks <= 8:
        raise SodaError(f"--codebooks {args.codebooks}: SODA's strings hold 8 codebooks; keep 1 to 8")
    codec = PretokenizedCodec(args.codec, args.codebooks)
    settings = ImportSettings(codec.describe(), args.text_tokenizer, (INPUT_FORMAT,), args.validation_fraction,
                              texts_per_shard=args.texts_per_shard, text_column=args.text_column,
                              recording_column=args.recording_column)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    same = check_settings(out, settings, args.overwrite)
    if not (same and (out / "vocab.json").is_file()):
        tok = load_text_tokenizer(args.text_tokenizer, corpus_texts(args.inputs, args.text_column, args.recording_column))
        Vocabulary.build(tok, args.codebooks, SODA_CODEBOOK_SIZE, (0,), args.text_tokenizer).save(out)
    atomic_write_json(out / SETTINGS, settings.to_dict())
    vocab = Vocabulary.load(out)

    sidecars, planned, reused = [], set(), 0
    stream = iter_rows(args.inputs, args.text_column, args.recording_column)
    units = iter(lambda: list(islice(stream, settings.texts_per_shard)), [])
    pool = None
    if args.workers > 1:
        # fork where there is one: a spawned worker would spend seconds importing torch (via pipeline) first.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(args.workers, get_context(method), _init_worker, (str(out), settings))
    if pool is None:
        _init_worker(str(out), settings)
    pending = []
    bar = tqdm(unit="row", desc="import", disable=args.quiet, dynamic_ncols=True)
    try:
        for index, unit in enumerate(units):
            bar.update(len(unit))
            fp = unit_fingerprint(settings, unit)
            names = [name for name, _, _ in _unit_names(index)]
            planned.update(names)
            done = [finished_sidecar(out, n, fp) for n in names]  # the pipeline's resume rule
            if all(done):
                sidecars += done
                reused += 1
            elif pool is None:
                sidecars += _convert_unit(index, unit, fp)
            else:
                pending.append(pool.submit(_convert_unit, index, unit, fp))
                while len(pending) >= args.workers * 2:  # bounded: rows in flight stay a few units
                    sidecars += pending.pop(0).result()
        for fut in pending:
            sidecars += fut.result()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    sidecars.sort(key=lambda s: s["name"])
    manifest = write_manifest(out, codec, vocab, settings, Corpus(), sidecars)
    return manifest | {"_reused_units": reused, "_units": len(planned) // len(_unit_names(0)), "_planned": planned}
