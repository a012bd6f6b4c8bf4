"""The on-disk form of an extracted KV cache (DESIGN.md, "KV tables" and "Safetensors").

A run directory holds, per shard of sequences:
  kv/part-{shard}.safetensors           layer_{i}_key / layer_{i}_value [n_seq, n_kv, seq_len, head_dim]
  shards/layer={L}/part-{shard}.parquet one row per (seq_id, pos, head), sorted that way (an
                                        intermediate: what queries read until the run is finalized)
  shards/kv-{shard}.json                written last: the shard is complete when this exists
  shards/predictions-{shard}.parquet    next-token top-k of each sequence
and, once every shard is done (`finalize_shards`, from the shards' files named one by one: a file
of a shard this run does not have is never read):
  kv/layer={L}/data.parquet             each layer's parts compacted into one file, same order
  norms/key.parquet, value.parquet      every row's ids and norms, sorted by that kind's norm: a
                                        norm search reads only the row groups that can hold hits
  predictions.parquet, metadata.json    the latter last; it lists the layer files and the norm files
so a run holds one Parquet file per layer however many shards extracted it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcore import __version__
from kvcore.atomic import RUN_FILES, atomic_path, write_json
from kvcore.errors import KvcoreError, UsageError, one_line
from kvcore.tensorfile import start_writeback

# Row groups of this many rows: small enough that a point lookup reads one group of one
# file, large enough that scans stay sequential (decided in benchmarks/, issue 9).
ROW_GROUP_ROWS = 32768
# The compacted layer files: a point lookup decodes one whole row group of vectors, so smaller
# groups make it cheaper; below 16,384 rows a 20M-row run's layer scans take twice as long
# (benchmarks/query_bench.py --layout, docs/query.md).
LAYER_ROW_GROUP_ROWS = 16384
# zstd level 1, no dictionary and byte_stream_split on the vectors: 1.5-2.3x faster to write than
# pyarrow's defaults, as fast or faster to read, and smaller (codec table in benchmarks/README.md).
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 1
METADATA_KEYS = ("model", "dataset", "num_layers", "num_kv_heads", "num_heads", "head_dim", "seq_len", "dtype")


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}"


def part_file(layer: int, shard: int) -> str:
    """A shard's Parquet rows of one layer, relative to the run directory (until finalized)."""
    return f"shards/layer={layer}/{shard_name(shard)}.parquet"


def layer_file(layer: int) -> str:
    """A finalized run's Parquet file of one layer, relative to the run directory."""
    return f"kv/layer={layer}/data.parquet"


def layer_of(path: str | Path) -> int:
    """The layer of a Parquet file from its hive directory (`layer=L`)."""
    return int(Path(path).parent.name.removeprefix("layer="))


PARTS = ("both", "keys", "values")
STORAGE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ParquetSelection:
    """What of the cache goes to Parquet; the safetensors always hold every layer and head.

    `layers`/`heads` None means all; an empty `layers` writes no Parquet (safetensors only,
    what the benchmark's mode 2 measures). `parts` keys or values leaves the other vector and
    its norm NULL, so the schema and every query keep working. `storage_dtype` float16 halves
    the vector columns; norms stay float32, computed before rounding.
    """

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    parts: str = "both"
    storage_dtype: str = "float32"

    @classmethod
    def of(cls, layers=None, heads=None, parts: str | None = "both", storage_dtype: str | None = "float32"
           ) -> "ParquetSelection":
        parts, storage_dtype = parts or "both", storage_dtype or "float32"
        if parts not in PARTS:
            raise UsageError(f"parts must be one of {', '.join(PARTS)} (got {parts!r})")
        if storage_dtype not in STORAGE_DTYPES:
            raise UsageError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)} (got {storage_dtype!r})")
        for what, items in (("parquet_layers", layers), ("parquet_heads", heads)):
            if items is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
                raise UsageError(f"{what} must be non-negative integers (got {list(items)})")
        if heads is not None and not heads:
            raise UsageError("parquet_heads must name at least one KV head")
        # sorted: rows stay ordered by (seq_id, pos, head)
        return cls(None if layers is None else tuple(sorted(set(layers))),
                   None if heads is None else tuple(sorted(set(heads))), parts, storage_dtype)

    def check(self, num_layers: int, num_kv_heads: int) -> None:
        """A layer or head the model does not have is a usage error, found before any output."""
        for what, items, n, kind in (("parquet_layers", self.layers, num_layers, "layers"),
                                     ("parquet_heads", self.heads, num_kv_heads, "KV heads")):
            bad = [i for i in items or () if i >= n]
            if bad:
                raise UsageError(f"{what}: {', '.join(map(str, bad))} out of range; the model has {n} {kind} "
                                 f"(valid 0..{n - 1})")

    def layer_list(self, num_layers: int) -> list[int]:
        return list(range(num_layers)) if self.layers is None else list(self.layers)

    @property
    def is_default(self) -> bool:
        return self == ParquetSelection()

    def describe(self) -> dict:
        return {"layers": None if self.layers is None else list(self.layers),
                "heads": None if self.heads is None else list(self.heads),
                "parts": self.parts, "storage_dtype": self.storage_dtype}


