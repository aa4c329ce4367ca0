"""Multiple-choice audio QA by generation (`--mcq-mode generate`), for instruction-tuned models.

The model is asked with a fixed prompt (`--mcq-prompt`) through the `instruct` task of `soda.generate`
(`BOS <|audio_start|>A<|audio_end|><|text_start|>instruction<|text_end|><|text_start|>`, greedy, text until
`<|text_end|>`), and its answer is judged twice: by the benchmark's official scorer (`mcq_scorers`: MMAU/MMAR
`string_match` of what R1-AQA extracts from the `<answer>` tag for the `answer` prompt, MMSU's letter parser for
the `mmsu` prompt), so numbers compare with
published tables, and by the strict parser (one well-formed answer naming one option, else wrong), which has none
of the official scorers' loopholes. Every item is asked again with silence of the same length as its audio: what
is still right is answerable without listening. With `--split-weak-strong` the model's own vote is its generated
answer with silence (official scorer); other `--judges` vote by likelihood, as in the default mode.
"""

from __future__ import annotations

from collections import defaultdict

from soda.evaluate.mcq_items import Item, Questions, benchmark, silence_like, tally
from soda.evaluate.mcq_scorers import (SCORER_VERSIONS, mmsu_compat_accuracy, mmsu_correct, mmsu_letter,
                                       r1aqa_answer, string_match, strict_answer, strict_letter)
from soda.evaluate.scoring import check_length
from soda.evaluate.tasks import Context, entry, share
from tokenize_audio.documents import mcq_instruction

# MMSU_Bench mmsu_inference.py @321b2767: the instruction, then "Question: ...", then "A. ...\nB. ..." lines.
MMSU_INSTRUCTION = ("Choose the most suitable answer from options {listed} to respond the question in next line, "
                    "**you should only choose {alternatives}.** Do not provide any additional explanations or content.")


def mmsu_prompt(question: str, choices: list[str]) -> str:
    """MMSU's prompt, word for word for its four options (with other counts, the letters named follow the count)."""
    letters = [chr(65 + i) for i in range(len(choices))]
    listed = " and ".join(letters) if len(letters) == 2 else ", ".join(letters[:-1]) + ", and " + letters[-1]
    head = MMSU_INSTRUCTION.format(listed=listed, alternatives=" or ".join(letters))
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    return f"{head}\n\nQuestion: {question}\n\n{options}"


PROMPTS = {"answer": mcq_instruction, "mmsu": mmsu_prompt}


def judge(prompt: str, response: str, item: Item) -> dict:
    """One response judged by the official scorer of its prompt and by the strict parser."""
    answer = item.choices[item.answer]
    if prompt == "mmsu":
        letter = mmsu_letter(response)
        official = mmsu_correct(letter, item.choices, answer)
        pick = strict_letter(response, len(item.choices))
    else:
        letter, official = None, string_match(answer, r1aqa_answer(response), item.choices)
        pick = strict_answer(response, item.choices)
    return {"official": official, "strict_pick": pick, "strict": pick == item.answer, "mmsu_letter": letter}


def _generate(ctx: Context, codes: dict, prompts: dict) -> dict:
    """index -> (the generated answer, why it stopped), greedy, through soda.generate's instruct task."""
    from soda.evaluate.asr import generation_settings
    from soda.generate.prompts import Request

    keys = sorted(prompts)
    if not keys:
        return {}
    requests = [Request("instruct", audio=codes[n], text=prompts[n], id=str(n)) for n in keys]
    results = ctx.generate(requests, generation_settings(ctx, text_temperature=0.0,
                                                         max_text_tokens=ctx.settings.mcq_max_tokens),
                           ctx.codec, progress=ctx.settings.progress)
    return {n: (r.text, r.ended) for n, r in zip(keys, results)}


def run_generated(ctx: Context, data: Questions) -> dict:
    settings, vocab, kind = ctx.settings, ctx.vocab, ctx.settings.mcq_prompt
    items = data.items
    codes_list = ctx.audio_codes([i.audio for i in items], "mcq: encoding")
    codes, prompts = {}, {}
    for n, (item, c) in enumerate(zip(items, codes_list)):
        if isinstance(c, str):
            data.skips.add(item.id, f"audio: {c}")
            continue
        text = PROMPTS[kind](item.question, item.choices)
        # BOS, audio tags, two text segments and the answer cap must fit the context
        length = 6 + c.size + len(vocab.encode_text(text)) + settings.mcq_max_tokens
        if (reason := check_length(length, settings.max_len)) is not None:
            data.skips.add(item.id, reason)
            continue
        codes[n], prompts[n] = c, text
    answers = _generate(ctx, codes, prompts)
    silent = _generate(ctx, silence_like(ctx, codes), prompts)
    return generated_entry(data, kind, answers, silent, {"codec": ctx.loaded.codec_label},
                           settings.mcq_max_tokens)


