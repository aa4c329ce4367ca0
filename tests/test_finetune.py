"""soda-finetune: S2ST documents, target-only loss through packing, manifests with bad rows, a tiny model
that learns to translate, resume, S2ST evaluation, the general `docs` path and user errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from test_evaluate import speaker_encoder  # noqa: F401 -- fixture: a tiny offline WavLM speaker model
from test_train import losses

from soda.finetune.cli import FINETUNE_DEFAULTS, main
from soda.generate.decode import translate
from soda.generate.prompts import GenerationSettings, Request, build_plan
from soda.train.config import make_config
from soda.train.data import Layout, TrainWindows, ValidationWindows, loss_mask
from soda.train.index import index_sources
from soda.train.loss import scored_targets
from soda.train.optim import lr_factor
from soda.train.sources import Source
from tokenize_audio.documents import s2st_document
from tokenize_audio.shards import write_shard
from tokenize_audio.vocab import Vocabulary, byte_tokenizer

K, CODES = 8, 64
STEPS, STOP_AT = 100, 30  # fine-tuning steps; the first run stops at STOP_AT and is resumed
# Fast fitting for a tiny model: SODA's fine-tuning LR (2e-5) moves a 2M-parameter model nowhere in a minute.
FAST = {"betas": [0.9, 0.95], "z_loss": 0.0, "weight_decay": 0.0}


def _error(capsys, argv, prog: str = "soda-finetune") -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"{prog}: error: "), err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.build(byte_tokenizer(), K, CODES)


@pytest.fixture(scope="module")
def s2st_corpus(tmp_path_factory) -> Path:
    """demo/make_s2st_corpus.py: 4 French sentences and their English translations, 3 espeak-ng voices."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    spec = importlib.util.spec_from_file_location("make_s2st_corpus", REPO / "demo" / "make_s2st_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_corpus(tmp_path_factory.mktemp("s2st") / "corpus")


def manifest_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# --------------------------------------------------------------------------------------------
# Documents and the loss mask
# --------------------------------------------------------------------------------------------
def test_s2st_document_is_sodas_layout_and_starts_with_the_generation_prompt(vocab):
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(0, CODES, (K, 2)), rng.integers(0, CODES, (K, 3))
    ids, target_start = s2st_document(vocab, vocab.codes_to_ids(src), "fr", vocab.encode_text("Salut."), "en",
                                      vocab.encode_text("Hi."), vocab.codes_to_ids(tgt))
    audio = lambda c: "".join(vocab.audio_char(i) for i in vocab.codes_to_ids(c))  # noqa: E731
    assert vocab.ids_to_string(ids) == (
        f"<|begin_of_text|><|audio_start|>{audio(src)}<|audio_end|><|text_start|><language>fr</language>Salut."
        f"<|text_end|><|text_start|><language>en</language>Hi.<|text_end|><|audio_start|>{audio(tgt)}<|audio_end|>"
        "<|end_of_text|>")
    assert ids[target_start - 1] == vocab.text_end and ids[target_start] == vocab.text_start
    assert list(ids[:target_start]).count(vocab.text_end) == 1  # the target starts after the source text
    # generation's S2ST prompt (source text given) is this document up to the target text, token for token
    prompt = build_plan(vocab, Request("s2st", audio=src, source_language="fr", source_text="Salut."),
                        {"audio": src}).prompt
    assert list(ids[:len(prompt)]) == prompt and len(prompt) == target_start + 1 + len(vocab.encode_text(
        "<language>en</language>"))


