"""Benchmark `weightlens compare` on a teacher/student pair larger than RAM (not a test).

Writes two fp16 safetensors files that together exceed the machine's memory (default 26 GiB,
checked against MemTotal), streaming one tensor at a time with the project's
StreamingSafetensorsWriter in a subprocess (sampled too), so building them needs no more
memory than the largest tensor:
- the layout is a real diffusers model's, taken from a model built on the `meta` device (no
  weights allocated): `pixart` (default) is PixArt-alpha (width 1152, 16 heads) with as many
  transformer blocks as the size needs; `sdxl` is the SDXL U-Net with its block widths scaled
  up until it is big enough;
- teacher: seeded Gaussian weights (std 1/sqrt(fan_in));
- student: an exact rank-r LoRaD rotation planted in every attention/FF Linear, 1e-3 relative
  noise in every other tensor.
Then it runs the real command, `python -m weightlens compare TEACHER STUDENT -o OUT`, in a
subprocess per mode (full analysis; stats-only with `--stats-only`), sampling RssAnon and
RssFile from /proc/PID/status (sampling code from compare_sd15.py), and prints wall time,
peak RssAnon/RssFile, VmHWM and the file sizes, plus whether the full run read the plant
back. The generated files are deleted at the end, also on failure or Ctrl-C (--keep keeps
them for a rerun).

    nice -n 10 python bench/larger_than_ram.py [--total-gib 26] [--layout pixart|sdxl] [--modes stats,full]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_sd15 import CONTENDED, MIB, Sampled, run_sampled

DEFAULT_DATA = Path("/tmp/weightlens-bench-big")
GIB = 1024**3
RANK = 4
SAMPLE_ANGLE_RMS = 0.02

# diffusers' PixArt-alpha transformer (PixArt-alpha/PixArt-XL-2-512x512 transformer/config.json).
PIXART: dict[str, Any] = {
    "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4,
    "out_channels": 8, "patch_size": 2, "sample_size": 64, "cross_attention_dim": 1152,
    "caption_channels": 4096, "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000,
    "activation_fn": "gelu-approximate", "attention_bias": True, "norm_elementwise_affine": False,
    "norm_eps": 1e-6, "use_additional_conditions": False,
}
# diffusers' SDXL U-Net (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True, "cross_attention_dim": 2048, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}


# ---------------------------------------------------------------------------- layout


def _meta_shapes(model_class: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a diffusers model built on the meta device (allocates no weights)."""
    import diffusers
    import torch

    with torch.device("meta"):
        model = getattr(diffusers, model_class)(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def pixart_config(blocks: int) -> dict[str, Any]:
    return {**PIXART, "num_layers": blocks}


def sdxl_config(scale: float) -> dict[str, Any]:
    """SDXL with widths times `scale`, kept multiples of 64 (GroupNorm(32), 64-wide heads)."""
    widths = tuple(max(64, round(c * scale / 64) * 64) for c in SDXL["block_out_channels"])
    return {**SDXL, "block_out_channels": widths, "attention_head_dim": tuple(w // 64 for w in widths)}


def layout(name: str, bytes_per_file: float) -> tuple[str, dict[str, Any], dict[str, tuple[int, ...]]]:
    """The smallest model of the layout family whose fp16 file reaches `bytes_per_file`."""
    if name == "pixart":
        per_block = (_params(_meta_shapes("PixArtTransformer2DModel", pixart_config(2))) - _params(_meta_shapes("PixArtTransformer2DModel", pixart_config(1))))
        base = _params(_meta_shapes("PixArtTransformer2DModel", pixart_config(1))) - per_block
        blocks = max(1, math.ceil((bytes_per_file / 2 - base) / per_block))
        config = pixart_config(blocks)
        return "PixArtTransformer2DModel", config, _meta_shapes("PixArtTransformer2DModel", config)
    base = _params(_meta_shapes("UNet2DConditionModel", sdxl_config(1.0)))
    scale = math.sqrt(bytes_per_file / 2 / base)  # params grow with width squared
    while True:
        config = sdxl_config(scale)
        shapes = _meta_shapes("UNet2DConditionModel", config)
        if 2 * _params(shapes) >= bytes_per_file:
            return "UNet2DConditionModel", config, shapes
        scale *= 1.02


# ---------------------------------------------------------------------------- generation


def _teacher_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> Iterator[tuple[str, Any]]:
    import torch

    for i, (key, shape) in enumerate(shapes.items()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        fan_in = math.prod(shape[1:]) if len(shape) >= 2 else 100
        yield key, (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).half()


def write_teacher(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    import torch

    from weightlens.safetensors_writer import StreamingSafetensorsWriter

    with StreamingSafetensorsWriter(path, [(k, s, torch.float16) for k, s in shapes.items()]) as out:
        for key, tensor in _teacher_tensors(shapes, seed):
            out.write(key, tensor)


def write_student(teacher: Path, path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, int]:
    """Stream the student from the teacher file: planted rotations, noise elsewhere."""
    import torch
    from safetensors import safe_open

    from weightlens.planted import Plant, default_plant, plant_student
    from weightlens.safetensors_writer import StreamingSafetensorsWriter

    plant = default_plant(list(shapes), shapes, rank=RANK)
    plant = Plant(rotate=plant.rotate, scale=plant.scale, angle_rms=SAMPLE_ANGLE_RMS)
    gen = torch.Generator().manual_seed(seed + 1)
    with safe_open(str(teacher), framework="pt") as fh, StreamingSafetensorsWriter(path, [(k, s, torch.float16) for k, s in shapes.items()]) as out:
        for i, key in enumerate(shapes):
            w = fh.get_tensor(key)
            if key in plant.rotate or key in plant.scale:
                s = plant_student({key: w}, plant, seed=seed + i)[key]
            else:  # 1e-3 relative noise
                rms = float(w.float().square().mean().sqrt()) or 1.0
                s = (w.float() + 1e-3 * rms * torch.randn(w.shape, generator=gen)).half()
            out.write(key, s.contiguous())
    return {"rotated": len(plant.rotate), "scaled": len(plant.scale), "noised": len(shapes) - len(plant.rotate) - len(plant.scale)}


def generate(data: Path, total_bytes: float, layout_name: str, seed: int) -> dict[str, Any]:
    """Child side: write (or reuse) the pair; return what it is."""
    from weightlens.io import read_safetensors_header

    model_class, config, shapes = layout(layout_name, total_bytes / 2)
    print(f"layout: {model_class} {({k: v for k, v in config.items() if k in ('num_layers', 'block_out_channels')})}, "
          f"{len(shapes)} tensors, {_params(shapes) / 1e9:.2f}B params per file", file=sys.stderr)
    teacher, student = pair_paths(data)
    info: dict[str, Any] = {"model_class": model_class, "config": config, "tensors": len(shapes), "params": _params(shapes)}
    for path, make in ((teacher, lambda: write_teacher(teacher, shapes, seed)), (student, lambda: info.update(plant=write_student(teacher, student, shapes, seed)))):
        if path.is_file() and {k: i.shape for k, i in read_safetensors_header(path).items()} == shapes:
            print(f"reusing {path} (kept by an earlier --keep run)", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        make()
        print(f"wrote {path} ({path.stat().st_size / GIB:.2f} GiB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return info


def pair_paths(data: Path) -> tuple[Path, Path]:
    return data / "teacher.safetensors", data / "student.safetensors"


# ---------------------------------------------------------------------------- measuring


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def run_compare(teacher: Path, student: Path, out: Path, stats_only: bool) -> Sampled:
    cmd = [sys.executable, "-m", "weightlens", "compare", str(teacher), str(student), "-o", str(out), "--quiet", "--no-timestamp"]
    if stats_only:
        cmd.append("--stats-only")
    return run_sampled(cmd, stdout=subprocess.DEVNULL)  # its summary table; errors still reach stderr


def planted_read_back(out: Path) -> str:
    """From the full run's layers.csv: did every planted rotation come back?"""
    import pandas as pd

    from weightlens.planted import default_plant

    df = pd.read_csv(out / "layers.csv").set_index("name")
    shapes = {n: tuple(int(d) for d in s.split("x")) for n, s in df["shape"].items()}
    rotated = [n for n in default_plant(list(shapes), shapes, rank=RANK).rotate if n in df.index]
    rows = df.loc[rotated]
    ok = (rows["rotation_explained"] >= 0.99) & (rows["theta_rank_90"] == RANK) & (rows["norm_rel_mean"] < 1e-3)
    return (f"{int(ok.sum())}/{len(rows)} planted layers read back (rotation_explained >= 0.99, theta_rank_90 == {RANK}, "
            f"norm change < 1e-3; min rotation_explained {rows['rotation_explained'].min():.4f}, fp16 rounding)")


def cleanup(data: Path, created: list[Path]) -> None:
    """Delete what this run created (files, output folders, partial files), then `data` if empty."""
    for path in created:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
            path.with_name(f".{path.name}.partial").unlink(missing_ok=True)
    if data.is_dir() and not any(data.iterdir()):
        data.rmdir()


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the pair is written (default %(default)s)")
    p.add_argument("--total-gib", type=float, default=26.0, help="size of both files together (default %(default)s GiB)")
    p.add_argument("--layout", choices=("pixart", "sdxl"), default="pixart")
    p.add_argument("--modes", default="stats,full", help="comma-separated: stats (--stats-only), full (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the generated pair (reused by the next run) and outputs")
    p.add_argument("--allow-smaller-than-ram", action="store_true", help="run even if the pair fits in RAM (for trying the script)")
    p.add_argument("--generate-info", type=Path, help=argparse.SUPPRESS)  # child side: generate, write info JSON here
    return p.parse_args(argv)


def _report_row(label: str, run: Sampled, total_bytes: int, read: Sampled) -> str:
    rate = total_bytes / run.seconds / 1e6 if run.returncode == 0 else math.nan
    return (f"{label:<14}{run.seconds:>9.1f}{run.seconds / read.seconds:>11.2f}{run.cpu_s:>9.1f}{run.peak_anon_mib:>18.0f}"
            f"{run.peak_file_mib:>18.0f}{run.hwm_mib:>11.0f}{rate:>8.0f}{run.others_cpu:>8.0%}{run.returncode:>6}")


def bench(args: argparse.Namespace, created: list[Path]) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"stats", "full"}:
        print(f"--modes {args.modes!r}: use stats and/or full", file=sys.stderr)
        return 2
    total = int(args.total_gib * GIB)
    ram = mem_total_bytes()
    if total <= ram and not args.allow_smaller_than_ram:
        print(f"--total-gib {args.total_gib} is not larger than this machine's RAM ({ram / GIB:.1f} GiB); raise it", file=sys.stderr)
        return 2
    args.data.mkdir(parents=True, exist_ok=True)
    teacher, student = pair_paths(args.data)
    free = shutil.disk_usage(args.data).free + sum(p.stat().st_size for p in (teacher, student) if p.is_file())
    if free < 1.02 * total + 2 * GIB:
        print(f"{args.data}: {free / GIB:.1f} GiB free, the pair needs {total / GIB:.1f} GiB + 2 GiB margin", file=sys.stderr)
        return 2
    created += [teacher, student, args.data / "info.json"]
    # Generation runs in a subprocess, so that this process never imports torch: a child's
    # VmHWM (wait4's ru_maxrss) would otherwise start from the parent's RSS at fork time.
    gen_cmd = [sys.executable, __file__, "--data", str(args.data), "--total-gib", str(args.total_gib), "--layout", args.layout, "--seed", str(args.seed), "--generate-info", str(args.data / "info.json")]
    runs: dict[str, Sampled] = {"generate": run_sampled(gen_cmd)}
    if runs["generate"].returncode != 0:
        print(f"generating the pair failed (exit code {runs['generate'].returncode})", file=sys.stderr)
        return 1
    info = json.loads((args.data / "info.json").read_text())
    model_class, per_file = info["model_class"], 2 * info["params"]
    sizes = teacher.stat().st_size, student.stat().st_size
    # The naive peer: loading both state dicts cannot fit in RAM, so the floor is reading the
    # bytes once (`cat`, cold: the files do not fit in the page cache either).
    print("reading both files once (cat) ...", file=sys.stderr)
    runs["read"] = run_sampled(["cat", str(teacher), str(student)], stdout=subprocess.DEVNULL)
    for mode in modes:
        out = args.data / f"out-{mode}"
        created.append(out)
        shutil.rmtree(out, ignore_errors=True)
        print(f"running weightlens compare ({mode}) ...", file=sys.stderr)
        runs[mode] = run_compare(teacher, student, out, stats_only=mode == "stats")
    print(f"\nweightlens compare on a pair larger than RAM: {model_class} layout {info['config'].get('num_layers') or info['config'].get('block_out_channels')}, "
          f"{info['tensors']} tensors, {per_file // 2 / 1e9:.2f}B params per file (fp16)")
    print(f"files: teacher {sizes[0] / GIB:.2f} GiB + student {sizes[1] / GIB:.2f} GiB = {sum(sizes) / GIB:.2f} GiB ({sum(sizes) / 1e9:.1f} GB) "
          f"on disk; RAM (MemTotal) {ram / GIB:.1f} GiB: files = {sum(sizes) / ram:.2f}x RAM")
    head = f"{'run':<14}{'wall s':>9}{'time/read':>11}{'cpu s':>9}{'peak RssAnon MiB':>18}{'peak RssFile MiB':>18}{'VmHWM MiB':>11}{'MB/s':>8}{'others':>8}{'exit':>6}"
    print(head)
    print("-" * len(head))
    labels = {"generate": "generate pair", "read": "read (cat)", "stats": "stats-only", "full": "full"}
    for mode, run in runs.items():
        print(_report_row(labels[mode], run, sum(sizes), runs["read"]))
    print("generate pair: writing both files (streamed); read: `cat` of both files, the I/O floor; "
          "MB/s: both files' bytes / wall time; others: share of all CPUs other processes used meanwhile")
    if any(r.others_cpu > CONTENDED for r in runs.values()):
        print(f"WARNING: other processes used > {CONTENDED:.0%} of the CPUs during a run: times are contended")
    if "full" in runs and runs["full"].returncode == 0:
        print(planted_read_back(args.data / "out-full"))
    peak = max(r.peak_anon_mib for m, r in runs.items() if m in modes)
    print(f"peak RssAnon {peak:.0f} MiB = {peak * MIB / sum(sizes):.2%} of the files' size")
    return 0 if all(r.returncode == 0 for r in runs.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generate_info:
        info = generate(args.data, args.total_gib * GIB, args.layout, args.seed)
        args.generate_info.write_text(json.dumps(info))
        return 0
    created: list[Path] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on `kill` too
    try:
        return bench(args, created)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            cleanup(args.data, created)
            print(f"deleted the generated files under {args.data}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
