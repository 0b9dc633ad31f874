"""Fit LoRaD ranks from the implied-rotation spectra (DESIGN §4, `ranks.json`).

Per layer, the smallest rank whose Theta energy reaches the target; under a parameter
budget, rank units are handed out greedily by marginal Theta energy per parameter (a LoRaD
rank unit costs out + in/2 parameters). A PEFT LoRA rank pattern at the same parameter count
(a LoRA unit costs out + in) is emitted for baselines.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightlens.errors import OptionError
from weightlens.results import LayerStats

__all__ = ["RankOptions", "RankConfig", "parse_budget", "fit_ranks", "module_name"]

NOISE_FLOOR = 1e-6  # energy below this share of a layer's total is eigensolver noise, never bought


@dataclass(frozen=True)
class RankOptions:
    """How to fit ranks.

    Attributes:
        energy: per-layer Theta energy target in (0, 1]; None with a budget means budget only.
        budget: parameter budget as a count; None for no budget.
        min_rank / max_rank / multiple_of: bounds and granularity of every fitted rank.
        include_conv: also target conv kernels (flattened); LoRaD's default is Linear only.
    """

    energy: float | None = 0.9
    budget: int | None = None
    min_rank: int = 0
    max_rank: int | None = None
    multiple_of: int = 1
    include_conv: bool = False

    def __post_init__(self) -> None:
        if self.energy is not None and not 0 < self.energy <= 1:
            raise OptionError(f"energy target {self.energy} must be in (0, 1], e.g. 0.9")
        if self.min_rank < 0 or self.multiple_of < 1:
            raise OptionError("min-rank must be >= 0 and multiple-of >= 1")
        if self.max_rank is not None and self.max_rank < max(self.min_rank, 1):
            raise OptionError(f"max-rank {self.max_rank} is below min-rank {self.min_rank}")
        if self.budget is not None and self.budget <= 0:
            raise OptionError(f"budget {self.budget} must be positive")
        if self.energy is None and self.budget is None:
            raise OptionError("give an energy target, a budget, or both")


def parse_budget(text: str | None, backbone_params: int) -> int | None:
    """`10%`, `0.1` (fraction), `5M`, `83.8M`, `2e6` or `1200000` -> a parameter count."""
    if text is None or text == "":
        return None
    t = text.strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*%", t)
    if m:
        return max(1, int(float(m.group(1)) / 100 * backbone_params))
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?)\s*([kKmMbBgG]?)", t)
    if not m:
        raise OptionError(f"budget {text!r}: expected a percentage (10%), a fraction (0.1) or a count (5M, 2e6)")
    value = float(m.group(1))
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    if value < 1 and not m.group(2):
        return max(1, int(value * backbone_params))
    return int(value * scale)


@dataclass(frozen=True)
class RankConfig:
    """A fitted rank allocation, serialisable as `ranks.json`."""

    rank_pattern: dict[str, int]
    trainable_params: int
    options: RankOptions
    backbone_params: int
    captured: dict[str, float] = field(default_factory=dict)
    lora_rank_pattern: dict[str, int] = field(default_factory=dict)
    lora_params: int = 0

    @property
    def default_rank(self) -> int:
        if not self.rank_pattern:
            return 0
        return Counter(self.rank_pattern.values()).most_common(1)[0][0]

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.rank_pattern)

    def to_json(self, source: Mapping[str, Any]) -> dict[str, Any]:
        """The ranks.json document (DESIGN §4), with a PEFT LoRA pattern for baselines."""
        o = self.options
        lora_default = Counter(self.lora_rank_pattern.values()).most_common(1)[0][0] if self.lora_rank_pattern else 0
        return {
            "method": "lorad",
            "target_modules": self.target_modules,
            "rank_pattern": dict(sorted(self.rank_pattern.items())),
            "default_rank": self.default_rank,
            "trainable_params": self.trainable_params,
            "budget": {
                "params": o.budget,
                "fraction_of_backbone": (o.budget / self.backbone_params) if o.budget and self.backbone_params else None,
                "backbone_params": self.backbone_params,
                "used_params": self.trainable_params,
                "used_fraction": self.trainable_params / self.backbone_params if self.backbone_params else None,
            },
            "criterion": {
                "energy_target": o.energy,
                "min_rank": o.min_rank,
                "max_rank": o.max_rank,
                "multiple_of": o.multiple_of,
                "include_conv": o.include_conv,
                "energy_captured_mean": float(np.mean(list(self.captured.values()))) if self.captured else None,
            },
            "peft_lora": {
                "r": lora_default,
                "target_modules": sorted(self.lora_rank_pattern),
                "rank_pattern": dict(sorted(self.lora_rank_pattern.items())),
                "trainable_params": self.lora_params,
            },
            "source": dict(source),
        }


def module_name(weight_key: str) -> str:
    """The module path PEFT and diffusers use: the weight key minus `.weight`."""
    return weight_key.removesuffix(".weight")


def _eligible(layer: LayerStats, energy: np.ndarray | None, options: RankOptions) -> bool:
    kinds = {"linear", "conv"} if options.include_conv else {"linear"}
    return layer.name.endswith(".weight") and layer.kind in kinds and not layer.odd_column and energy is not None and energy.size > 0 and float(energy.sum()) > 0


def _cap(layer: LayerStats, energy: np.ndarray, options: RankOptions) -> int:
    """Largest rank worth having: full rank, max_rank, energy target, noise floor."""
    cap = min(layer.rows, layer.in_features // 2, energy.size)
    if options.max_rank is not None:
        cap = min(cap, options.max_rank)
    useful = int(np.count_nonzero(energy > NOISE_FLOOR * energy.sum()))
    cap = min(cap, max(useful, 1))
    if options.energy is not None:
        cum = np.cumsum(energy) / energy.sum()
        cap = min(cap, int(np.searchsorted(cum, options.energy - 1e-12)) + 1)
    return cap


def _round(rank: int, options: RankOptions, full: int) -> int:
    """Round up to multiple_of, raise to min_rank, never past max_rank or full rank."""
    m = options.multiple_of
    hard = min(full, options.max_rank) if options.max_rank is not None else full
    r = max(int(math.ceil(rank / m)) * m, options.min_rank)
    if r > hard:
        r = (hard // m) * m or hard
    return r


def fit_ranks(layers: Sequence[LayerStats], spectra: Mapping[str, np.ndarray], options: RankOptions, backbone_params: int) -> RankConfig:
    """Fit a rank per eligible layer.

    Args:
        layers: analysed layers (only eligible Linear, and conv if asked, are targeted).
        spectra: layer name -> Theta energies (squared singular values, descending).
        options: targets and bounds.
        backbone_params: parameters of the whole denoiser (for budget fractions).
    """
    chosen = {layer.name: layer for layer in layers if _eligible(layer, spectra.get(layer.name), options)}
    full = {n: min(l.rows, l.in_features // 2) for n, l in chosen.items()}
    caps = {n: _round(_cap(l, spectra[n], options), options, full[n]) for n, l in chosen.items()}
    if options.budget is None:
        ranks = caps
    else:
        ranks = _greedy(chosen, spectra, caps, full, options)
    ranks = {n: r for n, r in ranks.items() if r > 0}
    captured = {module_name(n): float(np.sum(spectra[n][:r]) / np.sum(spectra[n])) for n, r in ranks.items()}
    params = sum(r * chosen[n].lorad_unit_cost for n, r in ranks.items())
    lora = {module_name(n): max(1, round(r * chosen[n].lorad_unit_cost / (chosen[n].rows + chosen[n].in_features))) for n, r in ranks.items()}
    lora_params = sum(r * (chosen[n + ".weight"].rows + chosen[n + ".weight"].in_features) for n, r in lora.items())
    pattern = {module_name(n): r for n, r in ranks.items()}
    return RankConfig(pattern, params, options, backbone_params, captured, lora, lora_params)


def _greedy(chosen: Mapping[str, LayerStats], spectra: Mapping[str, np.ndarray], caps: Mapping[str, int], full: Mapping[str, int], options: RankOptions) -> dict[str, int]:
    """Buy rank chunks (multiple_of units) by marginal Theta energy per parameter."""
    assert options.budget is not None
    step = options.multiple_of
    ranks = {n: min(_round(options.min_rank, options, full[n]), caps[n]) if options.min_rank else 0 for n in chosen}
    spent = sum(r * chosen[n].lorad_unit_cost for n, r in ranks.items())
    if spent > options.budget:
        raise OptionError(f"min-rank {options.min_rank} on {len(chosen)} layers needs {spent:,} parameters, over the budget of {options.budget:,}; lower --min-rank or raise --budget")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        r = ranks[name]
        if r >= caps[name]:
            return
        k = min(step, caps[name] - r)
        gain = float(np.sum(spectra[name][r : r + k]))
        heapq.heappush(heap, (-gain / (k * chosen[name].lorad_unit_cost), name))

    for name in sorted(chosen):
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        k = min(step, caps[name] - ranks[name])
        cost = k * chosen[name].lorad_unit_cost
        if spent + cost > options.budget:
            continue  # this layer's next chunk does not fit; cheaper ones still may
        ranks[name] += k
        spent += cost
        push(name)
    return ranks
