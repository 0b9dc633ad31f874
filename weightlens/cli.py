"""The `weightlens` command line: a thin Typer layer over the library."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from weightlens.errors import WeightlensError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="What distillation did to a diffusion model's weights.")
err = Console(stderr=True)
out = Console()
T = TypeVar("T")


def _setup(quiet: bool, verbose: bool) -> None:
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_time=False, show_path=False)], force=True)


def _run(fn: Callable[[], T]) -> T:
    """Turn project errors into one red line and exit code 1 (no traceback)."""
    try:
        return fn()
    except WeightlensError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None


@contextmanager
def _progress(quiet: bool, what: str) -> Iterator[Callable[[int, int, str], None]]:
    bar = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"), console=err, disable=quiet, transient=False)
    task = bar.add_task("", total=None)

    def update(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, description=name[-40:])

    with bar:
        yield update


@app.command()
def compare(
    teacher: Annotated[Path, typer.Argument(help="Teacher checkpoint: .safetensors, *.index.json, diffusers folder, .ckpt/.pt/.bin")],
    student: Annotated[Path, typer.Argument(help="Student checkpoint, any of the same formats")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder")] = Path("weightlens-out"),
    overwrite: Annotated[bool, typer.Option(help="Replace the analysis files in an existing folder")] = False,
    budget: Annotated[Optional[str], typer.Option(help="LoRaD parameter budget: 10%, 0.1, 5M or a count")] = None,
    energy: Annotated[Optional[float], typer.Option(help="Theta energy target per layer (default 0.9; with --budget alone: none)")] = None,
    min_rank: Annotated[int, typer.Option(help="Smallest rank of every targeted layer (0: a layer may get none)")] = 0,
    max_rank: Annotated[Optional[int], typer.Option(help="Largest rank of any layer")] = None,
    multiple_of: Annotated[int, typer.Option(help="Round ranks up to a multiple of this")] = 1,
    include_conv: Annotated[bool, typer.Option(help="Let LoRaD target conv kernels too")] = False,
    strip_prefix: Annotated[Optional[list[str]], typer.Option(help="Extra key prefix to remove (repeatable)")] = None,
    include: Annotated[Optional[list[str]], typer.Option(help="Only layers matching this glob (repeatable)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Drop layers matching this glob (repeatable)")] = None,
    map_: Annotated[Optional[list[str]], typer.Option("--map", help="Rename student keys: REGEX=REPLACEMENT (repeatable)")] = None,
    component: Annotated[Optional[str], typer.Option(help="Pipeline component folder: unet, transformer...")] = None,
    ema: Annotated[bool, typer.Option(help="Read the EMA copy of the U-Net (model_ema.*) from original LDM .ckpt files that hold one")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    workers: Annotated[int, typer.Option(help="Layers computed at once, in threads (0: one per CPU core, at most 4)")] = 0,
    stats_only: Annotated[bool, typer.Option(help="Norm/direction statistics only (no Theta, spectra or ranks)")] = False,
    no_report: Annotated[bool, typer.Option(help="Skip report.html and figures")] = False,
    no_timestamp: Annotated[bool, typer.Option(help="Leave wall-clock times out (reproducible files)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or warnings")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log alignment notes")] = False,
) -> None:
    """Compare a teacher and its student layer by layer and write a report."""
    from weightlens.align import AlignOptions
    from weightlens.compare import CompareOptions
    from weightlens.compare import compare as run_compare
    from weightlens.memory import bound_allocator
    from weightlens.output import prepare_output, write_analysis

    _setup(quiet, verbose)
    bound_allocator()  # peak memory flat in the number of layers (see weightlens/memory.py)
    options = CompareOptions(
        align=AlignOptions(tuple(strip_prefix or ()), tuple(include or ()), tuple(exclude or ()), tuple(map_ or ()), ema=ema),
        energy=energy if energy is not None else (None if budget else 0.9), budget=budget,
        min_rank=min_rank, max_rank=max_rank, multiple_of=multiple_of, include_conv=include_conv,
        component=component, device=device, workers=workers, stats_only=stats_only,
        timestamps=not no_timestamp, command=tuple(sys.argv),
    )

    def work() -> None:
        prepare_output(output, overwrite)  # fail before hours of reading, not after
        with _progress(quiet, "compare") as update:
            analysis = run_compare(teacher, student, options, progress=update)
        write_analysis(analysis, output, overwrite=True, report=not no_report, timestamp=not no_timestamp)
        _print_summary(analysis, output, quiet)

    _run(work)


def _print_summary(analysis, output: Path, quiet: bool) -> None:  # type: ignore[no-untyped-def]
    s = analysis.summary
    if not quiet:
        table = Table(title="weightlens summary", show_header=False)
        table.add_row("layers compared", f"{s.layers:,} ({s.params_compared:,} params)")
        table.add_row("mean norm change", f"{s.norm_rel_mean:.4%}")
        table.add_row("mean direction change", f"{s.dir_mean:.4%}")
        table.add_row("direction / norm", f"{s.dir_to_norm_ratio:.1f}x")
        if analysis.ranks is not None:
            r = analysis.ranks
            frac = r.trainable_params / analysis.backbone_params if analysis.backbone_params else float("nan")
            table.add_row("LoRaD ranks", f"{len(r.rank_pattern)} modules, {r.trainable_params:,} params ({frac:.2%} of backbone)")
        warnings = sum(a.level == "warning" for a in analysis.alerts)
        table.add_row("alerts", f"{len(analysis.alerts)} ({warnings} warnings)")
        out.print(table)
    out.print(f"report: {output / 'report.html'}" if (output / "report.html").exists() else f"results: {output}")


@app.command("fit-ranks")
def fit_ranks_cmd(
    analysis_dir: Annotated[Path, typer.Argument(help="Folder written by `weightlens compare`")],
    budget: Annotated[Optional[str], typer.Option(help="Parameter budget: 10%, 0.1, 5M or a count")] = None,
    energy: Annotated[Optional[float], typer.Option(help="Theta energy target per layer")] = None,
    min_rank: Annotated[int, typer.Option(help="Smallest rank of every targeted layer")] = 0,
    max_rank: Annotated[Optional[int], typer.Option()] = None,
    multiple_of: Annotated[int, typer.Option()] = 1,
    include_conv: Annotated[bool, typer.Option()] = False,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="ranks file to write (default: ANALYSIS_DIR/ranks.json)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Re-fit LoRaD ranks from a saved analysis (no weights are read)."""
    from weightlens.refit import refit

    _setup(quiet, False)

    def work() -> None:
        cfg, path = refit(analysis_dir, budget=budget, energy=energy if energy is not None else (None if budget else 0.9), min_rank=min_rank, max_rank=max_rank, multiple_of=multiple_of, include_conv=include_conv, output=output, command=tuple(sys.argv))
        frac = cfg.trainable_params / cfg.backbone_params if cfg.backbone_params else float("nan")
        out.print(f"{len(cfg.rank_pattern)} modules, {cfg.trainable_params:,} params ({frac:.2%} of backbone), default rank {cfg.default_rank}: {path}")

    _run(work)


