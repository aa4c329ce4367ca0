"""Instruction-tuning data: manifests of audio tasks -> instruction documents -> one shard directory per source.

`soda-finetune instruct` follows Falcon3-Audio's recipe, one mixed-task run, on the native model: every item
is `BOS <|audio_start|>A<|audio_end|><|text_start|>instruction<|text_end|><|text_start|>response<|text_end|> EOS`
(`tokenize_audio.documents.instruct_document`) and the loss scores the response only.

Rows a `--data` file may hold (JSON list or JSONL, paths relative to the file; or `hf:NAME[:CONFIG]:SPLIT`):

* instruction rows: `{audio, instruction, response}` with optional `task`, `source`, `id`;
* multiple-choice rows in the MMAU / MMAR / MMSU / AudioMCQ layouts (question, choices or choice_a.., answer as
  text, letter or index): the instruction is AudioMCQ's template and the response `<answer>OPTION</answer>`;
* free-form QA rows (Open-ASQA style) `{audio, question, answer}`: the question is the instruction.

A row's `source` (else its file's `--data` name) names the source it trains in: each source is written to
RUN/data/SOURCE as a soda-tokenize shard directory, and mixed by `--mix` weights (token shares), or by
temperature sampling over the sources' token counts. The report (RUN/data_report.json) gives per source the items,
total and unique hours (a clip asked about five times counts five times in the first, once in the second), the
rows skipped with reasons, and the contamination check: training clips that are also in given evaluation sets,
by file id (the audio file's name) and by a hash of the clip's audio tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tokenize_audio.documents import (holdout_score, instruct_document, mcq_instruction, mcq_response,
                                      validation_recordings)
from tokenize_audio.errors import SodaError
from tokenize_audio.sources import HFAudio

INSTRUCTION_FIELDS = ("instruction", "prompt")
RESPONSE_FIELDS = ("response", "output", "answer")
LISTED = 20  # overlapping ids named in an error (all are in the report)


@dataclass
class InstructItem:
    id: str
    audio: object  # path or HFAudio
    instruction: str
    response: str
    task: str | None
    source: str
    key: str = ""  # the clip's name wherever the data lies: its path relative to its --data file (`clip_keys`)

    @property
    def clip(self) -> str:
        """What identifies the clip: the same file asked about twice is one clip."""
        return str(self.audio)

    @property
    def file_id(self) -> str:
        """The audio file's name without its suffix (an AudioSet/YouTube id, a Clotho file name ...)."""
        return Path(str(self.audio)).stem if isinstance(self.audio, str) else str(self.audio)


def clip_keys(items: list[InstructItem]) -> dict[str, str]:
    """A name for each clip that does not depend on where the data lies: an audio file's path relative to the
    `--data` file that names it (a dataset clip as it is). The held-out clips and the shards' order hash these, so
    the same dataset copied or moved elsewhere splits and trains alike."""
    return {i.clip: i.key or i.clip for i in items}


def held_out_clips(items: list[InstructItem], fraction: float) -> set[str]:
    """The clips held out for validation (all of a clip's items go together; at least one clip when `fraction` > 0),
    chosen by `validation_recordings` on their `clip_keys`: both model families hold out the same clips."""
    keys = clip_keys(items)
    held = validation_recordings(sorted(set(keys.values())), fraction)
    return {clip for clip, key in keys.items() if key in held}


