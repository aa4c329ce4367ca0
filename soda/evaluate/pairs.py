"""Likelihood pairs: does the model give the real item a higher score than its corrupted twin?

sWUGGY (word vs non-word), sBLIMP (grammatical vs not) and SALMon (acoustically consistent vs
not) score audio: `BOS <|audio_start|>A<|audio_end|>`, score = mean log-prob of the audio tokens
(or their sum, or only some codebooks). tWUGGY and tBLIMP score the same items' text:
`BOS <|text_start|>T<|text_end|>`, mean log-prob of T's tokens. A pair is right when good > bad
(a tie is wrong). SALMon is micro-averaged over all pairs, with per-task accuracies beside.

Data: the public Hugging Face datasets by default; or `--data-for TASK=` a JSONL file (or a
directory holding `pairs.jsonl`) of `{"good", "bad", "id"?, "group"?}` (audio paths relative to
the file, or texts), a directory with `good/` and `bad/` trees of same-named audio files, a
`save_to_disk` directory, or `hf:NAME[:CONFIG]:SPLIT`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soda.evaluate.hierarchical import UNSCORED
from soda.evaluate.scoring import (audio_mask, audio_sequence, check_length, codebook_choice, reduce, text_sequence,
                                   unscored)
from soda.evaluate.tasks import Skips, Task, entry, register, share
from tokenize_audio.errors import SodaError, first_line
from tokenize_audio.sources import AUDIO_EXTENSIONS, HFAudio


@dataclass(frozen=True)
class Layout:
    """Where a benchmark's Hugging Face dataset keeps things."""

    hub_id: str
    config: str | None
    split: str
    id_column: str
    audio: tuple[str, str] | None
    text: tuple[str, str] | None
    group: str | None = None


SWUGGY = Layout("speed/sWUGGY", None, "train", "id", ("positive", "negative"), ("positive_word", "negative_word"))
SBLIMP = Layout("speed/sBLIMP", None, "train", "id", ("positive", "negative"),
                ("positive_transcription", "negative_transcription"))
SALMON = Layout("slprl/SALMon", "all", "train", "ind", ("positive_audio", "negative_audio"), None, "task")


@dataclass
class Pair:
    id: str
    good: object  # audio (path, HFAudio) or text
    bad: object
    group: str | None = None


@dataclass
class Pairs:
    pairs: list[Pair]
    skips: Skips
    source: str
    modality: str  # "audio" | "text"
    lower: bool = False


# --- reading ---------------------------------------------------------------------------------
def read_pairs(spec: str | None, layout: Layout, modality: str, limit: int | None, name: str) -> Pairs:
    if spec is None:
        spec = f"hf:{layout.hub_id}"
    skips = Skips()
    if spec.startswith("hf:"):
        pairs = _hf_pairs(spec, layout, modality, limit, skips, name)
    else:
        path = Path(spec).expanduser()
        if path.is_dir() and (path / "pairs.jsonl").is_file():
            path = path / "pairs.jsonl"
        if path.is_file():
            pairs = _jsonl_pairs(path, modality, skips)
        elif path.is_dir() and (path / "good").is_dir() and (path / "bad").is_dir() and modality == "audio":
            pairs = _folder_pairs(path, skips)
        elif path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
            pairs = _hf_pairs(f"hf:{path}", layout, modality, limit, skips, name)
        elif path.exists():
            raise SodaError(f"--data-for {name}={spec}: expected a pairs.jsonl file, a directory with pairs.jsonl"
                            f"{', good/ and bad/' if modality == 'audio' else ''} or a saved Hugging Face dataset")
        else:
            raise SodaError(f"--data-for {name}={spec}: no such file or directory")
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise SodaError(f"{name}: no usable pairs in {spec}" + (f" ({len(skips)} skipped)" if len(skips) else ""))
    return Pairs(pairs, skips, spec, modality)