def test_target_only_labels_are_exact_across_packing_boundaries_and_resume(vocab, tmp_path):
    rng = np.random.default_rng(1)
    docs, starts = [], []
    for n in range(5):  # documents of different lengths, cut across windows of 37 tokens
        ids, start = s2st_document(vocab, vocab.codes_to_ids(rng.integers(0, CODES, (K, 1 + n % 3))), "de",
                                   vocab.encode_text("ab" * (n + 1)), "en", vocab.encode_text("xyz"[: n % 3 + 1]),
                                   vocab.codes_to_ids(rng.integers(0, CODES, (K, 2))))
        docs.append(ids.astype(np.int64))
        starts.append(start)
    shard = tmp_path / "train-speech-00000.tar"
    write_shard(shard, [(f"d{i}", d, {}) for i, d in enumerate(docs)])
    assert [list(np.flatnonzero(~loss_mask(d, vocab.text_end))) for d in docs] == [list(range(s)) for s in starts]

    seq = 37
    _, val = index_sources([Source("s2st", [], [str(shard)])], tmp_path / "index", quiet=True)
    windows = list(ValidationWindows(val, seq, 1, loss_after=vocab.text_end))  # in order, unshuffled
    # Independent expectation: the documents concatenated, cut into windows; a target counts when it is in
    # the target part of its document and its predecessor is in the same window and document.
    flat = np.concatenate(docs)
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    offset = np.concatenate([np.arange(len(d)) for d in docs])
    assert len(windows) == len(flat) // seq >= 6
    for w, window in enumerate(windows):
        scored = scored_targets({k: v[None] for k, v in window.items()})[0].numpy()  # what the loss counts
        got = np.full(seq, -100)
        got[1:] = np.where(scored, window["input_ids"].numpy()[1:], -100)
        span = slice(w * seq, (w + 1) * seq)
        expected = np.where(offset[span] >= np.array(starts)[doc_of[span]], flat[span], -100)
        expected[0] = -100
        expected[1:][doc_of[span][1:] != doc_of[span][:-1]] = -100
        assert (got == expected).all(), w
        assert (window["input_ids"].numpy() == flat[span]).all()
    assert "loss_mask" not in next(iter(ValidationWindows(val, seq, 1)))  # without loss_after only document
    # boundaries are masked, as in pre-training

    # training windows (shuffled, each read by seeking into its document) carry the same masks, resumed or not
    train, _ = index_sources([Source("s2st", [str(shard)], weight=1.0)], tmp_path / "index", quiet=True)
    straight = TrainWindows(train, [1.0], seq, 0, Layout(1, 1), loss_after=vocab.text_end)
    it = iter(straight)
    first = [next(it) for _ in range(7)]
    resumed = iter(TrainWindows(train, [1.0], seq, 0, Layout(1, 1), step=3, counts=[3], loss_after=vocab.text_end))
    for a, b in zip(first[3:], resumed):
        assert torch.equal(a["loss_mask"], b["loss_mask"]) and torch.equal(a["input_ids"], b["input_ids"])
    by_ids = {tuple(w["input_ids"].tolist()): w["loss_mask"] for w in windows}
    for w in first:
        if tuple(w["input_ids"].tolist()) in by_ids:
            assert torch.equal(w["loss_mask"], by_ids[tuple(w["input_ids"].tolist())])


def test_cosine_schedule_and_recipe_file():
    factors = [lr_factor("cosine", s, 100, 0.03, 0.2) for s in range(101)]
    assert factors[0] == pytest.approx(1 / 3) and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[100] == pytest.approx(0)
    assert factors[3 + 48] == pytest.approx(0.5, abs=0.02)  # half-way through the cosine
    recipe = yaml.safe_load((REPO / "configs" / "finetune-s2st.yaml").read_text())
    assert set(recipe) == set(FINETUNE_DEFAULTS)
    assert make_config(recipe).to_dict() == make_config(FINETUNE_DEFAULTS).to_dict()  # YAML lists vs tuples


# SODA's CVSS-T fine-tuning (DESIGN.md §2, written out independently of soda.finetune).
SODA_S2ST_RECIPE = {"lr": 2e-5, "schedule": "cosine", "warmup": 0.03, "betas": [0.9, 0.999], "eps": 1e-8,
                    "weight_decay": 0.01, "weight_decay_mode": "adamc", "cautious": True, "grad_clip": 1.0,
                    "z_loss": 1e-4, "epochs": 5.0}


