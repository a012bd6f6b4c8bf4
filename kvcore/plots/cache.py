"""Plots of the cache itself, drawn from the statistics tables (kvcore.stats)."""

from __future__ import annotations

import math

import numpy as np

from kvcore.plots._common import (KIND_COLORS, KIND_LABELS, axis, blank_figure, figure, heatmap_axes, kv_head_label,
                                  layer_ticks, matrix, plain_log, run_title, save, series)
from kvcore.stats import KINDS, SPARSITY_REL, stats_meta

# Share of a zero-mean Gaussian below SPARSITY_REL × its RMS: what "not sparse at all" looks like.
GAUSSIAN_SPARSITY = math.erf(SPARSITY_REL / math.sqrt(2))


def plot_layer_statistics(stats: dict, out_png) -> dict:
    """Six panels across layers: sparsity, K–V correlation, std, mean |x|, kurtosis, outlier channels."""
    layers = stats["layers"]
    meta = stats_meta(stats)
    data = {"layer": series(layers, "layer", kind="key").astype(int)}
    for kind in KINDS:
        for f in ("sparsity", "std", "mean_abs", "mean", "kurtosis", "outlier_ratio"):
            data[f"{kind}_{f}"] = series(layers, f, kind=kind)
    data["kv_correlation"] = series(layers, "kv_correlation", kind="key")
    data["kv_norm_correlation"] = series(layers, "kv_norm_correlation", kind="key")
    x = data["layer"]
    fig, axes = figure(2, 3, size=(16, 9))

    def lines(ax, field, scale=1.0):
        for kind in KINDS:
            ax.plot(x, scale * data[f"{kind}_{field}"], "o-", ms=3, color=KIND_COLORS[kind], label=KIND_LABELS[kind])

    ax = axes[0, 0]
    lines(ax, "sparsity", 100)
    ax.axhline(100 * GAUSSIAN_SPARSITY, color="grey", ls=":", lw=1, label=f"Gaussian ({100 * GAUSSIAN_SPARSITY:.1f}%)")
    ax.set(title="Sparsity", ylabel=f"% of entries with |x| < {SPARSITY_REL:g} × head RMS")
    ax.set_ylim(bottom=0)
    ax = axes[0, 1]
    ax.plot(x, data["kv_correlation"], "o-", ms=3, color="tab:purple", label="entries (same token, channel)")
    ax.plot(x, data["kv_norm_correlation"], "s--", ms=3, color="tab:green", label="‖k‖ vs ‖v‖ per token")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Key–value correlation", ylabel="Pearson correlation", ylim=(-1.05, 1.05))
    ax = axes[0, 2]
    lines(ax, "std")
    ax.set(title="Standard deviation", ylabel="std of entries (cache units)")
    _log_if_wide(ax, [data["key_std"], data["value_std"]])
    ax = axes[1, 0]
    for kind in KINDS:
        ax.plot(x, data[f"{kind}_mean_abs"], "o-", ms=3, color=KIND_COLORS[kind], label=f"{KIND_LABELS[kind]}: mean |x|")
        ax.plot(x, data[f"{kind}_mean"], ":", color=KIND_COLORS[kind], label=f"{KIND_LABELS[kind]}: mean x")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Mean magnitude (solid) and mean (dotted)", ylabel="cache units")
    ax = axes[1, 1]
    lines(ax, "kurtosis")
    ax.set_yscale("symlog", linthresh=1)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Excess kurtosis (0 = Gaussian)", ylabel="excess kurtosis (symlog)")
    ax = axes[1, 2]
    lines(ax, "outlier_ratio")
    ax.set_yscale("log")
    plain_log(ax)
    ax.set(title="Outlier channels", ylabel="max ÷ median channel mean |x| (log)")
    for ax in axes.flat:
        ax.set_xlabel("layer")
        layer_ticks(ax, len(x))
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(run_title(meta, "KV cache statistics across layers"))
    save(fig, out_png)
    return data


def _log_if_wide(ax, arrays) -> None:
    v = np.concatenate([a[np.isfinite(a)] for a in arrays])
    if v.size and v.min() > 0 and v.max() / v.min() > 30:
        ax.set_yscale("log")
        plain_log(ax)


