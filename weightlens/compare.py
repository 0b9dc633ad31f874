"""Compare a teacher and a student checkpoint layer by layer (the `compare` command).

Data flows one way: open both checkpoints lazily -> align keys -> stream aligned pairs
(`workers` of them computed at once, in threads) -> per-layer statistics -> fit ranks -> a
typed :class:`~weightlens.results.Analysis`. Tensors are file-backed mmaps read block by
block, so memory is a few MiB per worker plus the largest Gram matrices, whatever the
model size.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from weightlens.align import AlignedKey, Alignment, AlignOptions, align_keys
from weightlens.blocks import block_of, depth_key
from weightlens.errors import OptionError
from weightlens.io import CheckpointReader, open_checkpoint
from weightlens.memory import heap_trimmer
from weightlens.ranks import RankOptions, fit_ranks, module_name, parse_budget
from weightlens.results import Alert, Analysis, LayerStats, LayerTable, Summary, VectorStats
from weightlens.stats import CHUNK_ELEMENTS, MatrixStats, matrix_stats

__all__ = ["CompareOptions", "compare", "ProgressCallback"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
GPU_CHUNK_ELEMENTS = 1 << 24  # a GPU wants bigger blocks (fewer kernel launches) and has the memory
MAX_AUTO_WORKERS = 4  # each worker holds its own Gram matrices: bounded even on a many-core host
QUEUED_PER_WORKER = 8  # pairs queued ahead per worker, so no worker waits behind a slow layer


@dataclass(frozen=True)
class CompareOptions:
    """Options of one comparison (the CLI's flags).

    Attributes:
        align: key alignment controls.
        energy: Theta energy target for rank fitting (None: budget only).
        budget: parameter budget text (`10%`, `5M`, `0.1`) or None.
        min_rank / max_rank / multiple_of / include_conv: rank fitting bounds.
        component: pipeline component folder (`unet`, `transformer`), auto when None.
        device: where the maths runs (`cpu`, `cuda`, `cuda:1`).
        workers: layers computed at once, in threads (0: one per CPU core, at most
            MAX_AUTO_WORKERS). Each holds a few MiB of blocks and its Gram matrices; on the CPU,
            torch's intra-op threads are shared out among them.
        stats_only: skip Theta/spectra (norm and direction statistics only).
        timestamps: put wall-clock times in provenance (off for golden tests).
        command: the command line, for provenance.
    """

    align: AlignOptions = AlignOptions()
    energy: float | None = 0.9
    budget: str | None = None
    min_rank: int = 0
    max_rank: int | None = None
    multiple_of: int = 1
    include_conv: bool = False
    component: str | None = None
    device: str = "cpu"
    workers: int = 0
    stats_only: bool = False
    timestamps: bool = True
    command: tuple[str, ...] = field(default_factory=tuple)


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OptionError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    return dev


def _results(pairs: list[AlignedKey], teacher: CheckpointReader, student: CheckpointReader, device: torch.device, options: CompareOptions) -> Iterator[tuple[AlignedKey, VectorStats | tuple[LayerStats, MatrixStats]]]:
    """Statistics of every pair, in order; `options.workers` pairs computed at once in threads.

    Readers hand out file-backed (mmap) tensors and the statistics read them block by block,
    so a pair being computed costs its scratch blocks and Gram matrices, not a copy of the
    layer. At most `workers` pairs are computed at once; up to QUEUED_PER_WORKER more per
    worker wait in the pool's queue (a queued pair holds nothing: its tensors are opened
    when a worker takes it), so a worker that finishes a small layer takes the next one
    instead of idling until a big layer ahead of it is done. Finished results wait, in
    order, to be yielded; they are small (per-layer figures and spectra).
    """
    chunk = CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    workers = options.workers if options.workers > 0 else min(os.cpu_count() or 1, MAX_AUTO_WORKERS)

    def work(pair: AlignedKey) -> VectorStats | tuple[LayerStats, MatrixStats]:
        t = teacher.get(pair.teacher_key).to(device)
        s = student.get(pair.student_key).to(device)
        if pair.kind == "vector":
            return _vector_stats(pair, t, s)
        return _layer_stats(pair, t, s, options.stats_only, chunk)

    if workers == 1:
        for pair in pairs:
            yield pair, work(pair)
        return
    with _intra_op_threads(max(1, torch.get_num_threads() // workers) if device.type == "cpu" else None), \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weightlens") as pool:
        it = iter(pairs)
        pending = deque((pair, pool.submit(work, pair)) for pair in islice(it, workers * (1 + QUEUED_PER_WORKER)))
        try:
            while pending:
                pair, fut = pending.popleft()
                result = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(work, nxt)))
                yield pair, result
        finally:
            for _, fut in pending:
                fut.cancel()


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block (None: unchanged).

    Several layers computed at once, each single-threaded, beat one layer on all cores: a
    block of a layer is ~1 MiB of work, too small to split across cores without the threads
    waiting on each other (badly so on a busy machine).
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _vector_stats(pair: AlignedKey, t: Tensor, s: Tensor) -> VectorStats:
    a, b = t.double().flatten(), s.double().flatten()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    diff = torch.linalg.vector_norm(b - a)
    return VectorStats(
        name=pair.name,
        shape="x".join(map(str, pair.shape)) or "scalar",
        numel=a.numel(),
        rel_delta=float(diff / na) if na > 0 else math.nan,
        max_abs_diff=float((b - a).abs().max()) if a.numel() else 0.0,
        cosine=float(a @ b / (na * nb)) if na > 0 and nb > 0 else math.nan,
    )


def _layer_stats(pair: AlignedKey, t: Tensor, s: Tensor, stats_only: bool, chunk_elements: int) -> tuple[LayerStats, MatrixStats]:
    m = matrix_stats(t, s, spectra=not stats_only, chunk_elements=chunk_elements)
    block = block_of(pair.name)
    params = t.numel()
    row = LayerStats(
        name=pair.name, kind=pair.kind, shape="x".join(map(str, pair.shape)), params=params,
        rows=m.rows, norm_rel_mean=m.norm_rel_mean, norm_rel_std=m.norm_rel_std,
        dir_mean=m.dir_mean, dir_std=m.dir_std, angle_mean_deg=m.angle_mean_deg,
        angle_max_deg=m.angle_max_deg, one_minus_cos_mean=m.one_minus_cos_mean,
        rel_delta=m.rel_delta, rotation_explained=m.rotation_explained,
        theta_rank_90=m.theta_rank_90, theta_energy_30=m.theta_energy_30,
        resid_rank_90=m.resid_rank_90, resid_energy_30=m.resid_energy_30, lorad_rank=0,
        block=block, depth=0, rows_excluded=m.rows_excluded, nonfinite_rows=m.nonfinite_rows,
        theta_energy_30_random=m.theta_energy_30_random,
        resid_energy_30_random=m.resid_energy_30_random, odd_column=m.odd_column,
        teacher_dtype=pair.teacher_dtype, student_dtype=pair.student_dtype,
    )
    return row, m


def _file_info(reader: CheckpointReader) -> dict[str, Any]:
    p = reader.path
    dtypes: dict[str, int] = {}
    for info in reader.infos.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    return {"path": str(p), "format": reader.format, "bytes": p.stat().st_size, "tensors": len(reader.infos), "dtypes": dict(sorted(dtypes.items()))}


def _provenance(teacher: CheckpointReader, student: CheckpointReader, options: CompareOptions, seconds: float) -> dict[str, Any]:
    import numpy

    from weightlens import __version__

    prov: dict[str, Any] = {
        "tool": "weightlens",
        "version": __version__,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": _package_version("diffusers"), "numpy": numpy.__version__},
        "teacher": _file_info(teacher),
        "student": _file_info(student),
        "command": list(options.command) or None,
        "device": options.device,
        "stats_only": options.stats_only,
    }
    if options.timestamps:
        prov["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        prov["seconds"] = round(seconds, 2)
    return prov


def _package_version(name: str) -> str | None:
    """An installed package's version from its metadata: `import diffusers` would cost seconds."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _alignment_alerts(al: Alignment) -> list[Alert]:
    alerts = [Alert("info", "alignment", n) for n in al.notes]

    def few(names: tuple[str, ...]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    if al.only_in_teacher:
        alerts.append(Alert("warning", "only_in_teacher", f"{len(al.only_in_teacher)} tensors only in the teacher: {few(al.only_in_teacher)}"))
    if al.only_in_student:
        alerts.append(Alert("warning", "only_in_student", f"{len(al.only_in_student)} tensors only in the student: {few(al.only_in_student)}"))
    if al.shape_mismatch:
        desc = tuple(f"{n} {list(a)} vs {list(b)}" for n, a, b in al.shape_mismatch)
        alerts.append(Alert("warning", "shape_mismatch", f"{len(desc)} tensors differ in shape and were skipped: {few(desc)}"))
    if al.dtype_diff:
        kinds = sorted({f"{a}->{b}" for _, a, b in al.dtype_diff})
        alerts.append(Alert("info", "dtype_diff", f"{len(al.dtype_diff)} tensors differ in dtype ({', '.join(kinds)}); all maths is float32"))
    return alerts


def _layer_alerts(rows: list[LayerStats]) -> list[Alert]:
    alerts = []
    nonfinite = [r for r in rows if r.nonfinite_rows]
    if nonfinite:
        alerts.append(Alert("warning", "nonfinite", f"{len(nonfinite)} layers hold NaN/Inf ({', '.join(r.name for r in nonfinite[:5])}); those rows are excluded from every statistic"))
    zero = [r for r in rows if r.rows_excluded - r.nonfinite_rows > 0]
    if zero:
        alerts.append(Alert("info", "zero_rows", f"{sum(r.rows_excluded - r.nonfinite_rows for r in zero)} all-zero rows in {len(zero)} layers were excluded from row statistics"))
    odd = [r for r in rows if r.odd_column and r.kind == "linear"]
    if odd:
        alerts.append(Alert("info", "odd_width", f"{len(odd)} Linear layers have an odd input width ({', '.join(r.name for r in odd[:5])}); their last column is left out of Theta and LoRaD cannot target them"))
    if rows and all(r.rel_delta == 0 for r in rows):
        alerts.append(Alert("warning", "identical", "every aligned layer is identical in teacher and student: is the student really a different checkpoint?"))
    return alerts


def compare(teacher: str | os.PathLike[str], student: str | os.PathLike[str], options: CompareOptions = CompareOptions(), progress: ProgressCallback | None = None) -> Analysis:
    """Analyse what turned ``teacher`` into ``student``.

    Args:
        teacher: checkpoint path (file, index, diffusers model or pipeline folder).
        student: same for the student.
        options: alignment, rank fitting, device and mode.
        progress: called as progress(done, total, layer_name) after each tensor.

    Returns:
        The typed analysis, ranks fitted.

    Raises:
        WeightlensError: unreadable input, nothing aligned, bad options.
    """
    start = time.perf_counter()
    device = _device(options.device)
    if options.workers < 0:
        raise OptionError(f"--workers {options.workers}: expected 0 (one per CPU core) or a positive count")
    t_reader = open_checkpoint(teacher, options.component)
    s_reader = open_checkpoint(student, options.component)
    try:
        alignment = align_keys(t_reader.infos, s_reader.infos, options.align)
        rows, vectors, theta_spec, resid_spec = _analyse(alignment, t_reader, s_reader, device, options, progress)
    finally:
        t_reader.close()
        s_reader.close()
    alerts = _alignment_alerts(alignment) + _layer_alerts(rows)
    backbone = alignment.teacher_params
    rank_opts = RankOptions(
        energy=options.energy, budget=parse_budget(options.budget, backbone), min_rank=options.min_rank,
        max_rank=options.max_rank, multiple_of=options.multiple_of, include_conv=options.include_conv,
    )
    ranks = fit_ranks(rows, theta_spec, rank_opts, backbone) if not options.stats_only else None
    if ranks is not None:
        rows = [replace(r, lorad_rank=ranks.rank_pattern.get(module_name(r.name), 0)) for r in rows]
    for a in alerts:
        (log.warning if a.level == "warning" else log.info)("%s", a.message)
    return Analysis(
        layers=LayerTable(rows), vectors=tuple(vectors), summary=Summary.pool(rows),
        only_in_teacher=alignment.only_in_teacher, only_in_student=alignment.only_in_student,
        shape_mismatch=alignment.shape_mismatch, alerts=tuple(alerts),
        provenance=_provenance(t_reader, s_reader, options, time.perf_counter() - start),
        theta_spectra=theta_spec, resid_spectra=resid_spec, ranks=ranks, backbone_params=backbone,
    )


def _analyse(alignment: Alignment, t_reader: CheckpointReader, s_reader: CheckpointReader, device: torch.device, options: CompareOptions, progress: ProgressCallback | None) -> tuple[list[LayerStats], list[VectorStats], dict[str, Any], dict[str, Any]]:
    pairs = list(alignment.pairs)
    order = {b: i for i, b in enumerate(sorted({block_of(p.name) for p in pairs}, key=depth_key))}
    rows: list[LayerStats] = []
    vectors: list[VectorStats] = []
    theta_spec: dict[str, Any] = {}
    resid_spec: dict[str, Any] = {}
    trim_heap = heap_trimmer()
    for done, (pair, result) in enumerate(_results(pairs, t_reader, s_reader, device, options), 1):
        if isinstance(result, VectorStats):
            vectors.append(result)
        else:
            row, m = result
            rows.append(replace(row, depth=order[row.block]))
            if not options.stats_only:
                theta_spec[pair.name] = m.theta_energy
                resid_spec[pair.name] = m.resid_energy
            trim_heap()
        if progress is not None:
            progress(done, len(pairs), pair.name)
    rows.sort(key=lambda r: (r.depth, r.name))
    return rows, vectors, theta_spec, resid_spec
