"""Shared plotting helpers: Agg backend, one style, atomic PNG writes, stats → matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display, ever; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 120
KIND_COLORS = {"key": "tab:blue", "value": "tab:orange"}
KIND_LABELS = {"key": "keys", "value": "values"}
STYLE = {
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 9, "figure.titlesize": 13,
}


def figure(nrows: int = 1, ncols: int = 1, size=(10, 6), **kwargs):
    """A constrained-layout figure and a 2-D array of styled axes."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=DPI, squeeze=False, layout="constrained", **kwargs)
    for ax in axes.flat:
        _style(ax)
    return fig, axes


def blank_figure(size=(15, 10)):
    """A constrained-layout figure for gridspec layouts (add axes with `axis(fig, spec)`)."""
    return plt.figure(figsize=size, dpi=DPI, layout="constrained")


def axis(fig, spec, heatmap: bool = False):
    ax = fig.add_subplot(spec)
    heatmap_axes(ax) if heatmap else _style(ax)
    return ax


def plain_log(ax, axis_name: str = "y") -> None:
    """Log axis labelled 1, 2, 5, 10, 20 ... instead of 10^0 and 6×10^0 (readable for narrow ranges)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.yaxis if axis_name == "y" else ax.xaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def _style(ax) -> None:
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.title.set_fontsize(11)


def heatmap_axes(ax) -> None:
    ax.grid(False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)


def save(fig, out_png: str | Path) -> Path:
    """Write the figure atomically (a killed job leaves no finished-looking PNG) and close it."""
    from kvcore.atomic import atomic_path

    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return out_png


def run_title(meta: dict, what: str) -> str:
    """'SmolLM2 · lee-news — what (n tokens)' from the stats metadata (whatever of it is known)."""
    name = " · ".join(str(meta[k]) for k in ("model", "dataset") if meta.get(k))
    tokens = f" ({meta['n_tokens']:,} tokens)" if meta.get("n_tokens") else ""
    return f"{name} — {what}{tokens}" if name else f"{what}{tokens}"


def matrix(table, value: str, rows: str = "layer", cols: str = "head", **where) -> np.ndarray:
    """A dense [rows, cols] array of `value` from a long table, filtered by column == value pairs."""
    d = table.to_pydict()
    sel = [i for i in range(table.num_rows) if all(d[k][i] == v for k, v in where.items())]
    r = np.asarray([d[rows][i] for i in sel])
    c = np.asarray([d[cols][i] for i in sel])
    out = np.full((r.max() + 1, c.max() + 1), np.nan)
    out[r, c] = [d[value][i] for i in sel]
    return out


def series(table, value: str, index: str = "layer", **where) -> np.ndarray:
    d = table.to_pydict()
    sel = sorted((d[index][i], d[value][i]) for i in range(table.num_rows)
                 if all(d[k][i] == v for k, v in where.items()))
    return np.asarray([v for _, v in sel], dtype=float)


def layer_ticks(ax, n_layers: int, axis: str = "x", dense: bool = False) -> None:
    """Integer layer ticks, thinned so that they never overlap (every layer up to 48 when `dense`)."""
    step = 1 if dense and n_layers <= 48 else max(1, int(np.ceil(n_layers / 16)))
    ticks = np.arange(0, n_layers, step)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)


def kv_head_label(meta: dict, head: int) -> str:
    """'KV head 1 (q 3–5)' for GQA models, 'head 1' when every query head has its own KV head."""
    heads, kv = meta.get("num_heads"), meta.get("num_kv_heads")
    if heads and kv and heads != kv:
        g = heads // kv
        return f"KV head {head}\n(q {head * g}–{head * g + g - 1})"
    return f"head {head}"


def note(ax, text: str) -> None:
    """A centred message on an empty axis (no data for this panel)."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, wrap=True, transform=ax.transAxes,
            bbox=dict(boxstyle="round,pad=0.8", facecolor="#f4f4f4", edgecolor="#bbbbbb"))
