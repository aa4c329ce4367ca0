"""Corpus inputs -> utterances (grouped into recordings) and text documents.

Inputs: a directory tree of audio files with same-stem `.txt` or LibriSpeech `*.trans.txt`
transcripts; a JSONL manifest (`audio`, `text`, optional `id`, `recording`, `start`, `end`); a
Hugging Face dataset `hf:NAME[:CONFIG]:SPLIT` (NAME may be a `save_to_disk` directory); plain text
or JSONL text for the text-only share. Bad items are skipped with a reason, never fatal.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenize_audio.errors import SkipItem, SodaError, first_line

AUDIO_EXTENSIONS = {".flac", ".wav", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".sph"}
TEXT_COLUMNS = ("text", "transcript", "transcription", "sentence", "normalized_text", "raw_text")
RECORDING_COLUMNS = ("recording", "audio_id", "recording_id", "chapter_id", "file")
ID_COLUMNS = ("id", "utterance_id", "segment_id", "key")


@dataclass
class Utterance:
    """One (audio, transcript) pair. `audio` is a file path or an `HFAudio` reference."""

    id: str
    recording: str
    text: str
    audio: object
    order: tuple = ()
    start: float | None = None
    end: float | None = None

    @property
    def where(self) -> str:
        return str(self.audio) if not isinstance(self.audio, HFAudio) else f"{self.audio.name}[{self.audio.index}]"


@dataclass
class TextDocument:
    id: str
    text: str


@dataclass
class HFAudio:
    """A row of a Hugging Face dataset whose audio column is read undecoded (bytes or path)."""

    name: str
    dataset: object = field(repr=False)
    column: str = "audio"
    index: int = 0

    def __str__(self) -> str:
        return f"{self.name}[{self.index}]"


@dataclass
class Corpus:
    utterances: list[Utterance] = field(default_factory=list)
    texts: list[TextDocument] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, path, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})

    def extend(self, other: "Corpus") -> None:
        self.utterances += other.utterances
        self.texts += other.texts
        self.skipped += other.skipped


# --------------------------------------------------------------------------------------------
# Reading text
# --------------------------------------------------------------------------------------------
def read_text_file(path: Path) -> str:
    """Read UTF-8 text; raise SkipItem for non-UTF-8 or unreadable files."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SkipItem(f"not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise SkipItem(f"unreadable: {err.strerror or err}") from None


