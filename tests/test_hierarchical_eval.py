"""soda-eval on the hierarchical family: per-flat-token log-probs that add up to the model's own training NLL, the
likelihood tasks and the generation tasks on a hierarchical LoadedModel, results that name the family, and ids
outside whole frames reported, never scored as 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_wave

from soda.checkpoints import LoadedModel
from soda.evaluate.cli import evaluate
from soda.evaluate.hierarchical import hierarchical_log_probs, step_windows
from soda.evaluate.scoring import audio_mask
from soda.evaluate.tasks import Context, EvalSettings
from soda.hierarchical import HierarchicalConfig, HierarchicalModel, regroup
from soda.shape import SIZES, ModelShape
from tokenize_audio.shards import write_shard
from tokenize_audio.vocab import Vocabulary, byte_tokenizer

K, C = 8, 16  # small codebooks for the arithmetic; the end-to-end tests use Mimi's 2048 (the codec checks it)


def tiny_model(vocab, seed: int = 0) -> HierarchicalModel:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    return HierarchicalModel(HierarchicalConfig.from_vocab(ModelShape(*SIZES["tiny"], seq_len=64), vocab)).eval()


@pytest.fixture(scope="module")
def small():
    vocab = Vocabulary.build(byte_tokenizer(), K, C)
    return vocab, tiny_model(vocab)


@pytest.fixture(scope="module")
def loaded():
    """A hierarchical model as soda-eval receives it (built by hand: the family's checkpoint loading is elsewhere)."""
    vocab = Vocabulary.build(byte_tokenizer(), K, 2048)
    return LoadedModel(tiny_model(vocab, seed=1), vocab, "mimi:random", "mimi:random (RANDOM)", "test",
                       torch.device("cpu"))


def document(vocab, rng, frames: int, text: int, size: int = C) -> np.ndarray:
    codes = rng.integers(0, size, (vocab.n_codebooks, frames))
    return np.concatenate([[vocab.bos_id, vocab.audio_start], vocab.codes_to_ids(codes),
                           [vocab.audio_end, vocab.text_start], rng.integers(0, 200, text),
                           [vocab.text_end, vocab.eos_id]]).astype(np.int64)


def training_sums(model, vocab, ids) -> torch.Tensor:
    steps = regroup(ids, vocab)
    batch = {"codes": torch.from_numpy(steps.codes)[None], "doc_ids": torch.zeros(1, len(steps), dtype=torch.long)}
    with torch.no_grad():
        return model(batch)[1]


# --------------------------------------------------------------------------------------------
# Per-flat-token log-probs
# --------------------------------------------------------------------------------------------
def test_per_token_log_probs_sum_to_the_training_nll_per_kind_and_batching_changes_no_row(small):
    vocab, model = small
    rng = np.random.default_rng(0)
    docs = [document(vocab, rng, f, t) for f, t in ((5, 7), (1, 30), (12, 2), (0, 9), (3, 0))]
    cut = document(vocab, rng, 4, 5)
    docs.append(np.concatenate([vocab.codes_to_ids(rng.integers(0, C, (K, 1)))[5:], cut,
                                vocab.codes_to_ids(rng.integers(0, C, (K, 1)))[:3]]))  # partial frames at both ends
    everything = [np.ones(len(d), dtype=bool) for d in docs]
    one_batch = hierarchical_log_probs(model, vocab, docs, everything, batch_tokens=10**6)
    small_batches = hierarchical_log_probs(model, vocab, docs, everything, batch_tokens=70)
    for ids, lp, other in zip(docs, one_batch, small_batches):
        assert lp.shape == (len(ids) - 1,)  # the flat layout: one entry per position t >= 1
        np.testing.assert_allclose(other, lp, atol=1e-5, equal_nan=True)
        alone = hierarchical_log_probs(model, vocab, [ids], [np.ones(len(ids), dtype=bool)])[0]
        np.testing.assert_allclose(alone, lp, atol=1e-5, equal_nan=True)
        sums = training_sums(model, vocab, ids)
        scored = ~np.isnan(lp)
        assert -lp[scored].sum() == pytest.approx(float(sums[0].sum()), abs=1e-4)
        groups = vocab.nll_group_of(ids[1:])[scored]  # per kind too: the flat vocabulary's groups are the model's
        for g in range(len(vocab.nll_groups())):
            assert -lp[scored][groups == g].sum() == pytest.approx(float(sums[0, g]), abs=1e-4)
            assert (groups == g).sum() == int(sums[1, g])
    # the partial frames: exactly their ids (and the first step's) have no score
    last, steps = one_batch[-1], regroup(docs[-1], vocab)
    assert steps.dropped == 3 + 3 and steps.starts[0] == 3
    # positions 1, 2 (a frame's tail), 3 (BOS: the first step, nothing before it) and the last 3 (a frame's head);
    # position 0 is never in the vector
    assert np.isnan(last).sum() == 2 + 1 + 3
    assert np.isnan(last[:3]).all() and np.isnan(last[-3:]).all() and not np.isnan(last[3:-3]).any()
    # a frame as the first step: its codebooks 1..K-1 have nothing before them
    first_frame = vocab.codes_to_ids(rng.integers(0, C, (K, 3)))
    lp = hierarchical_log_probs(model, vocab, [first_frame], [np.ones(len(first_frame), dtype=bool)])[0]
    assert np.isnan(lp[:K - 1]).all() and not np.isnan(lp[K - 1:]).any()
    assert -lp[K - 1:].sum() == pytest.approx(float(training_sums(model, vocab, first_frame)[0].sum()), abs=1e-4)


def test_masks_pick_positions_of_the_flat_layout(small):
    vocab, model = small
    ids = document(vocab, np.random.default_rng(1), 6, 4)
    full = hierarchical_log_probs(model, vocab, [ids], [np.ones(len(ids), dtype=bool)])[0]
    for codebooks in ((0,), (0, 1, 2), None):
        mask = audio_mask(ids, vocab, codebooks)
        picked = hierarchical_log_probs(model, vocab, [ids], [mask])[0]
        np.testing.assert_allclose(picked, full[mask[1:]], atol=1e-6)
    frames = full[audio_mask(ids, vocab)[1:]].reshape(-1, K)
    assert frames.shape == (6, K)  # a frame's likelihood: the sum of its K codebooks' log-probs
    ctx = Context(LoadedModel(model, vocab, None, "none", "test", torch.device("cpu")), EvalSettings(progress=False))
    assert ctx.family == "hierarchical"
    np.testing.assert_allclose(ctx.log_probs([ids], [np.ones(len(ids), dtype=bool)], "x")[0], full, atol=1e-6)


def test_nll_windows_never_split_a_frame(small):
    vocab, _ = small
    ids = document(vocab, np.random.default_rng(2), 7, 10)
    for window in (8, 13, 20, 1000):
        pieces = step_windows(ids, window, vocab)
        assert np.array_equal(np.concatenate(pieces), ids) and max(len(p) for p in pieces) <= window
        assert sum(regroup(p, vocab).dropped for p in pieces) == 0
    assert len(step_windows(ids, 3, vocab)[2]) == 3  # a window shorter than a frame cuts it all the same


# --------------------------------------------------------------------------------------------
# The tasks on a hierarchical LoadedModel
# --------------------------------------------------------------------------------------------
def test_nll_and_pairs_results_name_the_family_and_report_unscored_tokens(loaded, tmp_path):
    vocab = loaded.vocab
    rng = np.random.default_rng(3)
    docs = [document(vocab, rng, 20, 8, 2048), document(vocab, rng, 2, 20, 2048)]
    partial = vocab.codes_to_ids(rng.integers(0, 2048, (K, 1)))[:5]  # a document ending mid-frame
    docs.append(np.concatenate([document(vocab, rng, 3, 4, 2048)[:-1], partial]))
    write_shard(tmp_path / "held" / "val-000000.tar", [(f"d{i}", d, {}) for i, d in enumerate(docs)])
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"good": g, "bad": b}) + "\n" for g, b in
                            (("a wise son", "son wise a"), ("the dog ran", "ran dog the"), ("hello", "olleh"))))
    folder = tmp_path / "swuggy"
    for i in range(2):
        wave = (np.sin(np.arange(12000) * 0.05 * (i + 1)) * 0.3).astype(np.float32)  # 0.5 s: 6 frames
        write_wave(folder / "good" / f"{i}.wav", wave, 24000)
        write_wave(folder / "bad" / f"{i}.wav", (rng.standard_normal(12000) * 0.3).astype(np.float32), 24000)
    out = tmp_path / "eval"
    settings = EvalSettings(device="cpu", progress=False, max_len=100)
    results = evaluate(loaded, ["nll", "twuggy", "swuggy"], {"nll": str(tmp_path / "held" / "*.tar"),
                                                            "twuggy": str(text), "swuggy": str(folder)},
                       settings, out, log=lambda m: None, checkpoint={"path": "test", "digest": "h"})
    written = json.loads((out / "results.json").read_text())
    model = written["model"]
    assert model["family"] == "hierarchical" and model["soda_size"] is None
    assert model["parameters"] == model["backbone_parameters"] + model["depth_parameters"]
    assert model["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert model["shape"]["hidden_size"] == 64 and model["shape"]["depth_layers"] == 4
    assert all(r["settings"]["family"] == "hierarchical" for r in written["tasks"].values())
    assert "Hierarchical model" in (out / "results.md").read_text()
    assert "hierarchical family" in (out / "report.html").read_text()
    nll = results["nll"]
    # windows of 100 flat ids cut between steps; unscored: the partial frame, and a window's first step when it is
    # a frame (context only, as the flat family's first token of a window)
    pieces = [p for d in docs for p in step_windows(d, 100, vocab)]
    assert len(pieces) == 4 and [len(p) for p in pieces[:2]] == [98, 76]  # 2 + 12 frames, the rest
    lps = hierarchical_log_probs(loaded.model, vocab, pieces, [np.ones(len(p), dtype=bool) for p in pieces])
    assert np.isnan(lps[-1][-5:]).all()
    assert nll["unscored_tokens"] == 5 + (K - 1) == sum(int(np.isnan(lp).sum()) for lp in lps)
    assert nll["documents"] == 3
    assert sum(nll["tokens_by_group"].values()) == nll["count"]
    assert set(nll["nll_by_group"]) <= set(vocab.nll_groups()) and "acoustic_cb7" in nll["nll_by_group"]
    weighted = sum(nll["nll_by_group"][g] * nll["tokens_by_group"][g] for g in nll["tokens_by_group"]) / nll["count"]
    assert nll["value"] == pytest.approx(weighted)
    assert nll["count"] == sum(int((~np.isnan(lp)).sum()) for lp in lps)
    assert nll["value"] == pytest.approx(-sum(np.nansum(lp) for lp in lps) / nll["count"])
    assert results["twuggy"]["count"] == 3 and results["twuggy"]["value"] is not None
    assert results["swuggy"]["count"] == 2 and results["swuggy"]["settings"]["codebooks"] == list(range(K))


def test_a_pair_with_unscored_tokens_is_skipped_not_counted(loaded, monkeypatch):
    from soda.evaluate.pairs import Pair, Pairs, run_pairs
    from soda.evaluate.tasks import Skips

    ctx = Context(loaded, EvalSettings(progress=False))
    real = ctx.log_probs

    def with_a_gap(sequences, masks, desc):
        out = real(sequences, masks, desc)
        out[0] = np.concatenate([out[0][:1], [np.nan], out[0][2:]])  # the first pair's good side
        return out

    monkeypatch.setattr(ctx, "log_probs", with_a_gap)
    data = Pairs([Pair("a", "a wise son", "son wise a"), Pair("b", "the dog", "dog the")], Skips(), "test", "text")
    result = run_pairs(ctx, data, "twuggy")
    assert result["count"] == 1 and result["skipped_count"] == 1 and result["total"] == 2
    assert "1 tokens unscored" in result["skipped"][0]["reason"] and result["skipped"][0]["item"] == "a"


def test_asr_tts_and_s2st_run_through_the_hierarchical_decoder(loaded, tmp_path, monkeypatch):
    from soda.generate import hierarchical

    calls = []
    real = hierarchical.decode_hierarchical_batch

    def counted(model, *args, **kwargs):
        calls.append(len(args[1]))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(hierarchical, "decode_hierarchical_batch", counted)
    rng = np.random.default_rng(4)
    rows = []
    for i in range(2):
        path = write_wave(tmp_path / "asr" / f"{i}.wav", (rng.standard_normal(12000 * (i + 1)) * 0.1)
                          .astype(np.float32), 24000)
        rows.append({"audio": str(path), "text": ["hello there", "a wise son"][i]})
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = tmp_path / "tts.txt"
    texts.write_text("Hi.\nGo on.\n")
    s2st = tmp_path / "s2st.jsonl"
    s2st.write_text(json.dumps({"source_audio": rows[0]["audio"], "source_text": "bonjour", "source_language": "fr",
                                "target_text": "hello", "target_audio": rows[0]["audio"], "id": "p1"}) + "\n")
    settings = EvalSettings(device="cpu", progress=False, max_text_tokens=6, tts_asr="self", tts_speaker="none",
                            s2st_asr="self", s2st_speaker="none", s2st_max_seconds=1.0)
    out = tmp_path / "eval"
    results = evaluate(loaded, ["asr", "tts", "s2st"], {"asr": str(manifest), "tts": str(texts), "s2st": str(s2st)},
                       settings, out, log=lambda m: None, checkpoint={"path": "test", "digest": "g"})
    asr, tts = results["asr"], results["tts"]
    assert results["s2st"]["count"] == 1 and results["s2st"]["settings"]["family"] == "hierarchical"
    assert asr["count"] == 2 and asr["value"] is not None and asr["settings"]["family"] == "hierarchical"
    items = [json.loads(line) for line in (out / "items" / "asr.jsonl").read_text().splitlines()]
    assert len(items) == 2 and all(isinstance(i["hypothesis"], str) for i in items)
    assert tts["count"] == 2 and tts["termination_rate"] is not None and tts["value"] is not None
    spoken = [json.loads(line) for line in (out / "items" / "tts.jsonl").read_text().splitlines()]
    assert tts["termination_rate"] == sum(i["ended"] == "audio_end" for i in spoken) / 2
    assert all(i["seconds"] > 0 for i in spoken)
    # asr, tts and s2st, and their own-ASR judges: every generation went through the hierarchical decoder
    assert sum(calls) == 2 + (2 + 2) + (1 + 1)


def test_mcq_by_likelihood_and_by_generation(loaded, tmp_path):
    t = np.arange(12000) / 24000
    write_wave(tmp_path / "clips" / "low.wav", (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 24000)
    write_wave(tmp_path / "clips" / "high.wav", (0.5 * np.sin(2 * np.pi * 2000 * t)).astype(np.float32), 24000)
    rows = [{"id": "q1", "question": "Which tone?", "choices": ["low", "high"], "answer": "low",
             "audio_path": "clips/low.wav"},
            {"id": "q2", "question": "Which tone is it?", "choices": ["low", "high", "none"], "answer": "high",
             "audio_path": "clips/high.wav"}]
    data = tmp_path / "mcq.json"
    data.write_text(json.dumps(rows))
    for mode in ("likelihood", "generate"):
        settings = EvalSettings(device="cpu", progress=False, mcq_mode=mode, mcq_max_tokens=4)
        out = tmp_path / mode
        mcq = evaluate(loaded, ["mcq"], {"mcq": str(data)}, settings, out, log=lambda m: None,
                       checkpoint={"path": "test", "digest": mode})["mcq"]
        assert mcq["count"] == 2 and mcq["skipped_count"] == 0 and mcq["value"] is not None
        assert mcq["settings"]["family"] == "hierarchical" and mcq["settings"]["mode"] == mode
        assert mcq["audio_contribution"]["accuracy_silence"] is not None
        if mode == "likelihood":
            items = [json.loads(line) for line in (out / "items" / "mcq.jsonl").read_text().splitlines()]
            assert all(np.isfinite(i["scores_raw"]).all() and len(i["scores_raw"]) == len(rows[n]["choices"])
                       for n, i in enumerate(items))
