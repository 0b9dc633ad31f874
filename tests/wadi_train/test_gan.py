"""The adversarial term: losses against NumPy, the head, the feature tap, real images, and a
run in which it is the student's only signal at the first step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_config

from wadi_train.config import from_dict, validate
from wadi_train.errors import ConfigError
from wadi_train.gan import DiscriminatorHead, FeatureTap, RealImages, discriminator_loss, generator_loss
from wadi_train.train import train


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(x))


def test_losses_match_numpy() -> None:
    real, fake = np.array([2.0, -0.5, 0.1]), np.array([-1.0, 0.3])
    d = discriminator_loss(torch.tensor(real), torch.tensor(fake))
    assert float(d) == pytest.approx(_softplus(-real).mean() + _softplus(fake).mean())
    assert float(generator_loss(torch.tensor(fake))) == pytest.approx(_softplus(-fake).mean())
    # at chance (all logits 0) the discriminator's loss is 2 ln 2
    assert float(discriminator_loss(torch.zeros(4), torch.zeros(4))) == pytest.approx(2 * math.log(2))


def test_head_reads_maps_and_tokens_alike() -> None:
    torch.manual_seed(0)
    head = DiscriminatorHead(6, hidden=5)
    maps = torch.randn(3, 6, 4, 2)
    tokens = maps.flatten(2).transpose(1, 2)  # (3, 8, 6)
    assert head(maps).shape == (3,)
    torch.testing.assert_close(head(maps), head(tokens))
    w1, b1, w2, b2 = (p.detach().numpy() for p in head.parameters())
    t = tokens.numpy()
    h = t @ w1.T + b1
    want = ((h / (1 + np.exp(-h))) @ w2.T + b2).mean(axis=1)[:, 0]
    np.testing.assert_allclose(head(maps).detach().numpy(), want, rtol=1e-5, atol=1e-6)


def test_tap_keeps_the_named_output_once_and_only_when_capturing() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    tap = FeatureTap(model, "1")
    x = torch.randn(5, 3)
    model(x)  # not capturing: a teacher or student forward through the same backbone
    assert tap.features is None
    with tap.capture(stop=False):
        out = model(x)
    assert out.shape == (5, 2)
    torch.testing.assert_close(tap.take(), torch.relu(model[0](x)))
    with pytest.raises(RuntimeError, match="no features captured"):
        tap.take()
    tap.remove()
    with tap.capture():
        model(x)
    assert tap.features is None
    with pytest.raises(ConfigError, match="'mid_block' .*not a module"):
        FeatureTap(model, "mid_block")


def test_tap_ends_the_forward_at_the_tapped_module() -> None:
    ran: list[str] = []
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model[2].register_forward_hook(lambda *a: ran.append("after"))
    tap = FeatureTap(model, "1")
    x = torch.randn(5, 3, requires_grad=True)
    with tap.capture():
        model(x)
        ran.append("unreachable")  # the forward raised inside the block, which ends it
    assert ran == []
    features = tap.take()
    torch.testing.assert_close(features, torch.relu(model[0](x)))
    features.sum().backward()  # the graph up to the tap is intact
    assert x.grad is not None and x.grad.abs().sum() > 0
    with tap.capture():  # a later capture works again
        model(x)
    assert tap.take().shape == (5, 4)


def test_real_images_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "real.safetensors"
    save_file({"images": torch.zeros(6, 1, 8, 8), "class_labels": torch.arange(6)}, good)
    real = RealImages(good, (1, 8, 8), "class")
    x, y = real.sample(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 8, 8) and y is not None and y.dtype == torch.long
    with pytest.raises(ConfigError, match="no such file"):
        RealImages(tmp_path / "none.safetensors", (1, 8, 8), "class")
    with pytest.raises(ConfigError, match=r"\(1, 8, 8\) per sample but the denoiser works in \(4, 8, 8\)"):
        RealImages(good, (4, 8, 8), "class")
    unlabelled = tmp_path / "unlabelled.safetensors"
    save_file({"images": torch.zeros(6, 1, 8, 8)}, unlabelled)
    with pytest.raises(ConfigError, match="needs 'class_labels'"):
        RealImages(unlabelled, (1, 8, 8), "class")
    assert RealImages(unlabelled, (1, 8, 8), "text").sample(2, torch.Generator())[1] is None


def _gan_config(tmp_path: Path, teacher: Path, **vsd: object) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    real = tmp_path / "real.safetensors"
    torch.manual_seed(1)
    save_file({"images": torch.rand(20, 1, 8, 8) * 2 - 1, "class_labels": torch.arange(20) % 10}, real)
    cfg = tiny_config(tmp_path, teacher, vsd={"gan_feature_module": "down_blocks.1", **vsd}, data={"real_images": str(real)})
    cfg["train"]["ema_decay"] = None
    return cfg


def test_the_adversarial_term_moves_the_student_at_the_first_step(tmp_path: Path, tiny_teacher: Path) -> None:
    """At init the fake score equals the teacher, so VSD's first gradient is exactly zero
    (test_train); with the adversarial term the student moves at once."""
    res = train(from_dict(_gan_config(tmp_path, tiny_teacher, gan_weight=0.5)))
    m = pd.read_csv(res.run_dir / "metrics.csv")
    assert m["theta_abs_mean"].iloc[0] > 0
    assert m[["loss_gan_generator", "loss_gan_discriminator"]].map(math.isfinite).all().all()
    from wadi_train.checkpoint import latest_checkpoint, load_checkpoint

    head = load_checkpoint(latest_checkpoint(res.run_dir)).tensors["discriminator"]
    assert {"net.0.weight", "net.2.bias"} <= set(head)


def test_resume_with_the_adversarial_term_is_bit_exact(tmp_path: Path, tiny_teacher: Path) -> None:
    full = train(from_dict(_gan_config(tmp_path / "a", tiny_teacher, gan_weight=0.5)))
    cfg_b = from_dict(_gan_config(tmp_path / "b", tiny_teacher, gan_weight=0.5))
    train(cfg_b, stop_after=2)
    resumed = train(cfg_b, resume=True)
    from wadi_train.checkpoint import latest_checkpoint, load_checkpoint

    a, b = (load_checkpoint(latest_checkpoint(r.run_dir)).tensors for r in (full, resumed))
    for group in ("student", "fake", "discriminator"):
        assert a[group].keys() == b[group].keys()
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group


def test_validate_asks_for_real_images(tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_teacher, vsd={"gan_weight": 0.1})
    assert any("needs data.real_images" in p for p in validate(from_dict(cfg)))
    cfg["data"] = {"real_images": str(tmp_path / "none.safetensors")}
    assert any("no such file" in p for p in validate(from_dict(cfg)))
    assert not any("real_images" in p for p in validate(from_dict(cfg), check_files=False))  # files are not looked at
    cfg = _gan_config(tmp_path, tiny_teacher, gan_weight=0.1)
    assert validate(from_dict(cfg)) == []
    cfg["train"]["gradient_checkpointing"] = True
    assert any("not supported" in p for p in validate(from_dict(cfg)))
