"""The main job: digits end to end, teacher -> analysis -> one-step students -> evaluation.

1. sklearn's digits at native 8x8 (the 2-core budget: 0.16 s per teacher step at 8x8 vs 1 s
   at 16x16), fixed stratified split; 2. a DDPM teacher (cached); 3. a reference one-step
   student by full fine-tuning VSD, and `weightlens compare teacher reference` with a 10 %
   budget -> ranks.json; 4. students with VSD: LoRaD at the fitted ranks, LoRaD at a uniform
   rank, PEFT LoRA at a uniform rank (both at the fitted budget) and full fine-tuning; 5. FID
   in a digits classifier's feature space and class accuracy for each student (1 step) and
   the teacher (DDIM 1/4/50 steps), plus time per image; 6. reports under `out/`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wadi_train.config import BLOCK_LINEARS
from wadi_train.demo.settings import DemoSettings
from wadi_train.demo.teacher import NUM_CLASSES, SCHEDULE, digits_unet_config, load_or_train_teacher
from wadi_train.demo.runs import Runs, default_workers
from wadi_train.evaluation.digits import DigitsSplit, evaluate_samples, load_digits_split, load_or_train_classifier, reference_stats
from wadi_train.generate import load_class_generator, save_grid
from wadi_train.models import Cond, denoise
from wadi_train.one_step import one_step_x0
from wadi_train.sampling import ddim_sample

__all__ = ["Stage", "ModelResult", "run_digits_demo"]

log = logging.getLogger(__name__)
Stage = Callable[[str, int, int, str], None]  # (stage, done, total, note)


@dataclass(frozen=True)
class ModelResult:
    """One row of the results table."""

    name: str
    kind: str  # teacher | student
    steps: int  # sampling steps
    fid: float
    accuracy: float
    ms_per_image: float
    trainable_params: int | None = None
    train_seconds: float | None = None


def _run_config(out: Path, teacher_w: Path, s: DemoSettings, name: str, adapter: dict[str, Any], steps: int, lr: float, real_images: Path | None = None) -> dict[str, Any]:
    fake: dict[str, Any] = {"rank": s.fake_rank, "steps_per_student_step": s.fake_steps, "reuse_vsd_forward": s.reuse_fake_forward}
    if s.fake_include_conv:
        fake.update(include_conv=True, target_modules=BLOCK_LINEARS)
    vsd: dict[str, Any] = {"teacher_cfg": s.guidance, "fake_cfg": s.fake_guidance, "generator_timestep": s.generator_timestep}
    data: dict[str, Any] = {}
    if s.gan_weight > 0:
        if real_images is None:
            raise ValueError("gan_weight > 0 needs the real images file")
        vsd.update(gan_weight=s.gan_weight, gan_d_weight=s.gan_d_weight, gan_t_max=s.gan_t_max)
        data["real_images"] = str(real_images)
    return {
        "name": name, "output_dir": str(out / "runs" / name),
        "model": {"config": digits_unet_config(s.teacher.size, s.teacher.width), "weights": str(teacher_w), "num_classes": NUM_CLASSES, "scheduler": SCHEDULE},
        "adapter": adapter,
        "fake": fake,
        "vsd": vsd,
        "data": data,
        "optim": {"student_lr": lr, "fake_lr": s.lora_fake_lr if adapter["method"] == "lora" else s.fake_lr, "warmup_steps": s.warmup_steps},
        "train": {"steps": steps, "batch_size": s.batch_size, "checkpoint_every": steps, "log_every": max(1, steps // 100), "ema_decay": s.ema_decay, "seed": s.seed, "device": "cpu"},
    }


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


@torch.no_grad()
def _one_step_samples(x0: Callable[[torch.Tensor, Cond], torch.Tensor], n: int, seed: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, float]:
    """n one-step samples x0(noise, cond), classes in turn, and the milliseconds per image."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=gen)
    cond = Cond(class_labels=_labels(n))
    start = time.perf_counter()
    x = x0(noise, cond)
    return x.clamp(-1, 1), (time.perf_counter() - start) * 1000 / n


@torch.no_grad()
def _teacher_samples(model: nn.Module, sched_cfg: dict[str, Any], n: int, steps: int, s: DemoSettings, shape: tuple[int, int, int]) -> tuple[torch.Tensor, float]:
    gen = torch.Generator().manual_seed(s.seed + 7)
    noise = torch.randn((n, *shape), generator=gen)
    cond, uncond = Cond(class_labels=_labels(n)), Cond(class_labels=torch.full((n,), NUM_CLASSES))
    start = time.perf_counter()
    x = ddim_sample(model, "unet2d_condition", noise, cond, uncond, sched_cfg, steps, s.guidance)
    return x.clamp(-1, 1), (time.perf_counter() - start) * 1000 / n


