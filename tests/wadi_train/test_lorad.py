"""LoRaD adapter: maths against references, identity at init, merge/unmerge, adapters, files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

from wadi_train.lorad import (
    SD_UNET_BLOCKS,
    LoRaDConfig,
    LoRaDLayer,
    count_lorad_params,
    disable_adapters,
    inject_lorad,
    load_adapter,
    load_lorad_state_dict,
    lorad_layers,
    lorad_state_dict,
    merge_adapters,
    merge_and_unload,
    rotate_weight,
    save_adapter,
    set_active_adapter,
    unmerge_adapters,
)
from weightlens.rotation import rotate_pairs

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
STUDENT = LoRaDConfig(r=4, target_modules=SD_UNET_BLOCKS)
ATTN = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).eval()


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 5, 32, generator=g),
    )


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(*unet_inputs()).sample


def randomize(model: nn.Module, adapter: str = "default", seed: int = 2) -> None:
    """Give an adapter non-trivial angles (theta_a is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorad_layers(model):
            if adapter in layer.theta_a:
                layer.theta_a[adapter].normal_(0.0, 0.3, generator=g)


def rotate_reference(weight: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Independent float64 loop: rotate column pair (2j, 2j+1) of row i by theta[i, j]."""
    out = weight.astype(np.float64).copy()
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1] // 2):
            c, s = np.cos(theta[i, j]), np.sin(theta[i, j])
            a, b = weight[i, 2 * j], weight[i, 2 * j + 1]
            out[i, 2 * j], out[i, 2 * j + 1] = a * c - b * s, a * s + b * c
    return out


# -- the pure maths ------------------------------------------------------------------------------


def test_rotate_weight_is_weightlens_function() -> None:
    assert rotate_weight is rotate_pairs


def test_rotate_weight_preserves_row_norms() -> None:
    g = torch.Generator().manual_seed(0)
    weight, theta = torch.randn(16, 24, generator=g), 3 * torch.randn(16, 12, generator=g)
    rotated = rotate_weight(weight, theta)
    torch.testing.assert_close(rotated.norm(dim=1), weight.norm(dim=1), rtol=1e-6, atol=0)


def test_rotate_weight_matches_numpy_reference() -> None:
    g = torch.Generator().manual_seed(0)
    weight, theta = torch.randn(6, 10, generator=g), torch.randn(6, 5, generator=g)
    expected = rotate_reference(weight.numpy(), theta.numpy())
    np.testing.assert_allclose(rotate_weight(weight, theta).numpy(), expected, rtol=1e-5, atol=1e-6)


# -- the adapter on a tiny U-Net -----------------------------------------------------------------


def test_identity_at_init() -> None:
    unet = make_unet()
    base = run(unet)
    inject_lorad(unet, STUDENT)
    assert len(list(lorad_layers(unet))) > 0
    torch.testing.assert_close(run(unet), base, rtol=0, atol=1e-6)


def test_merged_equals_hooked_and_unmerge_is_exact() -> None:
    unet = inject_lorad(make_unet(), STUDENT)
    randomize(unet)
    originals = {n: layer.weight.clone() for n, layer in lorad_layers(unet)}
    hooked = run(unet)
    assert not torch.allclose(hooked, run_base(unet), atol=1e-4)
    merge_adapters(unet)
    merged_weights = {n: layer.weight.clone() for n, layer in lorad_layers(unet)}
    torch.testing.assert_close(run(unet), hooked, rtol=1e-5, atol=1e-6)
    merge_adapters(unet)  # second merge: no-op
    for name, layer in lorad_layers(unet):
        assert torch.equal(layer.weight, merged_weights[name])
        torch.testing.assert_close(layer.get_delta_weight(), merged_weights[name] - originals[name])
    unmerge_adapters(unet)
    for name, layer in lorad_layers(unet):
        assert torch.equal(layer.weight, originals[name]) and not layer.merged
    torch.testing.assert_close(run(unet), hooked, rtol=0, atol=0)


def run_base(model: nn.Module) -> torch.Tensor:
    with disable_adapters(model):
        return run(model)


def test_merge_and_unload_leaves_plain_modules() -> None:
    unet = inject_lorad(make_unet(), STUDENT)
    randomize(unet)
    hooked = run(unet)
    merge_and_unload(unet)
    assert not list(lorad_layers(unet))
    assert set(unet.state_dict()) == set(make_unet().state_dict())
    torch.testing.assert_close(run(unet), hooked, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_adapters() -> None:
    unet = inject_lorad(make_unet(), STUDENT)
    randomize(unet)
    unet(*unet_inputs()).sample.square().mean().backward()
    for name, param in unet.named_parameters():
        if ".theta_a." in name or ".theta_b." in name:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if ".theta_b." in n)


def test_parameter_count() -> None:
    unet = make_unet()
    config = LoRaDConfig(r=4, target_modules=SD_UNET_BLOCKS, rank_pattern={"to_k": 2})
    expected = sum(
        config.rank_for(n) * (m.out_features + m.in_features // 2)
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[0] in ("down_blocks", "up_blocks", "mid_block")
    )
    assert count_lorad_params(unet, config) == expected
    inject_lorad(unet, config)
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == expected
    layer = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")
    assert layer.theta_a["default"].shape == (32, 2)
    assert count_lorad_params({"a": (8, 6), "b": (4, 2, 3, 3)}, {"a": 2, "b": 3}) == 2 * 11 + 3 * 13


def test_sd15_student_parameter_count_on_meta() -> None:
    """The paper's 83.80M: rank 256 on every Linear in down/up/mid blocks of the SD1.5 U-Net.

    35 of those Linears are 320 wide (in/2 = 160 < 256), so the paper's count needs
    allow_excess_rank; capping ranks at min(out, in/2) would give 81.11M instead.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET)
    config = LoRaDConfig(r=256, target_modules=SD_UNET_BLOCKS, allow_excess_rank=True)
    assert round(count_lorad_params(unet, config) / 1e6, 2) == 83.80
    with pytest.raises(ValueError, match="allow_excess_rank"):
        count_lorad_params(unet, LoRaDConfig(r=256, target_modules=SD_UNET_BLOCKS))


def test_save_load_roundtrip(tmp_path) -> None:
    unet = inject_lorad(make_unet(), STUDENT)
    randomize(unet)
    expected = run(unet)
    path = save_adapter(unet, tmp_path / "student.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.endswith((".theta_a", ".theta_b")) for k in keys)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.theta_a" in keys
    raw = load_adapter(make_unet(), path)  # a raw model: the adapter is injected from the file
    torch.testing.assert_close(run(raw), expected, rtol=0, atol=0)
    injected = load_adapter(inject_lorad(make_unet(), STUDENT), path)
    torch.testing.assert_close(run(injected), expected, rtol=0, atol=0)
    assert raw.lorad_configs["default"] == STUDENT
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter(
            inject_lorad(make_unet(), LoRaDConfig(r=2, target_modules=SD_UNET_BLOCKS)), path
        )


def test_two_adapters_share_one_backbone() -> None:
    unet = inject_lorad(make_unet(), STUDENT, "student")
    inject_lorad(unet, LoRaDConfig(r=2, target_modules=ATTN), "fake")
    randomize(unet, "student", seed=3)
    randomize(unet, "fake", seed=4)
    weight = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight
    pointer = weight.data_ptr()
    outputs = {}
    for name in ("student", "fake"):
        set_active_adapter(unet, name)
        outputs[name] = run(unet)
        alone = load_lorad_state_dict(make_unet(), lorad_state_dict(unet, name), "x")
        torch.testing.assert_close(outputs[name], run(alone), rtol=0, atol=0)
    assert not torch.allclose(outputs["student"], outputs["fake"], atol=1e-4)
    torch.testing.assert_close(run_base(unet), run(make_unet()), rtol=0, atol=0)
    assert weight.data_ptr() == pointer
    merge_adapters(unet)
    with pytest.raises(ValueError, match="unmerge"):
        set_active_adapter(unet, "student")


class _RecordCalls(TorchFunctionMode):
    """Records (function, whether the input x is among its tensor arguments)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x, self.calls = x, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "__get__":  # attribute reads such as x.dtype
            self.calls.append((func, any(a is self.x for a in args)))
        return func(*args, **(kwargs or {}))


def test_forward_is_one_pass_over_the_input() -> None:
    """W' is built first and x meets it in exactly one F.linear (never base output + delta)."""
    model = inject_lorad(nn.Sequential(nn.Linear(16, 8)), LoRaDConfig(r=2))
    randomize(model)
    x = torch.randn(3, 16)
    with _RecordCalls(x) as mode:
        model[0](x)
    assert [func for func, uses_x in mode.calls if uses_x] == [nn.functional.linear]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base_rotates_in_fp32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(dtype)
    model = inject_lorad(nn.Sequential(base), LoRaDConfig(r=8))
    randomize(model)
    layer = model[0]
    theta = layer.theta_a["default"] @ layer.theta_b["default"]
    reference = rotate_reference(base.weight.float().numpy(), theta.detach().numpy())
    rotated = layer.rotated_weight()
    assert rotated.dtype == torch.float32
    np.testing.assert_allclose(rotated.detach().numpy(), reference, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer.rotated_weight(), rotated)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = model(x.to(dtype))
        y_ref = nn.functional.linear(x, torch.from_numpy(reference).float(), base.bias.float())
    assert y.dtype == dtype
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "kwargs", [{"padding": 1}, {"stride": 2, "padding": 1, "groups": 2, "bias": False}]
)
def test_conv2d(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, **kwargs), nn.SiLU(), nn.Conv2d(8, 6, 1))
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        base = model(x)
    inject_lorad(model, LoRaDConfig(r=2, include_conv=True))
    assert isinstance(model[0], LoRaDLayer) and isinstance(model[2], LoRaDLayer)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)
        randomize(model)
        hooked = model(x)
        assert not torch.allclose(hooked, base, atol=1e-4)
        merge_adapters(model)
        torch.testing.assert_close(model(x), hooked, rtol=1e-5, atol=1e-6)
    flat = model[0].weight.reshape(8, -1)
    original = model[0]._original_weight.reshape(8, -1)
    torch.testing.assert_close(flat.norm(dim=1), original.norm(dim=1))


