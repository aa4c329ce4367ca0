"""The NLL vector on held-out shards: text, special markers, the semantic codebook, each acoustic codebook.

One number hides trade-offs (a model can gain on acoustics while losing text), so every group is
reported on its own, plus bits per second of audio and bits per text token. Each document is
scored on its own (as SODA scored LibriSpeech dev-clean), in windows of `--max-len` tokens when
longer; the first token of a window has no context and is not scored. Unlike training's packed
validation stream, no document is cut mid-way or dropped at the end. For the hierarchical family the windows are
cut between steps (never inside a frame), a window's first step is context only, and tokens that family cannot
score (ids outside whole frames) are left out of every mean and counted in `unscored_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soda.evaluate.hierarchical import step_windows
from soda.evaluate.tasks import Skips, Task, entry, register
from tokenize_audio.errors import SodaError


@dataclass
class HeldOut:
    shards: list[str]
    source: str
    audio_tokens_per_second: float | None


def _run_directory(source: str) -> Path | None:
    """The soda-train run a CHECKPOINT belongs to (its config.yaml names the training data)."""
    path = Path(source).expanduser()
    for candidate in (path, path.parent, path.resolve().parent.parent if path.is_file() else None):
        if candidate is not None and (candidate / "config.yaml").is_file():
            return candidate
    return None


def load_held_out(ctx, spec: str | None) -> HeldOut:
    from soda.train.sources import ShardVocabularies, resolve_sources
    from tokenize_audio.shards import expand_shards

    if spec is None:
        run = _run_directory(ctx.loaded.source)
        if run is None:
            raise SodaError("nll: give --data-for nll=DIR (a soda-tokenize output directory; its validation shards "
                            "are scored) or a shard glob")
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        data, val_data, vocab_dir, where = cfg.get("data") or [], cfg.get("val_data") or [], cfg.get("vocab"), str(run)
    elif Path(spec).expanduser().is_dir():
        data, val_data, vocab_dir, where = [str(Path(spec).expanduser())], [], None, spec
    else:  # shard files, a glob or brace pattern: every document in them is held out
        shards = expand_shards(spec)
        check = ShardVocabularies(ctx.vocab, "the model's", ctx.loaded.source)
        check(shards, f"nll: {spec}")
        check.warn()
        return HeldOut(shards, spec, None)
    sources, vocab = resolve_sources(data, val_data, {}, vocab_dir)
    if not vocab.matches(ctx.vocab):
        raise SodaError(f"nll: the shards in {where} were tokenized with another vocabulary than the model's (other "
                        f"text tokenizer or codec)")
    shards = list(dict.fromkeys(s for source in sources for s in source.validation))
    if not shards:
        raise SodaError(f"nll: {where} has no validation shards; pass --data-for nll=SHARD_GLOB")
    tps = next((s.audio_tokens_per_second for s in sources if s.audio_tokens_per_second), None)
    return HeldOut(shards, where, tps)


def run_nll(ctx, data: HeldOut) -> dict:
    from tokenize_audio.shards import BadShard, shard_documents

    vocab, settings = ctx.vocab, ctx.settings
    skips = Skips()
    documents: list[np.ndarray] = []
    for shard in data.shards:
        try:
            for _, tokens in shard_documents(shard, vocab_size=vocab.size):
                if settings.limit is None or len(documents) < settings.limit:
                    documents.append(tokens)
        except BadShard as err:
            skips.add(shard, str(err))
    window = settings.max_len
    if ctx.family == "hierarchical":  # windows cut between steps: a frame is never split across two
        pieces = [p for doc in documents for p in step_windows(doc, window, vocab)]
    else:
        pieces = [doc[start:start + window] for doc in documents for start in range(0, len(doc), window)]
    pieces = [p for p in pieces if len(p) > 1]
    lps = ctx.log_probs(pieces, [np.ones(len(p), dtype=bool) for p in pieces], "nll: scoring")
    names = vocab.nll_groups()
    nll, count = np.zeros(len(names)), np.zeros(len(names), dtype=np.int64)
    unscored = 0  # tokens the model gives no probability (the hierarchical family: ids outside whole frames)
    for piece, lp in zip(pieces, lps):
        scored = ~np.isnan(lp)
        unscored += int((~scored).sum())
        groups = vocab.nll_group_of(piece[1:].astype(np.int64))[scored]
        np.add.at(nll, groups, -lp[scored])
        np.add.at(count, groups, 1)
    total = int(count.sum())
    by_group = {n: float(nll[i] / count[i]) for i, n in enumerate(names) if count[i]}
    audio_nll, audio_count = nll[2:].sum(), int(count[2:].sum())
    tps = data.audio_tokens_per_second
    if tps is None and audio_count:
        tps = ctx.codec.tokens_per_second
    extra = {
        "nll_by_group": by_group,
        "tokens_by_group": {n: int(count[i]) for i, n in enumerate(names) if count[i]},
        "nll_audio": float(audio_nll / audio_count) if audio_count else None,
        "bits_per_audio_second": float(audio_nll / audio_count / math.log(2) * tps) if audio_count and tps else None,
        "bits_per_text_token": float(nll[0] / count[0] / math.log(2)) if count[0] else None,
        "documents": len(documents),
        "unscored_tokens": unscored,  # left out of every mean above (never counted as 0)
    }
    how = {"data": data.source, "shards": len(data.shards), "window": window, "unit": "nats per token",
           "audio_tokens_per_second": tps}
    if ctx.family == "hierarchical":
        how["frame_likelihood"] = "the sum over its codebooks (unified head: codebook 0, depth heads: 1..K-1)"
        how["windows"] = "cut between steps (never inside a frame); a window's first step is context only"
    return entry("nll (nats/token, all tokens)", float(nll.sum() / total) if total else None, total, skips, how,
                 **extra)


register(Task("nll", "NLL", load_held_out, run_nll, data_help="a soda-tokenize directory (its validation shards) or "
              "a shard glob; default: the run's own held-out data", soda_key=None, percent=False))
