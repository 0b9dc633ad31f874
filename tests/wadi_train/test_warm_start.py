"""Analysis-informed start: truncated SVD factors, and recovering a planted reference rotation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_config
from safetensors.torch import load_file, save_file

from wadi_train.adapters import build_roles
from wadi_train.config import from_dict
from wadi_train.errors import ConfigError
from wadi_train.lorad import lorad_layers
from wadi_train.models import Cond, load_teacher
from wadi_train.warm_start import low_rank_factors, warm_start_from_analysis

# attention projections of conftest.TINY_UNET that the reference pair rotates (rank 2)
PLANTED = {"down_blocks.0.attentions.0.to_q.weight": 2, "up_blocks.1.attentions.0.to_k.weight": 2, "up_blocks.0.attentions.1.to_q.weight": 2}


@pytest.mark.parametrize(("rank", "fit_rank"), [(3, 3), (3, 5), (2, 20)])
def test_low_rank_factors_reproduce_a_planted_rank_r_matrix(rank: int, fit_rank: int) -> None:
    gen = torch.Generator().manual_seed(0)
    theta = 0.1 * torch.randn(12, rank, generator=gen) @ torch.randn(rank, 9, generator=gen)  # (12, 9), rank r
    a, b = low_rank_factors(theta, fit_rank)
    assert a.shape == (12, fit_rank) and b.shape == (fit_rank, 9)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a @ b, theta, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_low_rank_factors_are_the_best_rank_r_approximation(rank: int) -> None:
    rng = np.random.default_rng(rank)
    m = rng.standard_normal((20, 14))
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    want = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young: SVD truncation
    a, b = low_rank_factors(torch.from_numpy(m).float(), rank)
    got = (a @ b).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(m - got), np.sqrt((s[rank:] ** 2).sum()), rtol=1e-5)
    # the split is balanced (theta_a = U S^1/2, theta_b = S^1/2 V^T): equal factor norms
    np.testing.assert_allclose(np.linalg.norm(a.numpy(), axis=0), np.linalg.norm(b.numpy(), axis=1), rtol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> tuple[Path, Path]:
    """A weightlens analysis of the tiny teacher vs a planted student: (analysis folder, student)."""
    from weightlens import CompareOptions, compare
    from weightlens.output import write_analysis
    from weightlens.planted import Plant, plant_student

    root = tmp_path_factory.mktemp("reference")
    teacher = load_file(tiny_teacher)
    assert set(PLANTED) <= set(teacher)
    student = root / "planted.safetensors"
    save_file(plant_student(teacher, Plant(rotate=PLANTED, scale={})), student)
    analysis = compare(tiny_teacher, student, CompareOptions(timestamps=False, workers=1))
    write_analysis(analysis, root / "analysis", report=False, timestamp=False)
    return root / "analysis", student


def _roles(tmp_path: Path, teacher: Path, analysis: Path, **adapter: object):  # type: ignore[no-untyped-def]
    cfg = from_dict(tiny_config(tmp_path, teacher, adapter={"init_from_analysis": str(analysis), **adapter}))
    torch.manual_seed(cfg.train.seed)
    return build_roles(load_teacher(cfg.model), cfg.adapter, cfg.fake)


def test_warm_start_recovers_the_reference_rotation(reference: tuple[Path, Path], tiny_teacher: Path, tmp_path: Path) -> None:
    analysis, planted_path = reference
    roles = _roles(tmp_path, tiny_teacher, analysis)
    provenance = warm_start_from_analysis(roles, analysis)
    assert str(tiny_teacher) in provenance and str(planted_path) in provenance

    planted, teacher = load_file(planted_path), load_file(tiny_teacher)
    layers = dict(lorad_layers(roles.teacher.backbone))
    student_layers = {n for n, layer in layers.items() if "student" in layer.theta_a}
    assert {k.removesuffix(".weight") for k in PLANTED} <= student_layers
    with torch.no_grad():
        for name in sorted(student_layers):
            rotated = layers[name].rotated_weight("student")
            want = planted[f"{name}.weight"]
            torch.testing.assert_close(rotated, want, rtol=0, atol=1e-5, msg=name)
            if f"{name}.weight" not in PLANTED:  # unchanged by the reference: still the identity
                assert torch.equal(want, teacher[f"{name}.weight"])
                assert not layers[name].theta_a["student"].any(), name


def test_warm_start_leaves_every_direction_trainable(reference: tuple[Path, Path], tiny_teacher: Path, tmp_path: Path) -> None:
    """Unused directions (unchanged layers, rank beyond the plant) keep a random theta_b.

    With theta_a's column *and* theta_b's row both zero, neither gets a gradient: that part of
    the student (here 27 of 30 layers) could never train.
    """
    analysis, _ = reference
    roles = _roles(tmp_path, tiny_teacher, analysis)
    warm_start_from_analysis(roles, analysis)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    roles.predict("student", x, torch.tensor([999, 500]), Cond(class_labels=torch.tensor([1, 2]))).square().sum().backward()
    for name, layer in lorad_layers(roles.teacher.backbone):
        if "student" in layer.theta_a:
            grad = layer.theta_a["student"].grad
            assert grad is not None and bool((grad.abs().sum(dim=0) > 0).all()), f"{name}: a direction of theta_a gets no gradient"


def test_warm_start_is_recorded_in_the_run(reference: tuple[Path, Path], tiny_teacher: Path, tmp_path: Path) -> None:
    from wadi_train.checkpoint import latest_checkpoint, load_checkpoint
    from wadi_train.train import train

    analysis, planted_path = reference
    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, adapter={"init_from_analysis": str(analysis)}, train={"steps": 1}))
    res = train(cfg)
    init = load_checkpoint(latest_checkpoint(res.run_dir)).extra["provenance"]["init"]
    assert init.startswith("warm start from") and str(tiny_teacher) in init and str(planted_path) in init


def test_warm_start_needs_lorad(reference: tuple[Path, Path], tiny_teacher: Path, tmp_path: Path) -> None:
    analysis, _ = reference
    roles = _roles(tmp_path, tiny_teacher, analysis, method="lora")
    with pytest.raises(ConfigError, match="lorad"):
        warm_start_from_analysis(roles, analysis)


def test_warm_start_needs_a_weightlens_analysis(tiny_teacher: Path, tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{}")
    roles = _roles(tmp_path, tiny_teacher, tmp_path)
    with pytest.raises(ConfigError, match="not a weightlens analysis"):
        warm_start_from_analysis(roles, tmp_path)
