"""The questions of multiple-choice audio QA, and what both scoring modes (`mcq` likelihood, `mcq_generate`) share.

Benchmark files in the MMAU / MMAR / MMSU / AudioMCQ layouts (JSON list or JSONL, or `hf:NAME[:CONFIG]:SPLIT`) are
read into `Item`s: question, choices, the answer's index, the audio, a domain; a malformed row is skipped with its
reason. `soda-finetune instruct` and `grpo` read their multiple-choice data with the same reader.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soda.evaluate.tasks import Context, Skips
from tokenize_audio.errors import SodaError, first_line
from tokenize_audio.sources import HFAudio

AUDIO_FIELDS = ("audio_path", "audio", "audio_id", "audio_file", "audio_filepath", "wav", "path")
DOMAIN_FIELDS = ("domain", "task", "modality", "category", "task_name", "source_dataset")
ID_FIELDS = ("id", "question_id", "uid", "index")
LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:)]?(\s.*)?$")


@dataclass
class Item:
    id: str
    question: str
    choices: list[str]
    answer: int
    audio: object  # path or HFAudio
    domain: str | None
    row: dict  # the input row (for the weak/strong files)
    audio_field: str | None = None


@dataclass
class Questions:
    items: list[Item]
    skips: Skips
    source: str


# --- reading ---------------------------------------------------------------------------------
def _choices(row: dict) -> list | None:
    for key in ("choices", "options"):
        if isinstance(row.get(key), list):
            return row[key]
    lettered = [row.get(f"choice_{c}", row.get(f"option_{c}")) for c in "abcdefgh"]
    found = [c for c in lettered if c is not None]
    return found or None


def _answer_index(answer, choices: list[str]) -> int | None:
    """The answer as an option index: its text, a letter ("B", "(B)", "B. text") or a 0-based number."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    text = str(answer).strip()
    folded = [c.strip().casefold() for c in choices]
    if text.casefold() in folded:
        return folded.index(text.casefold())
    m = LETTER.match(text)
    if m:
        index = ord(m.group(1).upper()) - ord("A")
        rest = (m.group(2) or "").strip().casefold()
        if 0 <= index < len(choices) and (not rest or rest == folded[index]):
            return index
    return None


def _row_id(row, fallback: str) -> str:
    if not isinstance(row, dict):
        return fallback
    return next((str(row[k]) for k in ID_FIELDS if row.get(k) not in (None, "")), fallback)


def normalise(row, base: Path | None, pid: str) -> Item:
    """One benchmark row -> Item; raises ValueError with the reason for a malformed row."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("no question")
    choices = _choices(row)
    if not choices or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("needs at least two non-empty choices")
    raw = next((row[k] for k in ("answer", "answer_gt", "label", "correct_answer") if k in row), None)
    answer = _answer_index(raw, choices)
    if answer is None:
        raise ValueError(f"answer {raw!r} is not one of the choices")
    field = next((k for k in AUDIO_FIELDS if row.get(k)), None)
    if field is None:
        raise ValueError("no audio")
    audio = row[field]
    if isinstance(audio, dict):  # {"path": ...} as some exports write it
        audio = audio.get("path")
    if not isinstance(audio, (str, HFAudio)) or not audio:
        raise ValueError("no audio path")
    if isinstance(audio, str) and base is not None and not Path(audio).is_absolute():
        audio = str((base / audio).resolve())
    domain = next((str(row[k]) for k in DOMAIN_FIELDS if row.get(k) not in (None, "")), None)
    return Item(_row_id(row, pid), question.strip(), [c.strip() for c in choices], answer, audio, domain, row, field)


def read_questions(spec: str | None, limit: int | None) -> Questions:
    if spec is None:
        raise SodaError("mcq: give --data-for mcq=FILE (a JSON list or JSONL of questions: question, choices, "
                        "answer, audio path, optional domain)")
    skips, items = Skips(), []
    if spec.startswith("hf:"):
        rows, base = hf_rows(spec), None
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SodaError(f"--data-for mcq={spec}: no such file (expected a .json or .jsonl file of questions)")
        rows, base = file_rows(path, skips), path.parent
    for pid, row in rows:
        if limit is not None and len(items) + len(skips) >= limit:
            break
        try:
            items.append(normalise(row, base, pid))
        except ValueError as err:
            skips.add(_row_id(row, pid), str(err))
    if not items:
        raise SodaError(f"mcq: no usable questions in {spec}" + (f" ({len(skips)} skipped)" if len(skips) else ""))
    return Questions(items, skips, spec)


def file_rows(path: Path, skips: Skips) -> list[tuple[str, object]]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first field
    except (UnicodeDecodeError, OSError) as err:
        raise SodaError(f"{path}: unreadable ({err})") from None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SodaError(f"{path}: not valid JSON ({err}); use .jsonl for one question per line") from None
        if isinstance(data, dict):
            data = next((v for k, v in data.items() if k in ("data", "items", "questions") and isinstance(v, list)),
                        None)
        if not isinstance(data, list):
            raise SodaError(f"{path}: expected a list of questions")
        return [(f"{path.name}[{i}]", row) for i, row in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path.name}:{n}", json.loads(line)))
        except json.JSONDecodeError:
            skips.add(f"{path.name}:{n}", "not valid JSON")
    return rows


def hf_rows(spec: str):
    """`hf:NAME[:CONFIG]:SPLIT` with an audio column (read undecoded), e.g. MMSU."""
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3):
        raise SodaError(f"--data-for mcq={spec}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
    try:
        import datasets

        ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, config, split=split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    except Exception as err:
        reason = first_line(err, 160) or type(err).__name__
        raise SodaError(f"mcq: cannot load the dataset {name} ({reason})") from None
    audio_col = next((c for c, f in ds.features.items() if type(f).__name__ == "Audio"), None)
    if audio_col:
        ds = ds.cast_column(audio_col, datasets.Audio(decode=False))
    text_cols = [c for c in ds.column_names if c != audio_col]
    for i, row in enumerate(ds.select_columns(text_cols)):
        if audio_col:
            row = dict(row, audio=HFAudio(name, ds, audio_col, i))
        yield f"{name}[{i}]", row


# --- shared by both scoring modes -----------------------------------------------------------
def benchmark(spec: str) -> dict:
    """What the scores rest on: the file's sha256 (a revised benchmark moves numbers), or the hub spec."""
    if spec.startswith("hf:"):
        return {"source": spec}
    path = Path(spec).expanduser()
    return {"source": spec, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def silence_like(ctx: Context, codes: dict) -> dict:
    """Codes of silence as long as each item's audio (one encoding per distinct length)."""
    if not codes:
        return {}
    frames = sorted({c.shape[1] for c in codes.values()})
    spf = ctx.codec.samples_per_frame
    encoded = ctx.encode([np.zeros(f * spf, dtype=np.float32) for f in frames])
    by_frames = dict(zip(frames, encoded))
    return {n: by_frames[c.shape[1]] for n, c in codes.items()}


def tally(flags: dict, item: Item, by_domain: dict, totals: dict) -> None:
    """Add the audio-contribution flags to an item's `flags` and count them overall and in its domain."""
    flags["only_with_audio"] = flags["correct"] and not flags["correct_silence"]
    flags["only_without_audio"] = flags["correct_silence"] and not flags["correct"]
    d = by_domain[item.domain or "all"]
    d["count"] += 1
    d["chance"] += 1 / len(item.choices)
    for key, value in flags.items():
        totals[key] += value
        d[key] += value
