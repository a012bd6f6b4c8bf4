"""Pruning potential from the statistics, with the measured perplexity change of pruning runs beside it.

The potential is `kvcore.stats.pruning_potential`: 1 − (mean ‖v‖ of the head) / (largest
mean ‖v‖ of any head). Measured values come from result records (see
`kvcore.report.collect_results`) of family `prune`, whose method parameters name the
pruned `layers` (and `heads`; absent = every KV head of those layers).
"""

from __future__ import annotations

import numpy as np

from kvcore.plots._common import figure, heatmap_axes, kv_head_label, layer_ticks, run_title, save
from kvcore.stats import pruning_potential, stats_meta

FORMULA = "potential = 1 − mean‖v‖(layer, head) ÷ max over heads of mean‖v‖"


def prune_targets(record: dict) -> tuple[list[int] | None, list[int] | None]:
    """(layers, heads) a prune record removed, from its params (`layers`/`heads`, or `prune_layers`/...)."""
    params = record.get("params") or {}

    def get(*names):
        for name in names:
            v = params.get(name, record.get(name))
            if v is not None:
                return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        return None

    return get("layers", "prune_layers", "layer"), get("heads", "prune_heads", "head")


def measured_pruning(records) -> list[dict]:
    """Prune records reduced to {method, protocol, layers, heads, delta_percent}."""
    out = []
    for r in records or []:
        if r.get("family") != "prune" or r.get("delta_percent") is None:
            continue
        layers, heads = prune_targets(r)
        if layers is None:
            continue
        out.append({"method": r.get("method"), "protocol": r.get("protocol"), "layers": layers, "heads": heads,
                    "delta_percent": float(r["delta_percent"])})
    return out


def _potential_matrix(stats):
    p = pruning_potential(stats)
    n_layers, n_heads = int(p["layer"].max()) + 1, int(p["head"].max()) + 1
    m = np.full((n_layers, n_heads), np.nan)
    m[p["layer"], p["head"]] = p["potential"]
    return p, m


def _describe(r: dict) -> str:
    heads = f" heads {','.join(map(str, r['heads']))}" if r["heads"] is not None else ""
    return f"{r['method']}: layers {','.join(map(str, r['layers']))}{heads} → Δppl {r['delta_percent']:+.2f}%"


def plot_pruning_heatmap(stats: dict, out_png, records=None) -> dict:
    """Heatmap layer × KV head of the pruning potential. Measured runs: one head → in its cell (red box);
    one whole layer → at the row's right end; several layers → listed under the plot."""
    from matplotlib.patches import Rectangle

    meta = stats_meta(stats)
    p, m = _potential_matrix(stats)
    measured = measured_pruning(records)
    n_layers, n_heads = m.shape
    cells = {(r["layers"][0], r["heads"][0]): r["delta_percent"] for r in measured
             if len(r["layers"]) == 1 and r["heads"] is not None and len(r["heads"]) == 1}
    rows = {r["layers"][0]: r["delta_percent"] for r in measured if len(r["layers"]) == 1 and r["heads"] is None}
    other = [r for r in measured if (r["layers"][0], (r["heads"] or [None])[0]) not in cells
             and not (len(r["layers"]) == 1 and r["heads"] is None)]
    fig, axes = figure(1, 1, size=(max(8, 1.8 * n_heads + 6), max(6, 0.3 * n_layers + 2.5)))
    ax = axes[0, 0]
    heatmap_axes(ax)
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    for (r, c), v in np.ndenumerate(m):
        if m.size <= 400 and np.isfinite(v):
            text = f"{v:.2f}" + (f"\nΔppl {cells[(r, c)]:+.1f}%" if (r, c) in cells else "")
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")
    for (r, c) in cells:
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
    for r, d in rows.items():
        ax.add_patch(Rectangle((-0.5, r - 0.5), n_heads, 1, fill=False, ec="red", lw=2))
        ax.text(n_heads - 0.4, r, f"layer pruned: Δppl {d:+.1f}%", va="center", fontsize=8, color="tab:red",
                clip_on=False)
    ax.set_xticks(range(n_heads), [kv_head_label(meta, h) for h in range(n_heads)], fontsize=8)
    layer_ticks(ax, n_layers, "y", dense=True)
    xlabel = "KV head"
    if other:
        xlabel += "\n\nmeasured, several layers at once:\n" + "\n".join(_describe(r) for r in other[:8])
    ax.set(xlabel=xlabel, ylabel="layer", title=FORMULA + ("\nred boxes: measured perplexity change when pruned"
                                                            if cells or rows else ""))
    fig.colorbar(im, ax=ax, pad=0.2 if rows else 0.02).set_label(
        "pruning potential (0 = largest values, 1 = negligible values)")
    fig.suptitle(run_title(meta, "Pruning potential by layer and KV head"))
    save(fig, out_png)
    return {"potential": m, "measured": measured}


