"""Samples while training (soda.samples): files and logs at checkpoint steps, training unaffected, failures harmless;
either model family (the hierarchical one decodes with soda.generate.hierarchical)."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import tiny_args

from soda.train.cli import main as train_main
from soda.train.samples import TTS_TEXTS

SHORT = {"AUDIO_SECONDS": 0.4, "CONTINUATION_PROMPT_SECONDS": 0.4, "ASR_MAX_TEXT_TOKENS": 12}
STEPS = dict(steps=8, **{"--ckpt-every": "4", "--val-every": "4", "--no-export": ""})
FAMILIES = {"flat": [], "hierarchical": ["--architecture", "hierarchical"]}


def losses(run):
    import csv

    rows = list(csv.DictReader(open(next(run.glob("logs/version_*/metrics.csv")))))
    return [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss")]


def event_tags(run) -> set[str]:
    """The plugin names in the run's TensorBoard event files (read as TFRecords with tensorboardX's protos)."""
    from tensorboardX.proto import event_pb2

    plugins = set()
    for path in run.glob("tensorboard/version_*/events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at: at + 8])
            event = event_pb2.Event.FromString(data[at + 12: at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                plugins.add("audio" if value.HasField("audio") else "image" if value.HasField("image")
                            else value.metadata.plugin_data.plugin_name or "other")
    return plugins


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def sampled(family, train_tokens, tmp_path_factory):
    import soda.train.samples

    out = tmp_path_factory.mktemp(f"samples_{family}") / "run"
    with pytest.MonkeyPatch.context() as mp:  # short outputs: a fast test (CPU decoding is a token at a time)
        for name, value in SHORT.items():
            mp.setattr(soda.train.samples, name, value)
        assert train_main(tiny_args(train_tokens, out, **STEPS, **{"--sample-every": "4"}) + FAMILIES[family]) == 0
    return out


def test_samples_are_written_at_checkpoint_steps_with_their_endings(sampled, mimi):
    import soundfile as sf

    from soda.generate.prompts import ENDINGS

    for step in (4, 8):
        folder = sampled / "samples" / f"step_{step:07d}"
        records = json.loads((folder / "samples.json").read_text())
        kinds = [r["kind"] for r in records]
        assert kinds.count("tts") == len(TTS_TEXTS) and "continuation" in kinds and "asr" in kinds
        for r in records:
            assert set(r) == {"name", "kind", "prompt", "text", "wav", "seconds", "ended"}
            assert r["ended"] in ENDINGS and r["prompt"]
            if r["kind"] == "asr":
                assert r["wav"] is None and r["ended"] in ("text_end", "max_tokens")
            elif r["wav"]:
                assert (folder / r["wav"]).stat().st_size > 44 and r["seconds"] > 0
                frames = r["seconds"] * mimi.frame_rate  # audio comes in whole frames, in either family
                assert frames == pytest.approx(round(frames), abs=0.05)
                assert sf.info(str(folder / r["wav"])).frames == round(frames) * mimi.samples_per_frame
        assert any(r["wav"] for r in records)
    assert {"audio", "image", "text"} <= event_tags(sampled)


def test_sampling_leaves_the_losses_unchanged(sampled, family, train_tokens, tmp_path):
    plain = tmp_path / "plain"
    assert train_main(tiny_args(train_tokens, plain, **STEPS, **{"--sample-every": "0"}) + FAMILIES[family]) == 0
    assert not (plain / "samples").exists()
    assert losses(plain) == losses(sampled) and len(losses(plain)) == 8


def test_a_sampling_failure_is_one_warning_and_training_finishes(train_tokens, tmp_path, monkeypatch, capsys):
    import soda.generate.decode

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(soda.generate.decode, "generate", broken)
    out = tmp_path / "run"
    assert train_main(tiny_args(train_tokens, out, steps=4, **{"--ckpt-every": "2", "--val-every": "4",
                                                                "--no-export": "", "--sample-every": None})) == 0
    err = capsys.readouterr().err
    assert "samples: warning: step 2: no samples (RuntimeError: decoder exploded); training goes on" in err
    assert (out / "checkpoints" / "step0000004.ckpt").exists()


def test_samples_reach_wandb_when_it_is_on(train_tokens, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import soda.train.samples

    for name, value in SHORT.items():
        monkeypatch.setattr(soda.train.samples, name, value)
    monkeypatch.setattr(soda.train.samples, "TTS_TEXTS", TTS_TEXTS[:1])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb.init in this process exports WANDB_SERVICE; later tests' soda-train subprocesses would inherit it and
    # log through this process's service: removed again after the test (and the service torn down below)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    out = tmp_path / "wb"
    assert train_main(tiny_args(train_tokens, out, steps=2, **{"--ckpt-every": "2", "--val-every": "4",
                                                                "--no-export": "", "--wandb": "soda-test",
                                                                "--sample-every": None})) == 0  # the default
    import wandb

    wandb.finish()  # in-process, the run's file is complete once the run is finished
    wandb.teardown()
    data = next((out / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"samples/tts_0" in data and b"samples/asr_text" in data
    assert (out / "samples" / "step_0000002" / "samples.json").is_file()
