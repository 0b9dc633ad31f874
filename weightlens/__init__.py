"""weightlens: what distillation did to a diffusion model's weights.

Compare a multi-step teacher with its one-step student layer by layer: per-row norm change
vs direction change, the pairwise rotation LoRaD would need, spectra of the change, and a
fitted LoRaD rank config, written as an HTML report, PNG figures, CSV and JSON.
"""

from weightlens.memory import disable_mkl_buffer_cache

disable_mkl_buffer_cache()  # before anything imports torch (see weightlens/memory.py)

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
