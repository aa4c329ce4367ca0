"""soda-finetune instruct: the instruction document token for token and its loss mask, the row layouts it reads
(instruction, MCQ, free-form QA) and the rows it skips, the mixture (caps, temperature), the data report (total vs
unique hours), the contamination check (file id and audio-token hash; refuse, warn, drop), and a tiny model that
learns the synthetic audio-QA set."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO

from soda.finetune.cli import main
from soda.finetune.instruct_data import (cap_items, parse_caps, prepare_instruct_data, read_items,
                                         temperature_weights)
from soda.generate.prompts import Request, build_plan
from soda.train.data import loss_mask
from tokenize_audio.documents import instruct_document, mcq_instruction, mcq_response
from tokenize_audio.errors import SodaError
from tokenize_audio.vocab import Vocabulary, byte_tokenizer

sys.path.insert(0, str(REPO / "demo"))
from make_audio_qa import make_set  # noqa: E402

FAST = {"betas": [0.9, 0.95], "z_loss": 0.0, "weight_decay": 0.0}  # a 2M-parameter model moves in a minute


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> Path:
    """The synthetic audio-QA set: beeps, pitch, text-answerable (and spoken digits when espeak-ng is here)."""
    return make_set(tmp_path_factory.mktemp("qa"), items=12, test_items=4, seed=0,
                    speech=shutil.which("espeak-ng") is not None)


@pytest.fixture(scope="module")
def vocab(mimi):
    return Vocabulary.build(byte_tokenizer(), 8, mimi.codebook_size)


def test_instruct_document_is_token_exact_and_its_loss_mask_scores_the_response_only(vocab):
    codes = np.arange(24).reshape(8, 3) % vocab.codebook_size
    audio = vocab.codes_to_ids(codes)
    instruction = mcq_instruction("How many beeps?", ["one", "two"])
    assert instruction == ("How many beeps? Please choose the answer from the following options: ['one', 'two']. "
                           "Output the final answer in <answer> </answer>.")
    response = mcq_response(" two ")
    assert response == "<answer>two</answer>"
    ids, start = instruct_document(vocab, audio, instruction, response)
    text = lambda s: list(vocab.encode_text(s))  # noqa: E731
    expected = ([vocab.bos_id, vocab.audio_start, *audio, vocab.audio_end, vocab.text_start, *text(instruction),
                 vocab.text_end, vocab.text_start, *text(response), vocab.text_end, vocab.eos_id])
    assert ids.dtype == np.uint32 and list(ids) == expected
    assert ids[start] == vocab.text_start and vocab.decode_text(ids[start + 1:-2]) == response
    mask = loss_mask(ids.astype(np.int64), vocab.text_end)
    assert np.flatnonzero(mask).tolist() == list(range(start, len(ids)))  # <|text_start|> response <|text_end|> EOS
    plan = build_plan(vocab, Request("instruct", audio=codes, text=instruction), {"audio": codes})
    assert plan.prompt == expected[:start + 1] and plan.phases[0].mode == "text"


def test_mcq_likelihood_in_the_instruct_format_scores_the_documents_own_answer_tokens(vocab):
    """--mcq-format instruct: prefix + the right option is the instruction document up to `</answer>`."""
    from types import SimpleNamespace

    from soda.evaluate.mcq import Item, _option, _question
    from soda.evaluate.tasks import EvalSettings

    ctx = SimpleNamespace(vocab=vocab, settings=EvalSettings(mcq_format="instruct"))
    item = Item("q", "How many beeps?", ["one", "two", "three"], 1, "x.wav", None, {})
    codes = np.arange(16).reshape(8, 2) % vocab.codebook_size
    audio = vocab.codes_to_ids(codes)
    prefix = [vocab.bos_id, vocab.audio_start, *audio, vocab.audio_end, vocab.text_start]
    scored = prefix + list(_question(ctx, item, [0, 1, 2])) + list(_option(ctx, "two"))
    ids, _ = instruct_document(vocab, audio, mcq_instruction(item.question, item.choices), mcq_response("two"))
    assert scored == list(ids[:-2])  # all but <|text_end|> EOS
    reordered = vocab.decode_text(_question(ctx, item, [2, 0, 1]))
    assert "['three', 'one', 'two']" in reordered and reordered.endswith("<answer>")


def _write(path: Path, rows, jsonl: bool = True) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


def test_rows_of_every_layout_become_items_and_bad_rows_are_skipped_with_reasons(qa, tmp_path):
    wav = str(qa / "audio" / "train-beeps-000.wav")
    rows = [{"id": "i1", "audio": wav, "instruction": "Count the beeps.", "response": "two", "task": "beeps"},
            {"id": "m1", "audio_path": wav, "question": "How many?", "choices": ["one", "two"], "answer": "B",
             "task": "beeps"},
            {"id": "m2", "audio": wav, "question": "Which?", "choice_a": "red", "choice_b": "blue",
             "answer_gt": "blue", "source": "mmsu"},
            {"id": "q1", "audio": wav, "question": "What do you hear?", "answer": "beeps"},
            {"id": "bad1", "instruction": "No audio.", "response": "x"},
            {"id": "bad2", "audio": wav, "instruction": "No response."},
            {"id": "bad3", "audio": wav, "question": "Q?", "choices": ["a", "b"], "answer": "c"},
            {"id": "i1", "audio": wav, "instruction": "Again.", "response": "dup"}]
    file = _write(tmp_path / "rows.jsonl", rows)
    file.write_text(file.read_text() + "{not json\n")
    items, skipped, hashes = read_items([f"mix={file}"])
    by_id = {i.id: i for i in items}
    assert set(by_id) == {"i1", "m1", "m2", "q1"} and by_id["i1"].response == "two"
    assert by_id["m1"].instruction == mcq_instruction("How many?", ["one", "two"])
    assert by_id["m1"].response == "<answer>two</answer>" and by_id["m2"].response == "<answer>blue</answer>"
    assert by_id["m2"].source == "mmsu" and by_id["i1"].source == "mix"  # a row's source field wins
    assert by_id["q1"].instruction == "What do you hear?" and by_id["q1"].response == "beeps"
    reasons = {s["item"]: s["reason"] for s in skipped}
    assert reasons["rows.jsonl:5"] == "no audio" and "no response" in reasons["rows.jsonl:6"]
    assert "not one of the choices" in reasons["rows.jsonl:7"] and "duplicate id i1" in reasons["rows.jsonl:8"]
    assert reasons["rows.jsonl:9"] == "not valid JSON" and len(skipped) == 5
    assert len(hashes[f"mix={file}"]) == 64
    with pytest.raises(SodaError, match="no such file"):
        read_items([str(tmp_path / "missing.json")])


def test_a_dataset_moved_elsewhere_holds_out_the_same_clips_and_keeps_its_order(qa, tmp_path):
    """The held-out clips and the shards' order come from each clip's path relative to its --data file: a copy of the
    set elsewhere (another machine, another run directory) splits and trains alike; they hashed absolute paths."""
    from soda.finetune.instruct_data import held_out_clips, shard_order

    moved = shutil.copytree(qa, tmp_path / "elsewhere" / "qa")
    runs = []
    for root in (qa, moved):
        items, _, _ = read_items([f"qa={root / 'train.json'}"])
        held = held_out_clips(items, 0.25)
        assert 0 < len(held) < len({i.clip for i in items})
        runs.append(([i.id for i in items if i.clip in held], [i.id for i in shard_order(items, seed=3)]))
    assert runs[0] == runs[1]
    assert runs[0][1] != [i.id for i in shard_order(read_items([str(qa / "train.json")])[0], seed=4)]


def test_caps_and_temperature_sampling(qa):
    items, _, _ = read_items([str(qa / "train.json")])
    kept, dropped = cap_items(items, parse_caps("5"), seed=1)
    assert len(kept) == 5 and dropped == {"train": len(items) - 5}
    assert [i.id for i in cap_items(items, {"train": 5}, seed=1)[0]] == [i.id for i in kept]  # seeded, stable
    assert [i.id for i in cap_items(items, {"train": 5}, seed=2)[0]] != [i.id for i in kept]
    with pytest.raises(SodaError, match="--cap names other"):
        cap_items(items, {"other": 1}, seed=0)
    with pytest.raises(SodaError, match="NAME=N"):
        parse_caps("a=b")
    tokens = {"big": 900, "small": 100}
    assert temperature_weights(tokens, 1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    assert temperature_weights(tokens, 2.0) == pytest.approx({"big": 30 / 40, "small": 10 / 40})
    assert temperature_weights(tokens, 1e9) == pytest.approx({"big": 0.5, "small": 0.5})


def test_report_counts_total_and_unique_hours_and_checks_contamination(qa, vocab, mimi, tmp_path):
    """A clip asked about twice counts twice in hours, once in unique hours; a training clip that is an evaluation
    clip under another name is found by its audio tokens, one with the same file name by its file id."""
    train = json.loads((qa / "train.json").read_text())[:6]
    free = [{"id": f"{r['id']}-free", "audio": r["audio"], "instruction": "Describe.", "response": r["answer"]}
            for r in train[:3]]
    evaluation = tmp_path / "eval"
    (evaluation / "audio").mkdir(parents=True)
    shutil.copy(qa / train[0]["audio"], evaluation / "audio" / "renamed.wav")  # same audio, another name
    shutil.copy(qa / "audio" / "test-pitch-000.wav", evaluation / "audio" / Path(train[1]["audio"]).name)  # same name
    eval_rows = [dict(train[0], id="e0", audio="audio/renamed.wav"), dict(train[1], id="e1")]
    eval_file = _write(evaluation / "eval.json", eval_rows, jsonl=False)
    specs = [f"mcq={_write(qa / 'six.json', train, jsonl=False)}", f"free={_write(qa / 'free.jsonl', free)}"]
    settings = dict(caps={}, seed=0, validation_fraction=0.0, items_per_shard=4, eval_sets=[str(eval_file)],
                    progress=False)
    report = prepare_instruct_data(specs, tmp_path / "data", vocab, mimi, contamination="warn", **settings)
    seconds = {r["id"]: 1.3 if r["task"] in ("beeps", "text") else 1.0 for r in train}
    mcq, fr = report["sources"]["mcq"], report["sources"]["free"]
    assert mcq["items"] == 6 and fr["items"] == 3 and mcq["unique_clips"] == 6
    assert report["total"]["hours"] == pytest.approx(
        (sum(seconds.values()) + sum(seconds[r["id"]] for r in train[:3])) / 3600, abs=2e-4)
    assert report["total"]["unique_hours"] == pytest.approx(sum(seconds.values()) / 3600, abs=2e-4)
    found = {(f["source"], f["item"], f["by"], f["eval_item"]) for f in report["contamination"]["overlaps"]}
    assert found == {("mcq", train[0]["id"], "audio tokens", "e0"), ("free", f"{train[0]['id']}-free", "audio tokens",
                                                                    "e0"),
                     ("mcq", train[1]["id"], "file id", "e1"), ("free", f"{train[1]['id']}-free", "file id", "e1")}
    assert report["contamination"]["overlapping_items"] == 4
    manifest = json.loads((tmp_path / "data" / "mcq" / "manifest.json").read_text())
    assert manifest["documents"] == 6 and (tmp_path / "data" / "mcq" / "vocab.json").is_file()
    dropped = prepare_instruct_data(specs, tmp_path / "dropped", vocab, mimi, contamination="drop", **settings)
    assert dropped["total"]["items"] == 5 and dropped["skipped_reasons"] == {"in an evaluation set": 4}

    sidecars = sorted((tmp_path / "data" / "mcq").glob("*-speech-*.json"))  # a re-run keeps the finished shards
    stamps = [p.stat().st_mtime_ns for p in sidecars]
    broken = qa / "audio" / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave")
    extra = _write(qa / "extra.jsonl", [{"id": "x", "audio": "audio/broken.wav", "instruction": "?", "response": "!"}])
    again = prepare_instruct_data(specs + [f"extra={extra}"], tmp_path / "data", vocab, mimi, contamination="warn",
                                  **settings)
    assert sidecars and [p.stat().st_mtime_ns for p in sidecars] == stamps
    assert "extra" not in again["sources"] and again["total"]["items"] == 9
    assert [s["reason"].split(":")[0] for s in again["skipped"]] == ["audio"] and again["skipped"][0]["item"] == "x"


@pytest.mark.slow
def test_cli_refuses_contaminated_data_with_one_line_naming_the_items(tiny_run, qa, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["instruct", "--init-from", str(tiny_run), "--data", str(qa / "train.json"), "--eval-sets",
              str(qa / "train.json"), "--out", str(tmp_path / "run"), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("soda-finetune: error: ") and "share a clip with the evaluation sets" in err
    assert re.search(r"train/(\S+) = train/\1 \(file id\)", err) and "--contamination drop" in err
    assert f"{len(json.loads((qa / 'train.json').read_text()))} training items share a clip" in err
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["contamination"]["overlapping_items"] > 0
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(SystemExit):
        main(["instruct", "--init-from", str(tiny_run), "--out", str(tmp_path / "r2")])
    assert "give --data" in capsys.readouterr().err

    data = qa / "editable.json"  # --contamination warn trains anyway; a --data file edited since is refused
    shutil.copy(qa / "train.json", data)
    out = tmp_path / "warned"
    common = ["--seq-len", "512", "--batch-tokens", "1024", "--workers", "0", "--no-export", "--quiet"]
    assert main(["instruct", "--init-from", str(tiny_run), "--data", str(data), "--eval-sets", str(qa / "train.json"),
                 "--contamination", "warn", "--out", str(out), "--max-steps", "1", *common]) == 0
    assert "warning: " in capsys.readouterr().err
    data.write_text(data.read_text().replace('"four"', '"4"', 1))
    with pytest.raises(SystemExit):
        main(["instruct", "--out", str(out), "--resume", "--max-steps", "2", *common])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume" in err and str(data) in err and "changed since" in err


@pytest.fixture(scope="module")
def tuned(tiny_run, qa, tmp_path_factory) -> Path:
    """tiny_run instruction-tuned on the synthetic set (MCQ and free-form sources), stopped and resumed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("instruct") / "run"
    fast = out.parent / "fast.yaml"
    fast.write_text(yaml.safe_dump(FAST))
    args = ["instruct", "--init-from", str(tiny_run), "--data", f"mcq={qa / 'train.json'}", "--data",
            f"free={qa / 'instruct.jsonl'}", "--eval-sets", str(qa / "test.json"), "--out", str(out), "--config",
            str(fast), "--validation-fraction", "0", "--seq-len", "512", "--batch-tokens", "2048", "--lr", "1e-2",
            "--warmup", "0.1", "--epochs", "32", "--workers", "0", "--log-every", "1", "--ckpt-every", "60",
            "--quiet"]
    try:
        assert main(args + ["--max-steps", "60"]) == 0  # as if stopped there
        steps = -(-json.loads((out / "data_report.json").read_text())["train_tokens"] // 2048)
        assert steps > 60
        assert main(["instruct", "--out", str(out), "--resume", "--max-steps", str(steps), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_a_tiny_model_learns_the_synthetic_audio_qa_set(tuned, qa):
    report = json.loads((tuned / "data_report.json").read_text())
    assert report["contamination"]["overlapping_items"] == 0 and set(report["sources"]) == {"mcq", "free"}
    import csv

    with open(tuned / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) > 60 and np.mean(losses[-5:]) < 0.1 * np.mean(losses[:5])
    config = yaml.safe_load((tuned / "config.yaml").read_text())
    assert config["loss_after"] == "text_end" and set(config["mix"]) == {"mcq", "free"}
    # asked as soda-eval's generate mode asks (greedy, AudioMCQ's prompt), scored by the official and strict scorers
    from soda.evaluate.cli import main as eval_main

    out = tuned.parent / "eval-generate"
    assert eval_main([str(tuned), "--tasks", "mcq", "--data-for", f"mcq={qa / 'train.json'}", "--mcq-mode",
                      "generate", "--mcq-max-tokens", "32", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())["tasks"]["mcq"]
    assert result["value"] > 0.8 and result["accuracy_strict"] > 0.8, result
    rows = [json.loads(line) for line in (out / "items" / "mcq.jsonl").read_text().splitlines()]
    kinds = {i["id"]: i["kind"] for i in json.loads((qa / "train.json").read_text())}
    for kind in ("audio-required", "text-answerable"):
        mine = [r for r in rows if kinds[r["id"]] == kind]
        assert np.mean([r["correct_strict"] for r in mine]) > 0.7, (kind, [r["response"] for r in mine])
    assert all(r["response"].startswith("<answer>") for r in rows)


def test_soda_generate_instruct_answers_in_text_and_needs_its_instruction(tiny_run, qa, tmp_path, capsys):
    from soda.generate.cli import main as generate_main

    clip = str(qa / "audio" / "train-beeps-000.wav")
    assert generate_main([str(tiny_run), "instruct", clip, "--instruction", "Count the beeps.", "--out",
                          str(tmp_path / "o"), "--max-text-tokens", "6", "--quiet"]) == 0
    line = json.loads((tmp_path / "o" / "results.jsonl").read_text())
    assert line["task"] == "instruct" and line["wav"] is None and line["ended"] in ("text_end", "max_tokens")
    capsys.readouterr()
    for argv in ([str(tiny_run), "instruct", clip], [str(tiny_run), "asr", clip, "--instruction", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            generate_main(argv + ["--out", str(tmp_path / "p")])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "soda-generate: error: --instruction goes with the instruct task, which needs it")


@pytest.mark.slow
def test_weak_strong_split_labels_text_answerable_items_weak_and_audio_required_ones_strong(tuned, qa, tmp_path):
    """AudioMCQ's filter on the tuned model (likelihood, --mcq-format instruct): asked with silence, it still answers
    the questions whose words give the answer, and falls to guessing on those that need the clip."""
    from soda.evaluate.cli import main as eval_main

    out = tmp_path / "eval"
    assert eval_main([str(tuned), "--tasks", "mcq", "--data-for", f"mcq={qa / 'train.json'}", "--mcq-format",
                      "instruct", "--split-weak-strong", "--out", str(out), "--quiet"]) == 0
    kind = {i["id"]: i["kind"] for i in json.loads((qa / "train.json").read_text())}
    weak = [kind[i["id"]] for i in json.loads((out / "mcq_weak.json").read_text())]
    strong = [kind[i["id"]] for i in json.loads((out / "mcq_strong.json").read_text())]
    text_weak = weak.count("text-answerable") / (weak + strong).count("text-answerable")
    audio_weak = weak.count("audio-required") / (weak + strong).count("audio-required")
    # with silence the tuned model guesses the audio-required ones by its priors: about half of them land weak (0.47
    # on one thread here; the bound leaves room for another machine's arithmetic); the text-answerable ones stay
    # answerable
    assert text_weak >= 0.9 and audio_weak <= 0.6 and text_weak - audio_weak >= 0.4, (text_weak, audio_weak)
    rows = [json.loads(line) for line in (out / "items" / "mcq.jsonl").read_text().splitlines()]
    # how much the answer's share among the options falls without audio: little where the words give it away
    effect = {k: np.mean([r["audio_effect"] for r in rows if kind[r["id"]] == k]) for k in set(kind.values())}
    assert effect["audio-required"] > effect["text-answerable"] + 0.3, effect
    result = json.loads((out / "results.json").read_text())["tasks"]["mcq"]
    assert result["value"] > 0.8 and result["settings"]["format"] == "instruct"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_the_synthetic_set_never_repeats_a_spoken_clip(tmp_path):
    """espeak-ng is deterministic: the same digit in the same voice was the same clip in train and test (the
    contamination check refused the set made with 8 items a kind); every spoken clip now has its own rate and pitch."""
    import hashlib

    out = make_set(tmp_path / "qa", items=8, test_items=4, seed=0, speech=True)
    digests = [hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted((out / "audio").glob("*digits*.wav"))]
    assert len(digests) == 12 and len(set(digests)) == 12