def kv_schema(head_dim: int, storage_dtype: str = "float32"):
    import pyarrow as pa

    vector = pa.list_(pa.float16() if storage_dtype == "float16" else pa.float32(), head_dim)
    return pa.schema([("seq_id", pa.int32()), ("pos", pa.int32()), ("token_id", pa.int32()), ("head", pa.int16()),
                      ("key", vector), ("value", vector), ("key_norm", pa.float32()), ("value_norm", pa.float32())])


def _host_array(x) -> tuple[np.ndarray, bool]:
    """A host tensor or array as numpy, without a copy; True when it holds bf16 bits (uint16).

    Converting in numpy keeps torch ops out of the writer threads (torch's thread pool
    competes with them, see extract.py)."""
    if isinstance(x, np.ndarray):
        return x, False
    import torch

    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), True
    return x.numpy(), False


def _rows(x, lengths: list[int], heads) -> np.ndarray:
    """[n_seq, n_kv, width, dim] host tensor or array -> float32 rows [n, dim] ordered (seq, pos, head),
    real positions only; bit for bit what `.float()` gives."""
    return float32_rows(*_host_array(x), lengths, heads)


def float32_rows(src: np.ndarray, bf16: bool, lengths: list[int], heads, out: np.ndarray | None = None
                 ) -> np.ndarray:
    """`_rows` of a numpy [n_seq, n_kv, width, dim] array, bf16 given as its uint16 bits (`bf16`):
    the Parquet vectors' float32 values; also what `Run.nearest` reads from a shard's safetensors.
    `out` (float32 [n, dim]) receives them when given.

    One strided copy per sequence reorders its rows and widens them: bf16 is the top half of
    a float32, so its bits are shifted up into uint32 as they are copied; other dtypes are cast.
    """
    picked = None if heads is None else list(heads)
    n_heads = src.shape[1] if picked is None else len(picked)
    if picked and picked == list(range(picked[0], picked[0] + n_heads)):
        picked = slice(picked[0], picked[0] + n_heads)  # a view, not a copy (one head: Run.nearest)
    out = np.empty((sum(lengths) * n_heads, src.shape[3]), np.float32) if out is None else out
    wide = out.view(np.uint32) if bf16 else out
    start = 0
    for i, n in enumerate(lengths):
        t = src[i, :, :n].transpose(1, 0, 2)  # [len, n_kv, dim]: rows ordered (pos, head)
        if picked is not None:
            t = t[:, picked]
        dst = wide[start:start + n * n_heads].reshape(t.shape)
        if bf16:
            np.left_shift(t, np.uint32(16), out=dst, casting="unsafe")
        else:
            np.copyto(dst, t, casting="unsafe")
        start += n * n_heads
    return out


def vector_norms(rows: np.ndarray) -> np.ndarray:
    """The L2 norm of each float32 row as the Parquet tables store it (float32, no x*x temporary)."""
    return np.sqrt(np.einsum("ij,ij->i", rows, rows))