def run_digits_demo(out: Path, cache: Path, s: DemoSettings, retrain: bool = False, stage: Stage | None = None) -> dict[str, Any]:
    """Run the whole pipeline; writes everything under `out` and returns results.json's content."""
    from diffusers import DDPMScheduler

    stage = stage or (lambda *a: None)
    reused: list[str] = []  # runs trained by an earlier invocation with the same config
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    split = load_digits_split(size=s.teacher.size, seed=s.seed)
    teacher_w, tinfo = load_or_train_teacher(cache, split.x_train, split.y_train, s.teacher, retrain, progress=lambda i, n, loss: stage("teacher", i, n, f"loss {loss:.4f}"))
    stage("classifier", 0, 1, "")
    clf = load_or_train_classifier(cache, split, s.teacher.size)
    ref = reference_stats(clf, split)
    stage("classifier", 1, 1, "")
    shape = (1, s.teacher.size, s.teacher.size)
    sched = DDPMScheduler(num_train_timesteps=1000, **SCHEDULE)
    alphas = sched.alphas_cumprod.float()

    real = _real_images(cache, split) if s.gan_weight > 0 else None
    with Runs(s.workers or default_workers(), stage, reused) as runs:
        results, grids, analysis, uniform = _students(runs, out, teacher_w, s, clf, ref, shape, real)

    # 5. the teacher at several DDIM step counts, and where every student starts (cached)
    teacher_rows, teacher_grids = _teacher_results(cache, teacher_w, s, clf, ref, alphas, dict(sched.config), shape, stage)
    results += teacher_rows
    for name, png in teacher_grids.items():
        shutil.copyfile(png, out / "grids" / f"{name}.png")
        grids[name] = f"grids/{name}.png"

    doc = {
        "settings": _jsonable(asdict(s)), "teacher": tinfo, "budget_params": analysis.ranks.trainable_params,
        "backbone_params": analysis.backbone_params, "uniform_ranks": uniform,
        "reference_analysis": {"dir_to_norm_ratio": analysis.summary.dir_to_norm_ratio, "norm_rel_mean": analysis.summary.norm_rel_mean, "dir_mean": analysis.summary.dir_mean},
        "results": [asdict(r) for r in results], "grids": grids, "seconds": round(time.perf_counter() - start, 1), "reused_runs": reused,
    }
    (out / "results.json").write_text(json.dumps(_jsonable(doc), indent=2))
    from wadi_train.demo.report import write_demo_report

    write_demo_report(out, doc)
    return doc


def _real_images(cache: Path, split: DigitsSplit) -> Path:
    """The training split as the adversarial term's real images (data.real_images)."""
    from safetensors.torch import save_file

    path = cache / f"digits-train-{split.x_train.shape[-1]}px.safetensors"
    save_file({"images": split.x_train.contiguous(), "class_labels": split.y_train.contiguous()}, path)
    return path


def _students(runs: Runs, out: Path, teacher_w: Path, s: DemoSettings, clf: nn.Module, ref: Any, shape: tuple[int, int, int], real: Path | None) -> tuple[list[ModelResult], dict[str, str], Any, dict[str, int]]:
    """Steps 3 and 4: the reference, its analysis, and every student trained and evaluated.

    Full fine-tuning needs nothing from the analysis, so it trains beside the reference; the
    others start when the analysis has fixed their ranks. Returns the students' rows and grids,
    the reference analysis and the uniform ranks.
    """
    import weightlens
    from weightlens.output import write_analysis

    # 3. reference student and its weightlens analysis -> fitted ranks under the budget
    full = {"method": "full"}
    runs.submit("reference", _run_config(out, teacher_w, s, "reference-full", full, s.reference_steps, s.full_lr, real))
    if "full" in s.methods:
        runs.submit("full", _run_config(out, teacher_w, s, "full", full, s.student_steps, s.full_lr, real))
    ref_export, _ = runs.result("reference")
    analysis_dir = out / "weightlens" / "reference-full"
    analysis = weightlens.compare(teacher_w, ref_export / "model", weightlens.CompareOptions(budget=s.budget, timestamps=False))
    write_analysis(analysis, analysis_dir, overwrite=True, timestamp=False)
    ranks_file = analysis_dir / "ranks.json"
    budget = analysis.ranks.trainable_params
    uniform = _uniform_ranks(teacher_w, s, budget)

    # 4. students, same seed / steps / data
    adapters = {
        "lorad_fitted": ({"method": "lorad", "ranks_file": str(ranks_file)}, s.student_lr),
        "lorad_uniform": ({"method": "lorad", "rank": uniform["lorad"]}, s.student_lr),
        "lora": ({"method": "lora", "rank": uniform["lora"]}, s.lora_lr),
    }
    # Submitted in this order, two workers pack the runs: the reference's worker takes the fitted
    # student, full fine-tuning's worker LoRA (the slowest step) once free, and the uniform
    # student whichever worker frees first. (Fitted, uniform, LoRA left one worker idle for the
    # last LoRA run: 10.8 minutes.) Full fine-tuning is already training.
    for name in sorted(set(s.methods) & set(adapters), key=("lorad_fitted", "lora", "lorad_uniform").index):
        adapter, lr = adapters[name]
        runs.submit(name, _run_config(out, teacher_w, s, name, adapter, s.student_steps, lr, real))
    results: list[ModelResult] = []
    grids: dict[str, str] = {}
    generators = {}
    (out / "grids").mkdir(exist_ok=True)
    for name in s.methods:
        export, seconds = runs.result(name)
        runs.stage("evaluate", 0, 1, name)
        generators[name] = x0 = load_class_generator(export)[0]  # as a user gets it: the export and its record
        x, _ = _one_step_samples(x0, s.eval_samples, s.seed + 1, shape)
        m = evaluate_samples(clf, x, _labels(len(x)), ref)
        params = _trainable(out / "runs" / name)
        results.append(ModelResult(name, "student", 1, m.fid, m.accuracy, math.nan, params, round(seconds, 1)))
        grids[name] = str(save_grid(x[:100], out / "grids" / f"{name}.png", nrow=10).relative_to(out))
        a = weightlens.compare(teacher_w, export / "model", weightlens.CompareOptions(budget=s.budget, timestamps=False))
        write_analysis(a, out / "weightlens" / name, overwrite=True, timestamp=False)
    # Time per image once every run has finished: the samples above were drawn while other
    # runs trained on the same cores.
    for i, r in enumerate(results):
        results[i] = replace(r, ms_per_image=_one_step_samples(generators[r.name], min(s.eval_samples, 500), s.seed + 2, shape)[1])
    return results, grids, analysis, uniform


