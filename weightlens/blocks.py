"""Group layer names into the blocks users think in, in depth order.

U-Nets: conv_in, time/added embeddings, down_blocks.N, mid_block, up_blocks.N, conv_out
(original LDM names, when kept: input_blocks.N, middle_block, output_blocks.N).
DiTs: patch/pos embedding, conditioning embedders, transformer_blocks.N (PixArt, SD3, Flux's
double-stream blocks), then single_transformer_blocks.N (Flux), then the output norm and
projection. Original (non-diffusers) DiT names group the same way: blocks.N (PixArt),
joint_blocks.N (SD3), double_blocks.N then single_blocks.N (Flux), final_layer.
"""

from __future__ import annotations

import re

__all__ = ["block_of", "depth_key"]

_INDEXED = (
    "down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks", "layers",
    "input_blocks", "output_blocks", "joint_blocks", "double_blocks", "single_blocks",
)
_BLOCK_RULES = (
    (re.compile(rf"^({'|'.join(_INDEXED)})\.(\d+)\."), lambda m: f"{m.group(1)}.{m.group(2)}"),
    (re.compile(r"^(mid_block|middle_block)\."), lambda m: m.group(1)),
)

# Forward order of a block's first name component; blocks of one stage sort by index, then name.
_STAGE_ORDER = {
    # 0: the input: conv_in, patch embedding, positional table
    "conv_in": 0, "pos_embed": 0, "patch_embed": 0, "x_embedder": 0, "img_in": 0,
    # 1: timestep / text / pooled / size conditioning
    "time_embedding": 1, "time_embed": 1, "class_embedding": 1, "add_embedding": 1, "label_emb": 1,
    "adaln_single": 1, "caption_projection": 1, "context_embedder": 1, "time_text_embed": 1,
    "t_embedder": 1, "t_block": 1, "y_embedder": 1, "txt_in": 1, "time_in": 1, "vector_in": 1,
    "guidance_in": 1,
    # 2: the trunk (U-Net encoder, DiT blocks, Flux double-stream blocks)
    "down_blocks": 2, "input_blocks": 2, "transformer_blocks": 2, "blocks": 2, "layers": 2,
    "joint_blocks": 2, "double_blocks": 2,
    # 3: Flux single-stream blocks, which follow the double-stream ones
    "single_transformer_blocks": 3, "single_blocks": 3,
    # 4-5: U-Net middle and decoder
    "mid_block": 4, "middle_block": 4,
    "up_blocks": 5, "output_blocks": 5,
    # 6: the output head (PixArt's final-layer modulation is the top-level scale_shift_table)
    "conv_norm_out": 6, "norm_out": 6, "conv_out": 6, "proj_out": 6, "out": 6, "final_layer": 6,
    "scale_shift_table": 6,
}


def block_of(name: str) -> str:
    """The block a tensor belongs to, e.g. `down_blocks.1`, `mid_block`, `conv_in`."""
    for rx, label in _BLOCK_RULES:
        m = rx.match(name)
        if m:
            return label(m)
    return name.split(".")[0]


def depth_key(block: str) -> tuple[int, int, str]:
    """Sort key putting blocks in forward order (unknown blocks last, by name)."""
    head, _, index = block.partition(".")
    return (_STAGE_ORDER.get(head, 7), int(index) if index.isdigit() else 0, block)
