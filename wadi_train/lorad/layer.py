"""LoRaD layers: a frozen Linear/Conv2d whose weight is rotated pairwise by a low-rank angle map.

For a weight W flattened to (out, width) and adapter rank r (DESIGN §5):
theta_a (out, r) = 0, theta_b (r, width/2) ~ xavier_uniform, Theta = theta_a @ theta_b and
W' = rotate_weight(W, Theta), which turns columns (2j, 2j+1) of row i by Theta[i, j]. The
rotation is computed in float32 whatever the base dtype (autocast off), cast to the input dtype,
and used in a single F.linear / F.conv2d: the base output is never computed separately.
A layer holds any number of named adapters over one shared base layer, with one active at a time.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlens.rotation import rotate_pairs as rotate_weight

__all__ = [
    "LAYER_TYPES",
    "LoRaDConv2d",
    "LoRaDLayer",
    "LoRaDLinear",
    "check_lorad_shape",
    "flat_shape",
    "lorad_num_params",
    "rotate_weight",
]

logger = logging.getLogger(__name__)


def check_lorad_shape(
    name: str, out_features: int, width: int, r: int, allow_excess_rank: bool = False
) -> None:
    """Raise a ValueError that names the module and the fix if it cannot take a rank-r adapter.

    Args:
        name: Module path, used in the message.
        out_features: Rows of the flattened weight.
        width: Columns of the flattened weight (in, or in/groups*kh*kw for a conv).
        r: Adapter rank.
        allow_excess_rank: Accept r > min(out, width/2).
    """
    if width % 2:
        raise ValueError(
            f"LoRaD cannot adapt {name!r}: its input width {width} is odd, so its weight columns "
            "do not pair up for rotation. Leave it out of target_modules."
        )
    limit = min(out_features, width // 2)
    if r > limit and not allow_excess_rank:
        raise ValueError(
            f"LoRaD rank {r} for {name!r} exceeds min(out={out_features}, in/2={width // 2}) = "
            f"{limit}, the highest rank Theta can have. Lower it with rank_pattern "
            f"({{{name!r}: {limit}}}), or set allow_excess_rank=True to keep the over-parametrised "
            "adapter (the paper's SD1.5 rank-256 student does)."
        )


def flat_shape(weight: Tensor) -> tuple[int, int]:
    """(out, width) of a weight as LoRaD sees it: a conv kernel (out, in/groups, kh, kw) flattens
    to (out, in/groups*kh*kw). Reads only the shape, so `meta` tensors work."""
    return weight.shape[0], math.prod(weight.shape[1:])


def lorad_num_params(out_features: int, width: int, r: int) -> int:
    """Trainable parameters of one rank-r adapter: r * (out + width/2)."""
    return r * (out_features + width // 2)


class LoRaDLayer(nn.Module):
    """Base class: wraps `base_layer` (kept frozen) and holds named adapters theta_a/theta_b.

    Subclasses say how to run the base op with a given weight (`run`). State: `active_adapter`
    (name or None), `merged_adapter` (name merged into the base weight, or None) and
    `disable_adapters` (bool, toggled with `enable_adapters`).
    """

    base_layer: nn.Linear | nn.Conv2d
    _original_weight: Tensor | None

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        self.theta_a = nn.ParameterDict()
        self.theta_b = nn.ParameterDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self._disable_adapters = False
        # The unrotated weight while merged, so that unmerge restores it bit-exactly.
        self.register_buffer("_original_weight", None, persistent=False)
        # Inside `rotation_cache`: (adapter, grad mode) -> (what the rotation depends on, weight).
        self._rotations: dict[tuple[str, bool], tuple[tuple[int, ...], Tensor]] | None = None

    # -- subclass hook ----------------------------------------------------------------------
    def run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The base layer's op with `weight` in place of its own."""
        raise NotImplementedError

    # -- PEFT-style accessors ---------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (rotated in place while merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias (never adapted)."""
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        """Whether an adapter is merged into the base weight."""
        return self.merged_adapter is not None

    @property
    def has_active_adapter(self) -> bool:
        """Whether this layer holds the active adapter (else it runs as its base layer)."""
        return self.active_adapter is not None and self.active_adapter in self.theta_a

    @property
    def disable_adapters(self) -> bool:
        """Whether the layer currently runs as its plain base layer."""
        return self._disable_adapters

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(
        self, adapter_name: str, r: int, init: str = "zeros_xavier", allow_excess_rank: bool = False
    ) -> None:
        """Create adapter `adapter_name` of rank `r` (float32, on the base weight's device).

        The first adapter added becomes active; later ones wait for `set_adapter`.
        """
        if adapter_name in self.theta_a:
            raise ValueError(f"{self.module_name!r} already has a LoRaD adapter {adapter_name!r}")
        if init != "zeros_xavier":
            raise ValueError(f"unknown LoRaD init {init!r}; supported: 'zeros_xavier'")
        out, width = flat_shape(self.base_layer.weight)
        check_lorad_shape(self.module_name, out, width, r, allow_excess_rank)
        device = self.base_layer.weight.device
        theta_b = torch.empty(r, width // 2, device=device, dtype=torch.float32)
        nn.init.xavier_uniform_(theta_b)
        self.theta_a[adapter_name] = nn.Parameter(
            torch.zeros(out, r, device=device, dtype=torch.float32)
        )
        self.theta_b[adapter_name] = nn.Parameter(theta_b)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` active. A name this layer lacks leaves it running as the base."""
        if self.merged and adapter_name != self.merged_adapter:
            raise ValueError(
                f"{self.module_name!r} has adapter {self.merged_adapter!r} merged; unmerge before "
                f"switching to {adapter_name!r}"
            )
        self.active_adapter = adapter_name

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the active adapter on or off (off: the layer is its base layer)."""
        if self.merged and not enabled:
            raise ValueError(f"{self.module_name!r} is merged; unmerge before disabling adapters")
        self._disable_adapters = not enabled

    def _adapter(self, adapter_name: str | None) -> str:
        name = self.active_adapter if adapter_name is None else adapter_name
        if name is None or name not in self.theta_a:
            raise ValueError(
                f"{self.module_name!r} has no LoRaD adapter {name!r}; it has {list(self.theta_a)}"
            )
        return name

    def _unrotated_weight(self) -> Tensor:
        original = self._original_weight
        return self.base_layer.weight if original is None else original

    # -- maths ------------------------------------------------------------------------------
    def rotated_weight(self, adapter_name: str | None = None) -> Tensor:
        """W' = rotate_weight(W, theta_a @ theta_b) in float32, in the base weight's shape."""
        name = self._adapter(adapter_name)
        weight = self._unrotated_weight()
        # Autocast would run theta_a @ theta_b in fp16/bf16; the rotation maths stays in fp32.
        with torch.autocast(device_type=weight.device.type, enabled=False):
            theta = self.theta_a[name].float() @ self.theta_b[name].float()  # (out, width/2)
            rotated = rotate_weight(weight.reshape(weight.shape[0], -1), theta)  # (out, width)
        return rotated.reshape(weight.shape)

    def get_delta_weight(self, adapter_name: str | None = None) -> Tensor:
        """W' - W in float32 (W the unrotated base weight, also while merged)."""
        return self.rotated_weight(adapter_name) - self._unrotated_weight().float()

    def _forward_weight(self) -> Tensor:
        """The active adapter's rotated weight; inside `rotation_cache` computed once and reused
        while its angles and the base weight (their version counters) and the grad mode stay."""
        if self._rotations is None:
            return self.rotated_weight()
        name = self._adapter(None)
        slot = (name, torch.is_grad_enabled())  # a no-grad rotation never stands in for one with grad
        versions = (id(self.theta_a[name]), self.theta_a[name]._version, self.theta_b[name]._version, self._unrotated_weight()._version)
        cached = self._rotations.get(slot)
        if cached is None or cached[0] != versions:
            cached = self._rotations[slot] = (versions, self.rotated_weight(name))
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        if self._disable_adapters or self.merged or not self.has_active_adapter:
            return self.base_layer(x)
        weight = self._forward_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self.run(x, weight, bias)

    # -- merging ----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Write the active adapter's W' into the base weight (a no-op if already merged)."""
        if self.merged:
            logger.debug("%s: adapter %r already merged", self.module_name, self.merged_adapter)
            return
        if self._disable_adapters:
            raise ValueError(f"{self.module_name!r} has adapters disabled; enable them to merge")
        name = self._adapter(None)
        weight = self.base_layer.weight
        rotated = self.rotated_weight(name)
        self._original_weight = weight.detach().clone()
        weight.copy_(rotated.to(weight.dtype))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original base weight (a no-op if nothing is merged)."""
        original = self._original_weight
        if original is None:
            return
        self.base_layer.weight.copy_(original)
        self._original_weight = None
        self.merged_adapter = None

    def extra_repr(self) -> str:
        ranks = {n: p.shape[1] for n, p in self.theta_a.items()}
        return f"ranks={ranks}, active={self.active_adapter!r}, merged={self.merged_adapter!r}"


class LoRaDLinear(LoRaDLayer):
    """LoRaD on an `nn.Linear`: W is (out, in)."""

    def run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


class LoRaDConv2d(LoRaDLayer):
    """LoRaD on an `nn.Conv2d`: the kernel (out, in/groups, kh, kw) is flattened to (out, -1)."""

    base_layer: nn.Conv2d

    def __init__(self, base_layer: nn.Conv2d, name: str) -> None:
        if base_layer.padding_mode != "zeros":
            raise ValueError(
                f"LoRaD supports Conv2d with padding_mode='zeros' only; {name!r} uses "
                f"{base_layer.padding_mode!r}. Leave it out of target_modules."
            )
        super().__init__(base_layer, name)

    def run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = self.base_layer
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


#: Base module type -> LoRaD wrapper; extend by adding an entry.
LAYER_TYPES: dict[type[nn.Module], type[LoRaDLayer]] = {
    nn.Linear: LoRaDLinear,
    nn.Conv2d: LoRaDConv2d,
}
