"""Per-layer statistics of a teacher -> student weight change (DESIGN §3).

Pure functions of tensors: the caller picks device and dtype. Maths in float32, reductions
over rows and matrices accumulated in float64. Rows are output units; conv kernels are
flattened to (out, in*kh*kw) by :func:`as_matrix`.

A layer is never copied or converted whole: it is read in blocks of about
:data:`CHUNK_ELEMENTS` elements (row blocks, or column blocks for the Gram of a wide matrix),
each converted to float32 on its own, so memory above the two input tensors (which may be
file-backed mmaps) is a few blocks plus one Gram matrix of the smaller side at a time.
:func:`row_change` is one pass (row norms and direction changes: all that stats-only mode
needs); :func:`spectral_change` adds one pass for Theta (its Gram and the rotation residual)
and one for the direction residual's Gram.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from weightlens.rotation import implied_angles, implied_rotation_residual, rotate_pairs

__all__ = [
    "RowChange",
    "SpectralChange",
    "SpectrumStats",
    "MatrixStats",
    "CHUNK_ELEMENTS",
    "as_matrix",
    "row_change",
    "spectral_change",
    "rotation_explained",
    "energies",
    "gram_energies",
    "spectrum_stats",
    "random_energy_30",
    "marchenko_pastur_energy",
    "matrix_stats",
]

ENERGY_TARGET = 0.9
RANK_FRACTION = 0.3
# Elements per block of a layer (1 MiB in float32): a block's temporaries stay in the CPU
# cache, and even the largest layer costs a few MiB of scratch memory.
CHUNK_ELEMENTS = 1 << 18
# Row norms: float32 norms of row segments of about this many elements, squared and summed in
# float64. A float32 norm over a whole row drifts by ~4e-7 relative at 23k columns (1e-5 at
# 1M), the size of the norm changes distillation makes; the segmented sum keeps ~1e-8.
NORM_SEGMENT = 256


def as_matrix(weight: Tensor) -> Tensor:
    """Flatten a weight to (out, rest) float32: rows are output units."""
    return weight.reshape(weight.shape[0], -1).float()


def _matrix_view(weight: Tensor) -> Tensor:
    """(out, rest) view of a weight in its stored dtype (no conversion, no copy if contiguous)."""
    return weight.reshape(weight.shape[0], -1)


def _segment(width: int) -> int:
    """Segment length for rows of `width`: a divisor near NORM_SEGMENT (one strided view covers
    a block), else NORM_SEGMENT and a shorter last segment."""
    if width <= 2 * NORM_SEGMENT:
        return max(width, 1)
    for n in range(NORM_SEGMENT, NORM_SEGMENT // 2 - 1, -1):
        if width % n == 0:
            return n
    return NORM_SEGMENT


def _segment_norms(x: Tensor, seg: int, out: Tensor) -> Tensor:
    """float32 norms of each row's `seg`-long segments: x (rows, cols) -> out (rows, ceil(cols / seg))."""
    full = x.shape[1] - x.shape[1] % seg
    if full == x.shape[1]:
        return torch.linalg.vector_norm(x.unflatten(1, (-1, seg)), dim=2, out=out)
    torch.linalg.vector_norm(x[:, :full].unflatten(1, (-1, seg)), dim=2, out=out[:, :-1])
    torch.linalg.vector_norm(x[:, full:], dim=1, out=out[:, -1])
    return out


def _sum_sq(segments: Tensor) -> Tensor:
    """Row sums of squared segment norms, in float64: (rows, segments) -> (rows,)."""
    return segments.double().square_().sum(dim=1)


