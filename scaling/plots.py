"""PNG plots of a `soda-scaling fit` result: IsoFLOP curves, optima against compute, Approach 3 residuals.

Everything is drawn from `fit.json` alone (it holds the points, the parabolas, the power-law
curves and their bootstrap bands), on matplotlib's Agg canvas: no pyplot state, no display, and
the caller's backend (a notebook's, say) is left alone. Files are written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scaling.fit import FIT_FILE
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_write_bytes


def load_fit(fit_dir) -> dict:
    path = Path(fit_dir) / FIT_FILE
    if not path.is_file():
        raise SodaError(f"{path} not found; run `soda-scaling fit RESULTS.csv --out {fit_dir}` first")
    try:
        fit = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SodaError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in ("points", "approach2", "approach3", "curves") if k not in fit]
    if missing:
        raise SodaError(f"{path}: not a soda-scaling fit (missing {', '.join(missing)})")
    return fit


def _budget_colors(fit) -> dict:
    budgets = sorted({p["budget"] for p in fit["points"]})
    cmap = colormaps["viridis"]
    return {c: cmap(i / max(1, len(budgets) - 1) * 0.9) for i, c in enumerate(budgets)}


def _interval(fit, approach, key) -> str:
    ci = fit[approach].get(f"{key}_ci")
    return f"{fit[approach][key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def isoflop_figure(fit) -> Figure:
    """Loss against N and against D for each budget, with its Huber parabola and minimum."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    colors = _budget_colors(fit)
    optima = {o["budget"]: o for o in fit["approach2"]["optima"]}
    for ax, name, label in zip(fig.subplots(1, 2), ("params", "tokens"), ("parameters N", "training tokens D")):
        for c, color in colors.items():
            pts = [p for p in fit["points"] if p["budget"] == c]
            x = np.array([p[name] for p in pts])
            ax.scatter(x, [p["loss"] for p in pts], color=color, s=18, label=f"{c:.2g} FLOPs")
            parabola = optima[c][f"{name}_parabola"]
            u = np.linspace(np.log(x.min()) - 0.2, np.log(x.max()) + 0.2, 100) - parabola["center"]
            ax.plot(np.exp(u + parabola["center"]), np.polyval(parabola["coef"][::-1], u), color=color, lw=1)
            if optima[c][name] is not None:
                ax.scatter([optima[c][name]], [optima[c]["loss"]], color=color, marker="*", s=160,
                           edgecolor="black", linewidth=0.6, zorder=3)
        ax.set(xscale="log", xlabel=label, ylabel="loss", title=f"IsoFLOP curves: loss vs {name}")
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="budget (stars: minima)", title_fontsize=7)
    return fig


def optima_figure(fit) -> Figure:
    """Per-budget optima against C with both approaches' compute-optimal laws and 95% bootstrap bands."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    flops = np.array(fit["curves"]["flops"])
    optima = [o for o in fit["approach2"]["optima"] if o["params"] is not None]
    for ax, name, key, star in zip(fig.subplots(1, 2), ("params", "tokens"), ("a", "b"), ("N*", "D*")):
        for approach, style, label in (("approach2", "-", "Approach 2"), ("approach3", "--", "Approach 3")):
            if fit[approach][key] is None:  # not determined (fit.json says why)
                continue
            curve = fit["curves"][approach]
            label = f"{label}: {star} ∝ C^{_interval(fit, approach, key)}"
            color = ax.plot(flops, np.array(curve[name], float), style, label=label)[0].get_color()
            if f"{name}_band" in curve:
                ax.fill_between(flops, *np.array(curve[f"{name}_band"], float), color=color, alpha=0.15, lw=0)
            predicted = np.array([p[approach][name] for p in fit["predictions"]], float)
            ax.scatter([p["flops"] for p in fit["predictions"]], predicted, color=color, marker="D", s=24, zorder=3)
        inner = [o for o in optima if o["interior"]]
        outer = [o for o in optima if not o["interior"]]
        ax.scatter([o["budget"] for o in inner], [o[name] for o in inner], color="black", s=22, zorder=4,
                   label="IsoFLOP minima")
        if outer:
            ax.scatter([o["budget"] for o in outer], [o[name] for o in outer], facecolor="none", edgecolor="black",
                       s=22, zorder=4, label="minima outside the sampled range")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=f"compute-optimal {star}",
               title=f"{'Parameters' if name == 'params' else 'Tokens'} vs compute (diamonds: predictions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def residuals_figure(fit) -> Figure:
    """Approach 3's relative residuals against N and D; points beyond the Huber threshold were down-weighted."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    colors = _budget_colors(fit)
    delta = 100 * np.expm1(fit["approach3"]["huber_delta"])
    for ax, name in zip(fig.subplots(1, 2), ("params", "tokens")):
        for c, color in colors.items():
            pts = [p for p in fit["points"] if p["budget"] == c]
            ax.scatter([p[name] for p in pts], [100 * (p["loss"] / p["approach3_loss"] - 1) for p in pts],
                       color=color, s=16, label=f"{c:.2g} FLOPs")
        for y in (-delta, 0, delta):
            ax.axhline(y, color="grey", lw=0.8, ls="-" if y == 0 else ":")
        ax.set(xscale="log", xlabel=name, ylabel="loss / fit - 1 (%)",
               title=f"Approach 3 residuals (dotted: Huber threshold ±{delta:.2g}%)")
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


PLOTS = {"isoflop.png": isoflop_figure, "optima.png": optima_figure, "residuals.png": residuals_figure}


def write_plots(fit_dir) -> list[Path]:
    """Draw every plot of FIT_DIR/fit.json into FIT_DIR; returns the PNG paths."""
    fit = load_fit(fit_dir)
    paths = []
    for name, draw in PLOTS.items():
        fig = draw(fit)
        buf = io.BytesIO()
        FigureCanvasAgg(fig)
        fig.savefig(buf, format="png", dpi=120)
        atomic_write_bytes(Path(fit_dir) / name, buf.getvalue())
        paths.append(Path(fit_dir) / name)
    return paths
