"""The main job end to end with the --quick settings: every artefact exists, numbers in range."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from typer.testing import CliRunner

from wadi_train.cli import app
from wadi_train.demo.settings import METHODS


def test_quick_demo_writes_every_artefact(tmp_path: Path) -> None:
    out, cache = tmp_path / "digits", tmp_path / "cache"
    res = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out), "--cache", str(cache), "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    names = {r["name"] for r in doc["results"]}
    assert set(METHODS) <= names and {"student_init", "teacher_ddim1", "teacher_ddim4", "teacher_ddim10"} <= names
    for r in doc["results"]:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0, r
        assert 0.0 <= r["accuracy"] <= 1.0 and r["ms_per_image"] > 0, r
        assert (out / doc["grids"][r["name"]]).is_file()
    for name in ("reference-full", *METHODS):
        assert (out / "weightlens" / name / "report.html").is_file(), name
    ranks = json.loads((out / "weightlens" / "reference-full" / "ranks.json").read_text())
    assert ranks["trainable_params"] <= 0.1 * ranks["budget"]["backbone_params"] + 1
    assert (out / "index.html").is_file() and (out / "loss_curves.png").is_file()
    html = (out / "index.html").read_text()
    assert "lorad_fitted" in html and "data:image/png;base64" in html
    assert "report:" in res.output
