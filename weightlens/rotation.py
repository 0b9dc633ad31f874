"""Pairwise rotation of weight columns: the LoRaD map (DESIGN §3 and §5).

Columns (2j, 2j+1) of every row are rotated by the angle Theta[i, j]. weightlens uses it to
measure how much of a change a rotation explains; wadi_train's LoRaD adapter imports it
(`wadi_train.lorad.rotate_weight`), so the maths lives in exactly one place.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rotate_pairs", "implied_angles", "implied_rotation_residual"]


def rotate_pairs(weight: Tensor, theta: Tensor) -> Tensor:
    """Rotate each adjacent column pair of ``weight`` by ``theta``.

    Args:
        weight: (out, in) matrix. An odd last column is left unchanged.
        theta: (out, in // 2) angles in radians.

    Returns:
        The rotated matrix in float32 (row norms preserved exactly up to rounding).
    """
    w = weight.float()
    out, width = w.shape
    pairs = width // 2
    if theta.shape != (out, pairs):
        raise ValueError(f"theta has shape {tuple(theta.shape)}, expected {(out, pairs)}")
    # Each pair is a complex number a0 + i a1; rotating it by Theta is one complex product with
    # exp(i Theta): fewer temporaries (and a faster backward) than cos/sin arithmetic.
    pairs_c = torch.view_as_complex(w[:, : 2 * pairs].reshape(out, pairs, 2).contiguous())
    theta = theta.float()
    rotated = torch.view_as_real(pairs_c * torch.polar(torch.ones_like(theta), theta)).reshape(out, 2 * pairs)
    if width % 2:
        rotated = torch.cat((rotated, w[:, -1:]), dim=1)
    return rotated


def implied_angles(teacher: Tensor, student: Tensor, *, out: Tensor | None = None, work: Tensor | None = None) -> Tensor:
    """Angles Theta that rotate each teacher column pair onto the student's direction.

    Theta[i, j] = atan2(a0*b1 - a1*b0, a0*b0 + a1*b1) with a, b the teacher and student pairs.

    Args:
        teacher: (out, in) matrix (a view of any float dtype; strided column blocks are fine).
        student: (out, in) matrix.
        out: optional (out, in // 2) buffer for the result.
        work: optional (out, in // 2) buffer for the one temporary (callers that stream
            blocks pass both and allocate nothing).

    Returns:
        (out, in // 2) float32 angles in (-pi, pi] (float64 for float64 inputs).
    """
    t, s = _float(teacher), _float(student)
    pairs = t.shape[1] // 2
    a0, a1 = t[:, 0 : 2 * pairs : 2], t[:, 1 : 2 * pairs : 2]
    b0, b1 = s[:, 0 : 2 * pairs : 2], s[:, 1 : 2 * pairs : 2]
    # Not addcmul for the cross product: a fused multiply-add leaves a rounding error where
    # a0*b1 - a1*b0 must cancel exactly (an unchanged pair must give Theta = 0).
    cross = torch.mul(a0, b1, out=out).sub_(torch.mul(a1, b0, out=work))
    dot = torch.mul(a0, b0, out=work).addcmul_(a1, b1)
    return cross.atan2_(dot)


def implied_rotation_residual(teacher: Tensor, student: Tensor, *, work: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """||W_S - R_Theta(W_T)||_F^2 for the implied angles Theta, in closed form, float64.

    Rotating a teacher pair a by its implied angle turns it onto the direction of the student
    pair b without changing its length, so what is left per pair is (|b| - |a|)^2 (also when
    a or b is zero, where Theta = 0). An odd last column is not rotated: (s - t)^2. No rotated
    copy of the matrix is needed.

    Args:
        teacher: (out, in) matrix.
        student: (out, in) matrix.
        work: optional two (out, in // 2) buffers for the pair lengths.

    Returns:
        A 0-d float64 tensor on the inputs' device.
    """
    t, s = _float(teacher), _float(student)
    width = t.shape[1]
    pairs = width // 2
    buf_t, buf_s = work if work is not None else (None, None)
    length_t = torch.hypot(t[:, 0 : 2 * pairs : 2], t[:, 1 : 2 * pairs : 2], out=buf_t)  # (out, pairs)
    length_s = torch.hypot(s[:, 0 : 2 * pairs : 2], s[:, 1 : 2 * pairs : 2], out=buf_s)
    # Row sums of squares in the block's dtype, summed in float64 (no float64 copy of the block).
    resid = torch.linalg.vector_norm(length_s.sub_(length_t), dim=1).double().square().sum()
    if width % 2:
        resid = resid + torch.linalg.vector_norm(s[:, -1] - t[:, -1]).double().square()
    return resid


def _float(x: Tensor) -> Tensor:
    """float32 unless already float32/float64 (float64 keeps its precision)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