def plot_layer_pruning_potential(stats: dict, out_png, records=None) -> dict:
    """Top: pruning potential per layer (bars). Bottom: the measured perplexity change of pruning runs
    (one layer: a marker; several layers: a segment over them; single heads: hollow markers)."""
    meta = stats_meta(stats)
    p = pruning_potential(stats)
    pot = p["layer_potential"]
    n_layers = len(pot)
    measured = measured_pruning(records)
    fig, axes = figure(2, 1, size=(max(11, 0.35 * n_layers + 4), 8), sharex=True,
                       gridspec_kw={"height_ratios": [3, 2]})
    ax = axes[0, 0]
    x = np.arange(n_layers)
    ax.bar(x, pot, color="tab:green", alpha=0.8, label="pruning potential (statistics)")
    ax.axhline(pot.mean(), color="tab:green", ls="--", lw=1, label=f"mean {pot.mean():.2f}")
    ax.set(ylabel="pruning potential (0–1)", ylim=(0, 1.05),
           title="Statistics: 1 − layer mean‖v‖ ÷ largest layer mean‖v‖ (higher = the layer's values contribute less)")
    ax.legend(loc="upper right")
    ax = axes[1, 0]
    if not measured:
        ax.text(0.5, 0.5, "No pruning runs yet: add methods with `family: prune` and `layers: [...]`\n"
                "(optionally `heads: [...]`) to config.yaml to measure the perplexity change here.",
                ha="center", va="center", transform=ax.transAxes, fontsize=10,
                bbox=dict(boxstyle="round,pad=0.6", facecolor="#f4f4f4", edgecolor="#bbbbbb"))
        ax.set_yticks([])
    for r in measured:
        proto_marker = "s" if r.get("protocol") == "prefill-compress" else "o"
        if len(r["layers"]) == 1 and r["heads"] is None:
            ax.plot(r["layers"], [r["delta_percent"]], proto_marker, color="tab:red", ms=8)
        elif len(r["layers"]) == 1:
            ax.plot(r["layers"], [r["delta_percent"]], proto_marker, mfc="white", mec="tab:red", mew=1.5, ms=8)
            ax.annotate(f"heads {','.join(map(str, r['heads']))}", (r["layers"][0], r["delta_percent"]), fontsize=7,
                        xytext=(5, 3), textcoords="offset points")
        else:
            lo, hi = min(r["layers"]), max(r["layers"])
            ax.hlines(r["delta_percent"], lo - 0.4, hi + 0.4, color="tab:purple", lw=3)
            ax.annotate(f"{r['method']} (layers {','.join(map(str, r['layers']))})", (hi + 0.4, r["delta_percent"]),
                        fontsize=7, xytext=(4, 0), textcoords="offset points", va="center")
    if measured:
        from matplotlib.lines import Line2D

        ax.axhline(0, color="grey", lw=0.8)
        ax.legend(handles=[Line2D([], [], marker="s", color="tab:red", ls="none", label="one layer pruned"),
                           Line2D([], [], marker="s", mfc="white", mec="tab:red", ls="none", label="heads of one layer"),
                           Line2D([], [], color="tab:purple", lw=3, label="several layers at once")],
                  loc="upper right", fontsize=8)
    ax.set(xlabel="layer", ylabel="measured Δ perplexity (%)",
           title="Measured: perplexity change when pruned (■ prefill-compress, ● fake-quant)")
    layer_ticks(ax, n_layers, dense=True)
    ax.set_xlim(-0.7, n_layers - 0.3)
    fig.suptitle(run_title(meta, "Layer pruning potential"))
    save(fig, out_png)
    return {"layer": x, "potential": pot, "measured": measured}


def plot_head_pruning_potential(stats: dict, out_png, records=None, top: int = 12) -> dict:
    """Left: potential per KV-head index across layers (mean ± std, each layer a dot).
    Right: the `top` (layer, head) candidates, with measured Δppl % where a run pruned exactly that head."""
    meta = stats_meta(stats)
    p, m = _potential_matrix(stats)
    n_layers, n_heads = m.shape
    measured = measured_pruning(records)
    exact = {(r["layers"][0], r["heads"][0]): r["delta_percent"] for r in measured
             if len(r["layers"]) == 1 and r["heads"] is not None and len(r["heads"]) == 1}
    fig, axes = figure(1, 2, size=(15, 6), gridspec_kw={"width_ratios": [1, 1.2]})
    ax = axes[0, 0]
    mean, std = np.nanmean(m, 0), np.nanstd(m, 0)
    ax.bar(np.arange(n_heads), mean, yerr=std, capsize=4, color="tab:green", alpha=0.7,
           label="mean over layers ± std")
    rng = np.random.default_rng(0)
    for h in range(n_heads):
        ax.plot(h + rng.uniform(-0.2, 0.2, n_layers), m[:, h], ".", color="black", ms=4, alpha=0.6,
                label="one layer" if h == 0 else None)
    ax.set_xticks(range(n_heads), [kv_head_label(meta, h) for h in range(n_heads)], fontsize=8)
    ax.set(xlabel="KV head index", ylabel="pruning potential (0–1)", ylim=(0, 1.05),
           title="Per KV-head index, across layers")
    ax.legend(loc="upper right")
    ax = axes[0, 1]
    order = np.argsort(-np.nan_to_num(m.ravel(), nan=-1))[:top]
    labels, vals = [], []
    for i in order:
        layer, h = divmod(int(i), n_heads)
        labels.append(f"layer {layer}, head {h}" + (f"  (Δppl {exact[(layer, h)]:+.1f}%)" if (layer, h) in exact else ""))
        vals.append(m[layer, h])
    y = np.arange(len(vals))[::-1]
    ax.barh(y, vals, color="tab:green", alpha=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set(xlabel="pruning potential (0–1)", xlim=(0, 1.05), title=f"Top {len(vals)} (layer, KV head) candidates")
    fig.suptitle(run_title(meta, f"Head pruning potential — {FORMULA}"), fontsize=11)
    save(fig, out_png)
    return {"potential": m, "head_mean": mean, "head_std": std,
            "top": [(int(i) // n_heads, int(i) % n_heads, float(m.ravel()[i])) for i in order], "measured": measured}