def test_conv2d_needs_include_conv() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    inject_lorad(model, LoRaDConfig(r=2))
    assert not isinstance(model[0], LoRaDLayer) and isinstance(model[2], LoRaDLayer)


def test_bad_shapes_raise_with_name_and_fix() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 6))
    with pytest.raises(ValueError, match=r"'0'.*odd.*target_modules"):
        inject_lorad(model, LoRaDConfig(r=1))
    with pytest.raises(ValueError, match=r"rank 3 for '1'.*rank_pattern"):
        inject_lorad(model, LoRaDConfig(r=3, target_modules=["1"]))
    assert not list(lorad_layers(model))
    inject_lorad(model, LoRaDConfig(r=3, target_modules=["1"], allow_excess_rank=True))
    with pytest.raises(ValueError, match="matched no"):
        inject_lorad(copy.deepcopy(model), LoRaDConfig(target_modules=["nothing"]), "other")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="r must be.*init must be"):
        LoRaDConfig(r=0, init="gaussian")
    with pytest.raises(ValueError, match="unknown LoRaDConfig keys"):
        LoRaDConfig.from_dict({"r": 4, "lora_alpha": 8})
    assert LoRaDConfig.from_dict(STUDENT.to_dict()) == STUDENT


def test_rotation_cache_rotates_once_per_set_of_angles_and_keeps_gradients_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from wadi_train.lorad import LoRaDLayer, rotation_cache

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 4))
    model = inject_lorad(copy.deepcopy(base), LoRaDConfig(r=2, target_modules=["0", "2"]), "fake")
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.5)
    theta = [p for n, p in model.named_parameters() if "theta" in n]
    calls = {"n": 0}
    real = LoRaDLayer.rotated_weight

    def counting(self, adapter_name=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(self, adapter_name)

    monkeypatch.setattr(LoRaDLayer, "rotated_weight", counting)
    x1, x2 = torch.randn(5, 6), torch.randn(3, 6)

    def loss() -> torch.Tensor:
        return model(x1).square().sum() + model(x2).sin().sum()

    want = torch.autograd.grad(loss(), theta)  # no cache: 2 layers x 2 forwards
    assert calls["n"] == 4
    calls["n"] = 0
    with rotation_cache(model):
        got_loss = loss()
        assert calls["n"] == 2  # each layer rotated once for both forwards
        with torch.no_grad():
            model(x1)  # the grad mode is part of the key: a no-grad rotation is its own
        assert calls["n"] == 4
        got = torch.autograd.grad(got_loss, theta)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        with torch.no_grad():
            theta[0].add_(0.1)  # new angles (an optimizer step): rotated again
        model(x1)
        assert calls["n"] == 5  # only the layer whose angles changed
    calls["n"] = 0
    model(x1)
    model(x1)
    assert calls["n"] == 4  # outside the block nothing is kept
    assert all(layer._rotations is None for _, layer in lorad_layers(model))
