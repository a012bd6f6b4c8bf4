"""Statistics of an extracted KV cache: the numbers behind the analysis plots.

`compute_stats(shards)` streams the given `kv/part-*.safetensors` shard by shard (the files the
caller names, never a glob: a shard left by an earlier run is not read), in
chunks of sequences (and of tokens, for very long ones) whose float32 size stays under
`chunk_bytes`, so memory is bounded whatever the size of the run. Padding beyond each
sequence's length (prompts runs) is masked out using the shard's `seq_lengths`. Every
sum is accumulated in float64; moments are power sums per channel about a per-channel
pilot mean, pooled exactly into heads and layers. Two passes: the first gathers moments,
channels, norms, histograms and cross-layer cosines; the second counts near-zero entries
against a threshold that the first pass fixed. Vectorised torch over safetensors was
measured against DuckDB SQL over the Parquet KV tables and is ~4x faster while computing
far more (docs/report.md).

Definitions (per layer L, KV head h, kind in {key, value}; "entries" are the scalars of
all real tokens' vectors, n_tokens × head_dim of them):
  mean, std, rms, mean_abs, min, max, abs_max   over the entries (population std);
  kurtosis           excess (Fisher) kurtosis of the entries, m4 / m2² − 3 (0 for a Gaussian);
  sparsity           fraction of entries with |x| < SPARSITY_REL × rms of this (L, h, kind):
                     a threshold relative to the head's own scale, so one massive
                     activation elsewhere in the model does not decide it
                     (`sparsity_threshold` holds the absolute value used);
  channel_max_mag, channel_median_mag, outlier_ratio
                     channel magnitude = mean |x| of one of the head_dim channels over
                     tokens; outlier_ratio = max / median (numpy's median) of those;
  kv_correlation     Pearson correlation of the key and value entries at the same
                     (token, channel), as the visualization project we replace computed it
                     (same in the key and the value row);
  kv_norm_correlation  Pearson correlation of ‖k_t‖ and ‖v_t‖ across tokens;
  norm_mean, norm_std  of the per-token L2 norms ‖x_t‖;
  cos_next_layer     mean over tokens of cos(x_t at layer L, x_t at layer L+1), same head
                     and kind (NaN for the last layer).
Tables (all `stats/{name}.parquet`, plain Parquet that DuckDB reads directly):
  heads        one row per (layer, head, kind) with the fields above;
  layers       the same per (layer, kind), pooled over heads exactly (not an average of
               head rows; sparsity still counts each entry against its own head's
               threshold, sparsity_threshold and cos_next_layer are means over heads);
  channels     per (layer, head, kind, channel): mean, std, mean_abs, abs_max;
  positions    per (layer, head, kind, pos): n, norm_mean, norm_std;
  histograms   per (layer, head, kind, bin): counts of |x| in log-spaced bins
               (HIST_PER_DECADE per decade from 10^HIST_LO to 10^HIST_HI; bin 0 is
               [0, 10^HIST_LO) including exact zeros, the last bin [10^HIST_HI, inf);
               binned in float32, so an entry within float32 rounding of an edge may
               land in the neighbouring bin);
  cross_layer  per (kind, head, layer_a, layer_b): mean cosine of the same token's vectors;
  layer_cka    per (kind, layer_a, layer_b): linear CKA between the two layers' caches (all KV
               heads concatenated per token), with the unbiased HSIC estimator (Song et al.
               2012; "debiased CKA"), on CKA_TOKENS tokens taken every k-th token over the run.
               Cosine needs the two layers to share a basis, which they need not (each layer
               has its own projections): CKA compares the geometry of the tokens instead,
               whatever the basis, so it shows redundancy between layers that cosine cannot.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from kvcore.errors import KvcoreError

KINDS = ("key", "value")
SPARSITY_REL = 0.01
HIST_LO, HIST_HI, HIST_PER_DECADE = -6, 4, 20
STATS_TABLES = ("heads", "layers", "channels", "positions", "histograms", "cross_layer", "layer_cka")
CKA_TOKENS = 512  # tokens sampled (evenly over the run) for the layer-to-layer CKA
CHUNK_BYTES = 32 << 20  # float32 K/V of all layers per chunk; peak memory is ~4x this plus imports


def shard_paths(shards) -> list[Path]:
    """The shard files, checked to exist (a clear error instead of safetensors' own)."""
    paths = [Path(p) for p in shards]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise KvcoreError(f"no kv/part-*.safetensors to read ({', '.join(missing) or 'none given'}); "
                          "extract the KV cache first")
    return paths


def iter_chunks(shards, chunk_bytes: int = CHUNK_BYTES, device=None):
    """Yield (keys, values, pos): per-layer float32 [N, n_kv, head_dim] of real tokens, pos [N].

    N tokens per chunk keep all layers' keys and values of the chunk under `chunk_bytes`.
    `device`: where the chunk is converted and gathered (the stored slices travel as stored).
    """
    import torch
    from safetensors import safe_open

    for path in shard_paths(shards):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            n_layers = sum(1 for n in names if n.endswith("_key"))
            n_seq, n_kv, seq_len, dim = f.get_slice("layer_0_key").get_shape()
            lengths = json.loads(meta["seq_lengths"]) if "seq_lengths" in meta else [seq_len] * n_seq
            per_token = 2 * n_layers * n_kv * dim * 4
            budget = max(1, chunk_bytes // per_token)
            for s0, s1, t0, t1 in _plan(lengths, budget):
                sub = lengths[s0:s1]
                width = t1 - t0
                mask = (torch.arange(t0, t1)[None, :] < torch.tensor(sub)[:, None])  # [n, width]
                pos = torch.arange(t0, t1).expand(len(sub), width)[mask]
                if pos.numel() == 0:
                    continue
                mask, pos = mask.to(device), pos.to(device)
                out = {}
                for kind in KINDS:
                    out[kind] = [f.get_slice(f"layer_{i}_{kind}")[s0:s1, :, t0:t1].to(device).float()
                                 .permute(0, 2, 1, 3)[mask] for i in range(n_layers)]
                yield out["key"], out["value"], pos


def _plan(lengths: list[int], budget: int):
    """(s0, s1, t0, t1) slices: consecutive sequences up to `budget` tokens, or token ranges of one."""
    i = 0
    while i < len(lengths):
        if lengths[i] > budget:
            for t0 in range(0, lengths[i], budget):
                yield i, i + 1, t0, min(lengths[i], t0 + budget)
            i += 1
            continue
        j, total = i, 0
        while j < len(lengths) and total + lengths[j] <= budget:
            total += lengths[j]
            j += 1
        yield i, j, 0, max(lengths[i:j])
        i = j


@dataclass
class _Acc:
    """Float64 accumulators. Moments are kept per channel, indexed [kind, layer, head, channel],
    as power sums of x minus a per-channel pilot (the first chunk's channel mean), so that a
    channel with a large offset loses no precision; heads and layers pool them exactly."""

    n_layers: int
    n_kv: int
    dim: int
    seq_len: int
    sample_stride: int = 1
    device: str = "cpu"

    def __post_init__(self):
        import torch

        self.samples = [[[] for _ in range(self.n_layers)] for _ in KINDS]
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=self.device)  # noqa: E731
        K, L, H, D, P = 2, self.n_layers, self.n_kv, self.dim, self.seq_len
        self.pilot = None
        self.n_tok = 0
        self.s = z(5, K, L, H, D)  # s[j] = sum of (x - pilot)^j, j = 1..4
        self.abs_sum, self.cmin, self.cmax = z(K, L, H, D), z(K, L, H, D) + math.inf, z(K, L, H, D) - math.inf
        self.kv_prod = z(L, H, D)  # sum of (k - pilot_k)(v - pilot_v) per channel
        self.norm_s, self.norm_sq, self.norm_prod = z(K, L, H), z(K, L, H), z(L, H)
        self.pos_n, self.pos_s, self.pos_sq = z(P), z(K, L, P, H), z(K, L, P, H)
        self.nbins = (HIST_HI - HIST_LO) * HIST_PER_DECADE + 2
        self.hist = z(K, L, H * self.nbins)
        self.gram = z(K, H, L, L)
        self.below = z(K, L, H)

    def to_cpu(self) -> None:
        """Every accumulator moved to the host (the tables are built there)."""
        for name, value in vars(self).items():
            if hasattr(value, "cpu"):
                setattr(self, name, value.cpu())
        self.samples = [[[b.cpu() for b in blocks] for blocks in kind] for kind in self.samples]

    def grow_positions(self, p: int) -> None:
        import torch

        if p > self.pos_n.shape[0]:
            extra = p - self.pos_n.shape[0]
            self.pos_n = torch.cat([self.pos_n, self.pos_n.new_zeros(extra)])
            pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], 2)  # noqa: E731
            self.pos_s, self.pos_sq = pad(self.pos_s), pad(self.pos_sq)

    def first_pass(self, keys, values, pos) -> None:
        import torch

        n, L, H, D = pos.shape[0], self.n_layers, self.n_kv, self.dim
        dev = pos.device
        picked = torch.nonzero((torch.arange(n, device=dev) + self.n_tok) % self.sample_stride == 0).squeeze(1)
        for k, xs in enumerate((keys, values)):
            for layer, x in enumerate(xs):
                self.samples[k][layer].append(x[picked].reshape(len(picked), H * D).double())
        self.n_tok += n
        self.grow_positions(int(pos.max()) + 1)
        self.pos_n.index_add_(0, pos, torch.ones(n, dtype=torch.float64, device=dev))
        if self.pilot is None:
            self.pilot = torch.stack([torch.stack([x.double().mean(0) for x in xs]) for xs in (keys, values)])
        unit = torch.empty(2, H, L, n * D, dtype=torch.float64, device=dev)  # for the cross-layer Gram
        offsets = (torch.arange(H, device=dev) * self.nbins)[None, :, None]
        for layer in range(L):
            ys, norms = [], []
            for k, x32 in enumerate((keys[layer], values[layer])):
                x = x32.double()  # [n, H, D]
                nrm = torch.linalg.vector_norm(x, dim=2)  # [n, H]
                norms.append(nrm)
                self.norm_s[k, layer] += nrm.sum(0)
                self.norm_sq[k, layer] += (nrm * nrm).sum(0)
                self.pos_s[k, layer].index_add_(0, pos, nrm)
                self.pos_sq[k, layer].index_add_(0, pos, nrm * nrm)
                torch.minimum(self.cmin[k, layer], x.amin(0), out=self.cmin[k, layer])
                torch.maximum(self.cmax[k, layer], x.amax(0), out=self.cmax[k, layer])
                self.abs_sum[k, layer] += x.abs().sum(0)
                # log-spaced |x| histogram, binned in float32 (edges exact to float32 rounding)
                idx = torch.log10(x32.abs()).sub_(HIST_LO).mul_(HIST_PER_DECADE).add_(1).floor_()
                idx = idx.clamp_(0, self.nbins - 1).to(torch.int64).add_(offsets)
                self.hist[k, layer] += torch.bincount(idx.reshape(-1), minlength=H * self.nbins)
                torch.div(x.permute(1, 0, 2), nrm.clamp_min(1e-300).T[..., None],
                          out=unit[k, :, layer].view(H, n, D))
                y = x.sub_(self.pilot[k, layer])
                y2 = y * y
                self.s[1, k, layer] += y.sum(0)
                self.s[2, k, layer] += y2.sum(0)
                self.s[3, k, layer] += (y2 * y).sum(0)
                self.s[4, k, layer] += y2.square_().sum(0)
                ys.append(y)
            self.kv_prod[layer] += (ys[0] * ys[1]).sum(0)
            self.norm_prod[layer] += (norms[0] * norms[1]).sum(0)
        for k in range(2):
            self.gram[k] += torch.bmm(unit[k], unit[k].transpose(1, 2))

    def second_pass(self, keys, values, threshold) -> None:
        import torch

        # Compare in float32 against the smallest float32 >= the float64 threshold: for float32
        # entries that is exactly |x| < threshold.
        t32 = threshold.float()
        t32 = torch.where(t32.double() < threshold, torch.nextafter(t32, torch.full_like(t32, math.inf)), t32)
        for k, xs in enumerate((keys, values)):
            for layer, x in enumerate(xs):
                self.below[k, layer] += (x.abs() < t32[k, layer][None, :, None]).sum((0, 2))