def _hf_pairs(spec: str, layout: Layout, modality: str, limit, skips: Skips, name: str) -> list[Pair]:
    parts = spec[3:].split(":")
    where = parts[0]
    config = parts[1] if len(parts) == 3 else (layout.config if where == layout.hub_id else None)
    split = parts[-1] if len(parts) > 1 else layout.split
    try:
        import datasets
    except ImportError:
        raise SodaError(f"{name}: loading {spec} needs the `datasets` package (pip install 'soda[hf]')") from None
    try:
        if Path(where).is_dir():
            ds = datasets.load_from_disk(where)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(where, config, split=split)
    except Exception as err:
        reason = first_line(err, 160) or type(err).__name__
        raise SodaError(f"{name}: cannot load the dataset {where} ({reason}); without hub access, download it "
                        f"elsewhere and pass --data-for {name}=DIR (a save_to_disk copy) or a pairs.jsonl") from None
    columns = layout.audio if modality == "audio" else layout.text
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise SodaError(f"{name}: {where} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    extra = [c for c in (layout.id_column, layout.group) if c and c in ds.column_names]
    if modality == "audio":
        for c in columns:
            ds = ds.cast_column(c, datasets.Audio(decode=False))
        meta = ds.select_columns(extra) if extra else [{}] * len(ds)
    else:
        meta = ds.select_columns(list(columns) + extra)
    pairs = []
    for i, row in enumerate(meta):
        pid = str(row.get(layout.id_column, i))
        group = str(row[layout.group]) if layout.group and layout.group in row else None
        if modality == "audio":
            pairs.append(Pair(pid, HFAudio(where, ds, columns[0], i), HFAudio(where, ds, columns[1], i), group))
        elif all(isinstance(row[c], str) and row[c].strip() for c in columns):
            pairs.append(Pair(pid, row[columns[0]], row[columns[1]], group))
        else:
            skips.add(pid, "empty or missing text")
    return pairs


def _jsonl_pairs(path: Path, modality: str, skips: Skips) -> list[Pair]:
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is not part of the first field
    except (UnicodeDecodeError, OSError) as err:
        raise SodaError(f"{path}: unreadable ({err})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            good, bad = row.get("good", row.get("positive")), row.get("bad", row.get("negative"))
        except (json.JSONDecodeError, AttributeError):
            skips.add(f"{path.name}:{n}", "not a JSON object")
            continue
        pid = str(row.get("id", f"{path.name}:{n}"))
        if not (isinstance(good, str) and good.strip() and isinstance(bad, str) and bad.strip()):
            skips.add(pid, "needs non-empty 'good' and 'bad' fields")
            continue
        if modality == "audio":
            good, bad = str(path.parent / good), str(path.parent / bad)
        group = row.get("group", row.get("task"))
        pairs.append(Pair(pid, good, bad, None if group is None else str(group)))
    return pairs


def _folder_pairs(root: Path, skips: Skips) -> list[Pair]:
    pairs = []
    for good in sorted(p for p in (root / "good").rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS):
        rel = good.relative_to(root / "good")
        bad = root / "bad" / rel
        if not bad.is_file():
            skips.add(rel, "no bad/ file of the same name")
            continue
        pairs.append(Pair(str(rel.with_suffix("")), str(good), str(bad), rel.parts[0] if len(rel.parts) > 1 else None))
    return pairs


# --- scoring ---------------------------------------------------------------------------------
def _audio_item(vocab, codes, keep) -> tuple[np.ndarray, np.ndarray]:
    ids = audio_sequence(vocab, codes)
    return ids, audio_mask(ids, vocab, keep)


def run_pairs(ctx, data: Pairs, name: str) -> dict:
    vocab, settings = ctx.vocab, ctx.settings
    keep = codebook_choice(settings.codebooks, vocab) if data.modality == "audio" else None
    sides = [p.good for p in data.pairs] + [p.bad for p in data.pairs]
    n = len(data.pairs)
    if data.modality == "audio":
        built = [c if isinstance(c, str) else _audio_item(vocab, c, keep)
                 for c in ctx.audio_codes(sides, f"{name}: encoding")]
    else:
        built = [text_sequence(vocab, t.lower() if data.lower else t) for t in sides]
    usable, seqs, masks = [], [], []
    for i, pair in enumerate(data.pairs):
        reasons = [f"{side}: {problem}" for side, b in (("good", built[i]), ("bad", built[n + i]))
                   if (problem := b if isinstance(b, str) else check_length(len(b[0]), settings.max_len))]
        if reasons:
            data.skips.add(pair.id, "; ".join(reasons))
            continue
        usable.append(i)
        for b in (built[i], built[n + i]):
            seqs.append(b[0])
            masks.append(b[1])
    lps = ctx.log_probs(seqs, masks, f"{name}: scoring") if seqs else []
    items, by_group = [], defaultdict(lambda: [0, 0])
    correct = ties = 0
    scored = 0
    for j, i in enumerate(usable):
        pair = data.pairs[i]
        if missing := unscored(lps[2 * j]) + unscored(lps[2 * j + 1]):
            data.skips.add(pair.id, f"{missing} tokens unscored: {UNSCORED}")
            continue
        scored += 1
        good, bad = reduce(lps[2 * j], settings.reduction), reduce(lps[2 * j + 1], settings.reduction)
        right = good > bad
        correct += right
        ties += good == bad
        if pair.group is not None:
            by_group[pair.group][0] += right
            by_group[pair.group][1] += 1
        items.append({"id": pair.id, "group": pair.group, "good": good, "bad": bad, "correct": bool(right)})
    extra = {"correct": int(correct), "ties": int(ties), "chance": 0.5}
    if by_group:
        extra["by_group"] = {g: {"accuracy": share(c, t), "count": t} for g, (c, t) in sorted(by_group.items())}
        extra["macro_accuracy"] = float(np.mean([c / t for c, t in by_group.values()]))
    how = {"data": data.source, "score": f"{settings.reduction} log-prob of the "
           + ("audio tokens" if data.modality == "audio" else "text tokens"), "correct_if": "good > bad (ties wrong)"}
    if data.modality == "audio":
        how |= {"codebooks": list(keep), "codec": ctx.loaded.codec_label, "format": "BOS <|audio_start|>A<|audio_end|>"}
    else:
        how |= {"format": "BOS <|text_start|>T<|text_end|>", "lowercased": data.lower}
    metric = "accuracy (micro-averaged over all pairs)" if by_group else "accuracy"
    result = entry(metric, share(correct, scored), scored, data.skips, how, **extra)
    result["_items"] = items
    return result


def _pair_task(name: str, title: str, layout: Layout, modality: str, lower: bool = False, soda_key=None) -> Task:
    def load(ctx, spec):
        data = read_pairs(spec, layout, modality, ctx.settings.limit, name)
        data.lower = lower
        return data

    kind = "audio files" if modality == "audio" else "texts"
    return register(Task(name, title, load, lambda ctx, data: run_pairs(ctx, data, name),
                         data_help=f"default hf:{layout.hub_id}; or a pairs.jsonl of good/bad {kind}",
                         soda_key=soda_key or name, audio=modality == "audio"))


_pair_task("swuggy", "sWUGGY", SWUGGY, "audio")
_pair_task("sblimp", "sBLIMP", SBLIMP, "audio")
_pair_task("salmon", "SALMon", SALMON, "audio")
_pair_task("twuggy", "tWUGGY", SWUGGY, "text")
_pair_task("tblimp", "tBLIMP", SBLIMP, "text", lower=True)
