"""Multiple-choice audio QA (MMAU / MMAR / MMSU / AudioMCQ-style), scored by log-likelihood or by generation.

Likelihood (`--mcq-mode likelihood`, the default: a base model cannot be judged fairly on free generation): each
option is scored as the continuation of `BOS <|audio_start|>A<|audio_end|><|text_start|>` + the question
(`--mcq-template`): the sum of its tokens' log-probs (raw), their mean (length-normalised, the headline number:
options differ in length), and PMI (the raw sum minus the option's log-prob after `BOS <|text_start|>Answer:`
alone, so options that are likely anyway gain nothing). `--mcq-permutations K` re-asks each item with its options
listed in K orders (the original first) and reports the mean and the share right under all of them. Chance is
1/options per item. Generation (`--mcq-mode generate`, for instruction-tuned models) is `mcq_generate`.

Audio contribution: every item is scored again with silence of the same length in place of its audio, and with
another item's clip (a seeded derangement). Items still answered correctly with silence are answerable from the
text alone; the soft score per item is log p(answer | audio) - log p(answer | silence). `--split-weak-strong`
writes them (weak: correct without audio for at least `--weak-votes` of the judges) and the rest (strong) as two
files in the input's format, the AudioMCQ filtering rule.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np

from soda.evaluate.hierarchical import UNSCORED
from soda.evaluate.mcq_generate import run_generated
from soda.evaluate.mcq_items import Item, Questions, benchmark, read_questions, silence_like, tally
from soda.evaluate.scoring import check_length, unscored
from soda.evaluate.tasks import Context, Skips, Task, entry, register, share
from tokenize_audio.documents import mcq_instruction, mcq_response
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_write_json
from tokenize_audio.sources import HFAudio

# --- scoring ---------------------------------------------------------------------------------
# Items are keyed by their position in `Questions.items` (benchmark ids need not be unique).
ANSWER_OPEN = "<answer>"  # --mcq-format instruct: the options are scored as what follows it
PMI_PREFIX = "Answer:"  # the audio-free, question-free context of PMI's baseline: BOS <|text_start|> Answer:


def _question(ctx: Context, item: Item, order: list[int]) -> np.ndarray:
    """The question's ids (after `<|text_start|>`), its options listed in `order` (by the template's {choices}, or
    in the instruction of `--mcq-format instruct`: AudioMCQ's prompt, `<|text_end|><|text_start|><answer>`)."""
    v = ctx.vocab
    if ctx.settings.mcq_format == "instruct":
        instruction = mcq_instruction(item.question, [item.choices[j] for j in order])
        return np.concatenate([v.encode_text(instruction), [v.text_end, v.text_start],
                               v.encode_text(ANSWER_OPEN)]).astype(np.int64)
    letters = ", ".join(f"({chr(65 + i)}) {item.choices[j]}" for i, j in enumerate(order))
    return v.encode_text(ctx.settings.mcq_template.format(question=item.question, choices=letters))


def _option(ctx: Context, choice: str) -> np.ndarray:
    """An option's ids as its continuation: ` TEXT` after the template, `TEXT</answer>` in the instruct format."""
    instruct = ctx.settings.mcq_format == "instruct"
    return ctx.vocab.encode_text(mcq_response(choice)[len(ANSWER_OPEN):] if instruct else " " + choice)


def _prompts(ctx: Context, items: list[Item], codes: list, skips: Skips | None) -> dict:
    """index -> (question ids, [option ids]) for items whose audio could be encoded."""
    out = {}
    for n, (item, c) in enumerate(zip(items, codes)):
        if isinstance(c, str):
            if skips is not None:
                skips.add(item.id, f"audio: {c}")
            continue
        out[n] = (_question(ctx, item, list(range(len(item.choices)))), [_option(ctx, c) for c in item.choices])
    return out