def layer_table(keys, values, seq_ids: list[int], token_ids: list[list[int]],
                heads=None, parts: str = "both", storage_dtype: str = "float32"):
    """Arrow rows for one layer of a shard; keys/values [n_seq, n_kv, seq_len, dim] host torch
    tensors in the model dtype or numpy arrays, stored as float32.

    Sequences may be shorter than seq_len (prompts); only their real positions become rows.
    `heads` keeps those KV heads only; `parts` keys/values leaves the other column NULL (its
    array may then be None); float16 `storage_dtype` rounds the stored vectors.
    """
    import pyarrow as pa

    present = keys if keys is not None else values
    n_seq, n_kv, width, dim = present.shape
    lengths = [len(ids) for ids in token_ids]
    head_ids = np.arange(n_kv, dtype=np.int16) if heads is None else np.asarray(heads, np.int16)
    per_pos = len(head_ids)
    if n_seq and all(n == width for n in lengths):
        seq = np.repeat(np.asarray(seq_ids, np.int32), width * per_pos)
        pos = np.tile(np.repeat(np.arange(width, dtype=np.int32), per_pos), n_seq)
        tok = np.repeat(np.asarray(token_ids, np.int32).reshape(-1), per_pos)
    else:
        seq = np.concatenate([np.full(n * per_pos, s, np.int32) for s, n in zip(seq_ids, lengths)])
        pos = np.concatenate([np.repeat(np.arange(n, dtype=np.int32), per_pos) for n in lengths])
        tok = np.concatenate([np.repeat(np.asarray(ids, np.int32), per_pos) for ids in token_ids])
    n_rows = len(seq)
    schema = kv_schema(dim, storage_dtype)
    vec = schema.field("key").type
    store = np.float16 if storage_dtype == "float16" else np.float32
    columns = {"seq_id": seq, "pos": pos, "token_id": tok, "head": np.tile(head_ids, n_rows // per_pos)}
    for kind, x, wanted in (("key", keys, parts != "values"), ("value", values, parts != "keys")):
        if not wanted:
            columns[kind], columns[f"{kind}_norm"] = pa.nulls(n_rows, vec), pa.nulls(n_rows, pa.float32())
            continue
        rows = _rows(x, lengths, heads)
        columns[kind] = pa.FixedSizeListArray.from_arrays(pa.array(rows.astype(store, copy=False).reshape(-1)),
                                                          type=vec)
        columns[f"{kind}_norm"] = vector_norms(rows)
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def parquet_options(schema) -> dict:
    """Writer options shared by every KV Parquet file of `schema` (a `kv_schema`).

    Dictionaries only for the integer columns: on float vectors pyarrow builds a dictionary,
    finds it too large and falls back to plain, having hashed every value. byte_stream_split
    groups the vectors' exponent bytes so zstd finds them (a bf16 cache stored as float32
    has two zero bytes per value); DuckDB reads it for FLOAT, not for float16. Min/max
    statistics only where a filter can use them (the scalars): the vectors' cost 5-10 % of the write.
    Only the vectors are compressed: zstd saves ~1.5 % of the file on the scalars (random norms,
    small dictionaries), and decompressing them was about a quarter of a norm search's scan
    (benchmarks/query_bench.py --norm-variants, docs/query.md).
    """
    ids = ["seq_id", "pos", "token_id", "head"]
    vectors = ["key.list.element", "value.list.element"]
    float32 = str(schema.field("key").type.value_type) == "float"
    return dict(compression={c: PARQUET_COMPRESSION if c in vectors else "none" for c in
                             [*ids, *vectors, "key_norm", "value_norm"]},
                compression_level={c: PARQUET_COMPRESSION_LEVEL for c in vectors},
                write_statistics=ids + ["key_norm", "value_norm"], use_dictionary=ids,
                use_byte_stream_split=vectors if float32 else False)


def write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, **parquet_options(table.schema))


def safetensors_metadata(meta: dict, seq_ids: list[int], lengths: list[int]) -> dict[str, str]:
    out = {k: str(meta[k]) for k in METADATA_KEYS}
    out.update(seq_ids=json.dumps(seq_ids), seq_lengths=json.dumps(lengths), kvcore_version=__version__)
    return out


class _LayerFile:
    """One layer's Parquet file of a shard, appended batch by batch in seq_id order.

    Rows are held back until a whole row group (`group` rows) is ready, so the file's row
    groups are exactly those `write_parquet` would make from the shard's whole table (with
    `group` ROW_GROUP_ROWS).
    """

    def __init__(self, path: Path, schema, group: int | None = None):
        self.path, self.schema, self.writer, self.pending, self.rows = path, schema, None, [], 0
        self.group = group or ROW_GROUP_ROWS

    def append(self, table, final: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if table is not None:
            self.pending.append(table)
            self.rows += table.num_rows
        n = sum(t.num_rows for t in self.pending)
        group = self.group
        cut = n if final else n // group * group
        if self.writer is None and (self.pending or final):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, self.schema, **parquet_options(self.schema))
        if cut:
            whole = pa.concat_tables(self.pending)
            self.writer.write_table(whole.slice(0, cut), row_group_size=group)
            self.pending = [whole.slice(cut)] if cut < n else []
            start_writeback(self.path)  # so the fsync before the rename has little left to write
        if final and self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None


@dataclass
class _Batch:
    """One batch on the host: per layer [b, n_kv, width, dim] tensors in the model dtype.

    Streaming: views of a reused host slot, `width` the shard's (zero beyond each sequence),
    `row` the batch's first row in the shard's safetensors, `ready` the CUDA event of its
    device->host copy. Buffered: the caller's tensors as they came, `row` None.
    """

    seq_ids: list[int]
    token_ids: list[list[int]]
    keys: list
    values: list
    width: int  # the batch's own padded width: positions [0, width) are rows' candidates
    row: int | None = None
    ready: object = None


class _HostSlot:
    """Reused host buffers for one batch of every layer (pinned when the source is on CUDA)."""

    def __init__(self, n_layers: int, shape: tuple, dtype, pin: bool):
        import torch

        self.shape, self.pin = shape, pin
        self.keys = [torch.zeros(shape, dtype=dtype, pin_memory=pin) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, pin_memory=pin) for _ in range(n_layers)]
        self.used_width = 0  # positions >= used_width are zero in every row
        self.pending = 0


