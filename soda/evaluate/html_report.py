"""OUT/report.html (soda-eval) and RUN/report.html (soda-train): one self-contained page to look and listen.

The page has inline CSS and JS and no outside requests: audio is linked relative to the page's folder (the
wavs soda-eval and soda-train already write there) or, for a reference outside it, embedded as a data URI
when small; spectrograms and curves are PNG data URIs drawn with matplotlib; the NLL vector is inline SVG.
Per-item sections show the first `ITEM_LIMIT` items of a task, with a note saying how many there are.
Every <audio> element records `data-duration` once its metadata loads (`data-error` when it cannot), which
the browser test reads back.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

from tokenize_audio.shards import atomic_write_text

PAGE = "report.html"
ITEM_LIMIT = 50  # items shown per task: the page stays small; the full rows are in items/TASK.jsonl
WORST_PAIRS = 10  # pair-task items listed as worst (largest margin for the wrong member)
EMBED_BYTES = 400_000  # a reference clip outside the page's folder is embedded up to this size, else left out

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;background:#fff}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #ddd;padding:.25em .5em;vertical-align:top}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.item{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.6em 0}
.item .row{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start} .item figure{margin:0}
.item figcaption{font-size:.85em;color:#555} .note{color:#666;font-size:.9em} img.spec{display:block}
.bad{color:#a00} .good{color:#070} code{background:#f5f5f5;padding:0 .2em}
"""

