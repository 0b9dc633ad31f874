"""The weightlens CLI through Typer's CliRunner: exit codes, files written, escaping."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from weightlens.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pair(unet_pair, tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("cli")
    save_file(unet_pair.teacher, d / "t.safetensors")
    save_file(unet_pair.student, d / "s.safetensors")
    return d / "t.safetensors", d / "s.safetensors"


def test_compare_writes_every_file(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    res = runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "-o", str(out), "--budget", "2%", "-q"])
    assert res.exit_code == 0, res.output
    for name in ("report.html", "layers.csv", "vectors.csv", "summary.json", "ranks.json", "spectra.npz"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("layers", "norm_rel_mean", "norm_rel_std", "dir_mean", "dir_std", "dir_to_norm_ratio", "only_in_teacher", "only_in_student", "shape_mismatch", "alerts", "provenance"):
        assert key in summary
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["method"] == "lorad" and set(ranks["rank_pattern"]) == set(ranks["target_modules"])
    assert ranks["trainable_params"] <= 0.02 * ranks["budget"]["backbone_params"]
    assert all(not m.endswith(".weight") for m in ranks["target_modules"])
    layers = pd.read_csv(out / "layers.csv")
    assert layers["lorad_rank"].sum() == sum(ranks["rank_pattern"].values())


def test_existing_output_is_not_clobbered(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "-o", str(out), "-q"])
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert not (out / "layers.csv").exists()
    res = runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "-o", str(out), "-q", "--overwrite", "--no-report"])
    assert res.exit_code == 0, res.output
    assert (out / "precious.txt").read_text() == "keep me" and (out / "layers.csv").exists()


def test_fit_ranks_refits_without_weights(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    assert runner.invoke(app, ["compare", str(pair[0]), str(pair[1]), "-o", str(out), "-q", "--no-report"]).exit_code == 0
    pair[0].rename(pair[0].with_suffix(".moved"))  # prove no weights are read
    try:
        res = runner.invoke(app, ["fit-ranks", str(out), "--budget", "1%", "--multiple-of", "2"])
    finally:
        pair[0].with_suffix(".moved").rename(pair[0])
    assert res.exit_code == 0, res.output
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["trainable_params"] <= 0.01 * ranks["budget"]["backbone_params"]
    assert all(r % 2 == 0 for r in ranks["rank_pattern"].values())
    assert (out / "ranks.prev.json").is_file()
    assert pd.read_csv(out / "layers.csv")["lorad_rank"].sum() == sum(ranks["rank_pattern"].values())


def test_html_escapes_hostile_key(unet_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    evil = "<script>alert(1)</script>.weight"
    t = dict(unet_pair.teacher)
    s = dict(unet_pair.student)
    t[evil] = torch.randn(8, 8)
    s[evil] = torch.randn(8, 8)
    save_file(t, tmp_path / "t.safetensors")
    save_file(s, tmp_path / "s.safetensors")
    res = runner.invoke(app, ["compare", str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_hybrid_swaps_norms(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "hybrid.safetensors"
    res = runner.invoke(app, ["hybrid", str(pair[0]), str(pair[1]), "--norm-from", "teacher", "--direction-from", "student", "-o", str(out)])
    assert res.exit_code == 0, res.output
    t, s = safe_open(str(pair[0]), "pt"), safe_open(str(pair[1]), "pt")
    with safe_open(str(out), "pt") as h:
        key = "mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight"  # planted scale 0.95
        hw, tw, sw = h.get_tensor(key), t.get_tensor(key), s.get_tensor(key)
        torch.testing.assert_close(hw.norm(dim=1), tw.norm(dim=1))
        torch.testing.assert_close(hw / hw.norm(dim=1, keepdim=True), sw / sw.norm(dim=1, keepdim=True))
        assert set(h.keys()) == set(t.keys())
    again = runner.invoke(app, ["hybrid", str(pair[0]), str(pair[1]), "-o", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_inspect(pair) -> None:  # type: ignore[no-untyped-def]
    res = runner.invoke(app, ["inspect", str(pair[0]), "--keys"])
    assert res.exit_code == 0, res.output
    assert "down_blocks.0" in res.output and "mid_block" in res.output


def test_demo(tmp_path: Path) -> None:
    res = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo"), "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "demo" / "report.html").is_file() and "report.html" in res.output


@pytest.mark.parametrize("args,needle", [
    (["compare", "missing.safetensors", "missing2.safetensors"], "no such file"),
    (["fit-ranks", "nowhere"], "layers.csv"),
    (["inspect", "nowhere.safetensors"], "no such file"),
])
def test_user_errors_are_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert needle in res.output and "Traceback" not in res.output