def clean_transcript(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise SkipItem("empty transcript")
    return text


# --------------------------------------------------------------------------------------------
# Input kinds
# --------------------------------------------------------------------------------------------
def scan_directory(root: Path) -> Corpus:
    """Audio files with same-stem `.txt` or LibriSpeech `*.trans.txt`; a recording = the folder."""
    corpus = Corpus()
    root = Path(root)
    n_audio = 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        folder = Path(folder)
        files = sorted(files)
        trans: dict[str, str] = {}
        for name in files:
            if name.endswith(".trans.txt"):
                try:
                    lines = read_text_file(folder / name).splitlines()
                except SkipItem as err:
                    corpus.skip(folder / name, str(err))
                    continue
                for line in lines:
                    stem, _, text = line.strip().partition(" ")
                    if stem:
                        trans[stem] = text
        stems = {Path(n).stem for n in files if Path(n).suffix.lower() in AUDIO_EXTENSIONS}
        for stem in sorted(set(trans) - stems):
            corpus.skip(folder / f"{stem}.*", "listed in a .trans.txt but no audio file found")
        recording = folder.relative_to(root).as_posix()
        recording = root.name if recording == "." else f"{root.name}/{recording}"
        for name in files:
            path = folder / name
            if path.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            n_audio += 1
            stem = path.stem
            try:
                if (folder / f"{stem}.txt").is_file():
                    text = read_text_file(folder / f"{stem}.txt")
                elif stem in trans:
                    text = trans[stem]
                else:
                    raise SkipItem("no transcript (.txt or .trans.txt)")
                text = clean_transcript(text)
            except SkipItem as err:
                corpus.skip(path, str(err))
                continue
            corpus.utterances.append(Utterance(f"{recording}/{stem}", recording, text, str(path), (name,)))
    if n_audio == 0:
        raise SodaError(f"{root}: no audio files found ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    return corpus


def _json_rows(path: Path, corpus: Corpus):
    try:
        raw = read_text_file(path)
    except SkipItem as err:
        raise SodaError(f"{path}: {err}") from None
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            corpus.skip(f"{path}:{n}", f"not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            corpus.skip(f"{path}:{n}", "a JSON line must be an object")
            continue
        yield n, row


def _is_audio_manifest(path: Path) -> bool:
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(row, dict):
                return "audio" in row
    return False


def read_manifest(path: Path) -> Corpus:
    """JSONL rows {audio, text, id?, recording?, start?, end?}; paths relative to the manifest."""
    corpus = Corpus()
    base = Path(path).parent
    for n, row in _json_rows(path, corpus):
        where = f"{path}:{n}"
        try:
            audio = row.get("audio")
            if not isinstance(audio, str) or not audio:
                raise SkipItem("no 'audio' path")
            audio_path = Path(audio) if Path(audio).is_absolute() else base / audio
            where = str(audio_path)
            if not audio_path.is_file():
                raise SkipItem("audio file not found")
            text = row.get("text")
            if not isinstance(text, str):
                raise SkipItem("no 'text'")
            text = clean_transcript(text)
            start, end = row.get("start"), row.get("end")
            for name, value in (("start", start), ("end", end)):
                if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                    raise SkipItem(f"bad '{name}': {value!r}")
            recording = str(row.get("recording") or audio)
            uid = str(row.get("id") or (f"{audio}@{start}" if start is not None else audio))
        except SkipItem as err:
            corpus.skip(where, str(err))
            continue
        corpus.utterances.append(Utterance(uid, recording, text, str(audio_path), (start or 0.0, n), start, end))
    return corpus


def read_text_corpus(path: Path) -> Corpus:
    """Plain text (documents separated by blank lines) or JSONL with a `text` field."""
    corpus = Corpus()
    path = Path(path)
    if path.suffix == ".jsonl":
        for n, row in _json_rows(path, corpus):
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                corpus.skip(f"{path}:{n}", "empty or missing 'text'")
                continue
            corpus.texts.append(TextDocument(str(row.get("id") or f"{path.name}:{n}"), text.strip()))
        return corpus
    try:
        raw = read_text_file(path)
    except SkipItem as err:
        corpus.skip(path, str(err))
        return corpus
    paragraphs = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
    for i, para in enumerate(p for p in paragraphs if p):
        corpus.texts.append(TextDocument(f"{path.name}#{i}", " ".join(para.split())))
    return corpus


def _pick(columns, candidates, override, what, name):
    if override:
        if override not in columns:
            raise SodaError(f"{name}: no column {override!r} (columns: {', '.join(columns)})")
        return override
    found = next((c for c in candidates if c in columns), None)
    if found is None and what in ("text",):
        raise SodaError(f"{name}: no {what} column among {', '.join(columns)}; pass --text-column")
    return found


def hf_spec(spec: str, prefix: str = "") -> tuple[str, str | None, str]:
    """NAME, CONFIG (or None) and SPLIT of `hf:NAME[:CONFIG]:SPLIT`; `prefix` is what stands before it on the
    command line (e.g. `soda:`), for the error."""
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise SodaError(f"{prefix}{spec}: expected {prefix}hf:NAME:SPLIT or {prefix}hf:NAME:CONFIG:SPLIT")
    return parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]


def open_hf_dataset(spec: str, prefix: str = "", streaming: bool = False):
    """The split named by `hf:NAME[:CONFIG]:SPLIT`: NAME is a `save_to_disk` directory (loaded) or a hub id / data
    folder (`load_dataset`, streamed when asked, so nothing is downloaded whole first)."""
    shown = prefix + spec
    name, config, split = hf_spec(spec, prefix)
    try:
        import datasets
    except ImportError:
        raise SodaError("reading hf: inputs needs the `datasets` package (pip install 'soda[hf]')") from None
    try:
        if any((Path(name) / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise SodaError(f"{shown}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            return ds
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except SodaError:
        raise
    except Exception as err:
        reason = first_line(err, 200) or type(err).__name__
        raise SodaError(f"could not load dataset {shown} ({reason})") from None


def read_hf_dataset(spec: str, text_column=None, audio_column=None, recording_column=None) -> Corpus:
    """`hf:NAME[:CONFIG]:SPLIT`; NAME is a hub id or a `save_to_disk` directory."""
    import datasets

    name, _, split = hf_spec(spec)
    ds = open_hf_dataset(spec)
    columns = list(ds.column_names)
    audio_col = audio_column or next((c for c, f in ds.features.items() if type(f).__name__ == "Audio"), None)
    audio_col = audio_col or ("audio" if "audio" in columns else None)
    if audio_col is None or audio_col not in columns:
        raise SodaError(f"{spec}: no audio column among {', '.join(columns)}; pass --audio-column")
    text_col = _pick(columns, TEXT_COLUMNS, text_column, "text", spec)
    rec_col = _pick(columns, RECORDING_COLUMNS, recording_column, "recording", spec)
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    if type(ds.features[audio_col]).__name__ == "Audio":
        ds = ds.cast_column(audio_col, datasets.Audio(decode=False))
    meta = ds.select_columns([c for c in (text_col, rec_col, id_col) if c])
    corpus = Corpus()
    for i, row in enumerate(meta):
        uid = str(row[id_col]) if id_col else f"{name}:{split}:{i}"
        try:
            text = row[text_col]
            if not isinstance(text, str):
                raise SkipItem("no text")
            text = clean_transcript(text)
        except SkipItem as err:
            corpus.skip(f"{spec}[{i}]", str(err))
            continue
        recording = str(row[rec_col]) if rec_col else uid
        corpus.utterances.append(Utterance(uid, recording, text, HFAudio(spec, ds, audio_col, i), (i,)))
    return corpus


def read_inputs(inputs: list[str], **hf_options) -> Corpus:
    """Dispatch each input by kind; a missing path is a user error (SodaError)."""
    corpus = Corpus()
    for item in inputs:
        if item.startswith("hf:"):
            corpus.extend(read_hf_dataset(item, **hf_options))
            continue
        path = Path(item)
        if not path.exists():
            raise SodaError(f"input {item} does not exist")
        if path.is_dir():
            corpus.extend(scan_directory(path))
        elif path.suffix == ".jsonl" and _is_audio_manifest(path):
            corpus.extend(read_manifest(path))
        elif path.suffix in (".txt", ".jsonl", ".text", ".md"):
            corpus.extend(read_text_corpus(path))
        else:
            raise SodaError(f"input {item}: not a directory, a .jsonl manifest, a .txt/.jsonl text file, or hf:NAME:SPLIT")
    return corpus
