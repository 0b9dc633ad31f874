"""Benchmark: one training step of LoRaD vs PEFT LoRA at equal parameter count (issue 4).

A U-Net big enough to be compute-bound on CPU (diffusers UNet2DConditionModel, channels
128/256, cross-attention, 32x32 latents, batch 4). Every Linear in down/up/mid blocks gets the
adapter; LoRA's rank is chosen so its parameter count matches LoRaD's (a LoRaD rank unit costs
out + in/2, a LoRA one out + in). Steps alternate between the two models in one process and
the median ratio is printed. Target: LoRaD step time <= 1.2x LoRA.

    python bench/lorad_step.py [--rank 64] [--steps 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time

import torch
from torch import nn

BLOCKS = r".*(down_blocks|up_blocks|mid_block).*"
CONFIG = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "block_out_channels": (128, 256),
    "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 256,
    "attention_head_dim": 8, "norm_num_groups": 32,
}


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(BLOCKS, n)]


def build(rank: int) -> tuple[nn.Module, nn.Module, int, int]:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from wadi_train.lorad import LoRaDConfig, count_lorad_params, inject_lorad

    torch.manual_seed(0)
    base = UNet2DConditionModel(**CONFIG)
    names = linears(base)
    lorad = inject_lorad(copy.deepcopy(base), LoRaDConfig(r=rank, target_modules=names, allow_excess_rank=True), "student")
    lorad_params = count_lorad_params(lorad, lorad.lorad_configs["student"])
    unit = sum(base.get_submodule(n).in_features + base.get_submodule(n).out_features for n in names)
    lora_rank = max(1, round(lorad_params / unit))
    lora = inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=names), copy.deepcopy(base), adapter_name="student")
    for n, p in lora.named_parameters():
        p.requires_grad_("lora_" in n)
    lora_params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    return lorad, lora, lorad_params, lora_params


def step_fn(model: nn.Module) -> tuple[callable, torch.optim.Optimizer]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 32, 32, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen)
    ctx = torch.randn(4, 16, 256, generator=gen)

    def step() -> float:
        start = time.perf_counter()
        out = model(x, t, encoder_hidden_states=ctx).sample
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lorad, lora, p_lorad, p_lora = build(args.rank)
    s_lorad, _ = step_fn(lorad)
    s_lora, _ = step_fn(lora)
    s_lorad(), s_lora()  # warm-up
    t_lorad, t_lora = [], []
    for _ in range(args.steps):
        t_lorad.append(s_lorad())
        t_lora.append(s_lora())
    a, b = statistics.median(t_lorad), statistics.median(t_lora)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, U-Net {sum(p.numel() for p in lorad.parameters() if not p.requires_grad) / 1e6:.1f}M params")
    print(f"LoRaD rank {args.rank}: {p_lorad:,} trainable params, median step {a * 1000:.1f} ms")
    print(f"LoRA  (PEFT) equal count: {p_lora:,} trainable params, median step {b * 1000:.1f} ms")
    ratio = a / b
    print(f"ratio LoRaD / LoRA = {ratio:.3f}  (target <= 1.2: {'PASS' if ratio <= 1.2 else 'FAIL'})")


if __name__ == "__main__":
    main()
