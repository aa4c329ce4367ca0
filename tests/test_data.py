"""The training stream (packing, mixture, rank split, exact resume), masking, schedule and config arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soda.train.config import TrainConfig, make_config, parse_count, soda_peak_lr
from soda.train.data import PackedStream, dataloader
from soda.train.optim import wsd_factor
from soda.train.sources import repeat_warnings, resolve_sources
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import shard_documents


@pytest.fixture(scope="module")
def sources(train_tokens):
    return resolve_sources([f"speech={train_tokens}", f"text={train_tokens}"], [], {"speech": 0.8, "text": 0.2},
                           None)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def all_documents(urls):
    return [tuple(doc) for url in urls for _, doc in shard_documents(url)]


def test_windows_are_the_documents_concatenated_with_ids_restarting(sources, train_tokens):
    srcs, vocab = sources
    stream = PackedStream([srcs[1]], seq_len=100, seed=0, infinite=False, split="train")
    windows = list(stream)
    flat = torch.cat([w["input_ids"] for w in windows]).numpy()
    docs = np.concatenate([np.asarray(d) for d in all_documents(srcs[1].train)])
    assert np.array_equal(flat, docs[: len(flat)]) and len(docs) - len(flat) < 100
    for w in windows:
        d = w["doc_ids"].numpy()
        assert d[0] == 0 and np.all(np.diff(d) >= 0) and np.all(np.diff(d) <= 1)
        starts = np.flatnonzero(np.diff(d)) + 1
        assert np.all(w["input_ids"].numpy()[starts] == vocab.bos_id)  # every new document begins with BOS


def test_mixture_follows_the_weights(sources):
    srcs, vocab = sources
    windows = take(PackedStream(srcs, seq_len=64, seed=1), 400)
    ids = torch.cat([w["input_ids"] for w in windows]).numpy()
    audio = (ids >= vocab.audio_base).mean()
    assert audio > 0.5  # 80% of draws are speech documents (mostly audio tokens); text has none


def synthetic_source(tmp_path, name: str, docs: int, length: int, first_id: int):
    """A source of `docs` documents of `length` ids each, every id telling its source (first_id...)."""
    from soda.train.sources import Source
    from tokenize_audio.shards import write_shard

    shard = tmp_path / f"train-{name}-00000.tar"
    write_shard(shard, [(f"{name}{i}", np.full(length, first_id + i % 7, np.uint32), {}) for i in range(docs)])
    return Source(name, [str(shard)])


def token_shares(windows, n_sources: int) -> np.ndarray:
    tokens = np.zeros(n_sources)
    for w in windows:
        tokens[int(w["source"])] += len(w["input_ids"])
    return tokens / tokens.sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_mix_weights_are_token_shares_whatever_the_document_lengths(tmp_path, seed):
    """SODA's 95/5 is a share of tokens. Speech documents of 20,000 tokens against text documents of 1,000: drawing
    documents by weight gave text 0.24% of the tokens; the windows' token shares must be the weights (+-0.5 pp)."""
    from soda.train.sources import _apply_mix

    speech = synthetic_source(tmp_path, "speech", 30, 20_000, 1000)
    text = synthetic_source(tmp_path, "text", 400, 1_000, 10)
    _apply_mix([speech, text], {"speech": 0.95, "text": 0.05})
    windows = take(PackedStream([speech, text], seq_len=512, seed=seed), 400)
    for w in windows:  # the ids say where each token came from: a window holds one source's tokens
        ids = w["input_ids"].numpy()
        assert ((ids >= 1000) == (int(w["source"]) == 0)).all()
    share = token_shares(windows, 2)
    assert share[1] == pytest.approx(0.05, abs=0.005) and share[0] == pytest.approx(0.95, abs=0.005)
    for n in (100, 200, 300):  # at every point of the run, not only at the end
        assert token_shares(windows[:n], 2)[1] == pytest.approx(0.05, abs=0.01)


def test_token_shares_hold_for_three_sources_over_workers_and_across_resume(tmp_path):
    from soda.train.sources import _apply_mix

    srcs = [synthetic_source(tmp_path, "long", 20, 9_000, 1000), synthetic_source(tmp_path, "mid", 60, 700, 500),
            synthetic_source(tmp_path, "short", 400, 90, 10)]
    _apply_mix(srcs, {"long": 0.6, "mid": 0.3, "short": 0.1})

    def batches(n, state=None):
        loader = dataloader(PackedStream(srcs, seq_len=256, seed=5), batch_size=4, workers=2)
        if state:
            loader.load_state_dict(state)
        it = iter(loader)
        got = [next(it) for _ in range(n)]
        return got, loader.state_dict()

    straight, _ = batches(100)
    tokens = np.bincount(torch.cat([b["source"] for b in straight]).numpy(), minlength=3)
    np.testing.assert_allclose(tokens / tokens.sum(), [0.6, 0.3, 0.1], atol=0.005)
    first, state = batches(37)
    rest, _ = batches(63, state)
    for a, b in zip(straight, first + rest):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["source"], b["source"])


