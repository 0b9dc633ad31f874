"""Student and fake score on one frozen backbone, switched by role (never three copies).

Roles: `teacher` (adapters off), `student` (the trainable one-step generator), `fake` (the fake
score, a small adapter). Student methods are a registry: `lorad` (ours), `lora`/`dora` (PEFT),
`full` (full fine-tuning: the one case with a second copy of the weights, since the student
changes every weight while teacher and fake score must not).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from wadi_train.config import AdapterConfig, FakeScoreConfig, RunConfig
from wadi_train.errors import ConfigError
from wadi_train.lorad import LoRaDConfig, disable_adapters, inject_lorad, lorad_layers, lorad_state_dict, set_active_adapter
from wadi_train.lorad.layer import flat_shape
from wadi_train.models import Cond, Teacher, cast_model, denoise

__all__ = ["Roles", "build_roles", "student_lorad_config", "placement_problems", "ROLE_NAMES"]

log = logging.getLogger(__name__)
ROLE_NAMES = ("teacher", "student", "fake")


def read_ranks_file(path: str) -> dict[str, Any]:
    """A weightlens ranks.json: target modules and per-module ranks."""
    try:
        doc = json.loads(Path(path).read_text())
        return {"target_modules": list(doc["target_modules"]), "rank_pattern": {str(k): int(v) for k, v in doc["rank_pattern"].items()}, "default_rank": int(doc.get("default_rank") or 1), "doc": doc}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"adapter.ranks_file = {path!r}: not a weightlens ranks.json ({exc})") from None


def student_lorad_config(cfg: AdapterConfig) -> LoRaDConfig:
    """The student's LoRaD config: from ranks.json when given, else rank + target regex."""
    if cfg.ranks_file:
        ranks = read_ranks_file(cfg.ranks_file)
        pattern = {re.escape(k): v for k, v in ranks["rank_pattern"].items()}
        return LoRaDConfig(r=ranks["default_rank"], target_modules=ranks["target_modules"], rank_pattern=pattern, include_conv=cfg.include_conv, allow_excess_rank=cfg.allow_excess_rank)
    return LoRaDConfig(r=cfg.rank, target_modules=cfg.target_modules, include_conv=cfg.include_conv, allow_excess_rank=cfg.allow_excess_rank)


def _peft_config(cfg: AdapterConfig | FakeScoreConfig, dora: bool, rank_pattern: dict[str, int] | None = None, targets: Any = None) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=targets if targets is not None else cfg.target_modules, rank_pattern=rank_pattern or {}, use_dora=dora, init_lora_weights=True)


