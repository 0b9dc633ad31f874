"""GPU check: the SD1.5-sized paths of weightlens and wadi_train on one CUDA GPU, in < 5 minutes.

Nothing downloads: every model is random weights built from config. Stages:
  1. weightlens: full `compare` (statistics, Theta and residual spectra, rank fit) of the
     SD1.5-sized teacher/student pair that bench/compare_sd15.py generates (and caches under
     --data), maths on --device. Target: <= 5 s for compare() itself, with the files in the page
     cache and CUDA initialised (the load this excludes).
  2. VSD: --steps steps of LoRaD + VSD with configs/sd15.yaml (rank 256, fake rank 32, CFG 1.5,
     gradient checkpointing, EMA) on a random SD1.5 pipeline (U-Net, VAE, CLIP text encoder from
     `wadi_train.random_pipeline`, prompts through the text encoder), 512 px, batch 4, once per
     --precisions entry: median step time, peak torch.cuda.max_memory_allocated, finite losses.
  3. LoRaD vs PEFT LoRA at equal parameter count, one training step of the SD1.5 U-Net at
     64x64 latents (bench/lorad_step.py's `measure`). Target: ratio <= 1.2.
  4. export of the last VSD run (merged student in a pipeline folder) and `generate --prompt`
     at the training size and at twice it (high resolution): finite images of the right shape.

Correctness checks (finite losses and images, shapes, nothing raised) decide the exit code
(0 all passed, 1 otherwise; 2: no CUDA); timing targets are reported as PASS/MISS only.
`--device cpu --tiny` runs every stage at toy size (the pytest of this script does).

    bash bench/gpu_check.sh [--data /tmp/wadi-gpu-check] [--steps 20] [--json out.json]
    bash bench/gpu_check.sh --device cpu --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))  # compare_sd15, lorad_step: reused, not copied

BUDGET_S = 300.0
COMPARE_TARGET_S = 5.0
LORAD_LORA_TARGET = 1.2
PROMPTS = ["a photo of a cat on a sofa", "a red bicycle leaning on a brick wall", "an astronaut riding a horse", "a bowl of fruit, oil painting"]


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the check (full = SD1.5, tiny = the CPU smoke test)."""

    preset: str  # wadi_train.random_pipeline preset
    pair_scale: float  # bench/compare_sd15.py width factor
    lorad_rank: int
    fake_rank: int
    lora_bench_rank: int
    lora_bench_steps: int


FULL = Scale("sd15", 1.0, 256, 32, 256, 5)
TINY = Scale("tiny", 0.05, 8, 4, 4, 2)


@dataclass
class Report:
    """Lines to print and the checks' outcomes."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (verdict, name, detail)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append(("PASS" if ok else "FAIL", name, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    def target(self, name: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if ok is None else "PASS" if ok else "MISS"
        self.rows.append((verdict, name, detail))
        print(f"{verdict:<4}  {name}: {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(v == "FAIL" for v, _, _ in self.rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke test of every stage)")
    p.add_argument("--data", type=Path, default=Path("/tmp/wadi-gpu-check"), help="work folder; the weightlens pair is cached there")
    p.add_argument("--steps", type=int, default=None, help="VSD steps per precision (default 20; --tiny 3)")
    p.add_argument("--batch", type=int, default=4, help="VSD batch size")
    p.add_argument("--precisions", default="fp16,bf16", help="mixed precisions of the VSD runs (on CPU fp16 runs as 'no')")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: weightlens,vsd,lora,generate")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def require_device(device: str) -> None:
    """Fail fast, in one line, when a CUDA device is asked for and torch has none."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_check: --device {device} but torch {torch.__version__} ({build}) sees no CUDA GPU; run it on a CUDA machine with a CUDA torch, or pass `--device cpu --tiny` to test the script path", file=sys.stderr)
        sys.exit(2)
    torch.zeros(1, device=device)  # create the CUDA context outside every timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None


def fmt_gib(value: float | None) -> str:
    return "n/a on CPU" if value is None else f"{value:.2f} GiB"


# ---------------------------------------------------------------------------- stages


