"""Write safetensors files whose bytes depend only on their content.

safetensors orders the `__metadata__` map as a hash map does, so the same tensors and
metadata give different bytes from one process to the next. After writing, the JSON
header is rewritten with sorted keys (same length, padded with spaces as the format
allows), so identical runs produce byte-identical files.

`TensorFileWriter` writes the same bytes without holding the tensors: the header is
computed up front from names, dtypes and shapes, then each tensor's rows are written at
their offsets as they arrive (extraction streams a shard batch by batch this way).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

from kvcore.atomic import usual_mode
from kvcore.errors import KvcoreError

# torch dtype name -> safetensors dtype tag
DTYPE_TAGS = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _canonical_text(header: dict) -> bytes:
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(
        sorted(header.items()))
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()


def canonicalize_header(path: str | Path) -> None:
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        text = _canonical_text(json.loads(fh.read(n)))
        if len(text) > n:  # cannot happen: same content, compact separators
            raise KvcoreError(f"{path}: canonical safetensors header is longer than the original")
        fh.seek(8)
        fh.write(text.ljust(n, b" "))


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file with a deterministic header; write errors become one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
        canonicalize_header(path)
        usual_mode(path)
    except (OSError, SafetensorError) as exc:  # disk full, file too large, ...
        raise KvcoreError(f"cannot write {path}: {exc}") from None


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def header_bytes(specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None
                 ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(the bytes before the tensor data, {name: (start, end) in the data}) exactly as
    `save_tensors` writes them for tensors of these (dtype name, shape).

    safetensors lays data out by dtype, then by name; with one dtype that is name order, the
    only case this supports. Its header is compact JSON padded with spaces to a multiple of 8;
    the canonical header has the same content reordered, hence the same length.
    """
    if len({d for d, _ in specs.values()}) > 1:
        raise KvcoreError("a streamed safetensors file holds one dtype")  # data order would differ
    header, offsets, at = {}, {}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        size = _itemsize(dtype)
        for n in shape:
            size *= n
        offsets[name] = (at, at + size)
        header[name] = {"dtype": DTYPE_TAGS[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = _canonical_text(header)
    n = len(text) + (8 - len(text) % 8) % 8
    return struct.pack("<Q", n) + text.ljust(n, b" "), offsets


def _itemsize(dtype: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


class TensorFileWriter:
    """A safetensors file written in place, rows of each tensor at a time (thread-safe).

    `write(name, first_row, tensor)` puts a host tensor's bytes at rows [first_row, ...) of
    the named tensor (rows = its first dimension, which is contiguous per row in the file).
    `close()` checks every byte was written exactly once in total; the caller renames.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path, self.specs = Path(path), dict(specs)
        head, offsets = header_bytes(self.specs, metadata)
        self._base = len(head)
        self._offsets = offsets
        self._total = sum(end - start for start, end in offsets.values())
        self._written = 0
        self._lock = threading.Lock()
        self._fd = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            self._pwrite(memoryview(head), 0)
        except OSError as exc:
            self.abort()
            raise KvcoreError(f"cannot write {self.path}: {exc}") from None

    def _pwrite(self, data: memoryview, at: int) -> None:
        start, total = at, len(data)
        while len(data):  # pwrite may write less than asked
            n = os.pwrite(self._fd, data, at)
            data, at = data[n:], at + n
        if _SYNC_FILE_RANGE is not None and total >= WRITEBACK_MIN_BYTES:
            # start the disk writing this range now, without waiting, so close()'s fsync does not
            # write the whole shard after the last batch (a big-memory host caches it all otherwise)
            _SYNC_FILE_RANGE(self._fd, start, total, 2)  # SYNC_FILE_RANGE_WRITE; fsync reports errors

    def write(self, name: str, first_row: int, tensor) -> None:
        """Rows [first_row, first_row + len(tensor)) of tensor `name` from a host torch tensor."""
        dtype, shape = self.specs[name]
        if dtype_name(tensor.dtype) != dtype or tuple(tensor.shape[1:]) != tuple(shape[1:]) \
                or first_row + tensor.shape[0] > shape[0]:
            raise KvcoreError(f"{self.path}: {name} rows {first_row}.. of {tuple(tensor.shape)} {tensor.dtype} "
                              f"do not fit {shape} {dtype}")
        start, end = self._offsets[name]
        row_bytes = (end - start) // shape[0] if shape[0] else 0
        data = memoryview(tensor.contiguous().view(-1).view(_uint8()).numpy())
        try:
            self._pwrite(data, self._base + start + first_row * row_bytes)
        except OSError as exc:  # disk full, file too large, ...
            raise KvcoreError(f"cannot write {self.path}: {exc}") from None
        with self._lock:
            self._written += len(data)

    def close(self, fsync: bool = True) -> None:
        if self._written != self._total:
            self.abort()
            raise KvcoreError(f"{self.path}: {self._written} of {self._total} tensor bytes written")
        try:
            if fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise KvcoreError(f"cannot write {self.path}: {exc}") from None
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file (the caller removes it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


WRITEBACK_MIN_BYTES = 1 << 20


def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(path: str | Path) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting (see _pwrite)."""
    if _SYNC_FILE_RANGE is None:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _SYNC_FILE_RANGE(fd, 0, 0, 2)  # the whole file; SYNC_FILE_RANGE_WRITE
    finally:
        os.close(fd)


def _uint8():
    import torch

    return torch.uint8


class SpooledTensorFile:
    """A safetensors file of many dtypes built tensor by tensor, without holding the tensors.

    `add(name, tensor)` appends the tensor's bytes to a spool file beside `path` at once;
    `finish(metadata)` writes `path`: the header, then the data copied from the spool in the
    order safetensors itself lays tensors out, so the bytes equal `save_tensors` of the same
    tensors (tests/test_compress_files.py compares them). The caller renames `path`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.spool = self.path.with_name(self.path.name + ".spool")
        self._specs: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # dtype, shape, spool start, end
        self._fh = open(self.spool, "w+b")

    def add(self, name: str, tensor) -> None:
        data = tensor.detach().cpu().contiguous().view(-1).view(_uint8()).numpy()
        start = self._fh.tell()
        try:
            self._fh.write(memoryview(data))
        except OSError as exc:
            raise KvcoreError(f"cannot write {self.spool}: {exc}") from None
        self._specs[name] = (dtype_name(tensor.dtype), tuple(tensor.shape), start, start + data.nbytes)

    def finish(self, metadata: dict[str, str] | None = None) -> None:
        order = _data_order({name: spec[0] for name, spec in self._specs.items()})
        header, at = {}, 0
        for name in order:
            dtype, shape, start, end = self._specs[name]
            header[name] = {"dtype": DTYPE_TAGS[dtype], "shape": list(shape), "data_offsets": [at, at + end - start]}
            at += end - start
        if metadata is not None:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        text = _canonical_text(header)
        text = text.ljust(len(text) + (8 - len(text) % 8) % 8, b" ")
        try:
            with open(self.path, "wb") as out:
                out.write(struct.pack("<Q", len(text)) + text)
                for name in order:
                    _, _, start, end = self._specs[name]
                    self._fh.seek(start)
                    _copy(self._fh, out, end - start)
            usual_mode(self.path)
        except OSError as exc:  # disk full, file too large, ...
            raise KvcoreError(f"cannot write {self.path}: {exc}") from None
        finally:
            self.close()

    def close(self) -> None:
        """Close and remove the spool (the output, if any, stays for the caller)."""
        try:
            if not self._fh.closed:
                self._fh.close()  # flushing may fail (disk full): the spool goes all the same
        except OSError:
            pass
        finally:
            self.spool.unlink(missing_ok=True)


def _copy(src, dst, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 64 << 20))
        if not chunk:
            raise OSError(f"spool file ended {n} bytes early")
        dst.write(chunk)
        n -= len(chunk)


def _data_order(dtypes: dict[str, str]) -> list[str]:
    """Tensor names in the order safetensors lays their data out (it sorts by dtype, then name):
    read off the header it writes for one-element tensors of the same names and dtypes."""
    import torch
    from safetensors.torch import save

    probe = save({name: torch.zeros(1, dtype=getattr(torch, dtype)) for name, dtype in dtypes.items()})
    (n,) = struct.unpack("<Q", probe[:8])
    header = json.loads(probe[8:8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])
