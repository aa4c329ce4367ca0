"""What a run leaves for people: one metrics.csv over all attempts, a loss-curve PNG, and report.html (loss curves,
the NLL vector over steps and the newest samples from RUN/samples/, built by soda.evaluate.html_report)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

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
    from soda.evaluate.html_report import write_run_page

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
