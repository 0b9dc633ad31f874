"""Render an analysis as one self-contained HTML page (inline CSS, base64 PNG figures).

The page is a Jinja2 template shipped as package data, rendered with autoescaping on: layer
and file names are user data and are never marked safe. Every number goes through the
deterministic formatters of :mod:`weightlens.verdict` (registered as filters), and every
derived figure comes from there too, so the same analysis always renders the same page
(with ``timestamp=False`` it is byte-identical, fit for golden tests).
"""

from __future__ import annotations

import base64
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from weightlens.results import Analysis
from weightlens.verdict import (
    DOMINANCE,
    block_table,
    format_int,
    format_num,
    format_pct,
    format_ratio,
    rank_table,
    verdict,
)

__all__ = ["render_html", "LAYER_TABLE", "TIMESTAMP_KEYS"]

# Provenance keys holding wall-clock facts: shown only with timestamp=True.
TIMESTAMP_KEYS = frozenset({"finished_utc", "started_utc", "seconds"})
_PROVENANCE_SHOWN = frozenset({"tool", "version", "versions", "teacher", "student", "command"})
# Rank tables longer than this start collapsed.
OPEN_RANK_ROWS = 25


@dataclass(frozen=True)
class Column:
    """One column of a rendered table: record attribute, header, number format, tooltip."""

    attr: str
    header: str
    kind: str  # text | int | pct | num | deg
    title: str = ""


# The layers.csv columns (DESIGN §4), in order.
LAYER_TABLE = (
    Column("name", "name", "text"),
    Column("kind", "kind", "text"),
    Column("shape", "shape", "text"),
    Column("params", "params", "int"),
    Column("rows", "rows", "int", "output units"),
    Column("norm_rel_mean", "norm mean", "pct", "mean over rows of |Δ‖w‖| / ‖w‖"),
    Column("norm_rel_std", "norm std", "pct", "std over rows of |Δ‖w‖| / ‖w‖"),
    Column("dir_mean", "dir mean", "pct", "mean over rows of ‖u_S − u_T‖"),
    Column("dir_std", "dir std", "pct", "std over rows of ‖u_S − u_T‖"),
    Column("angle_mean_deg", "angle mean", "deg", "mean row rotation angle"),
    Column("angle_max_deg", "angle max", "deg", "largest row rotation angle"),
    Column("one_minus_cos_mean", "1 − cos", "num", "mean over rows of 1 − cos φ"),
    Column("rel_delta", "rel Δ", "pct", "‖W_S − W_T‖_F / ‖W_T‖_F"),
    Column("rotation_explained", "rot. expl.", "pct", "share of ‖ΔW‖² a pairwise (LoRaD) rotation explains"),
    Column("theta_rank_90", "Θ rank 90", "int", "smallest rank holding 90 % of Θ energy"),
    Column("theta_energy_30", "Θ E30", "pct", "Θ energy in the top 30 % of ranks"),
    Column("resid_rank_90", "resid rank 90", "int", "smallest rank holding 90 % of the direction residual's energy"),
    Column("resid_energy_30", "resid E30", "pct", "direction residual energy in the top 30 % of ranks"),
    Column("lorad_rank", "LoRaD rank", "int", "fitted LoRaD rank (0: not targeted)"),
)
VECTOR_TABLE = (
    Column("name", "name", "text"),
    Column("shape", "shape", "text"),
    Column("numel", "numel", "int"),
    Column("rel_delta", "rel Δ", "pct", "‖v_S − v_T‖ / ‖v_T‖"),
    Column("max_abs_diff", "max |Δ|", "num"),
    Column("cosine", "cosine", "num"),
)
BLOCK_TABLE = (
    Column("block", "block", "text"),
    Column("layers", "layers", "int"),
    Column("params", "params", "int"),
    Column("dir_mean", "dir mean", "pct", "params-weighted mean direction change"),
    Column("norm_rel_mean", "norm mean", "pct", "params-weighted mean norm change"),
    Column("rel_delta", "rel Δ", "pct", "params-weighted mean ‖ΔW‖_F / ‖W‖_F"),
    Column("rotation_explained", "rot. expl.", "pct", "params-weighted mean share a pairwise rotation explains"),
    Column("lorad_params", "LoRaD params", "int", "trainable parameters of the fitted ranks"),
)
RANK_TABLE = (
    Column("module", "module", "text"),
    Column("block", "block", "text"),
    Column("shape", "shape", "text"),
    Column("rank", "rank", "int"),
    Column("params", "params", "int", "rank × (out + in/2)"),
    Column("energy_captured", "Θ energy captured", "pct"),
)


