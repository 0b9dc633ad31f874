"""Putting LoRaD adapters into a model: inject, switch, merge, count, save and load.

Why not `peft.register_peft_method`: in peft 0.21 it accepts only names that are already members
of PEFT's closed `PeftType` enum (it raises "Unknown PEFT type LORAD, please add an entry to
peft.utils.peft_types.PeftType"), and `PeftConfig`/`PeftModel` save and load dispatch on that
enum. Registering an out-of-tree method would mean patching a stdlib Enum inside PEFT at
runtime, which breaks silently between releases. So this module keeps PEFT's tuner anatomy
(config -> layer with merge/unmerge/get_delta_weight -> model functions) without PEFT's
machinery: `inject_lorad` swaps each target for a `LoRaDLayer` in place, so module paths do not
change, and adapter files hold `<module path>.theta_a` / `.theta_b`, portable between injected
and raw models. Several named adapters share one frozen backbone; switching copies nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import LoRaDConfig
from .layer import (
    LAYER_TYPES,
    LoRaDConv2d,
    LoRaDLayer,
    check_lorad_shape,
    flat_shape,
    lorad_num_params,
)

__all__ = [
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
    "save_adapter",
    "set_active_adapter",
    "set_adapters_enabled",
    "unmerge_adapters",
]

logger = logging.getLogger(__name__)

SUFFIXES = (".theta_a", ".theta_b")


def _layer_type(module: nn.Module, include_conv: bool) -> type[LoRaDLayer] | None:
    base = module.base_layer if isinstance(module, LoRaDLayer) else module
    for base_type, layer_type in LAYER_TYPES.items():
        if isinstance(base, base_type):
            return None if layer_type is LoRaDConv2d and not include_conv else layer_type
    return None


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, skipping the insides of LoRaD wrappers."""
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if name and not any(name.startswith(w + ".") for w in wrappers):
            if isinstance(module, LoRaDLayer):
                wrappers.append(name)
            yield name, module


def _flat_shape(module: nn.Module) -> tuple[int, int]:
    base = module.base_layer if isinstance(module, LoRaDLayer) else module
    return flat_shape(base.weight)  # type: ignore[arg-type]


def resolve_targets(model: nn.Module, config: LoRaDConfig) -> dict[str, int]:
    """Module path -> rank for every module `config` adapts; checks all shapes, reports all errors.

    Works on `meta`-device models (only shapes are read).
    """
    plan = {
        name: config.rank_for(name)
        for name, module in _candidates(model)
        if config.matches(name) and _layer_type(module, config.include_conv) is not None
    }
    if not plan:
        kinds = "nn.Linear or nn.Conv2d" if config.include_conv else "nn.Linear"
        raise ValueError(f"target_modules={config.target_modules!r} matched no {kinds} module")
    errors = []
    for name, rank in plan.items():
        try:
            check_lorad_shape(
                name, *_flat_shape(model.get_submodule(name)), rank, config.allow_excess_rank
            )
        except ValueError as err:
            errors.append(str(err))
    if errors:
        raise ValueError(f"{len(errors)} LoRaD target(s) rejected:\n" + "\n".join(errors))
    return plan


def _inject_plan(
    model: nn.Module, plan: Mapping[str, int], adapter_name: str, config: LoRaDConfig
) -> None:
    for name, rank in plan.items():
        module = model.get_submodule(name)
        if not isinstance(module, LoRaDLayer):
            layer_type = _layer_type(module, include_conv=True)
            assert layer_type is not None, f"{name} was resolved as a target"
            module = layer_type(module, name)  # type: ignore[arg-type]
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        module.add_adapter(adapter_name, rank, config.init, allow_excess_rank=True)
    adapter_params = {
        id(p)
        for _, layer in lorad_layers(model)
        for d in (layer.theta_a, layer.theta_b)
        for p in d.values()
    }
    for param in model.parameters():
        param.requires_grad_(id(param) in adapter_params)
    configs = dict(getattr(model, "lorad_configs", {}))
    configs[adapter_name] = config
    model.lorad_configs = configs  # type: ignore[assignment]  # like PEFT's model.peft_config
    n_params = sum(
        lorad_num_params(*_flat_shape(model.get_submodule(n)), r) for n, r in plan.items()
    )
    logger.info("LoRaD adapter %r: %d modules, %d parameters", adapter_name, len(plan), n_params)


def inject_lorad(model: nn.Module, config: LoRaDConfig, adapter_name: str = "default") -> nn.Module:
    """Add LoRaD adapter `adapter_name` to `model` in place and freeze everything else.

    Targets are wrapped in `LoRaDLayer`s at the same module paths; a target that is already
    wrapped gets one more adapter. The first adapter on a layer becomes active.

    Returns:
        `model`, for chaining.
    """
    if adapter_name in getattr(model, "lorad_configs", {}):
        raise ValueError(f"the model already has a LoRaD adapter {adapter_name!r}")
    _inject_plan(model, resolve_targets(model, config), adapter_name, config)
    return model