# Sets data-duration on each <audio> once its metadata loads (data-error when it fails): visible state for tests.
JS = """
document.querySelectorAll('audio').forEach(function(a){
  function done(){a.setAttribute('data-duration', String(a.duration));}
  a.addEventListener('loadedmetadata', done);
  a.addEventListener('error', function(){a.setAttribute('data-error', '1');});
  if (a.readyState >= 1) done(); else a.load();
});
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"
    return str(value)


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n"
            + "\n".join(body) + f"\n<script>{JS}</script>\n</body></html>\n")


def table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Rows of already-escaped cells."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"n\">{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --- pictures ----------------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spectrogram(path: Path) -> str | None:
    """A small log-magnitude spectrogram of an audio file as a PNG data URI; None if it cannot be read."""
    try:
        import soundfile as sf

        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception:  # noqa: BLE001 -- a picture is optional; the player still shows what is wrong
        return None
    wave = wave.mean(axis=1)
    if len(wave) < 256:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 1.3))
    ax.specgram(wave, NFFT=512 if len(wave) >= 512 else 256, Fs=sr, noverlap=128, cmap="magma")
    ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1)
    return _png(fig)


def line_chart(curves: dict[str, tuple[list, list]], xlabel: str, ylabel: str) -> str | None:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, (x, y) in curves.items():
        ax.plot(x, y, "o-" if len(x) < 30 else "-", label=name, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def bar_chart(series: dict[str, dict[str, float]], unit: str) -> str:
    """Inline SVG of grouped bars: one group per key (text, semantic, codebooks), one bar per series."""
    keys = list(dict.fromkeys(k for s in series.values() for k in s))
    colours = ["#3b6fb6", "#e07b39", "#4a9d5b", "#9b59b6"]
    top = max([v for s in series.values() for v in s.values() if v is not None] + [1e-9])
    width, height, pad = max(320, 70 * len(keys)), 220, 40
    group = (width - pad) / max(len(keys), 1)
    bar = group * 0.8 / max(len(series), 1)
    parts = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height + 50}\" role=\"img\">"]
    for g, key in enumerate(keys):
        for s, (name, values) in enumerate(series.items()):
            v = values.get(key)
            if v is None:
                continue
            h = (height - 20) * v / top
            x, y = pad + g * group + s * bar, height - h
            parts.append(f"<rect x=\"{x:.1f}\" y=\"{y:.1f}\" width=\"{bar * 0.95:.1f}\" height=\"{h:.1f}\" "
                         f"fill=\"{colours[s % len(colours)]}\"><title>{esc(name)} {esc(key)}: {v:.3f} {esc(unit)}"
                         f"</title></rect><text x=\"{x + bar / 2:.1f}\" y=\"{y - 3:.1f}\" font-size=\"9\" "
                         f"text-anchor=\"middle\">{v:.2f}</text>")
        parts.append(f"<text x=\"{pad + (g + 0.4) * group:.1f}\" y=\"{height + 14}\" font-size=\"11\" "
                     f"text-anchor=\"middle\">{esc(key)}</text>")
    parts.append(f"<line x1=\"{pad}\" y1=\"{height}\" x2=\"{width}\" y2=\"{height}\" stroke=\"#333\"/>"
                 f"<text x=\"4\" y=\"12\" font-size=\"10\">{esc(unit)}</text>")
    for s, name in enumerate(series):
        parts.append(f"<rect x=\"{pad + 150 * s}\" y=\"{height + 28}\" width=\"10\" height=\"10\" "
                     f"fill=\"{colours[s % len(colours)]}\"/><text x=\"{pad + 150 * s + 14}\" y=\"{height + 37}\" "
                     f"font-size=\"11\">{esc(name)}</text>")
    return "".join(parts) + "</svg>"


# --- audio -------------------------------------------------------------------------------------
def audio_src(path, folder: Path) -> str | None:
    """How the page at `folder` refers to an audio file: a relative link inside the folder, a data URI for a small
    file outside it, None when there is no such file (or it is too large to embed)."""
    if not path:
        return None
    path = Path(path)
    if not path.is_absolute():
        path = folder / path
    if not path.is_file():
        return None
    try:
        rel = path.resolve().relative_to(folder.resolve())
        return "/".join(rel.parts)
    except ValueError:
        pass
    if path.stat().st_size > EMBED_BYTES:
        return None
    kind = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg"}.get(
        path.suffix.lower(), "audio/wav")
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def player(label: str, path, folder: Path) -> str:
    src = audio_src(path, folder)
    if src is None:
        return f"<figure><figcaption>{esc(label)}: not available</figcaption></figure>"
    file = Path(path) if Path(path).is_absolute() else folder / path
    spec = spectrogram(file)
    img = f"<img class=\"spec\" alt=\"spectrogram of {esc(label)}\" src=\"{spec}\">" if spec else ""
    return (f"<figure><figcaption>{esc(label)}</figcaption><audio controls preload=\"metadata\" "
            f"src=\"{esc(src)}\"></audio>{img}</figure>")


def wav_name(item_id: str) -> str:
    """The file name soda-eval gives a generated item (soda.evaluate.tts.judge_speech)."""
    return re.sub(r"[^\w.-]", "_", str(item_id)) + ".wav"


def limit_note(shown: int, total: int, where: str) -> str:
    if total <= shown:
        return ""
    return f"<p class=\"note\">Showing the first {shown} of {total:,} items; all of them are in {esc(where)}.</p>"


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
    rows = [[esc(d), fmt(v.get("accuracy"), True), fmt(v.get("accuracy_silence"), True),
             fmt(v.get("accuracy_raw"), True), fmt(v.get("chance"), True), f"{v.get('count', 0):,}"]
            for d, v in (entry.get("by_domain") or {}).items()]
    rows.append(["<b>all</b>", fmt(entry.get("value"), True), fmt(ac.get("accuracy_silence"), True),
                 fmt(entry.get("accuracy_raw"), True), fmt(entry.get("chance"), True), f"{entry.get('count', 0):,}"])
    note = (f"<p class=\"note\">Silence control: {esc(ac.get('condition'))}. {ac.get('correct_without_audio', 0)} "
            f"items right without audio, {ac.get('correct_only_with_audio', 0)} only with it.</p>") if ac else ""
    return "\n".join([f"<h2 id=\"items-{esc(name)}\">{esc(title)}: accuracy by domain (%)</h2>",
                      table(["domain", "accuracy", "with silence", "raw-sum accuracy", "chance", "items"], rows,
                            {1, 2, 3, 4, 5}), note])


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
    from soda.evaluate.report import SODA_PUBLISHED

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
        from soda.evaluate.report import read_results

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
    from soda.evaluate.report import read_results
    from soda.evaluate.tasks import available

    out = Path(out)
    results = read_results(out) or {"tasks": {}}
    tasks = available()
    model = results.get("model") or {}
    checkpoint = results.get("checkpoint") or {}
    body = [f"<p>Checkpoint <code>{esc(checkpoint.get('path') or model.get('source'))}</code>; codec "
            f"{esc(model.get('codec'))}; {model.get('parameters') or 0:,} parameters. Accuracies and error rates in %; "
            "↓: lower is better. Per-item rows: <code>items/TASK.jsonl</code>.</p>",
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


# --- soda-train --------------------------------------------------------------------------------
def samples_section(run: Path) -> str:
    """The newest RUN/samples/step_*/samples.json: per sample its prompt, player, spectrogram, text and ending."""
    steps = sorted((run / "samples").glob("step_*/samples.json"))
    if not steps:
        return ""
    path = steps[-1]
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        return f"<h2>Samples</h2><p class=\"note\">{esc(path)}: unreadable ({esc(err)}).</p>"
    folder = path.parent
    parts = [f"<h2>Samples at {esc(folder.name.replace('_', ' '))}</h2>"]
    for s in samples[:ITEM_LIMIT]:
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(s.get(k))}</td></tr>" for k in ("prompt", "text")
                       if s.get(k))
        audio = player("generated", folder / s["wav"], run) if s.get("wav") else ""
        parts.append(f"<div class=\"item\"><b>{esc(s.get('name'))}</b> ({esc(s.get('kind'))}) — "
                     f"{fmt(s.get('seconds'))} s, ended: <code>{esc(s.get('ended'))}</code><table>{rows}</table>"
                     f"<div class=\"row\">{audio}</div></div>")
    return "\n".join(parts)


def build_run_page(run: Path, rows: list[dict]) -> str:
    from soda.train.report import series

    run = Path(run)
    keys = sorted({k for r in rows for k in r if r.get(k) not in (None, "")})
    body = [f"<p>Run <code>{esc(run.resolve())}</code>: {len(rows):,} logged rows; full table in "
            "<code>metrics.csv</code>.</p>"]
    loss = line_chart({k: series(rows, k) for k in ("train/loss", "val/loss")}, "optimizer step",
                      "loss (nats/token)")
    if loss:
        body += ["<h2>Loss</h2>", f"<img alt=\"loss curves\" src=\"{loss}\">"]
    nll_keys = [k for k in keys if k.startswith("val/nll_")]
    nll = line_chart({k.removeprefix("val/nll_"): series(rows, k) for k in nll_keys}, "optimizer step",
                     "validation NLL (nats/token)")
    if nll:
        body += ["<h2>NLL vector over steps</h2>", f"<img alt=\"NLL vector over steps\" src=\"{nll}\">"]
        last = {}
        for k in nll_keys:
            x, y = series(rows, k)
            if y:
                last[k.removeprefix("val/nll_")] = y[-1]
        body.append(bar_chart({"last validation": last}, "nats/token"))
        x, y = series(rows, "val/bits_per_audio_second")
        if y:
            body.append(f"<p>Last validation: {fmt(y[-1])} bits per audio-second (step {x[-1]:,}).</p>")
    body.append(samples_section(run))
    return page(f"soda-train: {run.resolve().name}", [b for b in body if b])


def write_run_page(run: Path, rows: list[dict]) -> Path:
    """RUN/report.html from the merged metrics rows and RUN/samples/; returns its path."""
    path = Path(run) / PAGE
    atomic_write_text(path, build_run_page(run, rows))
    return path

