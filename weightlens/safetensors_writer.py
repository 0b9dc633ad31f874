"""Write a safetensors file one tensor at a time (bounded memory).

`safetensors.torch.save_file` needs the whole state dict in memory; this writer takes the
header up front (names, shapes, dtypes) and then each tensor's bytes in order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["StreamingSafetensorsWriter"]

TORCH_TO_TAG = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _tag in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        TORCH_TO_TAG[getattr(torch, _name)] = _tag


class StreamingSafetensorsWriter:
    """Usage: `with StreamingSafetensorsWriter(path, [(key, shape, dtype), ...]) as w: w.write(key, t)`.

    Tensors must be written in the declared order; the file appears under its name only when
    every tensor was written (it is built as a temp file and renamed).
    """

    def __init__(self, path: Path, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order: list[tuple[str, tuple[int, ...], torch.dtype]] = list(entries)
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for key, shape, dtype in self._order:
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": TORCH_TO_TAG[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._fh = self._tmp.open("wb")
        self._fh.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, key: str, tensor: Tensor) -> None:
        name, shape, dtype = self._order[self._next]
        if key != name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"expected {name} {shape} {dtype}, got {key} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(data.numpy().tobytes())
        self._next += 1

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._fh.close()
        if exc_type is None and self._next == len(self._order):
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)
            if exc_type is None:
                raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
