"""Pruning potential from the statistics, with the measured perplexity change of pruning runs beside it.

The potential is `kvcore.stats.pruning_potential`: 1 − (mean ‖v‖ of the head) / (largest
mean ‖v‖ of any head). Measured values come from result records (see
`kvcore.report.collect_results`) of family `prune`, whose method parameters name the
pruned `layers` and `heads` ([layer, kv_head] pairs), as kvcore.compress.prune defines them.
"""

from __future__ import annotations

import numpy as np

from kvcore.plots._common import figure, heatmap_axes, kv_head_label, layer_ticks, run_title, save
from kvcore.stats import pruning_potential, stats_meta

FORMULA = "potential = 1 − mean‖v‖(layer, head) ÷ max over heads of mean‖v‖"


def prune_targets(record: dict) -> tuple[list[int], list[tuple[int, int]]]:
    """(whole layers, [(layer, kv_head)] pairs) a prune record removed, from its params.

    kvcore.compress.prune's spec: `layers` (dropped entirely) and `heads` ([layer, kv_head] pairs).
    Also accepted: `heads` as plain head indices together with exactly one layer in `layers`.
    """
    params = record.get("params") or {}

    def get(name):
        v = params.get(name, record.get(name))
        return [] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v])

    layers, heads = [int(x) for x in get("layers")], get("heads")
    if heads and all(isinstance(h, int) for h in heads):
        if len(layers) != 1:
            return layers, []
        return [], [(layers[0], int(h)) for h in heads]
    return layers, [(int(p[0]), int(p[1])) for p in heads]


def measured_pruning(records) -> list[dict]:
    """Prune records reduced to {method, protocol, layers, heads, delta_percent}: `layers` dropped whole,
    `heads` the (layer, kv_head) pairs dropped, `span` every layer touched."""
    out = []
    for r in records or []:
        if r.get("family") != "prune" or r.get("delta_percent") is None:
            continue
        layers, heads = prune_targets(r)
        if not layers and not heads:
            continue
        out.append({"method": r.get("method"), "protocol": r.get("protocol"), "layers": layers, "heads": heads,
                    "span": sorted(set(layers) | {layer for layer, _ in heads}),
                    "delta_percent": float(r["delta_percent"])})
    return out


def _describe(r: dict) -> str:
    parts = [f"layers {','.join(map(str, r['layers']))}"] if r["layers"] else []
    if r["heads"]:
        parts.append("heads " + ",".join(f"L{layer}.H{h}" for layer, h in r["heads"]))
    return f"{r['method']}: {' + '.join(parts)} → Δppl {r['delta_percent']:+.2f}%"


def _one_layer(r: dict) -> bool:
    return len(r["layers"]) == 1 and not r["heads"]


def _one_head(r: dict) -> bool:
    return not r["layers"] and len(r["heads"]) == 1


def _potential_matrix(stats):
    p = pruning_potential(stats)
    n_layers, n_heads = int(p["layer"].max()) + 1, int(p["head"].max()) + 1
    m = np.full((n_layers, n_heads), np.nan)
    m[p["layer"], p["head"]] = p["potential"]
    return p, m


def plot_pruning_heatmap(stats: dict, out_png, records=None) -> dict:
    """Heatmap layer × KV head of the pruning potential. Measured runs: one head → in its cell (red box);
    one whole layer → at the row's right end; several layers → listed under the plot."""
    from matplotlib.patches import Rectangle

    meta = stats_meta(stats)
    p, m = _potential_matrix(stats)
    measured = measured_pruning(records)
    n_layers, n_heads = m.shape
    cells = {r["heads"][0]: r["delta_percent"] for r in measured if _one_head(r)}
    rows = {r["layers"][0]: r["delta_percent"] for r in measured if _one_layer(r)}
    other = [r for r in measured if not _one_head(r) and not _one_layer(r)]
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
        if _one_layer(r):
            ax.plot(r["layers"], [r["delta_percent"]], proto_marker, color="tab:red", ms=8)
        elif len(r["span"]) == 1:  # some heads of one layer
            ax.plot(r["span"], [r["delta_percent"]], proto_marker, mfc="white", mec="tab:red", mew=1.5, ms=8)
            ax.annotate(f"heads {','.join(str(h) for _, h in r['heads'])}", (r["span"][0], r["delta_percent"]),
                        fontsize=7, xytext=(5, 3), textcoords="offset points")
        else:
            hi = r["span"][-1]
            ax.plot(r["span"], [r["delta_percent"]] * len(r["span"]), "D-", color="tab:purple", lw=1.2, ms=5)
            ax.annotate(_describe(r).split(" → ")[0], (hi + 0.2, r["delta_percent"]),
                        fontsize=7, xytext=(4, 0), textcoords="offset points", va="center")
    if measured:
        from matplotlib.lines import Line2D

        ax.axhline(0, color="grey", lw=0.8)
        ax.legend(handles=[Line2D([], [], marker="s", color="tab:red", ls="none", label="one layer pruned"),
                           Line2D([], [], marker="s", mfc="white", mec="tab:red", ls="none", label="heads of one layer"),
                           Line2D([], [], color="tab:purple", marker="D", lw=1.2,
                                  label="one run touching several layers (◆ = layers touched)")],
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
    exact = {r["heads"][0]: r["delta_percent"] for r in measured if _one_head(r)}
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
