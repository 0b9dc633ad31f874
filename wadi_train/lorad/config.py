"""LoRaD adapter configuration: which modules get a rotation adapter, and at what rank.

The fields and matching rules mirror PEFT's `LoraConfig` (`r`, `target_modules`, `rank_pattern`),
so a LoRaD run reads like its LoRA/DoRA baselines: a string `target_modules` is a regex that must
match the whole module name, a list matches a module name exactly or as a dotted suffix, and a
`rank_pattern` key overrides `r` for the names it matches as a dotted suffix (`(.*\\.)?key$`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INITS", "SD_UNET_BLOCKS", "LoRaDConfig"]

#: Supported initialisations. "zeros_xavier": theta_a = 0, theta_b ~ xavier_uniform (identity).
INITS = ("zeros_xavier",)

#: The paper's SD student target: every adaptable module inside the down/up/mid blocks.
SD_UNET_BLOCKS = r"(down_blocks|up_blocks|mid_block)\..*"


@dataclass
class LoRaDConfig:
    """Where to put LoRaD adapters and how big they are.

    Attributes:
        r: Default rank of Theta = theta_a @ theta_b.
        target_modules: Regex over full module names (str), module names or dotted suffixes
            (list), or None for every supported module.
        rank_pattern: Per-module rank overrides, `{name pattern: rank}`; first match wins.
        init: Initialisation scheme, one of `INITS`.
        include_conv: Also adapt `nn.Conv2d` (kernel flattened to (out, in/groups*kh*kw)).
        allow_excess_rank: Accept r > min(out, in/2), where Theta cannot reach rank r. The
            paper's SD1.5 student (rank 256 on 320-wide Linears, 83.80M parameters) needs this.
    """

    r: int = 256
    target_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    init: str = "zeros_xavier"
    include_conv: bool = False
    allow_excess_rank: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        self.rank_pattern = dict(self.rank_pattern)
        errors = []
        if not isinstance(self.r, int) or self.r < 1:
            errors.append(f"r must be a positive int, got {self.r!r}")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or v < 1}
        if bad:
            errors.append(f"rank_pattern ranks must be positive ints, got {bad}")
        if self.init not in INITS:
            errors.append(f"init must be one of {INITS}, got {self.init!r}")
        if errors:
            raise ValueError("invalid LoRaDConfig: " + "; ".join(errors))

    def matches(self, name: str) -> bool:
        """Whether module `name` is a target, by name only (its type is checked on injection)."""
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    def rank_for(self, name: str) -> int:
        """The rank for module `name`: the first matching `rank_pattern` entry, else `r`."""
        for pattern, rank in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                return rank
        return self.r

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRaDConfig:
        """Build a config from `to_dict` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown LoRaDConfig keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**data)
