"""Plots of the cache itself, drawn from the statistics tables (kvcore.stats)."""

from __future__ import annotations

import numpy as np

from kvcore.plots._common import (KIND_COLORS, KIND_LABELS, figure, heatmap_axes, kv_head_label, layer_ticks,
                                  matrix, run_title, save, series)
from kvcore.stats import KINDS, SPARSITY_REL, stats_meta


def plot_layer_statistics(stats: dict, out_png) -> dict:
    """Six panels across layers: sparsity, K–V correlation, std, mean |x|, kurtosis, outlier channels."""
    layers = stats["layers"]
    meta = stats_meta(stats)
    data = {"layer": series(layers, "layer", kind="key").astype(int)}
    fields = ("sparsity", "std", "mean_abs", "mean", "kurtosis", "outlier_ratio")
    for kind in KINDS:
        for f in fields:
            data[f"{kind}_{f}"] = series(layers, f, kind=kind)
    data["kv_correlation"] = series(layers, "kv_correlation", kind="key")
    data["kv_norm_correlation"] = series(layers, "kv_norm_correlation", kind="key")
    x = data["layer"]
    fig, axes = figure(2, 3, size=(16, 9))
    ax = axes[0, 0]
    for kind in KINDS:
        ax.plot(x, 100 * data[f"{kind}_sparsity"], "o-", ms=3, color=KIND_COLORS[kind], label=KIND_LABELS[kind])
    ax.set(title=f"Sparsity: entries with |x| < {SPARSITY_REL:g} × the head's RMS", ylabel="% of entries")
    ax = axes[0, 1]
    ax.plot(x, data["kv_correlation"], "o-", ms=3, color="tab:purple", label="entries (same token, channel)")
    ax.plot(x, data["kv_norm_correlation"], "s--", ms=3, color="tab:green", label="norms ‖k‖ vs ‖v‖ per token")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Key–value correlation (Pearson)", ylabel="correlation", ylim=(-1.05, 1.05))
    ax = axes[0, 2]
    for kind in KINDS:
        ax.plot(x, data[f"{kind}_std"], "o-", ms=3, color=KIND_COLORS[kind], label=KIND_LABELS[kind])
    ax.set(title="Standard deviation of entries", ylabel="std (cache units)")
    _log_if_wide(ax, [data["key_std"], data["value_std"]])
    ax = axes[1, 0]
    for kind in KINDS:
        ax.plot(x, data[f"{kind}_mean_abs"], "o-", ms=3, color=KIND_COLORS[kind], label=f"{KIND_LABELS[kind]}: mean |x|")
        ax.plot(x, data[f"{kind}_mean"], ":", color=KIND_COLORS[kind], label=f"{KIND_LABELS[kind]}: mean x")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Mean magnitude and mean of entries", ylabel="cache units")
    ax = axes[1, 1]
    for kind in KINDS:
        ax.plot(x, data[f"{kind}_kurtosis"], "o-", ms=3, color=KIND_COLORS[kind], label=KIND_LABELS[kind])
    ax.set_yscale("symlog", linthresh=1)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Excess kurtosis of entries (0 = Gaussian; heavy tails ≫ 0)", ylabel="excess kurtosis (symlog)")
    ax = axes[1, 2]
    for kind in KINDS:
        ax.plot(x, data[f"{kind}_outlier_ratio"], "o-", ms=3, color=KIND_COLORS[kind], label=KIND_LABELS[kind])
    ax.set_yscale("log")
    ax.set(title="Outlier channels: max / median channel mean |x|", ylabel="ratio (log)")
    for ax in axes.flat:
        ax.set_xlabel("layer")
        layer_ticks(ax, len(x))
        ax.legend(loc="best")
    fig.suptitle(run_title(meta, "KV cache statistics across layers"))
    save(fig, out_png)
    return data


def _log_if_wide(ax, arrays) -> None:
    v = np.concatenate([a[np.isfinite(a)] for a in arrays])
    if v.size and v.min() > 0 and v.max() / v.min() > 30:
        ax.set_yscale("log")


