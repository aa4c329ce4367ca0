"""soda-tokenize against careless and hostile input (issue 14, items 7-12): empty validation splits,
truncated audio, long files, output permissions, shards that carry pickles or path escapes."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO, SMALL_RECORDINGS, write_wave

from tokenize_audio.audio import load_audio
from tokenize_audio.cli import main as tokenize_main
from tokenize_audio.errors import SkipItem, SodaError
from tokenize_audio.shards import atomic_directory, atomic_file, atomic_write_bytes, read_shard
from tokenize_audio.sources import HFAudio


def _tiny_corpus(root: Path) -> Path:
    """Three recordings of two short demo utterances each (same-stem .txt transcripts)."""
    for rec in SMALL_RECORDINGS[:3]:
        src = DEMO / "speech" / rec
        dst = root / Path(rec).name
        dst.mkdir(parents=True)
        listed = dict(line.split(" ", 1) for t in src.glob("*.trans.txt") for line in t.read_text().splitlines())
        for flac in sorted(src.glob("*.flac"))[:2]:
            shutil.copy(flac, dst / flac.name)
            text = flac.with_suffix(".txt").read_text() if flac.with_suffix(".txt").is_file() else listed[flac.stem]
            (dst / f"{flac.stem}.txt").write_text(text)
    return root


def _tokenize(corpus: Path, out: Path, *extra: str) -> int:
    return tokenize_main([str(corpus), "--out", str(out), "--codec", "mimi:random", "--text-tokenizer", "bytes",
                          "--quiet", "--workers", "1", *extra])


@pytest.fixture(scope="module")
def tiny_tokens(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    corpus = _tiny_corpus(root / "speech")
    assert _tokenize(corpus, root / "tokens") == 0
    return root / "tokens"


# --------------------------------------------------------------------------------------------
# Item 7: an empty validation split is reported as empty
# --------------------------------------------------------------------------------------------
def test_validation_split_whose_recordings_are_all_skipped_is_empty_and_warned(tmp_path, capsys):
    from soda.train.sources import resolve_sources
    from tokenize_audio.documents import validation_recordings

    corpus = _tiny_corpus(tmp_path / "speech")
    ids = {f"speech/{d.name}": d for d in corpus.iterdir()}
    (held,) = validation_recordings(ids, 0.002)
    for flac in ids[held].glob("*.flac"):
        flac.write_bytes(b"not audio at all" * 100)  # found by the scan, skipped when read

    out = tmp_path / "tokens"
    assert _tokenize(corpus, out) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"]["validation"] == [] and manifest["shards_by_kind"]["speech"]["validation"] == []
    assert all(s["split"] == "train" for s in manifest["shard_stats"])
    assert not list(out.glob("validation-*.tar"))
    assert "1 train (4 documents), 0 validation (0 documents)" in printed
    assert "warning: the validation split is empty (every held-out item was skipped)" in printed
    assert {s["reason"].split(":")[0] for s in manifest["skipped"]} == {"unreadable audio"}

    # A re-run keeps the empty plan (nothing re-encoded, no empty shard appears).
    assert _tokenize(corpus, out) == 0
    assert "(2 of 2 kept from an earlier run)" in capsys.readouterr().out
    assert not list(out.glob("validation-*.tar"))

    # soda reads a manifest without validation shards: a source with nothing to validate on.
    sources, _ = resolve_sources([str(out)], [], {}, None)
    assert [len(s.validation) for s in sources] == [0] and all(len(s.train) == 1 for s in sources)


# --------------------------------------------------------------------------------------------
# Item 8: truncated audio is skipped with its reason (or kept with --keep-truncated)
# --------------------------------------------------------------------------------------------
def _truncated_wav(path: Path, seconds: float = 2.0, holds: float = 0.62, sr: int = 16000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    write_wave(path, 0.3 * np.sin(2 * np.pi * 220 * t), sr, "PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: 44 + int(holds * sr) * 2])  # the header still promises `seconds`
    return path


def test_truncated_wav_is_skipped_with_both_lengths(tmp_path):
    path = _truncated_wav(tmp_path / "cut.wav")
    with pytest.raises(SkipItem, match=r"^truncated audio \(header says 2.00 s, file holds 0.62 s\)$"):
        load_audio(str(path), 24000)
    assert len(load_audio(str(path), 24000, keep_truncated=True)) == int(0.62 * 24000)
    # A segment inside the audio that is there is fine; one reaching past it is not.
    assert len(load_audio(str(path), 24000, 0.1, 0.5)) == int(0.4 * 24000)
    with pytest.raises(SkipItem, match="truncated audio"):
        load_audio(str(path), 24000, 0.5, 1.5)
    # The same bytes inside a Hugging Face dataset row.
    row = HFAudio("ds", [{"audio": {"bytes": path.read_bytes(), "path": None}}])
    with pytest.raises(SkipItem, match="truncated audio"):
        load_audio(row, 24000)


def test_whole_wav_is_not_called_truncated(tmp_path):
    for subtype in ("PCM_16", "PCM_24", "FLOAT"):
        path = write_wave(tmp_path / f"{subtype}.wav", np.zeros((16000, 2)), 16000, subtype)  # stereo too
        assert len(load_audio(str(path), 16000)) == 16000
    # A WAV streamed through a pipe has a placeholder size in its header: length unknown, not truncated.
    path = write_wave(tmp_path / "piped.wav", np.zeros(16000), 16000, "PCM_16")
    data = bytearray(path.read_bytes())
    assert data[36:40] == b"data"
    data[40:44] = (0xFFFFFFFF).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert len(load_audio(str(path), 16000)) == 16000


def test_tokenize_skips_truncated_audio_unless_kept(tmp_path):
    corpus = _tiny_corpus(tmp_path / "speech")
    victim = sorted(corpus.rglob("*.flac"))[0]
    _truncated_wav(victim.with_suffix(".wav"))
    victim.unlink()

    assert _tokenize(corpus, tmp_path / "skip") == 0
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["utterances"] == 5
    assert [(Path(s["path"]).name, s["reason"]) for s in manifest["skipped"]] == [
        (victim.with_suffix(".wav").name, "truncated audio (header says 2.00 s, file holds 0.62 s)")]

    assert _tokenize(corpus, tmp_path / "keep", "--keep-truncated") == 0
    manifest = json.loads((tmp_path / "keep" / "manifest.json").read_text())
    assert manifest["utterances"] == 6 and manifest["skipped"] == []


# --------------------------------------------------------------------------------------------
# Item 9: long audio is encoded in bounded chunks
# --------------------------------------------------------------------------------------------
def _long_wave(demo_waves) -> np.ndarray:
    wave = np.concatenate(demo_waves)  # about 28 s: longer than Mimi's 10 s attention window
    return wave[: len(wave) // 1920 * 1920]


def _spy_on_encoder(monkeypatch, model) -> list[int]:
    lengths: list[int] = []
    original = model.encode

    def encode(input_values, *args, **kwargs):
        lengths.append(input_values.shape[-1])
        return original(input_values, *args, **kwargs)

    monkeypatch.setattr(model, "encode", encode)
    return lengths


def test_long_audio_is_encoded_in_chunks_with_one_pass_codes_mimi(mimi, demo_waves, monkeypatch):
    wave = _long_wave(demo_waves)
    assert len(wave) > 20 * 24000
    one_pass = mimi.encode(wave)  # the default chunk (60 s) holds it whole

    monkeypatch.setattr(mimi, "encode_chunk_seconds", 1.7)  # rounded down to 21 frames
    assert mimi.chunk_samples == 21 * 1920
    lengths = _spy_on_encoder(monkeypatch, mimi.model)
    chunked = mimi.encode_batch([wave, demo_waves[0][: 1920 * 5]])
    np.testing.assert_array_equal(chunked[0], one_pass)
    np.testing.assert_array_equal(chunked[1], mimi.encode(demo_waves[0][: 1920 * 5]))
    assert max(lengths) <= mimi.chunk_samples and len(lengths) >= len(wave) // mimi.chunk_samples


def test_long_audio_is_encoded_in_chunks_encodec(encodec, demo_waves, monkeypatch):
    # transformers keeps no streaming state for EnCodec (LSTM): chunks re-encode a left context instead,
    # and codes agree with one pass except rare near-ties (as batched and one-by-one encoding do).
    wave = _long_wave(demo_waves)[: 10 * 24000]
    one_pass = encodec.encode(wave)
    monkeypatch.setattr(encodec, "encode_chunk_seconds", 2.0)
    lengths = _spy_on_encoder(monkeypatch, encodec.model)
    chunked = encodec.encode(wave)
    assert chunked.shape == one_pass.shape
    assert np.mean(chunked == one_pass) > 0.99
    assert max(lengths) <= encodec.chunk_samples == 2 * 24000 and len(lengths) >= 5


def test_chunk_length_flag(tmp_path, tiny_tokens):
    corpus = _tiny_corpus(tmp_path / "speech")
    assert _tokenize(corpus, tmp_path / "chunked", "--encode-chunk-seconds", "0.5") == 0  # 6 frames a chunk
    shards = sorted(p.name for p in tiny_tokens.glob("*.tar"))
    assert shards == sorted(p.name for p in (tmp_path / "chunked").glob("*.tar"))
    for name in shards:
        chunked, whole = list(read_shard(tmp_path / "chunked" / name)), list(read_shard(tiny_tokens / name))
        assert [k for k, _, _ in chunked] == [k for k, _, _ in whole]
        for (_, ids, _), (_, expected, _) in zip(chunked, whole):
            np.testing.assert_array_equal(ids, expected)
    with pytest.raises(SystemExit) as err:
        _tokenize(corpus, tmp_path / "bad", "--encode-chunk-seconds", "0")
    assert err.value.code == 2


# --------------------------------------------------------------------------------------------
# Item 10: outputs honour the umask
# --------------------------------------------------------------------------------------------
@pytest.fixture
def umask():
    """`umask(mask)` sets the process umask for this test only."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_tokenize_outputs_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    corpus = _tiny_corpus(tmp_path / "speech")
    umask(mask)
    assert _tokenize(corpus, tmp_path / "tokens") == 0
    modes = _modes(tmp_path / "tokens")
    names = {Path(n).name for n in modes}
    assert {"manifest.json", "settings.json", "vocab.json", "text_tokenizer.json", "tokenizer",
            "tokenizer_config.json", "train-speech-00000.tar", "train-speech-00000.json"} <= names
    wrong = {n: oct(m) for n, m in modes.items()
             if m != (dir_mode if (tmp_path / n).is_dir() else file_mode)}
    assert not wrong, f"umask {mask:o}: {wrong}"
    assert not [n for n in names if n.endswith(".tmp")]


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_helpers_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with atomic_file(tmp_path / "b.bin") as f:
        f.write(b"y")
    with atomic_directory(tmp_path / "d") as d:
        (d / "inside.txt").write_text("z")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "d" / "inside.txt").stat().st_mode) == file_mode
    assert os.umask(mask) == mask  # reading the umask left it as it was


