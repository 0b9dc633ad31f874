"""Every shipped family config validates and trains: the real files, scaled-down architectures.

Each `configs/*.yaml` is loaded as a user would load it, with only the teacher swapped for a
tiny model of the same architecture (SD1.5, SD2.1, PixArt-alpha, SDXL), the data for random
precomputed embeddings of the right shapes, and the size of the run cut to 2 CPU steps. The
full-size SD1.5 / SD2.1 student parameter counts are checked against the paper on `meta`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from wadi_train.config import load_config, validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

_SD_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
    "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
    "norm_num_groups": 8, "attention_head_dim": 8,
}
_PIXART: dict[str, Any] = {
    "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
    "out_channels": 8, "sample_size": 8, "patch_size": 2, "cross_attention_dim": 16,
    "caption_channels": 32, "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000,
}
_POOLED = 16  # SDXL-like pooled text embedding width; time ids add 6 * addition_time_embed_dim
_SDXL: dict[str, Any] = {
    **_SD_UNET, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
    "transformer_layers_per_block": 1, "attention_head_dim": [2, 4],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": _POOLED + 6 * 8,
}

# config file -> (tiny model config, embedding width, extra tensors in the embeddings file)
FAMILY_CONFIGS: dict[str, tuple[dict[str, Any], int, tuple[str, ...]]] = {
    "sd15.yaml": (_SD_UNET, 32, ()),
    "sd21.yaml": ({**_SD_UNET, "use_linear_projection": True, "attention_head_dim": [2, 4]}, 32, ()),
    "pixart_alpha_512.yaml": (_PIXART, 32, ("attention_mask",)),
    "sdxl.yaml": (_SDXL, 32, ("text_embeds",)),
}

# The real U-Nets' shapes (diffusers' unet/config.json of each pipeline, the parts that matter).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD21_UNET: dict[str, Any] = {**SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}


def _embeddings(path: Path, width: int, extras: tuple[str, ...], rows: int = 5, tokens: int = 8) -> Path:
    """Random precomputed embeddings: `rows - 1` prompts and the empty prompt last."""
    gen = torch.Generator().manual_seed(0)
    data = {"embeddings": torch.randn(rows, tokens, width, generator=gen)}
    if "text_embeds" in extras:
        data["text_embeds"] = torch.randn(rows, _POOLED, generator=gen)
    if "attention_mask" in extras:  # T5-style padding: prompt i has 3 + i tokens
        data["attention_mask"] = (torch.arange(tokens) < 3 + torch.arange(rows)[:, None]).float()
    save_file(data, path)
    return path


def _tiny_overrides(name: str, tmp_path: Path) -> list[str]:
    model, width, extras = FAMILY_CONFIGS[name]
    emb = _embeddings(tmp_path / "embeddings.safetensors", width, extras)
    overrides = [
        "model.pretrained=null", f"model.config={json.dumps(model)}", f"data.embeddings={emb}",
        "data.prompts=null", "adapter.rank=4", "fake.rank=2", "train.steps=2", "train.batch_size=2",
        "train.grad_accum=1", "train.log_every=1", "train.checkpoint_every=2", "train.device=cpu",
        f"output_dir={tmp_path / 'run'}",
    ]
    # fp16 autocast needs a GPU; bf16 runs on CPU, so the bf16 configs keep theirs
    if load_config(CONFIGS / name).train.mixed_precision == "fp16":
        overrides.append("train.mixed_precision='no'")  # quoted: YAML reads a bare no as false
    return overrides


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_family_config_trains_two_steps(name: str, tmp_path: Path) -> None:
    from wadi_train.train import train

    cfg = load_config(CONFIGS / name, _tiny_overrides(name, tmp_path))
    assert validate(cfg) == []
    res = train(cfg)
    assert res.steps == 2 and res.nonfinite_skipped == 0
    metrics = pd.read_csv(res.run_dir / "metrics.csv")
    assert len(metrics) == 2
    assert metrics[["loss_student", "loss_fake", "grad_norm_student", "grad_norm_fake"]].map(math.isfinite).all().all()
    assert metrics["theta_abs_mean"].iloc[-1] > 0  # the student moved


def test_config_files_parse_and_name_their_placeholders() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        problems = validate(cfg, check_files=False)
        assert problems == [], (path.name, problems)
        assert path.read_text().startswith("#"), f"{path.name}: no header comment"
    for name in FAMILY_CONFIGS:
        cfg = load_config(CONFIGS / name)
        assert cfg.model.pretrained and cfg.model.pretrained.startswith("/models/"), name
        assert cfg.model.conditioning == "text" and cfg.vsd.teacher_cfg == cfg.vsd.fake_cfg == 1.5
        assert (cfg.optim.student_lr, cfg.optim.fake_lr, cfg.fake.rank) == (1e-4, 1e-2, 32)
    sd15, sd21 = load_config(CONFIGS / "sd15.yaml"), load_config(CONFIGS / "sd21.yaml")
    pixart, sdxl = load_config(CONFIGS / "pixart_alpha_512.yaml"), load_config(CONFIGS / "sdxl.yaml")
    assert (sd15.model.prediction_type, sd15.train.mixed_precision, sd15.adapter.rank) == ("epsilon", "fp16", 256)
    assert (sd21.model.prediction_type, sd21.data.resolution) == ("v_prediction", 768)
    assert (pixart.model.family, pixart.adapter.rank, pixart.train.mixed_precision) == ("pixart_transformer", 128, "bf16")
    assert pixart.data.embeddings and sdxl.data.embeddings and sdxl.data.resolution == 1024


def test_accelerate_configs_load() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    one, eight, multi = (load_config_from_file(str(CONFIGS / "accelerate" / f"{n}.yaml")) for n in ("1gpu", "8gpu", "multinode"))
    assert (one.num_processes, eight.num_processes) == (1, 8)
    assert eight.distributed_type == multi.distributed_type == "MULTI_GPU"
    assert multi.num_machines > 1 and multi.main_process_ip and multi.num_processes % multi.num_machines == 0


@pytest.mark.parametrize(("name", "unet", "modules", "millions"), [("sd15.yaml", SD15_UNET, 182, 83.80), ("sd21.yaml", SD21_UNET, 214, 94.43)])
def test_full_size_student_matches_paper(name: str, unet: dict[str, Any], modules: int, millions: float, tmp_path: Path) -> None:
    from wadi_train.sizes import describe, trainable_counts

    prompts = tmp_path / "captions.txt"
    prompts.write_text("a photo of a cat\n")
    cfg = load_config(CONFIGS / name, ["model.pretrained=null", f"model.config={json.dumps(unet)}", f"data.prompts={prompts}"])
    assert validate(cfg) == []
    counts = trainable_counts(cfg)
    assert counts["student"][0] == modules
    assert round(counts["student"][1] / 1e6, 2) == millions
    assert f"{millions:.2f}M trainable" in describe(cfg)[1]


def test_digits_config_trains_two_steps(tmp_path: Path) -> None:
    from wadi_train.train import train

    from safetensors.torch import save_file

    real = tmp_path / "real.safetensors"  # the demo writes this file into its cache
    save_file({"images": torch.rand(4, 1, 8, 8) * 2 - 1, "class_labels": torch.arange(4)}, real)
    overrides = ["model.weights=null", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2", "train.log_every=1", f"output_dir={tmp_path / 'run'}", f"data.real_images={real}"]
    cfg = load_config(CONFIGS / "digits.yaml", overrides)
    assert cfg.vsd.gan_weight > 0 and cfg.fake.reuse_vsd_forward
    assert validate(cfg) == []
    res = train(cfg)
    assert res.steps == 2 and math.isfinite(res.last["loss_student"]) and math.isfinite(res.last["loss_fake"])


def test_call_paths_pass_padding_mask_and_added_conditions() -> None:
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    from wadi_train.models import Cond, denoise

    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 10])
    text = torch.randn(2, 8, 32)
    pixart = PixArtTransformer2DModel.from_config(_PIXART).eval()
    mask = torch.tensor([[1.0] * 3 + [0.0] * 5, [1.0] * 8])
    got = denoise(pixart, "pixart_transformer", x, t, Cond(encoder_hidden_states=text, extra={"encoder_attention_mask": mask}))
    want = pixart(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, encoder_attention_mask=mask).sample[:, :4]
    torch.testing.assert_close(got, want)
    unmasked = denoise(pixart, "pixart_transformer", x, t, Cond(encoder_hidden_states=text))
    assert not torch.allclose(unmasked[0], got[0]) and torch.allclose(unmasked[1], got[1], atol=1e-5)
    sdxl = UNet2DConditionModel.from_config(_SDXL).eval()
    added = {"text_embeds": torch.randn(2, _POOLED), "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]]).expand(2, -1)}
    got = denoise(sdxl, "unet2d_condition", x, t, Cond(encoder_hidden_states=text, extra=added))
    torch.testing.assert_close(got, sdxl(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample)


@pytest.mark.parametrize(("key", "shape"), [("text_embeds", (4, 16)), ("attention_mask", (5, 7))])
def test_embeddings_file_with_mismatched_rows_is_refused(key: str, shape: tuple[int, int], tmp_path: Path) -> None:
    from wadi_train.data import load_embeddings
    from wadi_train.errors import ConfigError

    path = tmp_path / "emb.safetensors"
    save_file({"embeddings": torch.zeros(5, 8, 32), key: torch.zeros(shape)}, path)
    with pytest.raises(ConfigError, match=key):
        load_embeddings(path)