def plot_head_sparsity(stats: dict, out_png) -> dict:
    """Heatmaps layer × KV head of the sparsity of keys and of values, on one colour scale."""
    heads = stats["heads"]
    meta = stats_meta(stats)
    data = {kind: 100 * matrix(heads, "sparsity", kind=kind) for kind in KINDS}
    vmax = max(np.nanmax(data["key"]), np.nanmax(data["value"]), 1e-9)
    n_layers, n_heads = data["key"].shape
    fig, axes = figure(1, 2, size=(max(8, 2.2 * n_heads * 2 + 3), max(6, 0.28 * n_layers + 2)))
    for ax, kind in zip(axes[0], KINDS):
        heatmap_axes(ax)
        im = ax.imshow(data[kind], aspect="auto", cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
        _annotate(ax, data[kind], "{:.1f}", vmax)
        ax.set(title=f"{KIND_LABELS[kind].capitalize()}", xlabel="KV head", ylabel="layer")
        ax.set_xticks(range(n_heads), [kv_head_label(meta, h) for h in range(n_heads)], fontsize=8)
        layer_ticks(ax, n_layers, "y")
    cb = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9)
    cb.set_label(f"% of entries with |x| < {SPARSITY_REL:g} × that head's RMS")
    fig.suptitle(run_title(meta, "Sparsity per layer and KV head"))
    save(fig, out_png)
    return data


def _annotate(ax, m, fmt: str, vmax: float, limit: int = 400) -> None:
    """Write each cell's value when the grid is small enough to read."""
    if m.size > limit:
        return
    for (r, c), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * vmax else "black")