def test_atomic_file_writes_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "ckpt.bin"
    with atomic_file(target) as f:
        f.write(b"first")
        assert f.name != str(target) and Path(f.name).parent == target.parent  # beside it, not in $TMPDIR
        assert not target.exists()
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write(b"half of the second")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt.bin"]  # the temporary file is gone


# --------------------------------------------------------------------------------------------
# Items 11 and 12: shards are data (no unpickling) and cannot place files outside --out
# --------------------------------------------------------------------------------------------
class _CreatesFile:
    """Unpickling this opens (creates) `path`: what a crafted shard member could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _rewrite_shard(shard: Path, edit_meta=None, extra: dict[str, bytes] | None = None) -> None:
    """Rewrite `shard` with each document's JSON passed through `edit_meta` and `extra` members added to
    every document (suffix -> bytes) and as a sample of their own."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    out = []
    for name, data in members:
        key, _, suffix = name.partition(".")
        if suffix == "json" and edit_meta:
            data = json.dumps(edit_meta(json.loads(data))).encode()
        out.append((name, data))
        if suffix == "json":
            out += [(f"{key}.{ext}", payload) for ext, payload in (extra or {}).items()]
    out += [(f"zzz.{ext}", payload) for ext, payload in (extra or {}).items()]
    with tarfile.open(shard, "w") as tar:
        for name, data in out:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shards_are_never_unpickled(tmp_path, tiny_tokens):
    tokens = tmp_path / "tokens"
    shutil.copytree(tiny_tokens, tokens)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(marker))
    shard = tokens / "train-speech-00000.tar"
    _rewrite_shard(shard, extra={"pyd": payload, "pkl": payload, "pickle": payload, "pth": payload})

    try:
        docs = list(read_shard(shard))
    finally:
        assert not marker.exists(), "a shard member was unpickled"
    assert [k for k, _, _ in docs] == [k for k, _, _ in read_shard(tiny_tokens / shard.name)]
    assert all(ids.dtype == np.uint32 and isinstance(meta, dict) for _, ids, meta in docs)

    assert tokenize_main(["decode", str(shard), "--out", str(tmp_path / "decoded"), "--count", "2"]) == 0
    assert not marker.exists()
    assert len(list((tmp_path / "decoded").glob("doc-*/document.json"))) == 2


