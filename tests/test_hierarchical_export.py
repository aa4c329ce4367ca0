"""The hierarchical family's export and loading: soda-train writes RUN/hf (config.json naming model_type
soda_hierarchical, model.safetensors, vocab.json, soda.json), `soda.checkpoints.load_model(..., hierarchical=True)`
reads it, a run directory and a `.ckpt` alike (the same logits and loss as the checkpoint), `soda-train export` writes
any step, soda-generate runs every task on it, and the tools that read only the flat family refuse it in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_args, write_wave

from soda.generate.prompts import ENDINGS
from soda.train.cli import main as train_main

STEPS = 4


@pytest.fixture(scope="module")
def run(train_tokens, tmp_path_factory) -> Path:
    """4 steps of the tiny hierarchical model (checkpoints at steps 2 and 4), exported at the end."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("hierexport") / "run"
    args = tiny_args(train_tokens, out, steps=STEPS, **{"--ckpt-every": "2", "--val-every": "4", "--val-batches": "1",
                                                        "--workers": "0"})
    assert train_main(args + ["--architecture", "hierarchical"]) == 0
    return out


def _batch(vocab, seed: int = 0) -> dict:
    """A step batch of text, markers and whole frames (two documents per window)."""
    from torch.utils.data import default_collate

    from soda.hierarchical import regroup_batch

    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(3):
        ids, docs = [], []
        for doc in range(2):
            text = torch.randint(0, vocab.text_size, (6,), generator=g).tolist()
            frames = [vocab.audio_base + k * vocab.codebook_size + int(torch.randint(0, vocab.codebook_size, (1,),
                                                                                      generator=g))
                      for _ in range(3) for k in range(vocab.n_codebooks)]
            part = [vocab.bos_id, vocab.text_start, *text, vocab.text_end, vocab.audio_start, *frames,
                    vocab.audio_end, vocab.eos_id]
            ids, docs = ids + part, docs + [doc] * len(part)
        items.append({"input_ids": torch.tensor(ids), "doc_ids": torch.tensor(docs), "source": torch.tensor(0)})
    return regroup_batch(default_collate(items), vocab, multiple=16)


def _outputs(model, steps: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        loss, sums = model(steps)
        logits = model.unified_head(model.backbone_hidden(steps["codes"], steps["doc_ids"]))
    return loss, sums, logits


def test_the_run_exports_and_every_form_reloads_with_the_checkpoints_logits_and_loss(run):
    from soda.checkpoints import is_hierarchical, load_model
    from soda.hierarchical import MODEL_TYPE, HierarchicalModel

    hf = run / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["architectures"] == ["HierarchicalModel"]
    for name in ("model.safetensors", "vocab.json", "soda.json", "README.md"):
        assert (hf / name).is_file(), name
    assert json.loads((hf / "soda.json").read_text())["codec"]["spec"] == "mimi:random"

    ckpt = run / "checkpoints" / f"step{STEPS:07d}.ckpt"
    loaded = {name: load_model(str(source), device="cpu", hierarchical=True)
              for name, source in (("export", hf), ("run", run), ("ckpt", ckpt))}
    for got in loaded.values():
        assert is_hierarchical(got) and isinstance(got.model, HierarchicalModel) and not got.model.training
        assert got.codec_spec == "mimi:random" and got.vocab.to_dict() == loaded["ckpt"].vocab.to_dict()
    steps = _batch(loaded["ckpt"].vocab)
    want = _outputs(loaded["ckpt"].model, steps)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(v, p) for (k, v), p in  # trained: not the seeded initial weights
               zip(state.items(), HierarchicalModel(loaded["ckpt"].model.config).state_dict().values()))
    for name in ("export", "run"):
        for a, b in zip(_outputs(loaded[name].model, steps), want):
            assert torch.equal(a, b), name


def test_soda_train_export_writes_any_step(run, capsys):
    from soda.checkpoints import load_model

    assert train_main(["export", str(run), "--step", "2"]) == 0
    assert f"exported {run / 'hf-step2'}" in capsys.readouterr().err
    two = load_model(str(run / "hf-step2"), device="cpu", hierarchical=True)
    ckpt = load_model(str(run / "checkpoints" / "step0000002.ckpt"), device="cpu", hierarchical=True)
    four = load_model(str(run / "hf"), device="cpu", hierarchical=True)
    steps = _batch(two.vocab, seed=1)
    assert torch.equal(_outputs(two.model, steps)[2], _outputs(ckpt.model, steps)[2])
    assert not torch.equal(_outputs(two.model, steps)[0], _outputs(four.model, steps)[0])


def _error(capsys, prog_main, args, prog: str) -> str:
    with pytest.raises(SystemExit) as exc:
        prog_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and len(err.splitlines()) == 1, err
    return last


