"""The digits demo's overview page: results table, sample grids, loss curves, links to the
weightlens reports. Rendering only: every number comes from results.json's document."""

from __future__ import annotations

import base64
import csv
import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader

__all__ = ["plot_losses", "write_demo_report"]


def plot_losses(runs: Path, out_png: Path) -> Path | None:
    """Student, fake-score and (with the adversarial term) discriminator loss curves of every
    run (metrics.csv) in one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {}
    for metrics in sorted(runs.glob("*/metrics.csv")):
        with metrics.open() as fh:
            rows = list(csv.DictReader(fh))
        if rows:
            series[metrics.parent.name] = rows
    if not series:
        return None
    panels = [("loss_student", "VSD student loss"), ("loss_fake", "fake-score denoising loss")]
    if any(math.isfinite(float(r.get("loss_gan_discriminator") or "nan")) for rows in series.values() for r in rows):
        panels.append(("loss_gan_discriminator", "discriminator loss (chance: 2 ln 2)"))
    fig = Figure(figsize=(5 * len(panels), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for name, rows in series.items():
        steps = [int(r["step"]) for r in rows]
        for ax, (key, _) in zip(axes, panels):
            ax.plot(steps, [float(r.get(key) or "nan") for r in rows], label=name, linewidth=1.2)
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "loss_gan_discriminator":
            ax.axhline(2 * math.log(2), color="grey", linestyle="--", linewidth=0.8)
        else:
            ax.set_yscale("log")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, metadata={"Software": None})
    return out_png


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_demo_report(out: Path, doc: dict[str, Any]) -> Path:
    """Write out/index.html (self-contained except links to the weightlens reports)."""
    env = Environment(loader=PackageLoader("wadi_train.demo", "templates"), autoescape=True)
    env.filters["fmt"] = _fmt
    env.filters["pct"] = lambda x: "–" if x is None else f"{100 * x:.1f}%"
    curves = plot_losses(out / "runs", out / "loss_curves.png")
    teacher50 = next((r for r in doc["results"] if r["name"].startswith("teacher") and r["steps"] == max(doc["settings"]["teacher_steps"])), None)
    reports = {p.parent.name: str(p.relative_to(out)) for p in sorted((out / "weightlens").glob("*/report.html"))}
    html = env.get_template("index.html.j2").render(
        doc=doc, results=doc["results"], teacher_ref=teacher50,
        grids={k: _png(out / v) for k, v in doc["grids"].items() if (out / v).is_file()},
        curves=_png(curves) if curves else None, reports=reports,
    )
    path = out / "index.html"
    path.write_text(html)
    return path
