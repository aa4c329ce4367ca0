"""What a run leaves for people: one metrics.csv over all attempts, a loss-curve PNG, and report.html (loss curves,
the NLL vector over steps and the newest samples from RUN/samples/, from soda.html's page pieces)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from soda.html import ITEM_LIMIT, PAGE, bar_chart, esc, fmt, line_chart, page, player
from tokenize_audio.shards import atomic_write_bytes, atomic_write_text


def merged_metrics(out: Path) -> list[dict]:
    """Rows of logs/version_*/metrics.csv in order; a resumed attempt replaces the steps it re-ran."""
    versions = sorted((Path(out) / "logs").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[1]))
    rows: list[dict] = []
    for path in versions:
        with open(path, newline="") as f:
            new = [r for r in csv.DictReader(f)]
        if new:
            first = min(int(r["step"]) for r in new if r.get("step"))
            rows = [r for r in rows if int(r["step"]) < first] + new
    return rows


def write_reports(out: Path) -> str:
    out = Path(out)
    rows = merged_metrics(out)
    if not rows:
        return "no metrics logged"
    keys = sorted({k for r in rows for k in r if r[k] != ""} - {"step"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", *keys], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "metrics.csv", buf.getvalue())
    plot_loss(rows, out / "loss.png")
    write_run_page(out, rows)
    return f"metrics {out / 'metrics.csv'}, loss curve {out / 'loss.png'}, page {out / 'report.html'}"


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_loss(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        x, y = series(rows, key)
        if x:
            ax.plot(x, y, style, label=key, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


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
