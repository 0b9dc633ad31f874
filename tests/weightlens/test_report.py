"""The report: verdict and block aggregates, PNG figures, the self-contained HTML page."""

from __future__ import annotations

import math
import re
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from weightlens.ranks import RankConfig, RankOptions
from weightlens.report import render_figures, render_html, write_report
from weightlens.report.figures import fig1a_scatter, short_name
from weightlens.results import Alert, Analysis, LayerStats, LayerTable, Summary, VectorStats
from weightlens.verdict import (
    DIRECTION_DOMINATED,
    MIXED,
    NORM_DOMINATED,
    UNCHANGED,
    block_table,
    format_int,
    format_num,
    format_pct,
    format_ratio,
    rank_table,
    spectrum_curves,
    verdict,
)

EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def layer(name: str, dir_mean: float = 0.02, norm_rel_mean: float = 0.001, **over: object) -> LayerStats:
    """A hand-built layer record; fields not given are plausible defaults."""
    from weightlens.blocks import block_of

    fields: dict[str, object] = dict(
        name=name, kind="linear", shape="64x32", params=2048, rows=64,
        norm_rel_mean=norm_rel_mean, norm_rel_std=norm_rel_mean / 2, dir_mean=dir_mean, dir_std=dir_mean / 3,
        angle_mean_deg=math.degrees(dir_mean), angle_max_deg=2 * math.degrees(dir_mean),
        one_minus_cos_mean=dir_mean**2 / 2, rel_delta=dir_mean + norm_rel_mean, rotation_explained=0.9,
        theta_rank_90=4, theta_energy_30=0.95, resid_rank_90=6, resid_energy_30=0.8, lorad_rank=0,
        block=block_of(name), depth=0, rows_excluded=0, nonfinite_rows=0,
        theta_energy_30_random=0.55, resid_energy_30_random=0.6, odd_column=False,
        teacher_dtype="float32", student_dtype="float32",
    )
    fields.update(over)
    return LayerStats(**fields)  # type: ignore[arg-type]


def unchanged(name: str, **over: object) -> LayerStats:
    nan = math.nan
    return layer(
        name, dir_mean=0.0, norm_rel_mean=0.0, norm_rel_std=0.0, dir_std=0.0, angle_mean_deg=0.0, angle_max_deg=0.0,
        one_minus_cos_mean=0.0, rel_delta=0.0, rotation_explained=nan, theta_rank_90=0, theta_energy_30=nan,
        resid_rank_90=0, resid_energy_30=nan, **over,
    )


