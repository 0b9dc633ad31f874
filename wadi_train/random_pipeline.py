"""Stable Diffusion pipelines with random weights, built from config (nothing downloads).

For benchmarks, GPU checks and tests on machines without model weights: `random_sd_pipeline`
builds a stock diffusers `StableDiffusionPipeline` (U-Net, VAE, CLIP text encoder, tokenizer,
DDPM scheduler) from a preset of configs, seeded, and `save_pretrained` turns it into a pipeline
folder that `model.pretrained`, `wadi-train export` and `wadi-train generate --prompt` accept.
Presets are a registry: `sd15` has SD1.5's shapes (diffusers' configs of
stable-diffusion-v1-5: 860M-parameter U-Net, 84M VAE, 123M text encoder), `tiny` is a toy of
the same architecture for CPU tests. The tokenizer is byte-level with no merges (one token per
character, `byte_level_clip_tokenizer`): CLIP's vocabulary is data, not config, and random
weights do not care which ids a prompt gets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from wadi_train.errors import ConfigError

__all__ = ["PRESETS", "PipelinePreset", "byte_level_clip_tokenizer", "random_sd_pipeline"]

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class PipelinePreset:
    """Configs of the parts of an SD-style pipeline (diffusers / transformers keyword args)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]  # CLIPTextConfig fields; vocab_size None = the tokenizer's
    scheduler: dict[str, Any]
    max_length: int = 77


_SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1,
}

PRESETS: dict[str, PipelinePreset] = {
    # stable-diffusion-v1-5: unet/, vae/ and text_encoder/ config.json (the fields that matter).
    "sd15": PipelinePreset(
        unet={
            "sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        },
        vae={
            "sample_size": 512, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "scaling_factor": 0.18215,
        },
        text_encoder={
            "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
        },
        scheduler=_SD_SCHEDULER,
    ),
    # The same architecture at toy size: 8x8 latents (32 px: the VAE downsamples 4x).
    "tiny": PipelinePreset(
        unet={
            "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
            "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        },
        vae={
            "sample_size": 32, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [8, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        },
        text_encoder={
            "vocab_size": None, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
            "num_hidden_layers": 2, "max_position_embeddings": 77, "projection_dim": 32,
        },
        scheduler=_SD_SCHEDULER,
    ),
}


def byte_level_clip_tokenizer(max_length: int = 77) -> Any:
    """A CLIPTokenizer over the 256 byte-level symbols, no merges (one token per character).

    Ids: 0 = BOS, 1 = EOS (also padding), then the symbols, then the symbols ending a word.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([BOS, EOS, *symbols, *(s + "</w>" for s in symbols)])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_encoder(fields: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    fields = {**fields, "vocab_size": fields.get("vocab_size") or len(tokenizer)}
    if fields["vocab_size"] < len(tokenizer):
        raise ConfigError(f"text_encoder vocab_size {fields['vocab_size']} < the tokenizer's {len(tokenizer)} tokens; raise vocab_size")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return CLIPTextModel(CLIPTextConfig(**fields, **ids))


def random_sd_pipeline(preset: str | PipelinePreset = "tiny", seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A stock `StableDiffusionPipeline` with seeded random weights, built from a preset.

    Args:
        preset: a name in `PRESETS` or a `PipelinePreset`.
        seed: seeds the weights (same seed, same device: same weights).
        device: where the weights are created (creating SD1.5 on a GPU takes a second,
            on a CPU several).
        dtype: the weights' dtype after init (init itself runs in float32).

    Returns:
        The pipeline (no safety checker); `.save_pretrained(folder)` writes a pipeline folder.
    """
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"pipeline preset {preset!r}: known presets are {sorted(PRESETS)}")
        preset = PRESETS[preset]
    tokenizer = byte_level_clip_tokenizer(preset.max_length)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**preset.unet)
        vae = AutoencoderKL(**preset.vae)
        text_encoder = _text_encoder(preset.text_encoder, tokenizer)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDPMScheduler(**preset.scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