def hist_edges():
    """Lower and upper edges of the histogram bins (bin 0 from 0, last bin to inf)."""
    import numpy as np

    inner = 10.0 ** (HIST_LO + np.arange((HIST_HI - HIST_LO) * HIST_PER_DECADE + 1) / HIST_PER_DECADE)
    lo = np.concatenate([[0.0], inner])
    hi = np.concatenate([inner, [np.inf]])
    return lo, hi


def _central(s1, s2, s3, s4, n):
    """Central sums (M2, M3, M4) about the mean, from power sums of a shifted variable and count n."""
    m = s1 / n
    m2 = s2 - m * s1
    m3 = s3 - 3 * m * s2 + 2 * m ** 2 * s1
    m4 = s4 - 4 * m * s3 + 6 * m ** 2 * s2 - 3 * m ** 3 * s1
    return m2, m3, m4


def _pool(mean, m2, m3, m4, n, dim):
    """Pool groups of equal count n along `dim`: the pooled mean and central sums (exact)."""
    mu = mean.mean(dim, keepdim=True)
    d = mean - mu
    return (mu.squeeze(dim), (m2 + n * d ** 2).sum(dim), (m3 + 3 * d * m2 + n * d ** 3).sum(dim),
            (m4 + 4 * d * m3 + 6 * d ** 2 * m2 + n * d ** 4).sum(dim), d)


