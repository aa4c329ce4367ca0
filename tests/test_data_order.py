"""The global window order: packing, the mixture's token shares, ranks' and workers' slices, exact resume on any
number of them, seeking, the shard index and its cache, bad shards, remote shards, validation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import http_server

from soda.train.data import Layout, Mixture, TrainWindows, ValidationWindows
from soda.train.datamodule import SodaData, loader
from soda.train.index import index_sources
from soda.train.sources import Source, _apply_mix, repeat_warnings, resolve_sources
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import shard_documents, write_shard


@pytest.fixture(scope="module")
def sources(train_tokens):
    return resolve_sources([f"speech={train_tokens}", f"text={train_tokens}"], [], {"speech": 0.8, "text": 0.2},
                           None)


def streams(srcs, tmp_path, **kw):
    return index_sources(srcs, tmp_path / "index", quiet=True, **kw)


def synthetic_source(tmp_path, name: str, docs: int, length: int, first_id: int, shards: int = 1) -> Source:
    """`docs` documents of `length` ids each over `shards` shards, every id telling its source (first_id...)."""
    paths = []
    for s in range(shards):
        shard = tmp_path / f"train-{name}-{s:05d}.tar"
        write_shard(shard, [(f"{name}{s}_{i}", np.full(length, first_id + (i + s) % 7, np.uint32), {})
                            for i in range(docs // shards)])
        paths.append(str(shard))
    return Source(name, paths)


def windows(train, weights, seq_len, n, seed=0, layout=None, step=0, counts=None, workers=0):
    layout = layout or Layout(1, 1)
    data = TrainWindows(train, weights, seq_len, seed, layout, step, counts)
    it = iter(loader(data, layout.micro, workers))
    return [w for _ in range(n) for w in _unbatch(next(it))]


def _unbatch(batch):
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]


def token_shares(ws, n_sources: int) -> np.ndarray:
    tokens = np.zeros(n_sources)
    for w in ws:
        tokens[int(w["source"])] += len(w["input_ids"])
    return tokens / tokens.sum()


def key(w) -> tuple:
    return int(w["source"]), tuple(w["input_ids"].tolist()), tuple(w["doc_ids"].tolist())


# --- packing ---------------------------------------------------------------------------------
def test_validation_windows_are_the_documents_concatenated_with_ids_restarting(sources, tmp_path):
    srcs, vocab = sources
    _, val = streams([Source("text", [], srcs[1].train)], tmp_path)  # the train shards, read as validation
    ws = list(ValidationWindows(val, seq_len=100, micro=1))
    flat = torch.cat([w["input_ids"] for w in ws]).numpy()
    docs = np.concatenate([d for url in srcs[1].train for _, d in shard_documents(url)])
    assert np.array_equal(flat, docs[: len(flat)]) and len(docs) - len(flat) < 100
    for w in ws:
        d = w["doc_ids"].numpy()
        assert d[0] == 0 and np.all(np.diff(d) >= 0) and np.all(np.diff(d) <= 1)
        starts = np.flatnonzero(np.diff(d)) + 1
        assert np.all(w["input_ids"].numpy()[starts] == vocab.bos_id)  # every new document begins with BOS


def test_training_windows_cover_every_document_once_per_epoch(tmp_path):
    """Shuffled by blocks of windows and by shard order per epoch, but packed from the documents as they are: one
    epoch's windows hold every document's ids once."""
    src = synthetic_source(tmp_path, "s", 40, 37, 100, shards=4)
    src.weight = 1.0
    train, _ = streams([src], tmp_path)
    total = train[0].total
    ws = windows(train, [1.0], 10, total // 10)
    ids = torch.cat([w["input_ids"] for w in ws]).numpy()
    assert len(ids) == total and np.bincount(ids).tolist() == np.bincount(
        np.concatenate([d for s in src.train for _, d in shard_documents(s)])).tolist()
    assert [key(w) for w in ws] != sorted(key(w) for w in ws)  # not in stream order


# --- the mixture -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_mix_weights_are_token_shares_whatever_the_document_lengths(tmp_path, seed):
    """SODA's 95/5 is a share of tokens. Speech documents of 20,000 tokens against text documents of 1,000: drawing
    documents by weight gave text 0.24% of the tokens; the windows' token shares must be the weights (+-0.5 pp)."""
    speech = synthetic_source(tmp_path, "speech", 30, 20_000, 1000)
    text = synthetic_source(tmp_path, "text", 400, 1_000, 10)
    _apply_mix([speech, text], {"speech": 0.95, "text": 0.05})
    train, _ = streams([speech, text], tmp_path)
    ws = windows(train, [0.95, 0.05], 512, 400, seed=seed)
    for w in ws:  # the ids say where each token came from: a window holds one source's tokens
        assert ((w["input_ids"].numpy() >= 1000) == (int(w["source"]) == 0)).all()
    share = token_shares(ws, 2)
    assert share[1] == pytest.approx(0.05, abs=0.005) and share[0] == pytest.approx(0.95, abs=0.005)
    for n in (100, 200, 300):  # at every point of the run, not only at the end
        assert token_shares(ws[:n], 2)[1] == pytest.approx(0.05, abs=0.01)


