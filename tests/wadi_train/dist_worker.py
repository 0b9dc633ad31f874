"""One rank of the 2-process test: `torchrun ... dist_worker.py CONFIG.yaml OUTDIR`.

Trains with `wadi_train.train.train` and, after every step, appends the step and a sha256 of
this rank's student and fake adapter tensors (sorted by key), a sha256 of its sampling RNG
state and the world size to OUTDIR/hashes-rank{R}.txt, so the test can check that the ranks
drew different noise yet hold bit-identical adapters after every step.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from torch import Tensor

from wadi_train.config import load_config
from wadi_train.train import train


def state_hash(student: dict[str, Tensor], fake: dict[str, Tensor]) -> str:
    """sha256 of the student's then the fake score's tensors, each sorted by key."""
    h = hashlib.sha256()
    for state in (student, fake):
        for key in sorted(state):
            h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(config_path: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def on_step(d: Any) -> None:
        rank = d.acc.process_index
        with (out / f"hashes-rank{rank}.txt").open("a") as fh:
            rng = hashlib.sha256(d.gen.get_state().numpy().tobytes()).hexdigest()
            fh.write(f"{d.step} {state_hash(d.roles.student_state(), d.roles.fake_state())} {rng} {d.acc.num_processes}\n")

    train(load_config(config_path), on_step=on_step)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