def analysis_of(rows: list[LayerStats], **over: object) -> Analysis:
    fields: dict[str, object] = dict(
        layers=LayerTable(rows), vectors=(), summary=Summary.pool(rows), only_in_teacher=(), only_in_student=(),
        shape_mismatch=(), alerts=(), provenance={"tool": "weightlens", "version": "0", "command": ["weightlens", "compare"]},
    )
    fields.update(over)
    return Analysis(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Analysis:
    """A real analysis: the tiny U-Net vs its planted student, ranks fitted under a budget."""
    from safetensors.torch import save_file

    import weightlens
    from weightlens.planted import build_tiny_unet, default_plant, plant_student

    sd = {k: v.contiguous() for k, v in build_tiny_unet().state_dict().items()}
    st = plant_student(sd, default_plant(sd, {k: tuple(v.shape) for k, v in sd.items()}))
    d = tmp_path_factory.mktemp("planted")
    save_file(sd, str(d / "t.safetensors"))
    save_file(st, str(d / "s.safetensors"))
    return weightlens.compare(d / "t.safetensors", d / "s.safetensors", weightlens.CompareOptions(budget="2%"))


@pytest.fixture(scope="module")
def hostile(planted: Analysis) -> Analysis:
    """The planted analysis with a script-named layer, vector, alert and key everywhere."""
    evil = layer(f"{EVIL}.weight", block=EVIL, depth=99, lorad_rank=2)
    return replace(
        planted,
        layers=LayerTable([*planted.layers, evil]),
        vectors=(*planted.vectors, VectorStats(f"{EVIL}.bias", "16", 16, 0.01, 0.1, 0.999)),
        only_in_teacher=(f"{EVIL}.only",),
        shape_mismatch=((f"{EVIL}.mismatch", (4, 4), (4, 8)),),
        alerts=(*planted.alerts, Alert("warning", "only_in_teacher", f"1 tensors only in the teacher: {EVIL}")),
        provenance={**planted.provenance, "command": ["weightlens", "compare", EVIL]},
        ranks=replace(planted.ranks, rank_pattern={**planted.ranks.rank_pattern, EVIL: 2}),
    )


# ----------------------------------------------------------------------------- verdict


@pytest.mark.parametrize(
    ("dir_mean", "norm_mean", "kind", "word"),
    [
        (0.022, 0.001, DIRECTION_DOMINATED, "rotated"),
        (0.001, 0.02, NORM_DOMINATED, "rescaled"),
        (0.01, 0.01, MIXED, "alike"),
        (0.0, 0.0, UNCHANGED, "identical"),
    ],
)
def test_verdict_classifies_by_pooled_ratio(dir_mean: float, norm_mean: float, kind: str, word: str) -> None:
    rows = [layer(f"down_blocks.{i}.attn.to_q.weight", dir_mean, norm_mean, depth=i) for i in range(3)]
    if kind == UNCHANGED:
        rows = [unchanged(r.name, depth=r.depth) for r in rows]
    v = verdict(analysis_of(rows))
    assert v.kind == kind
    assert word in v.headline
    if kind == DIRECTION_DOMINATED:
        assert v.ratio == pytest.approx(22.0)
        assert "22×" in v.headline and "2.20%" in v.headline and "0.100%" in v.headline
    if kind == UNCHANGED:
        assert v.top_blocks == () and v.changed_layers == 0 and not v.has_spectra


def test_verdict_thresholds_are_inclusive_at_three() -> None:
    assert verdict(analysis_of([layer("a.weight", 0.03, 0.01)])).kind == DIRECTION_DOMINATED
    assert verdict(analysis_of([layer("a.weight", 0.01, 0.03)])).kind == NORM_DOMINATED
    assert verdict(analysis_of([layer("a.weight", 0.029, 0.01)])).kind == MIXED


def test_top_blocks_are_params_weighted() -> None:
    rows = [
        # down_blocks.0: (100 * 0.1 + 300 * 0.02) / 400 = 0.04
        layer("down_blocks.0.a.weight", params=100, rel_delta=0.1, depth=2),
        layer("down_blocks.0.b.weight", params=300, rel_delta=0.02, depth=2),
        layer("mid_block.a.weight", params=50, rel_delta=0.05, depth=4),
        layer("up_blocks.0.a.weight", params=50, rel_delta=0.001, depth=5),
        unchanged("conv_in.weight", depth=0),
    ]
    v = verdict(analysis_of(rows))
    assert [b.block for b in v.top_blocks] == ["mid_block", "down_blocks.0", "up_blocks.0"]
    assert v.top_blocks[1].rel_delta == pytest.approx(0.04)
    assert "most in mid_block, down_blocks.0 and up_blocks.0" in v.headline


def test_block_table_depth_order_weighted_means_and_nan() -> None:
    rows = [
        layer("up_blocks.0.a.weight", dir_mean=0.01, depth=5, lorad_rank=2),  # 64x32: unit cost 64 + 16
        layer("down_blocks.0.a.weight", params=100, dir_mean=0.01, depth=2, rotation_explained=0.5),
        layer("down_blocks.0.b.weight", params=300, dir_mean=0.03, depth=2, rotation_explained=math.nan),
    ]
    table = block_table(analysis_of(rows))
    assert [b.block for b in table] == ["down_blocks.0", "up_blocks.0"]
    down, up = table
    assert (down.layers, down.params) == (2, 400)
    assert down.dir_mean == pytest.approx((100 * 0.01 + 300 * 0.03) / 400)
    assert down.rotation_explained == pytest.approx(0.5)  # the NaN layer drops out
    assert up.lorad_params == 2 * (64 + 32 // 2)


def test_concentration_compares_with_random_on_the_same_layers() -> None:
    rows = [layer("a.weight", theta_energy_30=0.9, theta_energy_30_random=0.5), unchanged("b.weight", theta_energy_30_random=0.1)]
    v = verdict(analysis_of(rows))
    assert (v.theta_energy_30, v.theta_energy_30_random) == (pytest.approx(0.9), pytest.approx(0.5))
    assert v.concentration == "concentrated"
    like = verdict(analysis_of([layer("a.weight", theta_energy_30=0.51, theta_energy_30_random=0.5)]))
    assert like.concentration == "like random"


def test_rank_headline_and_table() -> None:
    rows = [layer("down_blocks.0.a.weight", depth=2, lorad_rank=4), layer("mid_block.a.weight", depth=4, lorad_rank=2)]
    ranks = RankConfig(  # keyed by module path: the weight key minus `.weight`
        rank_pattern={"mid_block.a": 2, "down_blocks.0.a": 4}, trainable_params=6 * 80,
        options=RankOptions(energy=0.9), backbone_params=4800, captured={"mid_block.a": 0.8, "down_blocks.0.a": 1.0},
    )
    a = analysis_of(rows, ranks=ranks, backbone_params=4800)
    head = verdict(a).ranks
    assert head is not None
    assert (head.target_modules, head.trainable_params, head.default_rank) == (2, 480, ranks.default_rank)
    assert head.trainable_fraction == pytest.approx(0.1)
    assert head.energy_captured == pytest.approx(0.9)
    table = rank_table(a)
    assert [r.module for r in table] == ["down_blocks.0.a", "mid_block.a"]
    assert [r.block for r in table] == ["down_blocks.0", "mid_block"]
    assert [r.params for r in table] == [4 * 80, 2 * 80]


def test_verdict_on_planted_analysis(planted: Analysis) -> None:
    v = verdict(planted)
    s = planted.summary
    assert v.ratio == s.dir_to_norm_ratio and v.dir_mean == s.dir_mean and v.norm_rel_mean == s.norm_rel_mean
    assert v.layers == len(planted.layers) and 0 < v.changed_layers < v.layers
    # Planted rotations are rank 4 in wide layers: far more concentrated than noise.
    assert v.concentration == "concentrated"
    assert v.ranks is not None
    assert v.ranks.target_modules == len(planted.ranks.rank_pattern)
    assert v.ranks.trainable_params == planted.ranks.trainable_params
    assert v.ranks.default_rank == 4
    assert sum(r.params for r in rank_table(planted)) == planted.ranks.trainable_params
    assert sum(b.lorad_params for b in block_table(planted)) == planted.ranks.trainable_params


def test_spectrum_curves_match_reported_energies(planted: Analysis) -> None:
    curves = spectrum_curves(planted, count=3)
    assert 0 < len(curves) <= 3
    for c in curves:
        row = planted.layers.by_name(c.name)
        n, m = len(c.cumulative), len(c.random_cumulative)
        assert c.cumulative[-1] == pytest.approx(1.0) and c.random_cumulative[-1] == pytest.approx(1.0)
        assert c.cumulative[math.ceil(0.3 * n) - 1] == pytest.approx(row.theta_energy_30, abs=1e-6)
        assert c.random_cumulative[math.ceil(0.3 * m) - 1] == pytest.approx(row.theta_energy_30_random, abs=1e-6)


@pytest.mark.parametrize(
    ("fn", "value", "text"),
    [
        (format_pct, 0.0221, "2.21%"), (format_pct, 0.001, "0.100%"), (format_pct, 1.0, "100%"),
        (format_pct, 0.99996, "100%"), (format_pct, 0.0, "0%"), (format_pct, math.nan, "–"),
        (format_num, 0.937, "0.937"), (format_num, 1234.5, "1,234"), (format_num, math.inf, "∞"),
        (format_int, 83_800_000, "83,800,000"), (format_int, None, "–"),
        (format_ratio, 22.41, "22×"), (format_ratio, 0.937, "0.94×"), (format_ratio, math.nan, "–"),
    ],
)
def test_formatting_is_fixed(fn, value, text) -> None:  # type: ignore[no-untyped-def]
    assert fn(value) == text


def test_short_name_keeps_block_and_tail() -> None:
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert short_name(name, 30) == "down_blocks.0…tb.0.attn2.to_k"
    assert short_name("conv_in.weight") == "conv_in"
    assert len(short_name("x" * 100, 20)) == 20


# ----------------------------------------------------------------------------- figures


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_render_figures_writes_valid_pngs(planted: Analysis, tmp_path: Path) -> None:
    figures = render_figures(planted, tmp_path / "figures")
    assert list(figures) == ["fig1a_scatter", "change_by_block", "spectra", "rank_allocation", "angle_hist"]
    for key, path in figures.items():
        assert path.parent == tmp_path / "figures" and path.name == f"{key}.png"
        width, height = _png_size(path)
        assert width >= 500 and height >= 300
        assert path.stat().st_size > 15_000, f"{key} looks empty"


def test_figures_are_deterministic(planted: Analysis, tmp_path: Path) -> None:
    a = fig1a_scatter(list(planted.layers), planted.summary, tmp_path / "a.png")
    b = fig1a_scatter(list(planted.layers), planted.summary, tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()


# ----------------------------------------------------------------------------- html


@pytest.fixture(scope="module")
def hostile_figures(hostile: Analysis, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return render_figures(hostile, tmp_path_factory.mktemp("figs"))


def test_html_escapes_user_strings(hostile: Analysis, hostile_figures: dict[str, Path]) -> None:
    html = render_html(hostile, hostile_figures, timestamp=False)
    assert EVIL not in html
    assert EVIL_ESCAPED in html
    assert html.count(EVIL_ESCAPED) >= 6  # layer, block, rank, vector, key lists, alert, command


def test_html_is_self_contained(hostile: Analysis, hostile_figures: dict[str, Path]) -> None:
    html = render_html(hostile, hostile_figures, timestamp=False)
    assert html.count('src="data:image/png;base64,') == len(hostile_figures)
    assert 'src="http' not in html and 'href="http' not in html and "<link" not in html
    for section in ("verdict", "fig1a", "blocks", "spectra", "ranks", "alerts", "keys", "layers", "vectors", "provenance"):
        assert f'id="{section}"' in html
    order = [html.index(f'id="{s}"') for s in ("verdict", "fig1a", "blocks", "spectra", "ranks", "alerts", "keys", "layers", "vectors", "provenance")]
    assert order == sorted(order)
    assert verdict(hostile).headline.replace("<", "&lt;").replace(">", "&gt;") in html


def test_html_is_deterministic_without_timestamp(planted: Analysis, tmp_path: Path) -> None:
    prov = {**planted.provenance, "finished_utc": "2026-01-01T00:00:00Z", "seconds": 1.5}
    a = replace(planted, provenance=prov)
    figures = render_figures(a, tmp_path)
    first, second = render_html(a, figures, timestamp=False), render_html(a, figures, timestamp=False)
    assert first == second
    assert "2026-01-01T00:00:00Z" not in first
    assert "2026-01-01T00:00:00Z" in render_html(a, figures, timestamp=True)


def test_renders_without_ranks(planted: Analysis, tmp_path: Path) -> None:
    a = replace(planted, ranks=None, layers=LayerTable([replace(l, lorad_rank=0) for l in planted.layers]))
    figures = render_figures(a, tmp_path)
    assert "rank_allocation" not in figures
    html = render_html(a, figures, timestamp=False)
    assert 'id="ranks"' not in html and "no ranks fitted" in html


def test_renders_zero_change_and_nan_fields(tmp_path: Path) -> None:
    nan = math.nan
    rows = [
        unchanged("conv_in.weight", kind="conv", depth=0),
        unchanged("down_blocks.0.attn.to_q.weight", depth=2),
        layer("mid_block.attn.to_k.weight", depth=4, dir_mean=nan, dir_std=nan, norm_rel_mean=nan, norm_rel_std=nan,
              angle_mean_deg=nan, angle_max_deg=nan, one_minus_cos_mean=nan, rel_delta=nan, rotation_explained=nan,
              theta_energy_30=nan, resid_energy_30=nan, rows_excluded=64, nonfinite_rows=64),
    ]
    a = analysis_of(rows, vectors=(VectorStats("conv_in.bias", "32", 32, nan, 0.0, nan),))
    v = verdict(a)
    assert v.kind == UNCHANGED and v.changed_layers == 0
    figures = render_figures(a, tmp_path / "figures")
    assert set(figures) == {"fig1a_scatter", "change_by_block"}  # nothing to show in the others
    for path in figures.values():
        _png_size(path)
    html = render_html(a, figures, timestamp=False)
    assert "identical to the teacher" in html
    body = html.split("<script>")[0]  # the sorting script legitimately says NaN
    assert "–" in body and not re.search(r"[>\s](nan|inf)[%×°<\s]", body, re.IGNORECASE)


def test_stats_only_analysis_renders(planted: Analysis, tmp_path: Path) -> None:
    nan = math.nan
    rows = [replace(l, rotation_explained=nan, theta_energy_30=nan, resid_energy_30=nan, theta_rank_90=0, resid_rank_90=0,
                    theta_energy_30_random=nan, resid_energy_30_random=nan, lorad_rank=0) for l in planted.layers]
    a = replace(planted, layers=LayerTable(rows), summary=Summary.pool(rows), theta_spectra={}, resid_spectra={}, ranks=None)
    figures = render_figures(a, tmp_path)
    assert "spectra" not in figures and "rank_allocation" not in figures
    html = render_html(a, figures, timestamp=False)
    assert "No spectra were computed" in html


def test_write_report(planted: Analysis, tmp_path: Path) -> None:
    path = write_report(planted, tmp_path / "out", timestamp=False)
    assert path == tmp_path / "out" / "report.html"
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in (tmp_path / "out" / "figures").iterdir()) == sorted(
        ["fig1a_scatter.png", "change_by_block.png", "spectra.png", "rank_allocation.png", "angle_hist.png"]
    )
