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


def plot_pruning_heatmap(stats: dict, out_png, records=None) -> dict:
    """Heatmap layer × KV head of the pruning potential; cells of measured head-pruning runs annotated."""
    meta = stats_meta(stats)
    p, m = _potential_matrix(stats)
    measured = measured_pruning(records)
    n_layers, n_heads = m.shape
    fig, axes = figure(1, 1, size=(max(7, 1.8 * n_heads + 4), max(6, 0.28 * n_layers + 2)))
    ax = axes[0, 0]
    heatmap_axes(ax)
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    cells = {}
    for rec in measured:
        for layer in rec["layers"]:
            for h in rec["heads"] if rec["heads"] is not None else range(n_heads):
                cells.setdefault((layer, h), []).append(rec["delta_percent"])
    for (r, c), v in np.ndenumerate(m):
        if m.size <= 400 and np.isfinite(v):
            text = f"{v:.2f}"
            if (r, c) in cells:
                text += f"\nΔppl {min(cells[(r, c)]):+.1f}%"
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")
    for (r, c) in cells:
        ax.add_patch(__import__("matplotlib").patches.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xticks(range(n_heads), [kv_head_label(meta, h) for h in range(n_heads)], fontsize=8)
    layer_ticks(ax, n_layers, "y")
    ax.set(xlabel="KV head", ylabel="layer",
           title=FORMULA + ("\nred boxes: measured perplexity change when pruned" if cells else ""))
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("pruning potential (0 = largest values, 1 = negligible values)")
    fig.suptitle(run_title(meta, "Pruning potential by layer and KV head"))
    save(fig, out_png)
    return {"potential": m, "measured": measured}


def plot_layer_pruning_potential(stats: dict, out_png, records=None) -> dict:
    """Bars: pruning potential per layer; markers (right axis): measured Δppl % of single-layer pruning."""
    meta = stats_meta(stats)
    p = pruning_potential(stats)
    pot = p["layer_potential"]
    n_layers = len(pot)
    measured = measured_pruning(records)
    single = [r for r in measured if len(r["layers"]) == 1 and r["heads"] is None]
    multi = [r for r in measured if r not in single]
    fig, axes = figure(1, 1, size=(max(10, 0.35 * n_layers + 4), 6))
    ax = axes[0, 0]
    x = np.arange(n_layers)
    ax.bar(x, pot, color="tab:green", alpha=0.8, label="pruning potential (statistics)")
    ax.axhline(pot.mean(), color="tab:green", ls="--", lw=1, label=f"mean {pot.mean():.2f}")
    ax.set(xlabel="layer", ylabel="pruning potential (0–1)", ylim=(0, 1.05),
           title="1 − mean‖v‖ of the layer ÷ largest layer mean‖v‖ (higher = values contribute less)")
    layer_ticks(ax, n_layers)
    handles, labels = ax.get_legend_handles_labels()
    if single:
        ax2 = ax.twinx()
        for proto, marker in (("prefill-compress", "s"), ("fake-quant", "o")):
            pts = [(r["layers"][0], r["delta_percent"]) for r in single if r["protocol"] == proto]
            pts += [(r["layers"][0], r["delta_percent"]) for r in single
                    if proto == "fake-quant" and r["protocol"] not in ("prefill-compress", "fake-quant")]
            if pts:
                xs, ys = zip(*pts)
                ax2.plot(xs, ys, marker, color="tab:red", ms=7, ls="none", label=f"measured Δppl % ({proto})")
        ax2.set_ylabel("measured perplexity change when the layer is pruned (%)", color="tab:red")
        ax2.axhline(0, color="tab:red", lw=0.5, alpha=0.5)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if multi:
        text = "\n".join(f"{r['method']}: layers {','.join(map(str, r['layers']))}"
                         + (f" heads {','.join(map(str, r['heads']))}" if r["heads"] is not None else "")
                         + f" → Δppl {r['delta_percent']:+.2f}%" for r in multi[:8])
        ax.text(0.01, 0.98, text, transform=ax.transAxes, va="top", fontsize=8,
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="#cccccc"))
    ax.legend(handles, labels, loc="upper right")
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