def plot_weight_magnitude_distribution(stats: dict, out_png) -> dict:
    """Histograms of |K| and |V| entries on log axes, whole cache and first/middle/last layer."""
    from kvcore.stats import HIST_PER_DECADE

    hist = stats["histograms"].to_pandas()
    heads = stats["heads"].to_pandas()
    meta = stats_meta(stats)
    n_layers = int(hist["layer"].max()) + 1
    pick = sorted({0, n_layers // 2, n_layers - 1})
    edges = np.sort(hist["hi"].unique())[:-1]  # inner edges (bin 0 and the overflow bin have an open end)
    data = {"edges": edges}
    fig, axes = figure(1, 2, size=(14, 6), sharey=True)
    for ax, kind in zip(axes[0], KINDS):
        h = hist[hist.kind == kind]
        total = h.groupby("bin")["count"].sum().sort_index().to_numpy()
        data[f"{kind}_counts"] = total
        n = total.sum()
        under = total[0] / n
        inner = total[1:-1]
        lo_e, hi_e = edges[:-1], edges[1:]
        ax.stairs(inner / n * HIST_PER_DECADE, edges, fill=True, alpha=0.35, color=KIND_COLORS[kind],
                  label="all layers")
        for layer, style in zip(pick, ("-", "--", ":")):
            c = h[h.layer == layer].groupby("bin")["count"].sum().sort_index().to_numpy()
            ax.stairs(c[1:-1] / c.sum() * HIST_PER_DECADE, edges, color="black", ls=style, lw=1,
                      label=f"layer {layer}")
        thr = heads[heads.kind == kind]["sparsity_threshold"]
        ax.axvspan(thr.min(), thr.max(), color="red", alpha=0.15,
                   label=f"sparsity thresholds\n({SPARSITY_REL:g} × head RMS)")
        ax.axvline(thr.median(), color="red", lw=1)
        nz = np.nonzero(inner)[0]
        if nz.size:
            ax.set_xlim(lo_e[max(nz[0] - 2, 0)], hi_e[min(nz[-1] + 2, len(hi_e) - 1)])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(title=f"|{kind[0].upper()}|: {KIND_LABELS[kind]}", xlabel=f"|{kind[0]}| (cache units, log scale)",
               ylabel="fraction of entries per decade (log)")
        txt = f"{100 * under:.2g}% of entries < {edges[0]:g} (incl. exact zeros)" if under else ""
        if total[-1]:
            txt += f"\n{100 * total[-1] / n:.2g}% ≥ {edges[-1]:g}"
        if txt:
            ax.text(0.02, 0.02, txt.strip(), transform=ax.transAxes, fontsize=8, va="bottom")
        ax.legend(loc="upper right")
        data[f"{kind}_thresholds"] = thr.to_numpy()
    fig.suptitle(run_title(meta, "Magnitude distribution of KV cache entries"))
    save(fig, out_png)
    return data


def plot_channel_outliers(stats: dict, out_png) -> dict:
    """Per-channel mean |x| (layer × channel) for keys and values, and the outlier ratio per layer."""
    import matplotlib.colors as mcolors

    ch = stats["channels"].to_pandas()
    meta = stats_meta(stats)
    n_heads = int(ch["head"].max()) + 1
    dim = int(ch["channel"].max()) + 1
    ch["col"] = ch["head"] * dim + ch["channel"]
    data = {}
    for kind in KINDS:
        data[kind] = matrix_from(ch[ch.kind == kind], "layer", "col", "mean_abs")
    both = np.concatenate([data["key"].ravel(), data["value"].ravel()])
    pos = both[both > 0]
    norm = mcolors.LogNorm(vmin=max(pos.min(), pos.max() * 1e-4), vmax=pos.max()) if pos.size else None
    n_layers = data["key"].shape[0]
    fig = _figure_grid()
    gs = fig.add_gridspec(2, 3, height_ratios=[3, 2], width_ratios=[1, 1, 0.04], hspace=0.35, wspace=0.15)
    axes = [fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])]
    for ax, kind in zip(axes, KINDS):
        heatmap_axes(ax)
        im = ax.imshow(data[kind], aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
        for h in range(1, n_heads):
            ax.axvline(h * dim - 0.5, color="white", lw=0.8)
        ax.set(title=f"{KIND_LABELS[kind].capitalize()}: mean |x| per channel", ylabel="layer",
               xlabel=f"channel (KV heads side by side, {dim} channels each)")
        ax.set_xticks([h * dim + dim / 2 - 0.5 for h in range(n_heads)], [f"head {h}" for h in range(n_heads)])
        layer_ticks(ax, n_layers, "y")
    cb = fig.colorbar(im, cax=fig.add_subplot(gs[0, 2]))
    cb.set_label("mean |x| over tokens (log colour)")
    ax = fig.add_subplot(gs[1, 0:2])
    _style_axis(ax)
    for kind in KINDS:
        r = series(stats["layers"], "outlier_ratio", kind=kind)
        data[f"{kind}_outlier_ratio"] = r
        ax.plot(np.arange(len(r)), r, "o-", ms=3, color=KIND_COLORS[kind], label=KIND_LABELS[kind])
    ax.set_yscale("log")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set(title="Outlier ratio per layer: largest channel mean |x| ÷ median channel mean |x| "
                 "(keys ≫ values: quantize keys per channel)",
           xlabel="layer", ylabel="max / median (log)")
    layer_ticks(ax, n_layers)
    ax.legend()
    fig.suptitle(run_title(meta, "Channel magnitudes: outlier channels in keys and values"))
    save(fig, out_png)
    return data


def _figure_grid(size=(15, 10)):
    import matplotlib.pyplot as plt

    from kvcore.plots._common import DPI

    return plt.figure(figsize=size, dpi=DPI)


def _style_axis(ax) -> None:
    from kvcore.plots._common import _style

    _style(ax)


def matrix_from(df, rows: str, cols: str, value: str) -> np.ndarray:
    out = np.full((int(df[rows].max()) + 1, int(df[cols].max()) + 1), np.nan)
    out[df[rows].to_numpy(), df[cols].to_numpy()] = df[value].to_numpy()
    return out


def plot_key_norm_by_position(stats: dict, out_png) -> dict:
    """Mean key (and value) norm against token position: heatmap layer × position, lines for a few layers."""
    import matplotlib.colors as mcolors

    ps = stats["positions"].to_pandas()
    meta = stats_meta(stats)
    data = {}
    for kind in KINDS:
        # mean over heads of the per-head mean norms (every head sees the same tokens)
        m = ps[ps.kind == kind].groupby(["layer", "pos"], as_index=False)["norm_mean"].mean()
        data[kind] = matrix_from(m, "layer", "pos", "norm_mean")
    n_layers, n_pos = data["key"].shape
    data["positions"] = np.arange(n_pos)
    counts = ps[(ps.kind == "key") & (ps.layer == 0) & (ps["head"] == 0)].sort_values("pos")["n"].to_numpy()
    data["n_sequences_per_position"] = counts
    pick = sorted({0, 1, n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers - 1})
    fig = _figure_grid((16, 10))
    gs = fig.add_gridspec(2, 3, width_ratios=[1.25, 0.04, 1], hspace=0.35, wspace=0.25)
    cmap = __import__("matplotlib").colormaps["tab10"]
    for row, kind in enumerate(KINDS):
        m = data[kind]
        rel = m / np.nanmedian(m, axis=1, keepdims=True)
        span = np.nanmax(np.abs(np.log10(rel[np.isfinite(rel) & (rel > 0)]))) if np.any(rel > 0) else 1
        span = min(max(span, 0.1), 2)
        ax = fig.add_subplot(gs[row, 0])
        heatmap_axes(ax)
        im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                       norm=mcolors.LogNorm(vmin=10 ** -span, vmax=10 ** span))
        ax.set(title=f"‖{kind[0]}‖ relative to the layer's median over positions", xlabel="token position",
               ylabel="layer")
        layer_ticks(ax, n_layers, "y")
        cb = fig.colorbar(im, cax=fig.add_subplot(gs[row, 1]))
        cb.set_label("norm ÷ layer median (log colour)")
        ax = fig.add_subplot(gs[row, 2])
        _style_axis(ax)
        for i, layer in enumerate(pick):
            ax.plot(data["positions"], m[layer], lw=1.2, color=cmap(i % 10), label=f"layer {layer}")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("log")
        ax.set(title=f"Mean ‖{kind[0]}‖ per position ({KIND_LABELS[kind]}, mean over heads)",
               xlabel="token position (symlog: 0 and 1 linear)", ylabel=f"‖{kind[0]}‖ (L2, log)")
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle(run_title(meta, "Cache norms against token position (attention sinks show at position 0)"))
    save(fig, out_png)
    return data


