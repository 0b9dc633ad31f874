"""What the weightlens tests plant in the tiny U-Net student (shared by conftest and tests)."""

RANK = 3
ROTATED = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight",
)
SCALED = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight": 1.07,
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight": 0.95,
    "down_blocks.1.resnets.0.conv1.weight": 1.03,
}
