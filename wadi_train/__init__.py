"""wadi_train: one-step distillation of diffusion models with LoRaD adapters and VSD (DESIGN §5).

Importable, unit-tested components (the `lorad` adapter, VSD losses, one-step maths, EMA,
atomic checkpoints) and one readable training recipe (`train.train`) that wires them together
in an explicit loop; `export` writes a merged diffusers model, `generate` samples one step.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "lorad"]
