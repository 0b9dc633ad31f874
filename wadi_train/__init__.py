"""wadi_train: one-step distillation of diffusion models with LoRaD adapters and VSD (DESIGN §5).

Importable, unit-tested components (the `lorad` adapter first; losses, schedules, EMA and
checkpointing alongside) that one readable training recipe wires together in an explicit loop.
"""

__all__ = ["lorad"]