def generated_entry(data: Questions, kind: str, answers: dict, silent: dict, how: dict, max_tokens: int) -> dict:
    """The results entry of generated answers, for every model family: `answers` and `silent` map an item's index
    to (its answer, why it stopped) with its audio and with silence; `how` adds what the family records (codec)."""
    items = data.items
    rows, totals, by_domain = [], defaultdict(int), defaultdict(lambda: defaultdict(float))
    for n in sorted(answers):
        item = items[n]
        (text, ended), (silent_text, silent_ended) = answers[n], silent[n]
        judged, judged_silent = judge(kind, text, item), judge(kind, silent_text, item)
        flags = {"correct": judged["official"], "correct_strict": judged["strict"],
                 "correct_silence": judged_silent["official"], "correct_silence_strict": judged_silent["strict"],
                 "malformed": judged["strict_pick"] is None}
        tally(flags, item, by_domain, totals)
        rows.append({"index": n, "id": item.id, "domain": item.domain, "answer": item.answer,
                     "answer_text": item.choices[item.answer], "response": text, "ended": ended,
                     "strict_pick": judged["strict_pick"], "mmsu_letter": judged["mmsu_letter"],
                     "response_silence": silent_text, "ended_silence": silent_ended,
                     "strict_pick_silence": judged_silent["strict_pick"], **flags})
    count = len(rows)
    official_name = "MMSU letter parser" if kind == "mmsu" else "MMAU/MMAR string_match"
    extra = {
        "accuracy_official": share(totals["correct"], count),
        "accuracy_strict": share(totals["correct_strict"], count),
        "malformed": totals["malformed"],
        "chance": share(sum(d["chance"] for d in by_domain.values()), count),
        "by_domain": {name: {"accuracy": share(d["correct"], int(d["count"])),
                             "accuracy_strict": share(d["correct_strict"], int(d["count"])),
                             "accuracy_silence": share(d["correct_silence"], int(d["count"])),
                             "chance": d["chance"] / d["count"], "count": int(d["count"])}
                      for name, d in sorted(by_domain.items())},
        "audio_contribution": {
            "condition": "the answer generated again with silence of the same length in place of the audio",
            "accuracy_silence": share(totals["correct_silence"], count),
            "accuracy_silence_strict": share(totals["correct_silence_strict"], count),
            "correct_with_audio": totals["correct"], "correct_without_audio": totals["correct_silence"],
            "correct_only_with_audio": totals["only_with_audio"],
            "correct_only_without_audio": totals["only_without_audio"],
        },
        "benchmark": benchmark(data.source),
        "scorer_versions": {k: SCORER_VERSIONS[k] for k in (("mmsu_letter", "strict") if kind == "mmsu"
                                                            else ("r1aqa_answer", "string_match", "strict"))},
        "also": [{"metric": "accuracy (generated, strict parser)", "value": share(totals["correct_strict"], count),
                  "count": count, "percent": True, "soda_key": None},
                 {"metric": f"accuracy with silence ({official_name})",
                  "value": share(totals["correct_silence"], count), "count": count, "percent": True,
                  "soda_key": None}],
    }
    if kind == "mmsu":  # the official script's own figure: wrong-format answers leave the denominator
        compat = mmsu_compat_accuracy([(r["response"], items[r["index"]].choices, r["answer_text"]) for r in rows])
        extra["accuracy_official_compat"] = compat["accuracy"]
        extra["official_compat"] = {**compat, "rule": "as mmsu_evaluation.py: wrong-format responses dropped from "
                                                      "the total; empty/'None' reuse the previous letter"}
    how = {"data": data.source, "mode": "generate", "prompt": kind, "decoding": "greedy",
           "max_answer_tokens": max_tokens, **how,
           "official_scorer": official_name + (" (malformed counted wrong)" if kind == "mmsu" else
                                              " of the <answer> content as R1-AQA extracts it (else the response)"),
           "strict": SCORER_VERSIONS["strict"]}
    result = entry(f"accuracy (generated, {official_name})", share(totals["correct"], count), count, data.skips,
                   how, **extra)
    result["_items"] = rows
    return result
