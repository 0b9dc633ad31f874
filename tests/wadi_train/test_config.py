"""The typed run config: YAML + dotted overrides, unknown keys and wrong types, all problems at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny import tiny_config

from wadi_train.config import RunConfig, from_dict, load_config, to_dict, validate
from wadi_train.errors import ConfigError

# Stable Diffusion 1.5's U-Net (its published config.json, defaults left out)
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_dotted_overrides_are_typed(tmp_path: Path, tiny_teacher: Path) -> None:
    path = _write(tmp_path, tiny_config(tmp_path, tiny_teacher))
    cfg = load_config(path, ["optim.student_lr=1e-5", "optim.fake_lr=1", "train.steps=7", "optim.grad_clip=null", "optim.betas=[0.5, 0.9]", "vsd.weighting=uniform", "name=other"])
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.student_lr == 1e-5 and isinstance(cfg.optim.student_lr, float)  # YAML 1.1 reads `1e-5` as a string
    assert cfg.optim.fake_lr == 1.0 and isinstance(cfg.optim.fake_lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.grad_clip is None and cfg.optim.betas == [0.5, 0.9]
    assert cfg.name == "other" and cfg.model.config["block_out_channels"] == [16, 32]
    assert cfg.train.batch_size == 2 and cfg.adapter.rank == 4  # from the file, untouched
    assert cfg.data.prompts is None and cfg.vsd.t_min == 20  # defaults fill the rest
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.studnet_lr=1e-5", "optim.studnet_lr: unknown key (did you mean 'student_lr'?)"),
        ("optimizer.lr=1e-5", "optimizer: unknown key (did you mean 'optim'?)"),
        ("train.stpes=3", "did you mean 'steps'?"),
        ("train.zzz=3", "valid keys: steps, batch_size"),
    ],
)
def test_unknown_keys_are_rejected_with_a_suggestion(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_unknown_key_in_the_file(tmp_path: Path, tiny_teacher: Path) -> None:
    data = tiny_config(tmp_path, tiny_teacher, adapter={"rnak": 8})
    with pytest.raises(ConfigError, match=r"adapter\.rnak: unknown key \(did you mean 'rank'\?\)"):
        load_config(_write(tmp_path, data))


def test_wrong_types_are_all_reported() -> None:
    data = {"train": {"steps": "many", "batch_size": 2.5, "gradient_checkpointing": 1}, "optim": {"student_lr": "fast", "betas": 0.9}, "data": {"classes": [1, "two"]}, "model": "sd15", "oops": 1}
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    msg = str(info.value)
    for where in ("train.steps: expected int", "train.batch_size: expected int", "train.gradient_checkpointing: expected bool", "optim.student_lr: expected float", "optim.betas: expected list", "data.classes[1]: expected int, got str 'two'", "model: expected a mapping", "oops: unknown key"):
        assert where in msg, (where, msg)


def test_list_items_are_typed() -> None:
    assert load_config(None, ["optim.betas=[1, 0.99]"]).optim.betas == [1.0, 0.99]
    with pytest.raises(ConfigError, match=r"optim\.betas\[0\]: expected float, got str 'a'"):
        load_config(None, ["optim.betas=[a, 0.99]"])  # used to pass and fail later inside AdamW


def test_bad_override_syntax_and_files() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optim.student_lr"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["name=run", "name.x=1"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("/no/such/config.yaml")


def test_validate_reports_every_problem_at_once(tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = load_config(
        _write(tmp_path, tiny_config(tmp_path, tiny_teacher)),
        ["model.prediction_type=x0", "vsd.t_min=900", "vsd.t_max=100", f"adapter.ranks_file={tmp_path / 'missing' / 'ranks.json'}", "optim.student_lr=-1e-4", "train.mixed_precision=fp8"],
    )
    problems = validate(cfg)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for fragment in ("model.prediction_type = 'x0'", "t_min must not exceed t_max", "adapter.ranks_file", "no such file", "optim.student_lr = -0.0001", "train.mixed_precision = 'fp8'"):
        assert fragment in text, (fragment, text)


def test_validate_accepts_the_tiny_config(tmp_path: Path, tiny_teacher: Path) -> None:
    assert validate(from_dict(tiny_config(tmp_path, tiny_teacher))) == []


def test_text_conditioning_needs_prompts(tmp_path: Path) -> None:
    cfg = from_dict({"model": {"config": SD15_UNET, "conditioning": "text"}})
    assert any(p.startswith("data.prompts") for p in validate(cfg))


def test_sd15_student_at_rank_256_has_the_papers_size(tmp_path: Path) -> None:
    """DESIGN §5: rank 256 on every Linear in down/up/mid blocks = 83.80M on SD1.5 (meta device)."""
    from wadi_train.sizes import describe, trainable_counts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na watercolour of a lighthouse\n")
    cfg = from_dict({"model": {"config": SD15_UNET, "conditioning": "text"}, "data": {"prompts": str(prompts)}, "adapter": {"rank": 256}})
    assert validate(cfg) == []
    counts = trainable_counts(cfg)
    assert round(counts["backbone"][1] / 1e6, 2) == 859.52
    assert round(counts["student"][1] / 1e6, 2) == 83.80
    assert counts["fake"][1] < counts["student"][1] / 4
    assert "83.80M trainable parameters" in describe(cfg)[1]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [  # each of these used to pass validate and fail later (KeyError, ZeroDivisionError, IndexError)
        ("model.family=dit", "model.family = 'dit'"),
        ("train.checkpoint_every=0", "train.checkpoint_every = 0"),
        ("train.log_every=0", "train.log_every = 0"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints = 0"),
        ("vsd.fake_t_min=-5", "vsd.fake_t_min = -5"),
        ("vsd.generator_timestep=1000", "vsd.generator_timestep = 1000"),
        ("data.classes=[1, 2, 10]", "data.classes: [10] outside [0, model.num_classes = 10)"),
        ("optim.lr_schedule=linear", "optim.lr_schedule = 'linear'"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio = 1.5"),
        ("vsd.gan_t_max=5", "vsd.gan_t_max = 5"),
    ],
)
def test_validate_catches_what_would_fail_during_training(override: str, fragment: str, tmp_path: Path, tiny_teacher: Path) -> None:
    problems = validate(load_config(_write(tmp_path, tiny_config(tmp_path, tiny_teacher)), [override]))
    assert len(problems) == 1 and fragment in problems[0], problems


def test_cli_validate_prints_the_sd15_sizes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wadi_train.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    path = _write(tmp_path, {"model": {"config": SD15_UNET, "conditioning": "text"}, "data": {"prompts": str(prompts)}})
    res = CliRunner().invoke(app, ["validate", str(path), "adapter.rank=256"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long lines at the console width
    assert "backbone: unet2d_condition, 859.52M parameters" in text
    assert "student: lorad, 182 modules, 83.80M trainable parameters" in text
    assert "fake: lorad" in text and "config is valid" in text
