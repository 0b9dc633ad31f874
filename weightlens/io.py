"""Lazy, validated checkpoint readers.

`open_checkpoint(path)` accepts a `.safetensors` file, a sharded `*.safetensors.index.json`,
a diffusers model folder (or a pipeline folder with `component=`), or a `.ckpt/.pt/.bin` pickle
(loaded with `torch.load(weights_only=True, mmap=True)`, so a pickle can never run code).
Readers hand out one tensor at a time; nothing holds a whole state dict except the mmap'd
pickle, whose pages the kernel can drop.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import pickle
import struct
import sys
import warnings
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import Tensor

from weightlens.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "TensorInfo",
    "CheckpointReader",
    "SafetensorsReader",
    "ShardedReader",
    "PickleReader",
    "open_checkpoint",
    "read_safetensors_header",
]

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1), "U16": ("uint16", 2), "U32": ("uint32", 4),
    "U64": ("uint64", 8),
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin",
)
PIPELINE_COMPONENTS = ("unet", "transformer", "prior", "decoder")


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, known without reading it."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class CheckpointReader(Protocol):
    """What every reader offers: metadata up front, tensors one at a time."""

    path: Path
    format: str
    infos: dict[str, TensorInfo]
    config: dict[str, Any] | None

    def get(self, key: str) -> Tensor: ...

    def close(self) -> None: ...


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without trusting any of it.

    Raises:
        CheckpointError: on every malformation, naming the file and the problem.
    """
    return _parse_safetensors(path)[0]


def _parse_safetensors(path: Path) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    """Validated infos and each tensor's [begin, end) byte span in the file."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size}-byte file is too short to be safetensors (empty or truncated); re-download it")
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} is larger than the file ({size} bytes): truncated or not safetensors; re-download it")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte safetensors limit; the file is corrupt or hostile")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc.__class__.__name__}); not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; not a safetensors file")
    infos = _validate_entries(path, header, data_len=size - 8 - n)
    spans = {k: (8 + n + header[k]["data_offsets"][0], 8 + n + header[k]["data_offsets"][1]) for k in infos}
    return infos, spans


def _validate_entries(path: Path, header: dict[str, Any], data_len: int) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            tag, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry {key!r} is malformed (needs dtype, shape, data_offsets)") from None
        if tag not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype tag {tag!r}; this safetensors file is corrupt or from a newer format")
        name, itemsize = SAFETENSORS_DTYPES[tag]
        info = TensorInfo(shape, name)
        if not (isinstance(begin, int) and isinstance(end, int)) or begin < 0 or end > data_len or end - begin != info.numel * itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} has data offsets [{begin}, {end}] out of range or not matching its shape (data is {data_len} bytes): truncated or corrupt; re-download it")
        spans.append((begin, end, key))
        infos[key] = info
    spans.sort()
    for (_, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {key_a!r} and {key_b!r} overlap in the data section; the file is corrupt or hostile")
    return infos


@dataclass
class SafetensorsReader:
    """One `.safetensors` file, validated, read lazily.

    `get` maps just the tensor's bytes (a private, copy-on-write mmap) and wraps them in a
    tensor without copying: its pages are file-backed (page cache), not anonymous memory, and
    the mapping goes away with the tensor. So reading a layer costs no RAM of its own,
    whatever the safetensors version. Tensors whose bytes are not aligned to their item size
    (possible after odd-sized int8/bool tensors), or on a big-endian host, come from
    `safe_open` instead.
    """

    path: Path
    format: str = "safetensors"
    config: dict[str, Any] | None = None
    infos: dict[str, TensorInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.infos, self._spans = _parse_safetensors(self.path)
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{self.path}: safetensors refused the file ({exc}); re-download it") from None
        self._fd = os.open(self.path, os.O_RDONLY)
        self._close_fd = weakref.finalize(self, os.close, self._fd)  # also when never closed

    def get(self, key: str) -> Tensor:
        try:
            mapped = self._mapped(key)
            return mapped if mapped is not None else self._handle.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.path}: could not read tensor {key!r} ({exc})") from None

    def _mapped(self, key: str) -> Tensor | None:
        """The tensor as a zero-copy view of a mapping of its bytes, or None where that is not possible."""
        info, (begin, end) = self.infos[key], self._spans[key]
        dtype = getattr(torch, info.dtype, None)
        if not self._close_fd.alive or dtype is None or sys.byteorder != "little" or end == begin:
            return None
        if begin % dtype.itemsize:
            return None
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            region = mmap.mmap(self._fd, end - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: could not map tensor {key!r} ({exc}); the file may have changed since it was opened") from None
        # frombuffer keeps `region` alive as long as the tensor (or a view of it) lives.
        return torch.frombuffer(region, dtype=dtype, count=info.numel, offset=begin - start).view(info.shape)

    def close(self) -> None:
        self._handle = None
        self._close_fd()  # tensors already handed out keep their own mappings


@dataclass
class ShardedReader:
    """A `*.safetensors.index.json` and the shards its weight_map names."""

    path: Path
    format: str = "safetensors-sharded"
    config: dict[str, Any] | None = None
    infos: dict[str, TensorInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            weight_map = json.loads(self.path.read_text())["weight_map"]
            shard_names = set(weight_map.values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{self.path}: not a sharded-checkpoint index (expected JSON with a 'weight_map' object)") from None
        self._shards: dict[str, SafetensorsReader] = {}
        for name in sorted(shard_names):
            shard = self.path.parent / name
            if not shard.is_file():
                raise CheckpointError(f"{self.path}: index points to missing shard {name!r}; download every shard into {self.path.parent}")
            self._shards[name] = SafetensorsReader(shard)
        self._where: dict[str, str] = {}
        for key, name in weight_map.items():
            if key not in self._shards[name].infos:
                raise CheckpointError(f"{self.path}: index maps {key!r} to shard {name!r}, which does not hold it")
            self._where[key] = name
            self.infos[key] = self._shards[name].infos[key]

    def get(self, key: str) -> Tensor:
        return self._shards[self._where[key]].get(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


@dataclass
class PickleReader:
    """A torch pickle (`.ckpt/.pt/.bin`), loaded with weights_only=True and mmap when possible."""

    path: Path
    format: str = "torch-pickle"
    config: dict[str, Any] | None = None
    infos: dict[str, TensorInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        obj = self._load()
        state = _find_state_dict(obj)
        if state is None:
            raise CheckpointError(f"{self.path}: the pickle holds no tensors (found {type(obj).__name__}); pass a model checkpoint")
        self._state = state
        self.infos = {k: TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}

    def _load(self) -> Any:
        if self.path.stat().st_size == 0:
            raise CheckpointError(f"{self.path}: empty file; re-download it")
        use_mmap = zipfile.is_zipfile(self.path)  # mmap needs the zip format (torch >= 1.6)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=use_mmap)
        except pickle.UnpicklingError as exc:
            detail = _unpickler_detail(str(exc))
            if "global" in detail.lower():
                raise UnsafeCheckpointError(f"{self.path}: refused: the pickle wants to call code beyond tensors ({detail}); nothing was executed. Only load files you trust, or convert them to safetensors with a trusted tool") from None
            raise CheckpointError(f"{self.path}: not a readable torch checkpoint: the safe loader refused it ({detail}); nothing was executed") from None
        except Exception as exc:  # torch.load raises anything on garbage: IndexError, RuntimeError...
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
            raise CheckpointError(f"{self.path}: not a readable torch checkpoint ({msg})") from None

    def get(self, key: str) -> Tensor:
        return self._state[key]

    def close(self) -> None:
        self._state = {}


def _unpickler_detail(text: str) -> str:
    """The informative line of torch's weights_only error, without its boilerplate."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "global" in ln.split(":")[0]:
            return ln[:160]
    _, _, tail = text.partition("WeightsUnpickler error:")
    tail_lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return tail_lines[0][:160] if tail_lines else "unpickling failed"


