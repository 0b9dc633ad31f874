"""Errors that weightlens raises for bad input.

Every error carries a message that says what was expected, what was found and what to do;
the CLI prints it as one line and exits with code 1.
"""

from __future__ import annotations


class WeightlensError(Exception):
    """Base class of every user-facing weightlens error."""


class CheckpointError(WeightlensError):
    """A file or folder could not be read as a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint asked to run code; it was refused, never executed."""


class AlignmentError(WeightlensError):
    """Teacher and student keys could not be matched."""


class OutputError(WeightlensError):
    """The output location is unusable (exists without --overwrite, not writable)."""


class AnalysisError(WeightlensError):
    """A saved analysis folder is missing or incomplete."""


class OptionError(WeightlensError):
    """An option value is malformed (budget, map, glob...)."""