class Roles(Protocol):
    """What the training recipe needs from a student/fake setup."""

    teacher: Teacher
    method: str

    def student_parameters(self) -> list[nn.Parameter]: ...
    def fake_parameters(self) -> list[nn.Parameter]: ...
    def predict(self, role: str, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...
    def activate(self, role: str) -> None: ...
    def student_state(self) -> dict[str, Tensor]: ...
    def fake_state(self) -> dict[str, Tensor]: ...
    def load_states(self, student: dict[str, Tensor], fake: dict[str, Tensor]) -> None: ...
    def merged_student(self) -> nn.Module: ...


def _named_trainable(module: nn.Module, marker: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if marker in n}


def _load_named(module: nn.Module, state: dict[str, Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


@dataclass
class LoRaDRoles:
    """Student and fake score as two LoRaD adapters on the teacher's backbone."""

    teacher: Teacher
    method: str = "lorad"

    def setup(self, student: LoRaDConfig, fake: LoRaDConfig) -> "LoRaDRoles":
        inject_lorad(self.teacher.backbone, student, "student")
        inject_lorad(self.teacher.backbone, fake, "fake")
        return self

    def _params(self, adapter: str) -> dict[str, nn.Parameter]:
        out = {}
        for name, layer in lorad_layers(self.teacher.backbone):
            if adapter in layer.theta_a:
                out[f"{name}.theta_a"] = layer.theta_a[adapter]
                out[f"{name}.theta_b"] = layer.theta_b[adapter]
        return out

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self._params("student").values())

    def fake_parameters(self) -> list[nn.Parameter]:
        return list(self._params("fake").values())

    @contextlib.contextmanager
    def role(self, role: str) -> Iterator[nn.Module]:
        model = self.teacher.backbone
        if role == "teacher":
            with disable_adapters(model):
                yield model
        else:
            set_active_adapter(model, role)
            yield model

    def predict(self, role: str, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        with self.role(role) as model:
            return denoise(model, self.teacher.family, x_t, t, cond)

    def activate(self, role: str) -> None:
        """Leave `role` active (gradient checkpointing recomputes forwards during backward)."""
        if role != "teacher":
            set_active_adapter(self.teacher.backbone, role)

    def student_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self._params("student").items()}

    def fake_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self._params("fake").items()}

    def load_states(self, student: dict[str, Tensor], fake: dict[str, Tensor]) -> None:
        for adapter, state in (("student", student), ("fake", fake)):
            params = self._params(adapter)
            with torch.no_grad():
                for k, v in state.items():
                    params[k].copy_(v)

    def merged_student(self) -> nn.Module:
        """A plain copy of the backbone with the student merged in fp32 (no adapters)."""
        model = copy.deepcopy(self.teacher.backbone)
        dtype = next(model.parameters()).dtype
        cast_model(model, torch.float32)
        for name, layer in list(lorad_layers(model)):
            base = layer.base_layer
            if "student" in layer.theta_a:
                with torch.no_grad():
                    base.weight.copy_(layer.rotated_weight("student"))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, base)
        return cast_model(model, dtype).requires_grad_(False)

    def adapter_file_state(self) -> dict[str, Tensor]:
        return lorad_state_dict(self.teacher.backbone, "student")


@dataclass
class PeftRoles:
    """Student and fake score as two PEFT LoRA (or DoRA) adapters on the backbone."""

    teacher: Teacher
    method: str = "lora"

    def setup(self, student_cfg: Any, fake_cfg: Any) -> "PeftRoles":
        from peft import inject_adapter_in_model

        import warnings

        with warnings.catch_warnings():  # PEFT warns about the second adapter: that is the design
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(student_cfg, self.teacher.backbone, adapter_name="student")
            inject_adapter_in_model(fake_cfg, self.teacher.backbone, adapter_name="fake")
        for n, p in self.teacher.backbone.named_parameters():
            p.requires_grad_(".student" in n or ".fake" in n)
        return self

    def _layers(self) -> Iterator[Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.teacher.backbone.modules():
            if isinstance(module, BaseTunerLayer):
                yield module

    def student_parameters(self) -> list[nn.Parameter]:
        return list(_named_trainable(self.teacher.backbone, ".student").values())

    def fake_parameters(self) -> list[nn.Parameter]:
        return list(_named_trainable(self.teacher.backbone, ".fake").values())

    def activate(self, role: str) -> None:
        for layer in self._layers():
            layer.enable_adapters(role != "teacher")
            if role != "teacher":
                layer.set_adapter(role)
        for n, p in self.teacher.backbone.named_parameters():  # PEFT's set_adapter freezes the others
            p.requires_grad_(".student" in n or ".fake" in n)

    def predict(self, role: str, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        self.activate(role)
        return denoise(self.teacher.backbone, self.teacher.family, x_t, t, cond)

    def student_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in _named_trainable(self.teacher.backbone, ".student").items()}

    def fake_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in _named_trainable(self.teacher.backbone, ".fake").items()}

    def load_states(self, student: dict[str, Tensor], fake: dict[str, Tensor]) -> None:
        _load_named(self.teacher.backbone, {**student, **fake})

    def merged_student(self) -> nn.Module:
        model = copy.deepcopy(self.teacher.backbone)
        dtype = next(model.parameters()).dtype
        cast_model(model, torch.float32)
        for module in list(model.modules()):
            for cname, child in list(module.named_children()):
                if hasattr(child, "base_layer") and hasattr(child, "lora_A"):
                    if "student" in child.lora_A:
                        child.merge(adapter_names=["student"])
                    setattr(module, cname, child.get_base_layer())
        return cast_model(model, dtype).requires_grad_(False)

    def adapter_file_state(self) -> dict[str, Tensor]:
        return self.student_state()