def compute_stats(shards, metadata: str | Path | None = None, chunk_bytes: int = CHUNK_BYTES,
                  sparsity_rel: float = SPARSITY_REL, threads: int | None = None, device: str = "cpu"):
    """All statistics tables of a run's `shards` (its kv/part-*.safetensors, in shard order):
    {name: pyarrow.Table} for the names in STATS_TABLES; `metadata` (the run's metadata.json)
    names the model and dataset in the tables' schema metadata.

    `threads` sets torch's intra-op threads for the call (the workflow passes the rule's
    `threads`; torch's default of every core collapses when several jobs share the cores).
    `device` is where the sums run ("auto": CUDA when there is a GPU; chunks stream from the
    host one at a time, the float64 sums stay on the device, the tables are built on the host):
    the same sums, in another order, so the numbers agree to float64 rounding.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _compute(shard_paths(shards), metadata, chunk_bytes, sparsity_rel, device)
    finally:
        torch.set_num_threads(previous)


def _compute(shards, metadata, chunk_bytes, sparsity_rel, device="cpu"):
    import torch
    from safetensors import safe_open

    from kvcore.model import resolve_device
    from kvcore.progress import Progress

    dev = torch.device(resolve_device(device))

    total = 0
    for i, path in enumerate(shards):
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice("layer_0_key").get_shape()
            meta = f.metadata() or {}
            total += sum(json.loads(meta["seq_lengths"])) if "seq_lengths" in meta else shape[0] * shape[2]
            if i == 0:
                n_layers = sum(1 for n in f.keys() if n.endswith("_key"))
                _, n_kv, seq_len, dim = shape
    acc = _Acc(n_layers, n_kv, dim, seq_len, sample_stride=max(1, math.ceil(total / CKA_TOKENS)), device=dev)
    progress = Progress("stats (two passes)", 2 * total, "tok", jobs_only=True)

    def chunks():  # on a GPU, chunks 16 times larger: fewer, larger kernels
        return iter_chunks(shards, chunk_bytes * (16 if dev.type == "cuda" else 1), dev)

    with torch.inference_mode():
        for keys, values, pos in chunks():
            acc.first_pass(keys, values, pos)
            progress.update(len(pos))
        if acc.n_tok == 0:
            raise KvcoreError(f"{shards[0].parent}: the KV cache holds no tokens")
        threshold = sparsity_rel * _Moments(acc).head["rms"]
        for keys, values, pos in chunks():
            acc.second_pass(keys, values, threshold)
            progress.update(len(pos))
        acc.to_cpu()
        threshold = threshold.cpu()
        mom = _Moments(acc)
        tables = _tables(acc, mom, threshold)
    meta = _run_meta(metadata)
    meta.update(sparsity_rel=sparsity_rel, hist_lo=HIST_LO, hist_hi=HIST_HI, hist_per_decade=HIST_PER_DECADE)
    encoded = {b"kvcore_stats": json.dumps(meta).encode()}
    return {name: t.replace_schema_metadata(encoded) for name, t in tables.items()}


def _run_meta(metadata) -> dict:
    path = Path(metadata) if metadata is not None else None
    if path is not None and path.is_file():
        meta = json.loads(path.read_text())
        return {k: meta.get(k) for k in ("model", "dataset", "num_layers", "num_kv_heads", "num_heads",
                                         "head_dim", "dtype", "n_sequences", "n_tokens")}
    return {}


class _Moments:
    """Channel, head and layer moments pooled from the per-channel power sums."""

    def __init__(self, acc: _Acc):
        import torch

        n = acc.n_tok
        s = acc.s
        self.ch_mean = acc.pilot + s[1] / n  # [K, L, H, D]
        c2, c3, c4 = _central(s[1], s[2], s[3], s[4], n)
        ck = acc.kv_prod - s[1, 0] * s[1, 1] / n  # sum (k - mean_k)(v - mean_v) per channel, [L, H, D]
        self.ch_m2 = c2
        mean_h, m2h, m3h, m4h, dh = _pool(self.ch_mean, c2, c3, c4, n, -1)
        ckh = (ck + n * dh[0] * dh[1]).sum(-1)
        nh = n * acc.dim
        mean_l, m2l, m3l, m4l, dl = _pool(mean_h, m2h, m3h, m4h, nh, -1)
        ckl = (ckh + nh * dl[0] * dl[1]).sum(-1)
        self.head = self._fields(mean_h, m2h, m4h, nh)
        self.head["kv_correlation"] = ckh / torch.sqrt(m2h[0] * m2h[1])
        self.layer = self._fields(mean_l, m2l, m4l, nh * acc.n_kv)
        self.layer["kv_correlation"] = ckl / torch.sqrt(m2l[0] * m2l[1])

    @staticmethod
    def _fields(mean, m2, m4, n):
        import torch

        var = m2 / n
        return {"mean": mean, "std": torch.sqrt(var), "rms": torch.sqrt(var + mean * mean),
                "kurtosis": (m4 / n) / (var * var) - 3.0}


def _norm_corr(prod, sk, sv, qk, qv, n):
    cov = prod / n - (sk / n) * (sv / n)
    vk, vv = qk / n - (sk / n) ** 2, qv / n - (sv / n) ** 2
    return cov / (vk * vv).sqrt()


HEAD_FIELDS = ("mean", "std", "rms", "mean_abs", "min", "max", "abs_max", "kurtosis", "sparsity",
               "sparsity_threshold", "channel_max_mag", "channel_median_mag", "outlier_ratio", "kv_correlation",
               "kv_norm_correlation", "norm_mean", "norm_std", "cos_next_layer")


def _tables(acc: _Acc, mom: _Moments, threshold):
    import numpy as np
    import pyarrow as pa
    import torch

    K, L, H, D = 2, acc.n_layers, acc.n_kv, acc.dim
    nt = acc.n_tok
    kinds = np.asarray(KINDS)
    ch_mag = acc.abs_sum / nt  # channel magnitude: mean |x| over tokens, [K, L, H, D]
    cos_next = torch.full((K, L, H), math.nan, dtype=torch.float64)
    for layer in range(L - 1):
        cos_next[:, layer] = acc.gram[:, :, layer, layer + 1] / nt

    def fields(m, dims, mag, below, n_el, norm_s, norm_sq, norm_prod, n_vec, thr, cos):
        """The HEAD_FIELDS over the trailing `dims` channel axes already reduced in m."""
        vmin = acc.cmin.amin(dims)
        vmax = acc.cmax.amax(dims)
        med = torch.quantile(mag, 0.5, dim=-1)  # numpy's median (mean of the two middle values)
        cmax = mag.amax(-1)
        nm = norm_s / n_vec
        nkv = _norm_corr(norm_prod, norm_s[0], norm_s[1], norm_sq[0], norm_sq[1], n_vec)
        return {**m, "mean_abs": acc.abs_sum.sum(dims) / n_el, "min": vmin, "max": vmax,
                "abs_max": torch.maximum(vmin.abs(), vmax.abs()), "sparsity": below / n_el,
                "sparsity_threshold": thr, "channel_max_mag": cmax, "channel_median_mag": med,
                "outlier_ratio": cmax / med, "kv_correlation": m["kv_correlation"].expand(K, *m["kv_correlation"].shape),
                "kv_norm_correlation": nkv.expand(K, *nkv.shape), "norm_mean": nm,
                "norm_std": (norm_sq / n_vec - nm * nm).clamp_min(0).sqrt(), "cos_next_layer": cos}

    def columns(f, index):
        out = dict(index)
        for name in HEAD_FIELDS:
            out[name] = pa.array(f[name].reshape(-1).numpy(), pa.float64())
        return pa.table(out)

    hf = fields(mom.head, (-1,), ch_mag, acc.below, nt * D, acc.norm_s, acc.norm_sq, acc.norm_prod, nt,
                threshold, cos_next)
    idx = np.indices((K, L, H)).reshape(3, -1)
    heads = columns(hf, {"layer": pa.array(idx[1], pa.int16()), "head": pa.array(idx[2], pa.int16()),
                         "kind": pa.array(kinds[idx[0]]), "n_tokens": pa.array(np.full(idx.shape[1], nt)),
                         "n_elements": pa.array(np.full(idx.shape[1], nt * D))})
    lf = fields(mom.layer, (-2, -1), ch_mag.reshape(K, L, H * D), acc.below.sum(-1), nt * D * H,
                acc.norm_s.sum(-1), acc.norm_sq.sum(-1), acc.norm_prod.sum(-1), nt * H, threshold.mean(-1),
                cos_next.mean(-1))
    idx = np.indices((K, L)).reshape(2, -1)
    layers = columns(lf, {"layer": pa.array(idx[1], pa.int16()), "kind": pa.array(kinds[idx[0]]),
                          "n_tokens": pa.array(np.full(idx.shape[1], nt)),
                          "n_elements": pa.array(np.full(idx.shape[1], nt * D * H))})

    idx = np.indices((K, L, H, D)).reshape(4, -1)
    channels = pa.table({"layer": pa.array(idx[1], pa.int16()), "head": pa.array(idx[2], pa.int16()),
                         "kind": pa.array(kinds[idx[0]]), "channel": pa.array(idx[3], pa.int16()),
                         "mean": mom.ch_mean.reshape(-1).numpy(), "std": (mom.ch_m2 / nt).sqrt().reshape(-1).numpy(),
                         "mean_abs": ch_mag.reshape(-1).numpy(),
                         "abs_max": torch.maximum(acc.cmin.abs(), acc.cmax.abs()).reshape(-1).numpy()})

    P = acc.pos_n.shape[0]
    pn = acc.pos_n.clamp_min(1)[None, None, :, None]
    pmean = acc.pos_s / pn
    pstd = (acc.pos_sq / pn - pmean ** 2).clamp_min(0).sqrt()
    idx = np.indices((K, L, P, H)).reshape(4, -1)
    keep = (acc.pos_n > 0).numpy()[idx[2]]  # positions that some sequence reaches
    positions = pa.table({"layer": pa.array(idx[1][keep], pa.int16()), "head": pa.array(idx[3][keep], pa.int16()),
                          "kind": pa.array(kinds[idx[0][keep]]), "pos": pa.array(idx[2][keep], pa.int32()),
                          "n": pa.array(acc.pos_n.numpy()[idx[2][keep]].astype(np.int64)),
                          "norm_mean": pmean.reshape(-1).numpy()[keep], "norm_std": pstd.reshape(-1).numpy()[keep]})

    nb = acc.nbins
    lo, hi = hist_edges()
    idx = np.indices((K, L, H, nb)).reshape(4, -1)
    histograms = pa.table({"layer": pa.array(idx[1], pa.int16()), "head": pa.array(idx[2], pa.int16()),
                           "kind": pa.array(kinds[idx[0]]), "bin": pa.array(idx[3], pa.int16()),
                           "lo": lo[idx[3]], "hi": hi[idx[3]],
                           "count": pa.array(acc.hist.reshape(-1).numpy().astype(np.int64))})

    idx = np.indices((K, H, L, L)).reshape(4, -1)
    cross = pa.table({"kind": pa.array(kinds[idx[0]]), "head": pa.array(idx[1], pa.int16()),
                      "layer_a": pa.array(idx[2], pa.int16()), "layer_b": pa.array(idx[3], pa.int16()),
                      "cosine_mean": (acc.gram / nt).reshape(-1).numpy(),
                      "n_tokens": pa.array(np.full(idx.shape[1], nt))})
    cka, n_sample = layer_cka(acc.samples)
    idx = np.indices((K, L, L)).reshape(3, -1)
    layer_cka_table = pa.table({"kind": pa.array(kinds[idx[0]]), "layer_a": pa.array(idx[1], pa.int16()),
                                "layer_b": pa.array(idx[2], pa.int16()), "cka": cka.reshape(-1).numpy(),
                                "n_tokens": pa.array(np.full(idx.shape[1], n_sample))})
    return dict(heads=heads, layers=layers, channels=channels, positions=positions, histograms=histograms,
                cross_layer=cross, layer_cka=layer_cka_table)


def layer_cka(samples):
    """Debiased linear CKA between every pair of layers, per kind: ([K, L, L] tensor, n tokens).

    samples[kind][layer]: list of float64 [n_i, features] blocks (the same tokens for every layer).
    HSIC_u(K, L) = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)), K̃ the
    linear Gram matrix with its diagonal set to zero; CKA = HSIC_u(a, b) / sqrt(HSIC_u(a, a) HSIC_u(b, b)).
    """
    import torch

    out = []
    n = 0
    for per_layer in samples:
        grams, rows = [], []
        for blocks in per_layer:
            x = torch.cat(blocks)
            n = x.shape[0]
            g = x @ x.T
            g.fill_diagonal_(0)
            grams.append(g.reshape(-1))
            rows.append(g.sum(1))
        if n < 4:
            out.append(torch.full((len(per_layer), len(per_layer)), math.nan, dtype=torch.float64))
            continue
        G, R = torch.stack(grams), torch.stack(rows)  # [L, n*n], [L, n]
        S = R.sum(1)
        hsic = (G @ G.T + S[:, None] * S[None, :] / ((n - 1) * (n - 2)) - 2 / (n - 2) * (R @ R.T)) / (n * (n - 3))
        d = hsic.diagonal().clamp_min(1e-300).sqrt()
        out.append(hsic / (d[:, None] * d[None, :]))
    return torch.stack(out), n


def write_stats(shards, out_dir: str | Path, metadata: str | Path | None = None, **kwargs) -> dict[str, Path]:
    """Compute the statistics of `shards` (see compute_stats) and write `{out_dir}/{name}.parquet`."""
    import pyarrow.parquet as pq

    from kvcore.atomic import atomic_path

    out_dir = Path(out_dir)
    tables = compute_stats(shards, metadata, **kwargs)
    paths = {}
    for name in STATS_TABLES:
        path = out_dir / f"{name}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(tables[name], tmp, compression="zstd")
        paths[name] = path
    return paths


def read_stats(stats_dir: str | Path) -> dict:
    """{name: pyarrow.Table} of the tables written by `write_stats` (missing ones left out)."""
    import pyarrow.parquet as pq

    stats_dir = Path(stats_dir)
    out = {name: pq.read_table(stats_dir / f"{name}.parquet") for name in STATS_TABLES
           if (stats_dir / f"{name}.parquet").is_file()}
    if "heads" not in out:
        raise KvcoreError(f"{stats_dir}: no heads.parquet; run the stats stage first")
    return out


def stats_meta(tables: dict) -> dict:
    """The run metadata stored in the tables' schema metadata."""
    raw = (tables["heads"].schema.metadata or {}).get(b"kvcore_stats")
    return json.loads(raw) if raw else {}


