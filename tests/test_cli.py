"""soda-tokenize end to end: shards + manifest, bad input, resume without duplicates, decode, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_wave

from tokenize_audio.cli import main
from tokenize_audio.shards import read_shard
from tokenize_audio.vocab import Vocabulary

BASE = ["--codec", "mimi:random", "--text-tokenizer", "bytes", "--quiet", "--workers", "2"]


def run(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


def read_all(out: Path):
    manifest = json.loads((out / "manifest.json").read_text())
    docs = []
    for split in ("train", "validation"):
        for shard in manifest["shards"][split]:
            docs += [(split, key, ids, meta) for key, ids, meta in read_shard(out / shard)]
    return manifest, docs


@pytest.fixture(scope="module")
def tokenized(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "out"
    text = REPO / "demo" / "corpus" / "text" / "kjv_proverbs.txt"
    assert run(small_corpus, text, "--out", out, *BASE, "--recordings-per-shard", "1",
               "--validation-fraction", "0.3") == 0
    return out


def test_shards_and_manifest(tokenized, small_corpus):
    manifest, docs = read_all(tokenized)
    n_utts = len(list(small_corpus.rglob("*.flac")))
    assert manifest["codec"]["random"] is True and "RANDOM" in manifest["codec"]["label"]
    assert manifest["codebooks"] == 8 and manifest["skipped"] == []
    assert manifest["utterances"] == n_utts
    speech = [d for d in docs if d[3]["kind"] == "speech"]
    texts = [d for d in docs if d[3]["kind"] == "text"]
    assert len(speech) == 4 * 2 and len(texts) > 40  # both formats of every recording; text paragraphs
    assert manifest["documents"] == len(docs)
    vocab = Vocabulary.load(tokenized)
    totals = {"text": 0, "semantic": 0, "acoustic": 0, "special": 0}
    seconds = 0.0
    for split, key, ids, meta in docs:
        assert ids.dtype == np.uint32 and ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
        assert ids.max() < vocab.size
        for k, v in vocab.count_types(ids).items():
            totals[k] += v
        seconds += meta.get("audio_seconds", 0) / len(manifest["formats"]) if meta["kind"] == "speech" else 0
    assert {k: manifest["tokens"][k] for k in totals} == totals
    assert manifest["tokens"]["semantic"] * 7 == manifest["tokens"]["acoustic"]
    assert abs(manifest["audio_seconds"] - seconds) < 0.01
    assert manifest["tokens"]["semantic"] == round(manifest["audio_seconds"] * 12.5) * 2  # 2 formats
    # Both formats of each recording sit on the same side of the split.
    sides = {}
    for split, key, ids, meta in speech:
        sides.setdefault(meta["recording"], set()).add(split)
    assert all(len(s) == 1 for s in sides.values())
    assert manifest["shards"]["validation"] and manifest["shards"]["train"]
    assert not list(tokenized.glob("*.tmp")) and not list(tokenized.glob(".*"))


def test_document_formats_in_shards(tokenized):
    _, docs = read_all(tokenized)
    vocab = Vocabulary.load(tokenized)
    by_rec = {}
    for split, key, ids, meta in docs:
        if meta["kind"] == "speech":
            by_rec.setdefault(meta["recording"], {})[meta["format"]] = (ids, meta)
    for rec, formats in by_rec.items():
        tf, meta = formats["text-first"]
        af, _ = formats["audio-first"]
        assert sorted(tf) == sorted(af)  # the same tokens, in the other order
        assert tf[1] == vocab.text_start and af[1] == vocab.audio_start
        n = len(meta["utterances"])
        assert int(np.sum(tf == vocab.audio_start)) == n == int(np.sum(tf == vocab.text_end))
        # Audio segments hold whole frames.
        starts, ends = np.where(tf == vocab.audio_start)[0], np.where(tf == vocab.audio_end)[0]
        assert all((e - s - 1) % 8 == 0 for s, e in zip(starts, ends))
        first_text = vocab.decode_text(tf[2: np.where(tf == vocab.text_end)[0][0]])
        assert first_text == meta["utterances"][0]["text"]


def test_hf_tokenizer_written(tokenized):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenized / "tokenizer"))
    vocab = Vocabulary.load(tokenized)
    _, docs = read_all(tokenized)
    ids = docs[0][2]
    assert tok(vocab.ids_to_string(ids), add_special_tokens=False).input_ids == [int(i) for i in ids]


def test_rerun_keeps_everything(tokenized, small_corpus, capsys):
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tokenized.glob("*.tar")}
    manifest_before = (tokenized / "manifest.json").read_text()
    text = REPO / "demo" / "corpus" / "text" / "kjv_proverbs.txt"
    assert run(small_corpus, text, "--out", tokenized, *BASE, "--recordings-per-shard", "1",
               "--validation-fraction", "0.3") == 0
    assert f"{len(before)} of {len(before)} kept" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tokenized.glob("*.tar")} == before
    assert (tokenized / "manifest.json").read_text() == manifest_before


def test_resume_after_interruption_without_duplicates(corpus_copy, tmp_path, monkeypatch):
    from tokenize_audio import pipeline

    out = tmp_path / "out"
    args = [corpus_copy, "--out", out, *BASE, "--recordings-per-shard", "1", "--validation-fraction", "0"]
    assert run(*args) == 0
    reference = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    _, ref_docs = read_all(out)

    # Start again in a fresh directory and kill the run while it encodes its third shard.
    out2 = tmp_path / "out2"
    args[2] = out2
    original = pipeline.ShardEncoder.run_speech_shard
    calls = {"n": 0}

    def dying(self, plan, bar):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, plan, bar)

    monkeypatch.setattr(pipeline.ShardEncoder, "run_speech_shard", dying)
    assert run(*args) == 130
    assert sorted(p.name for p in out2.glob("*.tar")) == ["train-speech-00000.tar", "train-speech-00001.tar"]
    assert not (out2 / "manifest.json").exists() and not list(out2.glob("*.tmp"))
    kept = {p.name: p.stat().st_mtime_ns for p in out2.glob("*.tar")}

    monkeypatch.setattr(pipeline.ShardEncoder, "run_speech_shard", original)
    assert run(*args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out2.glob("*.tar") if p.name in kept} == kept
    assert {p.name: p.read_bytes() for p in out2.glob("*.tar")} == reference  # byte-identical
    manifest, docs = read_all(out2)
    keys = [d[1] for d in docs]
    assert len(keys) == len(set(keys)) == len(ref_docs) == 8
    assert manifest["utterances"] == len(list(corpus_copy.rglob("*.flac")))


def test_bad_input_is_skipped_and_listed(corpus_copy, tmp_path):
    rec = corpus_copy / "bad" / "rec1"
    good = sorted(corpus_copy.rglob("*.flac"))[0]
    (rec).mkdir(parents=True)
    (rec / "a-ok.flac").write_bytes(good.read_bytes())
    (rec / "a-ok.txt").write_text("A good one.")
    (rec / "b-corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 8)
    (rec / "b-corrupt.txt").write_text("Corrupt audio.")
    write_wave(rec / "c-empty-text.wav", np.zeros(16000, np.float32))
    (rec / "c-empty-text.txt").write_text("  \n")
    write_wave(rec / "d-zero.wav", np.zeros(0, np.float32))
    (rec / "d-zero.txt").write_text("Zero length.")
    write_wave(rec / "e-nan.wav", np.array([0.1, np.nan] * 8000, np.float32), subtype="FLOAT")
    (rec / "e-nan.txt").write_text("Not a number.")
    write_wave(rec / "f-latin1.wav", np.zeros(16000, np.float32))
    (rec / "f-latin1.txt").write_bytes("Caf\xe9".encode("latin-1"))
    write_wave(rec / "g-short.wav", np.full(800, 0.1, np.float32))  # 50 ms < one 80 ms frame
    (rec / "g-short.txt").write_text("Too short.")
    write_wave(rec / "h-notext.wav", np.zeros(16000, np.float32))
    (rec / "rec1.trans.txt").write_text("i-missing SOMETHING SAID\n")
    manifest_file = tmp_path / "m.jsonl"
    manifest_file.write_text(json.dumps({"audio": "gone.flac", "text": "missing file"}) + "\n")
    out = tmp_path / "out"

    assert run(corpus_copy, manifest_file, "--out", out, *BASE) == 0
    manifest, docs = read_all(out)
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons["b-corrupt.flac"].startswith("unreadable audio")
    assert reasons["c-empty-text.wav"] == "empty transcript"
    assert reasons["d-zero.wav"] == "zero-length audio"
    assert reasons["e-nan.wav"] == "audio contains NaN or Inf samples"
    assert reasons["f-latin1.wav"].startswith("not UTF-8")
    assert reasons["g-short.wav"].startswith("shorter than one codec frame")
    assert reasons["h-notext.wav"].startswith("no transcript")
    assert reasons["i-missing.*"].startswith("listed in a .trans.txt")
    assert reasons["gone.flac"] == "audio file not found"
    assert len(manifest["skipped"]) == 9
    bad_docs = [d for d in docs if d[3]["recording"].endswith("bad/rec1")]
    assert len(bad_docs) == 2 and [u["id"].rsplit("/", 1)[-1] for u in bad_docs[0][3]["utterances"]] == ["a-ok"]


def test_settings_change_needs_overwrite(corpus_copy, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(corpus_copy, "--out", out, *BASE) == 0
    assert run(corpus_copy, "--out", out, *BASE, "--formats", "audio-only") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "other settings (formats)" in errors[0]
    assert run(corpus_copy, "--out", out, *BASE, "--formats", "audio-only", "--overwrite") == 0
    manifest, docs = read_all(out)
    assert {d[3]["format"] for d in docs} == {"audio-only"} and manifest["formats"] == ["audio-only"]


def test_decode_back_to_wav_and_text(tokenized, tmp_path):
    import soundfile as sf

    manifest, docs = read_all(tokenized)
    index = next(i for i, d in enumerate(docs) if d[3]["format"] == "text-first")
    meta = docs[index][3]
    assert run("decode", tokenized, "--document", index, "--out", tmp_path / "dec") == 0
    folder = next((tmp_path / "dec").iterdir())
    wavs = sorted(folder.glob("*-audio.wav"))
    assert len(wavs) == len(meta["utterances"])
    for wav, utt in zip(wavs, meta["utterances"]):
        info = sf.info(str(wav))
        assert info.samplerate == 24000 and abs(info.duration - utt["seconds"]) < 0.09
    lines = (folder / "transcript.txt").read_text().splitlines()
    assert lines == [u["text"] for u in meta["utterances"]]
    assert json.loads((folder / "document.json").read_text())["recording"] == meta["recording"]


@pytest.mark.parametrize("args, message", [
    (["/no/such/dir", "--out", "OUT"], "input /no/such/dir does not exist"),
    (["INPUT", "--out", "OUT", "--codec", "wavtokenizer"], "unknown codec 'wavtokenizer'"),
    (["INPUT", "--out", "OUT", "--formats", "both"], "--formats 'both': unknown both"),
])
def test_user_errors_are_one_line_exit_2(args, message, small_corpus, tmp_path):
    args = [a.replace("INPUT", str(small_corpus)).replace("OUT", str(tmp_path / "o")) for a in args]
    proc = subprocess.run([sys.executable, "-m", "tokenize_audio.cli", *args, "--text-tokenizer", "bytes"],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"soda-tokenize: error: {message}"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_explains_inputs():
    proc = subprocess.run([sys.executable, "-m", "tokenize_audio.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "hf:NAME[:CONFIG]:SPLIT" in proc.stdout and "mimi:random" in proc.stdout
