"""The distillation recipe: one readable loop wiring the components (DESIGN §5).

Per step: the student makes x0_hat in one step from pure noise; the VSD loss pulls it along
(eps_teacher - eps_fake) at a random timestep (CFG on both); then the fake score learns to
denoise the student's samples. accelerate is glue (devices, mixed precision, processes):
the model is never DDP-wrapped, adapter gradients are averaged across processes by hand,
so role switching stays free and every rank holds identical adapters after each step.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from wadi_train.adapters import build_roles
from wadi_train.checkpoint import capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from wadi_train.config import RunConfig, to_dict, validate
from wadi_train.data import ClassSampler, ConditionSampler, TextSampler, encode_prompts, read_prompts
from wadi_train.ema import EMA
from wadi_train.errors import ConfigError, TrainingError
from wadi_train.gan import Adversary, DiscriminatorHead, FeatureTap, RealImages, discriminator_loss, generator_loss
from wadi_train.lorad import rotation_cache
from wadi_train.losses import denoising_loss, vsd_student_loss
from wadi_train.lr_schedule import lr_factor
from wadi_train.models import Cond, Teacher, load_teacher
from wadi_train.one_step import abar_at, add_noise, cfg, eps_from_prediction, one_step_x0, sample_timesteps
from wadi_train.regression import ODEPairs, make_ode_pairs, regression_loss

__all__ = ["TrainResult", "train", "run_dir_of", "Distiller"]

log = logging.getLogger(__name__)
METRICS = ("step", "loss_student", "loss_regression", "loss_fake", "loss_gan_generator", "loss_gan_discriminator", "grad_norm_student", "grad_norm_fake", "vsd_grad_norm", "lr_student", "lr_fake", "theta_abs_mean", "theta_abs_max", "nonfinite_skipped", "seconds")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    last: dict[str, float] = field(default_factory=dict)
    nonfinite_skipped: int = 0


def run_dir_of(config: RunConfig) -> Path:
    return Path(config.output_dir)


def _sampler(config: RunConfig, teacher: Teacher, run_dir: Path) -> ConditionSampler:
    if config.model.conditioning == "class":
        return ClassSampler(teacher.num_classes, config.data.classes)
    if config.data.embeddings:
        from wadi_train.data import load_embeddings

        return load_embeddings(config.data.embeddings, config.data.resolution)
    prompts = read_prompts(config.data.prompts, config.data.prompt_column)  # type: ignore[arg-type]
    return TextSampler(encode_prompts(teacher, prompts, run_dir / "cache" / "prompt_embeddings.safetensors"))


class Distiller:
    """The models, optimizers and state of one run (the loop below drives it)."""

    def __init__(self, config: RunConfig, accelerator: Any, run_dir: Path):
        self.config, self.acc, self.run_dir = config, accelerator, run_dir
        torch.manual_seed(config.train.seed)  # identical adapter init on every process
        self.teacher = load_teacher(config.model, accelerator.device)
        self.roles = build_roles(self.teacher, config.adapter, config.fake)
        self.provenance: dict[str, Any] = {"adapter": config.adapter.method, "ranks_file": config.adapter.ranks_file, "init": "zeros_xavier"}
        if config.adapter.init_from_analysis:
            from wadi_train.warm_start import warm_start_from_analysis

            self.provenance["init"] = warm_start_from_analysis(self.roles, config.adapter.init_from_analysis)
        if config.train.gradient_checkpointing:
            for m in {id(x): x for x in (self.teacher.backbone, getattr(self.roles, "student", self.teacher.backbone))}.values():
                if hasattr(m, "enable_gradient_checkpointing"):
                    m.enable_gradient_checkpointing()
        self.sampler = _sampler(config, self.teacher, run_dir)
        self.gan = self._discriminator() if config.vsd.gan_weight > 0 else None
        self.opt_s = self._optimizer(self.roles.student_parameters(), config.optim.student_lr)
        self.opt_f = self._optimizer(self._fake_parameters(), config.optim.fake_lr)
        o = config.optim
        self.sched_s = torch.optim.lr_scheduler.LambdaLR(self.opt_s, lambda s: lr_factor(s, max(o.warmup_steps, 0), config.train.steps, o.lr_schedule, o.min_lr_ratio))
        self.sched_f = torch.optim.lr_scheduler.LambdaLR(self.opt_f, lambda s: 1.0)
        self.opt_s, self.opt_f = accelerator.prepare(self.opt_s, self.opt_f)
        self.ema = EMA(self._student_named(), decay=config.train.ema_decay) if config.train.ema_decay else None
        self.gen = torch.Generator().manual_seed(config.train.seed * 1000 + accelerator.process_index + 1)
        self.alphas = self.teacher.alphas_cumprod.to(accelerator.device)
        self.pairs = self._regression_pairs() if config.vsd.regression_weight > 0 else None
        self.step = 0
        self.nonfinite_total = 0

    def _optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        o = self.config.optim
        if o.use_8bit:
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
            except ImportError:
                log.warning("optim.use_8bit: bitsandbytes is not installed; using torch AdamW")
        # The fused kernel: one call for all tensors (on CPU the default is a per-tensor loop,
        # 4.7 ms a step for the digits demo's 120 LoRaD tensors, 0.7 ms fused)
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, fused=fused or None)

    def _discriminator(self) -> Adversary:
        """The adversarial term's feature tap on the fake score, its head and the real images."""
        c = self.config
        real = RealImages(c.data.real_images, self.teacher.sample_shape, c.model.conditioning)  # type: ignore[arg-type]
        tap = FeatureTap(self.teacher.backbone, c.vsd.gan_feature_module)
        probe = torch.zeros((1, *self.teacher.sample_shape), device=self.acc.device)
        with torch.no_grad(), tap.capture():
            self.roles.predict("fake", probe, torch.full((1,), 500, device=self.acc.device), self.sampler.uncond(1).to(self.acc.device))
        features = tap.take()
        channels = features.shape[1] if features.ndim == 4 else features.shape[-1]
        head = DiscriminatorHead(channels).to(self.acc.device)
        log.info("adversarial term: head on %s features %s, %d real images", c.vsd.gan_feature_module, tuple(features.shape[1:]), len(real.images))
        return Adversary(tap, head, real)

    def _fake_parameters(self) -> list[nn.Parameter]:
        head = list(self.gan.head.parameters()) if self.gan else []
        return self.roles.fake_parameters() + head

    def _gan_features(self, x0: Tensor, cond: Cond) -> Tensor:
        """The fake score's features for x0 noised at a random timestep (the forward ends at the tap)."""
        assert self.gan is not None
        v, b = self.config.vsd, x0.shape[0]
        t = sample_timesteps(b, v.t_min, v.gan_t_max or v.t_max, generator=self.gen).to(self.acc.device)
        x_t = add_noise(x0, self._randn(tuple(x0.shape)), abar_at(self.alphas, t, x0.ndim))
        with self.acc.autocast(), self.gan.tap.capture():
            self.roles.predict("fake", x_t, t, cond)
        return self.gan.tap.take()

    def _real_features(self, n: int) -> Tensor:
        """The fake score's features for n noised real images (the discriminator's real branch)."""
        assert self.gan is not None
        real, labels = self.gan.real.sample(n, self.gen)
        return self._gan_features(real.to(self.acc.device), self._gan_cond(Cond(class_labels=labels), n))

    def _gan_cond(self, cond: Cond, n: int) -> Cond:
        """What the discriminator conditions on: the class where the real images have labels,
        else nothing (real images come without prompts)."""
        if self.gan is None or self.gan.real.labels is None:
            return self.sampler.uncond(n).to(self.acc.device)
        return cond.to(self.acc.device)

    def _student_named(self) -> dict[str, Tensor]:
        state = self.roles.student_state()
        params = self.roles.student_parameters()
        return dict(zip(state.keys(), params)) if len(state) == len(params) else {str(i): p for i, p in enumerate(params)}

    def _regression_pairs(self) -> ODEPairs:
        """The teacher's DDIM outputs on fixed noises (vsd.regression_*), made once per run."""
        v = self.config.vsd

        def teacher(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
            with self.acc.autocast():
                return self.roles.predict("teacher", x, t, cond).float()

        log.info("making %d regression pairs with the teacher (%d DDIM steps)", v.regression_pairs, v.regression_steps)
        return make_ode_pairs(teacher, self.sampler, v.regression_pairs, self.teacher.sample_shape, self.teacher.scheduler_config, v.regression_steps, v.teacher_cfg, self.config.train.seed, self.acc.device)

    # -- one training step ------------------------------------------------------------------
    def _randn(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.gen).to(self.acc.device)

    def _cfg_eps(self, role: str, x_t: Tensor, t: Tensor, cond: Cond, scale: float) -> Tensor:
        b = x_t.shape[0]
        ab = abar_at(self.alphas, t, x_t.ndim)
        if scale == 1.0:
            pred = self.roles.predict(role, x_t, t, cond)
            return eps_from_prediction(pred.float(), x_t.float(), ab, self.teacher.prediction_type)
        both = cond.cat(self.sampler.uncond(b).to(self.acc.device))
        pred = self.roles.predict(role, torch.cat((x_t, x_t)), torch.cat((t, t)), both).float()
        eps = eps_from_prediction(pred, torch.cat((x_t, x_t)).float(), torch.cat((ab, ab)), self.teacher.prediction_type)
        return cfg(eps[b:], eps[:b], scale)

    def generate(self, noise: Tensor, cond: Cond) -> Tensor:
        """One-step student samples x0_hat from pure noise (with grad when enabled)."""
        return one_step_x0(lambda x, t: self.roles.predict("student", x, t, cond), noise, self.alphas, self.teacher.prediction_type, self.config.vsd.generator_timestep)

    def _reduce_grads(self, params: list[nn.Parameter]) -> None:
        if self.acc.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = self.acc.reduce(p.grad, reduction="mean")

    def _clip(self, params: list[nn.Parameter]) -> float:
        clip = self.config.optim.grad_clip
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        if clip:
            return float(self.acc.clip_grad_norm_(params, clip))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def train_step(self) -> dict[str, float]:
        """One student update then one (or more) fake-score updates; returns metrics."""
        c, v = self.config, self.config.vsd
        b, accum = c.train.batch_size, c.train.grad_accum
        shape = (b, *self.teacher.sample_shape)
        x0s, conds, s_losses, r_losses, g_losses, vsd_norms = [], [], [], [], [], []
        gan_features: list[Tensor] = []  # the student samples' features, reused by the discriminator
        real_features: list[Tensor] = []  # the discriminator's real branch, run beside them
        shared: list[tuple[Tensor, Tensor, Tensor]] = []  # fake.reuse_vsd_forward: (pred, noise, abar)
        s_params = self.roles.student_parameters()
        self.opt_s.zero_grad(set_to_none=True)
        for _ in range(accum):
            cond = self.sampler.sample(b, self.gen).to(self.acc.device)
            z = self._randn(shape)
            z_all, cond_all = z, cond
            if self.pairs is not None:  # one student forward over fresh noise + pair noise
                z_r, cond_r, target_r = self.pairs.batch(torch.randint(len(self.pairs), (b,), generator=self.gen))
                z_all, cond_all = torch.cat((z, z_r)), cond.cat(cond_r)
            # The fake score runs up to three times below with the same angles: each LoRaD
            # layer rotates its weight once (the scope ends before the backward frees it).
            with rotation_cache(self.teacher.backbone):
                with self.acc.autocast():
                    x0_all = self.generate(z_all, cond_all).float()
                    x0_hat = x0_all[:b]
                    t = sample_timesteps(b, v.t_min, v.t_max, generator=self.gen).to(self.acc.device)
                    vsd_noise = self._randn(shape)
                    ab = abar_at(self.alphas, t, len(shape))
                    x_t = add_noise(x0_hat.detach(), vsd_noise, ab)
                    with torch.no_grad():
                        eps_t = self._cfg_eps("teacher", x_t, t, cond, v.teacher_cfg)
                        if not c.fake.reuse_vsd_forward:
                            eps_f = self._cfg_eps("fake", x_t, t, cond, v.fake_cfg)
                    if c.fake.reuse_vsd_forward:  # one fake forward, with grad, for VSD and the update
                        pred_f = self.roles.predict("fake", x_t, t, cond).float()
                        eps_f = eps_from_prediction(pred_f.detach(), x_t.float(), ab, self.teacher.prediction_type)
                        shared.append((pred_f, vsd_noise, ab))
                loss, diag = vsd_student_loss(x0_hat, eps_t, eps_f, ab, v.weighting, vsd_noise)
                s_losses.append(float(loss.detach()))
                if self.pairs is not None:
                    loss_r, _ = regression_loss(x0_all[b:], target_r)
                    loss = loss + v.regression_weight * loss_r
                    r_losses.append(float(loss_r.detach()))
                if self.gan is not None:
                    gan_features.append(self._gan_features(x0_hat, self._gan_cond(cond, b)))
                    loss_g = generator_loss(self.gan.head(gan_features[-1]))
                    loss = loss + v.gan_weight * loss_g
                    g_losses.append(float(loss_g.detach()))
                    real_features.append(self._real_features(b))
            self.roles.activate("student")  # backward may recompute checkpointed student blocks
            # With the adversarial term the loss also reaches the fake score: `inputs` keeps its
            # weight gradients out of this backward, and the graph stays for the discriminator.
            self.acc.backward(loss / accum, **({"inputs": s_params, "retain_graph": True} if self.gan else {}))
            vsd_norms.append(float(diag.get("grad_norm", math.nan)))
            x0s.append(x0_hat.detach())
            conds.append(cond)
        self._reduce_grads(s_params)
        gn_s = self._clip(s_params)
        f_losses, d_losses, gn_f = [], [], 0.0
        f_params = self._fake_parameters()
        finite = all(math.isfinite(x) for x in s_losses + r_losses + g_losses) and math.isfinite(gn_s)
        if finite:
            self.opt_s.step()
            self.sched_s.step()
        elif self.acc.scaler is not None:
            # fp16: the grad scaler skips an overflowing step itself, then lowers its scale; its
            # step()/update() must run, or the next unscale_ fails ("already been called")
            self.opt_s.step()
        for k in range(c.fake.steps_per_student_step):
            self.opt_f.zero_grad(set_to_none=True)
            for i, (x0, cond) in enumerate(zip(x0s, conds)):
                if k == 0 and shared:
                    pred, noise, ab = shared[i]
                else:
                    drop = torch.rand(b, generator=self.gen).to(self.acc.device) < c.fake.uncond_dropout
                    cond_d = cond.where(drop, self.sampler.uncond(b).to(self.acc.device))
                    t = sample_timesteps(b, v.fake_t_min, v.fake_t_max, generator=self.gen).to(self.acc.device)
                    noise = self._randn(shape)
                    ab = abar_at(self.alphas, t, len(shape))
                    with self.acc.autocast():
                        pred = self.roles.predict("fake", add_noise(x0, noise, ab), t, cond_d)
                loss_f, _ = denoising_loss(pred.float(), x0, noise, ab, self.teacher.prediction_type)
                f_losses.append(float(loss_f.detach()))  # the denoising loss alone, comparable across runs
                if self.gan is not None:
                    # The first update reads the features computed beside the student's (the fake
                    # score unchanged since, the same student samples); later ones run new forwards.
                    real_f, fake_f = (real_features[i], gan_features[i]) if k == 0 else (self._real_features(b), self._gan_features(x0, self._gan_cond(cond, b)))
                    loss_d = discriminator_loss(self.gan.head(real_f), self.gan.head(fake_f))
                    loss_f = loss_f + v.gan_d_weight * loss_d
                    d_losses.append(float(loss_d.detach()))
                self.roles.activate("fake")  # checkpointed blocks recompute with the fake adapter
                self.acc.backward(loss_f / accum, **({"inputs": f_params} if self.gan or shared else {}))
            self._reduce_grads(f_params)
            gn_f = self._clip(f_params)
            f_ok = all(math.isfinite(x) for x in f_losses + d_losses) and math.isfinite(gn_f)
            finite = finite and f_ok
            if f_ok:
                self.opt_f.step()
                self.sched_f.step()
            elif self.acc.scaler is not None:  # as for the student: let the scaler skip and back off
                self.opt_f.step()
        if finite and self.ema is not None:
            self.ema.update(self._student_named())
        self.step += 1
        return {
            "loss_student": sum(s_losses) / len(s_losses), "loss_regression": sum(r_losses) / len(r_losses) if r_losses else math.nan, "loss_fake": sum(f_losses) / max(len(f_losses), 1),
            "loss_gan_generator": sum(g_losses) / len(g_losses) if g_losses else math.nan, "loss_gan_discriminator": sum(d_losses) / len(d_losses) if d_losses else math.nan,
            "grad_norm_student": gn_s, "grad_norm_fake": gn_f, "vsd_grad_norm": sum(vsd_norms) / len(vsd_norms),
            "lr_student": self.sched_s.get_last_lr()[0], "lr_fake": self.sched_f.get_last_lr()[0],
            **self.theta_stats(), "finite": float(finite),
        }

    def theta_stats(self) -> dict[str, float]:
        """Mean and max |Theta| of the student's LoRaD angles (NaN for other methods)."""
        from wadi_train.lorad import lorad_layers

        if self.roles.method != "lorad":
            return {"theta_abs_mean": math.nan, "theta_abs_max": math.nan}
        total, count, peak = 0.0, 0, 0.0
        with torch.no_grad():
            for _, layer in lorad_layers(self.teacher.backbone):
                if "student" in layer.theta_a:
                    th = (layer.theta_a["student"].float() @ layer.theta_b["student"].float()).abs()
                    total += float(th.sum())
                    count += th.numel()
                    peak = max(peak, float(th.max()))
        return {"theta_abs_mean": total / max(count, 1), "theta_abs_max": peak}

    # -- state ------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint (main process writes; every rank's RNG state is kept for exact resume)."""
        rng = capture_rng({"train": self.gen})
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            ranks = gather_object([rng])
        else:
            ranks = [rng]
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        tensors = {"student": self.roles.student_state(), "fake": self.roles.fake_state()}
        if self.ema is not None:
            tensors["ema"] = {k: v for k, v in self.ema.state_dict()["shadow"].items()}
        if self.gan is not None:
            tensors["discriminator"] = {k: v.detach().clone() for k, v in self.gan.head.state_dict().items()}
        return save_checkpoint(
            self.run_dir, self.step, tensors=tensors,
            optimizers={"student": self.opt_s.state_dict(), "fake": self.opt_f.state_dict()},
            schedulers={"student": self.sched_s.state_dict(), "fake": self.sched_f.state_dict()},
            rng={"ranks": ranks},
            extra={"nonfinite_total": self.nonfinite_total, "ema_updates": self.ema.state_dict()["num_updates"] if self.ema else 0, "provenance": self.provenance},
            config=to_dict(self.config), keep=self.config.train.keep_checkpoints,
        )

    def load(self, path: Path) -> None:
        ck = load_checkpoint(path)
        self.roles.load_states(ck.tensors["student"], ck.tensors["fake"])
        if self.gan is not None:
            self.gan.head.load_state_dict(ck.tensors["discriminator"])
        self.opt_s.load_state_dict(ck.optimizers["student"])
        self.opt_f.load_state_dict(ck.optimizers["fake"])
        self.sched_s.load_state_dict(ck.schedulers["student"])
        self.sched_f.load_state_dict(ck.schedulers["fake"])
        ranks = ck.rng["ranks"]
        if len(ranks) != self.acc.num_processes:
            log.warning("checkpoint from %d processes resumed on %d: random streams differ from an uninterrupted run", len(ranks), self.acc.num_processes)
        restore_rng(ranks[min(self.acc.process_index, len(ranks) - 1)], {"train": self.gen})
        if self.ema is not None and "ema" in ck.tensors:
            self.ema.load_state_dict({"shadow": ck.tensors["ema"], "num_updates": int(ck.extra.get("ema_updates", 0))})
        self.step = ck.step
        self.nonfinite_total = int(ck.extra.get("nonfinite_total", 0))


def _write_run_files(config: RunConfig, run_dir: Path) -> None:
    import diffusers

    from wadi_train import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    prov = {"version": __version__, "command": sys.argv, "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__, "git": _git_hash()}
    (run_dir / "provenance.json").write_text(json.dumps(prov, indent=2))


def _git_hash() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _trim_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (a crash between log and save)."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = [r for r in rows if int(r["step"]) <= step]
    if len(kept) != len(rows):
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRICS)
            w.writeheader()
            w.writerows(kept)


def _append_metrics(path: Path, row: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=METRICS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def _tensorboard(run_dir: Path) -> Any:
    """A SummaryWriter when tensorboard is installed (CSV is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(config: RunConfig, resume: bool = False, progress: Callable[[int, int, dict[str, float]], None] | None = None, stop_after: int | None = None, on_step: Callable[[Distiller], None] | None = None) -> TrainResult:
    """Run (or resume) a distillation; returns where it wrote and the last metrics.

    Args:
        config: the validated run config.
        resume: continue from the run folder's latest checkpoint (bit-exact).
        progress: called as progress(step, total, metrics) after each step.
        stop_after: stop (and checkpoint) after this many steps of this call (tests, time limits).
        on_step: called with the Distiller after each step, on every process (tests, hooks).
    """
    from accelerate import Accelerator

    problems = validate(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    device = config.train.device
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a process may run several trainings (tests, the demo)
    acc = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available(), mixed_precision=config.train.mixed_precision)
    run_dir = run_dir_of(config)
    if run_dir.exists() and latest_checkpoint(run_dir) is not None and not resume:
        raise ConfigError(f"{run_dir}: holds a run already; pass --resume to continue it or choose another output_dir")
    if acc.is_main_process:
        _write_run_files(config, run_dir)
    d = Distiller(config, acc, run_dir)
    if resume:
        ck = latest_checkpoint(run_dir)
        if ck is None:
            raise ConfigError(f"{run_dir}: no checkpoint to resume from")
        d.load(ck)
        log.info("resumed from %s at step %d", ck, d.step)
        if acc.is_main_process:
            _trim_metrics(run_dir / "metrics.csv", d.step)
    total = config.train.steps
    consecutive = 0
    tb = _tensorboard(run_dir) if acc.is_main_process else None
    last: dict[str, float] = {}
    start = time.perf_counter()
    done_here = 0
    while d.step < total:
        m = d.train_step()
        done_here += 1
        if not m.pop("finite"):
            consecutive += 1
            d.nonfinite_total += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", d.step, consecutive)
            if consecutive >= config.train.max_nonfinite_steps:
                raise TrainingError(f"{consecutive} consecutive non-finite steps at step {d.step}; stopped without writing NaN weights. The last good checkpoint is in {run_dir / 'checkpoints'}; lower optim.student_lr / optim.fake_lr or check the teacher")
        else:
            consecutive = 0
        last = {"step": d.step, **m, "nonfinite_skipped": d.nonfinite_total, "seconds": round(time.perf_counter() - start, 3)}
        if acc.is_main_process and (d.step % config.train.log_every == 0 or d.step == total):
            _append_metrics(run_dir / "metrics.csv", last)
            if tb is not None:
                for key, value in last.items():
                    if key != "step" and math.isfinite(value):
                        tb.add_scalar(key, value, d.step)
        if config.train.sample_every and d.step % config.train.sample_every == 0 and acc.is_main_process:
            from wadi_train.generate import write_student_samples

            write_student_samples(d, run_dir / "samples" / f"step-{d.step:06d}.png")
        if d.step % config.train.checkpoint_every == 0 or d.step == total or (stop_after is not None and done_here >= stop_after):
            d.save()
        if progress is not None:
            progress(d.step, total, last)
        if on_step is not None:
            on_step(d)
        if stop_after is not None and done_here >= stop_after:
            break
    if tb is not None:
        tb.close()
    acc.wait_for_everyone()
    return TrainResult(run_dir, d.step, last, d.nonfinite_total)
