"""LoRaD: low-rank pairwise rotations of frozen weights (DESIGN §5), with PEFT's tuner anatomy.

`config` says where adapters go, `layer` holds the maths (rotation from `weightlens.rotation`,
merge/unmerge, named adapters) and `model` injects, switches, merges, counts, saves and loads.
"""

from .config import INITS, SD_UNET_BLOCKS, LoRaDConfig
from .layer import LAYER_TYPES, LoRaDConv2d, LoRaDLayer, LoRaDLinear, rotate_weight
from .model import (
    count_lorad_params,
    disable_adapters,
    inject_lorad,
    load_adapter,
    load_lorad_state_dict,
    lorad_layers,
    lorad_state_dict,
    merge_adapters,
    merge_and_unload,
    resolve_targets,
    rotation_cache,
    save_adapter,
    set_active_adapter,
    set_adapters_enabled,
    unmerge_adapters,
)

__all__ = [
    "INITS",
    "LAYER_TYPES",
    "SD_UNET_BLOCKS",
    "LoRaDConfig",
    "LoRaDConv2d",
    "LoRaDLayer",
    "LoRaDLinear",
    "count_lorad_params",
    "disable_adapters",
    "inject_lorad",
    "load_adapter",
    "load_lorad_state_dict",
    "lorad_layers",
    "lorad_state_dict",
    "merge_adapters",
    "merge_and_unload",
    "resolve_targets",
    "rotate_weight",
    "rotation_cache",
    "save_adapter",
    "set_active_adapter",
    "set_adapters_enabled",
    "unmerge_adapters",
]
