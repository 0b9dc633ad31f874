"""Exponential moving average (EMA) of named adapter parameters (DESIGN §5).

`EMA` keeps float32 shadow copies of a dict of named tensors (the trainable adapter
parameters; the frozen backbone is never copied) and updates them with
`shadow = d * shadow + (1 - d) * param`. With warm-up the decay of the (n+1)-th update is
`d = min(decay, (1 + n) / (10 + n))`, as in timm and diffusers' `EMAModel`, so early averages
are not dominated by the random initialisation. It works on a plain dict of tensors and never
imports model code; `swap_into` evaluates or exports with the EMA weights and puts the live
weights back bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from wadi_train.errors import WadiError

__all__ = ["EMA", "EMAStateError"]


class EMAStateError(WadiError):
    """Parameters or a saved EMA state do not match the tensors the EMA was built over."""


class EMA:
    """Float32 shadow copies of named parameters, averaged after each optimizer step.

    Args:
        params: name -> tensor (typically the adapter parameters, `requires_grad=True`). The
            shadow copies live on each tensor's device, in float32 whatever the tensor's dtype.
        decay: the EMA decay in [0, 1]; 0.999 averages over roughly the last 1000 updates.
        warmup: use `min(decay, (1 + n) / (10 + n))` for the (n+1)-th update.

    Example::

        adapters = {k: p for k, p in model.named_parameters() if p.requires_grad}
        ema = EMA(adapters, decay=0.999)
        ...  # each step: optimizer.step(); ema.update(adapters)
        with ema.swap_into(adapters):
            evaluate(model)
    """

    def __init__(
        self, params: Mapping[str, Tensor], decay: float = 0.999, warmup: bool = True
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        for name, p in params.items():
            if not p.is_floating_point():
                raise EMAStateError(
                    f"EMA parameter {name!r} has dtype {p.dtype}; only floating-point tensors can be averaged"
                )
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                k: p.detach().to(torch.float32, copy=True) for k, p in params.items()
            }

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params: Mapping[str, Tensor]) -> None:
        """Fold the current parameter values into the average: `s = d*s + (1-d)*p`."""
        self._check_names(params, "update")
        weight = 1.0 - self.current_decay()
        for name, s in self.shadow.items():
            # lerp in float32: s + (1-d) * (p - s), one fused op per tensor
            s.lerp_(params[name].detach().to(device=s.device, dtype=torch.float32), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params: Mapping[str, Tensor]) -> None:
        """Overwrite the live parameters with the EMA weights (cast to their dtype)."""
        self._check_names(params, "copy_to")
        for name, s in self.shadow.items():
            params[name].copy_(s)

    @contextmanager
    def swap_into(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        """Temporarily put the EMA weights into the live parameters; restore them exactly after.

        The live values are backed up (one extra copy of the adapters) and copied back on exit,
        also when the body raises, so training continues from the same bits.
        """
        self._check_names(params, "swap_into")
        with torch.no_grad():
            backup = {k: p.detach().clone() for k, p in params.items()}
        try:
            self.copy_to(params)
            yield
        finally:
            with torch.no_grad():
                for name, b in backup.items():
                    params[name].copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """`{"shadow": name -> float32 tensor, "num_updates": int}`; the tensors are shared."""
        return {"shadow": dict(self.shadow), "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a `state_dict()` (e.g. shadow tensors read back from a checkpoint).

        Raises:
            EMAStateError: names or shapes differ from the parameters this EMA was built over.
        """
        shadow = state["shadow"]
        self._check_names(shadow, "load_state_dict")
        bad = [
            f"{k} {tuple(shadow[k].shape)} vs {tuple(s.shape)}"
            for k, s in self.shadow.items()
            if shadow[k].shape != s.shape
        ]
        if bad:
            raise EMAStateError(
                f"saved EMA shapes differ from the parameters: {bad[:5]}; resume with the adapter configuration the run was saved with"
            )
        for k, s in self.shadow.items():
            s.copy_(shadow[k])
        self.num_updates = int(state["num_updates"])

    def _check_names(self, params: Mapping[str, Any], where: str) -> None:
        if params.keys() == self.shadow.keys():
            return
        missing = sorted(self.shadow.keys() - params.keys())
        unexpected = sorted(params.keys() - self.shadow.keys())
        raise EMAStateError(
            f"EMA.{where}: names differ from those the EMA was built over (missing {missing[:5]}, unexpected {unexpected[:5]}); pass the same named parameters every time"
        )