def lorad_layers(model: nn.Module) -> Iterator[tuple[str, LoRaDLayer]]:
    """(module path, layer) for every LoRaD layer in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRaDLayer):
            yield name, module


def _adapter_names(model: nn.Module) -> set[str]:
    return {a for _, layer in lorad_layers(model) for a in layer.theta_a}


def set_active_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` active everywhere; layers without it run as their base layer."""
    if adapter_name not in _adapter_names(model):
        raise ValueError(
            f"no LoRaD adapter {adapter_name!r}; the model has {sorted(_adapter_names(model))}"
        )
    merged = sorted(
        {layer.merged_adapter or adapter_name for _, layer in lorad_layers(model)} - {adapter_name}
    )
    if merged:
        raise ValueError(f"adapter(s) {merged} are merged; unmerge_adapters before switching")
    for _, layer in lorad_layers(model):
        layer.set_adapter(adapter_name)


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRaD layer on (active adapter) or off (plain base layer)."""
    for _, layer in lorad_layers(model):
        layer.enable_adapters(enabled)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which `model` runs as its frozen base (e.g. the teacher)."""
    states = [(layer, layer.disable_adapters) for _, layer in lorad_layers(model)]
    try:
        set_adapters_enabled(model, False)
        yield model
    finally:
        for layer, disabled in states:
            layer.enable_adapters(not disabled)


@contextlib.contextmanager
def rotation_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which every LoRaD layer rotates its weight once per set of angles.

    A forward inside reuses the rotated weight of an earlier one when the active adapter's
    angles, the base weight and the grad mode are unchanged (so a training step that runs the
    fake score three times rotates it once, and autograd sums the gradients through the shared
    rotation). Keep a backward that frees the graph outside the block: a later forward inside
    it would reuse a freed rotation.
    """
    layers = [layer for _, layer in lorad_layers(model)]
    for layer in layers:
        layer._rotations = {}
    try:
        yield model
    finally:
        for layer in layers:
            layer._rotations = None


def merge_adapters(model: nn.Module) -> None:
    """Merge the active adapter into every LoRaD layer's base weight (no-op where merged)."""
    for _, layer in lorad_layers(model):
        if layer.has_active_adapter:
            layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Restore every merged base weight exactly."""
    for _, layer in lorad_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and replace every LoRaD layer by its (rotated) base layer.

    Returns:
        `model`, now free of LoRaD modules; its parameters keep requires_grad=False.
    """
    for name, layer in list(lorad_layers(model)):
        if layer.has_active_adapter:
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    if hasattr(model, "lorad_configs"):
        del model.lorad_configs
    return model


def lorad_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """`{<module path>.theta_a: ..., <module path>.theta_b: ...}` of one adapter (not copies)."""
    state = {}
    for name, layer in lorad_layers(model):
        if adapter_name in layer.theta_a:
            state[f"{name}.theta_a"] = layer.theta_a[adapter_name].detach()
            state[f"{name}.theta_b"] = layer.theta_b[adapter_name].detach()
    if not state:
        raise ValueError(
            f"no LoRaD adapter {adapter_name!r}; the model has {sorted(_adapter_names(model))}"
        )
    return state


