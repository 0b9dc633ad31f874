"""Write an analysis folder and read it back (DESIGN §4 file contracts).

OUT holds `layers.csv`, `vectors.csv`, `summary.json`, `ranks.json`, `spectra.npz` (Theta and
direction-residual energies per layer, so `fit-ranks` never re-reads weights), `figures/*.png`
and `report.html`. Files are written atomically (temp file, then rename); an existing,
non-empty OUT is refused unless `overwrite`, and even then only these files are replaced.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from weightlens.errors import AnalysisError, OutputError
from weightlens.results import LAYER_COLUMNS, Analysis, LayerStats, VectorStats

__all__ = ["prepare_output", "write_analysis", "write_ranks", "load_layers", "load_spectra", "load_summary", "json_safe", "atomic_write"]

ANALYSIS_FILES = ("layers.csv", "vectors.csv", "summary.json", "ranks.json", "spectra.npz", "report.html")


def json_safe(value: Any) -> Any:
    """Replace NaN/Inf by None and tuples by lists, recursively, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temp file beside `path`, then rename over it."""
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_output(out: Path, overwrite: bool) -> None:
    """Create OUT, refusing to clobber an existing non-empty folder without `overwrite`."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: folder exists and is not empty; pass --overwrite to replace the analysis files in it, or choose another -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".weightlens-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: cannot write there ({exc.strerror or exc}); choose a writable -o") from None


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def layer_columns() -> list[str]:
    return list(LAYER_COLUMNS) + [f.name for f in fields(LayerStats) if f.name not in LAYER_COLUMNS]


def summary_json(analysis: Analysis) -> dict[str, Any]:
    """The summary.json document: contract keys first, then extras."""
    s = analysis.summary
    doc = {
        "layers": s.layers,
        "norm_rel_mean": s.norm_rel_mean,
        "norm_rel_std": s.norm_rel_std,
        "dir_mean": s.dir_mean,
        "dir_std": s.dir_std,
        "dir_to_norm_ratio": s.dir_to_norm_ratio,
        "only_in_teacher": list(analysis.only_in_teacher),
        "only_in_student": list(analysis.only_in_student),
        "shape_mismatch": [{"name": n, "teacher": list(a), "student": list(b)} for n, a, b in analysis.shape_mismatch],
        "alerts": [asdict(a) for a in analysis.alerts],
        "provenance": analysis.provenance,
        "params_compared": s.params_compared,
        "backbone_params": analysis.backbone_params,
        "vectors": len(analysis.vectors),
        "rotation_explained_mean": s.rotation_explained_mean,
        "theta_energy_30_mean": s.theta_energy_30_mean,
        "theta_energy_30_random_mean": s.theta_energy_30_random_mean,
        "resid_energy_30_mean": s.resid_energy_30_mean,
        "resid_energy_30_random_mean": s.resid_energy_30_random_mean,
        "lorad_trainable_params": analysis.ranks.trainable_params if analysis.ranks else None,
    }
    return json_safe(doc)


def _dump(doc: Any) -> str:
    return json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n"


def write_ranks(analysis_or_ranks: Any, out_file: Path, source: dict[str, Any]) -> None:
    """Write ranks.json for a RankConfig."""
    atomic_write(out_file, _dump(analysis_or_ranks.to_json(source)))


def write_analysis(analysis: Analysis, out: Path, overwrite: bool = False, report: bool = True, timestamp: bool = True) -> dict[str, Path]:
    """Write every analysis file into `out` and return their paths."""
    prepare_output(out, overwrite)
    paths = {name: out / name for name in ANALYSIS_FILES}
    atomic_write(paths["layers.csv"], to_csv([asdict(r) for r in analysis.layers], layer_columns()))
    atomic_write(paths["vectors.csv"], to_csv([asdict(v) for v in analysis.vectors], [f.name for f in fields(VectorStats)]))
    atomic_write(paths["summary.json"], _dump(summary_json(analysis)))
    if analysis.ranks is not None:
        write_ranks(analysis.ranks, paths["ranks.json"], analysis.provenance)
    else:
        del paths["ranks.json"]
    buf = io.BytesIO()
    np.savez_compressed(buf, **{f"theta/{k}": v for k, v in analysis.theta_spectra.items()}, **{f"resid/{k}": v for k, v in analysis.resid_spectra.items()})
    atomic_write(paths["spectra.npz"], buf.getvalue())
    if report:
        from weightlens.report import write_report

        paths["report.html"] = write_report(analysis, out, timestamp=timestamp)
    else:
        del paths["report.html"]
    return paths


def _need(path: Path) -> Path:
    if not path.is_file():
        raise AnalysisError(f"{path.parent}: no {path.name}; run `weightlens compare TEACHER STUDENT -o {path.parent}` first")
    return path


def load_layers(out: Path) -> list[LayerStats]:
    """Read layers.csv back into LayerStats records."""
    types = {f.name: f.type for f in fields(LayerStats)}
    conv = {"int": int, "float": float, "str": str, "bool": lambda s: s == "True"}
    rows = []
    with _need(out / "layers.csv").open(newline="") as fh:
        for raw in csv.DictReader(fh):
            try:
                rows.append(LayerStats(**{k: conv[str(types[k])](v) for k, v in raw.items() if k in types}))
            except (KeyError, TypeError, ValueError) as exc:
                raise AnalysisError(f"{out / 'layers.csv'}: unreadable row for {raw.get('name')!r} ({exc}); re-run compare") from None
    return rows


def load_spectra(out: Path) -> dict[str, np.ndarray]:
    """Theta energies per layer from spectra.npz."""
    with np.load(_need(out / "spectra.npz")) as data:
        return {k.removeprefix("theta/"): data[k] for k in data.files if k.startswith("theta/")}


def load_summary(out: Path) -> dict[str, Any]:
    try:
        return json.loads(_need(out / "summary.json").read_text())
    except json.JSONDecodeError as exc:
        raise AnalysisError(f"{out / 'summary.json'}: not valid JSON ({exc}); re-run compare") from None
