"""soda-eval and soda-generate on an encoder-projector export (tiny random-init parts, offline, synthetic audio)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from soda.evaluate.cli import main as soda_eval
from soda.generate.cli import main as soda_generate
from tests.test_encoder_projector import _model

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
pytest.importorskip("jiwer")

CHOICES = [["dog", "cat", "bird"], ["red", "green"], ["one", "two", "three"]]


@pytest.fixture(scope="module")
def export(parts, tmp_path_factory):  # noqa: F811
    return _model(parts).save_pretrained(tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three short clips (tones of different pitch and length), an unreadable one, MCQ questions about them (one
    about the unreadable clip) and an ASR directory (LibriSpeech-style same-stem transcripts)."""
    root = tmp_path_factory.mktemp("data")
    asr = root / "asr"
    asr.mkdir()
    clips = []
    for n, (pitch, seconds) in enumerate([(220, 1.0), (440, 0.6), (880, 1.4)]):
        t = np.arange(int(16000 * seconds)) / 16000
        path = asr / f"clip{n}.wav"
        sf.write(path, (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32), 16000)
        (asr / f"clip{n}.txt").write_text(f"a tone number {n}\n")
        clips.append(path)
    bad = asr / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file at all")
    (asr / "broken.txt").write_text("nothing to hear\n")
    questions = [{"id": f"q{n}", "question": f"Which one is it, {n}?", "choices": choices, "answer": choices[n % 2],
                  "audio_path": str(clip), "domain": "sound" if n else "music"}
                 for n, (choices, clip) in enumerate(zip(CHOICES, clips))]
    questions.append({"id": "q-broken", "question": "Which?", "choices": ["x", "y"], "answer": "x",
                      "audio_path": str(bad)})
    mcq = root / "mcq.json"
    mcq.write_text(json.dumps(questions))
    return {"mcq": mcq, "asr": asr, "clips": clips}