def test_tools_that_read_only_the_flat_family_refuse_it_in_one_line_and_soda_eval_reads_it(run, train_tokens,
                                                                                           tmp_path):
    import json

    from soda.checkpoints import load_model
    from soda.evaluate.cli import main as eval_main
    from tokenize_audio.errors import SodaError

    for source in (run, run / "hf", run / "checkpoints" / "step0000002.ckpt"):
        with pytest.raises(SodaError, match="a hierarchical model cannot be loaded here yet"):
            load_model(str(source), device="cpu")
        with pytest.raises(SodaError, match="a hierarchical model cannot be loaded here yet"):
            load_model(str(source), device="cpu", weights=False)
    out = tmp_path / "eval"
    assert eval_main([str(run / "hf"), "--tasks", "nll", "--data-for", f"nll={train_tokens}/validation-*.tar",
                      "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["family"] == "hierarchical" and results["tasks"]["nll"]["value"] > 0


def _check_result(line: dict, frame_seconds: float = 1 / 12.5) -> None:
    assert line["ended"] in ENDINGS and isinstance(line["terminated"], bool)
    if line["wav"]:
        wave, sr = sf.read(line["wav"])
        assert sr == 24000 and len(wave) % 1920 == 0 and len(wave) > 0  # whole Mimi frames
        assert abs(len(wave) / sr - line["seconds"]) < 1e-6
        assert line["seconds"] / frame_seconds == pytest.approx(round(line["seconds"] / frame_seconds), abs=1e-3)


def test_soda_generate_tts_and_asr_on_the_export(run, tmp_path, capsys):
    from soda.generate.cli import main as generate_main

    torch.set_num_threads(1)
    out = tmp_path / "tts"
    assert generate_main([str(run / "hf"), "tts", "Hello there.", "--out", str(out), "--max-seconds", "0.6",
                          "--device", "cpu"]) == 0
    line = json.loads((out / "results.jsonl").read_text())
    assert line["task"] == "tts" and line["wav"] and line["generated_tokens"] > 0
    _check_result(line)
    assert json.loads((out / "summary.json").read_text())["outputs"] == 1

    wav = write_wave(tmp_path / "speech.wav", np.random.default_rng(0).uniform(-0.3, 0.3, 24000).astype(np.float32),
                     24000)
    out = tmp_path / "asr"
    assert generate_main([str(run), "asr", str(wav), "--out", str(out), "--max-text-tokens", "5",
                          "--device", "cpu"]) == 0
    line = json.loads((out / "results.jsonl").read_text())
    assert line["task"] == "asr" and line["wav"] is None and isinstance(line["text"], str)
    _check_result(line)
    assert repr(line["text"]) in capsys.readouterr().out


def test_soda_generate_batch_runs_every_task_on_a_checkpoint(run, tmp_path, capsys):
    from soda.generate.cli import main as generate_main

    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    write_wave(tmp_path / "in" / "speech.wav", rng.uniform(-0.3, 0.3, 12000).astype(np.float32), 24000)
    rows = [{"task": "tts", "text": "Hi.", "voice": "in/speech.wav", "voice_text": "Some words.", "id": "hi"},
            {"task": "asr", "audio": "in/speech.wav"},
            {"task": "continue", "audio": "in/speech.wav", "max_seconds": 0.4},
            {"task": "s2st", "audio": "in/speech.wav", "source_language": "fr", "source_text": "Bonjour."},
            {"task": "instruct", "audio": "in/speech.wav", "text": "Describe it."},
            {"task": "tts", "text": "Good day."}]
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "gen"
    ckpt = run / "checkpoints" / f"step{STEPS:07d}.ckpt"
    assert generate_main([str(ckpt), "batch", str(jsonl), "--out", str(out), "--max-seconds", "0.6",
                          "--max-text-tokens", "6", "--batch-size", "4", "--device", "cpu", "--quiet"]) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in results] == [r["task"] for r in rows]
    for r in results:
        _check_result(r)
    assert all(r["wav"] for r in results if r["task"] in ("tts", "continue"))
    assert results[2]["seconds"] <= 0.4 and all(r["seconds"] <= 0.6 for r in results)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == len(rows) and "RANDOM" in summary["codec"] and "termination_rate" in summary
    assert f"{len(rows)} outputs" in capsys.readouterr().err


def test_a_damaged_export_is_one_line(run, tmp_path):
    import shutil

    from soda.checkpoints import load_model
    from tokenize_audio.errors import SodaError

    copy = tmp_path / "hf"
    shutil.copytree(run / "hf", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SodaError, match="model.safetensors: not a loadable weights file"):
        load_model(str(copy), device="cpu", hierarchical=True)
    (copy / "vocab.json").unlink()
    with pytest.raises(SodaError, match="a hierarchical export without vocab.json"):
        load_model(str(copy), device="cpu", hierarchical=True)
