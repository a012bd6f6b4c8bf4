"""Plots of measured results: the compression trade-off, and attention sinks (when attention was computed)."""

from __future__ import annotations

import numpy as np

from kvcore.plots._common import figure, heatmap_axes, layer_ticks, note, run_title, save

PROTOCOL_MARKERS = {"fake-quant": ("o", "-"), "prefill-compress": ("s", "--")}
FAMILY_COLORS = {"quant": "tab:blue", "sparsify": "tab:orange", "evict": "tab:green", "prune": "tab:red",
                 "none": "black"}
NO_METHODS = ("No compression method has results yet:\nonly the uncompressed baseline is configured.\n"
              "Add methods under `methods:` in config.yaml to fill this plot.")


def _frontier(points):
    """The lower envelope: for increasing bits, keep a point only if its Δ is the best so far."""
    best, out = np.inf, []
    for b, d, *rest in sorted(points, key=lambda p: (p[0], p[1])):
        if d < best:
            out.append((b, d, *rest))
            best = d
    return out


def plot_compression_tradeoff(records, out_png, meta: dict | None = None) -> dict:
    """Perplexity change (%) against bits per element: a point per (method, protocol), colour per
    family, marker per protocol; lines join each (family, protocol)'s best points (lower envelope).

    `records`: result dicts (kvcore.report.collect_results) with family, protocol, bits_per_element,
    delta_percent, and optionally passed, threshold, baseline_perplexity. Always writes the PNG; with
    nothing to plot it says so.
    """
    meta = meta or {}
    pts = [r for r in records or [] if r.get("family") not in (None, "none")
           and r.get("bits_per_element") is not None and r.get("delta_percent") is not None]
    skipped = sorted({r.get("method") for r in records or [] if r.get("family") not in (None, "none")} -
                     {r.get("method") for r in pts})
    fig, axes = figure(1, 1, size=(13, 6.5))
    ax = axes[0, 0]
    data = {"points": [], "frontiers": {}}
    if not pts:
        note(ax, NO_METHODS + (f"\n(no bits/Δ for: {', '.join(map(str, skipped))})" if skipped else ""))
        fig.suptitle(run_title(meta, "Compression trade-off: perplexity change vs bits per element"))
        save(fig, out_png)
        return data
    families = sorted({r["family"] for r in pts})
    cycle = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"])
    colors = {f: FAMILY_COLORS.get(f) or next(cycle, "tab:gray") for f in families}
    labelled = set()
    for r in sorted(pts, key=lambda r: r["delta_percent"], reverse=True):
        proto = r.get("protocol") or "unknown"
        marker = PROTOCOL_MARKERS.get(proto, ("^", ":"))[0]
        passed = r.get("passed")
        ax.plot(r["bits_per_element"], r["delta_percent"], marker, ms=7, color=colors[r["family"]],
                mfc=colors[r["family"]] if passed is not False else "white", mew=1.5, ls="none", zorder=3)
        data["points"].append({k: r.get(k) for k in ("method", "family", "protocol", "bits_per_element",
                                                     "delta_percent", "passed")})
        if len(pts) <= 40 and r.get("method") not in labelled:
            labelled.add(r.get("method"))
            ax.annotate(str(r.get("method")), (r["bits_per_element"], r["delta_percent"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points", color="#444444")
    for fam in families:
        for proto in sorted({r.get("protocol") or "unknown" for r in pts if r["family"] == fam}):
            group = [(r["bits_per_element"], r["delta_percent"]) for r in pts
                     if r["family"] == fam and (r.get("protocol") or "unknown") == proto]
            front = _frontier(group)
            data["frontiers"][(fam, proto)] = front
            if len(front) > 1:
                xs, ys = zip(*front)
                ax.plot(xs, ys, PROTOCOL_MARKERS.get(proto, ("^", ":"))[1], color=colors[fam], lw=1.3, alpha=0.8)
    # legend: families by colour, protocols by marker, filled = passed
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[f], lw=2, label=f"family: {f}") for f in families]
    for proto in sorted({r.get("protocol") or "unknown" for r in pts}):
        m, ls = PROTOCOL_MARKERS.get(proto, ("^", ":"))
        handles.append(Line2D([], [], color="black", marker=m, ls=ls, label=f"protocol: {proto}"))
    if any(r.get("passed") is False for r in pts):
        handles.append(Line2D([], [], color="black", marker="o", mfc="white", ls="none", label="failed threshold"))
    base = [r for r in pts if r.get("baseline_perplexity") and r.get("threshold") is not None]
    if base:
        b = base[0]
        pct = 100 * float(b["threshold"]) / float(b["baseline_perplexity"])
        ax.axhline(pct, color="red", ls=":", lw=1)
        handles.append(Line2D([], [], color="red", ls=":", label=f"pass threshold: Δppl {b['threshold']:g} "
                                                                  f"(≈{pct:.2g}% of {float(b['baseline_perplexity']):.2f})"))
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(16, color="grey", ls="--", lw=0.8)
    handles.append(Line2D([], [], color="grey", ls="--", lw=0.8, label="16 bits: an fp16 cache"))
    ax.set_yscale("symlog", linthresh=0.1, linscale=0.5)
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlim(left=0)
    ax.set(xlabel="bits per element, fp16 basis (full-precision parts 16 bits; codes, scales, zeros, masks as stored)",
           ylabel="perplexity change vs uncompressed (%; symlog, linear within ±0.1)",
           title="Lower-left is better; lines join each family's best points per protocol")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    if skipped:
        ax.text(0.01, 0.01, f"not plotted (no bits per element or Δ): {', '.join(map(str, skipped))}",
                transform=ax.transAxes, fontsize=7, color="#666666")
    fig.suptitle(run_title(meta, "Compression trade-off: perplexity change vs bits per element"))
    save(fig, out_png)
    return data


def plot_attention_sinks(attention, out_png, meta: dict | None = None, max_pos: int = 64) -> dict:
    """Where attention goes: mean attention each key position receives (layer × position), and the
    share taken by position 0 per layer.

    `attention`: a table (pyarrow or pandas) with columns layer, head, key_pos, attention — the mean
    attention weight that key position receives, averaged over queries that can see it and over
    sequences. Written by whichever stage computes attention (eviction scoring); none does yet.
    """
    import matplotlib.colors as mcolors

    df = attention.to_pandas() if hasattr(attention, "to_pandas") else attention
    meta = meta or {}
    m = df.groupby(["layer", "key_pos"], as_index=False)["attention"].mean()
    n_layers = int(m["layer"].max()) + 1
    n_pos = min(int(m["key_pos"].max()) + 1, max_pos)
    mat = np.full((n_layers, n_pos), np.nan)
    sel = m[m.key_pos < n_pos]
    mat[sel["layer"].to_numpy(), sel["key_pos"].to_numpy()] = sel["attention"].to_numpy()
    total = m.groupby("layer")["attention"].sum().to_numpy()
    sink = mat[:, 0] / total
    fig, axes = figure(1, 2, size=(15, 6), gridspec_kw={"width_ratios": [1.6, 1]})
    ax = axes[0, 0]
    heatmap_axes(ax)
    pos = mat[np.isfinite(mat) & (mat > 0)]
    im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest",
                   norm=mcolors.LogNorm(vmin=max(pos.min(), pos.max() * 1e-4), vmax=pos.max()) if pos.size else None)
    ax.set(xlabel=f"key position (first {n_pos})", ylabel="layer", title="Mean attention received (mean over heads)")
    layer_ticks(ax, n_layers, "y")
    fig.colorbar(im, ax=ax).set_label("attention weight (log colour)")
    ax = axes[0, 1]
    ax.bar(np.arange(n_layers), 100 * sink, color="tab:purple")
    ax.set(xlabel="layer", ylabel="% of attention on position 0", title="Attention sink strength", ylim=(0, 100))
    layer_ticks(ax, n_layers)
    fig.suptitle(run_title(meta, "Attention sinks"))
    save(fig, out_png)
    return {"matrix": mat, "sink_fraction": sink}
