"""The typed run config: a YAML file plus dotted overrides, every problem reported at once.

`load_config(path, ["optim.student_lr=1e-5", ...])` builds a `RunConfig`; unknown keys and
wrong types are errors (with the valid keys named), and `validate(config)` checks the
cross-field rules (files exist, ranges, incompatible options) before any device work.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wadi_train.errors import ConfigError

__all__ = [
    "ModelConfig", "AdapterConfig", "FakeScoreConfig", "VSDConfig", "OptimConfig", "TrainConfig",
    "DataConfig", "RunConfig", "load_config", "from_dict", "to_dict", "apply_overrides", "validate",
    "folder_problem",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
ADAPTER_METHODS = ("lorad", "lora", "dora", "full")
MIXED_PRECISION = ("no", "fp16", "bf16")
# Paper defaults (DESIGN §5): student on every Linear in down/up/mid blocks; fake score on
# attention and feed-forward Linears only.
BLOCK_LINEARS = r".*(down_blocks|up_blocks|mid_block|transformer_blocks).*"
ATTENTION_FF = r".*(attn\d?|attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)$|.*\.ff\.net\.(0\.proj|2)$"


@dataclass
class ModelConfig:
    """Where the teacher comes from and how it is conditioned."""

    family: str = "unet2d_condition"
    pretrained: str | None = None
    component: str | None = None
    config: dict[str, Any] | None = None
    weights: str | None = None
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    scheduler: dict[str, Any] | None = None
    conditioning: str = "class"
    num_classes: int = 10
    dtype: str = "float32"


@dataclass
class AdapterConfig:
    """The student's trainable part."""

    method: str = "lorad"
    rank: int = 256
    target_modules: str = BLOCK_LINEARS
    ranks_file: str | None = None
    init_from_analysis: str | None = None
    include_conv: bool = False
    allow_excess_rank: bool = True


@dataclass
class FakeScoreConfig:
    """The fake score: a small adapter on the same frozen backbone."""

    method: str = "lorad"
    rank: int = 32
    target_modules: str = ATTENTION_FF
    uncond_dropout: float = 0.1
    steps_per_student_step: int = 1
    include_conv: bool = False
    # The first fake update learns from the VSD forward itself: the fake score's prediction at
    # the VSD's noised samples (taken before the update) is both VSD's eps_fake and, with grad,
    # the denoising prediction of the update. One fake forward less per step; the update then
    # sees the VSD's timesteps and noise and no condition dropout (needs vsd.fake_cfg = 1).
    reuse_vsd_forward: bool = False


@dataclass
class VSDConfig:
    """Variational score distillation (SwiftBrush / WaDi)."""

    teacher_cfg: float = 1.5
    fake_cfg: float = 1.5
    t_min: int = 20
    t_max: int = 980
    fake_t_min: int = 0
    fake_t_max: int = 999
    weighting: str = "one_minus_abar"
    generator_timestep: int | None = None
    # Optional DMD-style regression (Yin et al. 2024): the student also matches the teacher's
    # multi-step DDIM output on a fixed set of (noise, condition) pairs made at start-up.
    # 0 (the default) is pure VSD, as in SwiftBrush/WaDi.
    regression_weight: float = 0.0
    regression_pairs: int = 1024
    regression_steps: int = 25
    # Optional adversarial term (DMD2; wadi_train/gan.py): a head on the fake score's features at
    # gan_feature_module tells noised real images (data.real_images) from noised student samples.
    gan_weight: float = 0.0
    gan_d_weight: float = 1e-2
    gan_feature_module: str = "mid_block"
    gan_t_max: int | None = None  # timesteps of the adversarial term: [t_min, gan_t_max or t_max]


@dataclass
class OptimConfig:
    student_lr: float = 1e-4
    fake_lr: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    use_8bit: bool = False


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    ema_decay: float | None = 0.999
    log_every: int = 10
    sample_every: int = 0
    num_samples: int = 16
    max_nonfinite_steps: int = 5
    device: str | None = None


