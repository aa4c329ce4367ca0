"""Shared fixtures: a small copy of the demo corpus and seeded random codecs (no downloads)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "corpus"
# Four recordings: LibriSpeech-style and same-stem transcripts, 22.05 kHz, and a stereo one.
SMALL_RECORDINGS = [
    "espeak_en_029/espeak_en_029-dan08v02",
    "espeak_en_m3/espeak_en_m3-dan03v04",
    "espeak_en_gb/espeak_en_gb-gen14v01",
    "flite_kal/" + sorted(p.name for p in (DEMO / "speech" / "flite_kal").iterdir())[0],
]


@pytest.fixture(scope="session")
def demo_speech() -> Path:
    assert (DEMO / "speech").is_dir(), "the bundled demo corpus is missing"
    return DEMO / "speech"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A four-recording copy of the demo corpus (read-only by convention; copy it to modify)."""
    root = tmp_path_factory.mktemp("corpus") / "speech"
    for rec in SMALL_RECORDINGS:
        shutil.copytree(DEMO / "speech" / rec, root / rec)
    return root


@pytest.fixture
def corpus_copy(small_corpus, tmp_path) -> Path:
    dst = tmp_path / "speech"
    shutil.copytree(small_corpus, dst)
    return dst


@pytest.fixture(scope="session")
def mimi():
    from tokenize_audio.codecs import load_codec

    return load_codec("mimi:random", 8, "cpu")


@pytest.fixture(scope="session")
def encodec():
    from tokenize_audio.codecs import load_codec

    return load_codec("encodec:random", 8, "cpu")


@pytest.fixture(scope="session")
def demo_waves(demo_speech, mimi):
    """Twelve demo utterances of different lengths, at 24 kHz, cut to whole Mimi frames."""
    from tokenize_audio.audio import load_audio

    files = sorted(demo_speech.rglob("*.flac"))[::20][:12]
    waves = [load_audio(str(f), mimi.sample_rate) for f in files]
    return [w[: len(w) // mimi.samples_per_frame * mimi.samples_per_frame] for w in waves]


def write_wave(path: Path, wave, sr: int = 16000, subtype: str | None = None) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(wave), sr, subtype=subtype)
    return path


@pytest.fixture(scope="session")
def train_tokens(small_corpus, tmp_path_factory) -> Path:
    """Shards of the small corpus plus the demo's KJV text (mimi:random, byte-level text): training data."""
    from tokenize_audio.cli import main as tokenize_main

    out = tmp_path_factory.mktemp("train") / "tokens"
    assert tokenize_main([str(small_corpus), str(DEMO / "text" / "kjv_proverbs.txt"), "--out", str(out),
                          "--codec", "mimi:random", "--text-tokenizer", "bytes", "--quiet"]) == 0
    return out


def tiny_args(data: Path, out: Path, steps: int = 40, **extra) -> list[str]:
    args = {"--size": "tiny", "--seq-len": "128", "--batch-tokens": "1024", "--tokens": str(steps * 1024),
            "--lr": "3e-3", "--workers": "1", "--val-every": "10", "--val-batches": "2", "--ckpt-every": "8",
            "--log-every": "1", "--sample-every": "0", "--out": str(out), "--data": f"speech={data}", **extra}
    flat = []
    for k, v in args.items():
        if v is not None:
            flat += [k] if v == "" else [k, v]
    return flat + ["--data", f"text={data}", "--mix", "speech=0.9,text=0.1"]


@pytest.fixture(scope="session")
def tiny_run(train_tokens, tmp_path_factory) -> Path:
    """A tiny model trained 40 steps on `train_tokens` (soda-train run directory with checkpoints and `hf/`)."""
    from soda.train.cli import main as train_main

    out = tmp_path_factory.mktemp("run") / "full"
    assert train_main(tiny_args(train_tokens, out)) == 0
    return out


@contextlib.contextmanager
def http_server(directory: Path):
    """Serve `directory` over HTTP on a free local port (shards read as a cluster's object store would serve them);
    yields the base URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> Path:
    """RANDOM tiny stand-ins for the encoder-projector family's Whisper and LLM: DIR/whisper-random, DIR/llm-random
    (`soda.audio_llm.random_parts`: a byte tokenizer with a chat template; no downloads)."""
    from soda.audio_llm import random_parts

    root = tmp_path_factory.mktemp("parts")
    random_parts(root)
    return root


@pytest.fixture(scope="module")
def one_thread_per_module():
    """Tiny models on a shared 2-core machine: one torch thread is several times faster and far steadier (a module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread_per_module")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
