"""The report's figures as PNG files, drawn with matplotlib's object API (no pyplot).

One function per figure: each takes records (layer stats, block rows, rank rows, spectrum
curves) and a path, and writes one PNG at a fixed size. Nothing here computes statistics;
derived views come from :mod:`weightlens.verdict`. Output is deterministic: fixed sizes, no
timestamps, no software metadata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from weightlens.results import Analysis, LayerStats, Summary
from weightlens.verdict import (
    BlockRow,
    RankHeadline,
    RankRow,
    SpectrumCurve,
    block_table,
    format_int,
    format_pct,
    rank_table,
    spectrum_curves,
    verdict,
)

__all__ = [
    "FIGURE_FILES",
    "fig1a_scatter",
    "change_by_block",
    "spectra",
    "rank_allocation",
    "angle_hist",
    "render_figures",
]

DPI = 110
# Okabe-Ito: distinguishable with every common colour-vision deficiency.
BLUE, ORANGE, GREEN, VERMILLION, SKY, PURPLE, YELLOW, GREY = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442", "#6B6B6B",
)
CYCLE = (BLUE, ORANGE, GREEN, VERMILLION, SKY, PURPLE, GREY)
DIR_COLOUR, NORM_COLOUR = BLUE, ORANGE
FIGURE_FILES = {
    "fig1a_scatter": "fig1a_scatter.png",
    "change_by_block": "change_by_block.png",
    "spectra": "spectra.png",
    "rank_allocation": "rank_allocation.png",
    "angle_hist": "angle_hist.png",
}
# Shortened inside a name only: a DiT block label `transformer_blocks.3` stays whole.
_ABBREVIATIONS = ((".transformer_blocks.", ".tb."), (".attentions.", ".attn."), (".resnets.", ".res."))
BLOCK_LABEL_WIDTH = 28  # a whole `single_transformer_blocks.37` (Flux) fits
_POINTS: dict[str, Any] = {"alpha": 0.75, "edgecolors": "white", "linewidths": 0.4, "zorder": 3}
_SLANTED: dict[str, Any] = {"rotation": 40, "ha": "right", "rotation_mode": "anchor", "fontsize": 9}


def short_name(name: str, width: int = 36) -> str:
    """A layer name fit for a label: `.weight` dropped, common words shortened, middle elided.

    Elision keeps whole dotted components: the block (`down_blocks.0`) and as much of the
    tail (`attn2.to_k`) as fits, e.g. `down_blocks.0…tb.0.attn2.to_k`.
    """
    text = name.removesuffix(".weight")
    for long, short in _ABBREVIATIONS:
        text = text.replace(long, short)
    if len(text) <= width:
        return text
    parts = text.split(".")
    head = ".".join(parts[:2])
    tail: list[str] = []
    for part in reversed(parts[2:]):
        if len(head) + 1 + len(".".join([part, *tail])) > width:
            break
        tail.insert(0, part)
    if tail and len(head) < width // 2 + 4:
        return head + "…" + ".".join(tail)
    keep = width // 3
    return text[:keep] + "…" + text[len(text) - (width - keep - 1):]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, color="#e3e3e3", linewidth=0.7, zorder=0)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=9)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return path


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color=GREY)
    ax.set_xticks([])
    ax.set_yticks([])


def _pct_ticks(value: float, _pos: object = None) -> str:
    return format_pct(value, sig=2)


def _positive(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]


def fig1a_scatter(layers: Sequence[LayerStats], summary: Summary, path: Path) -> Path:
    """The WaDi paper's Fig. 1a: per layer (mean, std) over rows of norm and direction change.

    Log axes: changes span orders of magnitude. Layers with a zero mean or std (unchanged,
    or an exactly uniform rescale) cannot sit on log axes and are counted in the caption.
    """
    fig = _figure(7.6, 6.0)
    ax = fig.add_subplot()
    norm = _positive([(l.norm_rel_mean, l.norm_rel_std) for l in layers])
    direc = _positive([(l.dir_mean, l.dir_std) for l in layers])
    if not norm and not direc:
        _empty(ax, "no layer changed: nothing to plot")
        ax.set_title("Norm vs direction change per layer", fontsize=12, loc="left")
        return _save(fig, path)
    _style(ax)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if norm:
        ax.scatter(*zip(*norm), s=26, marker="o", color=NORM_COLOUR, label="norm change |Δ‖w‖| / ‖w‖", **_POINTS)
    if direc:
        ax.scatter(*zip(*direc), s=30, marker="^", color=DIR_COLOUR, label="direction change ‖Δu‖", **_POINTS)
    for (mu, sd), colour, label in (
        ((summary.norm_rel_mean, summary.norm_rel_std), NORM_COLOUR, "all layers: norm"),
        ((summary.dir_mean, summary.dir_std), DIR_COLOUR, "all layers: direction"),
    ):
        if _positive([(mu, sd)]):
            ax.scatter([mu], [sd], s=320, marker="*", color=colour, edgecolors="black", linewidths=0.9,
                       label=label, zorder=4)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(_pct_ticks))
    ax.set_xlabel("mean over output rows", fontsize=10)
    ax.set_ylabel("std over output rows", fontsize=10)
    ax.set_title("Norm vs direction change per layer (WaDi Fig. 1a)", fontsize=12, loc="left")
    ax.legend(fontsize=9, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2, markerscale=0.8)
    hidden = 2 * len(layers) - len(norm) - len(direc)
    if hidden:
        note = f"{hidden} points with zero mean or std not shown (log axes)"
        ax.text(1.0, 1.01, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color=GREY)
    return _save(fig, path)


def change_by_block(blocks: Sequence[BlockRow], path: Path) -> Path:
    """Per-block params-weighted mean direction vs norm change, in depth order."""
    width = min(max(6.5, 0.55 * len(blocks) + 2.5), 14.0)
    fig = _figure(width, 4.6)
    ax = fig.add_subplot()
    ax.set_title("Mean change by block (params-weighted, forward order)", fontsize=12, loc="left")
    if not blocks:
        _empty(ax, "no layers")
        return _save(fig, path)
    _style(ax)
    ax.grid(False, axis="x")
    xs = range(len(blocks))
    bar = 0.38
    dirs = [_zero_nan(b.dir_mean) for b in blocks]
    norms = [_zero_nan(b.norm_rel_mean) for b in blocks]
    ax.bar([x - bar / 2 for x in xs], dirs, bar, color=DIR_COLOUR, label="direction change", zorder=3)
    ax.bar([x + bar / 2 for x in xs], norms, bar, color=NORM_COLOUR, label="norm change", zorder=3)
    ax.set_xticks(list(xs), [short_name(b.block, BLOCK_LABEL_WIDTH) for b in blocks], **_SLANTED)
    ax.yaxis.set_major_formatter(FuncFormatter(_pct_ticks))
    ax.set_ylabel("mean over rows", fontsize=10)
    ax.set_xlim(-0.6, len(blocks) - 0.4)
    top = max([*dirs, *norms, 0.0])
    if top > 0:
        ax.set_ylim(0, top * 1.15)  # headroom for the legend row
    ax.legend(fontsize=9, frameon=False, loc="upper right", ncols=2)
    return _save(fig, path)


def _zero_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _energy_scatter(ax: Axes, layers: Sequence[LayerStats]) -> None:
    series = (
        ("theta_energy_30", "Θ (implied rotation)", BLUE, "o"),
        ("resid_energy_30", "direction residual", VERMILLION, "s"),
    )
    plotted = False
    for attr, label, colour, marker in series:
        pts = [(getattr(l, f"{attr}_random"), getattr(l, attr)) for l in layers]
        pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if pts:
            ax.scatter(*zip(*pts), s=24, marker=marker, color=colour, label=label, **_POINTS)
            plotted = True
    if not plotted:
        _empty(ax, "no spectra (stats-only analysis or no change)")
        return
    _style(ax)
    ax.plot([0, 1], [0, 1], linestyle="--", color=GREY, linewidth=1, zorder=2, label="random matrix (y = x)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(_pct_ticks))
    ax.set_xlabel("random Gaussian matrix of the same shape", fontsize=10)
    ax.set_ylabel("this layer", fontsize=10)
    # Lower right stays clear: a layer's spectrum is rarely flatter than a random matrix's.
    ax.legend(fontsize=8.5, loc="lower right", frameon=False)
    note = "above the line:\nmore low-rank than random"
    ax.text(0.03, 0.97, note, transform=ax.transAxes, va="top", fontsize=8.5, color=GREY)


def _curves(ax: Axes, curves: Sequence[SpectrumCurve]) -> None:
    if not curves:
        _empty(ax, "no Θ spectra (stats-only analysis or no rotation)")
        return
    _style(ax)
    for i, c in enumerate(curves):
        colour = CYCLE[i % len(CYCLE)]
        label = short_name(c.name, 34)
        ax.plot((0.0, *c.rank_fraction), (0.0, *c.cumulative), color=colour, linewidth=1.8, label=label)
        ax.plot((0.0, *c.random_rank_fraction), (0.0, *c.random_cumulative), color=colour, linewidth=1, linestyle=":")
    ax.axvline(0.3, color=GREY, linewidth=0.8, linestyle="--")
    ax.axhline(0.9, color=GREY, linewidth=0.8, linestyle="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(_pct_ticks))
    ax.set_xlabel("rank (fraction of full rank)", fontsize=10)
    ax.set_ylabel("cumulative Θ energy", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color=GREY, linestyle=":", linewidth=1))
    labels.append("random matrix (dotted)")
    ax.legend(handles, labels, fontsize=8, loc="lower right", frameon=False)


def spectra(layers: Sequence[LayerStats], curves: Sequence[SpectrumCurve], path: Path) -> Path:
    """Energy in the top 30 % of ranks vs a random matrix, and a few cumulative Θ curves."""
    fig = _figure(11.5, 5.0)
    left, right = fig.subplots(1, 2, width_ratios=(1, 1.15))
    left.set_title("Energy in the top 30 % of ranks, per layer", fontsize=11, loc="left")
    right.set_title("Cumulative Θ energy, most changed layers", fontsize=11, loc="left")
    _energy_scatter(left, layers)
    _curves(right, curves)
    return _save(fig, path)


def _spaced_labels(spans: Sequence[tuple[str, int, int]], total: int, slots: int = 28) -> list[tuple[float, str]]:
    """Span centres and labels, leaving out a label that would overlap the previous one.

    Slanted labels need about total/slots bars each; a U-Net's first blocks (time embedding,
    a down block holding only its resnets' time projections) span a few bars and would
    otherwise print on top of each other. Their colour and separator lines still show them.
    """
    kept: list[tuple[float, str]] = []
    for block, start, end in spans:
        centre = (start + end) / 2
        if not kept or centre - kept[-1][0] >= total / slots:
            kept.append((centre, short_name(block, BLOCK_LABEL_WIDTH)))
    return kept


def _block_spans(rows: Sequence[RankRow]) -> list[tuple[str, int, int]]:
    spans: list[tuple[str, int, int]] = []
    for i, r in enumerate(rows):
        if spans and spans[-1][0] == r.block:
            spans[-1] = (r.block, spans[-1][1], i)
        else:
            spans.append((r.block, i, i))
    return spans


def rank_allocation(rows: Sequence[RankRow], headline: RankHeadline, path: Path) -> Path:
    """Fitted LoRaD rank per target module in depth order, coloured by block."""
    fig = _figure(11.5, 5.0 if len(rows) <= 40 else 4.4)
    ax = fig.add_subplot()
    ax.set_title(
        f"LoRaD ranks: {format_int(headline.target_modules)} modules, "
        f"{format_int(headline.trainable_params)} trainable "
        f"parameters ({format_pct(headline.trainable_fraction)} of the backbone)",
        fontsize=11, loc="left",
    )
    if not rows:
        _empty(ax, "no module was given a rank")
        return _save(fig, path)
    _style(ax)
    ax.grid(False, axis="x")
    spans = _block_spans(rows)
    colour_of = {block: CYCLE[i % len(CYCLE)] for i, (block, _, _) in enumerate(spans)}
    ax.bar(range(len(rows)), [r.rank for r in rows], 0.8, color=[colour_of[r.block] for r in rows], zorder=3)
    for _, start, _ in spans[1:]:
        ax.axvline(start - 0.5, color="#bdbdbd", linewidth=0.8, zorder=1)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("rank", fontsize=10)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if len(rows) <= 40:
        ax.set_xticks(range(len(rows)), [short_name(r.module, 30) for r in rows], rotation=90, fontsize=7.5)
        handles = [Line2D([], [], color=colour_of[b], linewidth=6) for b, _, _ in spans]
        labels = [b for b, _, _ in spans]
        ax.legend(handles, labels, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ticks = _spaced_labels(spans, len(rows))
        ax.set_xticks([c for c, _ in ticks], [label for _, label in ticks], **_SLANTED)
        ax.tick_params(axis="x", length=0)
    return _save(fig, path)


def angle_hist(layers: Sequence[LayerStats], path: Path) -> Path:
    """Distribution over changed layers of the mean rotation angle of a row."""
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot()
    ax.set_title("Mean row rotation angle per layer", fontsize=11, loc="left")
    angles = [l.angle_mean_deg for l in layers if math.isfinite(l.angle_mean_deg) and l.angle_mean_deg > 0]
    if not angles:
        _empty(ax, "no layer rotated")
        return _save(fig, path)
    _style(ax)
    ax.hist(angles, bins=min(30, max(5, len(angles) // 2)), color=BLUE, edgecolor="white", linewidth=0.6, zorder=3)
    ax.set_xlabel("mean angle between teacher and student rows (degrees)", fontsize=10)
    ax.set_ylabel("layers", fontsize=10)
    skipped = len(layers) - len(angles)
    if skipped:
        note = f"{skipped} unrotated layers not shown"
        ax.text(0.98, 0.95, note, transform=ax.transAxes, ha="right", va="top", fontsize=8.5, color=GREY)
    return _save(fig, path)


def render_figures(analysis: Analysis, folder: Path) -> dict[str, Path]:
    """Write every figure of the report into ``folder`` (created if missing).

    Returns:
        Figure key (e.g. `fig1a_scatter`) -> PNG path. Figures with nothing to show are
        left out: `spectra` in stats-only mode, `rank_allocation` without fitted ranks,
        `angle_hist` when no layer changed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = list(analysis.layers)
    lead = verdict(analysis)
    out = {
        "fig1a_scatter": fig1a_scatter(layers, analysis.summary, folder / FIGURE_FILES["fig1a_scatter"]),
        "change_by_block": change_by_block(block_table(analysis), folder / FIGURE_FILES["change_by_block"]),
    }
    if lead.has_spectra:
        out["spectra"] = spectra(layers, spectrum_curves(analysis), folder / FIGURE_FILES["spectra"])
    if lead.ranks is not None:
        path = folder / FIGURE_FILES["rank_allocation"]
        out["rank_allocation"] = rank_allocation(rank_table(analysis), lead.ranks, path)
    if lead.changed_layers:
        out["angle_hist"] = angle_hist(layers, folder / FIGURE_FILES["angle_hist"])
    return out
