"""The main job end to end with the --quick settings: every artefact exists, numbers in range."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
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


def test_rerun_reuses_students_and_the_teacher_evaluation(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A second run with the same settings retrains nothing and does not sample the teacher
    again (its rows come from the cache); a changed evaluation setting samples it again."""
    import wadi_train.demo.pipeline as pipeline
    from wadi_train.demo.settings import QUICK

    s = replace(QUICK, methods=("lorad_uniform",), eval_samples=60, teacher_steps=(1, 2))
    out, cache = tmp_path / "digits", tmp_path / "cache"
    first = pipeline.run_digits_demo(out, cache, s)
    assert first["reused_runs"] == []

    def no_teacher_sampling(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the teacher was sampled again")

    real = pipeline._teacher_samples
    monkeypatch.setattr(pipeline, "_teacher_samples", no_teacher_sampling)
    second = pipeline.run_digits_demo(out, cache, s)
    assert set(second["reused_runs"]) == {"reference", "lorad_uniform"}
    teacher_rows = [r for r in first["results"] if r["kind"] == "teacher"]
    assert [r for r in second["results"] if r["kind"] == "teacher"] == teacher_rows
    assert {r["name"] for r in teacher_rows} == {"student_init", "teacher_ddim1", "teacher_ddim2"}
    assert all((out / second["grids"][r["name"]]).is_file() for r in teacher_rows)

    calls: list[int] = []
    monkeypatch.setattr(pipeline, "_teacher_samples", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    third = pipeline.run_digits_demo(out, cache, replace(s, teacher_steps=(1, 3)))
    assert calls == [1, 3] and "teacher_ddim3" in {r["name"] for r in third["results"]}


def test_run_configs_match_configs_digits_yaml_and_give_lora_its_fake_lr(tmp_path: Path) -> None:
    """configs/digits.yaml documents the demo's LoRaD student: every fake/vsd/optim/train
    setting it names must be what the demo's own run config uses; the LoRA student's fake
    score gets lora_fake_lr; the adversarial term brings the real images."""
    import yaml

    from wadi_train.demo.pipeline import _run_config
    from wadi_train.demo.settings import FULL

    s, real = FULL, tmp_path / "real.safetensors"
    lorad = _run_config(tmp_path, tmp_path / "t.safetensors", s, "lorad", {"method": "lorad", "rank": 8}, s.student_steps, s.student_lr, real)
    yaml_cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "digits.yaml").read_text())
    for section in ("fake", "vsd", "optim"):
        for key, value in yaml_cfg[section].items():
            if key != "method":
                assert lorad[section][key] == value, (section, key)
    for key in ("steps", "batch_size", "seed", "ema_decay"):
        assert lorad["train"][key] == yaml_cfg["train"][key], key
    assert yaml_cfg["model"]["config"] == lorad["model"]["config"]

    lora = _run_config(tmp_path, tmp_path / "t.safetensors", s, "lora", {"method": "lora", "rank": 12}, s.student_steps, s.lora_lr, real)
    assert lora["optim"]["fake_lr"] == s.lora_fake_lr != s.fake_lr == lorad["optim"]["fake_lr"]
    assert lora["fake"] == lorad["fake"] and lora["optim"]["student_lr"] == s.lora_lr

    # the default has the adversarial term, so its run configs carry the real images
    assert lorad["vsd"]["gan_weight"] == s.gan_weight > 0 and lorad["data"]["real_images"] == str(real)
    without = _run_config(tmp_path, tmp_path / "t.safetensors", replace(s, gan_weight=0.0), "lorad", {"method": "lorad"}, 4, 1e-3)
    assert "gan_weight" not in without["vsd"] and without["data"] == {}
    with pytest.raises(ValueError, match="real images"):
        _run_config(tmp_path, tmp_path / "t.safetensors", s, "lorad", {"method": "lorad"}, 4, 1e-3)
