"""The weightlens report: PNG figures and one self-contained HTML page.

`render_figures` draws the figures from an :class:`~weightlens.results.Analysis`,
`render_html` renders the page (figures inlined as base64), and `write_report` does both
into an output folder (`figures/*.png` and `report.html`).
"""

from __future__ import annotations

from pathlib import Path

from weightlens.report.figures import render_figures
from weightlens.report.html import render_html
from weightlens.results import Analysis

__all__ = ["render_figures", "render_html", "write_report"]


def write_report(analysis: Analysis, out: Path, timestamp: bool = True) -> Path:
    """Write `out/figures/*.png` and `out/report.html`; return the HTML path.

    Args:
        analysis: a finished analysis.
        out: output folder (created if missing).
        timestamp: show the analysis's wall-clock times (off for golden tests).
    """
    out = Path(out)
    figures = render_figures(analysis, out / "figures")
    html_path = out / "report.html"
    html_path.write_text(render_html(analysis, figures, timestamp=timestamp), encoding="utf-8")
    return html_path
