"""Test helper: rename diffusers U-Net keys to original LDM/SD names.

The inverse of diffusers' `convert_ldm_unet_checkpoint`, following the layout rules of
diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any
number of levels and layers per block. Tests use it to fabricate LDM-named checkpoints;
the library itself only ever uses diffusers' own converter.
"""

from __future__ import annotations

import re

TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}"


def diffusers_to_ldm(keys: list[str], layers_per_block: int) -> dict[str, str]:
    """Map each diffusers key to its LDM name (without the model.diffusion_model. prefix)."""
    lpb = layers_per_block
    up_has_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, str] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module in TOP:
            out[key] = f"{TOP[module]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            i, j = int(m.group(1)), int(m.group(2))
            out[key] = f"input_blocks.{(lpb + 1) * i + j + 1}.0.{_resnet(m.group(3))}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            i, j = int(m.group(1)), int(m.group(2))
            out[key] = f"input_blocks.{(lpb + 1) * i + j + 1}.1.{m.group(3)}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            out[key] = f"input_blocks.{(lpb + 1) * (int(m.group(1)) + 1)}.0.op.{m.group(2)}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            i, j = int(m.group(1)), int(m.group(2))
            out[key] = f"output_blocks.{(lpb + 1) * i + j}.0.{_resnet(m.group(3))}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            i, j = int(m.group(1)), int(m.group(2))
            out[key] = f"output_blocks.{(lpb + 1) * i + j}.1.{m.group(3)}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            i = int(m.group(1))
            out[key] = f"output_blocks.{(lpb + 1) * i + lpb}.{2 if i in up_has_attn else 1}.{m.group(2)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            out[key] = f"middle_block.1.{m.group(1)}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            out[key] = f"middle_block.{2 * int(m.group(1))}.{_resnet(m.group(2))}"
        else:
            raise KeyError(f"no LDM name for {key}")
    return out