class _HeapTrimmer:
    """Hands freed heap pages back to the OS when the process has grown by `budget` bytes.

    glibc serves large freed blocks (CPU activations, cache tensors) again from its heap (its
    mmap threshold adapts upwards), and small long-lived objects carved out of them make the
    heap grow a few MB per batch of a CPU forward: RSS would grow with the shard although
    nothing is held. malloc_trim(0) releases the free pages; called only past the budget, it
    costs nothing measurable. No-op off Linux/glibc.
    """

    def __init__(self, budget: int):
        import ctypes
        import sys

        self.budget, self.trim = budget, None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError, ValueError):
                trim = ctypes.CDLL(None).malloc_trim  # glibc only
                self.page = os.sysconf("SC_PAGE_SIZE")
                self.mark = self.rss()
                self.trim = trim

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __call__(self) -> None:
        if self.trim is not None and self.rss() > self.mark + self.budget:
            self.trim(0)
            self.mark = self.rss()  # legitimate growth (row groups filling) moves the mark up


class ShardWriter:
    """Writes one shard while the model runs on; nothing is in place until all succeeded.

    Given the shard's `seq_lengths` ({seq_id: length}) up front, the safetensors header is
    known, so each batch's rows are written at their offsets as they come (`TensorFileWriter`)
    and host memory stays flat: batches are copied into `max_pending + 1` reused host slots
    (pinned, filled on a second CUDA stream, an event marking each copy done, when the model
    is on a GPU), and `add` blocks when all are busy (and trims the heap, `_HeapTrimmer`).
    Without `seq_lengths` the tensors are held until `close()` and written then (same bytes).

    `add` hands each layer of a batch to a worker (one ordered chain of work per layer
    file): its safetensors rows, then its Parquet rows (as `selection` says). At most
    `max_pending` batches are in flight. A worker's error is raised by the next `add` or by
    `close`, which then clean up (`abort`).
    """

    def __init__(self, run_dir: str | Path, shard: int, meta: dict, workers: int | None = None,
                 max_pending: int = 2, seq_lengths: dict[int, int] | None = None,
                 selection: ParquetSelection | None = None):
        self.run_dir, self.shard, self.meta = Path(run_dir), shard, meta
        self.selection = selection or ParquetSelection()
        self.selection.check(meta["num_layers"], meta["num_kv_heads"])
        self.seq_ids: list[int] = []
        self.lengths: list[int] = []
        self.tensors: dict[str, list] = {}  # buffered mode only
        self.predictions: list = []
        n_layers = meta["num_layers"]
        self.workers = workers or max(1, min(n_layers, os.cpu_count() or 1, 16))
        self.max_pending = max(1, max_pending)
        self.staging = self.run_dir / ".staging" / shard_name(shard)
        self._files = {i: _LayerFile(self.staging / f"layer={i}" / f"{shard_name(shard)}.parquet",
                                     kv_schema(meta["head_dim"], self.selection.storage_dtype))
                       for i in self.selection.layer_list(n_layers)}
        self._plan = None if seq_lengths is None else sorted(seq_lengths.items())
        if self._plan is not None and not self._plan:
            raise KvcoreError(f"shard {shard}: no sequences")
        self._tensorfile = None
        self._slots: list[_HostSlot] = []
        self._free = queue.Queue()
        self._slot_lock = threading.Lock()
        self._copy_stream = None
        self._trimmer = None
        self._last: dict[int, object] = {}  # the latest queued work of each layer
        self._inflight: list[list] = []  # per batch, its layers' futures
        self._pool = None

    # -- the worker ------------------------------------------------------------------------

    def _write_layer(self, layer: int, previous, batch: _Batch) -> None:
        if previous is not None:
            previous.result()  # this layer's earlier batches first (and stop if one failed)
        if batch.ready is not None:
            batch.ready.synchronize()  # the device->host copy has landed
        k, v = batch.keys[layer], batch.values[layer]
        if self._tensorfile is not None:
            self._tensorfile.write(f"layer_{layer}_key", batch.row, k)
            self._tensorfile.write(f"layer_{layer}_value", batch.row, v)
        out = self._files.get(layer)
        if out is not None:
            sel, w = self.selection, batch.width
            table = layer_table(k[:, :, :w] if sel.parts != "values" else None,
                                v[:, :, :w] if sel.parts != "keys" else None,
                                batch.seq_ids, batch.token_ids, sel.heads, sel.parts, sel.storage_dtype)
            out.append(table)

    # -- staging a batch on the host -------------------------------------------------------

    def _start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"kvcore-{shard_name(self.shard)}")

    def _open_tensorfile(self, sample) -> None:
        from kvcore.tensorfile import TensorFileWriter, dtype_name

        n_seq, width = len(self._plan), max(n for _, n in self._plan)
        shape = (n_seq, self.meta["num_kv_heads"], width, self.meta["head_dim"])
        dtype = dtype_name(sample.dtype)
        specs = {f"layer_{i}_{kind}": (dtype, shape) for i in range(self.meta["num_layers"])
                 for kind in ("key", "value")}
        metadata = safetensors_metadata(self.meta, [s for s, _ in self._plan], [n for _, n in self._plan])
        self._tensorfile = TensorFileWriter(self.staging / f"{shard_name(self.shard)}.safetensors", specs, metadata)

    def _take_slot(self, batch_size: int, sample) -> _HostSlot:
        """A free host slot big enough for the batch; blocks while all are busy."""
        width = self._tensorfile.specs["layer_0_key"][1][2]
        shape = (batch_size, self.meta["num_kv_heads"], width, self.meta["head_dim"])
        pin = sample.device.type == "cuda"
        if len(self._slots) < self.max_pending + 1:
            slot = _HostSlot(self.meta["num_layers"], shape, sample.dtype, pin)
            self._slots.append(slot)
            return slot
        while True:
            try:
                slot = self._free.get(timeout=0.2)
                break
            except queue.Empty:
                self._raise_failed()  # a failed worker may be why none comes back
        if slot.shape[0] < batch_size:  # a larger batch than the first: grow this slot
            slot.__init__(self.meta["num_layers"], shape, sample.dtype, pin)
        return slot

    def _release(self, slot: _HostSlot) -> None:
        with self._slot_lock:
            slot.pending -= 1
            if slot.pending == 0:
                self._free.put(slot)

    def _stage(self, slot: _HostSlot, layer_keys, layer_values, width: int) -> object:
        """Copy a batch into the slot (zero beyond `width`); returns the copy's CUDA event or None."""
        import torch

        b = layer_keys[0].shape[0]
        if width < slot.used_width:  # an earlier, wider batch left values beyond this one's width
            for t in slot.keys + slot.values:
                t[:, :, width:slot.used_width].zero_()
        slot.used_width = width
        sample = layer_keys[0]
        if sample.device.type == "cuda" and torch.cuda.is_available():
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(device=sample.device)
            stream = self._copy_stream
            stream.wait_stream(torch.cuda.current_stream(sample.device))  # the forward that made them
            with torch.cuda.stream(stream):
                for dst, src in zip(slot.keys + slot.values, list(layer_keys) + list(layer_values)):
                    dst[:b, :, :width].copy_(src, non_blocking=True)
                    src.record_stream(stream)  # the allocator must not reuse it before the copy ran
                event = torch.cuda.Event()
                event.record(stream)
            return event
        for dst, src in zip(slot.keys + slot.values, list(layer_keys) + list(layer_values)):
            dst[:b, :, :width].copy_(src)
        return None

    def _raise_failed(self) -> None:
        for futures in self._inflight:
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()

    # -- the API ---------------------------------------------------------------------------

    def add(self, seq_ids: list[int], token_ids: list[list[int]], layer_keys, layer_values, predictions) -> None:
        """One batch: per-layer torch tensors [batch, n_kv, seq, dim] in the model dtype, any device."""
        try:
            self._add(list(seq_ids), [list(t) for t in token_ids], layer_keys, layer_values, predictions)
        except BaseException:
            self.abort()
            raise

    def _add(self, seq_ids, token_ids, layer_keys, layer_values, predictions) -> None:
        if self._pool is None:
            self._start()
        self._raise_failed()
        width = layer_keys[0].shape[2]
        if self._plan is not None:
            row = len(self.seq_ids)
            want = self._plan[row:row + len(seq_ids)]
            if [(s, len(t)) for s, t in zip(seq_ids, token_ids)] != want:
                raise KvcoreError(f"shard {self.shard}: batch of seq_ids {seq_ids} does not follow the planned "
                                  f"sequences {[s for s, _ in want]} (batches come in seq_id order)")
            if self._tensorfile is None:
                self._open_tensorfile(layer_keys[0])
                per_seq = int(np.prod(self._tensorfile.specs["layer_0_key"][1][1:])) * layer_keys[0].element_size()
                slot_bytes = 2 * self.meta["num_layers"] * len(seq_ids) * per_seq
                self._trimmer = _HeapTrimmer(max(64 << 20, slot_bytes))  # a batch's worth of slack, at least 64 MB
            slot = self._take_slot(len(seq_ids), layer_keys[0])
            ready = self._stage(slot, layer_keys, layer_values, width)
            b = len(seq_ids)
            batch = _Batch(seq_ids, token_ids, [t[:b] for t in slot.keys], [t[:b] for t in slot.values], width,
                           row, ready)
        else:
            slot = None
            keys, values = [k.cpu() for k in layer_keys], [v.cpu() for v in layer_values]
            for i, (k, v) in enumerate(zip(keys, values)):
                self.tensors.setdefault(f"layer_{i}_key", []).append(k)
                self.tensors.setdefault(f"layer_{i}_value", []).append(v)
            if not self._files:
                return self._note(seq_ids, token_ids, predictions)
            batch = _Batch(seq_ids, token_ids, keys, values, width)
        self._note(seq_ids, token_ids, predictions)
        layers = range(self.meta["num_layers"]) if slot is not None else sorted(self._files)
        futures = []
        if slot is not None:
            slot.pending = len(layers)
        for i in layers:
            # FIFO pool: a layer's previous work was queued earlier, so waiting on it cannot deadlock
            f = self._pool.submit(self._write_layer, i, self._last.get(i), batch)
            if slot is not None:
                f.add_done_callback(lambda _, s=slot: self._release(s))
            self._last[i] = f
            futures.append(f)
        self._inflight.append(futures)
        while len(self._inflight) > self.max_pending:
            for f in self._inflight.pop(0):
                f.result()
        self._raise_failed()
        if self._trimmer is not None:
            self._trimmer()

    def _note(self, seq_ids, token_ids, predictions) -> None:
        self.seq_ids += seq_ids
        self.lengths += [len(t) for t in token_ids]
        self.predictions.append(predictions)

    def abort(self) -> None:
        """Stop the workers and remove everything staged; nothing of the shard looks complete."""
        if self._pool is not None:
            for futures in self._inflight:
                for f in futures:
                    f.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # no copy may still land in a slot
        self._inflight = []
        self._slots, self.tensors = [], {}
        for f in self._files.values():
            f.abort()
        if self._tensorfile is not None:
            self._tensorfile.abort()
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.staging.parent.rmdir()

    def close(self) -> dict:
        try:
            return self._close()
        except BaseException:
            self.abort()
            raise

    def _finish_workers(self) -> None:
        # the last row groups of each layer file, in parallel, then wait for everything
        finals = [self._pool.submit(lambda f, prev: (prev is None or prev.result(), f.append(None, final=True)),
                                    f, self._last.get(layer)) for layer, f in self._files.items()]
        for futures in self._inflight:
            for f in futures:
                f.result()
        for f in finals:
            f.result()
        self._inflight = []
        self._pool.shutdown(wait=True)
        self._pool = None
        self._slots = []

    def _write_held_tensors(self, path: Path) -> None:
        """Buffered mode: the held batches, right-padded to the shard's width, in one file."""
        import torch

        from kvcore.tensorfile import TensorFileWriter, dtype_name

        width = max(self.lengths)  # batches of prompts differ in length: right-pad with zeros
        n_kv, dim = self.meta["num_kv_heads"], self.meta["head_dim"]
        specs = {name: (dtype_name(parts[0].dtype), (len(self.seq_ids), n_kv, width, dim))
                 for name, parts in self.tensors.items()}
        out = TensorFileWriter(path, specs, safetensors_metadata(self.meta, self.seq_ids, self.lengths))
        try:
            for name, parts in self.tensors.items():
                row = 0
                for t in parts:
                    out.write(name, row, torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2])))
                    row += t.shape[0]
        except BaseException:
            out.abort()
            raise
        self.tensors = {}
        out.close(fsync=False)  # fsynced when moved into place

    def _close(self) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._pool is None:
            raise KvcoreError(f"shard {self.shard}: nothing was added")
        if self._plan is not None and len(self.seq_ids) != len(self._plan):
            raise KvcoreError(f"shard {self.shard}: {len(self.seq_ids)} of {len(self._plan)} planned sequences "
                              "were added")
        self._finish_workers()
        name = shard_name(self.shard)
        kv_dir, shards_dir = self.run_dir / "kv", self.run_dir / "shards"
        staged = self.staging / f"{name}.safetensors"
        if self._tensorfile is not None:
            self._tensorfile.close(fsync=False)  # fsynced when moved into place
        else:
            self._write_held_tensors(staged)
        layers = list(self._files)
        rows = sum(f.rows for f in self._files.values())
        try:
            # Everything is written; now move it into place, the shard manifest last.
            _move_into_place(staged, kv_dir / f"{name}.safetensors")
            with atomic_path(shards_dir / f"predictions-{self.shard:05d}.parquet") as tmp:
                pq.write_table(pa.concat_tables(self.predictions), tmp)
            for layer in layers:
                _move_into_place(self._files[layer].path, self.run_dir / part_file(layer, self.shard))
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.staging.parent.rmdir()  # .staging/ goes once no shard is being written
        manifest = {"shard": self.shard, "seq_ids": self.seq_ids, "seq_lengths": self.lengths,
                    "n_tokens": sum(self.lengths), "n_rows_per_layer": rows // len(layers) if layers else 0,
                    "files": [part_file(i, self.shard) for i in layers] + [f"kv/{name}.safetensors"],
                    **{k: self.meta[k] for k in METADATA_KEYS}}
        if not self.selection.is_default:  # only then, so default manifests stay as they were
            manifest["parquet"] = self.selection.describe()
        write_json(shards_dir / f"kv-{self.shard:05d}.json", manifest)
        return manifest


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename a finished file into place durably (what atomic_path does for its temporary)."""
    with open(src, "rb") as fh:
        os.fsync(fh.fileno())
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_files(run_dir: str | Path) -> list[Path]:
    """A finalized run's kv/part-*.safetensors, those its metadata.json lists (not a glob)."""
    run_dir = Path(run_dir)
    path = run_dir / "metadata.json"
    if not path.is_file():
        raise KvcoreError(f"{run_dir}: no metadata.json; extract the KV cache first")
    return [run_dir / "kv" / f"{shard_name(i)}.safetensors" for i in json.loads(path.read_text())["shards"]]