def shard_order(items: list[InstructItem], seed: int) -> list[InstructItem]:
    """The order items are written to shards in: seeded by clip (`clip_keys`), a clip's items together."""
    keys = clip_keys(items)
    return sorted(items, key=lambda i: (holdout_score(f"{seed}/{keys[i.clip]}"), keys[i.clip], i.id))


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def to_item(row, base: Path | None, pid: str, source: str) -> InstructItem:
    """One row -> InstructItem; ValueError with the reason for a row that cannot be used."""
    from soda.evaluate.mcq_items import AUDIO_FIELDS, normalise

    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    rid = next((str(row[k]) for k in ("id", "question_id", "uid", "index") if row.get(k) not in (None, "")), pid)
    name = _text(row.get("source")) or source
    task = _text(row.get("task")) or _text(row.get("task_name")) or _text(row.get("domain"))
    if any(k in row for k in ("choices", "options", "choice_a", "option_a")):
        item = normalise(row, base, pid)  # MCQ layouts: their reader's rules and errors
        return InstructItem(item.id, item.audio, mcq_instruction(item.question, item.choices),
                            mcq_response(item.choices[item.answer]), task or item.domain, name,
                            _key(item.audio, base))
    instruction = next((_text(row.get(k)) for k in INSTRUCTION_FIELDS if _text(row.get(k))), None)
    instruction = instruction or _text(row.get("question"))
    response = next((_text(row.get(k)) for k in RESPONSE_FIELDS if _text(row.get(k))), None)
    if instruction is None:
        raise ValueError("no instruction (or question)")
    if response is None:
        raise ValueError("no response (or answer)")
    field = next((k for k in AUDIO_FIELDS if row.get(k)), None)
    if field is None:
        raise ValueError("no audio")
    audio = row[field]
    if isinstance(audio, dict):
        audio = audio.get("path")
    if not isinstance(audio, (str, HFAudio)) or not audio:
        raise ValueError("no audio path")
    if isinstance(audio, str) and base is not None and not Path(audio).is_absolute():
        audio = str((base / audio).resolve())
    return InstructItem(rid, audio, instruction, response, task, name, _key(audio, base))


def _key(audio, base: Path | None) -> str:
    import os

    return os.path.relpath(audio, base) if isinstance(audio, str) and base is not None else str(audio)


