"""Benchmark: the cost of one digits-demo training step with the adversarial term (issue 5).

Three Distillers on the committed digits teacher (LoRaD rank 17, the demo's fake score, batch
32): plain VSD (the baseline: the demo's step before the adversarial term), VSD + the
adversarial term, and VSD + the adversarial term + `fake.reuse_vsd_forward` (the demo's
default). Their steps alternate in one process and the median time of each is printed with its
ratio to the baseline. The term needs three extra fake-score forwards per step (the student's
samples for the generator, real and student samples for the discriminator); the feature tap
ends them at `mid_block`, the discriminator reuses the generator's features, the fake score's
LoRaD layers rotate their weights once per step (`rotation_cache`), and the reused VSD forward
saves one fake forward: what makes the term affordable in the demo's 10-minute budget.

    python bench/vsd_step.py [--steps 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def distiller(tmp: Path, name: str, gan: bool, reuse: bool, real: Path):  # type: ignore[no-untyped-def]
    from accelerate import Accelerator

    from wadi_train.config import from_dict
    from wadi_train.demo.pipeline import _run_config
    from wadi_train.demo.settings import FULL
    from wadi_train.demo.teacher import ASSETS
    from wadi_train.train import Distiller

    s = replace(FULL, gan_weight=FULL.gan_weight if gan else 0.0, reuse_fake_forward=reuse, ema_decay=None)
    cfg = _run_config(tmp, ASSETS / "teacher-8px-w32-s2000-sl.safetensors", s, name, {"method": "lorad", "rank": 17}, 100, s.student_lr, real if gan else None)
    return Distiller(from_dict(cfg), Accelerator(cpu=True), tmp / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from safetensors.torch import save_file

    from wadi_train.evaluation.digits import load_digits_split

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        split = load_digits_split(size=8, seed=0)
        real = tmp / "real.safetensors"
        save_file({"images": split.x_train.contiguous(), "class_labels": split.y_train.contiguous()}, real)
        runs = {
            "plain VSD (baseline)": distiller(tmp, "plain", False, False, real),
            "+ adversarial term": distiller(tmp, "gan", True, False, real),
            "+ adversarial term, reused fake forward (demo)": distiller(tmp, "gan_reuse", True, True, real),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for step in range(a.steps + 2):
            for name, d in runs.items():
                start = time.perf_counter()
                d.train_step()
                if step >= 2:  # warm-up
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain VSD (baseline)"])
    print(f"{'step':<48} {'median s':>9} {'x baseline':>11}   ({a.steps} steps each, {a.threads} thread(s))")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<48} {m:9.3f} {m / base:11.2f}")


if __name__ == "__main__":
    main()
