"""Settings of the digits demo: the full run and a `--quick` variant for CI."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from wadi_train.demo.teacher import TeacherSettings

__all__ = ["DemoSettings", "FULL", "QUICK", "METHODS"]

# The students distilled from the reference analysis (same seed, steps and data for all).
METHODS = ("lorad_fitted", "lorad_uniform", "lora", "full")


@dataclass(frozen=True)
class DemoSettings:
    """Everything the digits demo varies.

    Attributes:
        teacher: DDPM teacher training (cached after the first run).
        reference_steps: VSD steps of the full fine-tuning reference student (for weightlens).
        student_steps: VSD steps of every compared student.
        batch_size: VSD batch size.
        eval_samples: samples per model for FID and accuracy.
        teacher_steps: DDIM step counts at which the teacher is evaluated.
        budget: LoRaD parameter budget of the fitted ranks (share of the U-Net).
        guidance: CFG scale of teacher and fake score in VSD, and of teacher sampling.
    """

    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    reference_steps: int = 200
    student_steps: int = 200
    batch_size: int = 32
    student_lr: float = 3e-3
    full_lr: float = 3e-4
    fake_lr: float = 1e-2
    fake_rank: int = 8
    eval_samples: int = 2000
    teacher_steps: tuple[int, ...] = (1, 4, 50)
    budget: str = "10%"
    guidance: float = 1.5
    seed: int = 0
    methods: tuple[str, ...] = METHODS


FULL = DemoSettings()
QUICK = replace(FULL, reference_steps=6, student_steps=6, batch_size=16, eval_samples=200, teacher_steps=(1, 4, 10))