def test_tokens_member_that_needs_pickle_is_refused(tmp_path, tiny_tokens):
    tokens = tmp_path / "tokens"
    shutil.copytree(tiny_tokens, tokens)
    shard = tokens / "train-speech-00000.tar"
    buf = io.BytesIO()
    np.save(buf, np.array([_CreatesFile(tmp_path / "pwned")], dtype=object), allow_pickle=True)
    with tarfile.open(shard, "w") as tar:
        for name, data in (("doc.tokens.npy", buf.getvalue()), ("doc.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SodaError, match="doc is unreadable"):
        list(read_shard(shard))
    assert not (tmp_path / "pwned").exists()


def test_decode_writes_nothing_outside_out(tmp_path, tiny_tokens):
    tokens = tmp_path / "work" / "tokens"
    shutil.copytree(tiny_tokens, tokens)
    shard = tokens / "train-speech-00000.tar"
    _rewrite_shard(shard, edit_meta=lambda m: m | {"format": "x/../../escaped/../../../escaped"})
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "work" / "out"
    assert tokenize_main(["decode", str(shard), "--out", str(out), "--count", "2"]) == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == out or out in p.parents for p in created), sorted(map(str, created))
    assert sorted(p.name for p in out.iterdir()) == ["doc-000000-x_escaped_escaped", "doc-000001-x_escaped_escaped"]
