"""soda-finetune grpo: AudioMCQ's rewards against plugin.py's semantics, group advantages and the GRPO loss by hand,
a tiny SFT'd model whose reward rises under GRPO on the synthetic audio-QA set, resume, and one-line errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO

from soda.finetune.cli import main
from soda.finetune.grpo import (completion_logprobs, group_advantages, grpo_loss, step_prompts, text_ids_mask)
from soda.finetune.rewards import accuracy_reward, format_reward, mcq_rewards

K, CODES = 8, 2048  # mimi:random's codebooks


def _error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("soda-finetune: error: "), err
    return err.splitlines()[-1]


# --------------------------------------------------------------------------------------------
# Rewards (AudioMCQ training_scripts/plugin.py)
# --------------------------------------------------------------------------------------------
SOLUTION = "<answer>three</answer>"


@pytest.mark.parametrize("completion, accuracy, fmt", [
    ("<answer>three</answer>", 1, 1),                       # exact
    ("<answer>Three</answer>", 1, 1),                       # case-insensitive content
    ("  <answer> THREE </answer>\n", 1, 1),                 # stripped, inside and out
    ("<answer>two</answer>", 0, 1),                         # wrong option, right format
    ("three", 1, 0),                                        # no tags: the whole string is the answer
    ("  three ", 1, 0),
    ("three.", 0, 0),
    ("<answer>three</answer><answer>two</answer>", 1, 0),   # two answers: the first counts; format 0
    ("The answer is <answer>three</answer>", 1, 0),         # text before the tags
    ("<answer>three</answer> because", 1, 0),               # text after the tags
    ("<ANSWER>three</ANSWER>", 1, 0),                       # the tag search ignores case, the format does not
    ("<answer>three", 0, 0),                                # unclosed: the whole string is compared
    ("<answer><answer>three</answer>", 0, 0),               # nested: content "<answer>three"
    ("<answer>\nthree\n</answer>", 1, 1),                   # content across lines (re.DOTALL)
    ("", 0, 0),                                             # empty
])
def test_rewards_follow_audiomcq_plugin(completion, accuracy, fmt):
    assert accuracy_reward(completion, SOLUTION) == accuracy
    assert format_reward(completion) == fmt
    assert mcq_rewards(completion, SOLUTION) == {"accuracy": accuracy, "format": fmt,
                                                  "reward": 2.0 * accuracy + 0.5 * fmt}


def test_solution_without_tags_and_empty_answers():
    assert accuracy_reward("<answer>Higher</answer>", "higher") == 1.0  # the solution side falls back too
    assert accuracy_reward("", "") == 1.0 and accuracy_reward("<answer></answer>", "<answer> </answer>") == 1.0
    assert format_reward("<answer></answer>") == 1.0  # the plugin checks the wrapping, not the content


# --------------------------------------------------------------------------------------------
# Advantages and the loss, by hand
# --------------------------------------------------------------------------------------------
def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([2.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt(((2.5 - 1.0) ** 2 + 3 * 0.5 ** 2) / 3)  # Bessel's correction, as torch.std and TRL
    assert adv[:4].tolist() == pytest.approx([1.5 / (std + 1e-4)] + [-0.5 / (std + 1e-4)] * 3)
    assert adv[4:].tolist() == [0.0] * 4  # a group that agrees teaches nothing
    assert float(adv[:4].sum()) == pytest.approx(0, abs=1e-6)


def test_grpo_loss_by_hand_kl_zero_at_the_reference_and_gradient_sign():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    loss, kl = grpo_loss(logp, logp.detach().clone(), adv, mask, beta=0.001)
    assert float(kl) == 0.0 and float(loss.detach()) == pytest.approx((-1.0 + 2.0) / 2)  # -A per sequence, then the mean
    loss.backward()
    # d loss / d logp = -A / (tokens of the sequence) / (sequences): up for A > 0, down for A < 0, 0 on padding
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.0, 1.0, 0.0, 0.0])

    # k3 KL by hand: ref - logp = d; exp(d) - d - 1; its gradient pulls the policy towards the reference
    logp = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-2.0]])
    loss, kl = grpo_loss(logp, ref, torch.zeros(1), torch.ones(1, 1), beta=0.5)
    assert float(kl) == pytest.approx(math.exp(-1) - (-1) - 1)
    assert float(loss.detach()) == pytest.approx(0.5 * (math.exp(-1) + 1 - 1))
    loss.backward()
    assert float(logp.grad) == pytest.approx(0.5 * (1 - math.exp(-1))) and float(logp.grad) > 0  # lower logp


def test_completion_logprobs_match_a_plain_forward_of_each_sequence():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tokenize_audio.vocab import Vocabulary, byte_tokenizer

    vocab = Vocabulary.build(byte_tokenizer(), 2, 16)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab.size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=16)).eval()
    prompts = [[vocab.bos_id, 5, 6, 7, vocab.text_start], [vocab.bos_id, 9, vocab.text_start]]
    completions = [[65, 66, vocab.text_end], [67]]
    allowed = text_ids_mask(vocab, vocab.size, torch.device("cpu"))
    logp, mask = completion_logprobs(model, prompts, completions, allowed, 1.5, vocab.eos_id)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    for b, (p, c) in enumerate(zip(prompts, completions)):
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: len(p) + len(c) - 1]
        logits = logits.masked_fill(~allowed, -math.inf) / 1.5
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(logp[b, :len(c)], expected, atol=1e-5)
    assert logp[1, 1:].tolist() == [0.0, 0.0]


def test_each_step_takes_its_questions_from_a_reshuffled_pass():
    steps = [step_prompts(10, 4, s, seed=3) for s in range(5)]  # 20 draws: two whole passes
    flat = sum(steps, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]
    assert step_prompts(10, 4, 3, seed=3) == steps[3]  # a function of the step: a resumed run asks the same


# --------------------------------------------------------------------------------------------
# A tiny model: SFT (soda-train, loss after the instruction) then GRPO on the audio-required items
# --------------------------------------------------------------------------------------------
def make_audio_qa():
    spec = importlib.util.spec_from_file_location("make_audio_qa", REPO / "demo" / "make_audio_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_instruct_shards(questions: Path, vocab, codec, out: Path) -> Path:
    """The MCQ items of `questions` as instruct documents (AudioMCQ's prompt, `<answer>` response) in one shard
    with a soda-tokenize manifest: what soda-train --loss-after text_end trains an SFT model on."""
    from tokenize_audio.documents import instruct_document, mcq_instruction, mcq_response
    from tokenize_audio.encoding import audio_codes
    from tokenize_audio.pipeline import ShardStats, TokenizeSettings, sample_key, write_manifest
    from tokenize_audio.shards import write_shard
    from tokenize_audio.sources import Corpus

    rows = json.loads(questions.read_text())
    codes = audio_codes(codec, [str(questions.parent / r["audio"]) for r in rows], 5.0, progress=False)
    samples, stats = [], ShardStats()
    for r, c in zip(rows, codes):
        ids, _ = instruct_document(vocab, vocab.codes_to_ids(c), mcq_instruction(r["question"], r["choices"]),
                                   mcq_response(r["answer"]))
        counts = vocab.count_types(ids)
        stats.add_document(counts)
        stats.recordings += 1
        stats.utterances += 1
        stats.audio_seconds += c.shape[1] / codec.frame_rate
        samples.append((sample_key(r["id"], "instruct"), ids, {"recording": r["id"], "format": "instruct",
                                                              "kind": "speech", "tokens": counts}))
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "train-speech-00000.tar", samples)
    sidecar = {"name": "train-speech-00000", "file": "train-speech-00000.tar", "split": "train", "kind": "speech",
               **stats.to_dict()}
    vocab.save(out)
    settings = TokenizeSettings(codec.describe(), vocab.text_tokenizer_source, ("instruct",), 0.0)
    write_manifest(out, codec, vocab, settings, Corpus(), [sidecar])
    return out


@pytest.fixture(scope="module")
def audio_qa(tmp_path_factory) -> Path:
    """demo/make_audio_qa.py without speech: beeps and pitch (audio-required) and text items, 12 clips each."""
    return make_audio_qa().make_set(tmp_path_factory.mktemp("qa") / "set", items=12, test_items=2, seed=0,
                                    speech=False)


@pytest.fixture(scope="module")
def strong(audio_qa) -> Path:
    """The audio-required items: what --split-weak-strong calls strong on this set."""
    rows = [r for r in json.loads((audio_qa / "train.json").read_text()) if r["kind"] == "audio-required"]
    path = audio_qa / "strong.json"
    path.write_text(json.dumps(rows))
    return path


SFT_STEPS = 60


@pytest.fixture(scope="module")
def sft_run(audio_qa, mimi, tmp_path_factory) -> Path:
    """A tiny model taught the answer format briefly by soda-train on instruct documents of every train item."""
    from soda.train.cli import main as train_main
    from tokenize_audio.vocab import Vocabulary, byte_tokenizer

    root = tmp_path_factory.mktemp("sft")
    vocab = Vocabulary.build(byte_tokenizer(), K, CODES)
    data = write_instruct_shards(audio_qa / "train.json", vocab, mimi, root / "tokens")
    fast = root / "fast.yaml"
    fast.write_text(yaml.safe_dump({"betas": [0.9, 0.95], "z_loss": 0.0, "weight_decay": 0.0}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(["--size", "tiny", "--data", str(data), "--config", str(fast), "--seq-len", "512",
                           "--batch-tokens", "2048", "--tokens", str(SFT_STEPS * 2048), "--lr", "1e-2",
                           "--loss-after", "text_end", "--workers", "0", "--ckpt-every", "1000", "--log-every",
                           "10", "--sample-every", "0", "--out", str(root / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def sampled_reward(source: str, questions: Path, n: int = 8, seed: int = 123) -> dict:
    """Mean rewards of `n` answers per question sampled as GRPO samples them (temperature 1.5, top-k 4)."""
    from soda.checkpoints import load_model
    from soda.generate.decode import generate
    from soda.generate.prompts import GenerationSettings, Request
    from tokenize_audio.audio import load_audio
    from tokenize_audio.documents import mcq_instruction, mcq_response

    loaded = load_model(source, device="cpu")
    codec = loaded.load_codec()
    rows = json.loads(questions.read_text())
    requests = []
    for r in rows:
        wave = load_audio(str(questions.parent / r["audio"]), codec.sample_rate)
        wave = wave[: len(wave) // codec.samples_per_frame * codec.samples_per_frame]
        requests += [Request("instruct", audio=wave, text=mcq_instruction(r["question"], r["choices"]))] * n
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = generate(loaded, requests, GenerationSettings(text_temperature=1.5, top_k=4, max_text_tokens=32,
                                                                seed=seed, batch_size=64), codec)
    finally:
        torch.set_num_threads(threads)
    scores = [mcq_rewards(res.text, mcq_response(r["answer"])) for res, r in zip(results, [r for r in rows
                                                                                           for _ in range(n)])]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("reward", "accuracy", "format")}


GRPO_STEPS, STOP_AT = 30, 12


def grpo_args(init: Path | None, data: Path | None, out: Path, *extra) -> list[str]:
    args = ["grpo", "--out", str(out), "--steps", str(GRPO_STEPS), "--prompts-per-step", "4", "--generations", "8",
            "--lr", "1e-3", "--warmup", "0.1", "--max-completion-tokens", "32", "--ckpt-every", "6", "--quiet"]
    return args + (["--init-from", str(init)] if init else []) + (["--data", str(data)] if data else []) + list(extra)


@pytest.fixture(scope="module")
def grpo_run(sft_run, strong, tmp_path_factory) -> Path:
    """GRPO from the SFT run on the strong items, stopped at STOP_AT and resumed to GRPO_STEPS."""
    out = tmp_path_factory.mktemp("grpo") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(grpo_args(sft_run, strong, out, "--max-steps", str(STOP_AT))) == 0
        assert main(["grpo", "--out", str(out), "--resume", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("reward/mean")]


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_tiny_sft_model(sft_run, grpo_run, strong):
    before = sampled_reward(str(sft_run), strong)
    after = sampled_reward(str(grpo_run), strong)  # the run's hf/ export
    print(f"sampled reward before {before}, after {after}")
    assert after["reward"] > before["reward"] + 0.2, (before, after)
    rows = metrics(grpo_run)
    first = np.mean([float(r["reward/mean"]) for r in rows[:10]])
    last = np.mean([float(r["reward/mean"]) for r in rows[-10:]])
    print(f"training reward: first 10 steps {first:.3f}, last 10 {last:.3f}")
    assert last > first
    for key in ("reward/accuracy", "reward/format", "kl", "completion/mean_tokens", "lr", "grad_norm", "train/loss"):
        assert all(r.get(key) not in (None, "") for r in rows), key
    assert float(rows[0]["kl"]) == pytest.approx(0, abs=1e-6)  # the first step samples the reference itself
    assert max(float(r["kl"]) for r in rows) > 0


@pytest.mark.slow
def test_a_stopped_grpo_run_resumes_and_finishes(grpo_run, strong, capsys):
    rows = metrics(grpo_run)
    assert [int(r["step"]) for r in rows] == list(range(GRPO_STEPS))  # one run, continued
    ckpts = grpo_run / "checkpoints"
    assert (ckpts / f"step{STOP_AT:07d}.ckpt").is_file() and (ckpts / f"step{GRPO_STEPS:07d}.ckpt").is_file()
    assert (grpo_run / "hf" / "config.json").is_file() and (grpo_run / "hf" / "vocab.json").is_file()
    report = json.loads((grpo_run / "data_report.json").read_text())
    assert report["questions"] == 24 and report["skipped_count"] == 0
    config = yaml.safe_load((grpo_run / "config.yaml").read_text())
    assert config["task"] == "grpo" and config["steps"] == GRPO_STEPS and config["max_steps"] == STOP_AT
    # the run's settings hold on --resume: a changed recipe is one line, not a silently different run
    err = _error(capsys, ["grpo", "--out", str(grpo_run), "--resume", "--lr", "1"])
    assert "--lr differ" in err and "another --out" in err
    err = _error(capsys, ["grpo", "--out", str(grpo_run), "--resume", "--data", str(strong.parent / "train.json")])
    assert "is not the questions this run was prepared from" in err
    # a finished run is not started again over itself
    assert "already holds a run" in _error(capsys, grpo_args(None, strong, grpo_run, "--init-from", "x"))


@pytest.fixture
def one_thread():
    """A micro model on a shared 2-core machine: one thread is several times faster and far steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_model(mimi, tmp_path_factory) -> Path:
    """A micro Qwen3 with random weights as a Hugging Face directory (vocabulary and codec beside it)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tokenize_audio.vocab import Vocabulary, byte_tokenizer

    out = tmp_path_factory.mktemp("random") / "hf"
    vocab = Vocabulary.build(byte_tokenizer(), K, CODES)
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab.size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(out)
    vocab.save(out)
    (out / "soda.json").write_text(json.dumps({"codec": mimi.describe()}))
    return out


def test_resumed_run_repeats_the_uninterrupted_one_step_for_step(random_model, strong, tmp_path, monkeypatch,
                                                                capsys, one_thread):
    """Questions and samples of a step depend on the step number, and the weights and optimizer come back from the
    checkpoint: stopping at step 2 and resuming gives the rows an uninterrupted run writes."""
    import soda.finetune.rewards

    # a random model never answers right: reward the answer's length instead, so every step has advantages
    monkeypatch.setattr(soda.finetune.rewards, "mcq_rewards",
                        lambda text, solution: {"reward": float(len(text) % 3), "accuracy": 0.0, "format": 0.0})
    common = ["--steps", "4", "--prompts-per-step", "2", "--generations", "3", "--max-completion-tokens", "6",
              "--limit", "6", "--lr", "1e-3", "--ckpt-every", "2", "--quiet"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["grpo", "--init-from", str(random_model), "--data", str(strong), "--out", str(straight),
                 "--no-export", *common]) == 0
    assert main(["grpo", "--init-from", str(random_model), "--data", str(strong), "--out", str(stopped),
                 "--max-steps", "2", *common]) == 0
    assert (stopped / "hf" / "config.json").is_file()  # exported at the stop too, as soda-train does
    # the same command line again (a requeued job, --resume auto) continues from step 2 to the end
    assert main(["grpo", "--init-from", str(random_model), "--data", str(strong), "--out", str(stopped),
                 "--resume", "auto", *common]) == 0
    a, b = metrics(straight), metrics(stopped)
    assert [int(r["step"]) for r in b] == [0, 1, 2, 3]
    keys = ("reward/mean", "reward/format", "kl", "completion/mean_tokens", "train/loss", "lr")
    assert [float(r[k]) for r in a for k in keys] == pytest.approx([float(r[k]) for r in b for k in keys], abs=1e-6)
    assert len({r["reward/mean"] for r in b}) > 1 and float(b[-1]["kl"]) > 0
    assert float(b[0]["kl"]) == 0.0  # the first step's policy is the reference
    assert json.loads((stopped / "data_report.json").read_text())["questions"] == 6
    # the run loads as a model (its export and its checkpoints, whose vocabulary is in RUN/data)
    from soda.checkpoints import load_model

    exported = load_model(str(stopped), device="cpu")
    from_ckpt = load_model(str(stopped / "checkpoints" / "step0000004.ckpt"), device="cpu")
    assert exported.codec_spec == from_ckpt.codec_spec == "mimi:random"
    for (name, x), (_, y) in zip(exported.model.state_dict().items(), from_ckpt.model.state_dict().items()):
        assert torch.equal(x, y), name
    assert "Lightning refused these settings" in _error(capsys, ["grpo", "--init-from", str(random_model), "--data",
                                                                 str(strong), "--out", str(tmp_path / "bad"),
                                                                 "--precision", "bogus", "--quiet"])
    start = load_model(str(random_model), device="cpu").model.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in exported.model.state_dict().items())  # it trained


# --------------------------------------------------------------------------------------------
# Data preparation and user errors
# --------------------------------------------------------------------------------------------
def test_questions_with_unreadable_audio_are_skipped_and_counted(audio_qa, mimi, tmp_path):
    from types import SimpleNamespace

    from soda.finetune.grpo import GRPOSettings, prepare_prompts, read_prompts
    from soda.generate.prompts import Request, build_plan
    from tokenize_audio.audio import load_audio
    from tokenize_audio.documents import mcq_instruction
    from tokenize_audio.errors import SodaError
    from tokenize_audio.vocab import Vocabulary, byte_tokenizer

    rows = json.loads((audio_qa / "train.json").read_text())[:3]
    (audio_qa / "audio" / "broken.wav").write_bytes(b"RIFF not really a wave")
    bad = [dict(rows[0], id="missing", audio="audio/nope.wav"), dict(rows[1], id="broken", audio="audio/broken.wav"),
           dict(rows[2], id="no-answer", answer="purple")]
    questions = audio_qa / "mixed.json"
    questions.write_text(json.dumps(rows + bad))
    vocab = Vocabulary.build(byte_tokenizer(), K, CODES)
    loaded = SimpleNamespace(vocab=vocab)
    report = prepare_prompts(GRPOSettings(data=str(questions)), tmp_path, loaded, mimi, quiet=True)
    assert report["questions"] == 3 and report["skipped_count"] == 3
    reasons = {s["item"]: s["reason"] for s in report["skipped"]}
    assert reasons["missing"].startswith("audio: ") and reasons["broken"].startswith("audio: unreadable")
    assert "not one of the choices" in reasons["no-answer"]
    prompts = read_prompts(tmp_path)
    assert [p["id"] for p in prompts] == [r["id"] for r in rows]
    assert prompts[0]["solution"] == f"<answer>{rows[0]['answer']}</answer>"
    # the prompt is soda-generate's instruct prompt of the same audio and question
    wave = load_audio(str(audio_qa / rows[0]["audio"]), mimi.sample_rate)
    codes = mimi.encode(wave[: len(wave) // mimi.samples_per_frame * mimi.samples_per_frame])
    request = Request("instruct", audio=codes, text=mcq_instruction(rows[0]["question"], rows[0]["choices"]))
    assert prompts[0]["prompt"].tolist() == [int(x) for x in build_plan(vocab, request, {"audio": codes}).prompt]
    assert (tmp_path / "data" / "vocab.json").is_file()
    questions.write_text(json.dumps(bad))
    with pytest.raises(SodaError, match="no usable questions \\(3 skipped"):
        prepare_prompts(GRPOSettings(data=str(questions)), tmp_path / "none", loaded, mimi, quiet=True)
    questions.write_text(json.dumps(rows[:1]))  # too long for --max-length: skipped, the lengths named
    with pytest.raises(SodaError, match="longer than --max-length"):
        prepare_prompts(GRPOSettings(data=str(questions), max_length=100), tmp_path / "long", loaded, mimi,
                        quiet=True)


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "give --data" in _error(capsys, ["grpo", "--init-from", "runs/x", "--out", out])
    assert "give --init-from and --data" in _error(capsys, ["grpo", "--out", out])
    assert "give --out" in _error(capsys, ["grpo", "--init-from", "runs/x", "--data", "q.json"])
    err = _error(capsys, ["grpo", "--init-from", "runs/x", "--data", str(tmp_path / "nope.json"), "--out", out])
    assert "nope.json: no such file" in err
    assert "no checkpoint" in _error(capsys, ["grpo", "--out", out, "--resume"])
    (tmp_path / "q.json").write_text("[]")
    assert "--generations must be at least 2" in _error(capsys, ["grpo", "--init-from", "runs/x", "--data",
                                                                 str(tmp_path / "q.json"), "--out", out,
                                                                 "--generations", "1"])
    assert "--strategy fsdp" in _error(capsys, ["grpo", "--init-from", "runs/x", "--data", str(tmp_path / "q.json"),
                                                "--out", out, "--strategy", "fsdp"])
    assert "no-model" in _error(capsys, ["grpo", "--init-from", str(tmp_path / "no-model"), "--data",
                                         str(tmp_path / "q.json"), "--out", out])


def test_help_explains_the_recipe_and_the_curriculum(capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--generations", "temperature 1.5", "top-k 4", "2.0 x accuracy", "0.5 x format", "--beta",
                   "mcq_strong.json", "soda-finetune instruct", "--resume", "grpo.sh"):
        assert phrase in text, phrase


@pytest.mark.slow
def test_grpo_under_torchrun_splits_each_steps_questions_over_two_ranks(random_model, strong, tmp_path):
    """Two CPU processes (gloo): rank 0 prepares RUN/data while rank 1 waits; each samples its half of the step's
    questions; the metrics are over both; a requeued command line continues the run."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "soda.finetune", "grpo", "--init-from", str(random_model), "--data", str(strong), "--out", str(out),
               "--steps", "3", "--prompts-per-step", "4", "--generations", "2", "--max-completion-tokens", "4",
               "--limit", "8", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-export",
               "--quiet", "--resume", "auto"]
    done = subprocess.run(command + ["--max-steps", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "4 per step x 2 answers" in done.stderr
    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(float(r["completion/mean_tokens"]) <= 4 for r in rows)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [int(r["step"]) for r in metrics(out)] == [0, 1, 2]


@pytest.mark.slow
def test_a_group_sigterm_checkpoints_the_step_and_the_requeue_finishes(random_model, strong, tmp_path):
    """SIGTERM to the whole process group, as SLURM sends it: exit 143 after checkpointing the step; the same
    command line again continues to the end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "soda.finetune", "grpo", "--init-from", str(random_model), "--data", str(strong),
               "--out", str(out), "--steps", "40", "--prompts-per-step", "2", "--generations", "2",
               "--max-completion-tokens", "4", "--limit", "4", "--ckpt-every", "100", "--no-export", "--quiet",
               "--resume", "auto"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    rows = out / "logs" / "version_0" / "metrics.csv"
    started = time.time()
    while not rows.is_file() and proc.poll() is None and time.time() - started < 300:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "pre-empted at step" in err and "Traceback" not in err and "--resume" in err
    step = int(err.split("pre-empted at step ")[1].split(";")[0])
    assert 0 < step < 40 and (out / "checkpoints" / f"step{step:07d}.ckpt").is_file()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [int(r["step"]) for r in metrics(out)] == list(range(40))


def test_other_ranks_take_only_this_launchs_data_or_refusal(tmp_path):
    import os
    import threading
    import time

    from soda.finetune.grpo import wait_for_rank_zero
    from tokenize_audio.errors import SodaError
    from tokenize_audio.shards import atomic_write_text

    stale = time.time() - 600  # an earlier attempt's files
    (tmp_path / "config.yaml").write_text("task: grpo\n")
    (tmp_path / "data_refused.txt").write_text("old reason")
    for name in ("config.yaml", "data_refused.txt"):
        os.utime(tmp_path / name, (stale, stale))
    started = time.time()
    refusal = "--data q.json: no such file"  # written as rank 0 writes it: whole, or not at all
    timer = threading.Timer(1.0, lambda: atomic_write_text(tmp_path / "data_refused.txt", refusal))
    timer.start()
    with pytest.raises(SodaError, match="rank 0 could not prepare the data: --data q.json: no such file"):
        wait_for_rank_zero(tmp_path, started, timeout=30)
    (tmp_path / "config.yaml").write_text("task: grpo\n")
    wait_for_rank_zero(tmp_path, started, timeout=30)  # rank 0's fresh config: go