def finalize_run(run_dir: str | Path, n_shards: int) -> dict:
    """`finalize_shards` over shards 0 .. n_shards-1 of `run_dir`, named, not globbed (a shard
    left by an earlier, larger run is not one of this run's); then removes the compacted
    shard parts (what the workflow's temp() does for its runs)."""
    run_dir = Path(run_dir)
    shards = run_dir / "shards"
    manifests = [shards / f"kv-{i:05d}.json" for i in range(n_shards)]
    meta = finalize_shards(manifests, [shards / f"predictions-{i:05d}.parquet" for i in range(n_shards)],
                           run_dir / "metadata.json", run_dir / "predictions.parquet")
    for part in shard_parts(manifests):
        part.unlink()
        with contextlib.suppress(OSError):
            part.parent.rmdir()
    return meta


def shard_parts(manifests) -> list[Path]:
    """The Parquet parts these shard manifests list, as paths (the run directory is the manifests')."""
    out = []
    for p in manifests:
        run_dir = Path(p).parent.parent
        out += [run_dir / f for f in json.loads(Path(p).read_text())["files"] if f.endswith(".parquet")]
    return out


def compact_layer(parts: list[Path], out: Path) -> int:
    """One layer's shard parts, in shard (so seq_id) order, streamed into one file of
    LAYER_ROW_GROUP_ROWS-row groups: rows stay sorted by (seq_id, pos, head) and memory holds one
    part and one row group. Returns the rows written."""
    import pyarrow.parquet as pq

    with atomic_path(out) as tmp:
        schema = pq.read_schema(parts[0])
        layer = _LayerFile(tmp, schema, LAYER_ROW_GROUP_ROWS)
        try:
            for part in parts:
                try:
                    table = pq.read_table(part, schema=schema)
                except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
                    raise KvcoreError(f"{part}: unreadable Parquet part ({one_line(exc)}); re-extract its shard") \
                        from None
                layer.append(table)
            layer.append(None, final=True)
        except BaseException:
            layer.abort()
            raise
    return layer.rows


