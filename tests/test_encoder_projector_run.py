"""`soda-finetune instruct --architecture encoder-projector`: the second family's run, resume, export and merge."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from soda.finetune.cli import main
from tests.conftest import REPO
from tests.test_encoder_projector import parts  # noqa: F401 -- the tiny local Whisper and LLM

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """The synthetic audio-QA set without speech: beeps to count, two tones, text-answerable questions."""
    spec = importlib.util.spec_from_file_location("make_audio_qa", REPO / "demo" / "make_audio_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_set(tmp_path_factory.mktemp("qa"), items=4, test_items=2, seed=0, speech=False)


def family(parts, *extra):
    return ["instruct", "--architecture", "encoder-projector", "--encoder", str(parts / "whisper"), "--llm",
            str(parts / "llm"), "--quiet", "--workers", "0", *extra]


def test_smoke(parts, qa, tmp_path):
    out = tmp_path / "run"
    code = main(family(parts, "--data", str(qa / "instruct.jsonl"), "--out", str(out), "--batch-size", "4",
                       "--epochs", "1", "--validation-fraction", "0.2", "--val-every", "1", "--log-every", "1"))
    assert code == 0
    print(sorted(p.name for p in out.iterdir()))
    print((out / "metrics.csv").read_text())