def _teacher_results(cache: Path, teacher_w: Path, s: DemoSettings, clf: nn.Module, ref: Any, alphas: torch.Tensor, sched_cfg: dict[str, Any], shape: tuple[int, int, int], stage: Stage) -> tuple[list[ModelResult], dict[str, Path]]:
    """Rows and grid PNGs of the teacher at `s.teacher_steps` DDIM steps and of `student_init`
    (the teacher's unguided one-step output at the generator timestep, where every student starts).

    They depend only on the teacher's weights, the classifier and the evaluation settings, so
    they are cached next to the teacher (a rerun spends its time on the students) under a key
    of all three; a changed teacher or setting evaluates again.
    """
    import hashlib

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    def digest(path: Path) -> str | None:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None

    settings = {"teacher": digest(teacher_w), "classifier": digest(cache / f"classifier-{s.teacher.size}px.safetensors"), "samples": s.eval_samples, "steps": list(s.teacher_steps), "guidance": s.guidance, "generator_timestep": s.generator_timestep, "seed": s.seed, "version": 1}
    folder = cache / f"teacher-eval-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]}"
    names = ["student_init", *(f"teacher_ddim{n}" for n in s.teacher_steps)]
    pngs = {n: folder / f"{n}.png" for n in names}
    done = folder / "results.json"
    if done.is_file() and all(p.is_file() for p in pngs.values()):
        return [ModelResult(**r) for r in json.loads(done.read_text())["rows"]], pngs
    folder.mkdir(parents=True, exist_ok=True)
    teacher = UNet2DConditionModel.from_config(digits_unet_config(s.teacher.size, s.teacher.width))
    teacher.load_state_dict(load_file(teacher_w))
    teacher.eval()
    rows = []
    stage("evaluate", 0, 1, "students at init")
    x, ms = _one_step_samples(lambda z, c: one_step_x0(lambda x, t: denoise(teacher, "unet2d_condition", x, t, c), z, alphas, "epsilon", s.generator_timestep), s.eval_samples, s.seed + 1, shape)
    m = evaluate_samples(clf, x, _labels(len(x)), ref)
    rows.append(ModelResult("student_init", "teacher", 1, m.fid, m.accuracy, ms))
    save_grid(x[:100], pngs["student_init"], nrow=10)
    for steps in s.teacher_steps:
        stage("evaluate", 0, 1, f"teacher {steps} steps")
        x, ms = _teacher_samples(teacher, sched_cfg, s.eval_samples, steps, s, shape)
        m = evaluate_samples(clf, x, _labels(len(x)), ref)
        rows.append(ModelResult(f"teacher_ddim{steps}", "teacher", steps, m.fid, m.accuracy, ms))
        save_grid(x[:100], pngs[f"teacher_ddim{steps}"], nrow=10)
    done.write_text(json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=2))
    return rows, pngs


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _trainable(run: Path) -> int | None:
    from wadi_train.checkpoint import latest_checkpoint, load_checkpoint

    ck = latest_checkpoint(run)
    if ck is None:
        return None
    return sum(v.numel() for v in load_checkpoint(ck).tensors["student"].values())


def _uniform_ranks(teacher_w: Path, s: DemoSettings, budget: int) -> dict[str, int]:
    """Uniform LoRaD and LoRA ranks over the block Linears that spend about `budget`."""
    from diffusers import UNet2DConditionModel

    import re

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(digits_unet_config(s.teacher.size, s.teacher.width))
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(BLOCK_LINEARS, n)]
    lorad_unit = sum(m.out_features + m.in_features // 2 for m in linears)
    lora_unit = sum(m.out_features + m.in_features for m in linears)
    return {"lorad": max(1, round(budget / lorad_unit)), "lora": max(1, round(budget / lora_unit))}
