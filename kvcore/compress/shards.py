"""A run's extracted shards read as one merged extracted file, one tensor at a time.

The compress job compresses every extracted sequence of a run into one file. Merging the
shards into one safetensors first would write (and hold) a full copy of the cache; instead
`MergedShards` offers what `safe_open` offers on that merged file (`metadata()`, `keys()`,
`get_tensor(name)`), building each tensor from the shards' slices when it is asked for, so
memory holds one layer's tensor at a time. Its sizes (`nbytes`, `header_len`) are those of the
merged file `save_tensors` would have written: the metrics stay the same bytes for bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvcore.errors import KvcoreError


class MergedShards:
    """The shards' sequences side by side (right-padded to the longest), read lazily."""

    def __init__(self, paths):
        from safetensors import safe_open

        self.paths = [Path(p) for p in paths]
        self._shapes: list[dict] = []  # per shard, each tensor's shape
        seq_ids, lengths, meta, names = [], [], {}, None
        for path in self.paths:
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                    shard_names = sorted(f.keys())
                    shapes = {name: f.get_slice(name).get_shape() for name in shard_names}
                    dtypes = {f.get_slice(name).get_dtype() for name in shard_names}
            except Exception as exc:
                raise KvcoreError(f"{path}: not a readable extracted shard ({exc})") from None
            if names is not None and shard_names != names:
                raise KvcoreError(f"{path}: holds other tensors than {self.paths[0]}")
            for name, shape in shapes.items():  # shards differ only in sequences and width
                first = self._shapes[0][name] if self._shapes else shape
                if len(shape) != 4 or (shape[1], shape[3]) != (first[1], first[3]):
                    raise KvcoreError(f"{path}: {name} is {list(shape)}, not [n_seq, n_kv, seq, dim] with the "
                                      f"n_kv and dim of {self.paths[0]}'s ({list(first)})")
            if len(dtypes) > 1:
                raise KvcoreError(f"{path}: its tensors have several dtypes ({', '.join(sorted(dtypes))})")
            if self._shapes and dtypes and dtypes != {dtype}:
                raise KvcoreError(f"{path}: its tensors are {dtypes.pop()} but {self.paths[0]}'s are {dtype}")
            dtype = next(iter(dtypes), "float32")
            names = shard_names
            seq_ids += json.loads(meta.get("seq_ids", "[]"))
            lengths += json.loads(meta.get("seq_lengths", "[]"))
            self._shapes.append(shapes)
        if not self._shapes:
            raise KvcoreError("no extracted shards to compress")
        self._names = names
        self.width = max(shape[2] for shapes in self._shapes for shape in shapes.values())
        self.n_seq = sum(shapes[names[0]][0] for shapes in self._shapes)
        self._metadata = {**meta, "seq_ids": json.dumps(seq_ids), "seq_lengths": json.dumps(lengths),
                          "seq_len": str(self.width)}
        self._dtype = dtype

    def metadata(self) -> dict:
        return dict(self._metadata)

    def keys(self) -> list[str]:
        return list(self._names)

    def get_tensor(self, name: str, device=None):
        """The merged tensor `name`: every shard's sequences, right-padded to the run's width,
        built on `device` (default the CPU) one shard's slice at a time, so host memory holds one
        shard's part of the layer, not the parts, their padded copies and the merged tensor."""
        import torch

        from safetensors import safe_open

        merged, start = None, 0
        for path in self.paths:  # opened per tensor: the mapping goes with it, so the pages
            with safe_open(str(path), "pt") as f:  # read stay out of this process's RSS
                part = f.get_tensor(name)
            if merged is None:  # zeros: the padding of sequences shorter than the run's width
                merged = torch.zeros(self.shape(name), dtype=part.dtype, device=device)
            merged[start:start + part.shape[0]].narrow(-2, 0, part.shape[-2]).copy_(part)
            start += part.shape[0]
            del part  # freed before the next shard's part is read
        return merged

    def shape(self, name: str) -> tuple[int, ...]:
        first = self._shapes[0][name]
        return (self.n_seq, first[1], self.width, *first[3:])

    def header(self) -> bytes:
        """The bytes before the tensor data in the merged file `save_tensors` would write."""
        from kvcore.tensorfile import DTYPE_TAGS, header_bytes

        dtype = {tag: name for name, tag in DTYPE_TAGS.items()}.get(self._dtype, self._dtype)
        return header_bytes({name: (dtype, self.shape(name)) for name in self._names}, self._metadata)[0]

    @property
    def header_len(self) -> int:
        """The merged file's JSON header length (the u64 at its start)."""
        return len(self.header()) - 8

    @property
    def nbytes(self) -> int:
        """The merged file's size on disk."""
        import torch

        from kvcore.tensorfile import DTYPE_TAGS

        dtype = {tag: name for name, tag in DTYPE_TAGS.items()}.get(self._dtype, self._dtype)
        item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        data = 0
        for name in self._names:
            n = item
            for s in self.shape(name):
                n *= s
            data += n
        return len(self.header()) + data

    def __str__(self) -> str:  # names the run in error messages
        return ", ".join(str(p) for p in self.paths)

    def close(self) -> None:
        self._shapes = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
