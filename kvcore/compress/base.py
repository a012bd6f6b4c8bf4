"""The common interface of every compression method.

A family subclasses `Method`, takes its parameters from `kvcore.compress.params.PARAMS`
(where they are checked, without torch) and implements
`_encode` (tensor -> unpacked fields) and `_decode` (fields -> tensor); `_pack` and
`_unpack` turn fields into the stored form where that differs (bit packing). The
public `compress`, `decompress` and `fake` are written once here, so
`fake(x) == decompress(compress(x))` holds by construction: both end in the same
`_decode`, and packing is an exact identity on the fields.

Every packed form carries `header`: int64 [n_seq, n_kv, seq, dim, dtype code], so
`decompress` needs nothing but the method and the packed tensors.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Mapping

import torch

from kvcore.compress.params import Param, check_params
from kvcore.errors import UsageError

KINDS = ("key", "value")
HEADER_NBYTES = 5 * 8  # the int64 header above

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


# --------------------------------------------------------------------------- header


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES[dtype]


def make_header(x: torch.Tensor) -> torch.Tensor:
    values = (*x.shape, dtype_code(x.dtype))
    if x.device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=x.device)
    # a copy of one kept on the device: building it from host memory costs a pinned buffer and a
    # host-to-device copy per compressed tensor, as much host time as the kernel's launch
    return _device_header(values, x.device).clone()


@functools.lru_cache(maxsize=256)
def _device_header(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device)


def read_header(packed: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
    header = packed.get("header")
    if header is None or header.dtype != torch.int64 or header.numel() != 5:
        raise ValueError("packed form has no valid 'header' (int64 [n_seq, n_kv, seq, dim, dtype])")
    *shape, code = header.tolist()
    if code not in _CODE_DTYPES or min(shape) < 0:
        raise ValueError(f"packed form has a corrupt header {header.tolist()}")
    return tuple(shape), _CODE_DTYPES[code], header.device


# --------------------------------------------------------------------------- method


class Method:
    """A named, validated compression method. Subclasses implement one family."""

    family: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    needs_scores: ClassVar[bool] = False  # evict: compress needs a keep mask

    def __init__(self, name: str, spec: Mapping[str, Any]):
        self.name = name
        for key, value in check_params(name, self.family, spec).items():
            setattr(self, key, value)
        self.setup()

    # ---- public API -----------------------------------------------------------

    @property
    def spec(self) -> dict[str, Any]:
        """The full spec, defaults filled in, JSON-serialisable (stored in the file)."""
        return {"family": self.family, **{key: getattr(self, key) for key in self.params}}

    def compress(self, x: torch.Tensor, kind: str, keep: torch.Tensor | None = None, *,
                 layer: int | None = None) -> dict[str, torch.Tensor]:
        """x [n_seq, n_kv, seq, dim] -> packed tensors (all contiguous, on x's device)."""
        self._check_input(x, kind, keep, layer)
        packed = self._pack(self._encode(x, kind, keep, layer), tuple(x.shape), kind)
        packed = {k: v.contiguous() for k, v in packed.items()}
        packed["header"] = make_header(x)
        return packed

    def decompress(self, packed: Mapping[str, torch.Tensor], kind: str) -> torch.Tensor:
        """Packed tensors -> dense tensor in the original shape and dtype."""
        self._check_kind(kind)
        shape, dtype, device = read_header(packed)
        fields = self._unpack(dict(packed), shape, kind)
        return self._decode(fields, shape, dtype, device, kind)

    def fake(self, x: torch.Tensor, kind: str, keep: torch.Tensor | None = None, *,
             layer: int | None = None) -> torch.Tensor:
        """Exactly decompress(compress(x)), without the (lossless) bit packing.

        Works on any [batch, n_kv, seq, dim] tensor, e.g. one layer's cache inside
        a cache `update()`. May return `x` itself when the method is lossless.
        """
        self._check_input(x, kind, keep, layer)
        fields = self._encode(x, kind, keep, layer)
        return self._decode(fields, tuple(x.shape), x.dtype, x.device, kind)

    def check_shape(self, shape: tuple[int, ...], layer: int | None = None) -> None:
        """Raise UsageError if this method cannot compress a tensor of `shape`.

        Call it at config time with a model's shape to fail before any job runs.
        """

    def packed_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype, kind: str = "key", *,
                      layer: int | None = None, keep: torch.Tensor | None = None) -> int:
        """Payload bytes of `compress` for this shape: the documented size formula (`keep`: the
        mask an evict method was given, counted exactly; other families ignore it)."""
        raise NotImplementedError

    def setup(self) -> None:
        """State built from the checked parameters (the checks are kvcore.compress.params')."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.spec})"

    # ---- what a family implements -----------------------------------------------

    def _encode(self, x, kind, keep, layer) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decode(self, fields, shape, dtype, device, kind) -> torch.Tensor:
        raise NotImplementedError

    def _pack(self, fields, shape, kind) -> dict[str, torch.Tensor]:
        return fields

    def _unpack(self, packed, shape, kind) -> dict[str, torch.Tensor]:
        return packed

    # ---- helpers ------------------------------------------------------------------

    def error(self, message: str) -> UsageError:
        return UsageError(f"method {self.name!r}: {message}")

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise self.error(f"kind must be 'key' or 'value' (got {kind!r})")

    def _check_input(self, x, kind, keep, layer) -> None:
        self._check_kind(kind)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in _DTYPE_CODES:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise self.error(
                f"expected a float tensor [n_seq, n_kv, seq, dim] (float32/float16/bfloat16), got {got}"
            )
        if keep is not None and not self.needs_scores:
            raise self.error(f"family {self.family} takes no keep mask")
        self.check_shape(tuple(x.shape), layer)