def _annotate(ax, m, fmt: str, vmax: float, limit: int = 400) -> None:
    """Write each cell's value when the grid is small enough to read."""
    if m.size > limit:
        return
    for (r, c), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * vmax else "black")


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
        ax.set(title=KIND_LABELS[kind].capitalize(), xlabel="KV head", ylabel="layer")
        ax.set_xticks(range(n_heads), [kv_head_label(meta, h) for h in range(n_heads)], fontsize=8)
        layer_ticks(ax, n_layers, "y", dense=True)
    cb = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9)
    cb.set_label(f"% of entries with |x| < {SPARSITY_REL:g} × that head's RMS "
                 f"(a Gaussian gives {100 * GAUSSIAN_SPARSITY:.1f}%)")
    fig.suptitle(run_title(meta, "Sparsity per layer and KV head"))
    save(fig, out_png)
    return data


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
    fig, axes = figure(1, 2, size=(15, 6), sharey=True)
    for ax, kind in zip(axes[0], KINDS):
        h = hist[hist.kind == kind]
        total = h.groupby("bin")["count"].sum().sort_index().to_numpy()
        data[f"{kind}_counts"] = total
        n = total.sum()
        inner = total[1:-1]
        ax.stairs(inner / n * HIST_PER_DECADE, edges, fill=True, alpha=0.35, color=KIND_COLORS[kind],
                  label="all layers")
        for layer, style in zip(pick, ("-", "--", ":")):
            c = h[h.layer == layer].groupby("bin")["count"].sum().sort_index().to_numpy()
            ax.stairs(c[1:-1] / c.sum() * HIST_PER_DECADE, edges, color="black", ls=style, lw=1,
                      label=f"layer {layer}")
        thr = heads[heads.kind == kind]["sparsity_threshold"]
        ax.axvspan(thr.min(), thr.max(), color="red", alpha=0.12,
                   label=f"sparsity thresholds ({SPARSITY_REL:g} × head RMS)")
        ax.axvline(thr.median(), color="red", lw=1)
        nz = np.nonzero(inner)[0]
        if nz.size:
            ax.set_xlim(edges[max(nz[0] - 2, 0)], edges[min(nz[-1] + 3, len(edges) - 1)])
        ax.set_xscale("log")
        ax.set_yscale("log")
        extra = []
        if total[0]:
            extra.append(f"{total[0]:,} of {n:,} entries below {edges[0]:g} (incl. exact zeros)")
        if total[-1]:
            extra.append(f"{total[-1]:,} entries ≥ {edges[-1]:g}")
        ax.set(title=f"|{kind[0].upper()}| ({KIND_LABELS[kind]})",
               xlabel=f"|{kind[0]}| (cache units, log scale)" + "".join(f"\n{e}" for e in extra),
               ylabel="fraction of entries per decade (log)")
        ax.legend(loc="upper left", fontsize=8)
        data[f"{kind}_thresholds"] = thr.to_numpy()
    fig.suptitle(run_title(meta, "Magnitude distribution of KV cache entries"))
    save(fig, out_png)
    return data


def matrix_from(df, rows: str, cols: str, value: str) -> np.ndarray:
    out = np.full((int(df[rows].max()) + 1, int(df[cols].max()) + 1), np.nan)
    out[df[rows].to_numpy(), df[cols].to_numpy()] = df[value].to_numpy()
    return out


