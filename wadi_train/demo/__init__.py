"""The embedded default: sklearn digits end to end (teacher -> weightlens -> students -> eval)."""

from wadi_train.demo.pipeline import run_digits_demo
from wadi_train.demo.settings import FULL, QUICK, DemoSettings

__all__ = ["DemoSettings", "FULL", "QUICK", "run_digits_demo"]
