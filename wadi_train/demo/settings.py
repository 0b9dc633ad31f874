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
        student_lr, lora_lr, full_lr: learning rates of the LoRaD students, the LoRA student
            and full fine-tuning (also the reference), after a linear warm-up of warmup_steps;
            each the best of those tried with the default recipe (FID of the EMA at step 500:
            LoRaD 2e-3 / 3e-3: 1.50 / 1.46; LoRA 3e-4 / 6e-4 / 1.2e-3: 1.79 / 1.63 / 1.86;
            full 3e-5 / 6e-5 / 1.2e-4: 1.48 / 1.42 / 2.02; README, digits section).
        guidance: CFG scale of the teacher, in VSD and in teacher sampling.
        generator_timestep: the timestep the students' noise is placed at (DESIGN's default
            is 999). Here x0 = (z - sigma_t eps) / alpha_t divides by alpha_999 = 0.068, and
            the students' samples kept a pixel noise; at 700 (alpha 0.29) LoRaD reached FID 2.4
            in 300 steps instead of 3.9 (500: 2.5). Exports record it; generate uses it.
        fake_rank, fake_lr, fake_steps: the fake score's rank, learning rate and updates per
            student update. The fake score is LoRaD beside LoRaD and full fine-tuning students,
            PEFT LoRA beside the LoRA student.
        lora_fake_lr: the learning rate of the LoRA student's (PEFT LoRA) fake score: at
            fake_lr = 1e-2 it diverged near step 180 and took the student with it (FID 8.1);
            at 1e-3 it trains steadily.
        fake_include_conv: the fake score's LoRaD also on the blocks' convolutions and other
            Linears (fake.include_conv), not only on attention and FF: with it one fake update
            per student update does as well as two without (LoRaD FID at step 300: 2.36 vs
            2.40; two updates with it: 2.26), at about the same cost per step.
        gan_weight, gan_d_weight, gan_t_max: the adversarial term (DMD2; wadi_train/gan.py):
            the student's weight, the discriminator's weight beside the fake score's denoising
            loss, and the largest timestep it sees (0 = off). Without it FID stays near 1.8
            however long VSD trains; with it LoRaD reaches the issue's target (README, digits
            section). The discriminator at 0.1 instead of 0.01 learns sooner (FID at step 300:
            1.89; at 0.01 the term starts to pay only after about 500 steps).
        reuse_fake_forward: fake.reuse_vsd_forward: the fake score's update learns from VSD's
            own forward, one fake forward less per step; with the adversarial term's shortcuts
            a step costs 1.11x a plain VSD step (bench/vsd_step.py; the term first cost 1.6x).
        ema_decay: the students are exported from an EMA of their weights: with the adversarial
            term the raw weights' FID swings by up to 1.5 between checkpoints 100 steps apart
            (1.83 / 3.36 / 2.83 / 1.62), the EMA's falls steadily.
        fake_guidance: CFG scale of the fake score in VSD. 1 (none, as in DMD2): the fake
            score stands for the student's own distribution. With 1.5, as for the teacher,
            every student here ended worse than where it started (LoRaD, 150 steps: FID
            10.0 vs 7.3 with 1; see the README's digits section).
        workers: processes that train the runs side by side (None: one per core, at most 4;
            see wadi_train/demo/runs.py). Results do not depend on it beyond float rounding.
    """

    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    reference_steps: int = 100
    student_steps: int = 500
    batch_size: int = 32
    student_lr: float = 2e-3
    lora_lr: float = 6e-4
    full_lr: float = 6e-5
    warmup_steps: int = 20
    fake_lr: float = 1e-2
    lora_fake_lr: float = 1e-3
    fake_rank: int = 32
    fake_steps: int = 1
    fake_include_conv: bool = True
    gan_weight: float = 0.005
    gan_d_weight: float = 0.1
    gan_t_max: int = 400
    reuse_fake_forward: bool = True
    ema_decay: float | None = 0.99
    eval_samples: int = 2000
    teacher_steps: tuple[int, ...] = (1, 4, 50)
    budget: str = "10%"
    guidance: float = 1.5
    fake_guidance: float = 1.0
    generator_timestep: int = 700
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    workers: int | None = None


FULL = DemoSettings()
QUICK = replace(FULL, reference_steps=6, student_steps=6, batch_size=16, eval_samples=200, teacher_steps=(1, 4, 10))