@dataclass
class DataConfig:
    """Conditioning data: a prompt file (encoded with the pipeline's text encoder) or
    precomputed embeddings (`embeddings`: safetensors with `embeddings` (N+1, L, D), the
    last row the empty prompt, and optionally `text_embeds` (N+1, D) for SDXL-style models
    and `attention_mask` (N+1, L) for T5-encoded prompts)."""

    embeddings: str | None = None
    prompts: str | None = None
    prompt_column: str = "text"
    resolution: int | None = None
    classes: list[int] | None = None
    real_images: str | None = None


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    fake: FakeScoreConfig = field(default_factory=FakeScoreConfig)
    vsd: VSDConfig = field(default_factory=VSDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(value: Any, hint: Any, where: str, errors: list[str]) -> Any:
    """Coerce ints to floats where a float is wanted; record a type error otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where, errors) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping of {hint.__name__} fields, got {value!r}")
            return hint()
        return _from_dict(hint, value, where, errors)
    base = origin or hint
    if base is list and isinstance(value, list) and typing.get_args(hint):
        return [_check_type(x, typing.get_args(hint)[0], f"{where}[{i}]", errors) for i, x in enumerate(value)]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, bool):  # YAML 1.1 reads a bare no/yes as a bool
        return "yes" if value else "no"
    if base is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-5` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if base in (int, float, str, bool, list, dict) and not isinstance(value, base) or (base is int and isinstance(value, bool)):
        errors.append(f"{where}: expected {getattr(base, '__name__', base)}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            errors.append(f"{where}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(hints)}"))
            continue
        kwargs[key] = _check_type(value, hints[key], where, errors)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts; raise ConfigError listing every problem."""
    errors: list[str] = []
    cfg = _from_dict(RunConfig, data or {}, "", errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain JSON/YAML-safe nested dicts (tuples become lists)."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(config)))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to nested dicts."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.student_lr=1e-5")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise ConfigError(f"{p}: not valid YAML ({where}{problem or ' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    return from_dict(apply_overrides(data, list(overrides or [])))


def _range(errors: list[str], where: str, value: float | None, low: float | None = None, high: float | None = None) -> None:
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        errors.append(f"{where} = {value}: must be in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]")


def validate(config: RunConfig, check_files: bool = True) -> list[str]:
    """Every cross-field problem, as a list of one-line messages (empty when valid).

    With `check_files`, also the files: that they exist, that output_dir can be written, and
    what the teacher's folder and structure (built on the meta device) say about the config.
    """
    e: list[str] = []
    m, a, f, v, o, t = config.model, config.adapter, config.fake, config.vsd, config.optim, config.train
    from wadi_train.models import FAMILIES

    if m.family not in FAMILIES:
        e.append(f"model.family = {m.family!r}: use one of {sorted(FAMILIES)}")
    if m.prediction_type not in PREDICTION_TYPES:
        e.append(f"model.prediction_type = {m.prediction_type!r}: use one of {PREDICTION_TYPES}")
    if m.conditioning not in ("class", "text"):
        e.append(f"model.conditioning = {m.conditioning!r}: use 'class' or 'text'")
    if m.pretrained is None and m.config is None:
        e.append("model: give model.pretrained (a local diffusers folder) or model.config (build from config)")
    if m.dtype not in ("float32", "float16", "bfloat16"):
        e.append(f"model.dtype = {m.dtype!r}: use float32, float16 or bfloat16")
    if a.method not in ADAPTER_METHODS:
        e.append(f"adapter.method = {a.method!r}: use one of {ADAPTER_METHODS}")
    if f.method not in ("lorad", "lora"):
        e.append(f"fake.method = {f.method!r}: use lorad or lora")
    for where, rank in (("adapter.rank", a.rank), ("fake.rank", f.rank)):
        _range(e, where, rank, 1)
    _range(e, "fake.uncond_dropout", f.uncond_dropout, 0, 1)
    if f.reuse_vsd_forward and config.vsd.fake_cfg != 1.0:
        e.append(f"fake.reuse_vsd_forward needs vsd.fake_cfg = 1 (got {config.vsd.fake_cfg}): the shared forward is conditional only, so the fake score never learns the unconditional branch CFG reads")
    _range(e, "vsd.t_min", v.t_min, 0, m.num_train_timesteps - 1)
    _range(e, "vsd.t_max", v.t_max, 0, m.num_train_timesteps - 1)
    _range(e, "vsd.fake_t_min", v.fake_t_min, 0, m.num_train_timesteps - 1)
    _range(e, "vsd.fake_t_max", v.fake_t_max, 0, m.num_train_timesteps - 1)
    _range(e, "vsd.generator_timestep", v.generator_timestep, 0, m.num_train_timesteps - 1)
    _range(e, "vsd.regression_weight", v.regression_weight, 0)
    if v.regression_weight > 0:
        _range(e, "vsd.regression_pairs", v.regression_pairs, 1)
        _range(e, "vsd.regression_steps", v.regression_steps, 1, m.num_train_timesteps)
    _range(e, "vsd.gan_weight", v.gan_weight, 0)
    _range(e, "vsd.gan_d_weight", v.gan_d_weight, 0)
    _range(e, "vsd.gan_t_max", v.gan_t_max, v.t_min, m.num_train_timesteps - 1)
    if v.gan_weight > 0:
        if not config.data.real_images:
            e.append("vsd.gan_weight > 0: the adversarial term needs data.real_images (a safetensors file with 'images' (N, C, H, W) in the denoiser's space)")
        elif check_files and not Path(config.data.real_images).is_file():
            e.append(f"data.real_images = {config.data.real_images!r}: no such file")
        if t.gradient_checkpointing:
            e.append("vsd.gan_weight > 0 with train.gradient_checkpointing: not supported (the student's backward runs through the fake score); turn one off")
    if v.t_min > v.t_max or v.fake_t_min > v.fake_t_max:
        e.append("vsd: t_min must not exceed t_max (and fake_t_min not fake_t_max)")
    from wadi_train.losses import weighting_names

    if v.weighting not in weighting_names():
        e.append(f"vsd.weighting = {v.weighting!r}: use one of {weighting_names()}")
    _range(e, "optim.student_lr", o.student_lr, 0)
    _range(e, "optim.fake_lr", o.fake_lr, 0)
    from wadi_train.lr_schedule import LR_SCHEDULES

    if o.lr_schedule not in LR_SCHEDULES:
        e.append(f"optim.lr_schedule = {o.lr_schedule!r}: use one of {LR_SCHEDULES}")
    _range(e, "optim.min_lr_ratio", o.min_lr_ratio, 0, 1)
    if len(o.betas) != 2:
        e.append(f"optim.betas = {o.betas}: give two numbers")
    if t.mixed_precision not in MIXED_PRECISION:
        e.append(f"train.mixed_precision = {t.mixed_precision!r}: use one of {MIXED_PRECISION}")
    for where, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum), ("train.max_nonfinite_steps", t.max_nonfinite_steps), ("train.checkpoint_every", t.checkpoint_every), ("train.keep_checkpoints", t.keep_checkpoints), ("train.log_every", t.log_every)):
        _range(e, where, value, 1)
    _range(e, "train.ema_decay", t.ema_decay, 0, 1)
    bad_classes = [c for c in config.data.classes or [] if not (isinstance(c, int) and 0 <= c < m.num_classes)]
    if bad_classes:
        e.append(f"data.classes: {bad_classes} outside [0, model.num_classes = {m.num_classes})")
    if m.conditioning == "text" and config.data.prompts is None and config.data.embeddings is None:
        e.append("data.prompts: text conditioning needs a prompt file (.txt, .jsonl, .csv or .parquet) or data.embeddings")
    if check_files:
        for where, value in (("model.pretrained", m.pretrained), ("model.weights", m.weights), ("adapter.ranks_file", a.ranks_file), ("adapter.init_from_analysis", a.init_from_analysis), ("data.prompts", config.data.prompts), ("data.embeddings", config.data.embeddings)):
            if value is not None and not Path(value).exists():
                e.append(f"{where} = {value!r}: no such file or folder")
        e += [x for x in [folder_problem("output_dir", config.output_dir)] if x]
        e += _model_problems(config, e)
    return e


def folder_problem(where: str, path: str | Path) -> str | None:
    """Why `path` cannot be (created as) a writable folder, or None when it can."""
    p = Path(path)
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{where} = {str(path)!r}: {existing} is a file, not a folder; choose another {where}"
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"{where} = {str(path)!r}: {existing} is not writable; choose another {where} or fix its permissions"
    return None


def _model_problems(config: RunConfig, found: list[str]) -> list[str]:
    """Checks against the teacher's files and its structure (built on the meta device), run when
    the fields they rest on are valid: scheduler vs prediction type, adapter targets and ranks."""
    from wadi_train.models import FAMILIES, teacher_problems

    m = config.model
    if m.family not in FAMILIES or m.prediction_type not in PREDICTION_TYPES or any(x.startswith(("model.pretrained", "model:")) for x in found):
        return []
    problems = teacher_problems(m)
    if any(x.startswith(("adapter.ranks_file", "adapter.method", "fake.method")) for x in found):
        return problems
    from wadi_train.adapters import placement_problems

    return problems + placement_problems(config)
