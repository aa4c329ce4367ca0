"""The tokenization run: corpus -> planned shards -> encoded documents -> manifest.

Shards are planned before any audio is read (recordings in a stable hashed order, a fixed number
per shard), so a re-run with the same inputs and settings finds the same plan, keeps every shard
whose sidecar fingerprint matches, and only encodes the rest.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokenize_audio.audio import load_audio
from tokenize_audio.codecs import Codec
from tokenize_audio.documents import build_document, holdout_score, text_document, validation_recordings
from tokenize_audio.encoding import encode_waves
from tokenize_audio.errors import SkipItem, SodaError
from tokenize_audio.shards import atomic_write_json, write_shard
from tokenize_audio.sources import Corpus, TextDocument, Utterance
from tokenize_audio.vocab import TYPE_NAMES, Vocabulary

MANIFEST = "manifest.json"
SETTINGS = "settings.json"
PLAN = "plan.json"  # planned shard names and fingerprints: what --finalize checks before writing the manifest


@dataclass
class TokenizeSettings:
    """Everything that changes the tokens: a re-run into the same --out must use the same values."""

    codec: dict
    text_tokenizer: str
    formats: tuple[str, ...]
    validation_fraction: float
    recordings_per_shard: int = 64
    texts_per_shard: int = 1000
    keep_truncated: bool = False  # keep audio shorter than its header says (skipped by default)

    def to_dict(self) -> dict:
        codec = {k: v for k, v in self.codec.items() if k != "label"}
        # keep_truncated only when set: runs made before the flag existed keep their fingerprints.
        return {"codec": codec, "text_tokenizer": self.text_tokenizer, "formats": list(self.formats),
                "validation_fraction": self.validation_fraction,
                "recordings_per_shard": self.recordings_per_shard, "texts_per_shard": self.texts_per_shard,
                **({"keep_truncated": True} if self.keep_truncated else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizeSettings":
        return cls(**{**d, "formats": tuple(d["formats"])})


@dataclass
class ShardPlan:
    name: str  # e.g. "train-speech-00003"
    split: str  # "train" | "validation"
    kind: str  # "speech" | "text"
    recordings: list = field(default_factory=list)  # list[list[Utterance]] or list[TextDocument]

    def fingerprint(self, settings: TokenizeSettings) -> str:
        if self.kind == "speech":
            content = [[(u.id, u.where, u.start, u.end, u.text) for u in rec] for rec in self.recordings]
        else:
            content = [(d.id, hashlib.sha1(d.text.encode()).hexdigest()) for d in self.recordings]
        return fingerprint(settings.to_dict(), content)


def fingerprint(settings: dict, content) -> str:
    """What a shard's sidecar records to say what it was made from: a re-run keeps a shard whose fingerprint
    matches (`finished_sidecar`)."""
    blob = json.dumps([settings, content], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def plan_shards(corpus: Corpus, settings: TokenizeSettings) -> list[ShardPlan]:
    by_recording: dict[str, list[Utterance]] = defaultdict(list)
    for utt in corpus.utterances:
        by_recording[utt.recording].append(utt)
    for utts in by_recording.values():
        utts.sort(key=lambda u: u.order)
    plans: list[ShardPlan] = []
    speech_val = validation_recordings(by_recording, settings.validation_fraction)
    text_val = validation_recordings([d.id for d in corpus.texts], settings.validation_fraction)
    for kind, items, held, per_shard in (
        ("speech", sorted(by_recording.items()), speech_val, settings.recordings_per_shard),
        ("text", sorted((d.id, d) for d in corpus.texts), text_val, settings.texts_per_shard),
    ):
        for split in ("train", "validation"):
            chosen = [(rid, item) for rid, item in items if (rid in held) == (split == "validation")]
            chosen.sort(key=lambda pair: (holdout_score(pair[0]), pair[0]))  # mixes speakers across shards
            for i in range(0, len(chosen), per_shard):
                plans.append(ShardPlan(f"{split}-{kind}-{i // per_shard:05d}", split, kind,
                                       [item for _, item in chosen[i: i + per_shard]]))
    return plans


def select_part(plans: list[ShardPlan], part: int, parts: int) -> list[ShardPlan]:
    """Part `part` of `parts` (1-based): every parts-th planned shard, so parts are disjoint, cover the plan,
    and do not depend on which other parts run or when."""
    return [plan for j, plan in enumerate(plans) if j % parts == part - 1]


def load_wave(utt: Utterance, sample_rate: int, samples_per_frame: int, keep_truncated: bool):
    """The utterance's audio at the codec rate, cut to whole codec frames; a SkipItem (returned) if unusable."""
    try:
        wave = load_audio(utt.audio, sample_rate, utt.start, utt.end, keep_truncated=keep_truncated)
        frames = len(wave) // samples_per_frame
        if frames < 1:
            raise SkipItem(f"shorter than one codec frame ({1000 * samples_per_frame / sample_rate:.0f} ms)")
        return wave[: frames * samples_per_frame]
    except SkipItem as err:
        return err