def _find_state_dict(obj: Any) -> dict[str, Tensor] | None:
    """The tensor dict inside a checkpoint: itself, or under state_dict/model/module keys."""
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if tensors:
            return tensors
        for wrapper in ("state_dict", "model", "module", "ema", "params"):
            found = _find_state_dict(obj.get(wrapper))
            if found:
                return found
    return None


def _open_folder(path: Path, component: str | None) -> CheckpointReader:
    if (path / "model_index.json").is_file():
        names = [component] if component else [c for c in PIPELINE_COMPONENTS if (path / c).is_dir()]
        if not names or not (path / names[0]).is_dir():
            found = sorted(p.name for p in path.iterdir() if p.is_dir())
            wanted = component or "/".join(PIPELINE_COMPONENTS)
            raise CheckpointError(f"{path}: pipeline folder has no {wanted!r} component (found {found}); pass --component NAME")
        return _open_folder(path / names[0], None)
    if component:
        return _open_folder(path / component, None) if (path / component).is_dir() else _raise_no_component(path, component)
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (path / name).is_file():
            reader = open_checkpoint(path / name)
            config_path = path / "config.json"
            if config_path.is_file():
                try:
                    reader.config = json.loads(config_path.read_text())
                except (OSError, json.JSONDecodeError):
                    log.warning("%s: config.json is not valid JSON; ignoring it", config_path)
            return reader
    candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    if len(candidates) == 1:
        return open_checkpoint(candidates[0])
    if candidates:
        raise CheckpointError(f"{path}: folder holds {len(candidates)} weight files ({', '.join(c.name for c in candidates[:4])}...); pass one file")
    raise CheckpointError(f"{path}: folder holds no weights (expected diffusion_pytorch_model.safetensors, a *.safetensors.index.json, or a pipeline's model_index.json)")


def _raise_no_component(path: Path, component: str) -> CheckpointReader:
    raise CheckpointError(f"{path}: no component folder {component!r}; check --component")


def open_checkpoint(path: str | os.PathLike[str], component: str | None = None) -> CheckpointReader:
    """Open any supported checkpoint for lazy, one-tensor-at-a-time reading.

    Args:
        path: a file or folder (see module docstring).
        component: pipeline sub-folder to read (`unet`, `transformer`, ...); auto when None.

    Raises:
        CheckpointError: missing, unreadable, malformed or unsafe input, with the fix.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder; check the path")
    if p.is_dir():
        return _open_folder(p, component)
    name = p.name.lower()
    if name.endswith(".index.json"):
        return ShardedReader(p)
    if name.endswith(".safetensors"):
        return SafetensorsReader(p)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return PickleReader(p)
    with p.open("rb") as fh:
        head = fh.read(8)
    if zipfile.is_zipfile(p) or head[:1] == b"\x80":
        return PickleReader(p)
    if len(head) == 8 and struct.unpack("<Q", head)[0] < p.stat().st_size:
        return SafetensorsReader(p)
    raise CheckpointError(f"{p}: not a checkpoint (expected .safetensors, .safetensors.index.json, .ckpt/.pt/.bin or a diffusers folder)")
