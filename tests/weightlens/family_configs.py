"""Test helper: scaled-down versions of the published configs of each model family.

Each config keeps the real model's structure (block types and counts per stage, layers per
block, transformer depth per block, linear vs conv projections, cross-attention, added
conditioning, head layout relative to width) and shrinks only the widths and layer counts,
so diffusers builds it in milliseconds. Sources: the `unet/config.json` or
`transformer/config.json` of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0,
PixArt-alpha/PixArt-XL-2-512x512, stabilityai/stable-diffusion-3-medium-diffusers and
black-forest-labs/FLUX.1-dev (values in the comments are the published ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from weightlens.planted import Plant, plant_student

RANK = 3  # rank of every planted LoRaD rotation


@dataclass(frozen=True)
class Family:
    """One model family: how to build it and what the tests plant and expect.

    Attributes:
        name: short id (`sd15`, `flux`...).
        model_class: the diffusers class built from `config`.
        config: the scaled-down published config.
        rotate: weight keys planted with an exact rank-RANK LoRaD rotation.
        blocks: the matrix layers' blocks in forward order, as the report groups them.
        layers_per_block: U-Nets only (original LDM naming depends on it).
        component: the pipeline folder the denoiser lives in.
    """

    name: str
    model_class: str
    config: dict[str, Any]
    rotate: tuple[str, ...]
    blocks: tuple[str, ...]
    layers_per_block: int | None = None
    component: str = "transformer"
    scale: dict[str, float] = field(default_factory=dict)

    def build(self, seed: int = 0) -> torch.nn.Module:
        import diffusers

        torch.manual_seed(seed)
        return getattr(diffusers, self.model_class)(**self.config)


def _unet_blocks(levels: int, added: tuple[str, ...] = ()) -> tuple[str, ...]:
    return ("conv_in", *added, "time_embedding", *(f"down_blocks.{i}" for i in range(levels)), "mid_block", *(f"up_blocks.{i}" for i in range(levels)), "conv_out")


def _dit_blocks(head: tuple[str, ...], double: int, single: int, tail: tuple[str, ...]) -> tuple[str, ...]:
    return (*head, *(f"transformer_blocks.{i}" for i in range(double)), *(f"single_transformer_blocks.{i}" for i in range(single)), *tail)


SD15 = Family(
    name="sd15",
    model_class="UNet2DConditionModel",
    config={
        "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": (32, 64, 64, 64),  # (320, 640, 1280, 1280)
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 32,  # 768 (CLIP ViT-L/14)
        "attention_head_dim": 8,  # 8 heads (diffusers' legacy name for the head count)
        "norm_num_groups": 8,  # 32
    },
    rotate=(
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q.weight",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0.weight",
    ),
    scale={"up_blocks.1.resnets.2.conv1.weight": 1.05},
    blocks=_unet_blocks(4),
    layers_per_block=2,
    component="unet",
)

SD21 = Family(
    name="sd21",
    model_class="UNet2DConditionModel",
    config={
        **SD15.config,
        "sample_size": 12,  # 96 (768 px)
        "cross_attention_dim": 48,  # 1024 (OpenCLIP ViT-H/14)
        "attention_head_dim": (2, 4, 4, 4),  # (5, 10, 20, 20): 64-wide heads; here 16-wide
        "use_linear_projection": True,  # proj_in / proj_out are Linear, not 1x1 convs
    },
    rotate=(
        "down_blocks.1.attentions.0.proj_in.weight",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight",
    ),
    blocks=_unet_blocks(4),
    layers_per_block=2,
    component="unet",
)

_SDXL_POOLED = 16  # 1280 (OpenCLIP bigG pooled text embedding)
SDXL = Family(
    name="sdxl",
    model_class="UNet2DConditionModel",
    config={
        "sample_size": 16, "in_channels": 4, "out_channels": 4,
        "block_out_channels": (32, 64, 64),  # (320, 640, 1280)
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 3),  # (1, 2, 10)
        "attention_head_dim": (2, 4, 4),  # (5, 10, 20)
        "use_linear_projection": True,
        "cross_attention_dim": 48,  # 2048 (CLIP-L 768 + bigG 1280)
        "norm_num_groups": 8,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,  # 256
        "projection_class_embeddings_input_dim": _SDXL_POOLED + 6 * 8,  # 2816 = 1280 + 6 * 256
    },
    rotate=(
        "down_blocks.2.attentions.1.transformer_blocks.2.attn1.to_q.weight",
        "add_embedding.linear_1.weight",
        "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2.weight",
    ),
    blocks=_unet_blocks(3, added=("add_embedding",)),
    layers_per_block=2,
    component="unet",
)

PIXART = Family(
    name="pixart_alpha",
    model_class="PixArtTransformer2DModel",
    config={
        "num_layers": 3,  # 28
        "num_attention_heads": 2, "attention_head_dim": 8,  # 16 x 72 = 1152
        "in_channels": 4, "out_channels": 8, "patch_size": 2, "sample_size": 8,  # sample 64
        "cross_attention_dim": 16,  # 1152
        "caption_channels": 32,  # 4096 (T5-XXL)
        "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000,
        "activation_fn": "gelu-approximate", "attention_bias": True,
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "use_additional_conditions": False,
    },
    rotate=(
        "transformer_blocks.1.attn2.to_k.weight",
        "transformer_blocks.2.ff.net.0.proj.weight",
        "caption_projection.linear_1.weight",
    ),
    blocks=_dit_blocks(("pos_embed", "adaln_single", "caption_projection"), 3, 0, ("proj_out", "scale_shift_table")),
)

SD3 = Family(
    name="sd3",
    model_class="SD3Transformer2DModel",
    config={
        "sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16,  # sample 128
        "num_layers": 3,  # 24; the last block is context_pre_only, as in the real model
        "attention_head_dim": 8, "num_attention_heads": 2,  # 64 x 24 = 1536
        "joint_attention_dim": 32,  # 4096
        "caption_projection_dim": 16,  # 1536
        "pooled_projection_dim": 24,  # 2048
        "pos_embed_max_size": 16,  # 192
    },
    rotate=(
        "transformer_blocks.0.attn.add_q_proj.weight",
        "transformer_blocks.2.attn.to_v.weight",
        "context_embedder.weight",
    ),
    blocks=_dit_blocks(("pos_embed", "context_embedder", "time_text_embed"), 3, 0, ("norm_out", "proj_out")),
)

FLUX = Family(
    name="flux",
    model_class="FluxTransformer2DModel",
    config={
        "patch_size": 1, "in_channels": 16,  # 64
        "num_layers": 2, "num_single_layers": 3,  # 19, 38
        "attention_head_dim": 8, "num_attention_heads": 2,  # 128 x 24 = 3072
        "joint_attention_dim": 32,  # 4096
        "pooled_projection_dim": 24,  # 768
        "guidance_embeds": True,  # FLUX.1-dev (schnell: False)
        "axes_dims_rope": (2, 2, 4),  # (16, 56, 56), sums to the head dim
    },
    rotate=(
        "transformer_blocks.1.attn.to_add_out.weight",
        "single_transformer_blocks.2.proj_out.weight",
        "single_transformer_blocks.0.proj_mlp.weight",
    ),
    blocks=_dit_blocks(("x_embedder", "context_embedder", "time_text_embed"), 2, 3, ("norm_out", "proj_out")),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, SD21, SDXL, PIXART, SD3, FLUX)}


@dataclass(frozen=True)
class FamilyPair:
    """A seeded teacher, its planted student and the model they load into."""

    family: Family
    model: torch.nn.Module
    teacher: dict[str, torch.Tensor]
    student: dict[str, torch.Tensor]


def planted_pair(family: Family, seed: int = 0) -> FamilyPair:
    """Teacher from config; student = teacher with exact rank-RANK rotations on `rotate`
    (and pure norm scalings on `scale`), every other tensor copied exactly."""
    model = family.build(seed)
    teacher = {k: v.detach().clone() for k, v in model.state_dict().items()}
    missing = [k for k in (*family.rotate, *family.scale) if k not in teacher]
    assert not missing, f"{family.name}: planted keys not in the model: {missing}"
    student = plant_student(teacher, Plant(rotate=dict.fromkeys(family.rotate, RANK), scale=family.scale), seed=seed + 1)
    return FamilyPair(family, model, teacher, student)