def test_the_mixture_is_the_same_however_it_is_advanced():
    mix = Mixture([0.6, 0.3, 0.1, 0.0], seed=4)
    src, k, counts = mix.take(np.zeros(4, np.int64), 1000)
    assert counts.tolist() == np.bincount(src, minlength=4).tolist() and counts[3] == 0
    for s in range(3):  # each source's windows in order, none skipped
        assert k[src == s].tolist() == list(range(counts[s]))
    np.testing.assert_allclose(counts / 1000, [0.6, 0.3, 0.1, 0], atol=0.002)
    assert mix.advance(None, 1000, chunk=7).tolist() == counts.tolist()
    src2, _, _ = mix.take(mix.advance(None, 400), 600)
    assert src2.tolist() == src[400:].tolist()


def test_a_source_smaller_than_its_weight_repeats_and_is_named_at_start(tmp_path, capfd):
    big = synthetic_source(tmp_path, "speech", 40, 5_000, 1000)
    small = synthetic_source(tmp_path, "text", 3, 300, 10)  # 900 tokens; a 30% weight takes far more
    _apply_mix([big, small], {"speech": 0.7, "text": 0.3})
    train, _ = streams([big, small], tmp_path)
    ws = windows(train, [0.7, 0.3], 256, 200)
    assert token_shares(ws, 2)[1] == pytest.approx(0.3, abs=0.005)  # the share holds: its documents repeat
    data = SodaData([big, small], 256, 0, 8, 8, 1, 0, tmp_path, run_tokens=100_000)
    data.setup("fit")  # the index gives every source's exact size, whatever named it
    err = capfd.readouterr().err
    assert ("source 'text' holds 900 tokens, but its weight 30.0% takes 30,000 of this run's 100,000: its documents "
            "repeat about 33.3 times") in err and "'speech'" not in err
    assert repeat_warnings([small], 100_000) == []  # one source: repeating is the epochs asked for