def _format(value: Any, kind: str) -> str:
    """Dispatch a cell to its deterministic formatter."""
    if kind == "int":
        return format_int(value)
    if kind == "pct":
        return format_pct(value)
    if kind == "num":
        return format_num(value)
    if kind == "deg":
        text = format_num(value)
        return text if text == "–" else f"{text}°"
    return "" if value is None else str(value)


def _sort_key(value: Any) -> str:
    """The raw value a sortable table sorts on (repr is deterministic; NaN sorts as empty)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return repr(value)


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("weightlens", "report/templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        pct=format_pct, num=format_num, int=format_int, ratio=format_ratio, fmt=_format, sortkey=_sort_key,
    )
    return env


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _file_row(role: str, info: Any) -> dict[str, Any]:
    if not isinstance(info, Mapping):
        return {"role": role, "path": str(info), "format": "", "bytes": None, "tensors": None, "dtypes": ""}
    dtypes = info.get("dtypes") or {}
    return {
        "role": role,
        "path": str(info.get("path", "")),
        "format": str(info.get("format", "")),
        "bytes": info.get("bytes"),
        "tensors": info.get("tensors"),
        "dtypes": ", ".join(f"{k} × {v}" for k, v in dtypes.items()) if isinstance(dtypes, Mapping) else str(dtypes),
    }


def _provenance(prov: Mapping[str, Any], timestamp: bool) -> dict[str, Any]:
    """Split provenance into what the template lays out; wall-clock keys only if asked."""
    command = prov.get("command")
    if isinstance(command, (list, tuple)):
        command = shlex.join(str(c) for c in command)
    versions = prov.get("versions") or {}
    return {
        "tool": f"{prov.get('tool', 'weightlens')} {prov.get('version', '')}".strip(),
        "versions": [(str(k), str(v)) for k, v in versions.items()] if isinstance(versions, Mapping) else [],
        "files": [_file_row(role, prov[role]) for role in ("teacher", "student") if role in prov],
        "command": command or None,
        "other": [(str(k), str(v)) for k, v in prov.items() if k not in _PROVENANCE_SHOWN and k not in TIMESTAMP_KEYS],
        "timestamps": [(str(k), str(prov[k])) for k in sorted(TIMESTAMP_KEYS) if timestamp and k in prov],
    }


def _title_names(prov: Mapping[str, Any]) -> tuple[str, str]:
    def name(role: str) -> str:
        info = prov.get(role)
        path = info.get("path") if isinstance(info, Mapping) else info
        return Path(str(path)).name if path else role

    return name("teacher"), name("student")


def render_html(analysis: Analysis, figures: Mapping[str, Path], timestamp: bool = True) -> str:
    """Render the report page.

    Args:
        analysis: a finished analysis.
        figures: figure key -> PNG path, as :func:`~weightlens.report.render_figures` returns;
            each is embedded as a base64 data URI, missing keys leave their figure out.
        timestamp: show wall-clock provenance (finish time, duration); False renders a
            page that depends on the analysis only.

    Returns:
        The HTML document.
    """
    teacher, student = _title_names(analysis.provenance)
    alerts = sorted(analysis.alerts, key=lambda a: 0 if a.level == "warning" else 1)
    ranks = rank_table(analysis)
    context = {
        "a": analysis,
        "v": verdict(analysis),
        "dominance": DOMINANCE,
        "teacher_name": teacher,
        "student_name": student,
        "blocks": block_table(analysis),
        "ranks": ranks,
        "ranks_open": len(ranks) <= OPEN_RANK_ROWS,
        "images": {key: _data_uri(path) for key, path in figures.items()},
        "alerts": alerts,
        "warnings": sum(1 for a in alerts if a.level == "warning"),
        "prov": _provenance(analysis.provenance, timestamp),
        "layer_columns": LAYER_TABLE,
        "vector_columns": VECTOR_TABLE,
        "block_columns": BLOCK_TABLE,
        "rank_columns": RANK_TABLE,
    }
    return _environment().get_template("report.html.j2").render(**context)