def plot_cross_layer_similarity(stats: dict, out_png) -> dict:
    """Mean cosine similarity of the same token's K (and V) between every pair of layers."""
    cross = stats["cross_layer"].to_pandas()
    meta = stats_meta(stats)
    data = {}
    for kind in KINDS:
        m = cross[cross.kind == kind].groupby(["layer_a", "layer_b"], as_index=False)["cosine_mean"].mean()
        data[kind] = matrix_from(m, "layer_a", "layer_b", "cosine_mean")
    n_layers = data["key"].shape[0]
    data["key_next_layer"] = np.array([data["key"][i, i + 1] for i in range(n_layers - 1)])
    data["value_next_layer"] = np.array([data["value"][i, i + 1] for i in range(n_layers - 1)])
    fig = _figure_grid((16, 6.5))
    gs = fig.add_gridspec(1, 4, width_ratios=[1, 1, 0.04, 1.1], wspace=0.35)
    for i, kind in enumerate(KINDS):
        ax = fig.add_subplot(gs[0, i])
        heatmap_axes(ax)
        im = ax.imshow(data[kind], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set(title=f"{KIND_LABELS[kind].capitalize()}", xlabel="layer", ylabel="layer")
        layer_ticks(ax, n_layers)
        layer_ticks(ax, n_layers, "y")
    cb = fig.colorbar(im, cax=fig.add_subplot(gs[0, 2]))
    cb.set_label("mean cosine similarity (same token, same KV head)")
    ax = fig.add_subplot(gs[0, 3])
    _style_axis(ax)
    for kind in KINDS:
        ax.plot(np.arange(n_layers - 1), data[f"{kind}_next_layer"], "o-", ms=3, color=KIND_COLORS[kind],
                label=KIND_LABELS[kind])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Layer L vs layer L+1", xlabel="layer L", ylabel="mean cosine similarity", ylim=(-1.05, 1.05))
    layer_ticks(ax, n_layers)
    ax.legend()
    fig.suptitle(run_title(meta, "Cross-layer similarity of the cache"))
    save(fig, out_png)
    return data
