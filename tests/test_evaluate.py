"""soda-eval: scoring arithmetic, frame-major bookkeeping, the benchmarks end to end, user errors."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DEMO, write_wave

from soda.evaluate.cli import evaluate, main
from soda.evaluate.scoring import audio_mask, audio_sequence, codebook_choice, reduce, text_sequence, token_log_probs
from soda.evaluate.tasks import EvalSettings
from tokenize_audio.errors import SodaError
from tokenize_audio.vocab import Vocabulary, byte_tokenizer


def _error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("soda-eval: error: "), err
    return err


def _sentences(n: int) -> list[str]:
    text = (DEMO / "text" / "kjv_proverbs.txt").read_text()
    return [s.strip() for s in re.split(r"[.;:?]", text) if 30 < len(s.strip()) < 100][:n]


@pytest.fixture(scope="module")
def loaded(tiny_run):
    from soda.checkpoints import load_model

    return load_model(str(tiny_run), device="cpu")


# --- bookkeeping and arithmetic --------------------------------------------------------------------
@pytest.mark.parametrize("n_codebooks", range(1, 9))
def test_codebook_selection_is_frame_major_for_any_number_of_codebooks(n_codebooks):
    vocab = Vocabulary.build(byte_tokenizer(), n_codebooks, 16)
    frames = 5
    codes = np.random.default_rng(n_codebooks).integers(0, 16, size=(n_codebooks, frames))
    ids = audio_sequence(vocab, codes)
    assert ids[0] == vocab.bos_id and ids[1] == vocab.audio_start and ids[-1] == vocab.audio_end
    span = np.arange(n_codebooks * frames)
    for k in range(1, n_codebooks + 1):
        mask = audio_mask(ids, vocab, range(k))
        expected = np.zeros(len(ids), dtype=bool)
        expected[2 + span.reshape(frames, n_codebooks)[:, :k].reshape(-1)] = True  # reshape(-1, K)[:, :k]
        assert (mask == expected).all()
        # the selected tokens are codebooks 0..k-1 of every frame, in frame order
        picked = ids[mask] - vocab.audio_base
        assert (picked == (codes[:k] + np.arange(k)[:, None] * 16).T.reshape(-1)).all()
        if 1 < k < n_codebooks:  # SODA's reshape(K, -1)[:k] treats the span as codebook-major: other positions
            soda = np.zeros(len(ids), dtype=bool)
            soda[2 + span.reshape(n_codebooks, frames)[:k].reshape(-1)] = True
            assert (soda != expected).any()
    assert codebook_choice("all", vocab) == tuple(range(n_codebooks))
    assert codebook_choice("semantic", vocab) == (0,)
    assert codebook_choice("1", vocab) == (0,)
    with pytest.raises(SodaError):
        codebook_choice(str(n_codebooks + 1), vocab)


def test_scores_equal_hand_computed_log_probs_batched_or_not(loaded):
    vocab, model = loaded.vocab, loaded.model
    rng = np.random.default_rng(0)
    seqs, masks = [], []
    for frames in (3, 7, 12, 5):
        ids = audio_sequence(vocab, rng.integers(0, vocab.codebook_size, size=(vocab.n_codebooks, frames)))
        seqs.append(ids)
        masks.append(audio_mask(ids, vocab))
    for text in ("He that walketh with wise men", "a", "xq zzv"):
        ids, mask = text_sequence(vocab, text)
        seqs.append(ids)
        masks.append(mask)
    with torch.no_grad():
        by_hand = []
        for ids, mask in zip(seqs, masks):
            logp = torch.log_softmax(model(torch.as_tensor(ids)[None]).logits[0].double(), -1)
            t = np.flatnonzero(mask)
            by_hand.append(logp[t - 1, torch.as_tensor(ids[t])].numpy())
    one_batch = token_log_probs(model, seqs, masks, batch_tokens=10**6, pad_id=vocab.eos_id)
    one_by_one = [token_log_probs(model, [s], [m])[0] for s, m in zip(seqs, masks)]
    small_batches = token_log_probs(model, seqs, masks, batch_tokens=120, pad_id=vocab.eos_id)
    for hand, a, b, c in zip(by_hand, one_batch, one_by_one, small_batches):
        assert len(hand) == len(a) and len(hand) > 0
        np.testing.assert_allclose(a, hand, atol=2e-5)
        np.testing.assert_allclose(b, hand, atol=2e-5)
        np.testing.assert_allclose(c, hand, atol=2e-5)
    first = one_batch[0]
    assert reduce(first, "mean") == pytest.approx(first.mean()) and reduce(first, "sum") == pytest.approx(first.sum())
    semantic = token_log_probs(model, [seqs[0]], [audio_mask(seqs[0], vocab, (0,))])[0]
    np.testing.assert_allclose(semantic, by_hand[0][:: vocab.n_codebooks], atol=2e-5)  # cb0 of each frame


# --- likelihood pairs and the CLI -----------------------------------------------------------------
def test_pairs_prefer_real_speech_and_text_with_skips_reported(loaded, tiny_run, demo_waves, tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "swuggy"
    for i, wave in enumerate(demo_waves[:8]):  # real speech vs noise of the same loudness and length
        write_wave(folder / "good" / f"{i}.wav", wave, 24000)
        write_wave(folder / "bad" / f"{i}.wav", (rng.standard_normal(len(wave)) * wave.std()).astype(np.float32), 24000)
    write_wave(folder / "good" / "orphan.wav", demo_waves[0], 24000)  # no bad/ twin
    salmon = tmp_path / "salmon" / "pairs.jsonl"
    salmon.parent.mkdir()
    rows = [{"id": f"s{i}", "good": f"../swuggy/good/{i}.wav", "bad": f"../swuggy/bad/{i}.wav",
             "task": "noise" if i % 2 else "speaker"} for i in range(6)]
    rows.append({"id": "gone", "good": "missing.wav", "bad": "../swuggy/bad/0.wav", "task": "noise"})
    salmon.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    text = tmp_path / "text.jsonl"
    random.seed(0)
    lines = [json.dumps({"good": s, "bad": "".join(random.sample(s, len(s)))}) for s in _sentences(20)]
    text.write_text("\n".join(lines + [json.dumps({"good": "only one side"})]) + "\n")
    out = tmp_path / "eval"
    assert main([str(tiny_run), "--tasks", "swuggy,salmon,twuggy,tblimp", "--data-for", f"swuggy={folder}",
                 "--data-for", f"salmon={salmon.parent}", "--data-for", f"twuggy={text}", "--data-for",
                 f"tblimp={text}", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())["tasks"]
    sw, sa, tw = results["swuggy"], results["salmon"], results["twuggy"]
    assert sw["count"] == 8 and sw["value"] >= 0.9 and sw["skipped_count"] == 1 and sw["total"] == 9
    assert tw["count"] == 20 and tw["value"] >= 0.9 and tw["skipped_count"] == 1
    assert sa["count"] == 6 and sa["skipped_count"] == 2 and sa["total"] == 8
    assert {s["item"] for s in sa["skipped"]} == {"gone", "pairs.jsonl:8"}
    assert "audio file not found" in " ".join(s["reason"] for s in sa["skipped"])
    by_group = sa["by_group"]
    assert set(by_group) == {"noise", "speaker"} and sum(g["count"] for g in by_group.values()) == 6
    assert sa["value"] == pytest.approx(sa["correct"] / 6)  # micro-average over all pairs
    items = [json.loads(line) for line in (out / "items" / "salmon.jsonl").read_text().splitlines()]
    assert len(items) == 6 and all(r["correct"] == (r["good"] > r["bad"]) for r in items)
    assert sw["settings"]["codebooks"] == list(range(8)) and "RANDOM" in sw["settings"]["codec"]
    table = (out / "results.md").read_text()
    assert "| sWUGGY | accuracy |" in table and "| SALMon |" in table and "No SODA release" in table
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files
    # semantic-only and summed scores are settings of the same task
    assert main([str(tiny_run), "--tasks", "swuggy", "--data-for", f"swuggy={folder}", "--codebooks", "semantic",
                 "--score", "sum", "--out", str(tmp_path / "sem"), "--quiet"]) == 0
    sem = json.loads((tmp_path / "sem" / "results.json").read_text())["tasks"]["swuggy"]
    assert sem["settings"]["codebooks"] == [0] and sem["settings"]["score"].startswith("sum")


def test_hf_dataset_layout_and_offline_hub_error(tiny_run, demo_waves, tmp_path, capsys):
    import datasets
    import soundfile as sf

    def flac(wave) -> dict:
        path = tmp_path / "clip.flac"
        sf.write(str(path), wave, 24000)
        return {"bytes": path.read_bytes(), "path": None}

    rng = np.random.default_rng(1)
    waves = demo_waves[:3]
    ds = datasets.Dataset.from_dict({
        "id": ["a", "b", "c"],
        "positive": [flac(w) for w in waves],
        "negative": [flac((rng.standard_normal(len(w)) * w.std()).astype(np.float32)) for w in waves],
        "positive_word": ["wisdom", "proverbs", "understanding"],
        "negative_word": ["wizdorb", "prombers", "unterbanding"],
    }).cast_column("positive", datasets.Audio()).cast_column("negative", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "swuggy-copy"))
    out = tmp_path / "eval"
    assert main([str(tiny_run), "--tasks", "swuggy,twuggy", "--data-for", f"swuggy={tmp_path / 'swuggy-copy'}",
                 "--data-for", f"twuggy={tmp_path / 'swuggy-copy'}", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())["tasks"]
    assert results["swuggy"]["count"] == 3 and results["twuggy"]["count"] == 3
    items = [json.loads(line)["id"] for line in (out / "items" / "twuggy.jsonl").read_text().splitlines()]
    assert items == ["a", "b", "c"]
    err = _error(capsys, [str(tiny_run), "--tasks", "sblimp", "--out", str(tmp_path / "x")])
    assert "speed/sBLIMP" in err and "--data-for sblimp=" in err


def test_nll_vector_on_the_runs_held_out_shards(loaded, tiny_run, train_tokens, tmp_path):
    from soda.evaluate.nll import load_held_out, run_nll
    from soda.evaluate.tasks import Context
    from soda.train.loss import token_nll
    from tokenize_audio.shards import shard_documents

    out = tmp_path / "eval"
    assert main([str(tiny_run / "hf"), "--tasks", "nll", "--out", str(out), "--quiet"]) == 0  # data: the run's
    r = json.loads((out / "results.json").read_text())["tasks"]["nll"]
    assert list(r["nll_by_group"]) == loaded.vocab.nll_groups()
    assert sum(r["tokens_by_group"].values()) == r["count"]
    weighted = sum(r["nll_by_group"][g] * r["tokens_by_group"][g] for g in r["tokens_by_group"]) / r["count"]
    assert r["value"] == pytest.approx(weighted)
    assert r["settings"]["audio_tokens_per_second"] == pytest.approx(100.0, rel=0.02)
    assert r["bits_per_audio_second"] == pytest.approx(r["nll_audio"] / math.log(2)
                                                       * r["settings"]["audio_tokens_per_second"])
    assert r["documents"] >= 2 and r["skipped_count"] == 0
    # one document, by hand with the training loss code
    ctx = Context(loaded, EvalSettings(limit=1, progress=False))
    held = load_held_out(ctx, str(train_tokens))
    one = run_nll(ctx, held)
    doc = next(shard_documents(held.shards[0]))[1]
    batch = {"input_ids": torch.as_tensor(doc)[None], "doc_ids": torch.zeros(1, len(doc), dtype=torch.long)}
    with torch.no_grad():
        nll, _, _, valid = token_nll(loaded.model, batch)
    assert one["count"] == len(doc) - 1
    assert one["value"] == pytest.approx(float(nll[valid].double().mean()), abs=1e-5)


# --- multiple choice and the audio-contribution split ---------------------------------------------
class ToneCodec:
    """A stand-in codec: one codebook, per 0.1 s frame code 1 (low tone), 2 (high tone) or 0 (silence)."""

    sample_rate, samples_per_frame, n_codebooks, codebook_size, tokens_per_second = 8000, 800, 1, 4, 10.0

    def whole_frames(self, n: int) -> int:
        return n // self.samples_per_frame

    def encode_batch(self, waves):
        out = []
        for w in waves:
            frames = np.asarray(w[: len(w) // 800 * 800]).reshape(-1, 800)
            peak_hz = np.abs(np.fft.rfft(frames, axis=1)).argmax(1) * self.sample_rate / 800
            codes = np.where(np.abs(frames).max(1) < 1e-3, 0, np.where(peak_hz < 1000, 1, 2))
            out.append(codes[None].astype(np.int32))
        return out


class _Bag(torch.nn.Module):
    def __init__(self, links: torch.Tensor):
        super().__init__()
        self.links = torch.nn.Embedding.from_pretrained(links)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=self.links(input_ids).cumsum(1))


class BagJudge(torch.nn.Module):
    """A cache LM: the next token's logit grows with each earlier token linked to it (itself, for copying)."""

    def __init__(self, size: int, links: list[tuple[int, int]]):
        super().__init__()
        matrix = torch.zeros(size, size)
        for source, target in links:
            matrix[source, target] = 1.0
        self.body, self.head = _Bag(matrix), torch.nn.Linear(size, size, bias=False)
        self.head.weight.data = 4.0 * torch.eye(size)
        self.config = SimpleNamespace(hidden_size=size, num_hidden_layers=0, intermediate_size=0)

    def get_decoder(self):
        return self.body

    def get_output_embeddings(self):
        return self.head

    def get_input_embeddings(self):
        return self.body.links


