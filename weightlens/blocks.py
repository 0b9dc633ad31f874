"""Group layer names into the blocks users think in, in depth order.

U-Nets: conv_in, time/class embedding, down_blocks.N, mid_block, up_blocks.N, conv_out.
DiTs: pos/patch embedding, transformer_blocks.N (or single_transformer_blocks.N), proj_out.
"""

from __future__ import annotations

import re

__all__ = ["block_of", "depth_key"]

_BLOCK_RULES = (
    (re.compile(r"^(down_blocks|up_blocks|transformer_blocks|single_transformer_blocks|blocks|layers)\.(\d+)\."), lambda m: f"{m.group(1)}.{m.group(2)}"),
    (re.compile(r"^(mid_block)\."), lambda m: m.group(1)),
    (re.compile(r"^(input_blocks|output_blocks)\.(\d+)\."), lambda m: f"{m.group(1)}.{m.group(2)}"),
    (re.compile(r"^(middle_block)\."), lambda m: m.group(1)),
)

_STAGE_ORDER = {
    "conv_in": 0, "pos_embed": 0, "patch_embed": 0, "x_embedder": 0,
    "time_embedding": 1, "time_embed": 1, "class_embedding": 1, "add_embedding": 1, "adaln_single": 1,
    "caption_projection": 1, "label_emb": 1, "context_embedder": 1, "time_text_embed": 1,
    "down_blocks": 2, "input_blocks": 2, "transformer_blocks": 2, "blocks": 2, "layers": 2,
    "single_transformer_blocks": 3,
    "mid_block": 4, "middle_block": 4,
    "up_blocks": 5, "output_blocks": 5,
    "conv_norm_out": 6, "norm_out": 6, "conv_out": 6, "proj_out": 6, "out": 6,
}


def block_of(name: str) -> str:
    """The block a tensor belongs to, e.g. `down_blocks.1`, `mid_block`, `conv_in`."""
    for rx, label in _BLOCK_RULES:
        m = rx.match(name)
        if m:
            return label(m)
    return name.split(".")[0]


def depth_key(block: str) -> tuple[int, int, str]:
    """Sort key putting blocks in forward order."""
    head, _, index = block.partition(".")
    return (_STAGE_ORDER.get(head, 7), int(index) if index.isdigit() else 0, block)
