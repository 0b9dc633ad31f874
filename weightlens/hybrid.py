"""Per-row hybrids of two checkpoints: one model's norms with the other's directions.

The WaDi paper's Fig. 1c: a teacher's row norms with the student's row directions behaves
like the student, and the reverse like the teacher, showing that direction carries the
distillation. Streams one aligned pair at a time into a safetensors file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weightlens.align import AlignOptions, align_keys
from weightlens.errors import OptionError
from weightlens.io import open_checkpoint
from weightlens.output import prepare_output
from weightlens.safetensors_writer import StreamingSafetensorsWriter
from weightlens.stats import as_matrix

__all__ = ["HybridResult", "swap_norms", "make_hybrid"]

log = logging.getLogger(__name__)
SIDES = ("teacher", "student")


def swap_norms(norm_source: Tensor, direction_source: Tensor) -> Tensor:
    """Rows of `direction_source` rescaled to the row norms of `norm_source` (float32).

    A row whose direction is undefined (zero norm) is kept from `direction_source`.
    """
    n = as_matrix(norm_source)
    d = as_matrix(direction_source)
    dn = torch.linalg.vector_norm(d, dim=1, keepdim=True)
    nn_ = torch.linalg.vector_norm(n, dim=1, keepdim=True)
    out = torch.where(dn > 0, d / dn.clamp_min(torch.finfo(torch.float32).tiny) * nn_, d)
    return out.reshape(direction_source.shape)


@dataclass(frozen=True)
class HybridResult:
    path: Path
    layers_swapped: int
    tensors_copied: int


def make_hybrid(teacher: str | os.PathLike[str], student: str | os.PathLike[str], out: str | os.PathLike[str], norm_from: str = "teacher", direction_from: str = "student", align: AlignOptions = AlignOptions(), component: str | None = None, overwrite: bool = False) -> HybridResult:
    """Write a safetensors file whose matrices take norms from one side, directions from the other.

    1-D tensors and every other aligned tensor come from the direction source; names are the
    aligned (diffusers-style) names and dtypes those of the direction source.
    """
    if norm_from not in SIDES or direction_from not in SIDES:
        raise OptionError(f"--norm-from/--direction-from must be teacher or student, got {norm_from!r}/{direction_from!r}")
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise OptionError(f"{out_path}: exists; pass --overwrite to replace it")
    prepare_output(out_path.parent if str(out_path.parent) else Path("."), overwrite=True)
    readers = {"teacher": open_checkpoint(teacher, component), "student": open_checkpoint(student, component)}
    try:
        pairs = align_keys(readers["teacher"].infos, readers["student"].infos, align).pairs
        key_of = {"teacher": lambda p: p.teacher_key, "student": lambda p: p.student_key}
        d_reader, n_reader = readers[direction_from], readers[norm_from]
        dtypes = {p.name: _dtype(p.student_dtype if direction_from == "student" else p.teacher_dtype) for p in pairs}
        entries = [(p.name, tuple(d_reader.infos[key_of[direction_from](p)].shape), dtypes[p.name]) for p in pairs]
        swapped = copied = 0
        with StreamingSafetensorsWriter(out_path, entries, metadata={"weightlens": f"hybrid norms={norm_from} directions={direction_from}"}) as writer:
            for p in pairs:
                d = d_reader.get(key_of[direction_from](p))
                if p.kind == "vector" or norm_from == direction_from:
                    writer.write(p.name, d.contiguous())
                    copied += 1
                    continue
                n = n_reader.get(key_of[norm_from](p))
                writer.write(p.name, swap_norms(n, d).to(d.dtype).contiguous())
                swapped += 1
    finally:
        for r in readers.values():
            r.close()
    log.info("wrote %s: %d matrices swapped, %d tensors copied", out_path, swapped, copied)
    return HybridResult(out_path, swapped, copied)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