def progress_bar(total: int, enabled: bool) -> tqdm:
    """Counts utterances and text documents (so tqdm's ETA covers the whole plan); `show_audio` adds hours."""
    return tqdm(total=total, unit="item", desc="tokenize", disable=not enabled, dynamic_ncols=True)


def show_audio(bar: tqdm, audio_seconds: float, started: float) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    bar.set_postfix_str(f"{audio_seconds / 3600:.2f} h audio, {audio_seconds / 3600 / elapsed:.4f} h/s", refresh=False)


def plan_items(plan: ShardPlan) -> int:
    return len(plan.recordings) if plan.kind == "text" else sum(map(len, plan.recordings))


class ShardEncoder:
    """Encodes planned shards with a codec and vocabulary and writes them into `out`."""

    def __init__(self, codec: Codec, vocab: Vocabulary, settings: TokenizeSettings, out: Path,
                 workers: int = 2, batch_seconds: float = 120.0, progress: bool = True):
        self.codec, self.vocab, self.settings, self.out = codec, vocab, settings, Path(out)
        self.workers = max(1, workers)
        self.batch_seconds = batch_seconds
        self.progress = progress
        self.audio_seconds = 0.0
        self.started = time.perf_counter()

    # --- audio ---------------------------------------------------------------------------------
    def _load(self, utt: Utterance):
        return load_wave(utt, self.codec.sample_rate, self.codec.samples_per_frame, self.settings.keep_truncated)

    def _loaded(self, utts: list[Utterance]):
        """Yield (utterance, wave | SkipItem) in order, decoding ahead on `workers` threads."""
        with ThreadPoolExecutor(self.workers) as pool:
            pending: deque = deque()
            it = iter(utts)
            for utt in it:
                pending.append((utt, pool.submit(self._load, utt)))
                if len(pending) >= self.workers * 4:
                    utt0, fut = pending.popleft()
                    yield utt0, fut.result()
            while pending:
                utt0, fut = pending.popleft()
                yield utt0, fut.result()

    def _encode_buffer(self, buffer: list[tuple[Utterance, np.ndarray]], codes: dict, bar) -> None:
        """Encode buffered waves in duration-sorted batches of at most `batch_seconds` padded audio."""
        waves = [w for _, w in buffer]

        def done(batch: list[int]) -> None:
            self.audio_seconds += sum(len(waves[i]) for i in batch) / self.codec.sample_rate
            show_audio(bar, self.audio_seconds, self.started)
            bar.update(len(batch))

        for (utt, _), c in zip(buffer, encode_waves(self.codec, waves, self.batch_seconds, done)):
            codes[id(utt)] = c  # by object: ids need not be unique in a manifest
        buffer.clear()

    # --- shards --------------------------------------------------------------------------------
    def run_speech_shard(self, plan: ShardPlan, bar, loaded=None) -> tuple[list, dict]:
        """`loaded`: the shard's (utterance, wave | SkipItem) pairs in plan order, if read elsewhere (Ray)."""
        skipped: list[dict] = []
        codes: dict[int, np.ndarray] = {}
        utts = [u for rec in plan.recordings for u in rec]
        buffer: list = []
        buffered = 0.0
        for utt, wave in (self._loaded(utts) if loaded is None else loaded):
            if isinstance(wave, SkipItem):
                skipped.append({"path": utt.where, "reason": str(wave)})
                bar.update(1)
            else:
                buffer.append((utt, wave))
                buffered += len(wave) / self.codec.sample_rate
                if buffered >= self.batch_seconds * 4:  # a larger pool sorts into tighter batches
                    self._encode_buffer(buffer, codes, bar)
                    buffered = 0.0
        self._encode_buffer(buffer, codes, bar)

        samples, stats = [], ShardStats()
        for rec in plan.recordings:
            kept = [u for u in rec if id(u) in codes]
            if not kept:
                continue
            pairs = [(self.vocab.encode_text(u.text), self.vocab.codes_to_ids(codes[id(u)])) for u in kept]
            seconds = [codes[id(u)].shape[1] / self.codec.frame_rate for u in kept]
            utt_meta = [{"id": u.id, "text": u.text, "audio": u.where, "seconds": round(s, 3),
                         **({"start": u.start, "end": u.end} if u.start is not None or u.end is not None else {})}
                        for u, s in zip(kept, seconds)]
            stats.recordings += 1
            stats.utterances += len(kept)
            stats.audio_seconds += sum(seconds)
            for fmt in self.settings.formats:
                ids = build_document(self.vocab, pairs, fmt)
                counts = self.vocab.count_types(ids)
                stats.add_document(counts)
                meta = {"recording": kept[0].recording, "format": fmt, "kind": "speech",
                        "audio_seconds": round(sum(seconds), 3), "tokens": counts, "utterances": utt_meta}
                samples.append((sample_key(kept[0].recording, fmt), ids, meta))
        return samples, stats.to_dict() | {"skipped": skipped}

    def run_text_shard(self, plan: ShardPlan, bar) -> tuple[list, dict]:
        samples, stats = [], ShardStats()
        doc: TextDocument
        for doc in plan.recordings:
            ids = text_document(self.vocab, self.vocab.encode_text(doc.text))
            counts = self.vocab.count_types(ids)
            stats.add_document(counts)
            stats.recordings += 1
            samples.append((sample_key(doc.id, "text"), ids,
                            {"recording": doc.id, "format": "text", "kind": "text", "tokens": counts}))
            bar.update(1)
        return samples, stats.to_dict() | {"skipped": []}

    def encode_shard(self, plan: ShardPlan, bar, loaded=None) -> dict:
        """Encode one planned shard, write its .tar and then its sidecar (the sidecar marks it finished)."""
        started = time.perf_counter()
        if plan.kind == "text":
            samples, stats = self.run_text_shard(plan, bar)
        elif loaded is None:
            samples, stats = self.run_speech_shard(plan, bar)
        else:
            samples, stats = self.run_speech_shard(plan, bar, loaded)
        tar = self.out / f"{plan.name}.tar"
        if samples:
            write_shard(tar, samples)
        else:  # every item was skipped: no empty shard to count or to train on
            tar.unlink(missing_ok=True)
        sidecar = {"name": plan.name, "file": tar.name if samples else None, "split": plan.split,
                   "kind": plan.kind,
                   "fingerprint": plan.fingerprint(self.settings),
                   "seconds": round(time.perf_counter() - started, 3), **stats}
        atomic_write_json(self.out / f"{plan.name}.json", sidecar)
        return sidecar

    def run(self, plans: list[ShardPlan]) -> tuple[list[dict], int]:
        """Encode every planned shard that is not already finished; return (sidecars, shards reused)."""
        todo, sidecars = unfinished(self.out, plans, self.settings)
        reused = len(sidecars)
        with progress_bar(sum(map(plan_items, todo)), self.progress) as bar:
            for plan in todo:
                bar.set_description(plan.name)
                sidecars.append(self.encode_shard(plan, bar))
        sidecars.sort(key=lambda s: s["name"])
        return sidecars, reused