# --- one order for any number of ranks and workers -------------------------------------------
@pytest.mark.parametrize("world,micro,workers", [(2, 1, 0), (3, 2, 2), (6, 1, 1)])
def test_every_split_of_a_step_reads_the_same_windows(tmp_path, world, micro, workers):
    """A step's batch of 12 windows, read by 1 rank, or by 2, 3 or 6 ranks with their loader workers taking turns:
    the same windows, rank r holding the r-th contiguous slice (so losses match whatever the split)."""
    srcs = [synthetic_source(tmp_path, "long", 20, 900, 1000, shards=3), synthetic_source(tmp_path, "mid", 60, 70, 500),
            synthetic_source(tmp_path, "short", 300, 9, 10, shards=2)]
    _apply_mix(srcs, {"long": 0.6, "mid": 0.3, "short": 0.1})
    train, _ = streams(srcs, tmp_path)
    weights = [s.weight for s in srcs]
    one = windows(train, weights, 64, 5 * 12, seed=5, layout=Layout(12, 12), workers=2)
    accumulate = 12 // (world * micro)
    split = [windows(train, weights, 64, 5 * accumulate, seed=5, workers=workers,
                     layout=Layout(12, micro, accumulate, r, world)) for r in range(world)]
    per_rank = 12 // world
    for step in range(5):
        got = [key(w) for r in range(world) for w in split[r][step * per_rank:(step + 1) * per_rank]]
        assert got == [key(w) for w in one[step * 12:(step + 1) * 12]], step


def test_a_rank_reads_only_the_windows_it_trains_on(tmp_path, monkeypatch):
    import soda.train.data as data

    src = synthetic_source(tmp_path, "s", 200, 300, 100, shards=4)
    src.weight = 1.0
    train, _ = streams([src], tmp_path)
    read = []
    real = data.read_ids
    monkeypatch.setattr(data, "read_ids", lambda path, row, a, b, vocab_size=None: read.append(b - a)
                        or real(path, row, a, b, vocab_size))
    windows(train, [1.0], 100, 10, layout=Layout(16, 2, 2, rank=1, world=4))
    assert sum(read) == 10 * 2 * 100  # its 20 windows' tokens, none of the other ranks' 60


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_resume_continues_exactly_on_any_number_of_ranks_and_workers(tmp_path, world, workers):
    """Stopped after step 7 on 2 ranks, resumed from the saved position (step, counts) on `world` ranks: the same
    windows as the uninterrupted run, none repeated or skipped."""
    srcs = [synthetic_source(tmp_path, "a", 30, 500, 1000, shards=3), synthetic_source(tmp_path, "b", 90, 40, 10)]
    _apply_mix(srcs, {"a": 0.7, "b": 0.3})
    train, _ = streams(srcs, tmp_path)
    weights = [s.weight for s in srcs]
    straight = windows(train, weights, 50, 12, seed=2, layout=Layout(6, 6))
    counts = Mixture(weights, 2).advance(None, 7 * 6)  # what SodaData.state_dict saves at step 7
    accumulate = 6 // world
    parts = [windows(train, weights, 50, 5 * accumulate, seed=2, layout=Layout(6, 1, accumulate, r, world), step=7,
                     counts=counts, workers=workers) for r in range(world)]
    for step in range(5):
        got = [key(w) for r in range(world) for w in parts[r][step * accumulate:(step + 1) * accumulate]]
        assert got == [key(w) for w in straight[(7 + step) * 6:(8 + step) * 6]], step


def test_the_saved_position_is_the_steps_and_survives_a_checkpoint_without_one(tmp_path, capfd):
    srcs = [synthetic_source(tmp_path, "a", 30, 500, 1000), synthetic_source(tmp_path, "b", 90, 40, 10)]
    _apply_mix(srcs, {"a": 0.7, "b": 0.3})

    class Trainer:
        global_step, global_rank, world_size, is_global_zero = 9, 0, 1, True

    data = SodaData(srcs, 50, 3, 4, 2, 2, 0, tmp_path)
    data.trainer = Trainer()
    state = data.state_dict()
    assert state == {"order": "global", "step": 9, "counts": Mixture([0.7, 0.3], 3).advance(None, 36).tolist(),
                     "batch": 4, "seq_len": 50, "unit": "tokens"}
    old = SodaData(srcs, 50, 3, 4, 2, 2, 0, tmp_path)  # a checkpoint from before the global order: none saved
    old.trainer = Trainer()
    assert old.counts_at(9).tolist() == state["counts"]
    assert "predates the global data order" in capfd.readouterr().err


