"""MCQ audio QA beyond plain likelihood: the official scorers' ports and their traps, the strict parser, chance,
generation mode end to end, PMI, answer-order permutations, the mismatched-audio control and the soft score."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_wave
from test_evaluate import BagJudge, ToneCodec

from soda.evaluate.cli import evaluate, main
from soda.evaluate.mcq_scorers import (chance, mmsu_compat_accuracy, mmsu_correct, mmsu_letter, r1aqa_answer,
                                       string_match, strict_answer, strict_letter)
from soda.evaluate.tasks import EvalSettings
from tokenize_audio.documents import mcq_instruction
from tokenize_audio.vocab import Vocabulary


# --- MMAU / MMAR string_match ---------------------------------------------------------------------
ANIMALS = ["dog barking", "cat meowing", "bird singing", "cow mooing"]


def test_string_match_counts_the_answer_text_in_any_wording_but_rarely_a_bare_letter():
    answer = ANIMALS[1]
    assert string_match(answer, "cat meowing", ANIMALS)
    assert string_match(answer, "Cat Meowing!", ANIMALS)  # lower-cased, punctuation is not a word
    assert string_match(answer, "B. cat meowing", ANIMALS) and string_match(answer, "(B) cat meowing", ANIMALS)
    assert string_match(answer, "The answer is cat meowing.", ANIMALS)
    assert not string_match(answer, "B", ANIMALS)  # a letter is not the answer's words
    assert not string_match(answer, "", ANIMALS) and not string_match(answer, "...", ANIMALS)
    assert not string_match(answer, "a cat meowing, or maybe a dog barking", ANIMALS)  # a wrong option's word
    # the one way a letter counts: the option text is that letter (e.g. a musical key)
    assert string_match("B", "B", ["A", "B", "C", "D"])


def test_string_match_false_positives_come_from_distractors_with_the_answers_word_set():
    order = ["dog then cat", "cat then dog", "only a dog"]
    assert string_match(order[0], order[1], order)  # the wrong order, counted right
    assert string_match("Ninety-one", "one ninety", ["ninety-one", "ninety", "eighty"])  # same words
    duplicated = ["a car horn", "A car horn", "a siren"]
    assert string_match(duplicated[0], duplicated[1], duplicated)
    # a distractor whose words are a strict subset or superset of the answer's is not a false positive: the answer
    # needs all its words, and the superset's extra words count against it
    assert not string_match("ninety-one", "ninety", ["ninety-one", "ninety", "eighty"])
    assert not string_match("ninety", "ninety-one", ["ninety-one", "ninety", "eighty"])
    assert not string_match("is a bad thing", "is not a bad thing", ["is a bad thing", "is not a bad thing"])


def test_r1aqa_hands_string_match_the_first_one_line_answer_tag():
    response = "I hear a bird, then a cat. <answer> cat meowing </answer>"
    assert r1aqa_answer(response) == "cat meowing" and string_match(ANIMALS[1], r1aqa_answer(response), ANIMALS)
    assert not string_match(ANIMALS[1], response, ANIMALS)  # the whole output names a wrong option's word
    assert r1aqa_answer("<answer>dog barking</answer><answer>cat meowing</answer>") == "dog barking"  # the first
    assert r1aqa_answer("<answer>cat\nmeowing</answer>") == "<answer>cat\nmeowing</answer>"  # one line only
    assert r1aqa_answer("  cat meowing ") == "cat meowing"  # no tag: the whole output


@pytest.mark.skipif(not os.environ.get("SODA_MMAU_TEST_MINI"),
                    reason="set SODA_MMAU_TEST_MINI to Sakshi113/MMAU's mmau-test-mini.json to check these counts")
def test_string_match_on_mmau_test_mini_gives_the_documented_counts():
    items = json.loads(Path(os.environ["SODA_MMAU_TEST_MINI"]).read_text())
    letter = [("ABCDEFGH"[d["choices"].index(d["answer"])], d) for d in items]
    assert sum(string_match(d["answer"], d["answer"], d["choices"]) for d in items) == 1000
    assert sum(string_match(d["answer"], x, d["choices"]) for x, d in letter) == 2
    assert sum(string_match(d["answer"], f"{x}. {d['answer']}", d["choices"]) for x, d in letter) == 967
    assert sum(string_match(d["answer"], f"The answer is {d['answer']}.", d["choices"]) for d in items) == 907
    wrong = [(w, d) for d in items for i, w in enumerate(d["choices"]) if i != d["choices"].index(d["answer"])]
    assert sum(string_match(d["answer"], w, d["choices"]) for w, d in wrong) == 28


# --- MMSU's letter parser -------------------------------------------------------------------------
FOUR = ["dog", "cat", "bird", "cow"]


def test_mmsu_letter_parser_reads_the_first_or_second_to_last_character():
    assert mmsu_letter("B") == "B" and mmsu_letter("  C.\n") == "C"
    assert mmsu_letter("The answer is C.") == "C"  # second-to-last character
    assert mmsu_letter("(D)") == "D"
    assert mmsu_letter("Because the tone is high.") == "B"  # the script's quirk: a sentence starting with B
    assert mmsu_letter("") == "" and mmsu_letter("None") == ""  # the script reuses the previous letter
    assert mmsu_letter("I am not sure") is None and mmsu_letter("c") is None  # wrong format: dropped
    assert mmsu_letter(None) is None
    assert mmsu_correct("B", FOUR, "cat") and not mmsu_correct("A", FOUR, "cat")
    assert not mmsu_correct("D", ["dog", "cat"], "cat")  # a letter past the choices names nothing


def test_mmsu_compat_denominator_drops_malformed_and_reuses_the_last_letter_where_ours_counts_them_wrong():
    records = [("B", FOUR, "cat"),                    # right
               ("The answer is C.", FOUR, "bird"),    # right (second-to-last character)
               ("", FOUR, "bird"),                    # the script reuses C: right there, wrong in ours
               ("I am not sure", FOUR, "dog"),        # wrong format: dropped there, wrong in ours
               ("None", FOUR, "dog"),                 # reuses C again: wrong in both
               ("(D)", FOUR, "cow")]                  # right
    compat = mmsu_compat_accuracy(records)
    assert compat == {"accuracy": 4 / 5, "correct": 4, "total": 5, "dropped": 1}
    ours = [mmsu_correct(mmsu_letter(r), c, a) for r, c, a in records]
    assert sum(ours) / len(ours) == pytest.approx(3 / 6)
    assert mmsu_compat_accuracy([("", FOUR, "dog")])["accuracy"] == 0.0  # nothing to reuse: wrong (the script crashes)


def test_strict_parser_takes_exactly_one_well_formed_answer():
    assert strict_answer("<answer>cat meowing</answer>", ANIMALS) == 1
    assert strict_answer("I think so. <answer> Cat Meowing </answer>", ANIMALS) == 1
    assert strict_answer("cat meowing", ANIMALS) is None  # no tag
    assert strict_answer("<answer>B</answer>", ANIMALS) is None  # a letter is not an option's text
    assert strict_answer("<answer>cat</answer>", ANIMALS) is None  # part of an option
    assert strict_answer("<answer>cat meowing</answer><answer>dog barking</answer>", ANIMALS) is None
    assert strict_answer("<answer>a car horn</answer>", ["a car horn", "A car horn", "a siren"]) is None  # ambiguous
    assert strict_answer("<answer>cat meowing", ANIMALS) is None
    assert strict_letter("B", 4) == 1 and strict_letter(" B.", 4) == 1 and strict_letter("(b)", 4) == 1
    assert strict_letter("E", 4) is None and strict_letter("The answer is B.", 4) is None
    assert strict_letter("", 4) is None and strict_letter("None", 4) is None


# --- chance ---------------------------------------------------------------------------------------
MMAU_SHAPE = [4] * 948 + [2] * 27 + [5] * 24 + [8]
MMAR_SHAPE = [4] * 815 + [2] * 171 + [3] * 10 + [5] * 3 + [6]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


@pytest.mark.parametrize("shape, published", [(MMAU_SHAPE, 0.2554), (MMAR_SHAPE, 0.293)])
def test_a_uniform_random_answerer_converges_to_the_exact_chance(shape, published):
    exact = chance(shape)
    assert exact == pytest.approx(published, abs=5e-5 if published == 0.2554 else 5e-4)
    rng = np.random.default_rng(0)
    answers = [int(rng.integers(n)) for n in shape]
    choices = [[f"option {NUMBERS[j]}" for j in range(n)] for n in shape]
    scores = []
    for seed in range(100):  # a random answerer, judged by the official scorer, as a benchmark run would be
        picks = np.random.default_rng([seed, 1]).integers(0, shape)  # not the answers' stream
        scores.append(np.mean([string_match(c[a], c[p], c) for c, a, p in zip(choices, answers, picks)]))
    assert np.mean(scores) == pytest.approx(exact, abs=0.005)  # the sd of the mean is ~0.0014


# --- generation mode ------------------------------------------------------------------------------
def _tone_items(tmp_path, rows: list[dict]) -> str:
    t = np.arange(1600) / 8000  # 0.2 s: two ToneCodec frames
    write_wave(tmp_path / "clips" / "low.wav", (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 8000)
    write_wave(tmp_path / "clips" / "high.wav", (0.5 * np.sin(2 * np.pi * 2000 * t)).astype(np.float32), 8000)
    data = tmp_path / "mcq.json"
    data.write_text(json.dumps(rows))
    return str(data)


def _word_judge(words: list[str], links_of):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from soda.checkpoints import LoadedModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = Vocabulary.build(tok, 1, 4)
    links = links_of(vocab, {w: i for i, w in enumerate(words)})
    model = BagJudge(vocab.size, links)
    return LoadedModel(model, vocab, "tone", "tone (test codec)", "bag", torch.device("cpu")), links


def _scripted(monkeypatch, responses: dict, silent: dict, seen: list):
    """Replace generation: the response keyed by the [tag] in the instruction, another one for silent audio."""
    from soda.generate import decode
    from soda.generate.prompts import Result

    def fake(loaded, requests, settings=None, codec=None, progress=False):
        assert settings.text_temperature == 0 and settings.max_text_tokens == 16
        out = []
        for r in requests:
            assert r.task == "instruct" and r.audio.shape[0] == 1
            seen.append(r)
            tag = next(k for k in responses if f"[{k}]" in r.text)
            text = (silent if not r.audio.any() else responses).get(tag, "")
            out.append(Result(r.id, r.task, "text_end", text=text))
        return out

    monkeypatch.setattr(decode, "generate", fake)


def test_generated_answers_get_the_expected_official_and_strict_accuracies(tmp_path, monkeypatch):
    loaded, _ = _word_judge(["[UNK]", "dog", "cat"], lambda v, w: [])
    two = ["dog", "cat"]
    rows = [{"id": "q1", "question": "[q1] which animal?", "choices": two, "answer": "dog"},
            {"id": "q2", "question": "[q2] which animal?", "choices": two, "answer": "cat"},
            {"id": "q3", "question": "[q3] which animal?", "choices": two, "answer": "cat"},
            {"id": "q4", "question": "[q4] in which order?", "choices": ["dog then cat", "cat then dog"],
             "answer": "dog then cat"},
            {"id": "q5", "question": "[q5] which animal?", "choices": two, "answer": "dog"}]
    for i, r in enumerate(rows):
        r["audio_path"] = f"clips/{'low' if i % 2 else 'high'}.wav"
    data = _tone_items(tmp_path, rows)
    responses = {"q1": "<answer>dog</answer>",        # official and strict
                 "q2": "The answer is cat.",          # official only
                 "q3": "B",                           # neither: a letter is not the answer's words
                 "q4": "<answer>cat then dog</answer>",  # official's false positive (same words), strict wrong
                 "q5": "<answer>cat</answer>"}        # neither
    seen = []
    _scripted(monkeypatch, responses, {"q1": "<answer>dog</answer>", "q2": "cat"}, seen)
    settings = EvalSettings(progress=False, mcq_mode="generate", mcq_max_tokens=16)
    r = evaluate(loaded, ["mcq"], {"mcq": data}, settings, tmp_path / "eval", codec=ToneCodec(),
                 log=lambda m: None)["mcq"]
    assert r["count"] == 5 and r["value"] == r["accuracy_official"] == pytest.approx(3 / 5)
    assert r["accuracy_strict"] == pytest.approx(1 / 5) and r["malformed"] == 2
    ac = r["audio_contribution"]
    assert ac["accuracy_silence"] == pytest.approx(2 / 5) and ac["accuracy_silence_strict"] == pytest.approx(1 / 5)
    assert ac["correct_only_with_audio"] == 1  # q4
    assert r["benchmark"]["sha256"] == hashlib.sha256(Path(data).read_bytes()).hexdigest()
    assert set(r["scorer_versions"]) == {"r1aqa_answer", "string_match", "strict"}
    assert "mmsu_letter" not in r["scorer_versions"] and "accuracy_official_compat" not in r
    assert r["chance"] == pytest.approx(0.5)
    # the prompt is the instruction soda-finetune instruct trains on
    q1 = next(s for s in seen if "[q1]" in s.text)
    assert q1.text == mcq_instruction("[q1] which animal?", two)
    items = [json.loads(line) for line in (tmp_path / "eval" / "items" / "mcq.jsonl").read_text().splitlines()]
    assert [i["correct"] for i in items] == [True, True, False, True, False]
    assert [i["strict_pick"] for i in items] == [0, None, None, 1, 1]
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "strict parser" in table and "with silence" in table
    assert "strict accuracy" in (tmp_path / "eval" / "report.html").read_text()


def test_mmsu_prompt_and_letter_scoring_report_the_official_denominator_beside_ours(tmp_path, monkeypatch):
    from soda.evaluate.mcq_generate import mmsu_prompt

    loaded, _ = _word_judge(["[UNK]", "dog"], lambda v, w: [])
    rows = [{"id": k, "question": f"[{k}] which animal?", "choice_a": "dog", "choice_b": "cat", "choice_c": "bird",
             "choice_d": "cow", "answer_gt": a, "audio_path": "clips/low.wav", "task_name": "speech"}
            for k, a in [("m1", "cat"), ("m2", "bird"), ("m3", "bird"), ("m4", "dog"), ("m5", "cow")]]
    data = _tone_items(tmp_path, rows)
    responses = {"m1": "B", "m2": "The answer is C.", "m3": "", "m4": "I am not sure", "m5": "(D)"}
    seen = []
    _scripted(monkeypatch, responses, {}, seen)
    settings = EvalSettings(progress=False, mcq_mode="generate", mcq_prompt="mmsu", mcq_max_tokens=16)
    r = evaluate(loaded, ["mcq"], {"mcq": data}, settings, tmp_path / "eval", codec=ToneCodec(),
                 log=lambda m: None)["mcq"]
    assert r["value"] == pytest.approx(3 / 5)  # ours: empty and malformed answers are wrong
    assert r["accuracy_strict"] == pytest.approx(2 / 5)  # "B" and "(D)"
    assert r["accuracy_official_compat"] == 1.0  # the script: m4 dropped, m3 reuses m2's C
    assert r["official_compat"]["dropped"] == 1 and r["official_compat"]["total"] == 4
    assert "mmsu_letter" in r["scorer_versions"] and r["by_domain"]["speech"]["count"] == 5
    m1 = next(s for s in seen if "[m1]" in s.text)
    assert m1.text == mmsu_prompt("[m1] which animal?", ["dog", "cat", "bird", "cow"])
    assert m1.text.startswith("Choose the most suitable answer from options A, B, C, and D to respond the "
                                   "question in next line, **you should only choose A or B or C or D.** Do not "
                                   "provide any additional explanations or content.\n\nQuestion: [m1] which animal?")
    assert m1.text.endswith("\n\nA. dog\nB. cat\nC. bird\nD. cow")


def test_generate_mode_end_to_end_through_soda_eval_on_a_tiny_model(tiny_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        write_wave(tmp_path / f"{name}.wav", (0.1 * rng.standard_normal(24000 * 3 // 10)).astype(np.float32), 24000)
    rows = [{"id": f"i{n}", "question": "Which sound is it?", "choices": ["a dog", "a cat", "a bird"],
             "answer": n % 3, "audio_path": f"{'abc'[n % 3]}.wav"} for n in range(3)]
    (tmp_path / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    assert main([str(tiny_run), "--tasks", "mcq", "--data-for", f"mcq={tmp_path / 'mcq.jsonl'}", "--mcq-mode",
                 "generate", "--mcq-max-tokens", "6", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    r = json.loads((out / "results.json").read_text())["tasks"]["mcq"]
    assert r["count"] == 3 and r["settings"]["mode"] == "generate" and r["settings"]["prompt"] == "answer"
    for key in ("accuracy_official", "accuracy_strict", "chance"):
        assert 0 <= r[key] <= 1
    assert r["audio_contribution"]["accuracy_silence"] is not None
    assert r["benchmark"]["sha256"] == hashlib.sha256((tmp_path / "mcq.jsonl").read_bytes()).hexdigest()
    assert set(r["scorer_versions"]) == {"r1aqa_answer", "string_match", "strict"}
    items = [json.loads(line) for line in (out / "items" / "mcq.jsonl").read_text().splitlines()]
    assert all(isinstance(i["response"], str) and isinstance(i["response_silence"], str) for i in items)
    # likelihood on the same model: options listed in the question, in 1 and in 3 orders
    common = [str(tiny_run), "--tasks", "mcq", "--data-for", f"mcq={tmp_path / 'mcq.jsonl'}", "--quiet",
              "--device", "cpu", "--mcq-template", "{question} {choices}\nAnswer:"]
    assert main(common + ["--out", str(tmp_path / "k1")]) == 0
    one = json.loads((tmp_path / "k1" / "results.json").read_text())["tasks"]["mcq"]
    assert one["permutations"]["mean_accuracy"] == one["value"]
    assert one["permutations"]["all_orderings_correct"] == one["value"]
    assert main(common + ["--out", str(tmp_path / "k3"), "--mcq-permutations", "3"]) == 0
    three = json.loads((tmp_path / "k3" / "results.json").read_text())["tasks"]["mcq"]
    assert three["value"] == one["value"] and three["permutations"]["orderings_scored"] == 9
    assert three["permutations"]["all_orderings_correct"] <= three["permutations"]["mean_accuracy"]
    rows3 = [json.loads(line) for line in (tmp_path / "k3" / "items" / "mcq.jsonl").read_text().splitlines()]
    assert all(len(i["correct_by_ordering"]) == 3 and i["correct_by_ordering"][0] == i["correct"] for i in rows3)
    assert three["audio_contribution"]["accuracy_mismatched"] is not None
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--mcq-mode", "--mcq-prompt", "--mcq-permutations", "--mcq-max-tokens"):
        assert flag in help_text


def test_permutations_in_generate_mode_are_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused before any checkpoint is looked at
        main([str(tmp_path / "run"), "--tasks", "mcq", "--data-for", "mcq=x.json", "--mcq-mode", "generate",
              "--mcq-permutations", "2", "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    assert "--mcq-permutations applies to --mcq-mode likelihood" in capsys.readouterr().err


# --- likelihood: PMI, mismatched audio, soft score ------------------------------------------------
WORDS = ["[UNK]", "which", "animal", "?", "dog", "cat", "is", "the", "tone", "high", "or", "low", "Answer", ":"]


def _bag_log_prob(vocab, links, context: np.ndarray, target: int) -> float:
    """By hand: BagJudge's logit for a token is 4 x the number of earlier tokens linked to it."""
    matrix = np.zeros((vocab.size, vocab.size))
    for source, to in links:
        matrix[source, to] = 1.0
    logits = 4.0 * matrix[context].sum(0)
    return float(logits[target] - np.logaddexp.reduce(logits))


def test_pmi_discounts_an_option_the_prompt_favours_without_the_audio(tmp_path):
    def links_of(vocab, w):  # "Answer :" suggests dog, the question repeats it, the low tone means cat
        return [(i, i) for i in w.values()] + [(w["Answer"], w["dog"]), (w[":"], w["dog"]),
                                               (vocab.audio_id(0, 1), w["cat"])]

    loaded, links = _word_judge(WORDS, links_of)
    vocab = loaded.vocab
    data = _tone_items(tmp_path, [{"id": "p1", "question": "dog ?", "choices": ["dog", "cat"], "answer": "cat",
                                   "audio_path": "clips/low.wav"}])
    out = tmp_path / "eval"
    r = evaluate(loaded, ["mcq"], {"mcq": data}, EvalSettings(progress=False), out, codec=ToneCodec(),
                 log=lambda m: None)["mcq"]
    item = json.loads((out / "items" / "mcq.jsonl").read_text())
    # conditional: dog 4 x (copy + Answer + :) = 12 beats cat 4 x two low frames = 8; PMI: dog 12 - 8, cat 8 - 0
    assert not item["correct_raw"] and item["correct_pmi"]
    assert r["accuracy_raw"] == 0.0 and r["accuracy_pmi"] == 1.0
    prompt = np.concatenate([[vocab.bos_id, vocab.audio_start, vocab.audio_id(0, 1), vocab.audio_id(0, 1),
                              vocab.audio_end, vocab.text_start], vocab.encode_text("dog ?\nAnswer:")])
    baseline = np.concatenate([[vocab.bos_id, vocab.text_start], vocab.encode_text("Answer:")])
    for i, option in enumerate(["dog", "cat"]):
        target = vocab.encode_text(option)[0]
        expected = _bag_log_prob(vocab, links, prompt, target) - _bag_log_prob(vocab, links, baseline, target)
        assert item["scores_pmi"][i] == pytest.approx(expected, abs=1e-5)
        assert item["scores_raw"][i] == pytest.approx(_bag_log_prob(vocab, links, prompt, target), abs=1e-5)