class ShardStats:
    """A shard's (or the manifest's) counts: documents, recordings, utterances, audio seconds, tokens by type."""

    def __init__(self):
        self.documents = self.recordings = self.utterances = 0
        self.audio_seconds = 0.0
        self.tokens = dict.fromkeys(TYPE_NAMES.values(), 0)

    def add_document(self, counts: dict) -> None:
        self.documents += 1
        for k, v in counts.items():
            self.tokens[k] += v

    def to_dict(self) -> dict:
        return {"documents": self.documents, "recordings": self.recordings, "utterances": self.utterances,
                "audio_seconds": round(self.audio_seconds, 3), "tokens": dict(self.tokens)}


def sample_key(recording: str, fmt: str) -> str:
    """A document's key in its shard."""
    # webdataset keys may not contain dots; a hash keeps them unique and short (the id is in the JSON).
    return f"{hashlib.sha1(recording.encode('utf-8')).hexdigest()[:16]}_{fmt}"


def finished_sidecar(out: Path, name: str, fingerprint: str):
    """The sidecar of a finished shard with this fingerprint; its .tar must exist unless it holds no documents."""
    try:
        sidecar = json.loads((out / f"{name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if sidecar.get("fingerprint") != fingerprint:
        return None
    return sidecar if not sidecar.get("file") or (out / f"{name}.tar").is_file() else None


def unfinished(out: Path, plans: list[ShardPlan], settings: TokenizeSettings) -> tuple[list[ShardPlan], list[dict]]:
    """(plans still to encode, sidecars of the finished ones): the one resume rule of every engine."""
    todo, done = [], []
    for plan in plans:
        sidecar = finished_sidecar(out, plan.name, plan.fingerprint(settings))
        (todo.append(plan) if sidecar is None else done.append(sidecar))
    return todo, done


def write_plan(out: Path, plans: list[ShardPlan], settings: TokenizeSettings, codec: Codec, corpus: Corpus) -> None:
    """What the manifest needs besides the sidecars, so that `finalize` works from --out alone (e.g. after
    a SLURM job array whose parts each encoded some shards). Every part writes the same file."""
    atomic_write_json(out / PLAN, {"codec": codec.describe(), "skipped": list(corpus.skipped),
                                   "shards": [{"name": p.name, "fingerprint": p.fingerprint(settings)}
                                              for p in plans]})


def finalize(out: Path, required: bool = True):
    """Write the manifest from plan.json and the sidecars once every planned shard is finished. Missing shards:
    SodaError naming them if `required`, else None (a part that is not the last to finish)."""
    try:
        plan = json.loads((out / PLAN).read_text())
        settings = TokenizeSettings.from_dict(json.loads((out / SETTINGS).read_text()))
    except FileNotFoundError as err:
        raise SodaError(f"{out}: no {Path(err.filename).name} (not a soda-tokenize output directory, or made "
                        f"before --part existed: re-run the tokenize command without --part)") from None
    sidecars, missing = [], []
    for shard in plan["shards"]:
        sidecar = finished_sidecar(out, shard["name"], shard["fingerprint"])
        (missing.append(shard["name"]) if sidecar is None else sidecars.append(sidecar))
    if missing:
        if not required:
            return None
        raise SodaError(f"{out}: {len(missing)} of {len(plan['shards'])} planned shards are not finished "
                        f"(e.g. {missing[0]}); run the missing --part jobs first")
    from tokenize_audio.vocab import Vocabulary

    return _write_manifest(out, plan["codec"], Vocabulary.load(out), settings, plan["skipped"],
                           sorted(sidecars, key=lambda s: s["name"]))


def check_settings(out: Path, settings: TokenizeSettings, overwrite: bool) -> bool:
    """True if `out` already holds a run with these settings; error if it holds a different one."""
    path = out / SETTINGS
    if not path.is_file():
        return False
    try:
        previous = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        previous = None
    if previous == settings.to_dict():
        return True
    if overwrite:
        return False
    changed = sorted(k for k in settings.to_dict() if (previous or {}).get(k) != settings.to_dict()[k])
    raise SodaError(f"{out} holds shards made with other settings ({', '.join(changed) or 'unreadable settings.json'}); "
                    f"use another --out, or --overwrite to replace them")


def write_manifest(out: Path, codec: Codec, vocab: Vocabulary, settings: TokenizeSettings, corpus: Corpus,
                   sidecars: list[dict]) -> dict:
    return _write_manifest(out, codec.describe(), vocab, settings, list(corpus.skipped), sidecars)


def _write_manifest(out: Path, codec: dict, vocab: Vocabulary, settings: TokenizeSettings, input_skipped: list[dict],
                    sidecars: list[dict]) -> dict:
    """The manifest is a function of the sidecars and the plan only (no timings), so every engine writes it alike."""
    totals = ShardStats()
    for s in sidecars:
        totals.documents += s["documents"]
        totals.recordings += s["recordings"]
        totals.utterances += s["utterances"]
        totals.audio_seconds += s["audio_seconds"]
        for k, v in s["tokens"].items():
            totals.tokens[k] += v
    written = [s for s in sidecars if s.get("file") and s["documents"]]  # a planned shard may end up empty
    shards = {split: [s["file"] for s in written if s["split"] == split] for split in ("train", "validation")}
    by_kind = {kind: {split: [s["file"] for s in written if s["split"] == split and s["kind"] == kind]
                      for split in ("train", "validation")} for kind in ("speech", "text")}
    skipped = list(input_skipped) + [item for s in sidecars for item in s.get("skipped", [])]
    from tokenize_audio import __version__

    manifest = {
        "codec": codec,
        "codebooks": codec["codebooks"],
        "formats": list(settings.formats),
        "text_tokenizer": vocab.text_tokenizer_source,
        "vocab_size": vocab.size,
        "validation_fraction": settings.validation_fraction,
        **totals.to_dict(),
        "tokens": totals.tokens | {"total": sum(totals.tokens.values())},
        "skipped": skipped,
        "shards": shards,
        "shards_by_kind": by_kind,
        "shard_stats": [{k: s[k] for k in ("file", "split", "kind", "documents", "utterances", "audio_seconds")}
                        | {"tokens": sum(s["tokens"].values())} for s in written],
        "tool": f"soda-tokenize {__version__}",
    }
    manifest["audio_seconds"] = round(manifest["audio_seconds"], 3)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest
