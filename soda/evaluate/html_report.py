"""OUT/report.html (soda-eval): one self-contained page to look at and listen to an evaluation's results.

Built from the page pieces in soda.html (inline CSS/JS, audio players with spectrograms, charts; no outside
requests). Per-item sections show the first `ITEM_LIMIT` items of a task, with a note saying how many there are;
the NLL vector is an inline SVG bar chart, against a COMPARE run's when given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from soda.evaluate.results import SODA_PUBLISHED, read_results
from soda.html import ITEM_LIMIT, PAGE, audio_src, bar_chart, esc, fmt, limit_note, page, player, table
from tokenize_audio.shards import atomic_write_text

WORST_PAIRS = 10  # pair-task items listed as worst (largest margin for the wrong member)


def wav_name(item_id: str) -> str:
    """The file name soda-eval gives a generated item (soda.evaluate.tts.judge_speech)."""
    return re.sub(r"[^\w.-]", "_", str(item_id)) + ".wav"


# --- soda-eval ---------------------------------------------------------------------------------
def read_items(out: Path, name: str, entry: dict) -> list[dict]:
    path = out / (entry.get("items_file") or f"items/{name}.jsonl")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _reference_audio(name: str, entry: dict) -> dict[str, str]:
    """Item id -> reference audio (TTS: the voice prompt; S2ST: the source speech), re-read from the task's data
    file when the items do not carry it (paths as soda-eval read them, relative to its working directory); {} when
    that file is gone or unreadable."""
    spec = (entry.get("settings") or {}).get("data")
    if not spec:
        return {}
    try:
        if name == "tts":
            from soda.evaluate.tasks import Skips
            from soda.evaluate.tts import read_prompts

            return {p.id: str(Path(p.voice_audio).resolve()) for p in read_prompts(spec, Skips()) if p.voice_audio}
        if name == "s2st":
            from tokenize_audio.s2st import read_pairs

            return {p.id: str(Path(p.source_audio).resolve()) for p in read_pairs(spec, None).pairs
                    if isinstance(p.source_audio, (str, Path))}
    except Exception:  # noqa: BLE001 -- the page shows "not available" instead of failing soda-eval
        return {}
    return {}


def _item_wer(reference: str, hypothesis: str) -> float | None:
    try:
        from soda.evaluate.asr import normalize, word_errors

        return word_errors([reference], [hypothesis])["wer"] if normalize(reference) else None
    except Exception:  # noqa: BLE001 -- jiwer missing: the column shows "–"
        return None


def speech_section(out: Path, name: str, title: str, entry: dict) -> str:
    """TTS / S2ST: per item the prompt text, reference and generated speech, spectrograms, transcript, ending."""
    items = read_items(out, name, entry)
    shown = items[:ITEM_LIMIT]
    refs = _reference_audio(name, entry) if shown and not any(
        i.get("voice_audio") or i.get("source_audio") for i in shown) else {}
    parts = [f"<h2 id=\"items-{esc(name)}\">{esc(title)}: items</h2>",
             limit_note(len(shown), len(items), entry.get("items_file") or f"items/{name}.jsonl")]
    for i in shown:
        ref = i.get("voice_audio") or i.get("source_audio") or refs.get(i.get("id"))
        generated = out / name / wav_name(i.get("id"))
        if name == "tts":
            texts = [("text", i.get("text")), ("transcript of the output", i.get("transcript"))]
            score = f"WER {fmt(_item_wer(i.get('text') or '', i.get('transcript') or ''), True)}%"
            ref_label = "voice prompt"
        else:
            texts = [("source text", i.get("source_text")), ("transcribed source", i.get("transcribed_source")),
                     ("reference translation", i.get("reference")), ("generated translation", i.get("translation")),
                     ("transcript of the output", i.get("asr_transcript"))]
            score = f"sentence BLEU {fmt(_sentence_bleu(i.get('reference'), i.get('asr_transcript')))}"
            ref_label = "source speech"
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in texts if v is not None)
        similarity = "" if i.get("similarity") is None else f", speaker similarity {fmt(i['similarity'])}"
        parts.append(f"<div class=\"item\"><b>{esc(i.get('id'))}</b> — {esc(score)}{esc(similarity)}, "
                     f"{fmt(i.get('seconds'))} s, ended: <code>{esc(i.get('ended'))}</code>"
                     f"<table>{rows}</table><div class=\"row\">{player(ref_label, ref, out)}"
                     f"{player('generated', generated if generated.is_file() else None, out)}</div></div>")
    return "\n".join(parts)


def _sentence_bleu(reference, hypothesis) -> float | None:
    if not reference:
        return None
    try:
        import sacrebleu

        from soda.evaluate.asr import normalize

        return sacrebleu.sentence_bleu(normalize(hypothesis or ""), [normalize(reference)]).score
    except Exception:  # noqa: BLE001 -- sacrebleu missing: "–"
        return None


def asr_section(out: Path, name: str, title: str, entry: dict) -> str:
    items = read_items(out, name, entry)
    shown = items[:ITEM_LIMIT]
    rows = []
    for i in shown:
        wer = _item_wer(i.get("reference") or "", i.get("hypothesis") or "")
        audio = i.get("audio")
        cell = (f"<audio controls preload=\"metadata\" src=\"{esc(audio_src(audio, out))}\"></audio>"
                if audio and audio_src(audio, out) else "")
        rows.append([esc(i.get("id")), esc(i.get("reference")), esc(i.get("hypothesis")), fmt(wer, True),
                     f"<code>{esc(i.get('ended'))}</code>"] + ([cell] if any(r.get("audio") for r in shown) else []))
    header = ["id", "reference", "transcript", "WER %", "ended"] + (["audio"] if any(r.get("audio") for r in shown)
                                                                     else [])
    return "\n".join([f"<h2 id=\"items-{esc(name)}\">{esc(title)}: items</h2>",
                      limit_note(len(shown), len(items), entry.get("items_file") or f"items/{name}.jsonl"),
                      table(header, rows, {3})])


def mcq_section(name: str, title: str, entry: dict) -> str:
    ac = entry.get("audio_contribution") or {}
    generated = (entry.get("settings") or {}).get("mode") == "generate"
    # the other scores of the same answers: strict parsing of generated ones, raw-sum and PMI (when measured: not for
    # an encoder-projector model) of likelihoods
    others = [("accuracy_strict", "strict")] if generated else [("accuracy_raw", "raw-sum")] + (
        [("accuracy_pmi", "PMI")] if "accuracy_pmi" in entry else [])
    rows = [[esc(d), fmt(v.get("accuracy"), True)] + [fmt(v.get(k), True) for k, _ in others]
            + [fmt(v.get("accuracy_silence"), True), fmt(v.get("chance"), True), f"{v.get('count', 0):,}"]
            for d, v in (entry.get("by_domain") or {}).items()]
    rows.append(["<b>all</b>", fmt(entry.get("value"), True)] + [fmt(entry.get(k), True) for k, _ in others]
                + [fmt(ac.get("accuracy_silence"), True), fmt(entry.get("chance"), True), f"{entry.get('count', 0):,}"])
    note = (f"<p class=\"note\">Silence control: {esc(ac.get('condition'))}. {ac.get('correct_without_audio', 0)} "
            f"items right without audio, {ac.get('correct_only_with_audio', 0)} only with it."
            + (f" With another item's clip: {fmt(ac['accuracy_mismatched'], True)}%."
               if ac.get("accuracy_mismatched") is not None else "")
            + (f" Mean soft score (log p(answer | audio) − log p(answer | silence)): {ac['mean_soft_score']:.3f}."
               if ac.get("mean_soft_score") is not None else "") + "</p>") if ac else ""
    header = ["domain", "official accuracy" if generated else "accuracy"] + [f"{label} accuracy" for _, label in others]
    header += ["with silence", "chance", "items"]
    return "\n".join([f"<h2 id=\"items-{esc(name)}\">{esc(title)}: accuracy by domain (%)</h2>",
                      table(header, rows, set(range(1, len(header)))), note])


def pairs_section(out: Path, name: str, title: str, entry: dict) -> str:
    items = read_items(out, name, entry)
    parts = [f"<h2 id=\"items-{esc(name)}\">{esc(title)}</h2>"]
    if entry.get("by_group"):
        rows = [[esc(g), fmt(v.get("accuracy"), True), f"{v.get('count', 0):,}"] for g, v in entry["by_group"].items()]
        parts.append(table(["group", "accuracy %", "pairs"], rows, {1, 2}))
    scored = [i for i in items if isinstance(i.get("good"), (int, float)) and isinstance(i.get("bad"), (int, float))]
    worst = sorted((i for i in scored if not i.get("correct")), key=lambda i: i["good"] - i["bad"])[:WORST_PAIRS]
    if worst:
        parts.append(f"<p>Worst items (the wrong member preferred by the largest margin; {len(worst)} of "
                     f"{sum(not i.get('correct') for i in scored):,} wrong):</p>")
        parts.append(table(["id", "group", "score good", "score bad", "margin"],
                           [[esc(i.get("id")), esc(i.get("group")), fmt(i["good"]), fmt(i["bad"]),
                             fmt(i["good"] - i["bad"])] for i in worst], {2, 3, 4}))
    elif scored:
        parts.append("<p>Every pair scored right.</p>")
    return "\n".join(parts)


def results_table(results: dict, tasks: dict) -> str:
    size = (results.get("model") or {}).get("soda_size")
    header = ["task", "metric", "result", "items", "skipped"] + ([f"SODA-{size}"] if size else [])
    rows = []
    for name, r in (results.get("tasks") or {}).items():
        task = tasks.get(name)
        title = task.title if task else name
        percent = task.percent if task else bool(r.get("percent", False))
        lower = " ↓" if task is not None and task.lower_is_better else ""
        lines = [(r.get("metric", "") + lower, r.get("value"), percent, r.get("count", 0), task and task.soda_key)]
        lines += [(a["metric"], a.get("value"), a.get("percent", False), a.get("count", 0), a.get("soda_key"))
                  for a in r.get("also", [])]
        for metric, value, pct, count, key in lines:
            row = [f"<a href=\"#items-{esc(name)}\">{esc(title)}</a>", esc(metric), fmt(value, pct), f"{count:,}",
                   f"{r.get('skipped_count', 0):,}"]
            if size:
                row.append(fmt(SODA_PUBLISHED[size].get(key) if key else None))
            rows.append(row)
    note = "" if size else ("<p class=\"note\">No SODA release has this model's shape, so no published numbers are "
                            "shown beside it (SODA published 135M, 600M, 1.7B and 4B).</p>")
    return table(header, rows, {2, 3, 4, 5}) + note


def nll_vector(entry: dict) -> dict[str, float]:
    return {k: float(v) for k, v in (entry.get("nll_by_group") or {}).items()}


def nll_section(out: Path, results: dict, compare: Path | None) -> str:
    entry = (results.get("tasks") or {}).get("nll")
    if not entry:
        return ""
    label = Path(out).resolve().name or "this run"
    series = {label: nll_vector(entry)}
    bits = {label: entry.get("bits_per_audio_second")}
    if compare is not None:
        other = ((read_results(compare) or {}).get("tasks") or {}).get("nll")
        if other:
            name = Path(compare).resolve().name
            name = name if name != label else f"{name} (compared)"
            series[name] = nll_vector(other)
            bits[name] = other.get("bits_per_audio_second")
    lines = "; ".join(f"{esc(k)}: {fmt(v)} bits per audio-second" for k, v in bits.items())
    return "\n".join(["<h2 id=\"items-nll\">NLL vector (nats/token)</h2>", bar_chart(series, "nats/token"),
                      f"<p>{lines}.</p>"])


def build_eval_page(out: Path, compare: Path | None = None) -> str:
    from soda.evaluate.tasks import available

    out = Path(out)
    results = read_results(out) or {"tasks": {}}
    tasks = available()
    model = results.get("model") or {}
    checkpoint = results.get("checkpoint") or {}
    body = [f"<p>Checkpoint <code>{esc(checkpoint.get('path') or model.get('source'))}</code>; codec "
            f"{esc(model.get('codec'))}; {model.get('parameters') or 0:,} parameters"
            f"{'; ' + esc(model['family']) + ' family' if model.get('family') else ''}. Accuracies and error rates "
            "in %; ↓: lower is better. Per-item rows: <code>items/TASK.jsonl</code>.</p>",
            "<h2>Results</h2>", results_table(results, tasks), nll_section(out, results, compare)]
    for name, entry in (results.get("tasks") or {}).items():
        title = tasks[name].title if name in tasks else name
        if name in ("tts", "s2st"):
            body.append(speech_section(out, name, title, entry))
        elif name == "asr":
            body.append(asr_section(out, name, title, entry))
        elif entry.get("by_domain") is not None or entry.get("audio_contribution"):
            body.append(mcq_section(name, title, entry))
        elif name != "nll" and (entry.get("by_group") or _is_pairs(out, name, entry)):
            body.append(pairs_section(out, name, title, entry))
    return page(f"soda-eval: {model.get('source', out)}", [b for b in body if b])


def _is_pairs(out: Path, name: str, entry: dict) -> bool:
    first = read_items(out, name, entry)[:1]
    return bool(first) and {"good", "bad"} <= set(first[0])


def write_eval_page(out: Path, compare: Path | None = None) -> Path:
    """Build OUT/report.html from OUT/results.json (and COMPARE/results.json's NLL vector); returns its path."""
    path = Path(out) / PAGE
    atomic_write_text(path, build_eval_page(out, compare))
    return path
