"""Re-fit ranks from a saved analysis folder without reading any weights (`fit-ranks`)."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from weightlens.output import atomic_write, layer_columns, load_layers, load_spectra, load_summary, write_ranks, to_csv
from weightlens.ranks import RankConfig, RankOptions, fit_ranks, module_name, parse_budget

__all__ = ["refit"]

log = logging.getLogger(__name__)


def refit(folder: Path, budget: str | None = None, energy: float | None = 0.9, min_rank: int = 0, max_rank: int | None = None, multiple_of: int = 1, include_conv: bool = False, output: Path | None = None, command: tuple[str, ...] = ()) -> tuple[RankConfig, Path]:
    """Fit ranks again from layers.csv + spectra.npz and write ranks.json.

    When writing the folder's own ranks.json, the previous one is kept as ranks.prev.json and
    layers.csv's lorad_rank column is updated to match.
    """
    layers = load_layers(folder)
    spectra = load_spectra(folder)
    summary = load_summary(folder)
    backbone = int(summary.get("backbone_params") or sum(r.params for r in layers))
    options = RankOptions(energy=energy, budget=parse_budget(budget, backbone), min_rank=min_rank, max_rank=max_rank, multiple_of=multiple_of, include_conv=include_conv)
    cfg = fit_ranks(layers, spectra, options, backbone)
    target = output or folder / "ranks.json"
    source = dict(summary.get("provenance") or {})
    source["refit_command"] = list(command) or None
    if target == folder / "ranks.json":
        if target.exists():
            atomic_write(folder / "ranks.prev.json", target.read_bytes())
        updated = [replace(r, lorad_rank=cfg.rank_pattern.get(module_name(r.name), 0)) for r in layers]
        atomic_write(folder / "layers.csv", to_csv([asdict(r) for r in updated], layer_columns()))
    write_ranks(cfg, target, source)
    log.info("wrote %s", target)
    return cfg, target