def test_a_source_smaller_than_its_weight_repeats_with_a_warning_naming_it(tmp_path, capfd):
    from soda.train.sources import _apply_mix

    big = synthetic_source(tmp_path, "speech", 40, 5_000, 1000)
    small = synthetic_source(tmp_path, "text", 3, 300, 10)  # 900 tokens; a 30% weight takes far more
    _apply_mix([big, small], {"speech": 0.7, "text": 0.3})
    windows = take(PackedStream([big, small], seq_len=256, seed=0), 200)
    assert token_shares(windows, 2)[1] == pytest.approx(0.3, abs=0.005)  # the share holds: its documents repeat
    err = capfd.readouterr().err
    assert "source 'text' starts epoch 2: its documents repeat" in err and "'speech'" not in err
    big.train_tokens, small.train_tokens = 200_000, 900  # as a soda-tokenize manifest gives them
    assert repeat_warnings([big, small], 100_000) == [  # said at start, before any repeat
        "source 'text' holds 900 tokens, but its weight 30.0% takes 30,000 of this run's 100,000: its documents "
        "repeat about 33.3 times"]
    assert repeat_warnings([small], 100_000) == []  # one source: repeating is the epochs asked for


def test_a_position_saved_before_per_source_packing_still_resumes(sources):
    """Checkpoints of earlier versions held one pending (source, position, offset) and a draw count."""
    srcs, _ = sources
    stream = PackedStream(srcs, seq_len=48, seed=3)
    take(stream, 5)
    state = stream.state_dict()
    src = next(i for i, p in enumerate(state["pending"]) if p)
    old = {"cursors": state["cursors"], "draws": 9, "pending": (src, *state["pending"][src]), "windows": 5,
           "skipped": []}
    resumed = PackedStream(srcs, seq_len=48, seed=3)
    resumed.load_state_dict(old)
    assert len(take(resumed, 20)) == 20


def test_ranks_partition_the_documents(sources):
    speech = sources[0][0]
    assert len(speech.train) == 1  # fewer shards than ranks: documents are dealt out round-robin
    docs = [d for _, d in shard_documents(speech.train[0])]
    for rank in range(3):
        stream = PackedStream([speech], seq_len=16, rank=rank, world_size=3, infinite=False)
        flat = torch.cat([w["input_ids"] for w in stream]).numpy()
        mine = np.concatenate([d for i, d in enumerate(docs) if i % 3 == rank])
        assert np.array_equal(flat, mine[: len(flat)]) and len(mine) - len(flat) < 16