def stage_weightlens(args: argparse.Namespace, scale: Scale, rep: Report) -> None:
    import compare_sd15

    from weightlens import CompareOptions, compare

    t0 = time.perf_counter()
    teacher, student = compare_sd15.pair_paths(args.data / "weightlens", scale.pair_scale)
    teacher.parent.mkdir(parents=True, exist_ok=True)
    if not teacher.is_file():  # in this process (compare_sd15 uses subprocesses to measure memory; no need here)
        compare_sd15.make_teacher(teacher, scale.pair_scale, seed=0)
    if not student.is_file():
        compare_sd15.make_student(teacher, student, rank=4, seed=0)
    made = time.perf_counter() - t0
    compare_sd15.warm_cache(teacher, student)
    sync(args.device)
    t0 = time.perf_counter()
    a = compare(teacher, student, CompareOptions(device=args.device, timestamps=False))
    sync(args.device)
    seconds = time.perf_counter() - t0
    size = teacher.stat().st_size / 1e9
    rep.figures["weightlens"] = {"compare_s": seconds, "pair_s": made, "layers": len(a.layers), "gb_per_file": size, "dir_to_norm_ratio": a.summary.dir_to_norm_ratio}
    finite = math.isfinite(a.summary.dir_to_norm_ratio) and len(a.layers) > 0 and len(a.ranks.rank_pattern) > 0
    rep.check("weightlens compare", finite, f"{len(a.layers)} layers, {len(a.ranks.rank_pattern)} ranks fitted, dir/norm {a.summary.dir_to_norm_ratio:.1f}x ({size:.2f} GB per file; pair ready in {made:.0f} s)")
    full = scale is FULL and args.device.startswith("cuda")
    rep.target(f"weightlens compare <= {COMPARE_TARGET_S:g} s", seconds <= COMPARE_TARGET_S if full else None, f"{seconds:.2f} s on {args.device}" + ("" if full else " (judged only at full size on CUDA)"))


