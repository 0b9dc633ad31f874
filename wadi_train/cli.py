"""The `wadi-train` command line: a thin Typer layer over the library."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from wadi_train.errors import WadiError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="One-step distillation with LoRaD + VSD.")
err = Console(stderr=True)
out = Console()
T = TypeVar("T")


def _setup(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_time=False, show_path=False)], force=True)


def _run(fn: Callable[[], T]) -> T:
    from weightlens.errors import WeightlensError

    try:
        return fn()
    except (WadiError, WeightlensError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None


Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. optim.student_lr=1e-5")]


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="Run config (YAML)")], overrides: Overrides = None) -> None:
    """Report every problem of a config before touching a device; print parameter counts."""
    from wadi_train.config import load_config
    from wadi_train.config import validate as check
    from wadi_train.sizes import describe

    _setup()

    def work() -> None:
        cfg = load_config(config, overrides or [])
        problems = check(cfg)
        if problems:
            from wadi_train.errors import ConfigError

            raise ConfigError(f"{len(problems)} problem(s) in {config}:\n  " + "\n  ".join(problems))
        for line in describe(cfg):
            out.print(line)
        out.print("[green]config is valid[/green]")

    _run(work)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config (YAML)")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's latest checkpoint")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Distil: train the one-step student with VSD."""
    from wadi_train.checkpoint import CheckpointCorruptError
    from wadi_train.config import load_config
    from wadi_train.train import train

    _setup(quiet)

    def work() -> None:
        cfg = load_config(config, overrides or [])
        bar = Progress(TextColumn("[bold]distil"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"), console=err, disable=quiet)
        with bar:
            task = bar.add_task("", total=cfg.train.steps)

            def progress(step: int, total: int, m: dict[str, float]) -> None:
                bar.update(task, completed=step, description=f"student {m.get('loss_student', float('nan')):.4f} fake {m.get('loss_fake', float('nan')):.4f}")

            try:
                res = train(cfg, resume=resume, progress=progress)
            except CheckpointCorruptError as exc:
                raise CheckpointCorruptError(f"{exc}{_set_aside_hint(cfg.output_dir) if resume else ''}") from None
        out.print(f"{res.steps} steps, {res.nonfinite_skipped} skipped: {res.run_dir}")

    _run(work)


def _set_aside_hint(run_dir: str) -> str:
    """How to resume from the previous checkpoint when the latest one is damaged."""
    from wadi_train.checkpoint import latest_checkpoint, list_checkpoints

    bad = latest_checkpoint(run_dir)
    if bad is None or len(list_checkpoints(run_dir)) < 2:
        return ""
    return f"; to do so, move {bad} aside (e.g. rename it to {bad.name}.damaged) and run with --resume again"


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (output_dir of a run)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write")],
    ema: Annotated[bool, typer.Option(help="Export the EMA weights")] = False,
    dtype: Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16 (default: the teacher's)")] = None,
    overwrite: Annotated[bool, typer.Option()] = False,
) -> None:
    """Merge the student into the backbone and write a diffusers folder + the adapter file."""
    from wadi_train.export import export_run

    _setup()
    path = _run(lambda: export_run(run_dir, output, use_ema=ema, dtype=dtype, overwrite=overwrite))
    out.print(f"exported: {path}")


@app.command()
def generate(
    model: Annotated[Path, typer.Argument(help="Folder written by `wadi-train export`")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG to write (a grid when several images)")] = Path("grid.png"),
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Text prompt(s) for a text-conditioned (SD) export, repeatable; cycled over -n")] = None,
    class_: Annotated[Optional[list[int]], typer.Option("--class", help="Class label(s) (repeatable)")] = None,
    n: Annotated[Optional[int], typer.Option("-n", help="Number of images (default: 16 for classes, one per prompt)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    height: Annotated[Optional[int], typer.Option(help="Height in pixels (beyond training size is allowed; SD: a multiple of 8)")] = None,
    width: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    dtype: Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16 (default: float32 on CPU, else the export's)")] = None,
) -> None:
    """One-step sampling from an exported student into a PNG (class labels or text prompts)."""
    from wadi_train.errors import OptionError, WadiError
    from wadi_train.generate import generate as gen
    from wadi_train.generate import generate_from_prompts, save_grid, save_images

    _setup()
    def work() -> int:
        if prompt and class_:
            raise OptionError("--prompt and --class: give one, prompts for a text-conditioned export, classes for a class-conditional one")
        if prompt:
            images = generate_from_prompts(model, prompt, n, seed, height, width, device, dtype)
        else:
            images = gen(model, class_, 16 if n is None else n, seed, height, width, device, dtype)
        try:
            (save_images if prompt else save_grid)(images, output)
        except OSError as exc:
            raise WadiError(f"{output}: cannot write the image ({exc.strerror or exc})") from None
        return images.shape[0]

    count = _run(work)
    out.print(f"{count} samples: {output}")


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Argument(help="Folder written by `wadi-train export`")],
    prompts: Annotated[Optional[Path], typer.Option(help="Captions: .txt (one a line), .csv/.tsv (caption column), COCO captions_*.json")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Folder of reference images, or .npz statistics (mu, sigma)")] = None,
    n: Annotated[Optional[int], typer.Option("-n", help="Images to generate", show_default="30000")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(help="FID Inception-v3 weights (pytorch-fid / torch-fidelity .pth)")] = None,
    clip: Annotated[Optional[Path], typer.Option(help="Local transformers CLIP folder")] = None,
    clip_score: Annotated[Optional[bool], typer.Option("--clip-score/--no-clip-score", help="Compute the CLIP score", show_default="on")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML with any of these settings (flags win)")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for results.json and samples.png")] = Path("eval"),
    prompt_column: Annotated[Optional[str], typer.Option(help="Caption column of a .csv/.tsv")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Caption choice and noise", show_default="0")] = None,
    batch_size: Annotated[Optional[int], typer.Option(show_default="16")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Image side in pixels", show_default="training size")] = None,
    device: Annotated[Optional[str], typer.Option(show_default="cpu")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16")] = None,
    save_images: Annotated[bool, typer.Option("--save-images", help="Also write every image to OUT/images/")] = False,
    save_reference_stats: Annotated[Optional[Path], typer.Option(help="Write the reference folder's statistics to this .npz")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """FID and CLIP score of an exported one-step student over a caption file (COCO-30K style)."""
    from wadi_train.evaluation.model_eval import evaluate_model, load_eval_config

    _setup(quiet)
    flags = {
        "prompts": prompts, "reference": reference, "n": n, "inception_weights": inception_weights, "clip": clip, "clip_score": clip_score,
        "prompt_column": prompt_column, "seed": seed, "batch_size": batch_size, "resolution": resolution, "device": device, "dtype": dtype,
        "save_images": save_images or None, "save_reference_stats": save_reference_stats,
    }

    def work() -> dict:
        cfg = load_eval_config(config, flags)
        bar = Progress(TextColumn("[bold]{task.fields[stage]:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=quiet)
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task("", total=total, stage=stage)
            bar.update(tasks[stage], completed=done)

        with bar:
            return evaluate_model(model, output, cfg, progress)

    res = _run(work)
    clip_text = "" if res["clip_score"] is None else f", CLIP score {res['clip_score']:.2f}"
    out.print(f"FID {res['fid']:.3f}{clip_text} ({res['n']} images at {res['resolution']} px): {output / 'results.json'}")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Where the reports go")] = Path("reports/digits"),
    cache: Annotated[Path, typer.Option(help="Cache for the teacher and the classifier")] = Path(".cache/wadi_train"),
    quick: Annotated[bool, typer.Option(help="A few steps of everything (CI, smoke test; under 3 minutes)")] = False,
    retrain: Annotated[bool, typer.Option(help="Retrain the cached teacher")] = False,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Runs trained side by side, in processes (default: one per core, at most 4)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """The main job: digits teacher -> weightlens analysis -> one-step students -> evaluation."""
    from dataclasses import replace

    from rich.table import Table

    from wadi_train.demo.pipeline import run_digits_demo
    from wadi_train.demo.settings import FULL, QUICK

    _setup(quiet)

    def work() -> None:
        bar = Progress(TextColumn("[bold]{task.fields[stage]:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"), console=err, disable=quiet)
        tasks: dict[str, int] = {}

        def stage(name: str, done: int, total: int, note: str) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(note, total=total, stage=name)
            bar.update(tasks[name], completed=done, total=total, description=note)

        with bar:
            settings = replace(QUICK if quick else FULL, workers=workers)
            doc = run_digits_demo(output, cache, settings, retrain=retrain, stage=stage)
        table = Table("model", "steps", "FID", "accuracy", "ms/img", "params", title="digits: one-step students vs the teacher")
        for r in doc["results"]:
            table.add_row(r["name"], str(r["steps"]), f"{r['fid']:.3g}", f"{r['accuracy']:.1%}", f"{r['ms_per_image']:.3g}", f"{r['trainable_params']:,}" if r["trainable_params"] else "–")
        out.print(table)
        out.print(f"report: {output / 'index.html'}  ({doc['seconds']:.0f} s)")

    _run(work)


if __name__ == "__main__":  # `python -m wadi_train.cli` (subprocess tests)
    app()