def plot_channel_outliers(stats: dict, out_png) -> dict:
    """Per-channel mean |x| (layer × channel) relative to the layer's median channel, keys and values,
    and the outlier ratio per layer."""
    import matplotlib.colors as mcolors

    ch = stats["channels"].to_pandas()
    meta = stats_meta(stats)
    n_heads = int(ch["head"].max()) + 1
    dim = int(ch["channel"].max()) + 1
    ch["col"] = ch["head"] * dim + ch["channel"]
    data, rel = {}, {}
    for kind in KINDS:
        data[kind] = matrix_from(ch[ch.kind == kind], "layer", "col", "mean_abs")
        rel[kind] = data[kind] / np.nanmedian(data[kind], axis=1, keepdims=True)
    data["relative"] = rel
    top = max(np.nanmax(rel["key"]), np.nanmax(rel["value"]), 2.0)
    norm = mcolors.LogNorm(vmin=1 / min(top, 100), vmax=min(top, 100))
    n_layers = data["key"].shape[0]
    fig = blank_figure((16, 10))
    gs = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    for i, kind in enumerate(KINDS):
        ax = axis(fig, gs[0, i], heatmap=True)
        im = ax.imshow(rel[kind], aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        for h in range(1, n_heads):
            ax.axvline(h * dim - 0.5, color="black", lw=0.8)
        ax.set(title=f"{KIND_LABELS[kind].capitalize()}: channel mean |x| ÷ layer median", ylabel="layer",
               xlabel=f"channel ({n_heads} KV heads side by side, {dim} channels each)")
        ax.set_xticks([h * dim + dim / 2 - 0.5 for h in range(n_heads)], [f"head {h}" for h in range(n_heads)])
        layer_ticks(ax, n_layers, "y")
    cb = fig.colorbar(im, ax=fig.axes[-2:], extend="both", shrink=0.9)
    plain_log(cb.ax)
    cb.set_label("× the layer's median channel (log colour; red = outlier)")
    ax = axis(fig, gs[1, :])
    for kind in KINDS:
        r = series(stats["layers"], "outlier_ratio", kind=kind)
        data[f"{kind}_outlier_ratio"] = r
        ax.plot(np.arange(len(r)), r, "o-", ms=3, color=KIND_COLORS[kind], label=KIND_LABELS[kind])
    ax.set_yscale("log")
    plain_log(ax)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set(title="Outlier ratio per layer: largest ÷ median channel mean |x|  (keys ≫ values: quantize keys per "
                 "channel, values per token)", xlabel="layer", ylabel="max ÷ median (log)")
    layer_ticks(ax, n_layers, dense=True)
    ax.legend()
    fig.suptitle(run_title(meta, "Channel magnitudes: outlier channels in keys and values"))
    save(fig, out_png)
    return data


def position_bins(n_pos: int, exact: int = 16, per_decade: int = 12) -> np.ndarray:
    """Bin edges over positions: one bin per position below `exact`, then log-spaced bins (a few
    sequences make single far positions noisy; averaging over log bins keeps the trend readable)."""
    edges = list(range(min(exact, n_pos) + 1))
    if n_pos > exact:
        n = max(2, int(per_decade * np.log10(n_pos / exact)) + 1)
        edges += [int(e) for e in np.unique(np.round(np.logspace(np.log10(exact), np.log10(n_pos), n)))[1:]]
    return np.asarray(sorted(set(edges)))


def bin_positions(m: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of m[..., pos] over each [edges[i], edges[i+1]) bin (NaN-aware)."""
    with np.errstate(all="ignore"):
        return np.stack([np.nanmean(m[..., lo:hi], axis=-1) for lo, hi in zip(edges[:-1], edges[1:])], axis=-1)


def _position_axis(ax, n_pos: int) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("symlog", linthresh=4, linscale=1.5)
    ticks = [0, 1, 2] + [2 ** k for k in range(2, 20) if 2 ** k < n_pos]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def plot_key_norm_by_position(stats: dict, out_png) -> dict:
    """Mean key (and value) norm against token position: heatmap layer × position relative to the
    layer's median, and lines for a few layers. Positions ≥ 16 are averaged in log-spaced bins."""
    import matplotlib.colors as mcolors
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter

    ps = stats["positions"].to_pandas()
    meta = stats_meta(stats)
    data = {}
    for kind in KINDS:
        # mean over heads of the per-head mean norms (every head sees the same tokens)
        m = ps[ps.kind == kind].groupby(["layer", "pos"], as_index=False)["norm_mean"].mean()
        data[kind] = matrix_from(m, "layer", "pos", "norm_mean")
    n_layers, n_pos = data["key"].shape
    edges = position_bins(n_pos)
    data["positions"] = np.arange(n_pos)
    data["bin_edges"] = edges
    data["n_sequences_per_position"] = (
        ps[(ps.kind == "key") & (ps.layer == 0) & (ps["head"] == 0)].sort_values("pos")["n"].to_numpy())
    centers = np.array([lo if hi - lo == 1 else np.sqrt(lo * (hi - 1)) for lo, hi in zip(edges[:-1], edges[1:])])
    pick = sorted({0, 1, n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers - 1})
    cmap = colormaps["viridis"]
    fig = blank_figure((16, 10))
    gs = fig.add_gridspec(2, 2, width_ratios=[1.2, 1])
    for row, kind in enumerate(KINDS):
        binned = bin_positions(data[kind], edges)
        data[f"{kind}_binned"] = binned
        rel = binned / np.nanmedian(data[kind], axis=1, keepdims=True)
        finite = np.abs(np.log10(rel[np.isfinite(rel) & (rel > 0)]))
        span = float(np.clip(np.percentile(finite, 98) if finite.size else 1, 0.05, 2))
        ax = axis(fig, gs[row, 0], heatmap=True)
        im = ax.pcolormesh(edges - 0.5, np.arange(n_layers + 1) - 0.5, rel, cmap="RdBu_r",
                           norm=mcolors.LogNorm(vmin=10 ** -span, vmax=10 ** span), shading="flat")
        ax.invert_yaxis()
        _position_axis(ax, n_pos)
        ax.set_xlim(-0.5, n_pos - 0.5)
        ax.set(title=f"‖{kind[0]}‖ ÷ the layer's median over positions", xlabel="token position", ylabel="layer")
        layer_ticks(ax, n_layers, "y")
        cb = fig.colorbar(im, ax=ax, extend="both")
        cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        cb.ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        cb.set_label("× layer median (log colour)")
        ax = axis(fig, gs[row, 1])
        for i, layer in enumerate(pick):
            ax.plot(centers, binned[layer], "-", marker=".", ms=4, lw=1.3, color=cmap(i / max(len(pick) - 1, 1)),
                    label=f"layer {layer}")
        _position_axis(ax, n_pos)
        ax.set_yscale("log")
        plain_log(ax)
        ax.set(title=f"Mean ‖{kind[0]}‖ per position ({KIND_LABELS[kind]}, mean over heads)",
               xlabel="token position", ylabel=f"‖{kind[0]}‖ (L2, log)")
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle(run_title(meta, "Cache norms against token position (attention sinks sit at the first positions; "
                                 "positions ≥ 16 averaged in log-spaced bins)"))
    save(fig, out_png)
    return data


def plot_cross_layer_similarity(stats: dict, out_png) -> dict:
    """Layer × layer similarity of the same tokens' cache: mean cosine (same basis, same head) and
    debiased linear CKA (basis-free, all heads), with the neighbouring-layer values on the right."""
    cross = stats["cross_layer"].to_pandas()
    meta = stats_meta(stats)
    data = {}
    for kind in KINDS:
        m = cross[cross.kind == kind].groupby(["layer_a", "layer_b"], as_index=False)["cosine_mean"].mean()
        data[kind] = matrix_from(m, "layer_a", "layer_b", "cosine_mean")
    n_layers = data["key"].shape[0]
    nxt = np.arange(n_layers - 1)
    for kind in KINDS:
        data[f"{kind}_next_layer"] = data[kind][nxt, nxt + 1]
    has_cka = "layer_cka" in stats
    if has_cka:
        cka = stats["layer_cka"].to_pandas()
        for kind in KINDS:
            data[f"{kind}_cka"] = matrix_from(cka[cka.kind == kind], "layer_a", "layer_b", "cka")
            data[f"{kind}_cka_next_layer"] = data[f"{kind}_cka"][nxt, nxt + 1]
    rows = 2 if has_cka else 1
    fig = blank_figure((17, 6.5 * rows))
    gs = fig.add_gridspec(rows, 3, width_ratios=[1, 1, 1.1])
    panels = [("", "RdBu_r", (-1, 1), "mean cosine similarity\n(same token, same KV head)")]
    if has_cka:
        n_cka = int(cka["n_tokens"].iloc[0]) if len(cka) else 0
        panels.append(("_cka", "viridis", (0, 1), f"linear CKA (debiased)\n{n_cka} tokens, all KV heads"))
    for row, (suffix, cmap, (lo, hi), label) in enumerate(panels):
        for i, kind in enumerate(KINDS):
            ax = axis(fig, gs[row, i], heatmap=True)
            im = ax.imshow(data[kind + suffix], cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set(title=f"{KIND_LABELS[kind].capitalize()}: {'cosine' if not suffix else 'CKA'}", xlabel="layer",
                   ylabel="layer")
            layer_ticks(ax, n_layers)
            layer_ticks(ax, n_layers, "y")
        fig.colorbar(im, ax=fig.axes[-2:], shrink=0.85).set_label(label)
        ax = axis(fig, gs[row, 2])
        for kind in KINDS:
            ax.plot(nxt, data[f"{kind}{suffix}_next_layer"], "o-", ms=3, color=KIND_COLORS[kind],
                    label=KIND_LABELS[kind])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"Layer L vs layer L+1 ({'cosine' if not suffix else 'CKA'})", xlabel="layer L",
               ylabel=label.split("\n")[0], ylim=(lo - 0.05, hi + 0.05))
        layer_ticks(ax, n_layers)
        ax.legend()
    fig.suptitle(run_title(meta, "Cross-layer similarity of the cache"))
    save(fig, out_png)
    return data
