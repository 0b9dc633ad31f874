"""Benchmark: one training step of LoRaD vs PEFT LoRA at equal parameter count (issue 4).

A U-Net big enough to be compute-bound on CPU (diffusers UNet2DConditionModel, channels
128/256, cross-attention, 32x32 latents, batch 4). Every Linear in down/up/mid blocks gets the
adapter; LoRA's rank is chosen so its parameter count matches LoRaD's (a LoRaD rank unit costs
out + in/2, a LoRA one out + in). Steps alternate between the two models in one process and
the median ratio is printed. Target: LoRaD step time <= 1.2x LoRA.

    python bench/lorad_step.py [--rank 64] [--steps 8] [--threads 2]
    python bench/lorad_step.py --device cuda --unet sd15 --rank 256 --autocast fp16   # SD1.5, 64x64 latents

`measure(...)` returns the figures (bench/gpu_check.py reuses it).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

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


def unet_config(name: str) -> dict[str, Any]:
    """`bench` (the CPU default above) or a `wadi_train.random_pipeline` preset's U-Net (`sd15`, `tiny`)."""
    if name == "bench":
        return dict(CONFIG)
    from wadi_train.random_pipeline import PRESETS

    return dict(PRESETS[name].unet)


def build(rank: int, config: dict[str, Any] | None = None, device: str = "cpu") -> tuple[nn.Module, nn.Module, int, int]:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from wadi_train.lorad import LoRaDConfig, count_lorad_params, inject_lorad

    torch.manual_seed(0)
    with torch.device(device):
        base = UNet2DConditionModel(**(config or CONFIG)).requires_grad_(False)
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


def step_fn(model: nn.Module, batch: int = 4, autocast: str | None = None) -> tuple[Callable[[], float], torch.optim.Optimizer]:
    """One AdamW step on random inputs of the model's own latent size; returns (step, optimizer)."""
    device = next(model.parameters()).device
    c = model.config
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    ctx = torch.randn(batch, 16, c.cross_attention_dim, generator=gen).to(device)
    amp = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[autocast]) if autocast else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x, t, encoder_hidden_states=ctx).sample
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    return step, opt


def measure(rank: int = 64, steps: int = 8, config: dict[str, Any] | None = None, device: str = "cpu", autocast: str | None = None, batch: int = 4) -> dict[str, Any]:
    """Median step seconds of LoRaD and LoRA (equal parameter count), alternating, after a warm-up."""
    lorad, lora, p_lorad, p_lora = build(rank, config, device)
    s_lorad, _ = step_fn(lorad, batch, autocast)
    s_lora, _ = step_fn(lora, batch, autocast)
    s_lorad(), s_lora()  # warm-up
    t_lorad, t_lora = [], []
    for _ in range(steps):
        t_lorad.append(s_lorad())
        t_lora.append(s_lora())
    a, b = statistics.median(t_lorad), statistics.median(t_lora)
    frozen = sum(p.numel() for p in lorad.parameters() if not p.requires_grad)
    return {"rank": rank, "lorad_params": p_lorad, "lora_params": p_lora, "lorad_s": a, "lora_s": b, "ratio": a / b, "backbone_params": frozen, "autocast": autocast or "none", "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--unet", default="bench", choices=("bench", "sd15", "tiny"), help="the U-Net: this file's CPU benchmark config or a random_pipeline preset")
    ap.add_argument("--autocast", choices=("fp16", "bf16"), default=None, help="mixed precision for the forward pass")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.rank, args.steps, unet_config(args.unet), args.device, args.autocast, args.batch)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, U-Net {r['backbone_params'] / 1e6:.1f}M params, autocast {r['autocast']}")
    print(f"LoRaD rank {args.rank}: {r['lorad_params']:,} trainable params, median step {r['lorad_s'] * 1000:.1f} ms")
    print(f"LoRA  (PEFT) equal count: {r['lora_params']:,} trainable params, median step {r['lora_s'] * 1000:.1f} ms")
    print(f"ratio LoRaD / LoRA = {r['ratio']:.3f}  (target <= 1.2: {'PASS' if r['ratio'] <= 1.2 else 'FAIL'})")


if __name__ == "__main__":
    main()
