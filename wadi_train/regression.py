"""Teacher ODE pairs for the optional regression term (DMD, Yin et al. 2024, §3.3).

At start-up the teacher maps a fixed set of noises z_i (each with a drawn condition c_i) to
x0_i by multi-step DDIM with CFG. During training the student's one-step output G(z_i, c_i)
is pulled towards x0_i by a mean-squared error, next to the VSD loss. Pure VSD (weight 0)
leaves this module unused. The pairs are made from their own seeded generator, so every
process and every resume rebuilds the same set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from wadi_train.data import ConditionSampler
from wadi_train.models import Cond
from wadi_train.sampling import Predict, ddim_sample_fn

__all__ = ["ODEPairs", "make_ode_pairs", "regression_loss"]

log = logging.getLogger(__name__)
_PAIR_SEED_OFFSET = 7_919  # keeps the pair generator apart from the training generator


@dataclass(frozen=True)
class ODEPairs:
    """(noise, condition, teacher output) triples; rows of all three line up."""

    noise: Tensor  # (N, C, H, W)
    cond: Cond  # N rows
    target: Tensor  # (N, C, H, W), the teacher's DDIM x0 from `noise`

    def __len__(self) -> int:
        return self.noise.shape[0]

    def batch(self, index: Tensor) -> tuple[Tensor, Cond, Tensor]:
        """The rows `index` (B,) of noise, condition and target."""
        return self.noise[index], self.cond.index(index), self.target[index]


def make_ode_pairs(
    predict: Predict,
    sampler: ConditionSampler,
    n: int,
    shape: tuple[int, int, int],
    scheduler_config: dict,
    steps: int,
    guidance: float,
    seed: int,
    device: torch.device | str = "cpu",
    chunk: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> ODEPairs:
    """Draw `n` noises and conditions and run the teacher's `steps`-step DDIM on them.

    Args:
        predict: The teacher's denoiser, ``predict(x_t, t, cond)``.
        sampler: Draws conditions (and gives the unconditional one for CFG).
        n: Number of pairs.
        shape: (C, H, W) of one sample (latent or pixel).
        scheduler_config: The teacher's scheduler config (see ``sampling.ddim_sample_fn``).
        steps: DDIM steps of the teacher.
        guidance: CFG scale of the teacher.
        seed: Seed of the pairs' own generator.
        device: Where the teacher runs; the pairs are kept there.
        chunk: Samples per teacher call.
        progress: Called as ``progress(done, n)`` after each chunk.
    """
    gen = torch.Generator().manual_seed(seed + _PAIR_SEED_OFFSET)
    noises, conds, targets = [], [], []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        cond = sampler.sample(b, gen).to(device)
        z = torch.randn((b, *shape), generator=gen).to(device)
        x0 = ddim_sample_fn(predict, z, cond, sampler.uncond(b).to(device), scheduler_config, steps, guidance)
        noises.append(z)
        conds.append(cond)
        targets.append(x0.float())
        if progress:
            progress(start + b, n)
    cond_all = conds[0]
    for c in conds[1:]:
        cond_all = cond_all.cat(c)
    log.info("regression pairs: %d teacher samples at %d DDIM steps, CFG %g", n, steps, guidance)
    return ODEPairs(torch.cat(noises), cond_all, torch.cat(targets))


def regression_loss(x0_hat: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Mean-squared error between the student's one-step output and the teacher's ODE output."""
    if x0_hat.shape != target.shape:
        raise ValueError(f"x0_hat {tuple(x0_hat.shape)} and target {tuple(target.shape)} differ in shape")
    loss = F.mse_loss(x0_hat.float(), target.detach().float())
    return loss, {"loss": float(loss.detach())}