def compact_layers(manifests: list[dict], run_dir: Path) -> list[str]:
    """Every stored layer of these shards (manifests in shard order) into `layer_file(L)`; returns
    those files relative to `run_dir`. Layers are compacted in parallel (pyarrow leaves the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    layers: dict[int, list[Path]] = {}
    for m in manifests:
        for rel in m["files"]:
            if rel.endswith(".parquet"):
                layers.setdefault(layer_of(rel), []).append(run_dir / rel)
    short = [str(layer) for layer, parts in layers.items() if len(parts) != len(manifests)]
    if short:
        raise KvcoreError(f"cannot finalize the run: layer {', '.join(short)} has Parquet parts in only some shards "
                          "(the shards were extracted with different parquet_layers); re-extract them")
    missing = [str(p) for parts in layers.values() for p in parts if not p.is_file()]
    if missing:
        raise KvcoreError(f"cannot finalize the run: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                          "missing (extract every shard first)")
    with ThreadPoolExecutor(max(1, min(len(layers), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda item: compact_layer(item[1], run_dir / layer_file(item[0])), sorted(layers.items())))
    return [layer_file(layer) for layer in sorted(layers)]


# norms/{kind}.parquet: the scalar columns of every layer file sorted by that kind's norm, so a
# norm search reads the few row groups whose min/max can hold a hit instead of every layer file
# (docs/query.md). 65,536-row groups, zstd: at 20M rows 16,384-row groups take twice as long to
# search, 262,144 no less, and at 2M those prune too coarsely (query_bench.py --norm-variants).
NORM_FILES = {kind: f"norms/{kind}.parquet" for kind in ("key", "value")}
NORM_FILE_ROW_GROUP_ROWS = 65536
NORM_FILE_COLUMNS = "CAST(layer AS SMALLINT) AS layer, head, seq_id, pos, token_id, key_norm, value_norm"
NORM_SORT_MEMORY = "1GB"  # DuckDB spills the rest of the sort to a directory inside the run


def write_norm_files(run_dir: Path, layer_files: list[str]) -> dict[str, str]:
    """NORM_FILES from these layer files (relative to `run_dir`), each under a temporary name
    until complete; ties are broken by (layer, seq_id, pos, head), so the same rows always give the
    same file. Returns {kind: file} relative to `run_dir` ({} when no layer has Parquet rows)."""
    import tempfile

    import duckdb

    if not layer_files:
        return {}
    with tempfile.TemporaryDirectory(prefix=".norms.tmp-", dir=run_dir) as spill:
        con = duckdb.connect(config={"memory_limit": NORM_SORT_MEMORY, "temp_directory": spill})
        try:
            rows = con.read_parquet([str(run_dir / rel) for rel in layer_files], hive_partitioning=True)
            for kind, rel in NORM_FILES.items():
                with atomic_path(run_dir / rel) as tmp:
                    (rows.select(NORM_FILE_COLUMNS).order(f"{kind}_norm, layer, seq_id, pos, head")
                     .write_parquet(str(tmp), compression=PARQUET_COMPRESSION,
                                    row_group_size=NORM_FILE_ROW_GROUP_ROWS))
        except duckdb.Error as exc:
            raise KvcoreError(f"cannot write the run's norm files: {one_line(exc)}") from None
        finally:
            con.close()
    return dict(NORM_FILES)


def finalize_shards(manifests, predictions, metadata_out: str | Path, predictions_out: str | Path) -> dict:
    """Write a run's layer files (kv/layer={L}/data.parquet, compacted from the shards' parts), its
    norm files (norms/{kind}.parquet), predictions.parquet and, last, metadata.json from exactly
    these shard manifests and predictions files (the rule's inputs, in shard order); every one
    must exist."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [str(p) for p in [*manifests, *predictions] if not Path(p).is_file()]
    if not manifests or missing:
        raise KvcoreError(f"cannot finalize the run: {', '.join(missing) or 'no shard'} missing "
                          "(extract every shard first)")
    manifests = sorted((json.loads(Path(p).read_text()) for p in manifests), key=lambda m: m["shard"])
    first = manifests[0]
    meta = {k: first[k] for k in METADATA_KEYS}
    meta.update(n_shards=len(manifests), n_sequences=sum(len(m["seq_ids"]) for m in manifests),
                n_tokens=sum(m["n_tokens"] for m in manifests), kvcore_version=__version__,
                shards=[m["shard"] for m in manifests])
    if "parquet" in first:  # a non-default Parquet selection (see ParquetSelection)
        meta["parquet"] = first["parquet"]
    run_dir = Path(metadata_out).parent
    meta["files"] = compact_layers(manifests, run_dir)
    meta["norm_files"] = write_norm_files(run_dir, meta["files"])
    with atomic_path(predictions_out) as tmp:
        pq.write_table(pa.concat_tables([pq.read_table(p) for p in predictions]), tmp)
    write_json(metadata_out, meta)
    return meta


def refuse_foreign_files(run_dir: str | Path, name: str) -> None:
    """UsageError when `run_dir` holds any file no run writes (a user's own: never to be deleted)."""
    import fnmatch

    run_dir = Path(run_dir)
    found = (p for p in sorted(run_dir.rglob("*")) if p.is_symlink() or not p.is_dir())
    for rel in (p.relative_to(run_dir).as_posix() for p in found):
        if not any(fnmatch.fnmatchcase(rel, pattern) for pattern in RUN_FILES):
            raise UsageError(f"{name} is not a kvcore run directory (it holds {rel}); nothing was deleted: "
                             f"choose a new or empty directory")


def remove_run(run_dir: str | Path, name: str) -> None:
    """Empty a run directory of a run's own files, keeping the directory; refuses, deleting
    nothing, when it holds anything else (`name` is how the user called it, e.g. '--out X')."""
    run_dir = Path(run_dir)
    refuse_foreign_files(run_dir, name)
    for path in sorted(run_dir.rglob("*"), reverse=True):  # a directory's entries before it
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
