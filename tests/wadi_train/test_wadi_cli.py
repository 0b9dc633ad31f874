"""The `wadi-train` CLI through Typer's CliRunner: exit codes, messages and the files written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from tiny import tiny_config
from typer.testing import CliRunner, Result

from wadi_train.cli import app

runner = CliRunner()


def _invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def _clean_error(res: Result) -> str:
    """The one-line user error: exit 1, no traceback; returns the output, whitespace-normalised."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output and "error:" in res.output, res.output
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    root = tmp_path_factory.mktemp("cli")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root, tiny_teacher, train={"steps": 2, "checkpoint_every": 10})))
    return path


@pytest.fixture(scope="module")
def run_dir(config_file: Path) -> Path:
    """A 2-step run made with `wadi-train run` (shared; tests that change it work on a copy)."""
    res = _invoke("run", config_file)
    assert res.exit_code == 0, res.output
    run = config_file.parent / "run"
    assert "2 steps, 0 skipped" in res.output, res.output
    return run


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    out = run_dir.parent / "export"
    res = _invoke("export", run_dir, "-o", out)
    assert res.exit_code == 0, res.output
    return out


def test_validate_good_config_prints_sizes(config_file: Path) -> None:
    from wadi_train.config import load_config
    from wadi_train.sizes import trainable_counts

    res = _invoke("validate", config_file)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    counts = trainable_counts(load_config(config_file))
    assert f"student: lorad, {counts['student'][0]} modules" in text
    assert f"fake: lorad, {counts['fake'][0]} modules" in text
    assert "backbone: unet2d_condition" in text and "config is valid" in text


def test_validate_bad_config_lists_every_problem(config_file: Path, tmp_path: Path) -> None:
    res = _invoke("validate", config_file, "model.prediction_type=x0", "vsd.t_min=900", "vsd.t_max=100", f"adapter.ranks_file={tmp_path / 'ranks.json'}", "optim.student_lr=-1", "train.mixed_precision=fp8")
    text = _clean_error(res)
    assert "5 problem(s)" in text
    for fragment in ("model.prediction_type = 'x0'", "t_min must not exceed t_max", "adapter.ranks_file", "optim.student_lr = -1.0", "train.mixed_precision = 'fp8'"):
        assert fragment in text, (fragment, text)


def test_validate_unknown_key_suggests(config_file: Path) -> None:
    text = _clean_error(_invoke("validate", config_file, "optim.studnet_lr=1e-5"))
    assert "did you mean 'student_lr'?" in text


def test_validate_missing_config_file(tmp_path: Path) -> None:
    assert "no such config file" in _clean_error(_invoke("validate", tmp_path / "nope.yaml"))


def test_run_writes_metrics_and_a_checkpoint(run_dir: Path) -> None:
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["step"].tolist() == [1, 2]
    assert np.isfinite(metrics[["loss_student", "loss_fake"]].to_numpy()).all()
    assert (run_dir / "checkpoints" / "step-000002" / "state.json").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "provenance.json").is_file()


def test_rerun_needs_resume_and_resume_continues(run_dir: Path, config_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    text = _clean_error(_invoke("run", config_file, f"output_dir={run}", "-q"))
    assert "--resume" in text
    res = _invoke("run", config_file, f"output_dir={run}", "train.steps=3", "--resume", "-q")
    assert res.exit_code == 0, res.output
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [1, 2, 3]
    assert (run / "checkpoints" / "step-000003").is_dir()


def test_export_loads_in_diffusers_and_refuses_to_overwrite(exported: Path, run_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(exported / "model")
    assert model.config.sample_size == 8
    assert (exported / "wadi_export.json").is_file() and (exported / "adapter.safetensors").is_file()
    text = _clean_error(_invoke("export", run_dir, "-o", exported))
    assert "--overwrite" in text
    res = _invoke("export", run_dir, "-o", exported, "--overwrite")
    assert res.exit_code == 0, res.output


def test_export_without_checkpoint_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    assert "no checkpoint" in _clean_error(_invoke("export", tmp_path / "run", "-o", tmp_path / "out"))


@pytest.mark.parametrize(("size", "extra"), [(8, []), (16, ["--height", "16", "--width", "16"])])
def test_generate_writes_a_png_grid(exported: Path, tmp_path: Path, size: int, extra: list[str]) -> None:
    from PIL import Image

    png = tmp_path / "grid.png"
    res = _invoke("generate", exported, "-n", "4", "--class", "3", "-o", png, *extra)
    assert res.exit_code == 0, res.output
    with Image.open(png) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        pixels = np.asarray(img)
    scale = max(1, 128 // size)
    assert pixels.shape == ((2 * (size + 1) + 1) * scale, (2 * (size + 1) + 1) * scale, 3)  # 2x2 grid, 1-px gutters
    grid = pixels[::scale, ::scale]  # undo the nearest-neighbour upscale
    tiles = [grid[1 + r * (size + 1) : 1 + r * (size + 1) + size, 1 + c * (size + 1) : 1 + c * (size + 1) + size] for r in (0, 1) for c in (0, 1)]
    assert all(tile.std() > 1.0 for tile in tiles)  # samples, not blank tiles
    assert len({tile.tobytes() for tile in tiles}) == 4  # four noises, four different samples


def test_generate_from_a_non_export_is_a_clean_error(tmp_path: Path) -> None:
    assert "not a wadi-train export" in _clean_error(_invoke("generate", tmp_path, "-o", tmp_path / "g.png"))
