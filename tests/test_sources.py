"""Input kinds: directory trees, JSONL manifests (segments), HF datasets saved locally, text; audio loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_wave

from tokenize_audio.audio import load_audio
from tokenize_audio.errors import SkipItem, SodaError
from tokenize_audio.sources import read_hf_dataset, read_inputs, read_manifest, scan_directory


def test_directory_recordings_in_file_order(small_corpus):
    corpus = scan_directory(small_corpus)
    assert not corpus.skipped
    recordings = {}
    for u in corpus.utterances:
        recordings.setdefault(u.recording, []).append(u)
    assert len(recordings) == 4
    for rec, utts in recordings.items():
        names = [u.audio.rsplit("/", 1)[-1] for u in utts]
        assert names == sorted(names) and rec.startswith("speech/")
    # LibriSpeech-style transcripts are read too (upper case, from *.trans.txt).
    dan = recordings["speech/espeak_en_029/espeak_en_029-dan08v02"]
    trans = (small_corpus / "espeak_en_029/espeak_en_029-dan08v02")
    if list(trans.glob("*.trans.txt")):
        assert dan[0].text.isupper()
    assert all(u.text.strip() == u.text and u.text for u in corpus.utterances)


def test_directory_without_audio_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SodaError, match="no audio files"):
        scan_directory(tmp_path)


def test_manifest_segments_and_recordings(tmp_path):
    sr = 16000
    t = np.arange(sr * 3) / sr
    write_wave(tmp_path / "long.wav", 0.3 * np.sin(2 * np.pi * 220 * t), sr)
    rows = [
        {"audio": "long.wav", "text": "second part", "start": 1.5, "end": 3.0},
        {"audio": "long.wav", "text": "first part", "start": 0.0, "end": 1.5, "id": "u1"},
        {"audio": "missing.wav", "text": "nothing"},
        {"audio": "long.wav", "text": "   "},
        {"audio": "long.wav", "text": "bad", "start": -1},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    corpus = read_manifest(tmp_path / "m.jsonl")
    ordered = sorted(corpus.utterances, key=lambda u: u.order)
    assert [u.text for u in ordered] == ["first part", "second part"]
    assert {u.recording for u in ordered} == {"long.wav"}
    assert ordered[0].id == "u1"
    reasons = sorted(s["reason"] for s in corpus.skipped)
    assert reasons == sorted(["audio file not found", "empty transcript", "bad 'start': -1",
                              "not valid JSON (Expecting property name enclosed in double quotes)"])
    wave = load_audio(ordered[1].audio, 24000, ordered[1].start, ordered[1].end)
    assert len(wave) == 36000  # 1.5 s at 24 kHz


def test_load_audio_resamples_and_mixes_down(tmp_path):
    stereo = np.stack([np.full(16000, 0.5), np.full(16000, 0.1)], axis=1)
    write_wave(tmp_path / "s.wav", stereo, 16000)
    wave = load_audio(str(tmp_path / "s.wav"), 24000)
    assert wave.dtype == np.float32 and len(wave) == 24000
    assert abs(float(np.median(wave)) - 0.3) < 1e-3


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"RIFF....not really a wave file" * 10), "unreadable audio"),
    (lambda p: write_wave(p, np.zeros(0, np.float32), 16000), "zero-length"),
    (lambda p: write_wave(p, np.array([0.1, np.nan, 0.2] * 1000, np.float32), 16000, "FLOAT"), "NaN"),
    (lambda p: None, "not found"),
])
def test_bad_audio_is_a_skip(tmp_path, make, reason):
    path = tmp_path / "x.wav"
    make(path)
    with pytest.raises(SkipItem, match=reason):
        load_audio(str(path), 24000)


def test_hf_dataset_saved_locally(tmp_path, small_corpus):
    datasets = pytest.importorskip("datasets")
    files = sorted(small_corpus.rglob("*.flac"))[:5]
    ds = datasets.Dataset.from_dict(
        {"audio": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
         "sentence": [f"utterance {i}" for i in range(5)],
         "chapter_id": [1, 1, 1, 2, 2]},
        features=datasets.Features({"audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                                    "sentence": datasets.Value("string"), "chapter_id": datasets.Value("int64")}),
    ).cast_column("audio", datasets.Audio())  # an Arrow cast: stores the FLAC bytes as an Audio column
    assert type(ds.features["audio"]).__name__ == "Audio"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    corpus = read_hf_dataset(f"hf:{tmp_path / 'ds'}:train")
    assert [u.text for u in corpus.utterances] == [f"utterance {i}" for i in range(5)]
    assert [u.recording for u in corpus.utterances] == ["1", "1", "1", "2", "2"]
    wave = load_audio(corpus.utterances[0].audio, 24000)
    np.testing.assert_allclose(wave, load_audio(str(files[0]), 24000), atol=1e-6)
    with pytest.raises(SodaError, match="no split 'test'"):
        read_hf_dataset(f"hf:{tmp_path / 'ds'}:test")
    with pytest.raises(SodaError, match="expected hf:NAME:SPLIT"):
        read_hf_dataset("hf:only")
    with pytest.raises(SodaError, match="no column 'words'"):
        read_hf_dataset(f"hf:{tmp_path / 'ds'}:train", text_column="words")


def test_text_inputs(tmp_path):
    (tmp_path / "t.txt").write_text("First paragraph\nstill first.\n\n\nSecond one.\n")
    (tmp_path / "t.jsonl").write_text('{"text": "json doc"}\n{"text": ""}\n')
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    corpus = read_inputs([str(tmp_path / "t.txt"), str(tmp_path / "t.jsonl"), str(tmp_path / "bad.txt")])
    assert [d.text for d in corpus.texts] == ["First paragraph still first.", "Second one.", "json doc"]
    assert sorted(s["reason"] for s in corpus.skipped) == ["empty or missing 'text'", "not UTF-8 text (byte 3)"]


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(SodaError, match="does not exist"):
        read_inputs([str(tmp_path / "nowhere")])
