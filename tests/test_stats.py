"""kvcore.stats against plain numpy on tiny extracted runs, field by field."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from kvcore import stats
from kvcore.errors import KvcoreError

TEXTS = [
    "The quick brown fox jumps over the lazy dog. A key and a value are stored for every token.",
    "Paris is the capital of France.",
    "Compression keeps fewer bits per number, fewer numbers, or fewer tokens; the cache grows with the context.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "What is the passkey?",
]


def synthetic_run(run_dir, n_shards=2, n_seq=3, n_layers=3, n_kv=2, seq_len=12, dim=8, seed=0, dtype="float32"):
    """A run written by the real ShardWriter from heavy-tailed random K/V with an outlier channel,
    exact zeros, and right padding (zeros beyond each sequence's length)."""
    import pyarrow as pa
    import torch

    from kvcore.storage import ShardWriter, finalize_run

    g = torch.Generator().manual_seed(seed)
    meta = {"model": "synthetic", "dataset": "noise", "num_layers": n_layers, "num_kv_heads": n_kv,
            "num_heads": 2 * n_kv, "head_dim": dim, "seq_len": seq_len, "dtype": dtype}
    for shard in range(n_shards):
        writer = ShardWriter(run_dir, shard, meta)
        seq_ids = list(range(shard * n_seq, (shard + 1) * n_seq))
        lengths = [seq_len - (i % 3) * 3 for i in seq_ids]
        tokens = [[(7 * i + p) % 50 for p in range(n)] for i, n in zip(seq_ids, lengths)]
        keys, values = [], []
        for layer in range(n_layers):
            k = torch.distributions.StudentT(3.0).sample((n_seq, n_kv, seq_len, dim)) * (1 + layer)
            k[..., 1] += 20.0 * (layer + 1)  # an outlier channel in the keys
            v = torch.randn(n_seq, n_kv, seq_len, dim, generator=g) * 0.5 + 0.3 * k
            v[..., ::4] = torch.where(torch.rand(v[..., ::4].shape, generator=g) < 0.3, 0.0, v[..., ::4])
            for i, n in enumerate(lengths):
                k[i, :, n:] = 0
                v[i, :, n:] = 0
            keys.append(k.to(getattr(torch, dtype)))
            values.append(v.to(getattr(torch, dtype)))
        preds = pa.table({"seq_id": pa.array(seq_ids, pa.int32())})
        writer.add(seq_ids, tokens, keys, values, preds)
        writer.close()
    finalize_run(run_dir, n_shards)
    return run_dir


@pytest.fixture(scope="module", params=["llama", "gpt2", "synthetic", "synthetic-bf16"])
def run(request, tmp_path_factory):
    from kvcore.extract import Extractor
    from kvcore.sources.models import prepare_model

    root = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("synthetic"):
        return synthetic_run(root / "run", dtype="bfloat16" if request.param.endswith("bf16") else "float32")
    model = prepare_model(f"tiny-{request.param}", {"source": "random-init", "architecture": request.param},
                          root / "model")
    # one batch of prompts of different lengths: the shard holds right padding
    Extractor(model, device="cpu", dtype="float32").extract_to_run(TEXTS, root / "run")
    return root / "run"


def shards(run_dir):
    """The run's shard files, as its metadata.json lists them (what the stats rule is given)."""
    from kvcore.storage import shard_files

    return shard_files(run_dir)


def reference(run_dir):
    """Real-token K/V per layer from the safetensors with numpy: {kind: [L][N, H, D]}, pos [N]."""
    from safetensors import safe_open

    out = {"key": None, "value": None}
    pos_all = []
    for path in sorted((run_dir / "kv").glob("part-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:  # "pt": numpy has no bfloat16
            lengths = json.loads(f.metadata()["seq_lengths"])
            n_layers = sum(1 for k in f.keys() if k.endswith("_key"))
            for kind in stats.KINDS:
                layers = []
                for i in range(n_layers):
                    t = f.get_tensor(f"layer_{i}_{kind}").double().numpy()  # [S, H, T, D]
                    layers.append(np.concatenate([t[s, :, :n].transpose(1, 0, 2) for s, n in enumerate(lengths)]))
                out[kind] = layers if out[kind] is None else [np.concatenate([a, b]) for a, b in zip(out[kind], layers)]
            pos_all += [np.arange(n) for n in lengths]
    return out, np.concatenate(pos_all)


def rows(table, **where):
    d = table.to_pydict()
    idx = [i for i in range(table.num_rows) if all(d[k][i] == v for k, v in where.items())]
    assert len(idx) == 1, (where, len(idx))
    return {k: d[k][idx[0]] for k in d}


def expected_fields(x, other_kind, nxt):
    """x: [N, D] of one (layer, head, kind); other_kind: the paired K or V; nxt: next layer or None."""
    e = x.reshape(-1)
    mean, std = e.mean(), e.std()
    rms = np.sqrt((e ** 2).mean())
    chm = np.abs(x).mean(0)
    nk, nv = np.linalg.norm(x, axis=1), np.linalg.norm(other_kind, axis=1)
    out = dict(mean=mean, std=std, rms=rms, mean_abs=np.abs(e).mean(), min=e.min(), max=e.max(),
               abs_max=np.abs(e).max(), kurtosis=((e - mean) ** 4).mean() / std ** 4 - 3,
               sparsity=(np.abs(e) < stats.SPARSITY_REL * rms).mean(), sparsity_threshold=stats.SPARSITY_REL * rms,
               channel_max_mag=chm.max(), channel_median_mag=np.median(chm), outlier_ratio=chm.max() / np.median(chm),
               kv_correlation=np.corrcoef(e, other_kind.reshape(-1))[0, 1], kv_norm_correlation=np.corrcoef(nk, nv)[0, 1],
               norm_mean=nk.mean(), norm_std=nk.std())
    if nxt is not None:
        out["cos_next_layer"] = (np.sum(x * nxt, 1) / (nk * np.linalg.norm(nxt, axis=1))).mean()
    return out


def test_heads_and_layers_match_numpy(run):
    tables = stats.compute_stats(shards(run), run / "metadata.json", chunk_bytes=5000)  # tiny chunks: sequences split across chunks
    ref, pos = reference(run)
    n_layers, n_tok, n_kv, dim = len(ref["key"]), *ref["key"][0].shape
    heads, layers = tables["heads"], tables["layers"]
    assert heads.num_rows == 2 * n_layers * n_kv and layers.num_rows == 2 * n_layers
    for kind, other in (("key", "value"), ("value", "key")):
        for layer in range(n_layers):
            nxt = ref[kind][layer + 1] if layer + 1 < n_layers else None
            for h in range(n_kv):
                got = rows(heads, layer=layer, head=h, kind=kind)
                exp = expected_fields(ref[kind][layer][:, h], ref[other][layer][:, h],
                                      None if nxt is None else nxt[:, h])
                assert got["n_tokens"] == n_tok and got["n_elements"] == n_tok * dim
                for field, value in exp.items():
                    assert got[field] == pytest.approx(value, rel=1e-9, abs=1e-12), (kind, layer, h, field)
                if nxt is None:
                    assert np.isnan(got["cos_next_layer"])
            # layer rows: every head pooled (sparsity against each head's own threshold)
            x = ref[kind][layer]
            got = rows(layers, layer=layer, kind=kind)
            e = x.reshape(-1)
            thr = np.array([stats.SPARSITY_REL * np.sqrt((x[:, h] ** 2).mean()) for h in range(n_kv)])
            chm = np.abs(x).mean(0).reshape(-1)
            nk = np.linalg.norm(x, axis=2).reshape(-1)
            nv = np.linalg.norm(ref[other][layer], axis=2).reshape(-1)
            exp = dict(mean=e.mean(), std=e.std(), mean_abs=np.abs(e).mean(),
                       kurtosis=((e - e.mean()) ** 4).mean() / e.std() ** 4 - 3,
                       sparsity=(np.abs(x) < thr[None, :, None]).mean(), outlier_ratio=chm.max() / np.median(chm),
                       kv_correlation=np.corrcoef(e, ref[other][layer].reshape(-1))[0, 1],
                       kv_norm_correlation=np.corrcoef(nk, nv)[0, 1], norm_mean=nk.mean(), norm_std=nk.std())
            for field, value in exp.items():
                assert got[field] == pytest.approx(value, rel=1e-9, abs=1e-12), (kind, layer, field)


def test_detail_tables_match_numpy(run):
    tables = stats.compute_stats(shards(run), run / "metadata.json")
    ref, pos = reference(run)
    n_layers, n_tok, n_kv, dim = len(ref["key"]), *ref["key"][0].shape
    ch = tables["channels"].to_pandas().set_index(["kind", "layer", "head", "channel"]).sort_index()
    ps = tables["positions"].to_pandas().set_index(["kind", "layer", "head", "pos"]).sort_index()
    hist = tables["histograms"].to_pandas()
    cross = tables["cross_layer"].to_pandas().set_index(["kind", "head", "layer_a", "layer_b"]).sort_index()
    lo, hi = stats.hist_edges()
    for kind in stats.KINDS:
        for layer in range(n_layers):
            for h in range(n_kv):
                x = ref[kind][layer][:, h]
                c = ch.loc[(kind, layer, h)]
                np.testing.assert_allclose(c["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(c["std"], x.std(0), rtol=1e-7, atol=1e-12)
                np.testing.assert_allclose(c["mean_abs"], np.abs(x).mean(0), rtol=1e-9)
                np.testing.assert_allclose(c["abs_max"], np.abs(x).max(0), rtol=1e-12)
                norms = np.linalg.norm(x, axis=1)
                p = ps.loc[(kind, layer, h)]
                assert list(p.index) == sorted(set(pos.tolist()))
                for q in p.index:
                    sel = norms[pos == q]
                    assert p.loc[q, "n"] == sel.size
                    assert p.loc[q, "norm_mean"] == pytest.approx(sel.mean(), rel=1e-9)
                    assert p.loc[q, "norm_std"] == pytest.approx(sel.std(), rel=1e-6, abs=1e-9)
                got = hist[(hist.kind == kind) & (hist.layer == layer) & (hist["head"] == h)].sort_values("bin")
                a = np.abs(x).reshape(-1)
                exp = [np.sum((a >= l_) & (a < h_)) for l_, h_ in zip(lo, hi)]
                assert got["count"].sum() == a.size
                # bin edges are powers of ten computed two ways: allow an entry to sit in a neighbour bin
                assert np.abs(np.cumsum(got["count"].to_numpy()) - np.cumsum(exp)).max() <= 1 + a.size // 1000
                for lb in range(n_layers):
                    y = ref[kind][lb][:, h]
                    cos = (np.sum(x * y, 1) / (norms * np.linalg.norm(y, axis=1))).mean()
                    assert cross.loc[(kind, h, layer, lb), "cosine_mean"] == pytest.approx(cos, rel=1e-9, abs=1e-12)


def hsic_u(k, l):
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    return (np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * k.sum(0) @ l.sum(1)) / (n * (n - 3))


@pytest.mark.parametrize("sample", [10, 512])
def test_layer_cka_matches_numpy(run, sample, monkeypatch):
    monkeypatch.setattr(stats, "CKA_TOKENS", sample)  # 10: every k-th token across chunks and shards
    tables = stats.compute_stats(shards(run), run / "metadata.json", chunk_bytes=3000)
    ref, _ = reference(run)
    n_layers, n_tok = len(ref["key"]), ref["key"][0].shape[0]
    stride = -(-n_tok // stats.CKA_TOKENS)
    cka = tables["layer_cka"].to_pandas().set_index(["kind", "layer_a", "layer_b"]).sort_index()
    for kind in stats.KINDS:
        x = [ref[kind][i][::stride].reshape(-1, ref[kind][i].shape[1] * ref[kind][i].shape[2]) for i in range(n_layers)]
        grams = [a @ a.T for a in x]
        for a in range(n_layers):
            for b in range(n_layers):
                exp = hsic_u(grams[a], grams[b]) / np.sqrt(hsic_u(grams[a], grams[a]) * hsic_u(grams[b], grams[b]))
                assert cka.loc[(kind, a, b), "cka"] == pytest.approx(exp, rel=1e-8, abs=1e-10)
                assert cka.loc[(kind, a, b), "n_tokens"] == len(x[0])
            assert cka.loc[(kind, a, a), "cka"] == pytest.approx(1.0)


def test_padding_is_masked(run):
    """The shards hold right padding (batched prompts of different lengths); no padded token counts."""
    from safetensors import safe_open

    path = sorted((run / "kv").glob("part-*.safetensors"))[0]
    with safe_open(str(path), framework="np") as f:
        lengths = json.loads(f.metadata()["seq_lengths"])
        width = f.get_slice("layer_0_key").get_shape()[2]
    assert min(lengths) < width  # the fixture really is padded
    meta = json.loads((run / "metadata.json").read_text())
    heads = stats.compute_stats(shards(run), run / "metadata.json")["heads"]
    assert set(heads.column("n_tokens").to_pylist()) == {meta["n_tokens"]}


def test_chunking_does_not_change_results(run):
    big = stats.compute_stats(shards(run), run / "metadata.json")
    small = stats.compute_stats(shards(run), run / "metadata.json", chunk_bytes=1)  # one token per chunk
    for name in stats.STATS_TABLES:
        a, b = big[name].to_pandas(), small[name].to_pandas()
        num = a.select_dtypes("number").columns
        np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-9, atol=1e-12,
                                   err_msg=name)


def test_write_and_read_stats(run, tmp_path):
    paths = stats.write_stats(shards(run), tmp_path / "stats", run / "metadata.json")
    assert sorted(paths) == sorted(stats.STATS_TABLES)
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == sorted(f"{n}.parquet" for n in stats.STATS_TABLES)
    back = stats.read_stats(tmp_path / "stats")
    meta = stats.stats_meta(back)
    assert meta["model"] and meta["sparsity_rel"] == stats.SPARSITY_REL
    assert pq.read_table(paths["heads"]).num_rows == back["heads"].num_rows
    # plain DuckDB can read the statistics
    import duckdb

    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/stats/heads.parquet') WHERE kind='key'").fetchall()[0]
    assert n[0] == back["heads"].num_rows // 2


def test_pruning_potential(run):
    tables = stats.compute_stats(shards(run), run / "metadata.json")
    p = stats.pruning_potential(tables)
    heads = tables["heads"].to_pandas()
    v = heads[heads.kind == "value"]
    np.testing.assert_allclose(p["value_norm"], v["norm_mean"].to_numpy())
    np.testing.assert_allclose(p["potential"], 1 - v["norm_mean"].to_numpy() / v["norm_mean"].max())
    assert p["potential"].min() == 0 and p["potential"].max() < 1
    assert p["layer_potential"].min() == 0


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(KvcoreError, match="no kv/part"):
        stats.compute_stats([])
    with pytest.raises(KvcoreError, match="part-00000.safetensors"):
        stats.compute_stats([tmp_path / "kv" / "part-00000.safetensors"])
