"""The pieces of soda's self-contained HTML pages (RUN/report.html, OUT/report.html): layout, tables, charts, audio.

A page has inline CSS and JS and makes no outside requests: audio is linked relative to the page's folder or, for
a file outside it, embedded as a data URI when small; spectrograms and curves are PNG data URIs drawn with
matplotlib; bar charts are inline SVG. Every <audio> element records `data-duration` once its metadata loads
(`data-error` when it cannot), which the browser test reads back. Both pages build on this module, so training
(soda.train.report) need not import evaluation to write its page.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

PAGE = "report.html"
ITEM_LIMIT = 50  # items shown per section: the page stays small; the full rows are in the files beside it
EMBED_BYTES = 400_000  # a clip outside the page's folder is embedded up to this size, else left out

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
def png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pyplot():
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 1.3))
    ax.specgram(wave, NFFT=512 if len(wave) >= 512 else 256, Fs=sr, noverlap=128, cmap="magma")
    ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1)
    return png(fig)


def line_chart(curves: dict[str, tuple[list, list]], xlabel: str, ylabel: str) -> str | None:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, (x, y) in curves.items():
        ax.plot(x, y, "o-" if len(x) < 30 else "-", label=name, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


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


def limit_note(shown: int, total: int, where: str) -> str:
    if total <= shown:
        return ""
    return f"<p class=\"note\">Showing the first {shown} of {total:,} items; all of them are in {esc(where)}.</p>"