def _module_ranks(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Module path -> rank from file keys; every module needs both halves."""
    modules: dict[str, set[str]] = {}
    for key in shapes:
        if not key.endswith(SUFFIXES):
            raise ValueError(
                f"{key!r} is not a LoRaD key (expected '<module>.theta_a' or '.theta_b')"
            )
        name, _, half = key.rpartition(".")
        modules.setdefault(name, set()).add(half)
    incomplete = sorted(n for n, halves in modules.items() if len(halves) != 2)
    if incomplete:
        raise ValueError(f"LoRaD weights lack theta_a or theta_b for {incomplete[:5]}")
    return {name: int(shapes[f"{name}.theta_a"][1]) for name in modules}


def _check_fits(
    model: nn.Module, shapes: Mapping[str, Sequence[int]], ranks: Mapping[str, int]
) -> None:
    """Every file module exists, is adaptable, and has matching theta shapes (before any change)."""
    errors = []
    for name, r in ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            errors.append(f"{name}: no such module in the model")
            continue
        if _layer_type(module, include_conv=True) is None:
            errors.append(f"{name}: {type(module).__name__} cannot take a LoRaD adapter")
            continue
        out, width = _flat_shape(module)
        for half, expected in (("theta_a", (out, r)), ("theta_b", (r, width // 2))):
            if tuple(shapes[f"{name}.{half}"]) != expected:
                errors.append(
                    f"{name}.{half}: shape {tuple(shapes[f'{name}.{half}'])}, expected {expected}"
                )
    if errors:
        raise ValueError(
            f"LoRaD weights do not fit the model ({len(errors)} problems):\n"
            + "\n".join(errors[:20])
        )


def _load(
    model: nn.Module,
    shapes: Mapping[str, Sequence[int]],
    get_tensor: Callable[[str], Tensor],
    adapter_name: str,
    config: LoRaDConfig | None,
) -> nn.Module:
    """Load one adapter tensor at a time, injecting it first if the model lacks it."""
    ranks = _module_ranks(shapes)
    _check_fits(model, shapes, ranks)
    if adapter_name not in _adapter_names(model):
        if config is None:
            r = Counter(ranks.values()).most_common(1)[0][0]
            config = LoRaDConfig(
                r=r,
                target_modules=sorted(ranks),
                allow_excess_rank=True,
                include_conv=any(isinstance(model.get_submodule(n), nn.Conv2d) for n in ranks),
                rank_pattern={n.replace(".", r"\."): k for n, k in ranks.items() if k != r},
            )
        _inject_plan(model, ranks, adapter_name, config)
    have = {n for n, layer in lorad_layers(model) if adapter_name in layer.theta_a}
    missing, unexpected = sorted(have - set(ranks)), sorted(set(ranks) - have)
    if missing or unexpected:
        raise ValueError(
            f"LoRaD weights do not fit adapter {adapter_name!r}: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    params = {}
    for key in shapes:
        name, _, half = key.rpartition(".")
        params[key] = getattr(model.get_submodule(name), half)[adapter_name]
    wrong = [
        f"{k}: file {tuple(shapes[k])}, model {tuple(p.shape)}"
        for k, p in params.items()
        if tuple(p.shape) != tuple(shapes[k])
    ]
    if wrong:
        raise ValueError(
            f"LoRaD weights do not fit adapter {adapter_name!r}: " + "; ".join(wrong[:5])
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(get_tensor(key))
    return model


def load_lorad_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], adapter_name: str = "default"
) -> nn.Module:
    """Load `lorad_state_dict` output into `model`, injecting the adapter into a raw model.

    Keys and shapes must match the adapter exactly when the model already has it.
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return _load(model, shapes, state_dict.__getitem__, adapter_name, None)


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write one adapter to a safetensors file (atomically), its config in the metadata."""
    path = Path(path)
    tensors = {k: v.contiguous() for k, v in lorad_state_dict(model, adapter_name).items()}
    metadata = {"format": "lorad", "adapter_name": adapter_name}
    config = getattr(model, "lorad_configs", {}).get(adapter_name)
    if config is not None:
        metadata["lorad_config"] = json.dumps(config.to_dict(), sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load a `save_adapter` file into `model` (raw or injected), streaming one key at a time."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        config = None
        if "lorad_config" in metadata:
            config = LoRaDConfig.from_dict(json.loads(metadata["lorad_config"]))
        keys = f.keys()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        return _load(model, shapes, f.get_tensor, adapter_name, config)


def count_lorad_params(
    model_or_shapes: nn.Module | Mapping[str, Sequence[int]],
    ranks: LoRaDConfig | int | Mapping[str, int],
) -> int:
    """Trainable LoRaD parameters, r * (out + width/2) summed over the adapted layers.

    Args:
        model_or_shapes: A model (may live on `meta`) or a mapping module path -> weight shape.
        ranks: For a model, a `LoRaDConfig` (an int r means every Linear at rank r). For shapes,
            an int for every entry, or a mapping module path -> rank counting those entries.

    Returns:
        The parameter count.
    """
    if isinstance(model_or_shapes, nn.Module):
        config = LoRaDConfig(r=ranks) if isinstance(ranks, int) else ranks
        if not isinstance(config, LoRaDConfig):
            raise TypeError("for a model, pass a LoRaDConfig or an int rank")
        plan = resolve_targets(model_or_shapes, config)
        shapes = {n: _flat_shape(model_or_shapes.get_submodule(n)) for n in plan}
    else:
        if isinstance(ranks, LoRaDConfig):
            raise TypeError("for a shape mapping, pass an int rank or a mapping path -> rank")
        plan = dict.fromkeys(model_or_shapes, ranks) if isinstance(ranks, int) else dict(ranks)
        unknown = sorted(set(plan) - set(model_or_shapes))
        if unknown:
            raise ValueError(f"ranks name modules with no shape: {unknown[:5]}")
        shapes = {n: (int(model_or_shapes[n][0]), math.prod(model_or_shapes[n][1:])) for n in plan}
        for n, r in plan.items():
            check_lorad_shape(n, *shapes[n], r, allow_excess_rank=True)
    return sum(lorad_num_params(*shapes[n], r) for n, r in plan.items())
