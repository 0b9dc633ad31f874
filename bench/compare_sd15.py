"""Benchmark `weightlens compare` on an SD1.5-sized teacher/student pair (not a test).

Builds an SD1.5 U-Net (diffusers' config, written inline, random weights, ~860M params, fp32,
~3.4 GB per file) and a student: an exact rank-r LoRaD rotation planted in every attention/FF
Linear, a 5 % norm scaling in every resnet conv, and 1e-3 relative Gaussian noise in every
other tensor, so that every layer changed. Then, one after another and each in its own
subprocess so its memory can be measured, it runs
  (a) naive: both state dicts loaded fully, per-row norm/cosine and a full
      `torch.linalg.svdvals` of every direction residual;
  (b) stats: `compare(..., CompareOptions(stats_only=True))`;
  (c) full: `compare(..., CompareOptions())` (Theta, both spectra, rank fit);
and (c) again on a deeper model (same widths, so the same largest layer; --deep-layers resnet
and transformer layers per block instead of SD1.5's 2 and 1: 1.79B parameters, 2.1x SD1.5), to show that its
peak memory does not grow with model size, and on a narrower one (--small-scale), to show what
it does follow: the largest layer;
a `floor` child (interpreter and the imports of (b)/(c), no work) shows the fixed cost in
each figure.
The parent times each subprocess (wall clock) and samples RssAnon/RssFile from
/proc/PID/status every ~50 ms (file-backed mmap pages are not anonymous memory); VmHWM (peak
RSS including file pages) comes from wait4's rusage; the CPU time other processes used
meanwhile is printed too, since a busy 2-core machine skews every figure. It prints a table,
the ratios and PASS/FAIL per target, and always exits 0.

    python bench/compare_sd15.py [--data DIR] [--scale 1.0] [--small-scale 0.5] [--deep-layers 3]
                                 [--json out.json] [--cleanup]
                                 [--modes stats,full,full-small,full-deep] [--naive-from earlier.json]

The generated pair is cached under --data and reused; --cleanup deletes it at the end.
--modes runs a subset; --naive-from takes (a) from an earlier --json run instead of
re-running it (it takes ~15 minutes here), so the others can be re-measured alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path("/tmp/weightlens-bench-sd15")
MODES = ("naive", "stats", "full")
CHILD_MODES = ("floor", *MODES)  # floor: interpreter + the imports of (b)/(c), no work
RUNS = ("floor", *MODES, "full-small", "full-deep")  # what --modes may select
SAMPLE_S = 0.05
CONTENDED = 0.10  # other processes' share of the CPUs above which a timing is flagged
MIB = 1024 * 1024

# Targets (the issue): (c) <= 0.15x (a) time; (c) peak RssAnon < 1 GiB and flat in model
# size; (b) <= 2x the warm-cache read of both files.
FULL_VS_NAIVE_MAX = 0.15
FULL_ANON_MAX_MIB = 1024.0
STATS_VS_READ_MAX = 2.0
# "Not growing with model size": (c)'s peak on the deeper model (same widths, more layers,
# bigger files) within 10 % of its peak on SD1.5 (a streaming tool's peak may follow the
# largest layer, never the layer count).
FULL_ANON_FLAT_MAX = 1.10

SD15_LAYERS = 2  # SD1.5's layers_per_block (and one transformer block per attention)
# diffusers' SD1.5 U-Net (runwayml/stable-diffusion-v1-5 unet/config.json), written inline.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


# ---------------------------------------------------------------------------- the data


def unet_config(scale: float, layers: int = SD15_LAYERS) -> dict[str, Any]:
    """The SD1.5 config with block widths times `scale` (multiples of 32 for GroupNorm(32)) and
    `layers` resnets (and transformer blocks) per block."""
    widths = tuple(max(32, round(c * scale / 32) * 32) for c in SD15_UNET["block_out_channels"])
    deep = {} if layers == SD15_LAYERS else {"layers_per_block": layers, "transformer_layers_per_block": layers}
    return {**SD15_UNET, "block_out_channels": widths, **deep}


def pair_paths(data: Path, scale: float, layers: int = SD15_LAYERS) -> tuple[Path, Path]:
    folder = data / (f"sd15-x{scale:g}" + (f"-l{layers}" if layers != SD15_LAYERS else ""))
    return folder / "teacher.safetensors", folder / "student.safetensors"


def largest_layer_mib(path: Path) -> float:
    """Size of the largest ndim >= 2 tensor, from the safetensors header alone."""
    with path.open("rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    spans = [e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__" and len(e["shape"]) >= 2]
    return max(spans) / MIB


def make_teacher(path: Path, scale: float, seed: int, layers: int = SD15_LAYERS) -> None:
    """Random-init the U-Net from config and save it (the one step that holds a whole model)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**unet_config(scale, layers))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del model
    tmp = path.with_name(f".{path.name}.partial")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def make_student(teacher: Path, path: Path, rank: int, seed: int) -> dict[str, int]:
    """Stream the student from the teacher, one tensor at a time (planted + noise)."""
    import torch
    from safetensors import safe_open

    from weightlens.planted import default_plant, plant_student
    from weightlens.safetensors_writer import StreamingSafetensorsWriter

    gen = torch.Generator().manual_seed(seed + 1)
    with safe_open(str(teacher), framework="pt") as fh:
        keys = list(fh.keys())
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
        plant = default_plant(keys, shapes, rank=rank)
        entries = [(k, shapes[k], torch.float32) for k in keys]
        with StreamingSafetensorsWriter(path, entries) as out:
            for i, key in enumerate(keys):
                w = fh.get_tensor(key)
                if key in plant.rotate or key in plant.scale:
                    s = plant_student({key: w}, plant, seed=seed + i)[key]
                else:  # 1e-3 relative noise: ||noise|| ~ 1e-3 ||w|| (1e-3 absolute if w == 0)
                    rms = float(w.float().square().mean().sqrt()) or 1.0
                    s = w + 1e-3 * rms * torch.randn(w.shape, generator=gen, dtype=w.dtype)
                out.write(key, s.contiguous())
    return {"rotated": len(plant.rotate), "scaled": len(plant.scale), "noised": len(keys) - len(plant.rotate) - len(plant.scale)}