@dataclass
class FullRoles:
    """Full fine-tuning: a trainable fp32 copy as the student; fake score = LoRaD on the base."""

    teacher: Teacher
    method: str = "full"

    def setup(self, fake: LoRaDConfig) -> "FullRoles":
        self.student = cast_model(copy.deepcopy(self.teacher.backbone), torch.float32).requires_grad_(True)
        self.student.train()
        inject_lorad(self.teacher.backbone, fake, "fake")
        return self

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters())

    def fake_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.teacher.backbone.named_parameters() if ".theta_" in n]

    def activate(self, role: str) -> None:
        if role == "fake":
            set_active_adapter(self.teacher.backbone, "fake")

    def predict(self, role: str, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if role == "student":
            return denoise(self.student, self.teacher.family, x_t, t, cond)
        model = self.teacher.backbone
        if role == "teacher":
            with disable_adapters(model):
                return denoise(model, self.teacher.family, x_t, t, cond)
        set_active_adapter(model, "fake")
        return denoise(model, self.teacher.family, x_t, t, cond)

    def student_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def fake_state(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.teacher.backbone.named_parameters() if ".theta_" in n}

    def load_states(self, student: dict[str, Tensor], fake: dict[str, Tensor]) -> None:
        self.student.load_state_dict(student)
        _load_named(self.teacher.backbone, fake)

    def merged_student(self) -> nn.Module:
        return cast_model(copy.deepcopy(self.student), next(self.teacher.backbone.parameters()).dtype).requires_grad_(False)

    def adapter_file_state(self) -> dict[str, Tensor]:
        return self.student_state()


def _fake_lorad(cfg: FakeScoreConfig) -> LoRaDConfig:
    return LoRaDConfig(r=cfg.rank, target_modules=cfg.target_modules, include_conv=cfg.include_conv, allow_excess_rank=True)


def _linear_names(model: nn.Module, regex: str, convs: bool = False) -> list[str]:
    """Linear (and with `convs`, Conv2d) modules whose full name matches `regex` (LoRaD's
    targets, for PEFT baselines)."""
    kinds = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds) and re.fullmatch(regex, n)]
    if not names:
        raise ConfigError(f"target_modules {regex!r} matched no {' or '.join(k.__name__ for k in kinds)} module")
    return names


def _regex_problem(where: str, regex: str) -> str | None:
    try:
        re.compile(regex)
    except re.error as exc:
        return f"{where} = {regex!r}: not a valid regular expression ({exc})"
    return None