def test_rank_streams_are_disjoint(sources):
    srcs, _ = sources
    speech = srcs[0]
    firsts = []
    for rank in range(2):
        w = take(PackedStream([speech], seq_len=32, rank=rank, world_size=2), 1)[0]
        firsts.append(tuple(w["input_ids"].tolist()))
    assert firsts[0] != firsts[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_resumes_exactly(sources, workers):
    srcs, _ = sources

    def batches(n, state=None):
        loader = dataloader(PackedStream(srcs, seq_len=48, seed=3), batch_size=4, workers=workers)
        if state:
            loader.load_state_dict(state)
        it = iter(loader)
        got = [next(it)["input_ids"] for _ in range(n)]
        return got, loader.state_dict()

    straight, _ = batches(30)
    first, state = batches(11)
    rest, _ = batches(19, state)
    assert all(torch.equal(a, b) for a, b in zip(straight, first + rest))


def test_epochs_cycle_with_a_new_shard_order(sources):
    srcs, _ = sources
    text = srcs[1]
    total = sum(len(d) for d in all_documents(text.train))
    windows = take(PackedStream([text], seq_len=50, seed=0), total // 50 + 20)
    assert len(windows) > total // 50  # ran past one epoch without stopping


def test_corrupt_shard_is_named_or_skipped(sources, tmp_path):
    srcs, _ = sources
    bad = tmp_path / "train-text-00000.tar"
    bad.write_bytes(open(srcs[1].train[0], "rb").read()[:5000] + b"\x00nonsense" * 300)
    source = type(srcs[1])("text", [str(bad), srcs[1].train[0]], weight=1.0)
    with pytest.raises(SodaError, match="train-text-00000.tar"):
        take(PackedStream([source], seq_len=64, infinite=False), 1000)
    stream = PackedStream([source], seq_len=64, infinite=False, skip_bad=True)
    assert len(list(stream)) > 0 and len(stream.skipped) == 1


def test_remote_urls_and_pipes_stream_the_same_windows(sources, train_tokens):
    """--data with http:// brace patterns (a local HTTP server) and pipe: commands, as a cluster's object store
    would be read: the same windows as the local directory, validation shards included."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(train_tokens))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote, vocab = resolve_sources(
            [f"speech={url}/train-speech-{{00000..00000}}.tar", f"text=pipe:cat {train_tokens}/train-text-00000.tar"],
            [f"speech={url}/validation-speech-00000.tar"], {"speech": 0.8, "text": 0.2}, str(train_tokens))
        assert remote[0].train == [f"{url}/train-speech-00000.tar"]
        local, _ = sources
        for split, mine, theirs in (("train", remote, local), ("validation", remote[:1], local[:1])):
            got = take(PackedStream(mine, 64, seed=3, split=split, infinite=False), 6)
            want = take(PackedStream(theirs, 64, seed=3, split=split, infinite=False), 6)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["doc_ids"], b["doc_ids"])
    finally:
        server.shutdown()


def test_sources_need_a_vocabulary_and_matching_ones(train_tokens, tmp_path):
    with pytest.raises(SodaError, match="--vocab"):
        resolve_sources([str(train_tokens / "train-*.tar")], [], {}, None)
    srcs, vocab = resolve_sources([str(train_tokens / "train-*.tar")], [], {}, str(train_tokens))
    assert len(srcs[0].train) == 2 and vocab.size == 16646
    with pytest.raises(SodaError, match="not found"):
        resolve_sources([str(tmp_path / "nothing-{000..003}.tar")], [], {}, str(train_tokens))


# --- masking ---------------------------------------------------------------------------------
def test_packed_documents_give_their_standalone_logits(sources):
    from soda.model import attention_inputs, build_model
    from soda.train.loss import token_nll

    _, vocab = sources
    for attention in ("sdpa", "eager"):
        model = build_model(TrainConfig(size="tiny").shape(vocab.size), vocab, 0, attention=attention).eval()
        g = torch.Generator().manual_seed(0)
        a, b = torch.randint(0, vocab.size, (1, 9), generator=g), torch.randint(0, vocab.size, (1, 6), generator=g)
        doc = torch.tensor([[0] * 9 + [1] * 6])
        with torch.no_grad():
            packed = model(torch.cat([a, b], 1), **attention_inputs(model, doc)).logits
            assert torch.allclose(packed[:, :9], model(a).logits, atol=1e-5)
            assert torch.allclose(packed[:, 9:], model(b).logits, atol=1e-5)
            unmasked = model(torch.cat([a, b], 1)).logits
            assert not torch.allclose(unmasked[:, 9:], model(b).logits, atol=1e-3)
            nll, _, _, valid = token_nll(model, {"input_ids": torch.cat([a, b], 1), "doc_ids": doc})
        assert valid.tolist() == [[True] * 8 + [False] + [True] * 5]  # b's first token is not scored


def test_flex_attention_block_mask_gives_the_dense_document_mask_results(sources):
    """`--attention flex_attention` (the CUDA default): the same NLL as sdpa's dense mask, which the test above ties
    to standalone documents. Forward only: torch has no flex attention backward on the CPU (soda-train refuses it
    there); on the CPU flex attention compiles a C++ kernel first (tens of seconds)."""
    from soda.model import attention_inputs, build_model, default_attention
    from soda.train.loss import lm_loss

    _, vocab = sources
    assert default_attention("cpu") == "sdpa" and default_attention("cuda") == "flex_attention"
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, vocab.size, (2, 40), generator=g),
             "doc_ids": torch.tensor([[0] * 13 + [1] * 27, [0] * 30 + [1] * 4 + [2] * 6])}
    results = {}
    for attention in ("sdpa", "flex_attention"):
        model = build_model(TrainConfig(size="tiny").shape(vocab.size), vocab, 0, attention=attention).eval()
        assert type(attention_inputs(model, batch["doc_ids"])["attention_mask"]).__name__ == (
            "BlockMask" if attention == "flex_attention" else "Tensor")
        with torch.no_grad():
            loss, nll, _, _ = lm_loss(model, batch, 1e-4)
        results[attention] = loss.item(), nll
    assert results["flex_attention"][0] == pytest.approx(results["sdpa"][0], rel=1e-6)
    torch.testing.assert_close(results["flex_attention"][1], results["sdpa"][1], rtol=1e-5, atol=1e-5)


# --- schedule and config ---------------------------------------------------------------------
def test_wsd_schedule():
    f = [wsd_factor(s, 100, 0.1, 0.2) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[79] == 1.0
    assert f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert f[100] == 0.0 and max(f) == 1.0


def test_counts_steps_and_lr_rule():
    assert parse_count("500B") == 500_000_000_000 and parse_count("2.1M") == 2_100_000 and parse_count(4096) == 4096
    cfg = make_config({"size": "1b", "tokens": "500B"})
    assert cfg.batch_sequences == 512 and cfg.steps == round(500e9 / (512 * 4096))
    assert cfg.peak_lr(1536) == pytest.approx(0.003 * 2**0.5 * (1024 / 1536) ** 0.5)
    assert soda_peak_lr(512, 512) == pytest.approx(0.003 * 2**0.5)  # width floored at 1024
    for bad in ("0", "-3B", "many", "1e400"):
        with pytest.raises(SodaError):
            parse_count(bad)


def test_batch_layout():
    from soda.train.plan import batch_layout

    cfg = make_config({"size": "tiny", "batch_tokens": 512 * 4096, "micro_batch": 8})
    assert batch_layout(cfg, 8) == (8, 8)
    assert batch_layout(make_config({"size": "tiny", "batch_tokens": 512 * 4096}), 8) == (64, 1)
    with pytest.raises(SodaError, match="micro-batch"):
        batch_layout(make_config({"size": "tiny", "micro_batch": 7}), 8)
    with pytest.raises(SodaError, match="devices"):
        batch_layout(cfg, 3)


def test_every_shipped_config_loads():
    from pathlib import Path

    from soda.train.config import load_yaml

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        make_config(load_yaml(path))


@pytest.mark.parametrize("size,total,non_embedding", [("135m", 0.205, 0.057), ("600m", 0.737, 0.440),
                                                       ("1.7b", 2.00, 1.41), ("4b", 4.37, 3.63)])
def test_dry_run_reports_soda_sizes(capsys, size, total, non_embedding):
    from soda.train.cli import main

    assert main(["--size", size, "--tokens", "500B", "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("parameters:"))
    got_total, got_non = (int(x.split()[0].replace(",", "")) for x in line.removeprefix("parameters: ").split(", "))
    assert got_total / 1e9 == pytest.approx(total, abs=0.005) and got_non / 1e9 == pytest.approx(non_embedding,
                                                                                                  abs=0.005)
    assert "238,419 steps of 512 x 4096" in out  # 500B / (512 x 4096)
    assert "H100" in out and "days" in out
    assert f"AdamW moments (fp32, 16 B per parameter): {got_total * 16 / 2**30:,.1f} GiB;" in out


def test_dry_run_gives_model_state_memory_per_device_for_ddp_and_fsdp(capsys):
    from soda.train.cli import main

    assert main(["--size", "4b", "--dry-run", "--devices", "8"]) == 0
    # 4,374,089,216 parameters x 16 bytes: 65.2 GiB on every DDP rank, an eighth of it on each FSDP rank
    assert ": 65.2 GiB with DDP, 8.1 GiB with --strategy fsdp over 8 devices;" in capsys.readouterr().out


def test_dry_run_gives_the_raw_audio_and_codec_gpu_hours(capsys):
    from soda.train.cli import main

    assert main(["--size", "1b", "--tokens", "500B", "--dry-run", "--codec-rate", "2000"]) == 0
    # 500B tokens at 100 audio tokens per second: 1.39M hours of speech (the corpus-scale issue's own figure)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("raw audio"))
    assert "at most 1,388,891 hours" in line and "694.4 GPU-hours at 2000 audio-s per GPU-s" in line


def test_dry_run_matches_the_real_model(capsys):
    from soda.model import build_model, count_parameters
    from tokenize_audio.vocab import Vocabulary, byte_tokenizer

    vocab = Vocabulary.build(byte_tokenizer(), 8, 2048)
    counted = count_parameters(build_model(TrainConfig(size="135m").shape(vocab.size), vocab, 0))
    from soda.shape import params

    shape = TrainConfig(size="135m").shape(vocab.size)
    assert counted == {"total": params(shape, "total"), "non_embedding": params(shape, "non-embedding")}