# --- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_gives_every_rank_as_many_batches_of_one_ordered_list(sources, tmp_path, world):
    srcs, _ = sources
    _, val = streams(srcs, tmp_path)
    every = [key(w) for w in ValidationWindows(val, 64, micro=2)]
    parts = [ValidationWindows(val, 64, 2, r, world) for r in range(world)]
    assert len({p.batches_per_rank() for p in parts}) == 1 and parts[0].batches_per_rank() > 0
    got = [[key(w) for w in p] for p in parts]
    dealt = [got[r][b * 2:(b + 1) * 2] for b in range(parts[0].batches_per_rank()) for r in range(world)]
    assert [w for batch in dealt for w in batch] == every[:len(dealt) * 2]


# --- the shard index -------------------------------------------------------------------------
def test_the_index_is_cached_and_a_changed_shard_is_indexed_again(tmp_path, monkeypatch):
    import soda.train.index as index

    src = synthetic_source(tmp_path, "s", 12, 30, 100, shards=2)
    first, _ = streams([src], tmp_path)
    calls = []
    real = index.index_shard
    monkeypatch.setattr(index, "index_shard", lambda p: calls.append(p) or real(p))
    again, _ = streams([src], tmp_path)
    assert calls == [] and again[0].total == first[0].total == 12 * 30
    write_shard(src.train[1], [("x", np.arange(5, dtype=np.uint32), {})])  # rewritten: another size and time
    changed, _ = streams([src], tmp_path)
    assert calls == [src.train[1]] and changed[0].tokens.tolist() == [180, 5]


def test_corrupt_shard_is_named_or_skipped(sources, tmp_path, capfd):
    srcs, _ = sources
    bad = tmp_path / "train-text-00000.tar"
    bad.write_bytes(open(srcs[1].train[0], "rb").read()[:5000] + b"\x00nonsense" * 300)
    source = Source("text", [str(bad), srcs[1].train[0]], weight=1.0)
    with pytest.raises(SodaError, match="train-text-00000.tar.*--skip-bad-shards"):
        streams([source], tmp_path)
    train, _ = index_sources([source], tmp_path / "index", skip_bad=True)
    assert train[0].shards == [srcs[1].train[0]] and len(train[0].skipped) == 1
    assert "skipping shard" in capfd.readouterr().err
    assert len(windows(train, [1.0], 64, 5)) == 5


def test_ids_outside_the_vocabulary_are_named(tmp_path):
    src = synthetic_source(tmp_path, "s", 4, 30, 90_000)
    train, _ = streams([src], tmp_path)
    data = TrainWindows(train, [1.0], 16, 0, Layout(1, 1), vocab_size=1000)
    with pytest.raises(SodaError, match="train-s-00000.tar.*outside the vocabulary"):
        next(iter(data))


def test_remote_urls_and_pipes_give_the_same_windows(sources, train_tokens, tmp_path):
    """--data with http:// brace patterns (a local HTTP server) and pipe: commands, as a cluster's object store
    would be read: fetched once into the run's index, then the same windows as the local directory."""
    with http_server(train_tokens) as url:
        remote, vocab = resolve_sources(
            [f"speech={url}/train-speech-{{00000..00000}}.tar", f"text=pipe:cat {train_tokens}/train-text-00000.tar"],
            [f"speech={url}/validation-speech-00000.tar"], {"speech": 0.8, "text": 0.2}, str(train_tokens))
        assert remote[0].train == [f"{url}/train-speech-00000.tar"]
        local, _ = sources
        mine, theirs = streams(remote, tmp_path / "remote"), streams(local, tmp_path / "local")
        assert [key(w) for w in windows(mine[0], [0.8, 0.2], 64, 12)] == [
            key(w) for w in windows(theirs[0], [0.8, 0.2], 64, 12)]
        assert [key(w) for w in ValidationWindows(mine[1][:1], 64, 1)] == [
            key(w) for w in ValidationWindows(theirs[1][:1], 64, 1)]