def _score(ctx: Context, codes: dict, prompts: dict, desc: str) -> dict:
    """key -> (raw sums, per-token means) over the item's options, given its audio codes (same keys as prompts); a
    key with a token the model gives no probability (`scoring.unscored`) is left out."""
    vocab = ctx.vocab
    seqs, masks, owners = [], [], []
    for n, (question, options) in prompts.items():
        prefix = np.concatenate([[vocab.bos_id, vocab.audio_start], vocab.codes_to_ids(codes[n]),
                                 [vocab.audio_end, vocab.text_start], question]).astype(np.int64)
        for option in options:
            seqs.append(np.concatenate([prefix, option]))
            masks.append(np.arange(len(seqs[-1])) >= len(prefix))
            owners.append(n)
    scores, broken = defaultdict(lambda: ([], [])), set()
    for owner, lp in zip(owners, ctx.log_probs(seqs, masks, desc) if seqs else []):
        if unscored(lp):
            broken.add(owner)
        scores[owner][0].append(float(lp.sum()))
        scores[owner][1].append(float(lp.mean()))
    return {k: v for k, v in scores.items() if k not in broken}


def _unconditional(ctx: Context, prompts: dict) -> dict:
    """index -> each option's summed log-prob after `BOS <|text_start|>Answer:` alone (PMI's baseline: how likely
    the option's words are anyway); one pass per distinct option."""
    vocab = ctx.vocab
    prefix = np.concatenate([[vocab.bos_id, vocab.text_start], vocab.encode_text(PMI_PREFIX)]).astype(np.int64)
    distinct = {tuple(o.tolist()) for _, options in prompts.values() for o in options}
    keys = sorted(distinct)
    seqs = [np.concatenate([prefix, np.asarray(k, dtype=np.int64)]) for k in keys]
    masks = [np.arange(len(s)) >= len(prefix) for s in seqs]
    sums = {k: float(lp.sum()) for k, lp in zip(keys, ctx.log_probs(seqs, masks, "mcq: PMI baseline") if seqs
                                                 else [])}
    return {n: [sums[tuple(o.tolist())] for o in options] for n, (_, options) in prompts.items()}


def _correct(values: list[float], answer: int) -> bool:
    """Right only if the answer strictly beats every other option (a tie is not an answer)."""
    return all(values[answer] > v for i, v in enumerate(values) if i != answer)


def _option_probability(raw: list[float], answer: int) -> float:
    """P(answer | one of the options): the softmax of the options' summed log-probs."""
    values = np.asarray(raw)
    weights = np.exp(values - values.max())
    return float(weights[answer] / weights.sum())


