"""weightlens: what distillation did to a diffusion model's weights.

Compare a multi-step teacher with its one-step student layer by layer: per-row norm change
vs direction change, the pairwise rotation LoRaD would need, spectra of the change, and a
fitted LoRaD rank config, written as an HTML report, PNG figures, CSV and JSON.
"""

import os
import sys

# MKL's fast memory manager keeps the buffers of every eigensolve and Gram product, per
# thread, for the life of the process: on SD1.5 that is ~35 MiB of a full analysis's ~75 MiB
# working set. MKL reads this variable once, when torch loads it, so it only takes effect
# when weightlens is imported before torch (the CLI always is); a user's own setting wins.
if "torch" not in sys.modules:
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

from weightlens.align import AlignOptions
from weightlens.compare import CompareOptions, compare
from weightlens.errors import WeightlensError
from weightlens.ranks import RankConfig, RankOptions, fit_ranks
from weightlens.results import Analysis, LayerStats, LayerTable

__version__ = "0.1.0"

__all__ = [
    "AlignOptions",
    "Analysis",
    "CompareOptions",
    "LayerStats",
    "LayerTable",
    "RankConfig",
    "RankOptions",
    "WeightlensError",
    "compare",
    "fit_ranks",
    "__version__",
]
