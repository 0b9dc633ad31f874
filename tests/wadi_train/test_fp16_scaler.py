"""fp16 training with a grad scaler survives overflowing steps (CPU stand-in for a GPU's scaler).

On a GPU, fp16 mixed precision gives accelerate a GradScaler; its first scale (2^16) can make
early gradients overflow. Such a step must be skipped *by the scaler*, which then lowers its
scale; bypassing the optimizer step left the scaler mid-step, and the next step's unscale_
raised "unscale_() has already been called on this optimizer since the last update()". A CPU
run has no scaler, so this test installs one whose scale overflows every step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import tiny_config

from wadi_train.config import from_dict


def test_overflowing_fp16_steps_are_skipped_by_the_scaler(tmp_path: Path, tiny_teacher: Path) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from wadi_train.train import Distiller

    cfg = from_dict(tiny_config(tmp_path, tiny_teacher))
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=True, mixed_precision="fp16")  # on CPU: fp16 autocast but no scaler...
    acc.native_amp = True  # ...so give it one, as a CUDA run has
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    try:
        d = Distiller(cfg, acc, tmp_path / "run")
        before = {k: v.clone() for k, v in {**d.roles.student_state(), **d.roles.fake_state()}.items()}
        scales = [acc.scaler.get_scale()]
        for _ in range(3):  # the second step used to raise in unscale_
            m = d.train_step()
            assert m["finite"] == 0.0
            scales.append(acc.scaler.get_scale())
        assert all(b < a for a, b in zip(scales, scales[1:])), scales  # the scaler backed off every step
        after = {**d.roles.student_state(), **d.roles.fake_state()}
        assert all(torch.equal(before[k], v) for k, v in after.items())  # inf gradients never applied
    finally:
        AcceleratorState._reset_state()