def ensure_pair(data: Path, scale: float, rank: int, seed: int, layers: int = SD15_LAYERS) -> tuple[Path, Path]:
    """Generate the pair for `scale` and `layers` under `data` unless it is already there."""
    teacher, student = pair_paths(data, scale, layers)
    teacher.parent.mkdir(parents=True, exist_ok=True)
    if not teacher.is_file():
        t0 = time.perf_counter()
        _run_child(["--make-teacher", str(teacher), "--scale", str(scale), "--deep-layers", str(layers), "--seed", str(seed)])
        print(f"  generated {teacher} ({teacher.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not student.is_file():
        t0 = time.perf_counter()
        _run_child(["--make-student", str(student), "--teacher", str(teacher), "--rank", str(rank), "--seed", str(seed)])
        print(f"  generated {student} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return teacher, student


def _run_child(args: list[str]) -> None:
    # Generation runs in a subprocess too, so that its multi-GB heap is gone before timing.
    subprocess.run([sys.executable, __file__, *args], check=True)


# ---------------------------------------------------------------------------- the modes (child side)


def run_naive(teacher: Path, student: Path) -> dict[str, Any]:
    """(a): both state dicts loaded whole; row norms/cosine, full svdvals of each residual.

    safetensors 0.8's load_file maps the files, so the two state dicts show up as file pages
    (VmHWM ~ both files), not as anonymous memory.
    """
    import torch
    from safetensors.torch import load_file

    ta, sa = load_file(str(teacher)), load_file(str(student))
    layers, cos_sum, rows, energy_30 = 0, 0.0, 0, []
    for key in sorted(ta.keys() & sa.keys()):
        t, s = ta[key], sa[key]
        if t.ndim < 2 or t.shape != s.shape:
            continue
        wt, ws = t.reshape(t.shape[0], -1).float(), s.reshape(s.shape[0], -1).float()  # (out, in)
        mt, ms = torch.linalg.vector_norm(wt, dim=1), torch.linalg.vector_norm(ws, dim=1)
        cos = (wt * ws).sum(dim=1) / (mt * ms)
        resid = ws / ms[:, None] - wt / mt[:, None]  # U_S - U_T
        sv = torch.linalg.svdvals(resid)
        e = sv.double().square()
        k = math.ceil(0.3 * min(resid.shape))
        energy_30.append(float(e[:k].sum() / e.sum()))
        cos_sum += float(cos.double().sum())
        rows += cos.numel()
        layers += 1
    return {"layers": layers, "spectra": layers, "cos_mean": cos_sum / max(rows, 1), "resid_energy_30_mean": sum(energy_30) / max(layers, 1)}


def run_weightlens(teacher: Path, student: Path, stats_only: bool, write: bool) -> dict[str, Any]:
    """(b) and (c): the library API, no report rendering, with the CLI's allocator setting."""
    from weightlens import CompareOptions, compare
    from weightlens.memory import bound_allocator

    bound_allocator()  # as `weightlens compare` does

    t0 = time.perf_counter()
    analysis = compare(teacher, student, CompareOptions(stats_only=stats_only, timestamps=False))
    result: dict[str, Any] = {
        "compare_s": time.perf_counter() - t0,
        "layers": len(analysis.layers),
        "spectra": len(analysis.theta_spectra) + len(analysis.resid_spectra),
        "dir_to_norm_ratio": analysis.summary.dir_to_norm_ratio,
    }
    if write:
        from weightlens.output import write_analysis

        with tempfile.TemporaryDirectory(prefix="weightlens-bench-out-") as out:
            t1 = time.perf_counter()
            write_analysis(analysis, Path(out) / "analysis", report=False, timestamp=False)
            result["write_s"] = time.perf_counter() - t1
    return result


def run_floor() -> dict[str, Any]:
    """The imports (b) and (c) pay for (run_weightlens without --write), nothing else."""
    from weightlens import CompareOptions, compare  # noqa: F401

    return {}


def child_main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if args.mode == "floor":
        result = run_floor()
    elif args.mode == "naive":
        result = run_naive(args.teacher, args.student)
    else:
        result = run_weightlens(args.teacher, args.student, stats_only=args.mode == "stats", write=args.write)
    result["work_s"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- measuring (parent side)


@dataclass
class Measurement:
    """One subprocess run: wall seconds, peaks (MiB) and what the child reported."""

    label: str
    seconds: float
    peak_anon_mib: float
    peak_file_mib: float
    hwm_mib: float
    cpu_s: float
    others_cpu: float
    child: dict[str, Any] = field(default_factory=dict)


def _status_kib(pid: int) -> dict[str, int]:
    """RssAnon, RssFile, VmHWM of a live process in KiB ({} once it has exited)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("RssAnon", "RssFile", "VmHWM"):
                    out[name] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _busy_cpu_s() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat, every CPU)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sampled:
    """What `run_sampled` saw of one subprocess: wall seconds, peaks (MiB), CPU, exit code."""

    seconds: float
    peak_anon_mib: float
    peak_file_mib: float
    hwm_mib: float
    cpu_s: float
    others_cpu: float
    returncode: int


def run_sampled(cmd: list[str], **popen_kwargs: Any) -> Sampled:
    """Run `cmd`, sampling its RssAnon/RssFile every SAMPLE_S seconds (killed if interrupted)."""
    anon = file = 0
    busy0 = _busy_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    try:
        while True:
            # wait4 (not Popen.poll) so that this child's own rusage (ru_maxrss = VmHWM) comes back.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            kib = _status_kib(proc.pid)
            anon, file = max(anon, kib.get("RssAnon", 0)), max(file, kib.get("RssFile", 0))
            time.sleep(SAMPLE_S)
    except BaseException:  # Ctrl-C, SIGTERM turned into SystemExit...: leave no orphan behind
        proc.kill()
        proc.wait()
        raise
    seconds = time.perf_counter() - t0
    busy = _busy_cpu_s() - busy0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    # Contention: the share of the machine other processes used while this one ran.
    others = max(0.0, busy - cpu) / (seconds * (os.cpu_count() or 1))
    return Sampled(seconds, anon / 1024, file / 1024, usage.ru_maxrss / 1024, cpu, others, proc.returncode)


def measure(label: str, mode: str, teacher: Path, student: Path, write: bool) -> Measurement:
    """Run one mode in a subprocess, sampling its memory every SAMPLE_S seconds."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_path = Path(fh.name)
    cmd = [sys.executable, __file__, "--mode", mode, "--teacher", str(teacher), "--student", str(student), "--result", str(result_path)]
    if write:
        cmd.append("--write")
    try:
        run = run_sampled(cmd)
        child = json.loads(result_path.read_text()) if run.returncode == 0 else {"error": f"exit code {run.returncode}"}
    finally:
        result_path.unlink(missing_ok=True)
    return Measurement(label, run.seconds, run.peak_anon_mib, run.peak_file_mib, run.hwm_mib, run.cpu_s, run.others_cpu, child)


def warm_read(teacher: Path, student: Path, repeats: int = 3) -> float:
    """Seconds of `cat a b > /dev/null` with a warm page cache (best of `repeats`, after one warm-up)."""
    cmd = f"cat {shlex.quote(str(teacher))} {shlex.quote(str(student))} > /dev/null"
    subprocess.run(cmd, shell=True, check=True)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, shell=True, check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def warm_cache(*paths: Path) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


# ---------------------------------------------------------------------------- report


def table(rows: list[Measurement], naive: Measurement | None, read_s: float) -> str:
    head = f"{'mode':<22}{'wall s':>9}{'work s':>9}{'cpu s':>9}{'peak RssAnon MiB':>18}{'VmHWM MiB':>11}{'time/naive':>12}{'anon/naive':>12}{'others':>8}"
    ref_s, ref_anon = (naive.seconds, naive.peak_anon_mib) if naive else (math.nan, math.nan)
    lines = [head, "-" * len(head), f"{'read: cat a b (warm)':<22}{read_s:>9.2f}{'':>9}{'':>9}{'':>18}{'':>11}{read_s / ref_s:>12.3f}{'':>12}{'':>8}"]
    for m in rows:
        work = m.child.get("work_s", math.nan)
        lines.append(
            f"{m.label:<22}{m.seconds:>9.2f}{work:>9.2f}{m.cpu_s:>9.1f}{m.peak_anon_mib:>18.0f}{m.hwm_mib:>11.0f}"
            f"{m.seconds / ref_s:>12.3f}{m.peak_anon_mib / ref_anon:>12.3f}{m.others_cpu:>8.0%}"
        )
    lines.append("wall s: the subprocess (interpreter start, imports, work); work s: the work alone, timed inside it;")
    lines.append("cpu s: its user+sys CPU time; others: share of all CPUs other processes used meanwhile (contention)")
    return "\n".join(lines)


def verdicts(by: dict[str, Measurement], read_s: float, largest: dict[str, float]) -> list[tuple[str, bool | None, str]]:
    """(target, passed, detail) per target; passed is None for a line of information."""
    naive, stats, full = by["naive"], by["stats"], by["full"]
    out = [
        ("(c) time <= 0.15x (a)", full.seconds <= FULL_VS_NAIVE_MAX * naive.seconds, f"{full.seconds / naive.seconds:.3f}x ({full.seconds:.1f} s vs {naive.seconds:.1f} s; CPU time {full.cpu_s / naive.cpu_s:.3f}x)"),
        ("(c) computes strictly more", full.child.get("layers") == naive.child.get("layers") and full.child.get("spectra", 0) >= 2 * naive.child.get("spectra", 0), f"{full.child.get('layers')} layers, {full.child.get('spectra')} spectra (Theta + residual) vs {naive.child.get('spectra')} residual spectra"),
        ("(c) peak RssAnon < 1 GiB", full.peak_anon_mib < FULL_ANON_MAX_MIB, f"{full.peak_anon_mib:.0f} MiB"),
        ("(b) time <= 2x read", stats.seconds <= STATS_VS_READ_MAX * read_s, f"{stats.seconds / read_s:.2f}x ({stats.seconds:.2f} s vs {read_s:.2f} s read; in-process {stats.child.get('work_s', math.nan):.2f} s)"),
    ]
    # The same without the interpreter start and imports (torch alone takes seconds here),
    # which no amount of reading speed can win back: the work itself against the read.
    work = stats.child.get("compare_s", math.nan)
    out.append(("(b) work <= 2x read", work <= STATS_VS_READ_MAX * read_s, f"{work / read_s:.2f}x ({work:.2f} s in compare() vs {read_s:.2f} s read; the floor child takes {by['floor'].seconds:.2f} s)"))
    floor = by["floor"].peak_anon_mib

    def above(m: Measurement, key: str) -> str:  # working set above the import floor, in largest layers
        return f"{m.peak_anon_mib - floor:.0f} MiB above the {floor:.0f} MiB import floor = {(m.peak_anon_mib - floor) / largest[key]:.2f}x its largest layer ({largest[key]:.0f} MiB)"

    deep = by.get("full-deep")
    if deep is not None:
        out.append((
            "(c) peak flat in model size", deep.peak_anon_mib <= FULL_ANON_FLAT_MAX * full.peak_anon_mib,
            (f"{full.peak_anon_mib:.0f} -> {deep.peak_anon_mib:.0f} MiB ({deep.peak_anon_mib / full.peak_anon_mib:.2f}x, limit {FULL_ANON_FLAT_MAX:.2f}x) "
             f"for files {largest['file']:.0f} -> {largest['deep_file']:.0f} MiB with the same widths; deep: {above(deep, 'deep')}"),
        ))
    small = by.get("full-small")
    if small is not None:  # information, not a target: what the peak does follow
        out.append(("(c) peak follows the largest layer", None, f"x1 widths: {above(full, 'full')}; {small.label.removeprefix('(c) full @ ')} widths: {above(small, 'small')}"))
    return out


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the generated pairs are cached (default %(default)s)")
    p.add_argument("--scale", type=float, default=1.0, help="block width factor of the main model (1.0 = SD1.5)")
    p.add_argument("--small-scale", type=float, default=0.5, help="width factor of the second model (c) runs on; 0 skips it")
    p.add_argument("--deep-layers", type=int, default=3, help="layers per block of the deeper model (c) runs on (SD1.5: 2); 0 skips it")
    p.add_argument("--rank", type=int, default=4, help="rank of the planted LoRaD rotations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="(b)/(c) also time write_analysis(report=False)")
    p.add_argument("--json", type=Path, help="save the figures to this JSON file")
    p.add_argument("--cleanup", action="store_true", help="delete the generated pairs at the end")
    p.add_argument("--generate-only", action="store_true", help="only generate (or find) the pairs, measure nothing")
    p.add_argument("--modes", default=",".join(RUNS), help="comma-separated subset of %(default)s to run (floor always runs)")
    p.add_argument("--naive-from", type=Path, help="take (a) from this earlier --json report instead of running it")
    # Child side (internal).
    p.add_argument("--mode", choices=CHILD_MODES, help=argparse.SUPPRESS)
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--student", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--make-teacher", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--make-student", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    print(f"generating/reusing pairs under {args.data}", file=sys.stderr)
    teacher, student = ensure_pair(args.data, args.scale, args.rank, args.seed)
    modes = set(args.modes.split(",")) | {"floor"}
    small = ensure_pair(args.data, args.small_scale, args.rank, args.seed) if args.small_scale > 0 and "full-small" in modes else None
    deep = ensure_pair(args.data, args.scale, args.rank, args.seed, args.deep_layers) if args.deep_layers > 0 and "full-deep" in modes else None
    if args.generate_only:
        return {}
    if unknown := modes - set(RUNS):
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(RUNS)}")
    read_s = warm_read(teacher, student)
    by: dict[str, Measurement] = {"floor": measure("imports only (floor)", "floor", teacher, student, False)}
    labels = {"naive": "(a) naive", "stats": "(b) stats-only", "full": "(c) full"}
    if args.naive_from:
        by["naive"] = Measurement(**json.loads(args.naive_from.read_text())["runs"]["naive"])
        by["naive"].label += " (earlier run)"
    for mode in MODES:
        if mode not in modes or (mode == "naive" and args.naive_from):
            continue
        warm_cache(teacher, student)
        print(f"running {labels[mode]} ...", file=sys.stderr)
        by[mode] = measure(labels[mode], mode, teacher, student, args.write)
    largest = {"full": largest_layer_mib(teacher), "file": teacher.stat().st_size / MIB}
    if small is not None and "full-small" in modes:
        warm_cache(*small)
        print(f"running (c) full at scale {args.small_scale:g} ...", file=sys.stderr)
        by["full-small"] = measure(f"(c) full @ x{args.small_scale:g}", "full", *small, args.write)
        largest.update(small=largest_layer_mib(small[0]), small_file=small[0].stat().st_size / MIB)
    if deep is not None:
        warm_cache(*deep)
        print(f"running (c) full on the {args.deep_layers}-layer model ...", file=sys.stderr)
        by["full-deep"] = measure(f"(c) full, {args.deep_layers} layers/block", "full", *deep, args.write)
        largest.update(deep=largest_layer_mib(deep[0]), deep_file=deep[0].stat().st_size / MIB)
    report = {
        "files": {"teacher": str(teacher), "student": str(student), "bytes_each": teacher.stat().st_size, "small_bytes_each": small[0].stat().st_size if small else None},
        "scale": args.scale, "small_scale": args.small_scale, "deep_layers": args.deep_layers, "torch_threads": _torch_threads(), "cpus": os.cpu_count(),
        "read_s": read_s, "largest_layer_mib": largest,
        "runs": {k: asdict(m) for k, m in by.items()},
        "targets": [{"target": n, "pass": ok, "detail": d} for n, ok, d in verdicts(by, read_s, largest)] if {"naive", "stats", "full"} <= by.keys() else [],
    }
    return report


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def print_report(report: dict[str, Any]) -> None:
    runs = {k: Measurement(**v) for k, v in report["runs"].items()}
    size = report["files"]["bytes_each"] / 1e9
    print(f"\nweightlens compare, SD1.5-sized U-Net x{report['scale']:g} ({size:.2f} GB per file), {report['cpus']} CPUs, torch threads {report['torch_threads']}")
    print(table(list(runs.values()), runs.get("naive"), report["read_s"]))
    busy = [m.label for m in runs.values() if m.others_cpu > CONTENDED]
    if busy:
        print(f"WARNING: other processes used > {CONTENDED:.0%} of the CPUs during {', '.join(busy)}: those times are contended")
    print()
    for t in report["targets"]:
        print(f"{ {True: 'PASS', False: 'FAIL', None: 'INFO'}[t['pass']]}  {t['target']:<30} {t['detail']}")


def cleanup(data: Path, models: list[tuple[float, int]]) -> None:
    """Delete only what this benchmark generated, then `data` if that left it empty."""
    for scale, layers in models:
        folder = pair_paths(data, scale, layers)[0].parent
        if folder.is_dir():
            shutil.rmtree(folder)
    if data.is_dir() and not any(data.iterdir()):
        data.rmdir()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_teacher:
        make_teacher(args.make_teacher, args.scale, args.seed, args.deep_layers)
    elif args.make_student:
        print(f"  student plant: {make_student(args.teacher, args.make_student, args.rank, args.seed)}", file=sys.stderr)
    elif args.mode:
        child_main(args)
    else:
        try:
            report = bench(args)
            if report:
                print_report(report)
            if report and args.json:
                args.json.write_text(json.dumps(report, indent=2) + "\n")
        finally:
            if args.cleanup:
                cleanup(args.data, [(args.scale, SD15_LAYERS), (args.small_scale, SD15_LAYERS), (args.scale, args.deep_layers)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
