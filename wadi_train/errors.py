"""Errors wadi_train raises for bad input; the CLI prints them as one line, exit code 1."""

from __future__ import annotations

__all__ = ["WadiError", "ConfigError", "ModelLoadError", "TrainingError", "OptionError"]


class WadiError(Exception):
    """Base class of every user-facing wadi_train error."""


class ConfigError(WadiError):
    """The run config is invalid; the message lists every problem."""


class ModelLoadError(WadiError):
    """A teacher or exported model could not be loaded from the given path."""


class TrainingError(WadiError):
    """Training had to stop (e.g. too many consecutive non-finite losses)."""


class OptionError(WadiError):
    """A command-line option's value cannot work (e.g. an image size the VAE cannot divide)."""