def test_fresh_s2st_run_records_sodas_finetuning_recipe(tiny_run, s2st_corpus, tmp_path):
    """Only the batch's shape is made small here; every optimiser and schedule setting is the default, and the
    run's config.yaml holds SODA's recipe, with --tokens = 5 passes over the prepared pairs."""
    from tokenize_audio.s2st import epochs_to_tokens

    out = tmp_path / "run"
    assert main(["s2st", "--init-from", str(tiny_run), "--data", str(s2st_corpus), "--out", str(out),
                 "--validation-fraction", "0", "--seq-len", "256", "--batch-tokens", "512", "--max-steps", "1",
                 "--workers", "0", "--no-export", "--quiet"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: config[k] for k in SODA_S2ST_RECIPE} == SODA_S2ST_RECIPE
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert int(config["tokens"]) == epochs_to_tokens(manifest, 5) > epochs_to_tokens(manifest, 1)
    assert yaml.safe_load((REPO / "configs" / "finetune-s2st.yaml").read_text())["batch_tokens"] == 64 * 2048


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------
def test_bad_manifest_rows_are_skipped_and_counted(tiny_run, s2st_corpus, tmp_path, capsys):
    rows = manifest_rows(s2st_corpus)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave")
    shutil.copytree(s2st_corpus.parent / "fr", tmp_path / "fr")
    shutil.copytree(s2st_corpus.parent / "en", tmp_path / "en")
    good = rows[:3]
    bad = [dict(rows[3], id="missing", source_audio="fr/nope.wav"), dict(rows[4], id="empty", target_text="  "),
           dict(rows[5], id="broken", target_audio="broken.wav")]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in good + bad) + "not json\n")
    out = tmp_path / "run"
    assert main(["s2st", "--init-from", str(tiny_run), "--data", str(manifest), "--out", str(out),
                 "--prepare-only", "--validation-fraction", "0", "--quiet"]) == 0
    assert "3 pairs used, 4 skipped" in capsys.readouterr().err
    report = json.loads((out / "data_report.json").read_text())
    assert report["pairs"] == 3 and report["skipped_count"] == 4 and report["rows"] == 7
    reasons = {s["item"]: s["reason"] for s in report["skipped"]}
    assert "source audio not found" in reasons["pairs.jsonl:4"] and reasons["pairs.jsonl:5"] == "empty target text"
    assert reasons["broken"].startswith("target audio: unreadable audio") and "not valid JSON" in reasons["pairs.jsonl:7"]
    data = json.loads((out / "data" / "manifest.json").read_text())
    assert data["documents"] == 3 and data["formats"] == ["s2st"] and data["codec"]["spec"] == "mimi:random"
    # nothing usable: one line naming the manifest, exit 2
    manifest.write_text("".join(json.dumps(r) + "\n" for r in bad))
    err = _error(capsys, ["s2st", "--init-from", str(tiny_run), "--data", str(manifest), "--out",
                          str(tmp_path / "run2"), "--quiet"])
    assert str(manifest) in err and "no usable pairs (3 skipped" in err


def _with_bom(path: Path, text: str) -> Path:
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Excel and Notepad save "UTF-8"
    return path


