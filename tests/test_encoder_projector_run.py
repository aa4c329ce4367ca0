"""`soda-finetune instruct --architecture encoder-projector`: the second family's run on the same manifests as the
native path: data report, exact resume, learning above chance, export and merge, refusals."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from soda.finetune.cli import main
from soda.finetune.encoder_projector import step_plan
from tests.conftest import REPO

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _make_set(out, items, test_items):
    spec = importlib.util.spec_from_file_location("make_audio_qa", REPO / "demo" / "make_audio_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_set(out, items=items, test_items=test_items, seed=0, speech=False)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """The synthetic audio-QA set without speech: beeps to count, two tones, text-answerable questions."""
    return _make_set(tmp_path_factory.mktemp("qa"), 4, 2)


def family(parts, *extra):
    return ["instruct", "--architecture", "encoder-projector", "--encoder", str(parts / "whisper-random"), "--llm",
            str(parts / "llm-random"), "--quiet", "--workers", "0", *extra]


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()  # progress lines may come before the error
    assert err[-1].startswith("soda-finetune: ") and not any("Traceback" in line for line in err), err
    return err[-1]


def trainable(ckpt) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def trained(parts, tmp_path_factory):
    """A tiny model instruction-tuned on the MCQ set (stopped at step 90 and resumed to the end, 180 steps)."""
    root = tmp_path_factory.mktemp("trained")
    data = _make_set(root / "qa", 12, 6)
    out = root / "run"
    argv = family(parts, "--data", f"mcq={data / 'train.json'}", "--out", str(out), "--batch-size", "12",
                  "--epochs", "60", "--lr", "1e-2", "--warmup", "0.1", "--lora-targets", ALL_LINEAR,
                  "--lora-dropout", "0", "--validation-fraction", "0", "--ckpt-every", "1000")
    assert main([*argv, "--max-steps", "90"]) == 0
    assert main([*argv, "--resume"]) == 0
    return data, out


def test_the_run_prepares_the_items_with_a_report_and_resumes_exactly(parts, qa, tmp_path, capsys):
    """Items: one clip unreadable (skipped, counted), one a renamed copy of an evaluation clip (refused by default,
    found by its waveform). Then a run stopped at step 3 and resumed equals one that ran straight, LoRA
    dropout and gradient accumulation included (dropout seeded per step), with a loader worker in one and none in
    the other."""
    rows = [json.loads(line) for line in (qa / "instruct.jsonl").read_text().splitlines()]
    (qa / "audio" / "broken.wav").write_bytes(b"RIFF not really")
    shutil.copy(qa / "audio" / "test-pitch-000.wav", qa / "audio" / "renamed.wav")
    extra = [dict(rows[0], id="broken", audio="audio/broken.wav"), dict(rows[1], id="copy", audio="audio/renamed.wav")]
    manifest = tmp_path / "tasks.jsonl"
    manifest.write_text("".join(json.dumps({**r, "audio": str(qa / r["audio"])}) + "\n" for r in rows + extra))
    base = ["--data", str(manifest), "--batch-size", "2", "--micro-batch", "1", "--epochs", "4",
            "--validation-fraction", "0.2",
            "--val-every", "2", "--val-batches", "1", "--log-every", "1", "--ckpt-every", "1000"]
    line = one_line_error(capsys, family(parts, *base, "--out", str(tmp_path / "refused"),
                                         "--eval-sets", str(qa / "test.json")))
    assert "1 training items share a clip with the evaluation sets" in line and "(waveform)" in line
    report = json.loads((tmp_path / "refused" / "data_report.json").read_text())
    assert report["contamination"]["overlaps"][0]["item"] == "copy"
    assert report["skipped_reasons"] == {"audio": 1} and report["skipped"][0]["item"] == "broken"

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    drop = [*base, "--eval-sets", str(qa / "test.json"), "--contamination", "drop"]
    assert main(family(parts, *drop, "--out", str(straight))) == 0
    report = json.loads((straight / "data_report.json").read_text())
    total = report["total"]
    assert total["items"] == len(rows) and total["train_items"] + total["validation_items"] == len(rows)
    assert total["validation_items"] > 0 and report["skipped_count"] == 1
    assert main(family(parts, *drop, "--out", str(stopped), "--max-steps", "3")) == 0
    assert sorted(p.name for p in (stopped / "checkpoints").glob("step*.ckpt")) == ["step0000003.ckpt"]
    resumed = family(parts, "--out", str(stopped), "--resume")
    resumed[resumed.index("--workers") + 1] = "1"
    assert main(resumed) == 0
    final = sorted((straight / "checkpoints").glob("step*.ckpt"))[-1]
    assert final.name == sorted((stopped / "checkpoints").glob("step*.ckpt"))[-1].name
    assert int(final.stem[4:]) > 3  # the resume ran on (the held-out clips, hence the steps, depend on the paths)
    manifest.write_text(manifest.read_text().replace("higher", "lower", 1))  # an edited --data file
    assert "changed since" in one_line_error(capsys, family(parts, "--out", str(stopped), "--resume"))
    a, b = trainable(final), trainable(stopped / "checkpoints" / final.name)
    assert set(a) == set(b) and all("lora_" in k or ".projector." in k for k in a)  # trainable tensors only
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], trainable(stopped / "checkpoints" / "step0000003.ckpt")[k]) for k in a)
    import csv

    with open(straight / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train/loss", "val/loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    done = int(final.stem[4:])  # the clips held out depend on their paths, so the step count varies a little
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [s for s in range(done) if s % 2 == 1]  # --val-every 2


@pytest.mark.slow
def test_a_tiny_model_learns_the_synthetic_set_above_chance_and_its_export_reloads(trained, tmp_path, capsys):
    """Held-out questions scored by soda-eval (likelihood of each option's `<answer>OPTION</answer>`): the
    audio-required kinds (beeps to count, which tone is higher) above chance, and below it with silence; the
    export, the run's checkpoint and the merged model give the same logits."""
    from soda.audio_llm import Collate
    from soda.checkpoints import load_encoder_projector
    from soda.evaluate.cli import main as eval_main
    from tokenize_audio.documents import mcq_instruction, mcq_response

    data, out = trained
    assert eval_main([str(out), "--tasks", "mcq", "--data-for", f"mcq={data / 'test.json'}", "--out",
                      str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["model"]["family"] == "encoder-projector"
    mcq = result["tasks"]["mcq"]
    domains = mcq["by_domain"]
    audio = [domains[k] for k in ("beeps", "pitch")]
    accuracy = sum(d["accuracy"] * d["count"] for d in audio) / sum(d["count"] for d in audio)
    chance = sum(d["chance"] * d["count"] for d in audio) / sum(d["count"] for d in audio)
    assert accuracy >= chance + 0.2, domains
    assert domains["text"]["accuracy"] >= 0.8, domains
    silent = sum(d["accuracy_silence"] * d["count"] for d in audio) / sum(d["count"] for d in audio)
    assert silent < accuracy, domains

    model = load_encoder_projector(str(out))
    row = json.loads((data / "test.json").read_text())[0]
    items = [{"audio": str(data / row["audio"]), "instruction": mcq_instruction(row["question"], row["choices"]),
              "response": mcq_response(c)} for c in row["choices"]]
    checkpoint = load_encoder_projector(str(sorted((out / "checkpoints").glob("step*.ckpt"))[-1]))
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = load_encoder_projector(str(tmp_path / "merged"))
    batch = Collate(model.tokenizer, model.feature_extractor, model.config)(items)
    with torch.no_grad():
        logits = model(**batch).logits
        assert torch.equal(checkpoint(**batch).logits, logits)
        torch.testing.assert_close(merged(**batch).logits, logits, atol=1e-4, rtol=1e-4)  # W + BA, summed once
    line = one_line_error(capsys, ["merge", str(out), "--out", str(tmp_path / "merged")])
    assert "not empty" in line


def test_bad_settings_are_one_line_errors(parts, qa, tmp_path, capsys):
    data = ["--data", str(qa / "instruct.jsonl")]
    cases = [
        (family(parts, *data, "--out", str(tmp_path / "a"), "--strategy", "deepspeed"), "use auto, ddp or fsdp"),
        (family(parts, *data, "--out", str(tmp_path / "b"), "--seq-len", "512"), "--seq-len does not apply"),
        (family(parts, *data, "--out", str(tmp_path / "c"), "--pooling", "max"), "pooling 'max'"),
        (family(parts, "--out", str(tmp_path / "d")), "give --data"),
        (["instruct", "--init-from", "x", *data, "--out", str(tmp_path / "e"), "--llm", "y"],
         "--llm applies to --architecture encoder-projector"),
        (family(parts, *data, "--out", str(tmp_path / "f"), "--resume"), "--resume"),
        (["merge", str(tmp_path), "--out", str(tmp_path / "m")], "not an encoder-projector export"),
    ]
    for argv, expected in cases:
        assert expected in one_line_error(capsys, argv), argv


def test_the_step_plan_is_whole_passes_or_weighted_draws_and_depends_on_the_seed_alone():
    sources = ["a"] * 6 + ["b"] * 2
    plan = step_plan(sources, None, 4, 6, seed=1)
    assert plan.shape == (6, 4)
    for epoch in plan.reshape(3, 8):
        assert sorted(epoch) == list(range(8))  # each pass takes every item once
    assert np.array_equal(plan, step_plan(sources, None, 4, 6, seed=1))
    assert not np.array_equal(plan, step_plan(sources, None, 4, 6, seed=2))
    weighted = step_plan(sources, {"a": 0.5, "b": 0.5}, 8, 250, seed=0).ravel()
    share_b = np.isin(weighted, [6, 7]).mean()
    assert 0.45 < share_b < 0.55  # b's 2 items take half the slots (their natural share is a quarter)
    counts = np.bincount(weighted[np.isin(weighted, [6, 7])])[6:]
    assert abs(int(counts[0]) - int(counts[1])) <= 1  # a source's items come in whole passes


def _subprocess_env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_under_torchrun_two_ranks_split_each_step_and_rank_zero_prepares_and_exports(parts, qa, tmp_path):
    """Two CPU processes (gloo, DDP): rank 0 reads the clips and writes the item lists while rank 1 waits; each
    takes half of every step's items; one export; a requeued command line (--resume auto) goes on."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "soda.finetune", *family(parts, "--data", str(qa / "instruct.jsonl"), "--out", str(out),
                                        "--batch-size", "4", "--epochs", "2", "--validation-fraction", "0",
                                        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                                        "--log-every", "1", "--resume", "auto")]
    done = subprocess.run(command + ["--max-steps", "2"], capture_output=True, text=True, env=_subprocess_env(),
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "4 items = 2 devices x 2 x 1 accumulation" in done.stderr
    assert done.stderr.count("reading the clips") == 1  # rank 0 only
    done = subprocess.run(command, capture_output=True, text=True, env=_subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    steps = sorted(p.name for p in (out / "checkpoints").glob("step*.ckpt"))
    assert steps[0] == "step0000002.ckpt" and int(steps[-1][4:11]) > 2
    assert (out / "hf" / "audio_llm.json").is_file()


@pytest.mark.slow
def test_a_group_sigterm_checkpoints_the_step_and_the_requeue_finishes(parts, qa, tmp_path):
    """SIGTERM to the whole process group, as SLURM sends it: exit 143 after a checkpoint; the same command line
    again (with --resume auto) continues to the end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "soda.finetune", *family(parts, "--data", str(qa / "instruct.jsonl"), "--out",
                                                               str(out), "--batch-size", "2", "--epochs", "200",
                                                               "--ckpt-every", "1000", "--resume", "auto")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_subprocess_env(), start_new_session=True)
    deadline = time.time() + 300
    while not list((out / "logs").rglob("metrics.csv")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "pre-empted at step" in err and "--resume" in err
    saved = sorted((out / "checkpoints").glob("step*.ckpt"))
    assert len(saved) == 1
    done = subprocess.run(command[:-2] + ["--resume", "auto", "--max-steps", str(int(saved[0].stem[4:]) + 2)],
                          capture_output=True, text=True, env=_subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(sorted((out / "checkpoints").glob("step*.ckpt"))) == 2


@pytest.mark.slow
def test_fsdp_over_two_ranks_resumes_exactly_and_exports_whole_tensors(parts, qa, tmp_path):
    """--strategy fsdp on two CPU processes (gloo, FSDP2): sharded checkpoints hold only the trainable shards; a run
    stopped at step 2 and resumed exports the same adapter and projector as one that ran straight, and the export
    loads and answers."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from soda.checkpoints import is_sharded, load_encoder_projector
    from tokenize_audio.errors import SodaError

    def run(out, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                   "soda.finetune", *family(parts, "--data", str(qa / "instruct.jsonl"), "--out", str(out),
                                            "--batch-size", "4", "--epochs", "1.5", "--validation-fraction", "0",
                                            "--accelerator", "cpu", "--devices", "2", "--strategy", "fsdp",
                                            "--lora-dropout", "0", *extra)]
        done = subprocess.run(command, capture_output=True, text=True, env=_subprocess_env(), timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(straight)
    run(stopped, "--max-steps", "2")
    first = stopped / "checkpoints" / "step0000002.ckpt"
    assert is_sharded(first)
    with pytest.raises(SodaError, match="sharded"):
        load_encoder_projector(str(first))
    run(stopped, "--resume", "yes")
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(straight / "hf" / name)), load_file(str(stopped / "hf" / name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    adapter = load_file(str(straight / "hf" / "adapter/adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained, whole (not one shard)
    model = load_encoder_projector(str(straight))
    assert isinstance(model.generate([{"audio": str(qa / "audio" / "test-pitch-000.wav"),
                                       "instruction": "Higher or lower?"}], max_new_tokens=3)[0], str)