def _row_blocks(rows: int, cols: int, elements: int) -> Iterator[slice]:
    step = max(1, elements // max(cols, 1))
    for r in range(0, rows, step):
        yield slice(r, min(r + step, rows))


def _col_blocks(rows: int, cols: int, elements: int) -> Iterator[slice]:
    step = max(2, elements // max(rows, 1) // 2 * 2)  # even: a column pair never straddles blocks
    for c in range(0, cols, step):
        yield slice(c, min(c + step, cols))


class _Scratch:
    """Block buffers reused from block to block and, per thread, from layer to layer.

    Streaming a layer allocates nothing per block. That is speed (no fresh pages to fault in)
    and memory: with layers computed in several threads, per-block temporaries of ~1 MiB
    fragment the allocator's per-thread heaps, and resident memory creeps up with model size.
    A buffer above KEEP elements (a huge Gram, a million-wide row) is not kept.
    """

    KEEP = 1 << 23  # elements (32 MiB in float32)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        n = math.prod(shape)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            self._buffers.pop((name, dtype), None)  # drop the old one before allocating
            buf = torch.empty(n, dtype=dtype, device=self.device)
            if n <= self.KEEP:
                self._buffers[(name, dtype)] = buf
        return buf[:n].view(shape)

    def zeros(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return self.get(name, shape, dtype).zero_()

    def load(self, name: str, block: Tensor, dtype: torch.dtype, copy: bool = False) -> Tensor:
        """`block` as `dtype`: itself when it already is (and no copy is asked), else converted into a buffer."""
        if block.dtype == dtype and not copy:
            return block
        return self.get(name, tuple(block.shape), dtype).copy_(block)


_local = threading.local()


def _thread_scratch(device: torch.device) -> _Scratch:
    """This thread's scratch for `device` (kept while the thread lives)."""
    per_device: dict[torch.device, _Scratch] = _local.__dict__.setdefault("scratch", {})
    if device not in per_device:
        per_device[device] = _Scratch(device)
    return per_device[device]


@dataclass(frozen=True)
class RowChange:
    """Per-row change of one layer.

    Rows holding NaN/Inf are zeroed in both matrices first (and so excluded). The per-row
    fields cover the rows where both norms are non-zero (``valid``).

    Attributes:
        norm_rel: |m_S - m_T| / m_T per valid row, float64.
        dir: ||u_S - u_T|| per valid row (= 2 sin(phi/2)), float64.
        angle_deg: phi in degrees per valid row, float64.
        one_minus_cos: 1 - cos(phi) per valid row, float64.
        valid: bool mask over all rows: True where both norms are non-zero.
        nonfinite: bool mask over all rows: True where teacher or student holds NaN/Inf.
        norm_teacher: m_T of every row (0 for non-finite rows), float64.
        norm_student: m_S of every row, float64.
        delta_sq: ||W_S - W_T||_F^2 over all rows.
        teacher_sq: ||W_T||_F^2 over all rows.
        float64: some finite rows overflowed float32 squares and were redone in float64; the
            spectral pass then runs in float64 too.
    """

    norm_rel: Tensor
    dir: Tensor
    angle_deg: Tensor
    one_minus_cos: Tensor
    valid: Tensor
    nonfinite: Tensor
    norm_teacher: Tensor
    norm_student: Tensor
    delta_sq: float
    teacher_sq: float
    float64: bool

    @property
    def excluded(self) -> int:
        """Rows left out because a norm was zero (non-finite rows included)."""
        return int((~self.valid).sum())

    @property
    def nonfinite_rows(self) -> int:
        """Rows that held NaN/Inf."""
        return int(self.nonfinite.sum())


def _unit_diff_norms(tc: Tensor, sc: Tensor, seg: int, nt: Tensor, ns: Tensor, nd: Tensor, scratch: _Scratch) -> None:
    """Segment norms of a row block of W_T, W_S and of m_T (u_T - u_S), into nt, ns, nd."""
    _segment_norms(tc, seg, nt)
    _segment_norms(sc, seg, ns)
    mt, ms = torch.linalg.vector_norm(nt, dim=1), torch.linalg.vector_norm(ns, dim=1)
    # m_T / m_S in the block's dtype: its rounding adds to dir in quadrature (~1e-7), harmless.
    # 0 where m_S = 0 (inf or NaN before), so such a row's difference is W_T itself.
    ratio = torch.div(mt, ms).nan_to_num_(0.0, 0.0, 0.0).unsqueeze_(1)
    diff = torch.addcmul(tc, sc, ratio, value=-1.0, out=scratch.get("d", tuple(tc.shape), tc.dtype))  # (rows, cols)
    _segment_norms(diff, seg, nd)


def _redo_rows(wt: Tensor, ws: Tensor, rows: Tensor, seg: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float64 redo of `rows` (NaN/Inf or float32 overflow): squared norms of W_T, W_S, m_T (u_T - u_S), non-finite mask."""
    tc, sc = wt[rows].double(), ws[rows].double()
    bad = ~(torch.isfinite(tc).all(dim=1) & torch.isfinite(sc).all(dim=1))
    tc.masked_fill_(bad.unsqueeze(1), 0.0)  # rows holding NaN/Inf drop out as zero rows
    sc.masked_fill_(bad.unsqueeze(1), 0.0)
    nseg = -(-wt.shape[1] // seg)
    nt, ns, nd = (torch.empty(len(rows), nseg, dtype=torch.float64, device=wt.device) for _ in range(3))
    _unit_diff_norms(tc, sc, seg, nt, ns, nd, _Scratch(wt.device))
    return _sum_sq(nt), _sum_sq(ns), _sum_sq(nd), bad


def row_change(teacher: Tensor, student: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> RowChange:
    """Norm and direction change of every row, block by block (one pass over the data).

    ``dir`` is the norm of m_T (u_T - u_S) = W_T - W_S (m_T / m_S), computed elementwise in
    float32 and divided by m_T, not derived from the cosine: for the tiny angles distillation
    produces, 1 - cos loses all precision in float32. Norms are float64 sums of float32 norms
    of row segments (NORM_SEGMENT). Rows holding NaN/Inf, or whose float32 squares overflow,
    are redone in float64 (the former zeroed, so excluded).

    Args:
        teacher: weight with ndim >= 2, any float dtype (converted block by block).
        student: same shape.
        chunk_elements: elements per block (at least one row).
    """
    return _row_change(teacher, student, chunk_elements, _Scratch(teacher.device))


def _row_change(teacher: Tensor, student: Tensor, chunk_elements: int, scratch: _Scratch) -> RowChange:
    wt, ws = _matrix_view(teacher), _matrix_view(student)
    out, width = wt.shape
    seg = _segment(width)
    # Segment norms of W_T, W_S and m_T (u_T - u_S): (out, segments) float32, ~1/256 of the layer.
    nt, ns, nd = (scratch.get(name, (out, -(-width // seg)), torch.float32) for name in ("nt", "ns", "nd"))
    for rows in _row_blocks(out, width, chunk_elements):
        tc = scratch.load("t", wt[rows], torch.float32)
        sc = scratch.load("s", ws[rows], torch.float32)
        _unit_diff_norms(tc, sc, seg, nt[rows], ns[rows], nd[rows], scratch)
    mt2, ms2, diff2 = _sum_sq(nt), _sum_sq(ns), _sum_sq(nd)
    bad = torch.zeros(out, dtype=torch.bool, device=wt.device)
    redo = (~(mt2.isfinite() & ms2.isfinite() & diff2.isfinite())).nonzero().squeeze(1)
    if len(redo):
        mt2[redo], ms2[redo], diff2[redo], bad[redo] = _redo_rows(wt, ws, redo, seg)
    ok = (mt2 > 0) & (ms2 > 0)
    dir2 = torch.where(ok, diff2 / torch.where(ok, mt2, 1.0), 0.0)  # ||u_S - u_T||^2
    mt, ms = mt2.sqrt(), ms2.sqrt()
    valid = (mt > 0) & (ms > 0)
    # ||w_S - w_T||^2 = (m_S - m_T)^2 + m_S m_T ||u_S - u_T||^2 (exact; a row with a zero norm
    # has only the first term), so the change needs no pass of its own.
    delta_sq = float(((ms - mt).square() + ms * mt * dir2).sum())
    direction = dir2[valid].sqrt()
    angle = 2.0 * torch.arcsin(torch.clamp(direction / 2.0, max=1.0))
    return RowChange(
        norm_rel=((ms - mt).abs() / mt)[valid],
        dir=direction,
        angle_deg=torch.rad2deg(angle),
        one_minus_cos=dir2[valid] / 2.0,
        valid=valid,
        nonfinite=bad,
        norm_teacher=mt,
        norm_student=ms,
        delta_sq=delta_sq,
        teacher_sq=float(mt2.sum()),
        float64=bool((~bad[redo]).any()),
    )


@dataclass(frozen=True)
class SpectralChange:
    """Gram matrices of Theta and of the direction residual, and the rotation residual.

    Each Gram is of its matrix's smaller side: M^T M accumulated over row blocks for a tall
    matrix (rows > columns), M M^T over column blocks otherwise, so neither Theta nor the
    residual is ever held whole. Each is one pass over the layer.

    Attributes:
        theta_gram: Gram of Theta (out, in // 2), or None without column pairs.
        resid_gram: Gram of D = U_S - U_T (out, in), row-normalised, zero rows left at zero.
        rotation_residual: ||W_S - R_Theta(W_T)||_F^2 (NaN without column pairs).
        theta_by_rows: theta_gram is Theta^T Theta (else Theta Theta^T).
        resid_by_rows: resid_gram is D^T D (else D D^T).
    """

    theta_gram: Tensor | None
    resid_gram: Tensor
    rotation_residual: float
    theta_by_rows: bool
    resid_by_rows: bool


def spectral_change(teacher: Tensor, student: Tensor, rows: RowChange, chunk_elements: int = CHUNK_ELEMENTS) -> SpectralChange:
    """Theta, the direction residual and the rotation residual, accumulated block by block.

    Args:
        teacher: weight with ndim >= 2 (any float dtype).
        student: same shape.
        rows: :func:`row_change` of the same pair (row norms, non-finite rows).
        chunk_elements: elements per block.
    """
    scratch = _Scratch(teacher.device)
    theta, residual, theta_by_rows = _theta_pass(teacher, student, rows, chunk_elements, scratch, "theta_gram")
    resid, resid_by_rows = _resid_pass(teacher, student, rows, chunk_elements, scratch, "resid_gram")
    return SpectralChange(theta, resid, residual, theta_by_rows, resid_by_rows)


def _blocks(wt: Tensor, ws: Tensor, rows: RowChange, by_rows: bool, chunk_elements: int, scratch: _Scratch) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """(row slice, teacher block, student block) over row or column blocks, in the working dtype.

    Rows holding NaN/Inf come zeroed (as in row_change); otherwise float32 blocks are views.
    """
    out, width = wt.shape
    dtype = torch.float64 if rows.float64 else torch.float32
    bad = rows.nonfinite if rows.nonfinite_rows else None
    for blk in _row_blocks(out, width, chunk_elements) if by_rows else _col_blocks(out, width, chunk_elements):
        r, c = (blk, slice(None)) if by_rows else (slice(None), blk)
        tc = scratch.load("t", wt[r, c], dtype, copy=bad is not None)
        sc = scratch.load("s", ws[r, c], dtype, copy=bad is not None)
        if bad is not None:
            tc.masked_fill_(bad[r].unsqueeze(1), 0.0)
            sc.masked_fill_(bad[r].unsqueeze(1), 0.0)
        yield r, tc, sc


def _theta_pass(teacher: Tensor, student: Tensor, rows: RowChange, chunk_elements: int, scratch: _Scratch, name: str) -> tuple[Tensor | None, float, bool]:
    """Gram of Theta (in `scratch` under `name`), the rotation residual, and whether the Gram is Theta^T Theta."""
    wt, ws = _matrix_view(teacher), _matrix_view(student)
    out, width = wt.shape
    pairs = width // 2
    by_rows = out > pairs
    if not pairs:
        return None, math.nan, by_rows
    dtype = torch.float64 if rows.float64 else torch.float32
    side = pairs if by_rows else out
    gram = scratch.zeros(name, (side, side), dtype)
    residual = torch.zeros((), dtype=torch.float64, device=wt.device)
    for _, tc, sc in _blocks(wt, ws, rows, by_rows, chunk_elements, scratch):
        half = (tc.shape[0], tc.shape[1] // 2)
        work = scratch.get("pair_a", half, dtype), scratch.get("pair_b", half, dtype)
        if half[1]:
            _gram_add(gram, implied_angles(tc, sc, out=work[0], work=work[1]), by_rows)
        residual += implied_rotation_residual(tc, sc, work=work)
    return gram, float(residual), by_rows


def _resid_pass(teacher: Tensor, student: Tensor, rows: RowChange, chunk_elements: int, scratch: _Scratch, name: str) -> tuple[Tensor, bool]:
    """Gram of D = U_S - U_T (in `scratch` under `name`) and whether it is D^T D."""
    wt, ws = _matrix_view(teacher), _matrix_view(student)
    out, width = wt.shape
    by_rows = out > width
    dtype = torch.float64 if rows.float64 else torch.float32
    valid = rows.valid
    # D = -(W_T - W_S m_T / m_S) / m_T per row: as in row_change, exactly 0 for an unchanged
    # row (the ratio is then exactly 1); 0 for rows with a zero norm.
    neg_inv_t = torch.where(valid, -1.0 / torch.where(valid, rows.norm_teacher, 1.0), 0.0).to(dtype).unsqueeze(1)
    ratio = torch.where(valid, rows.norm_teacher / torch.where(valid, rows.norm_student, 1.0), 0.0).to(dtype).unsqueeze(1)
    side = width if by_rows else out
    gram = scratch.zeros(name, (side, side), dtype)
    for r, tc, sc in _blocks(wt, ws, rows, by_rows, chunk_elements, scratch):
        d = torch.addcmul(tc, sc, ratio[r], value=-1.0, out=scratch.get("d", tuple(tc.shape), dtype)).mul_(neg_inv_t[r])  # (rows, cols) of D
        _gram_add(gram, d, by_rows)
    return gram, by_rows


def _gram_add(gram: Tensor, block: Tensor, by_rows: bool) -> None:
    """gram += block^T block (a row block) or block block^T (a column block)."""
    if by_rows:
        gram.addmm_(block.T, block)
    else:
        gram.addmm_(block, block.T)


def rotation_explained(teacher: Tensor, student: Tensor, theta: Tensor) -> float:
    """Share of ||W_S - W_T||_F^2 that rotating teacher pairs by ``theta`` explains.

    The reference definition for any ``theta`` (it holds rotated copies of the layer);
    :func:`matrix_stats` uses the closed form for the implied angles instead.
    Returns NaN for an unchanged layer (the share is undefined).
    """
    wt, ws = as_matrix(teacher), as_matrix(student)
    change = torch.linalg.vector_norm(ws - wt, dtype=torch.float64).square()
    if change == 0:
        return math.nan
    resid = torch.linalg.vector_norm(ws - rotate_pairs(wt, theta), dtype=torch.float64).square()
    return float(1.0 - resid / change)


def gram_energies(gram: Tensor, keep: int) -> Tensor:
    """The top ``keep`` eigenvalues of a Gram matrix (squared singular values), descending, float64."""
    values = torch.linalg.eigvalsh(gram).double().clamp_min(0.0)
    return torch.flip(values, dims=(0,))[:keep]


def energies(matrix: Tensor) -> Tensor:
    """Squared singular values of ``matrix``, descending, float64 (on the input's device).

    A float32 Gram-matrix eigensolve on the smaller side: energy shares (the only figures
    reported) are exact to ~1e-6, see tests/weightlens/test_stats.py.
    """
    m = matrix.float()
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return gram_energies(gram, min(m.shape))


@dataclass(frozen=True)
class SpectrumStats:
    """Energy figures of one spectrum."""

    rank_90: int
    energy_30: float


def spectrum_stats(energy: Tensor | np.ndarray, shape: tuple[int, int]) -> SpectrumStats:
    """rank at 90 % energy and energy share of the top ceil(0.3*min(shape)) values."""
    e = torch.as_tensor(energy, dtype=torch.float64).cpu()
    total = float(e.sum())
    if total <= 0:
        return SpectrumStats(rank_90=0, energy_30=math.nan)
    cum = torch.cumsum(e, 0) / total
    # 1e-12 slack: a spectrum whose first k values hold exactly 90 % must read rank k.
    rank_90 = int(torch.searchsorted(cum, torch.tensor(ENERGY_TARGET - 1e-12, dtype=torch.float64)))
    k = min(math.ceil(RANK_FRACTION * min(shape)), len(e))
    return SpectrumStats(rank_90=min(rank_90 + 1, len(e)), energy_30=float(cum[k - 1]))


EXACT_BASELINE_MAX = 256  # up to this min(shape) the baseline is a sampled matrix


@lru_cache(maxsize=512)
def random_energy_30(rows: int, cols: int) -> float:
    """energy_30 of a Gaussian matrix of this shape: the null baseline.

    Small shapes: a seeded sample (exact for that matrix). Larger ones: the Marchenko-Pastur
    limit, which a sample matches to ~1e-3 there (tests/weightlens/test_stats.py) at no cost.
    """
    if min(rows, cols) <= EXACT_BASELINE_MAX:
        gen = torch.Generator().manual_seed(rows * 1_000_003 + cols)
        sample = torch.randn(rows, cols, generator=gen)
        return spectrum_stats(energies(sample), (rows, cols)).energy_30
    return marchenko_pastur_energy(min(rows, cols) / max(rows, cols), RANK_FRACTION)


def marchenko_pastur_energy(ratio: float, top_fraction: float, grid: int = 200_001) -> float:
    """Share of sum(eigenvalues) held by the top `top_fraction` of them under Marchenko-Pastur.

    For an m x n Gaussian matrix (m <= n, ratio = m/n) the eigenvalues of X X^T / n follow
    the MP law on [(1 - sqrt(ratio))^2, (1 + sqrt(ratio))^2] with mean 1.
    """
    lo, hi = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    lam = lo + (hi - lo) * (np.arange(grid) + 0.5) / grid  # midpoints: the square case has 1/sqrt(lam) at 0
    density = np.sqrt(np.clip((hi - lam) * (lam - lo), 0, None)) / (2 * math.pi * ratio * lam)
    cdf = np.cumsum(density)
    cdf /= cdf[-1]
    mass = np.cumsum(density * lam)
    mass /= mass[-1]
    cut = np.searchsorted(cdf, 1 - top_fraction)
    return float(1 - mass[cut])


@dataclass(frozen=True)
class MatrixStats:
    """Everything DESIGN §3 asks of one layer (before rank fitting)."""

    rows: int
    rows_excluded: int
    nonfinite_rows: int
    norm_rel_mean: float
    norm_rel_std: float
    dir_mean: float
    dir_std: float
    angle_mean_deg: float
    angle_max_deg: float
    one_minus_cos_mean: float
    rel_delta: float
    rotation_explained: float
    theta_rank_90: int
    theta_energy_30: float
    theta_energy_30_random: float
    resid_rank_90: int
    resid_energy_30: float
    resid_energy_30_random: float
    odd_column: bool
    theta_energy: np.ndarray
    resid_energy: np.ndarray


def _mean_std(x: Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(unbiased=False))


def matrix_stats(teacher: Tensor, student: Tensor, spectra: bool = True, chunk_elements: int = CHUNK_ELEMENTS) -> MatrixStats:
    """All per-layer statistics of one aligned pair.

    Args:
        teacher: weight with ndim >= 2 (any float dtype, any device; a file-backed mmap is
            fine: it is read block by block, never converted or copied whole).
        student: same shape.
        spectra: False computes the row statistics and rel_delta only (stats-only mode: one
            pass over the data, no Theta, Gram matrices or eigensolves).
        chunk_elements: elements per block (see :data:`CHUNK_ELEMENTS`).
    """
    if teacher.shape != student.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} differ in shape")
    scratch = _thread_scratch(teacher.device)
    rc = _row_change(teacher, student, chunk_elements, scratch)
    out = teacher.shape[0]
    width = teacher.numel() // out if out else 0
    pairs = width // 2
    nr_mean, nr_std = _mean_std(rc.norm_rel)
    d_mean, d_std = _mean_std(rc.dir)
    rel_delta = math.sqrt(rc.delta_sq / rc.teacher_sq) if rc.teacher_sq > 0 else math.nan
    nan_spec = SpectrumStats(0, math.nan)
    theta_spec = resid_spec = nan_spec
    theta_e = resid_e = np.zeros(0)
    rot = theta_rand = resid_rand = math.nan
    if spectra:
        # One Gram at a time, in the same buffer: its eigenvalues are taken before the next.
        theta_gram, residual, _ = _theta_pass(teacher, student, rc, chunk_elements, scratch, "gram")
        if theta_gram is not None:
            rot = 1.0 - residual / rc.delta_sq if rc.delta_sq > 0 else math.nan
            theta_e = gram_energies(theta_gram, min(out, pairs)).cpu().numpy()
            theta_spec = spectrum_stats(theta_e, (out, pairs))
            theta_rand = random_energy_30(out, pairs)
        resid_gram, _ = _resid_pass(teacher, student, rc, chunk_elements, scratch, "gram")
        resid_e = gram_energies(resid_gram, min(out, width)).cpu().numpy()
        resid_spec = spectrum_stats(resid_e, (out, width))
        resid_rand = random_energy_30(out, width)
    return MatrixStats(
        rows=out,
        rows_excluded=rc.excluded,
        nonfinite_rows=rc.nonfinite_rows,
        norm_rel_mean=nr_mean,
        norm_rel_std=nr_std,
        dir_mean=d_mean,
        dir_std=d_std,
        angle_mean_deg=_mean_std(rc.angle_deg)[0],
        angle_max_deg=float(rc.angle_deg.max()) if rc.angle_deg.numel() else math.nan,
        one_minus_cos_mean=_mean_std(rc.one_minus_cos)[0],
        rel_delta=rel_delta,
        rotation_explained=rot,
        theta_rank_90=theta_spec.rank_90,
        theta_energy_30=theta_spec.energy_30,
        theta_energy_30_random=theta_rand,
        resid_rank_90=resid_spec.rank_90,
        resid_energy_30=resid_spec.energy_30,
        resid_energy_30_random=resid_rand,
        odd_column=bool(width % 2),
        theta_energy=theta_e,
        resid_energy=resid_e,
    )