@pytest.fixture(scope="module")
def likelihood_run(export, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "likelihood"
    soda_eval([str(export), "--tasks", "mcq,asr", "--data-for", f"mcq={data['mcq']}", "--data-for",
               f"asr={data['asr']}", "--out", str(out), "--quiet"])
    return out


def _results(out):
    return json.loads((out / "results.json").read_text())


def _items(out, task):
    return [json.loads(line) for line in (out / "items" / f"{task}.jsonl").read_text().splitlines()]


def test_results_name_the_family_and_its_trainable_and_total_parameters(likelihood_run, export):
    results = _results(likelihood_run)
    model = results["model"]
    assert model["family"] == "encoder-projector" and model["pooling"] == "stack" and model["lora_rank"] == 8
    assert 0 < model["trainable_parameters"] < model["parameters"]
    from soda.audio_llm import load

    fresh = load(export, trainable=True)  # a trainable copy counts what training changes
    assert fresh.parameter_counts() == {"trainable": model["trainable_parameters"], "total": model["parameters"]}
    assert results["checkpoint"]["digest"] and not results["checkpoint"]["digest"].startswith("name:")
    assert "Encoder-projector model" in (likelihood_run / "results.md").read_text()
    assert (likelihood_run / "report.html").is_file()


def test_mcq_likelihood_reports_the_silence_control_and_skips_the_unreadable_clip(likelihood_run):
    mcq = _results(likelihood_run)["tasks"]["mcq"]
    assert mcq["metric"] == "accuracy (length-normalised log-likelihood)" and mcq["settings"]["mode"] == "likelihood"
    assert (mcq["count"], mcq["skipped_count"], mcq["total"]) == (3, 1, 4)
    assert mcq["skipped"][0]["item"] == "q-broken" and mcq["skipped"][0]["reason"].startswith("audio: ")
    assert mcq["audio_contribution"]["accuracy_silence"] is not None and "accuracy_raw" in mcq
    assert "accuracy_pmi" not in mcq and "permutations" not in mcq  # not measured for this family
    assert set(mcq["by_domain"]) == {"music", "sound"}


def test_likelihood_picks_the_option_the_model_gives_the_highest_mean_log_prob(likelihood_run, export, data):
    from soda.checkpoints import load_encoder_projector
    from tokenize_audio.documents import mcq_instruction

    model = load_encoder_projector(str(export), device="cpu")
    shared = len("<answer>")  # a byte tokenizer: the options' first letters differ, so the tag is what they share
    for row in _items(likelihood_run, "mcq"):
        choices = CHOICES[row["index"]]
        wave = sf.read(data["clips"][row["index"]], dtype="float32")[0]
        asked = [{"instruction": mcq_instruction(f"Which one is it, {row['index']}?", choices),
                  "response": f"<answer>{c}</answer>"} for c in choices]
        for waves, key in (([wave] * len(choices), "scores_norm"), ([np.zeros_like(wave)] * len(choices),
                                                                    "scores_norm_silence")):
            means = [float(lp[shared:].mean()) for lp in model.response_log_probs(asked, waves=waves)]
            np.testing.assert_allclose(row[key], means, atol=1e-4)
        assert row["pick"] == int(np.argmax(row["scores_norm"]))
        assert row["correct"] == (row["pick"] == row["answer"] and sorted(row["scores_norm"])[-1]
                                  > sorted(row["scores_norm"])[-2])


def test_asr_gives_a_wer_and_counts_the_unreadable_clip(likelihood_run):
    asr = _results(likelihood_run)["tasks"]["asr"]
    assert asr["metric"] == "WER (corpus, normalised)" and asr["value"] is not None and asr["value"] >= 0
    assert asr["settings"]["instruction"] == "Transcribe the audio."
    assert (asr["count"], asr["skipped_count"]) == (3, 1) and "broken" in asr["skipped"][0]["item"]
    assert sum(asr["ended"].values()) == 3 and set(asr["ended"]) <= {"text_end", "max_tokens"}
    assert all(isinstance(row["hypothesis"], str) for row in _items(likelihood_run, "asr"))


def test_mcq_generate_is_judged_with_audio_and_with_silence(export, data, tmp_path):
    out = tmp_path / "generated"
    soda_eval([str(export), "--tasks", "mcq", "--data-for", f"mcq={data['mcq']}", "--mcq-mode", "generate",
               "--mcq-max-tokens", "6", "--out", str(out), "--quiet"])
    mcq = _results(out)["tasks"]["mcq"]
    assert mcq["settings"]["mode"] == "generate" and mcq["settings"]["family"] == "encoder-projector"
    assert (mcq["count"], mcq["skipped_count"]) == (3, 1)
    for key in ("accuracy_official", "accuracy_strict", "malformed"):
        assert key in mcq
    assert {"accuracy_silence", "accuracy_silence_strict"} <= set(mcq["audio_contribution"])
    rows = _items(out, "mcq")
    assert all(isinstance(r["response"], str) and isinstance(r["response_silence"], str) for r in rows)
    assert all(r["ended"] in ("text_end", "max_tokens") for r in rows)


def _one_error_line(capsys, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: "), err
    return err[0]


def test_tasks_and_flags_that_do_not_apply_are_one_line_before_loading(export, data, tmp_path, capsys):
    out = tmp_path / "never"
    for argv, words in ((["--tasks", "swuggy"], ["swuggy", "encoder-projector", "mcq and asr"]),
                        (["--tasks", "mcq", "--mcq-permutations", "3"], ["--mcq-permutations", "encoder-projector"]),
                        (["--tasks", "mcq", "--codec", "mimi"], ["--codec", "Whisper"])):
        with pytest.raises(SystemExit) as exit_:
            soda_eval([str(export), *argv, "--out", str(out)])
        assert exit_.value.code == 2
        line = _one_error_line(capsys, "soda-eval")
        assert all(w in line for w in words), line
    assert not out.exists()


def test_two_exports_have_different_fingerprints_and_do_not_share_an_out(parts, export, likelihood_run, data,  # noqa: F811
                                                                          tmp_path, capsys):
    from soda.audio_llm import FORMAT
    from soda.checkpoints import encoder_projector_source, model_fingerprint

    other = _model(parts, seed=1).save_pretrained(tmp_path / "other")
    mine, theirs = model_fingerprint(str(export)), model_fingerprint(str(other))
    assert mine["digest"] != theirs["digest"] and mine == model_fingerprint(str(export.parent))  # RUN/hf: the same
    model = _model(parts, seed=2)
    ckpt = tmp_path / "step1.ckpt"
    torch.save({"soda": {"family": FORMAT, "config": model.config.to_json()},
                "state_dict": {f"model.{k}": v for k, v in model.trainable_state_dict().items()}}, ckpt)
    assert encoder_projector_source(str(ckpt)) == ckpt
    assert model_fingerprint(str(ckpt))["digest"] not in (mine["digest"], f"name:{ckpt}")
    soda_eval([str(ckpt), "--tasks", "mcq", "--data-for", f"mcq={data['mcq']}", "--limit", "1", "--out",
               str(tmp_path / "from-ckpt"), "--quiet"])
    summary = _results(tmp_path / "from-ckpt")["model"]  # loaded frozen: the trainable ones are counted by name
    assert summary["trainable_parameters"] == _results(likelihood_run)["model"]["trainable_parameters"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        soda_eval([str(other), "--tasks", "mcq", "--data-for", f"mcq={data['mcq']}", "--out", str(likelihood_run)])
    assert "another checkpoint" in _one_error_line(capsys, "soda-eval")


def test_soda_generate_answers_instruct_and_asr_in_text_and_refuses_speech(export, data, tmp_path, capsys):
    out, clip = tmp_path / "gen", str(data["clips"][0])
    assert soda_generate([str(export), "instruct", clip, "--instruction", "What do you hear?", "--out", str(out),
                          "--max-text-tokens", "5"]) == 0
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["task"] == "instruct" and isinstance(lines[0]["text"], str)
    assert lines[0]["wav"] is None and lines[0]["ended"] in ("text_end", "max_tokens")
    assert json.loads((out / "summary.json").read_text())["outputs"] == 1
    capsys.readouterr()
    soda_generate([str(export), "instruct", clip, "--instruction", "What do you hear?", "--out", str(out),
                   "--max-text-tokens", "5"])
    assert "1 of 1 requests already done" in capsys.readouterr().err  # resumed: nothing generated again
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"task": "asr", "audio": clip}) + "\n"
                        + json.dumps({"task": "instruct", "audio": str(data["clips"][1]), "text": "Pitch?"}) + "\n")
    assert soda_generate([str(export), "batch", str(requests), "--out", str(tmp_path / "batch"),
                          "--max-text-tokens", "5", "--quiet"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "batch" / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["asr", "instruct"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        soda_generate([str(export), "tts", "Hello there.", "--out", str(tmp_path / "tts")])
    assert exit_.value.code == 2
    line = _one_error_line(capsys, "soda-generate")
    assert "encoder-projector" in line and "text only" in line and "tts" in line
    assert not (tmp_path / "tts").exists()