def mismatched(codes: dict, seed: int) -> tuple[dict, dict]:
    """Each item's audio replaced by another item's clip, cut or repeated to its own number of frames (so lengths,
    and what fits --max-len, stay as they were): a derangement, one seeded cycle through the items.
    Returns (index -> codes, index -> the index whose clip it got); empty with fewer than two items."""
    keys = sorted(codes)
    if len(keys) < 2:
        return {}, {}
    order = [keys[i] for i in np.random.default_rng([seed, 1]).permutation(len(keys))]
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    out = {}
    for n, m in partner.items():
        frames = codes[n].shape[1]
        clip = codes[m]
        out[n] = np.tile(clip, (1, -(-frames // clip.shape[1])))[:, :frames]
    return out, partner


def orderings(n_choices: int, k: int, seed: int, index: int) -> list[list[int]]:
    """Up to k distinct orderings of an item's options, the original first, then seeded random ones (all of them
    when there are no more than k)."""
    if math.factorial(n_choices) <= k:
        rest = [list(p) for p in itertools.permutations(range(n_choices))][1:]
        np.random.default_rng([seed, 2, index]).shuffle(rest)
        return [list(range(n_choices))] + rest
    rng, seen = np.random.default_rng([seed, 2, index]), {tuple(range(n_choices))}
    out = [list(range(n_choices))]
    while len(out) < k:
        p = tuple(int(i) for i in rng.permutation(n_choices))
        if p not in seen:
            seen.add(p)
            out.append(list(p))
    return out


def _permuted(ctx: Context, data: Questions, codes: dict, prompts: dict, scores: dict) -> dict:
    """index -> correct under each ordering (`--mcq-permutations`). Options are scored one by one, so only the
    question's listing of them ({choices} in the template) can move the scores: without it the orderings are not
    re-scored (they cannot differ)."""
    settings = ctx.settings
    plans = {n: orderings(len(data.items[n].choices), settings.mcq_permutations, settings.seed, n) for n in prompts}
    if "{choices}" not in settings.mcq_template and settings.mcq_format != "instruct":
        return {n: [_correct(scores[n][1], data.items[n].answer)] * len(p) for n, p in plans.items()}
    keyed = {(n, j): (_question(ctx, data.items[n], order), [prompts[n][1][i] for i in order])
             for n, p in plans.items() for j, order in enumerate(p) if j > 0}
    permuted = _score(ctx, {key: codes[key[0]] for key in keyed}, keyed, "mcq: scoring permuted options")
    out = {}
    for n, p in plans.items():
        answer = data.items[n].answer
        out[n] = [_correct(scores[n][1], answer)] + [_correct(permuted[(n, j)][1], order.index(answer))
                                                     for j, order in enumerate(p) if j > 0]
    return out


def _prepare(ctx: Context, data: Questions, skips: Skips | None) -> tuple[dict, dict]:
    """Audio codes and prompts of the items that fit `--max-len` (the rest are skipped)."""
    items = data.items
    codes_list = ctx.audio_codes([i.audio for i in items], "mcq: encoding")
    prompts = _prompts(ctx, items, codes_list, skips)
    codes = {n: c for n, c in enumerate(codes_list) if not isinstance(c, str)}
    for n, (question, options) in list(prompts.items()):  # the longest option decides whether an item fits
        length = 4 + codes[n].size + len(question) + max(len(o) for o in options)
        if (reason := check_length(length, ctx.settings.max_len)) is not None:
            if skips is not None:
                skips.add(items[n].id, reason)
            del prompts[n]
    return codes, prompts


def silent_correct(ctx: Context, data: Questions) -> dict[int, bool]:
    """Judge use: which items (by index) this model answers correctly with silence as the audio."""
    codes, prompts = _prepare(ctx, data, None)
    scores = _score(ctx, silence_like(ctx, codes), prompts, "judge: scoring with silence")
    return {n: _correct(v[1], data.items[n].answer) for n, v in scores.items()}


def run_mcq(ctx: Context, data: Questions) -> dict:
    if ctx.settings.mcq_mode == "generate":
        result = run_generated(ctx, data)
        if ctx.settings.split_weak_strong:
            result["split"] = split_weak_strong(ctx, data, result["_items"])
        return result
    settings = ctx.settings
    codes, prompts = _prepare(ctx, data, data.skips)
    with_audio = _score(ctx, codes, prompts, "mcq: scoring")
    with_silence = _score(ctx, silence_like(ctx, codes), prompts, "mcq: scoring with silence")
    for n in [n for n in prompts if n not in with_audio or n not in with_silence]:
        data.skips.add(data.items[n].id, f"tokens unscored: {UNSCORED}")
        del prompts[n]
        with_audio.pop(n, None)
        with_silence.pop(n, None)
    other_codes, partner = mismatched({n: codes[n] for n in prompts}, settings.seed)
    with_other = _score(ctx, other_codes, {n: prompts[n] for n in other_codes}, "mcq: scoring with another clip")
    baseline = _unconditional(ctx, prompts)
    permuted = _permuted(ctx, data, codes, prompts, with_audio)
    how = {"data": data.source, "mode": "likelihood", "format": settings.mcq_format,
           "template": settings.mcq_template if settings.mcq_format == "plain" else "instruct",
           "codec": ctx.loaded.codec_label, "permutations": settings.mcq_permutations,
           "score": "per-token mean log-prob of each option (raw sum in accuracy_raw, minus its log-prob after "
                    f"'BOS <|text_start|>{PMI_PREFIX}' in accuracy_pmi)",
           "correct_if": "the answer's score beats every other option (ties wrong)"}
    scorer = ("soda-likelihood-2: per-token mean (headline), raw sum, PMI against "
              f"BOS <|text_start|>{PMI_PREFIX}; ties wrong")
    result = likelihood_entry(data, with_audio, with_silence, how, scorer, baseline=baseline, with_other=with_other,
                              partner=partner, permuted=permuted, permutations=settings.mcq_permutations)
    if settings.split_weak_strong:
        result["split"] = split_weak_strong(ctx, data, result["_items"])
    return result


def likelihood_entry(data: Questions, with_audio: dict, with_silence: dict, how: dict, scorer: str, *,
                     baseline: dict | None = None, with_other: dict | None = None, partner: dict | None = None,
                     permuted: dict | None = None, permutations: int = 1) -> dict:
    """The results entry of likelihood scores, for every model family: `with_audio` and `with_silence` map an
    item's index to (raw sums, per-token means) over its options. The optional controls add their figures: PMI
    (`baseline`: each option's log-prob without audio or question), another item's clip (`with_other`, `partner`),
    the option orders (`permuted`: index -> correct under each)."""
    rows, by_domain, totals = [], defaultdict(lambda: defaultdict(float)), defaultdict(int)
    for n in sorted(with_audio):
        item = data.items[n]
        raw, norm = with_audio[n]
        silent_raw, silent = with_silence[n]
        flags = {"correct_raw": _correct(raw, item.answer), "correct": _correct(norm, item.answer)}
        if baseline is not None:
            pmi = [r - b for r, b in zip(raw, baseline[n])]
            flags["correct_pmi"] = _correct(pmi, item.answer)
        flags["correct_silence"] = _correct(silent, item.answer)
        if with_other is not None and n in with_other:
            flags["correct_mismatched"] = _correct(with_other[n][1], item.answer)
        if permuted is not None:
            flags["correct_all_orderings"] = all(permuted[n])
            totals["orderings_mean"] += float(np.mean(permuted[n]))
            totals["orderings"] += len(permuted[n])
        tally(flags, item, by_domain, totals)
        soft = raw[item.answer] - silent_raw[item.answer]
        totals["soft"] += soft
        row = {"index": n, "id": item.id, "domain": item.domain, "answer": item.answer, "scores_raw": raw,
               "scores_norm": norm, **({"scores_pmi": pmi} if baseline is not None else {}),
               "scores_norm_silence": silent, "pick": int(np.argmax(norm)), "pick_silence": int(np.argmax(silent)),
               **flags}
        if permuted is not None:
            row["correct_by_ordering"] = permuted[n]
        if partner is not None:
            row["mismatched_with"] = partner.get(n)
        rows.append({**row, "audio_effect": _option_probability(raw, item.answer)
                     - _option_probability(silent_raw, item.answer), "soft_score": soft})
    count = len(rows)
    accuracies = ("", "_raw") + (("_pmi",) if baseline is not None else ()) + ("_silence",)
    extra = {f"accuracy{k}": share(totals[f"correct{k}"], count) for k in accuracies if k in ("_raw", "_pmi")}
    extra["chance"] = share(sum(d["chance"] for d in by_domain.values()), count)
    extra["by_domain"] = {name: {**{f"accuracy{k}": share(d[f"correct{k}"], int(d["count"])) for k in accuracies},
                                 "chance": d["chance"] / d["count"], "count": int(d["count"])}
                          for name, d in sorted(by_domain.items())}
    if permuted is not None:
        extra["permutations"] = {
            "requested": permutations, "orderings_scored": totals["orderings"],
            "mean_accuracy": share(totals["orderings_mean"], count),
            "all_orderings_correct": share(totals["correct_all_orderings"], count),
            "note": "options are scored one by one, so only the template's {choices} listing lets order matter"}
    contribution = {"condition": "the item's audio replaced by silence of the same length",
                    "accuracy_silence": share(totals["correct_silence"], count)}
    if with_other is not None:
        contribution.update({
            "accuracy_mismatched": share(totals["correct_mismatched"], len(with_other)) if with_other else None,
            "mismatched_condition": "another item's clip (a seeded derangement), cut or repeated to this item's "
                                    "length"})
    extra["audio_contribution"] = {
        **contribution,
        "correct_with_audio": totals["correct"], "correct_without_audio": totals["correct_silence"],
        "correct_only_with_audio": totals["only_with_audio"],
        "correct_only_without_audio": totals["only_without_audio"],
        "mean_audio_effect": share(sum(r["audio_effect"] for r in rows), count),
        "mean_soft_score": share(totals["soft"], count),
        "soft_score": "log p(answer | audio) - log p(answer | silence), the correct option's summed log-prob",
    }
    extra["benchmark"] = benchmark(data.source)
    extra["scorer_versions"] = {"likelihood": scorer}
    result = entry("accuracy (length-normalised log-likelihood)", share(totals["correct"], count), count,
                   data.skips, how, **extra)
    result["_items"] = rows
    return result


# --- audio-contribution split ------------------------------------------------------------------
def weak_votes(settings, n_judges: int) -> int:
    k = settings.weak_votes if settings.weak_votes is not None else math.ceil(n_judges / 2)
    if not 1 <= k <= n_judges:
        raise SodaError(f"--weak-votes {k}: with {n_judges} judge(s) choose 1..{n_judges}")
    return k


def split_weak_strong(ctx: Context, data: Questions, rows: list[dict]) -> dict:
    """Votes of the judges (the evaluated model when none are given) -> weak/strong files in the input format."""
    from soda.checkpoints import LoadedModel, load_model

    settings = ctx.settings
    judges = list(settings.judges) or [ctx.loaded]
    k = weak_votes(settings, len(judges))
    votes = {row["index"]: 0 for row in rows}
    names = []
    for judge in judges:
        if judge is ctx.loaded or judge == ctx.loaded.source:
            correct, name = {row["index"]: row["correct_silence"] for row in rows}, ctx.loaded.source
        else:
            loaded = judge if isinstance(judge, LoadedModel) else load_model(
                judge, settings.device, settings.codec, hierarchical=True)  # a judge of either family
            same = loaded.codec_spec == ctx.loaded.codec_spec and loaded.vocab.n_codebooks == ctx.vocab.n_codebooks
            correct = silent_correct(Context(loaded, settings, codec=ctx.codec if same else None), data)
            name = loaded.source
        names.append(name)
        for n in votes:
            votes[n] += bool(correct.get(n, False))
    for row in rows:
        row["votes_without_audio"] = votes[row["index"]]
        row["split"] = "weak" if votes[row["index"]] >= k else "strong"
    subsets = {label: [data.items[r["index"]] for r in rows if r["split"] == label] for label in ("weak", "strong")}
    files = {}
    if ctx.out is not None:
        for label, subset in subsets.items():
            atomic_write_json(ctx.out / f"mcq_{label}.json", [_portable(i) for i in subset])
            files[label] = f"mcq_{label}.json"
    return {"rule": f"weak if correct without audio for >= {k} of {len(judges)} judges", "judges": names,
            "min_votes": k, "weak": len(subsets["weak"]), "strong": len(subsets["strong"]), "files": files}


def _portable(item: Item) -> dict:
    """The input row with its audio path made absolute, so the subset file works from anywhere."""
    row = dict(item.row)
    if item.audio_field and isinstance(item.audio, str):
        row[item.audio_field] = item.audio
    if isinstance(row.get(item.audio_field), HFAudio):
        row[item.audio_field] = str(row[item.audio_field])
    return row


register(Task("mcq", "Audio MCQ", lambda ctx, spec: read_questions(spec, ctx.settings.limit), run_mcq,
              data_help="a .json/.jsonl of questions (question, choices, answer, audio path, optional domain) or "
                        "hf:NAME[:CONFIG]:SPLIT", soda_key=None, audio=True))