def test_a_utf8_bom_is_stripped_from_tsv_csv_and_jsonl_manifests(s2st_corpus, tmp_path):
    from tokenize_audio.documents import validation_recordings
    from tokenize_audio.s2st import read_pairs

    base = s2st_corpus.parent
    plain = read_pairs(s2st_corpus)
    ids = [p.id for p in plain.pairs]
    text = s2st_corpus.read_text()
    assert text.startswith("id\t")
    # `id` first: the ids are the column's, so the same pairs are held out
    bom = read_pairs(_with_bom(base / "bom.tsv", text))
    assert [p.id for p in bom.pairs] == ids and not bom.skipped
    assert validation_recordings([p.id for p in bom.pairs], 0.25) == validation_recordings(ids, 0.25)
    # `source_audio` first: the header is recognised
    rows = manifest_rows(s2st_corpus)
    columns = ["source_audio", "source_text", "source_language", "target_text", "target_audio", "id"]
    reordered = "".join("\t".join(r[c] for c in columns) + "\n" for r in [dict(zip(columns, columns))] + rows)
    assert [p.id for p in read_pairs(_with_bom(base / "bom2.tsv", reordered)).pairs] == ids
    # CSV and JSONL too
    csv_text = "".join(",".join(f'"{r[c]}"' for c in columns) + "\n" for r in [dict(zip(columns, columns))] + rows)
    assert [p.id for p in read_pairs(_with_bom(base / "bom.csv", csv_text)).pairs] == ids
    jsonl = read_pairs(_with_bom(base / "bom.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert [p.id for p in jsonl.pairs] == ids and not jsonl.skipped
    assert bom.sha256 != plain.sha256 and len(plain.sha256) == 64  # a fingerprint of the bytes read


def test_duplicate_ids_are_skipped_and_long_documents_named(tiny_run, s2st_corpus, tmp_path, capsys):
    rows = manifest_rows(s2st_corpus)[:4]
    rows.append(dict(manifest_rows(s2st_corpus)[5], id=rows[1]["id"]))  # another pair under a used id
    manifest = s2st_corpus.parent / "dups.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["s2st", "--init-from", str(tiny_run), "--data", str(manifest), "--out", str(out), "--prepare-only",
                 "--validation-fraction", "0", "--seq-len", "128", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "4 pairs used, 1 skipped (1 duplicate id)" in err
    report = json.loads((out / "data_report.json").read_text())
    assert report["skipped"] == [{"item": "dups.jsonl:5", "reason": f"duplicate id: {rows[1]['id']} (first on line 2)"}]
    assert report["skipped_reasons"] == {"duplicate id": 1}
    long = report["longer_than_seq_len"]
    lengths = json.loads((out / "data" / "train-speech-00000.json").read_text())["document_tokens"]
    assert long["seq_len"] == 128 and long["count"] == 4 and {d["id"]: d["tokens"] for d in long["documents"]} == \
        {r["id"]: lengths[r["id"]] for r in rows[:4]} and min(lengths.values()) > 128
    warning = [line for line in err.splitlines() if "longer than --seq-len 128" in line]
    assert len(warning) == 1 and rows[0]["id"] in warning[0] and "warning" in warning[0]
    assert report["manifest_sha256"] == __import__("hashlib").sha256(manifest.read_bytes()).hexdigest()


def test_resume_refuses_a_manifest_edited_in_place(tiny_run, s2st_corpus, tmp_path, capsys):
    manifest = tmp_path / "pairs.tsv"
    shutil.copy(s2st_corpus, manifest)
    for folder in ("fr", "en"):
        shutil.copytree(s2st_corpus.parent / folder, tmp_path / folder)
    out = tmp_path / "run"
    common = ["--seq-len", "256", "--batch-tokens", "512", "--workers", "0", "--no-export", "--quiet"]
    assert main(["s2st", "--init-from", str(tiny_run), "--data", str(manifest), "--out", str(out),
                 "--validation-fraction", "0", "--max-steps", "1", *common]) == 0
    manifest.write_text(manifest.read_text().replace("\tfr\t", "\tfr\tThe ", 1))  # a translation fixed in place
    for argv in (["s2st", "--out", str(out), "--resume", "--max-steps", "2", *common],
                 ["s2st", "--data", str(manifest), "--out", str(out), "--resume", "--max-steps", "2", *common]):
        err = _error(capsys, argv)
        assert "--resume" in err and str(manifest) in err and "changed since" in err
    assert not (out / "checkpoints" / "step0000002.ckpt").exists()


# --------------------------------------------------------------------------------------------
# Fine-tuning end to end
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tiny_run, s2st_corpus, tmp_path_factory) -> Path:
    """The tiny_run model fine-tuned on the synthetic S2ST set, target-only loss, interrupted and resumed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a micro model on a shared 2-core machine: one thread is ~3x faster
    out = tmp_path_factory.mktemp("ft") / "s2st"
    fast = out.parent / "fast.yaml"
    fast.write_text(yaml.safe_dump(FAST))
    args = ["s2st", "--init-from", str(tiny_run), "--data", str(s2st_corpus), "--out", str(out), "--config",
            str(fast), "--target-only-loss", "--validation-fraction", "0", "--seq-len", "512", "--batch-tokens",
            "1024", "--lr", "1.5e-2", "--tokens", str(STEPS * 1024), "--workers", "0", "--log-every", "1",
            "--ckpt-every", str(STOP_AT), "--quiet"]
    try:
        assert main(args + ["--max-steps", str(STOP_AT)]) == 0  # as if stopped there
        assert main(["s2st", "--out", str(out), "--resume", "--max-steps", str(STEPS), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_finetuned_tiny_model_emits_the_right_translation(finetuned, s2st_corpus):
    from soda.checkpoints import load_model
    from tokenize_audio.audio import load_audio

    config = yaml.safe_load((finetuned / "config.yaml").read_text())
    assert config["schedule"] == "cosine" and config["warmup"] == 0.03 and config["loss_after"] == "text_end"
    assert config["seq_len"] == 512 and config["init_from"] == str(Path(config["init_from"]))
    with open(finetuned / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps[0] < STOP_AT < steps[-1] and steps == sorted(set(steps))  # one run, continued
    assert all((finetuned / "checkpoints" / f"step{s:07d}.ckpt").is_file() for s in (STOP_AT, STEPS))
    loaded = load_model(str(finetuned), device="cpu")
    codec = loaded.load_codec()
    rows = manifest_rows(s2st_corpus)
    waves = [load_audio(str(s2st_corpus.parent / r["source_audio"]), codec.sample_rate) for r in rows]
    results = translate(loaded, codec, waves, "fr", [r["source_text"] for r in rows],
                        settings=GenerationSettings(max_seconds=0.16, batch_size=12))  # the text is what is checked
    assert [r.text for r in results] == [r["target_text"] for r in rows]
    assert all(r.wave is not None and len(r.wave) > 0 for r in results)


@pytest.mark.slow
def test_eval_s2st_reports_asr_bleu_text_bleu_similarity_and_termination(finetuned, s2st_corpus, speaker_encoder,
                                                                          tmp_path):
    pytest.importorskip("pocketsphinx")
    import sacrebleu

    from soda.evaluate.asr import normalize

    out = tmp_path / "eval"
    assert main(["eval-s2st", str(finetuned), "--data", str(s2st_corpus), "--out", str(out), "--asr", "pocketsphinx",
                 "--speaker", f"wavlm:{speaker_encoder}", "--source-text", "given", "--limit", "4",
                 "--max-seconds", "1", "--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())["tasks"]["s2st"]
    items = [json.loads(line) for line in (out / "items" / "s2st.jsonl").read_text().splitlines()]
    assert result["count"] == len(items) == 4
    refs = [[normalize(i["reference"]) for i in items]]
    assert result["text_bleu"] == pytest.approx(100.0)  # it learnt the translations
    assert result["text_bleu"] == pytest.approx(sacrebleu.corpus_bleu([normalize(i["translation"]) for i in items],
                                                                      refs).score)
    assert result["asr_bleu"] == result["value"] == pytest.approx(
        sacrebleu.corpus_bleu([normalize(i["asr_transcript"]) for i in items], refs).score)
    assert -1 <= result["speaker_similarity"] <= 1
    assert result["termination_rate"] == sum(i["ended"] == "audio_end" for i in items) / 4
    assert all((out / "s2st" / f"{i['id']}.wav").is_file() for i in items)
    table = (out / "results.md").read_text()
    assert "| S2ST | ASR-BLEU (ASR: pocketsphinx)" in table and "speaker similarity to the source" in table


# --------------------------------------------------------------------------------------------
# The general path and user errors
# --------------------------------------------------------------------------------------------
def test_docs_path_trains_on_tokenized_shards_and_refuses_another_vocabulary(tiny_run, train_tokens, tmp_path,
                                                                            capsys, monkeypatch):
    import soda.checkpoints

    loads = []  # checking the data against the model reads no weights: only training loads them
    real = soda.checkpoints.load_model
    monkeypatch.setattr(soda.checkpoints, "load_model", lambda *a, **kw: loads.append(kw.get("weights")) or real(*a, **kw))
    out = tmp_path / "asr"
    assert main(["docs", "--init-from", str(tiny_run / "checkpoints" / "last.ckpt"), "--data",
                 f"speech={train_tokens}", "--out", str(out), "--seq-len", "128", "--batch-tokens", "256",
                 "--max-steps", "2", "--loss-after", "audio_end", "--workers", "0", "--no-export", "--quiet"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["init_from"] == str(out / "init") and (out / "init" / "vocab.json").is_file()  # the .ckpt exported
    assert config["lr"] == 2e-5 and config["schedule"] == "cosine" and config["loss_after"] == "audio_end"
    assert (out / "checkpoints" / "step0000002.ckpt").is_file()  # it trained
    assert loads == [False]
    # the same command line again with --resume auto (a re-queued job) continues the run
    assert main(["docs", "--init-from", str(tiny_run / "checkpoints" / "last.ckpt"), "--data",
                 f"speech={train_tokens}", "--out", str(out), "--seq-len", "128", "--batch-tokens", "256",
                 "--max-steps", "3", "--loss-after", "audio_end", "--workers", "0", "--no-export", "--quiet",
                 "--resume", "auto"]) == 0
    assert sorted(losses(out)) == [0, 1, 2] and (out / "checkpoints" / "step0000003.ckpt").is_file()
    other = tmp_path / "other"
    shutil.copytree(train_tokens, other)
    Vocabulary.build(byte_tokenizer(), 4, 2048).save(other)
    err = _error(capsys, ["docs", "--init-from", str(tiny_run), "--data", str(other), "--out", str(tmp_path / "x")])
    assert "vocabulary" in err and "4 codebooks" in err


def test_user_mistakes_are_one_line_errors(tiny_run, s2st_corpus, tmp_path, capsys):
    err = _error(capsys, ["s2st", "--init-from", str(tiny_run), "--data", str(tmp_path / "nope.tsv"), "--out",
                          str(tmp_path / "r")])
    assert "nope.tsv" in err and "not found" in err
    err = _error(capsys, ["s2st", "--init-from", str(tmp_path / "no-model"), "--data", str(s2st_corpus), "--out",
                          str(tmp_path / "r")])
    assert "no-model" in err
    headerless = tmp_path / "bad.tsv"
    headerless.write_text("id\tsource_audio\ttarget_text\n1\ta.wav\thi\n")
    err = _error(capsys, ["s2st", "--init-from", str(tiny_run), "--data", str(headerless), "--out", str(tmp_path / "r")])
    assert "bad.tsv" in err and "source_text" in err
    assert "--init-from" in _error(capsys, ["s2st", "--data", str(s2st_corpus), "--out", str(tmp_path / "r")])
    assert "no checkpoint" in _error(capsys, ["s2st", "--out", str(tmp_path / "r"), "--resume"])
    assert "--epochs 0: must be positive" in _error(capsys, ["docs", "--init-from", str(tiny_run), "--data",
                                                             str(tmp_path), "--out", str(tmp_path / "r"),
                                                             "--epochs", "0"])
    assert "--grad-clip -1.0: must be at least 0" in _error(capsys, ["s2st", "--init-from", str(tiny_run), "--data",
                                                                     str(s2st_corpus), "--out", str(tmp_path / "r"),
                                                                     "--grad-clip", "-1"])


def test_only_rank_zero_exports_the_initial_checkpoint(tiny_run, tmp_path, monkeypatch):
    """Under torchrun every rank calls init_model_dir; rank 0 exports the .ckpt, the others wait for the export."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    import soda.finetune.prepare as finetune
    from soda.checkpoints import load_model

    vocab = load_model(str(tiny_run), device="cpu").vocab
    ckpt = str(tiny_run / "checkpoints" / "last.ckpt")
    waited = []
    monkeypatch.setattr(finetune, "wait_for", waited.append)
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    assert finetune.init_model_dir(ckpt, tmp_path, vocab) == str(tmp_path / "init")
    assert waited == [tmp_path / "init" / "config.json"] and not (tmp_path / "init").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    assert finetune.init_model_dir(ckpt, tmp_path, vocab) == str(tmp_path / "init")
    assert (tmp_path / "init" / "config.json").is_file() and len(waited) == 1


@pytest.mark.slow
def test_s2st_finetune_under_torchrun_prepares_once_and_trains_on_two_ranks(tiny_run, s2st_corpus, tmp_path):
    """Two processes under torchrun: rank 0 encodes the pairs and exports the .ckpt to RUN/init while rank 1 waits
    for both; then both train one DDP run (CPU, gloo)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "soda.finetune", "s2st", "--init-from", str(tiny_run / "checkpoints" / "last.ckpt"), "--data",
               str(s2st_corpus), "--out", str(out), "--validation-fraction", "0", "--seq-len", "256",
               "--batch-tokens", "1024", "--tokens", "4096", "--workers", "0", "--log-every", "1", "--accelerator",
               "cpu", "--devices", "2", "--strategy", "ddp", "--no-export", "--quiet", "--resume", "auto"]
    done = subprocess.run(command + ["--max-steps", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "2 devices x 2 sequences" in done.stderr
    assert (out / "init" / "config.json").is_file()
    report = json.loads((out / "data_report.json").read_text())
    assert report["pairs"] == len(manifest_rows(s2st_corpus))
    with open(out / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")] == [0, 1]
    # the same command line again (a re-queued job): both ranks find the checkpoint and continue, from RUN/init
    done = subprocess.run(command + ["--max-steps", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert sorted(losses(out)) == [0, 1, 2, 3]


def test_eval_s2st_passes_overwrite_to_soda_eval(monkeypatch, tmp_path):
    import soda.evaluate.cli

    seen = []
    monkeypatch.setattr(soda.evaluate.cli, "evaluate_checkpoint", lambda *a, **kw: seen.append((a, kw)) or 0)
    assert main(["eval-s2st", "runs/x", "--data", "t.tsv", "--out", str(tmp_path), "--overwrite", "--quiet",
                 "--asr", "self", "--limit", "2"]) == 0
    (checkpoint, tasks, data_for, settings, out), options = seen[0]
    assert options == {"overwrite": True} and out == tmp_path and not settings.progress
    assert (checkpoint, tasks, data_for) == ("runs/x", ["s2st"], {"s2st": "t.tsv"})
    assert (settings.s2st_asr, settings.limit, settings.device, settings.s2st_max_seconds) == ("self", 2, "auto", 30.0)