def test_mismatched_audio_and_the_soft_score_measure_what_the_audio_adds(tmp_path):
    def links_of(vocab, w):
        return [(i, i) for i in w.values()] + [(vocab.audio_id(0, 1), w["low"]), (vocab.audio_id(0, 2), w["high"])]

    loaded, links = _word_judge(WORDS, links_of)
    vocab = loaded.vocab
    question = "is the tone high or low ?"
    data = _tone_items(tmp_path, [
        {"id": "a1", "question": question, "choices": ["high", "low"], "answer": "low", "audio_path": "clips/low.wav"},
        {"id": "a2", "question": question, "choices": ["high", "low"], "answer": "high",
         "audio_path": "clips/high.wav"}])
    out = tmp_path / "eval"
    r = evaluate(loaded, ["mcq"], {"mcq": data}, EvalSettings(progress=False), out, codec=ToneCodec(),
                 log=lambda m: None)["mcq"]
    items = [json.loads(line) for line in (out / "items" / "mcq.jsonl").read_text().splitlines()]
    ac = r["audio_contribution"]
    assert r["value"] == 1.0 and ac["accuracy_silence"] == 0.0
    assert ac["accuracy_mismatched"] == 0.0  # two items: each hears the other's tone
    assert [i["mismatched_with"] for i in items] == [1, 0]
    text = vocab.encode_text(question + "\nAnswer:")
    for item, code in zip(items, (1, 2)):
        answer = vocab.encode_text(["high", "low"][item["answer"]])[0]
        heard = np.concatenate([[vocab.bos_id, vocab.audio_start, vocab.audio_id(0, code), vocab.audio_id(0, code),
                                 vocab.audio_end, vocab.text_start], text])
        silent = heard.copy()
        silent[2:4] = vocab.audio_id(0, 0)
        soft = _bag_log_prob(vocab, links, heard, answer) - _bag_log_prob(vocab, links, silent, answer)
        assert item["soft_score"] == pytest.approx(soft, abs=1e-5) and soft > 0
    assert ac["mean_soft_score"] == pytest.approx(np.mean([i["soft_score"] for i in items]))
    assert r["benchmark"]["sha256"] == hashlib.sha256(Path(data).read_bytes()).hexdigest()
    assert r["permutations"]["mean_accuracy"] == r["value"] == r["permutations"]["all_orderings_correct"]


def test_orderings_are_distinct_seeded_and_start_with_the_original():
    from soda.evaluate.mcq import mismatched, orderings

    four = orderings(4, 5, seed=0, index=3)
    assert four[0] == [0, 1, 2, 3] and len({tuple(o) for o in four}) == 5
    assert four == orderings(4, 5, seed=0, index=3) and four != orderings(4, 5, seed=1, index=3)
    assert len(orderings(2, 5, seed=0, index=0)) == 2  # only two orders exist
    assert orderings(3, 1, seed=0, index=0) == [[0, 1, 2]]
    codes = {n: np.full((1, 2 + n), n) for n in range(5)}
    other, partner = mismatched(codes, seed=0)
    assert sorted(partner) == sorted(partner.values()) == list(range(5))
    assert all(partner[n] != n for n in partner)  # a derangement
    assert all(other[n].shape == codes[n].shape and (other[n] == partner[n]).all() for n in codes)
    assert mismatched({0: codes[0]}, seed=0) == ({}, {})