def build_pipeline(args: argparse.Namespace, scale: Scale) -> Path:
    """The random SD pipeline folder the VSD runs start from (built once per --data)."""
    from wadi_train.random_pipeline import random_sd_pipeline

    folder = args.data / f"pipeline-{scale.preset}"
    if not (folder / "model_index.json").is_file():
        t0 = time.perf_counter()
        random_sd_pipeline(scale.preset, seed=0, device=args.device).to("cpu").save_pretrained(folder)
        print(f"  built a random {scale.preset} pipeline in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    return folder


def vsd_config(args: argparse.Namespace, scale: Scale, pipeline: Path, precision: str, steps: int) -> Any:
    from wadi_train.config import load_config

    prompts = args.data / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    overrides = [
        f"model.pretrained={pipeline}", f"data.prompts={prompts}", f"output_dir={args.data / 'runs' / precision}",
        f"train.steps={steps}", f"train.batch_size={args.batch}", f"train.mixed_precision='{precision}'",
        f"train.checkpoint_every={steps}", "train.log_every=1", f"train.device={args.device}",
        f"adapter.rank={scale.lorad_rank}", f"fake.rank={scale.fake_rank}",
    ]
    return load_config(REPO / "configs" / "sd15.yaml", overrides)


def precisions(args: argparse.Namespace) -> list[str]:
    """--precisions, with fp16 replaced by fp32 ('no') off CUDA (fp16 autocast needs a GPU)."""
    names = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not args.device.startswith("cuda") and "fp16" in names:
        print("  fp16 autocast needs a GPU: on CPU that run is fp32 ('no')", flush=True)
        names = ["no" if p == "fp16" else p for p in names]
    return names


def stage_vsd(args: argparse.Namespace, scale: Scale, pipeline: Path, precision: str, rep: Report) -> Path:
    """`--steps` VSD steps at one mixed precision through `wadi_train.train.train`; returns the run folder."""
    import shutil

    import pandas as pd

    from wadi_train.train import train

    steps = args.steps or (3 if args.tiny else 20)
    cfg = vsd_config(args, scale, pipeline, precision, steps)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    reset_peak(args.device)
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    m = pd.read_csv(res.run_dir / "metrics.csv")
    step_s = m["seconds"].diff().dropna()  # per step; step 1 (warm-up, autotuning) left out
    median = float(step_s.median()) if len(step_s) else float(m["seconds"].iloc[0])
    peak = peak_gib(args.device)
    losses = m[["loss_student", "loss_fake"]].to_numpy()
    # Losses must be finite. Skipped updates are counted, not failed: in fp16 the grad scaler's
    # first scales can overflow the gradients (it then skips the step and backs off), as usual.
    finite = bool(len(m) == steps and math.isfinite(float(losses.sum())) and res.nonfinite_skipped < steps)
    rep.figures[f"vsd_{precision}"] = {"steps": res.steps, "median_step_s": median, "first_step_s": float(m["seconds"].iloc[0]), "wall_s": wall, "peak_gib": peak, "loss_student": m["loss_student"].tolist(), "loss_fake": m["loss_fake"].tolist()}
    rep.check(f"VSD {precision} finite", finite, f"{res.steps} steps at {cfg_px(pipeline)} px, batch {args.batch}: median {median * 1000:.0f} ms/step (first {m['seconds'].iloc[0]:.1f} s), peak {fmt_gib(peak)}, last losses student {m['loss_student'].iloc[-1]:.3g} fake {m['loss_fake'].iloc[-1]:.3g}, {res.nonfinite_skipped} update(s) skipped on inf/NaN gradients ({wall:.0f} s with loading)")
    return res.run_dir


def cfg_px(pipeline: Path) -> int:
    """Training image size of a pipeline folder: U-Net sample size x the VAE's factor."""
    unet = json.loads((pipeline / "unet" / "config.json").read_text())
    vae = json.loads((pipeline / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def stage_lora(args: argparse.Namespace, scale: Scale, rep: Report) -> None:
    import lorad_step

    reset_peak(args.device)
    autocast = "fp16" if args.device.startswith("cuda") else None
    r = lorad_step.measure(scale.lora_bench_rank, scale.lora_bench_steps, lorad_step.unet_config(scale.preset), args.device, autocast, args.batch)
    rep.figures["lorad_vs_lora"] = {**r, "peak_gib": peak_gib(args.device)}
    detail = f"LoRaD rank {r['rank']} ({r['lorad_params'] / 1e6:.2f}M) {r['lorad_s'] * 1000:.0f} ms vs LoRA ({r['lora_params'] / 1e6:.2f}M) {r['lora_s'] * 1000:.0f} ms per step, ratio {r['ratio']:.3f} (autocast {r['autocast']}, batch {args.batch})"
    rep.check("LoRaD and LoRA steps", math.isfinite(r["ratio"]) and r["ratio"] > 0, detail)
    rep.target(f"LoRaD / LoRA step time <= {LORAD_LORA_TARGET}", r["ratio"] <= LORAD_LORA_TARGET, f"{r['ratio']:.3f}")


def stage_generate(args: argparse.Namespace, run_dir: Path, rep: Report) -> None:
    from wadi_train.export import export_run
    from wadi_train.generate import generate_from_prompts

    out = args.data / "export"
    t0 = time.perf_counter()
    export_run(run_dir, out, dtype="float16" if args.device.startswith("cuda") else None, overwrite=True)
    rep.figures["export_s"] = time.perf_counter() - t0
    px = cfg_px(out)
    for size in (px, 2 * px):  # the training size, and twice it (latents beyond the U-Net's sample_size)
        reset_peak(args.device)
        t0 = time.perf_counter()
        images = generate_from_prompts(out, PROMPTS[:2], seed=0, height=size, width=size, device=args.device)
        seconds = time.perf_counter() - t0
        peak = peak_gib(args.device)
        finite = bool(torch.isfinite(images).all())
        note = ""
        if not finite and args.device.startswith("cuda"):  # random weights may overflow fp16: tell that apart from a bug
            again = generate_from_prompts(out, PROMPTS[:2], seed=0, height=size, width=size, device=args.device, dtype="float32")
            note = f"; non-finite in the export's {json.loads((out / 'wadi_export.json').read_text())['dtype']}, float32 gives {'finite' if torch.isfinite(again).all() else 'non-finite'} images"
        ok = images.shape == (2, 3, size, size) and finite and float(images.std()) > 0
        rep.figures[f"generate_{size}"] = {"seconds": seconds, "peak_gib": peak, "finite": finite}
        rep.check(f"generate --prompt {size} px", ok, f"{tuple(images.shape)}, std {float(images.std()):.3f}, {seconds:.1f} s with loading, peak {fmt_gib(peak)}{note}")


# ---------------------------------------------------------------------------- main


def run_stage(name: str, fn: Callable[[], Any], rep: Report) -> Any:
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a check script reports every stage, whatever one of them raised
        rep.check(name, False, f"raised {type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
        return None
    finally:
        rep.figures.setdefault("stage_s", {})[name] = time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_device(args.device)
    import diffusers

    scale = TINY if args.tiny else FULL
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"weightlens", "vsd", "lora", "generate"}
    if unknown:
        print(f"gpu_check: --skip {','.join(sorted(unknown))}: stages are weightlens, vsd, lora, generate", file=sys.stderr)
        return 2
    args.data.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"gpu_check: {where}, torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, sizes {scale.preset}, data {args.data}", flush=True)
    rep = Report()
    start = time.perf_counter()
    if "weightlens" not in skip:
        run_stage("weightlens", lambda: stage_weightlens(args, scale, rep), rep)
    run_dir = None
    if "vsd" not in skip:
        pipeline = run_stage("pipeline", lambda: build_pipeline(args, scale), rep)
        for precision in precisions(args) if pipeline is not None else []:  # one failing precision does not stop the next
            run_dir = run_stage(f"vsd {precision}", lambda p=precision: stage_vsd(args, scale, pipeline, p, rep), rep) or run_dir
    if "lora" not in skip:
        run_stage("lora", lambda: stage_lora(args, scale, rep), rep)
    if "generate" not in skip and run_dir is not None:
        run_stage("generate", lambda: stage_generate(args, run_dir, rep), rep)
    total = time.perf_counter() - start
    rep.figures["total_s"] = total
    print()
    rep.target(f"whole check < {BUDGET_S:.0f} s", total < BUDGET_S if scale is FULL else None, f"{total:.0f} s (stages: {', '.join(f'{k} {v:.0f} s' for k, v in rep.figures['stage_s'].items())})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rep.rows, "figures": rep.figures}, indent=2, default=str) + "\n")
    print(f"gpu_check: {'FAILED' if rep.failed else 'all checks passed'}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