@app.command()
def hybrid(
    teacher: Annotated[Path, typer.Argument()],
    student: Annotated[Path, typer.Argument()],
    output: Annotated[Path, typer.Option("-o", "--output", help="safetensors file to write")],
    norm_from: Annotated[str, typer.Option(help="teacher or student")] = "teacher",
    direction_from: Annotated[str, typer.Option(help="teacher or student")] = "student",
    component: Annotated[Optional[str], typer.Option()] = None,
    overwrite: Annotated[bool, typer.Option()] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Per-row hybrid: one model's row norms with the other's directions (paper Fig. 1c)."""
    from weightlens.hybrid import make_hybrid

    _setup(quiet, False)
    res = _run(lambda: make_hybrid(teacher, student, output, norm_from, direction_from, component=component, overwrite=overwrite))
    out.print(f"{res.layers_swapped} matrices with {norm_from} norms and {direction_from} directions, {res.tensors_copied} tensors copied: {res.path}")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="Checkpoint file or folder")],
    component: Annotated[Optional[str], typer.Option()] = None,
    keys: Annotated[bool, typer.Option(help="List every key")] = False,
) -> None:
    """Keys, shapes, dtypes and parameters by block of one checkpoint (reads no tensors)."""
    from weightlens.inspect import inspect_checkpoint

    _setup(False, False)
    info = _run(lambda: inspect_checkpoint(path, component))
    out.print(f"[bold]{info.path}[/bold]  {info.format}, {info.tensors:,} tensors, {info.params:,} params, dtypes {info.dtypes}")
    for note in info.notes:
        out.print(f"  {note}")
    table = Table("block", "tensors", "params")
    for b in info.blocks:
        table.add_row(b.block, f"{b.tensors:,}", f"{b.params:,}")
    out.print(table)
    if keys:
        kt = Table("name", "stored key", "shape", "dtype")
        for name, key, ti in info.keys:
            kt.add_row(name, key if key != name else "", "x".join(map(str, ti.shape)), ti.dtype)
        out.print(kt)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder")] = Path("weightlens-demo"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Build a tiny U-Net teacher and a planted student, compare them, print where the report is."""
    from weightlens.demo import run_demo

    _setup(quiet, False)

    def work() -> None:
        with _progress(quiet, "demo compare") as update:
            analysis, folder = run_demo(output, progress=update)
        _print_summary(analysis, folder, quiet)

    _run(work)


def main() -> None:  # pragma: no cover
    app()
