"""Downstream use of an exported text-conditioned student: `generate --prompt` and ControlNet.

A tiny Stable Diffusion pipeline (random weights, the SD1.5 architecture at toy size, built
offline by `wadi_train.random_pipeline`) is the teacher; two VSD steps with a large learning
rate make a student whose merged weights clearly differ from it; `export` writes the pipeline
folder. The stock diffusers pipelines must load that folder and, run at t = 999 with the
student, give exactly what `wadi-train generate --prompt` gives (paper §5: a ControlNet trained
for the teacher drives the one-step student).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from tiny import tiny_config
from typer.testing import CliRunner, Result

from wadi_train.cli import app

PROMPTS = ["a red cube on a table", "a photo of a cat"]
TRAIN_SIZE = 32  # the tiny preset: 8x8 latents, the VAE downsamples 4x


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def _clean_error(res: Result) -> str:
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.output
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(teacher pipeline folder, exported student pipeline folder)."""
    from wadi_train.random_pipeline import random_sd_pipeline

    root = tmp_path_factory.mktemp("sd")
    teacher = root / "teacher"
    random_sd_pipeline("tiny", seed=0).save_pretrained(teacher)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = {
        "name": "tiny-sd", "output_dir": str(root / "run"),
        "model": {"pretrained": str(teacher), "conditioning": "text"},
        "data": {"prompts": str(root / "prompts.txt")},
        "adapter": {"method": "lorad", "rank": 4}, "fake": {"rank": 2},
        "optim": {"student_lr": 0.05},  # large: the student must visibly differ from the teacher
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "ema_decay": None, "seed": 1},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = _invoke("run", root / "config.yaml", "-q")
    assert res.exit_code == 0, res.output
    res = _invoke("export", root / "run", "-o", root / "export")
    assert res.exit_code == 0, res.output
    return teacher, root / "export"


def _noise(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """The noise `generate_from_prompts` draws for n images of size x size px (seed `seed`)."""
    return torch.randn(n, 4, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))