def _lorad_problems(source: str, model: nn.Module, cfg: LoRaDConfig) -> list[str]:
    """Targets that match nothing, odd input widths and ranks beyond min(out, in/2)."""
    kinds = (nn.Linear, nn.Conv2d) if cfg.include_conv else (nn.Linear,)
    shapes = {n: flat_shape(m.weight) for n, m in model.named_modules() if n and isinstance(m, kinds) and cfg.matches(n)}
    if not shapes:
        examples = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]
        return [f"{source}: matches no {' or '.join(k.__name__ for k in kinds)} module of the model (some Linear names: {examples})"]
    problems = []
    odd = [n for n, (_, width) in shapes.items() if width % 2]
    if odd:
        problems.append(f"{source}: {len(odd)} target(s) have an odd input width, which LoRaD cannot pair up for rotation (first: {odd[:3]}); leave them out of the targets")
    over = {n: (cfg.rank_for(n), min(out, width // 2)) for n, (out, width) in shapes.items() if not width % 2 and cfg.rank_for(n) > min(out, width // 2)}
    if over and not cfg.allow_excess_rank:
        name, (rank, limit) = next(iter(over.items()))
        problems.append(f"{source}: rank too high for {len(over)} target(s) with adapter.allow_excess_rank=false (first: {name!r} rank {rank} > min(out, in/2) = {limit}); lower the rank or set adapter.allow_excess_rank=true")
    return problems


def _unknown_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Names (exact module paths or dotted suffixes, as LoRaD and PEFT match them) naming no module."""
    modules = [n for n, _ in model.named_modules() if n]
    return [x for x in dict.fromkeys(names) if not any(m == x or m.endswith("." + x) for m in modules)]


def _student_problems(model: nn.Module, a: AdapterConfig) -> list[str]:
    if a.ranks_file:
        try:
            ranks = read_ranks_file(a.ranks_file)
        except ConfigError as exc:
            return [str(exc)]
        peft_lora = (ranks["doc"].get("peft_lora") or {}) if a.method in ("lora", "dora") else {}
        names = [*ranks["target_modules"], *ranks["rank_pattern"], *(peft_lora.get("target_modules") or []), *(peft_lora.get("rank_pattern") or {})]
        unknown = _unknown_modules(model, [str(n) for n in names])
        if unknown:
            return [f"adapter.ranks_file = {a.ranks_file!r}: {len(unknown)} module name(s) are not in the model (first: {unknown[:3]}); the ranks were fitted on another model: run `weightlens compare` on this teacher and its reference"]
        return _lorad_problems(f"adapter.ranks_file = {a.ranks_file!r}", model, student_lorad_config(a)) if a.method == "lorad" else []
    bad_regex = _regex_problem("adapter.target_modules", a.target_modules)
    if bad_regex:
        return [bad_regex]
    if a.method == "lorad":
        return _lorad_problems(f"adapter.target_modules = {a.target_modules!r}", model, student_lorad_config(a))
    if not any(isinstance(m, nn.Linear) and re.fullmatch(a.target_modules, n) for n, m in model.named_modules()):
        return [f"adapter.target_modules = {a.target_modules!r}: matches no nn.Linear module of the model"]
    return []


def placement_problems(config: RunConfig) -> list[str]:
    """Where the adapters would go, checked on the backbone built on the `meta` device (no
    weights read): ranks.json names that are no module, target regexes that match nothing,
    ranks a layer cannot take (adapter.allow_excess_rank=false) and odd input widths."""
    from wadi_train.sizes import meta_backbone

    try:
        model = meta_backbone(config)
    except FileNotFoundError as exc:
        return [f"model.pretrained = {config.model.pretrained!r}: {exc.filename} not found; point it at a diffusers pipeline folder (with model_index.json) or a model folder (with config.json)"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return [f"model: cannot build the {config.model.family} backbone from its config ({str(exc).splitlines()[0][:200]})"]
    a, f = config.adapter, config.fake
    problems = []
    if a.method in ("lorad", "lora", "dora") and a.rank >= 1:
        problems += _student_problems(model, a)
    bad_regex = _regex_problem("fake.target_modules", f.target_modules)
    if bad_regex:
        problems.append(bad_regex)
    elif f.rank >= 1:
        problems += _lorad_problems(f"fake.target_modules = {f.target_modules!r}", model, _fake_lorad(f))
    return problems


def build_roles(teacher: Teacher, adapter: AdapterConfig, fake: FakeScoreConfig) -> Any:
    """Set up student and fake score on `teacher` for `adapter.method`."""
    try:
        if adapter.method == "lorad":
            return LoRaDRoles(teacher).setup(student_lorad_config(adapter), _fake_lorad(fake))
        if adapter.method in ("lora", "dora"):
            dora = adapter.method == "dora"
            rank_pattern, targets = None, None
            if adapter.ranks_file:
                ranks = read_ranks_file(adapter.ranks_file)
                peft_lora = ranks["doc"].get("peft_lora") or {}
                rank_pattern = {re.escape(k): int(v) for k, v in (peft_lora.get("rank_pattern") or ranks["rank_pattern"]).items()}
                targets = list(rank_pattern and peft_lora.get("target_modules") or ranks["target_modules"])
            targets = targets or _linear_names(teacher.backbone, adapter.target_modules)
            fake_targets = _linear_names(teacher.backbone, fake.target_modules, fake.include_conv)
            return PeftRoles(teacher, adapter.method).setup(_peft_config(adapter, dora, rank_pattern, targets), _peft_config(fake, False, None, fake_targets))
        if adapter.method == "full":
            return FullRoles(teacher).setup(_fake_lorad(fake))
    except ValueError as exc:
        raise ConfigError(f"adapter setup failed: {str(exc).splitlines()[0]}") from None
    raise ConfigError(f"adapter.method = {adapter.method!r}: use lorad, lora, dora or full")