def pruning_potential(tables: dict):
    """Per (layer, head): a statistics-only estimate of how little dropping the head's cache costs.

    potential = 1 − V̄(L, h) / max over all (L', h') of V̄(L', h'), with V̄ the mean L2 norm of
    the head's value vectors. An attention head's output is a convex combination of its value
    vectors, so a head with small values writes little into the residual stream, whatever it
    attends to; 0 is the head with the largest values, near 1 a head whose values are tiny.
    It ignores the output projection and the attention pattern: the measured perplexity
    change of pruning runs, plotted beside it, is the check. Returns numpy arrays
    {layer, head, potential, value_norm} (one entry per (layer, head)) and the layer-level
    {layer_potential} computed the same way from the layer's mean over heads.
    """
    import numpy as np

    h = tables["heads"].to_pydict()
    sel = [i for i, k in enumerate(h["kind"]) if k == "value"]
    layer = np.asarray([h["layer"][i] for i in sel])
    head = np.asarray([h["head"][i] for i in sel])
    vn = np.asarray([h["norm_mean"][i] for i in sel], dtype=float)
    top = vn.max() if vn.size and vn.max() > 0 else 1.0
    n_layers = int(layer.max()) + 1
    per_layer = np.array([vn[layer == i].mean() for i in range(n_layers)])
    return {"layer": layer, "head": head, "value_norm": vn, "potential": 1.0 - vn / top,
            "layer_value_norm": per_layer, "layer_potential": 1.0 - per_layer / per_layer.max()}