def _stock(cls: Any, folder: Path, **parts: Any) -> Any:
    """A stock diffusers pipeline from `folder` that steps exactly once, at t = 999."""
    from diffusers import DDPMScheduler

    pipe = cls.from_pretrained(folder, local_files_only=True, **parts)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generate_prompt_writes_one_image_per_prompt(sd_export: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL import Image

    _, export = sd_export
    png = tmp_path / "out.png"
    res = _invoke("generate", export, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", 3, "-o", png)
    assert res.exit_code == 0, res.output
    assert "2 samples" in res.output
    with Image.open(png) as img:  # 1x2 grid at the images' own size, 1-px gutters
        assert img.size == (2 * (TRAIN_SIZE + 1) + 1, TRAIN_SIZE + 2)
        grid = np.asarray(img.convert("RGB"))
    left, right = grid[1:-1, 1 : 1 + TRAIN_SIZE], grid[1:-1, 2 + TRAIN_SIZE : -1]
    assert left.std() > 1.0 and not np.array_equal(left, right)


def test_generate_prompt_beyond_training_size(sd_export: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL import Image

    from wadi_train.generate import generate_from_prompts

    _, export = sd_export
    png = tmp_path / "wide.png"
    res = _invoke("generate", export, "-p", PROMPTS[1], "--height", 64, "--width", 96, "-o", png)
    assert res.exit_code == 0, res.output
    with Image.open(png) as img:
        assert img.size == (96, 64)  # a lone image: no gutters
    images = generate_from_prompts(export, PROMPTS, n=3, seed=5, height=64, width=96, batch_size=2)
    assert images.shape == (3, 3, 64, 96) and torch.isfinite(images).all()
    assert images.abs().max() <= 1.0 and images.std() > 0.01
    one_batch = generate_from_prompts(export, PROMPTS, n=3, seed=5, height=64, width=96, batch_size=3)
    torch.testing.assert_close(images, one_batch, atol=1e-5, rtol=0)  # noise fixed by the seed, not the batching


@pytest.mark.parametrize(("args", "fragment"), [
    (["--height", 30], "--height 30: must be a positive multiple of 4 (the VAE downsamples by 4); try --height 32"),
    (["--width", 0], "--width 0: must be a positive multiple of 4"),
    (["--class", 3], "--prompt and --class: give one"),
    (["--dtype", "float8"], "--dtype 'float8': use float32, float16 or bfloat16"),
])
def test_generate_prompt_bad_options_are_clean_errors(sd_export: tuple[Path, Path], tmp_path: Path, args: list[object], fragment: str) -> None:
    _, export = sd_export
    text = _clean_error(_invoke("generate", export, "--prompt", "a cat", "-o", tmp_path / "x.png", *args))
    assert fragment in text
    assert not (tmp_path / "x.png").exists()


def test_generate_without_prompt_on_text_export_is_a_clean_error(sd_export: tuple[Path, Path], tmp_path: Path) -> None:
    _, export = sd_export
    assert "text-conditioned export; give a prompt" in _clean_error(_invoke("generate", export, "-o", tmp_path / "x.png"))


def test_generate_prompt_on_class_export_is_a_clean_error(tmp_path: Path, tiny_teacher: Path) -> None:
    from wadi_train.config import from_dict
    from wadi_train.export import export_run
    from wadi_train.train import train

    train(from_dict(tiny_config(tmp_path, tiny_teacher, train={"steps": 1, "checkpoint_every": 1})))
    export_run(tmp_path / "run", tmp_path / "export")
    text = _clean_error(_invoke("generate", tmp_path / "export", "--prompt", "a cat", "-o", tmp_path / "x.png"))
    assert "a class-conditional export; generate with --class" in text


def test_stock_pipeline_at_t999_matches_generate(sd_export: tuple[Path, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    from wadi_train.generate import generate_from_prompts

    _, export = sd_export
    ours = generate_from_prompts(export, PROMPTS, seed=7)
    pipe = _stock(StableDiffusionPipeline, export)
    stock = pipe(PROMPTS, timesteps=[999], guidance_scale=1.0, latents=_noise(2, TRAIN_SIZE, seed=7), output_type="pt").images
    torch.testing.assert_close(stock, (ours + 1) / 2, atol=1e-4, rtol=0)


def _trained_looking_controlnet(unet: Any) -> Any:
    """ControlNet.from_unet (the teacher's), its zero convolutions given small random weights,
    as after training; untrained, a ControlNet adds exactly nothing."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16))  # 4x down, as the VAE
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0, 0.5)
    return net.eval()


def test_controlnet_pipeline_runs_the_merged_student(sd_export: tuple[Path, Path]) -> None:
    from diffusers import StableDiffusionControlNetPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from wadi_train.generate import generate_from_prompts

    teacher_dir, export = sd_export
    teacher_unet = UNet2DConditionModel.from_pretrained(teacher_dir / "unet")
    controlnet = _trained_looking_controlnet(teacher_unet)
    student = _stock(StableDiffusionControlNetPipeline, export, controlnet=controlnet)
    teacher = _stock(StableDiffusionControlNetPipeline, teacher_dir, controlnet=controlnet)

    merged = load_file(export / "unet" / "diffusion_pytorch_model.safetensors")
    used = student.unet.state_dict()
    assert merged.keys() == used.keys() and all(torch.equal(merged[k], used[k]) for k in merged)
    changed = [k for k, v in teacher_unet.state_dict().items() if not torch.equal(v, used[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # LoRaD changed block Linears only

    gen = torch.Generator().manual_seed(11)
    edges = (torch.rand(1, 3, TRAIN_SIZE, TRAIN_SIZE, generator=gen) > 0.5).float()  # a control image in [0, 1]
    blank = torch.zeros_like(edges)

    def run(pipe: Any, image: torch.Tensor, scale: float = 1.0, output_type: str = "pt") -> torch.Tensor:
        return pipe(PROMPTS[1], image=image, timesteps=[999], guidance_scale=1.0, controlnet_conditioning_scale=scale, latents=_noise(1, TRAIN_SIZE, seed=2), output_type=output_type).images

    out = run(student, edges)
    assert out.shape == (1, 3, TRAIN_SIZE, TRAIN_SIZE) and torch.isfinite(out).all()
    assert (out - run(teacher, edges)).abs().max() > 5e-3  # the student's weights, not the teacher's
    assert (out - run(student, edges, scale=0.0)).abs().max() > 0.05  # the ControlNet steers it...
    latents = run(student, edges, output_type="latent")  # ...and so does the control image (a random
    assert (latents - run(student, blank, output_type="latent")).abs().max() > 1e-2  # VAE blurs it in pixels)
    alone = generate_from_prompts(export, [PROMPTS[1]], seed=2)  # ControlNet off == plain one-step generate
    torch.testing.assert_close(run(student, edges, scale=0.0), (alone + 1) / 2, atol=1e-4, rtol=0)