def parse_data(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (named after the file) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if sep and not spec.startswith("hf:") and "/" not in name:
        return name, path
    stem = spec.split(":")[1] if spec.startswith("hf:") else Path(spec).stem
    return stem.replace("/", "_"), spec


def read_items(specs: list[str]) -> tuple[list[InstructItem], list[dict], dict]:
    """Every usable item of every `--data` file, the rows skipped (with reasons) and each file's sha256."""
    from soda.evaluate.mcq_items import file_rows, hf_rows
    from soda.evaluate.tasks import Skips

    items, skipped, hashes, seen = [], [], {}, set()
    for spec in specs:
        name, path = parse_data(spec)
        skips = Skips()
        if path.startswith("hf:"):
            rows, base, hashes[spec] = hf_rows(path), None, path
        else:
            file = Path(path).expanduser()
            if not file.is_file():
                raise SodaError(f"--data {spec}: no such file (a .json/.jsonl of instruction or MCQ rows, or "
                                f"hf:NAME:SPLIT)")
            rows, base = file_rows(file, skips), file.parent
            hashes[spec] = file_sha256(file)
        for pid, row in rows:
            try:
                item = to_item(row, base, pid, name)
            except ValueError as err:
                skips.add(pid, str(err))
                continue
            if (item.source, item.id) in seen:
                skips.add(pid, f"duplicate id {item.id} in source {item.source}")
                continue
            seen.add((item.source, item.id))
            items.append(item)
        skipped += [{"source": name, **s} for s in skips.items]
    if not items:
        reasons = "; ".join(sorted({s["reason"].split(" (")[0] for s in skipped})) or "no rows"
        raise SodaError(f"--data: no usable items in {', '.join(specs)} ({len(skipped)} rows skipped: {reasons})")
    return items, skipped, hashes


def file_sha256(path: Path) -> str:
    """What a --resume compares: an edited --data file would leave the run training on the old items."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refuse_edited_data(report: dict, data_dir: Path) -> None:
    """On --resume: a --data file edited since `data_dir` was prepared from it would leave the run training on the
    old items; refuse it in one line (a moved-away file, or a hub dataset, is not checked)."""
    for spec, digest in report["data_sha256"].items():
        path = Path(parse_data(spec)[1])
        if not spec.startswith("hf:") and path.is_file() and file_sha256(path) != digest:
            raise SodaError(f"--resume: {path} changed since {data_dir} was prepared from it; start a new run (another "
                            f"--out) from the edited file, or restore it")


def cap_items(items: list[InstructItem], caps: dict, seed: int) -> tuple[list[InstructItem], dict]:
    """At most caps[source] (or caps["*"]) items per source, a seeded choice; (kept, dropped count per source)."""
    by_source = defaultdict(list)
    for item in items:
        by_source[item.source].append(item)
    unknown = sorted(set(caps) - set(by_source) - {"*"})
    if unknown:
        raise SodaError(f"--cap names {', '.join(unknown)}, but the sources are {', '.join(sorted(by_source))}")
    kept, dropped = [], {}
    for source, group in by_source.items():
        cap = caps.get(source, caps.get("*"))
        if cap is not None and len(group) > cap:
            order = sorted(group, key=lambda i: holdout_score(f"{seed}/{i.id}"))
            group, dropped[source] = order[:cap], len(group) - cap
        kept += group
    return kept, dropped


def parse_caps(text: str | None) -> dict:
    """`--cap N` (every source) or `--cap NAME=N,NAME=N`."""
    if not text:
        return {}
    try:
        if "=" not in text:
            return {"*": int(text)}
        return {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise SodaError(f"--cap {text!r}: expected N or NAME=N,NAME=N (items per source)") from None


def temperature_weights(tokens: dict, temperature: float) -> dict:
    """Token shares p_i ∝ n_i^(1/T): T=1 keeps the natural proportions, larger T flattens them toward uniform."""
    if not temperature > 0:
        raise SodaError(f"--temperature {temperature}: must be positive (1 keeps the natural proportions)")
    raw = {k: float(n) ** (1.0 / temperature) for k, n in tokens.items()}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


# --------------------------------------------------------------------------------------------
# Encoding and shards
# --------------------------------------------------------------------------------------------
def codes_hash(codes: np.ndarray) -> str:
    """A clip's audio tokens as a hash: the same audio under another file name is still the same clip."""
    return hashlib.sha1(np.ascontiguousarray(codes, dtype="<u4").tobytes()).hexdigest()


def encode_clips(codec, clips: list, progress: bool, desc: str) -> dict:
    """clip key -> codes [K, F], or the reason (str) it is unusable (each distinct clip encoded once)."""
    from tokenize_audio.encoding import audio_codes, default_batch_seconds

    first = {}
    for c in clips:
        first.setdefault(str(c), c)
    codes = audio_codes(codec, list(first.values()), default_batch_seconds(codec), desc, progress)
    return dict(zip(first, codes))


class EvalIndex:
    """The evaluation sets' clips by file id and by audio-token hash: what training clips are checked against."""

    def __init__(self, codec, specs: list[str], progress: bool, clip_hashes=None):
        """`clip_hashes(clips, desc) -> {clip: hash or None}` stands in for the codec's tokens (a model family
        without a codec hashes the waveform)."""
        self.by_file, self.by_hash = defaultdict(list), defaultdict(list)
        self.hash_name = "audio tokens" if clip_hashes is None else "waveform"
        if specs:
            items, _, _ = read_items(specs)
            clips = [i.audio for i in items]
            if clip_hashes is None:
                codes = encode_clips(codec, clips, progress, "evaluation clips")
                hashes = {k: None if isinstance(v, str) else codes_hash(v) for k, v in codes.items()}
            else:
                hashes = clip_hashes(clips, "evaluation clips")
            for i in items:
                entry = {"eval_set": i.source, "eval_item": i.id}
                self.by_file[i.file_id].append(entry)
                if hashes[i.clip] is not None:
                    self.by_hash[hashes[i.clip]].append(entry)
        self.digest = hashlib.sha1(json.dumps([sorted(self.by_file), sorted(self.by_hash)]).encode()).hexdigest()

    def matches(self, item: InstructItem, clip_hash: str) -> list[dict]:
        found = [{"by": "file id", **e} for e in self.by_file.get(item.file_id, [])]
        found += [{"by": self.hash_name, **e} for e in self.by_hash.get(clip_hash, [])]
        return [{"source": item.source, "item": item.id, "clip": item.clip, **f} for f in found]


def _identity(item: InstructItem) -> list:
    """What a shard's fingerprint knows of an item: its fields and its audio file's size and mtime (an edited clip is
    encoded again), without encoding it."""
    path = Path(item.audio) if isinstance(item.audio, str) else None
    stat = path.stat() if path is not None and path.is_file() else None
    return [asdict(item) | {"audio": item.clip}, [stat.st_size, stat.st_mtime_ns] if stat else None]


def write_source(out: Path, items: list[InstructItem], vocab, codec, evaluation: EvalIndex, drop: bool,
                 validation_fraction: float, items_per_shard: int, seed: int, progress: bool) -> list[dict]:
    """One source's items as instruction documents in `out` (shards, sidecars, manifest, vocabulary), a shard at a
    time: only one shard's codes are in memory. A shard whose sidecar fingerprint matches is kept from an earlier
    run. Each sidecar records its clips (seconds, audio-token hash), skipped items and evaluation overlaps (left out
    with `drop`); returns the sidecars."""
    from tqdm import tqdm

    from tokenize_audio.pipeline import (TokenizeSettings, finished_sidecar, fingerprint, write_manifest)
    from tokenize_audio.shards import atomic_write_json
    from tokenize_audio.sources import Corpus

    out.mkdir(parents=True, exist_ok=True)
    held = held_out_clips(items, validation_fraction)
    settings = TokenizeSettings(codec.describe(), vocab.text_tokenizer_source, ("instruct",), validation_fraction,
                                recordings_per_shard=items_per_shard)
    base = settings.to_dict() | {"vocab": vocab.to_dict(), "drop": evaluation.digest if drop else None}
    sidecars = []
    with tqdm(total=len(items), unit="item", desc=f"encoding {out.name}", disable=not progress,
              dynamic_ncols=True) as bar:
        for split in ("train", "validation"):
            chosen = shard_order([i for i in items if (i.clip in held) == (split == "validation")], seed)
            for first in range(0, len(chosen), items_per_shard):
                chunk = chosen[first:first + items_per_shard]
                name = f"{split}-speech-{first // items_per_shard:05d}"
                made_from = fingerprint(base, [_identity(i) for i in chunk])
                sidecar = finished_sidecar(out, name, made_from)
                if sidecar is None:
                    sidecar = _write_chunk(out, name, split, chunk, vocab, codec, evaluation, drop)
                    sidecar["fingerprint"] = made_from
                    atomic_write_json(out / f"{name}.json", sidecar)
                bar.update(len(chunk))
                sidecars.append(sidecar)
    vocab.save(out)
    write_manifest(out, codec, vocab, settings, Corpus(), sidecars)
    return sidecars


def _write_chunk(out: Path, name: str, split: str, chunk: list[InstructItem], vocab, codec, evaluation: EvalIndex,
                 drop: bool) -> dict:
    from tokenize_audio.pipeline import ShardStats, sample_key
    from tokenize_audio.shards import write_shard

    codes = encode_clips(codec, [i.audio for i in chunk], False, name)
    clips = {k: [round(c.shape[1] / codec.frame_rate, 3), codes_hash(c)] for k, c in codes.items()
             if not isinstance(c, str)}
    samples, skipped, found, stats = [], [], [], ShardStats()
    for item in chunk:
        c = codes[item.clip]
        if isinstance(c, str):
            skipped.append({"source": item.source, "item": item.id, "reason": f"audio: {c}"})
            continue
        matches = evaluation.matches(item, clips[item.clip][1])
        found += matches
        if matches and drop:
            skipped.append({"source": item.source, "item": item.id, "reason": "in an evaluation set"})
            continue
        ids, response_start = instruct_document(vocab, vocab.codes_to_ids(c), item.instruction, item.response)
        counts = vocab.count_types(ids)
        stats.add_document(counts)
        stats.recordings += 1
        stats.utterances += 1
        stats.audio_seconds += c.shape[1] / codec.frame_rate
        meta = {"recording": item.id, "format": "instruct", "kind": "speech", "task": item.task,
                "source": item.source, "response_start": response_start, "clip": item.clip,
                "audio_seconds": clips[item.clip][0], "tokens": counts}
        samples.append((sample_key(f"{item.source}/{item.id}", "instruct"), ids, meta))
    if samples:
        write_shard(out / f"{name}.tar", samples)
    return {"name": name, "file": f"{name}.tar" if samples else None, "split": split, "kind": "speech",
            **stats.to_dict(), "skipped": skipped, "overlaps": found,
            "items": [[s[2]["recording"], s[2]["clip"], s[2]["task"], len(s[1])] for s in samples],
            "clips": {k: clips[k] for k in dict.fromkeys(s[2]["clip"] for s in samples)}}


def source_summary(sidecars: list[dict]) -> dict:
    items = [row for s in sidecars for row in s["items"]]
    clips = {k: v[0] for s in sidecars for k, v in s["clips"].items()}
    seconds = sum(clips[clip] for _, clip, _, _ in items)
    return {"items": len(items), "tasks": dict(Counter(task or "-" for _, _, task, _ in items).most_common()),
            "hours": round(seconds / 3600, 4), "unique_clips": len(clips),
            "unique_hours": round(sum(clips.values()) / 3600, 4),
            "train_tokens": sum(n for s in sidecars if s["split"] == "train" for *_, n in s["items"]),
            "tokens": sum(n for s in sidecars for *_, n in s["items"])}


def prepare_instruct_data(specs: list[str], out: Path, vocab, codec, *, caps: dict, seed: int,
                          validation_fraction: float, items_per_shard: int, eval_sets: list[str],
                          contamination: str, progress: bool) -> dict:
    """Write every source's shards into `out` (RUN/data) and return the data report (before weights)."""
    items, skipped, file_hashes = read_items(specs)
    items, capped = cap_items(items, caps, seed)
    by_source = defaultdict(list)
    for item in items:
        by_source[item.source].append(item)
    for name in by_source:
        if not name or "/" in name or name.startswith("."):
            raise SodaError(f"source name {name!r} cannot name a directory; give --data NAME=FILE or fix the rows' "
                            f"source field")
    evaluation = EvalIndex(codec, eval_sets, progress)
    sources, lengths, found, clips = {}, {}, [], {}
    for name in sorted(by_source):
        sidecars = write_source(out / name, by_source[name], vocab, codec, evaluation, contamination == "drop",
                                validation_fraction, items_per_shard, seed, progress)
        skipped += [x for s in sidecars for x in s["skipped"]]
        found += [x for s in sidecars for x in s["overlaps"]]
        clips.update({k: v[0] for s in sidecars for k, v in s["clips"].items()})
        lengths.update({f"{name}/{i}": n for s in sidecars for i, _, _, n in s["items"]})
        summary = source_summary(sidecars)
        if summary["items"]:
            sources[name] = summary | {"directory": str(out / name), "capped": capped.get(name, 0)}
    if not sources:
        reasons = "; ".join(sorted({s["reason"].split(":")[0] for s in skipped}))
        raise SodaError(f"--data: no usable items ({len(skipped)} skipped: {reasons})")
    reasons = Counter(s["reason"].split(":")[0].split(" (")[0] for s in skipped)
    return {"data": specs, "data_sha256": file_hashes, "sources": sources,
            "total": {"items": sum(s["items"] for s in sources.values()),
                      "hours": round(sum(s["hours"] for s in sources.values()), 4),
                      "unique_clips": len(clips), "unique_hours": round(sum(clips.values()) / 3600, 4)},
            "skipped_count": len(skipped), "skipped_reasons": dict(reasons.most_common()), "skipped": skipped,
            "contamination": {"eval_sets": eval_sets, "mode": contamination, "overlapping_items":
                              len({(f["source"], f["item"]) for f in found}), "overlaps": found},
            "_lengths": lengths}


def contamination_message(report: dict) -> str | None:
    """One line naming the training items that are in an evaluation set (None when there are none)."""
    c = report["contamination"]
    if not c["overlaps"]:
        return None
    named = ", ".join(f"{f['source']}/{f['item']} = {f['eval_set']}/{f['eval_item']} ({f['by']})"
                      for f in c["overlaps"][:LISTED])
    more = f", ... ({len(c['overlaps'])} in all)" if len(c["overlaps"]) > LISTED else ""
    return f"{c['overlapping_items']} training items share a clip with the evaluation sets: {named}{more}"


def mixture(report: dict, mix: dict, temperature: float | None) -> dict:
    """Each source's weight (token share): --mix as given, else temperature sampling (T=1: natural shares)."""
    tokens = {name: s["train_tokens"] for name, s in report["sources"].items()}
    if mix:
        if temperature is not None:
            raise SodaError("give --mix or --temperature, not both")
        return mix
    return temperature_weights(tokens, temperature or 1.0)


def save_report(path: Path, report: dict) -> None:
    from tokenize_audio.shards import atomic_write_json

    atomic_write_json(path, {k: v for k, v in report.items() if not k.startswith("_")})


def read_report(path: Path) -> dict:
    return json.loads(path.read_text())