def test_mcq_audio_contribution_split_separates_text_answerable_from_audio_items(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from soda.checkpoints import LoadedModel

    words = ["[UNK]", "the", "answer", "is", "dog", "cat", "bird", "which", "animal", "?", ".", "tone", "high", "low",
             "or", "Answer", ":"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = Vocabulary.build(tok, 1, 4)
    word = {w: i for i, w in enumerate(words)}
    copy = [(i, i) for i in range(len(words))]
    hearing = [(vocab.audio_id(0, 1), word["low"]), (vocab.audio_id(0, 2), word["high"])]

    def judge(name, links):
        return LoadedModel(BagJudge(vocab.size, links), vocab, "tone", "tone (test codec)", name, torch.device("cpu"))

    listener, reader, deaf = judge("listener", copy + hearing), judge("reader", copy), judge("deaf", [])
    t = np.arange(8000) / 8000  # one second
    audio = {"low": 0.5 * np.sin(2 * np.pi * 300 * t), "high": 0.5 * np.sin(2 * np.pi * 2000 * t)}
    for name, wave in audio.items():
        write_wave(tmp_path / "clips" / f"{name}.wav", wave.astype(np.float32), 8000)
    questions = [  # text-answerable (the answer is in the question) in several benchmark layouts
        {"id": "t1", "question": "the answer is dog . which animal ?", "choices": ["dog", "cat"], "answer": "dog",
         "audio_path": "clips/low.wav", "domain": "text"},
        {"id": "t2", "question": "the answer is cat . which animal ?", "choices": ["dog", "cat"], "answer": "B",
         "audio_path": "clips/high.wav", "domain": "text"},
        {"id": "t3", "question": "the answer is bird . which animal ?", "choice_a": "dog", "choice_b": "cat",
         "choice_c": "bird", "answer_gt": "bird", "audio": "clips/low.wav", "task_name": "text"},
        # audio-required: both options are in the question; only the tone tells them apart
        {"id": "a1", "question": "is the tone high or low ?", "choices": ["high", "low"], "answer": "low",
         "audio_path": "clips/low.wav", "domain": "audio"},
        {"id": "a2", "question": "is the tone high or low ?", "choices": ["high", "low"], "answer": "(A)",
         "audio_path": "clips/high.wav", "domain": "audio"},
        {"id": "a3", "question": "is the tone low or high ?", "choices": ["low", "high"], "answer": 1,
         "audio_id": "clips/high.wav", "domain": "audio"},
        # bad input: skipped and reported
        {"id": "x1", "question": "which animal ?", "choices": ["dog", "cat"], "answer": "cow",
         "audio_path": "clips/low.wav"},
        {"id": "x2", "question": "which animal ?", "choices": ["dog", "cat"], "answer": "dog",
         "audio_path": "clips/missing.wav"},
        "not an object",
    ]
    data = tmp_path / "mcq.json"
    data.write_text(json.dumps(questions))
    out = tmp_path / "eval"
    settings = EvalSettings(progress=False, split_weak_strong=True, judges=[listener, reader, deaf])
    r = evaluate(listener, ["mcq"], {"mcq": str(data)}, settings, out, codec=ToneCodec(), log=lambda m: None)["mcq"]
    assert r["count"] == 6 and r["skipped_count"] == 3 and r["total"] == 9
    reasons = {s["item"]: s["reason"] for s in r["skipped"]}
    assert "not one of the choices" in reasons["x1"] and "audio file not found" in reasons["x2"]
    assert "not a JSON object" in reasons["mcq.json[8]"]
    assert r["value"] == 1.0 and r["accuracy_raw"] == 1.0
    assert r["chance"] == pytest.approx((5 * 1 / 2 + 1 / 3) / 6)
    assert r["by_domain"]["text"]["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    ac = r["audio_contribution"]
    assert ac["correct_without_audio"] == 3 and ac["correct_only_with_audio"] == 3
    assert r["by_domain"]["text"]["accuracy_silence"] == 1.0 and r["by_domain"]["audio"]["accuracy_silence"] == 0.0
    split = r["split"]
    assert split["min_votes"] == 2 and split["judges"] == ["listener", "reader", "deaf"]
    weak = json.loads((out / "mcq_weak.json").read_text())
    strong = json.loads((out / "mcq_strong.json").read_text())
    assert [q["id"] for q in weak] == ["t1", "t2", "t3"] and [q["id"] for q in strong] == ["a1", "a2", "a3"]
    assert weak[2]["choice_c"] == "bird" and Path(weak[0]["audio_path"]).is_absolute()  # input format kept
    items = {row["id"]: row for row in map(json.loads, (out / "items" / "mcq.jsonl").read_text().splitlines())}
    assert items["t1"]["votes_without_audio"] == 2 and items["a1"]["votes_without_audio"] == 0
    # soft audio contribution: P(answer | options) with audio minus with silence
    assert items["a1"]["audio_effect"] > 0.4 and items["t1"]["audio_effect"] == pytest.approx(0, abs=1e-9)
    # the split files are valid inputs; with all three judges required nothing is weak
    settings = EvalSettings(progress=False, split_weak_strong=True, judges=[listener, reader, deaf], weak_votes=3)
    r = evaluate(listener, ["mcq"], {"mcq": str(out / "mcq_weak.json")}, settings, tmp_path / "again",
                 codec=ToneCodec(), log=lambda m: None)["mcq"]
    assert r["count"] == 3 and r["skipped_count"] == 0 and r["split"]["weak"] == 0


# --- SODA's release layout and user errors ---------------------------------------------------------
def test_soda_layout_directory_loads_and_scores(demo_waves, tmp_path, capsys):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from soda.checkpoints import load_model
    from tokenize_audio.vocab import hf_tokenizer_object

    vocab = Vocabulary.build(byte_tokenizer(), 8, 2048)
    release = tmp_path / "soda-tiny-base"
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                 tie_word_embeddings=False)).save_pretrained(release)
    hf_tokenizer_object(vocab).save(str(release / "tokenizer.json"))
    assert not (release / "vocab.json").exists()
    loaded = load_model(str(release), device="cpu", codec="mimi:random")
    assert loaded.vocab.to_dict() | {"text_tokenizer": ""} == vocab.to_dict() | {"text_tokenizer": ""}
    assert loaded.vocab.audio_base == 262 and loaded.vocab.size == 16646
    light = load_model(str(release), device="cpu", codec="mimi:random", weights=False)  # config + tokenizer only
    assert light.model is None and light.vocab.matches(loaded.vocab) and light.codec_spec == "mimi:random"
    pairs = tmp_path / "pairs" / "pairs.jsonl"
    for i in range(2):
        write_wave(pairs.parent / f"g{i}.wav", demo_waves[i], 24000)
        write_wave(pairs.parent / f"b{i}.wav", demo_waves[i][::-1].copy(), 24000)
    pairs.write_text("".join(json.dumps({"good": f"g{i}.wav", "bad": f"b{i}.wav"}) + "\n" for i in range(2)))
    out = tmp_path / "eval"
    (tmp_path / "words.jsonl").write_text(json.dumps({"good": "wisdom", "bad": "wizdorb"}) + "\n")
    assert main([str(release), "--codec", "mimi:random", "--tasks", "swuggy,twuggy", "--data-for",
                 f"swuggy={pairs}", "--data-for", f"twuggy={tmp_path / 'words.jsonl'}", "--out", str(out),
                 "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["swuggy"]["count"] == 2 and results["tasks"]["twuggy"]["count"] == 1
    assert results["model"]["soda_size"] is None
    # without --codec a SODA release means the real Mimi, which cannot be fetched offline: one line, exit 2
    err = _error(capsys, [str(release), "--tasks", "swuggy", "--data-for", f"swuggy={pairs}", "--out", str(out)])
    assert "mimi" in err and "--codec" in err
    # a codec with other codebook sizes would put codes on the wrong ids
    err = _error(capsys, [str(release), "--codec", "encodec:random", "--tasks", "swuggy", "--data-for",
                          f"swuggy={pairs}", "--out", str(out)])
    assert "codebooks of 1024 codes" in err


def test_user_mistakes_are_one_line_errors(tiny_run, tmp_path, capsys):
    run, out = str(tiny_run), str(tmp_path / "eval")
    assert "unknown task 'arc_easy'" in _error(capsys, [run, "--tasks", "swuggy,arc_easy", "--out", out])
    assert "no such file" in _error(capsys, [run, "--tasks", "twuggy", "--data-for", "twuggy=/nope.jsonl",
                                             "--out", out])
    assert "not in --tasks" in _error(capsys, [run, "--tasks", "twuggy", "--data-for", "tblimp=x", "--out", out])
    assert "expected TASK=PATH" in _error(capsys, [run, "--tasks", "twuggy", "--data-for", "twuggy", "--out", out])
    assert "--data-for mcq=" in _error(capsys, [run, "--tasks", "mcq", "--out", out])
    assert "choose 1..8" in _error(capsys, [run, "--tasks", "nll", "--codebooks", "9", "--out", out])
    assert "--split-weak-strong" in _error(capsys, [run, "--tasks", "nll", "--weak-votes", "2", "--out", out])
    assert "no such checkpoint" in _error(capsys, [str(tmp_path / "nothing"), "--tasks", "nll", "--out", out])
    assert not (tmp_path / "eval").exists()


# --- generation tasks: ASR and TTS --------------------------------------------------------------------
def test_wer_uses_sodas_normalisation():
    from soda.evaluate.asr import normalize, word_errors

    assert normalize("  It\u2019s a \u201cTest\u201d -- (really)!  ") == "its a test really"
    scores = word_errors(["Hello, World!", "It's a test."], ["hello world", "its the test"])
    assert scores["wer"] == pytest.approx(1 / 5) and scores["substitutions"] == 1 and scores["reference_words"] == 5
    assert word_errors(["one two"], [""])["wer"] == 1.0  # nothing said: every word deleted


@pytest.fixture(scope="module")
def speaker_encoder(tmp_path_factory) -> Path:
    """A tiny random-weight WavLM speaker-verification model saved as a directory (the real loading path)."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    path = tmp_path_factory.mktemp("wavlm-sv")
    torch.manual_seed(0)
    config = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, tdnn_dim=(16, 16), tdnn_kernel=(3, 1),
                         tdnn_dilation=(1, 1), xvector_output_dim=8, num_buckets=32, max_bucket_distance=64)
    WavLMForXVector(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(path)
    return path


def test_asr_and_tts_report_wer_similarity_and_termination(tiny_run, small_corpus, speaker_encoder, tmp_path,
                                                             capsys):
    pytest.importorskip("pocketsphinx")
    import shutil

    import jiwer
    import soundfile as sf

    from soda.evaluate.asr import normalize

    flite = next(small_corpus.glob("flite_kal/*"))  # LibriSpeech-style: NAME.trans.txt beside the audio
    libri = tmp_path / "test-clean" / "61" / "70968"
    libri.mkdir(parents=True)
    listing = (flite / f"{flite.name}.trans.txt").read_text().splitlines()[:3]
    for line in listing[:2]:
        shutil.copy(flite / f"{line.split()[0]}.flac", libri)
    (libri / f"{flite.name}.trans.txt").write_text("\n".join(listing) + "\n")  # the third has no audio
    voice = sorted(small_corpus.rglob("*.flac"))[0]
    meta = tmp_path / "seed-tts" / "meta.lst"
    meta.parent.mkdir()
    meta.write_text(f"a|{voice.with_suffix('.txt').read_text().strip()}|{voice}|Hello there.\n"
                    f"b|Some words.|{voice}|A wise son.\n"
                    f"c|Gone.|missing.wav|Hear me.\n"
                    "broken line\n")
    out = tmp_path / "eval"
    assert main([str(tiny_run), "--tasks", "asr,tts", "--data-for", f"asr={tmp_path / 'test-clean'}",
                 "--data-for", f"tts={meta}", "--tts-asr", "pocketsphinx", "--tts-speaker", f"wavlm:{speaker_encoder}",
                 "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())["tasks"]
    asr, tts = results["asr"], results["tts"]
    items = [json.loads(line) for line in (out / "items" / "asr.jsonl").read_text().splitlines()]
    assert asr["count"] == 2 and len(items) == 2 and asr["skipped_count"] == 1
    assert "no audio file" in asr["skipped"][0]["reason"]
    recomputed = jiwer.wer([normalize(i["reference"]) for i in items], [normalize(i["hypothesis"]) for i in items])
    assert asr["value"] == pytest.approx(recomputed)
    assert tts["count"] == 2 and tts["skipped_count"] == 2
    assert {s["item"] for s in tts["skipped"]} == {"c", "meta.lst:4"}
    spoken = [json.loads(line) for line in (out / "items" / "tts.jsonl").read_text().splitlines()]
    assert tts["termination_rate"] == sum(i["ended"] == "audio_end" for i in spoken) / 2
    for item in spoken:
        wave, sr = sf.read(str(out / "tts" / f"{item['id']}.wav"))
        assert sr == 24000 and len(wave) / sr == pytest.approx(item["seconds"], abs=1e-3)
        assert item["similarity"] is None or -1 <= item["similarity"] <= 1
    recomputed = jiwer.wer([normalize(i["text"]) for i in spoken], [normalize(i["transcript"]) for i in spoken])
    assert tts["value"] == pytest.approx(recomputed)
    table = (out / "results.md").read_text()
    assert "| TTS | termination rate" in table and "| ASR (WER) | WER (corpus, normalised) ↓ |" in table
    # the default speaker encoder is not reachable offline: one line, before anything is generated
    err = _error(capsys, [str(tiny_run), "--tasks", "tts", "--data-for", f"tts={meta}", "--tts-asr", "pocketsphinx",
                          "--out", str(tmp_path / "x")])
    assert "wavlm-base-plus-sv" in err and "--tts-speaker" in err


# --- one --out, several runs: results merge per task ----------------------------------------------
def _words(path: Path, n: int = 6) -> Path:
    random.seed(1)
    path.write_text("".join(json.dumps({"good": s, "bad": "".join(random.sample(s, len(s)))}) + "\n"
                            for s in _sentences(n)))
    return path


def _other_model(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the run's export with other weights: another checkpoint with the same vocabulary and codec."""
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-model"
    shutil.copytree(tiny_run / "hf", other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    return other


def test_a_second_eval_into_the_same_out_keeps_the_first_runs_tasks(tiny_run, tmp_path, capsys):
    words, out = _words(tmp_path / "words.jsonl"), tmp_path / "eval"
    common = ["--out", str(out), "--quiet"]
    assert main([str(tiny_run), "--tasks", "twuggy", "--data-for", f"twuggy={words}", *common]) == 0
    assert main([str(tiny_run), "--tasks", "tblimp", "--data-for", f"tblimp={words}", *common]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"twuggy", "tblimp"}
    assert (out / "items" / "twuggy.jsonl").is_file() and (out / "items" / "tblimp.jsonl").is_file()
    table = (out / "results.md").read_text()  # regenerated from the merged results
    assert "| tWUGGY |" in table and "| tBLIMP |" in table
    for entry in results["tasks"].values():  # each task records what it evaluated and how
        assert entry["checkpoint"] == results["checkpoint"] and entry["checkpoint"]["digest"]
        assert entry["settings"]["max_len"] == 4096 and "evaluated_at" in entry
    # a re-run of one task updates that task only
    assert main([str(tiny_run), "--tasks", "twuggy", "--data-for", f"twuggy={words}", "--limit", "2", *common]) == 0
    again = json.loads((out / "results.json").read_text())["tasks"]
    assert again["twuggy"]["count"] == 2 and again["twuggy"]["settings"]["limit"] == 2
    assert again["tblimp"] == results["tasks"]["tblimp"]


def test_another_checkpoint_into_the_same_out_is_refused_unless_overwrite(tiny_run, tmp_path, capsys):
    words, out = _words(tmp_path / "words.jsonl"), tmp_path / "eval"
    other = _other_model(tiny_run, tmp_path)
    assert main([str(tiny_run), "--tasks", "twuggy", "--data-for", f"twuggy={words}", "--out", str(out),
                 "--quiet"]) == 0
    before = (out / "results.json").read_bytes()
    err = _error(capsys, [str(other), "--tasks", "tblimp", "--data-for", f"tblimp={words}", "--out", str(out)])
    assert "another checkpoint" in err and "--overwrite" in err and str(other) in err
    assert (out / "results.json").read_bytes() == before  # refused before any scoring, nothing touched
    assert main([str(other), "--tasks", "tblimp", "--data-for", f"tblimp={words}", "--out", str(out), "--quiet",
                 "--overwrite"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"tblimp"} and results["model"]["source"] == str(other)
    assert not (out / "items" / "twuggy.jsonl").exists() and "tWUGGY" not in (out / "results.md").read_text()


def test_overwrite_also_clears_the_audio_a_speech_task_saved(tmp_path):
    """--overwrite replaces another checkpoint's results: its TTS/S2ST wavs go too (they were left behind, mixed
    with the new checkpoint's), while a file of the user's in such a folder is kept."""
    from soda.evaluate import report

    header = {"model": {"source": "m"}, "checkpoint": {"path": "m", "digest": "abc"}}
    (tmp_path / "results.json").write_text(json.dumps({**header, "tasks": {"tts": {}, "s2st": {}}}))
    for folder in ("tts", "s2st"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "item-1.wav").write_bytes(b"RIFF")
    (tmp_path / "s2st" / "notes.txt").write_text("mine")
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "tts.jsonl").write_text("{}\n")
    report.claim(tmp_path, {**header, "checkpoint": {"path": "n", "digest": "def"}}, overwrite=True)
    assert not (tmp_path / "tts").exists() and not (tmp_path / "items" / "tts.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "s2st").iterdir()) == ["notes.txt"]
    assert json.loads((tmp_path / "results.json").read_text())["tasks"] == {}


def test_concurrent_merges_keep_every_task(tmp_path, monkeypatch):
    import threading

    from soda.evaluate import report
    from soda.evaluate.tasks import available

    tasks = available()
    names = list(tasks)
    read = report.read_results

    def slow_read(out):  # widen the window between reading and writing: without a lock, updates are lost
        found = read(out)
        threading.Event().wait(0.05)
        return found

    monkeypatch.setattr(report, "read_results", slow_read)
    header = {"model": {"source": "m", "codec": "c", "parameters": 1, "non_embedding_parameters": 1,
                        "soda_size": None}, "checkpoint": {"path": "m", "digest": "abc"}}
    start = threading.Barrier(len(names))
    errors = []

    def one(name):
        start.wait()
        try:
            report.merge(tmp_path, header, {name: {"metric": "accuracy", "value": 0.5, "count": 1,
                                                   "skipped_count": 0, "settings": {}}}, tasks)
        except Exception as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(json.loads((tmp_path / "results.json").read_text())["tasks"]) == set(names)
    assert all(tasks[n].title in (tmp_path / "results.md").read_text() for n in names)


def test_evaluation_manifests_with_a_utf8_bom_are_read(tmp_path):
    """Files saved by spreadsheet programs and some Windows editors start with a BOM; it must not become part of the
    first field (the first row was 'not a JSON object', a TSV's first column name was wrong)."""
    from soda.evaluate.mcq_items import file_rows
    from soda.evaluate.pairs import _jsonl_pairs
    from soda.evaluate.tasks import Skips
    from soda.evaluate.tts import read_prompts

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"id": "p1", "good": "a cat", "bad": "a cta"}\n', encoding="utf-8-sig")
    skips = Skips()
    assert [p.id for p in _jsonl_pairs(pairs, "text", skips)] == ["p1"] and not skips.items
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n", encoding="utf-8-sig")
    assert [p.text for p in read_prompts(str(prompts), Skips())] == ["hello there"]
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "q?", "choices": ["a", "b"], "answer": "a"}\n', encoding="utf-8-sig")
    skips = Skips()
    assert len(file_rows(questions, skips)) == 1 and not skips.items
