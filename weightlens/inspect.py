"""Describe one checkpoint without reading its tensors: keys, shapes, dtypes, params by block."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from weightlens.align import AlignOptions, canonical_names
from weightlens.blocks import block_of, depth_key
from weightlens.io import TensorInfo, open_checkpoint

__all__ = ["BlockParams", "Inspection", "inspect_checkpoint"]


@dataclass(frozen=True)
class BlockParams:
    block: str
    tensors: int
    params: int


@dataclass(frozen=True)
class Inspection:
    path: str
    format: str
    tensors: int
    params: int
    dtypes: dict[str, int]
    blocks: tuple[BlockParams, ...]
    keys: tuple[tuple[str, str, TensorInfo], ...]  # (canonical name, stored key, info)
    notes: tuple[str, ...]


def inspect_checkpoint(path: str | os.PathLike[str], component: str | None = None) -> Inspection:
    """Read only the metadata of a checkpoint and summarise it."""
    reader = open_checkpoint(path, component)
    try:
        names, notes = canonical_names(reader.infos, AlignOptions(), "file")
        keys = tuple(sorted(((n, k, reader.infos[k]) for n, k in names.items()), key=lambda x: (depth_key(block_of(x[0])), x[0])))
        per_block: dict[str, list[int]] = {}
        for name, _, info in keys:
            acc = per_block.setdefault(block_of(name), [0, 0])
            acc[0] += 1
            acc[1] += info.numel
        blocks = tuple(BlockParams(b, t, p) for b, (t, p) in sorted(per_block.items(), key=lambda kv: depth_key(kv[0])))
        return Inspection(
            path=str(reader.path), format=reader.format, tensors=len(reader.infos),
            params=sum(i.numel for i in reader.infos.values()),
            dtypes=dict(Counter(i.dtype for i in reader.infos.values())),
            blocks=blocks, keys=keys, notes=tuple(notes),
        )
    finally:
        reader.close()
