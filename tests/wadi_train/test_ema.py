"""EMA of named adapter parameters: maths against hand-computed sequences, warm-up, float32
shadows, exact restore after swap_into, state round-trip and loud mismatches."""

from __future__ import annotations

import pytest
import torch

from wadi_train.ema import EMA, EMAStateError
from wadi_train.errors import WadiError


def _params(*values: list[float], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {f"p{i}": torch.tensor(v, dtype=dtype, requires_grad=True) for i, v in enumerate(values)}


def _set(params: dict[str, torch.Tensor], *values: list[float]) -> None:
    with torch.no_grad():
        for p, v in zip(params.values(), values):
            p.copy_(torch.tensor(v))


def test_update_matches_hand_computed_sequence() -> None:
    # decay 0.5 keeps every value exact in binary: s <- (s + p) / 2
    params = _params([1.0, -2.0])
    ema = EMA(params, decay=0.5, warmup=False)
    expected = [[2.0, 0.0], [1.0, 2.0], [1.0, 0.0]]
    for new, want in zip([[3.0, 2.0], [0.0, 4.0], [1.0, -2.0]], expected):
        _set(params, new)
        ema.update(params)
        assert torch.equal(ema.shadow["p0"], torch.tensor(want))
    assert ema.num_updates == 3


def test_warmup_decay_schedule_and_values() -> None:
    # d_n = min(decay, (1 + n) / (10 + n)) for the (n+1)-th update: 0.1, 2/11, 3/12, ... capped
    ema = EMA(_params([0.0]), decay=0.5, warmup=True)
    params = _params([0.0])
    ref = 0.0
    for n in range(12):
        want_d = min(0.5, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(want_d, abs=0)
        value = float(n + 1) ** 1.5
        _set(params, [value])
        ema.update(params)
        ref = want_d * ref + (1 - want_d) * value  # float64 reference
        assert ema.shadow["p0"].item() == pytest.approx(ref, rel=1e-6)
    assert ema.current_decay() == 0.5
    assert EMA(_params([0.0]), decay=0.999, warmup=False).current_decay() == 0.999


def test_first_warmup_update_weights_the_new_value_by_0_9() -> None:
    params = _params([10.0])
    ema = EMA(params, decay=0.999)
    _set(params, [20.0])
    ema.update(params)
    assert ema.shadow["p0"].item() == pytest.approx(0.1 * 10 + 0.9 * 20, rel=1e-7)


@pytest.mark.parametrize(("decay", "want"), [(1.0, 1.0), (0.0, 5.0)])
def test_decay_extremes(decay: float, want: float) -> None:
    params = _params([1.0])
    ema = EMA(params, decay=decay, warmup=False)
    _set(params, [5.0])
    ema.update(params)
    assert ema.shadow["p0"].item() == want


def test_shadows_are_float32_detached_copies_of_low_precision_params() -> None:
    g = torch.Generator().manual_seed(0)
    params = {
        "a": torch.randn(4, 3, generator=g).to(torch.bfloat16).requires_grad_(),
        "b": torch.randn(5, generator=g).half().requires_grad_(),
    }
    ema = EMA(params)
    for k, p in params.items():
        assert ema.shadow[k].dtype == torch.float32
        assert not ema.shadow[k].requires_grad
        assert ema.shadow[k].data_ptr() != p.data_ptr()
        assert torch.equal(ema.shadow[k], p.detach().float())
    ema.update(params)
    assert all(s.grad_fn is None and not s.requires_grad for s in ema.shadow.values())


def test_swap_into_uses_ema_weights_then_restores_bit_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    params = {
        "w": torch.randn(8, 4, generator=g).requires_grad_(),
        "h": torch.randn(6, generator=g).to(torch.bfloat16).requires_grad_(),
    }
    ema = EMA(params, decay=0.9)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
    ema.update(params)
    params["w"].grad = torch.ones(8, 4)
    before = {k: p.detach().clone() for k, p in params.items()}
    ptrs = {k: p.data_ptr() for k, p in params.items()}
    with ema.swap_into(params):
        for k, p in params.items():
            assert torch.equal(p.detach(), ema.shadow[k].to(p.dtype))
            assert not torch.equal(p.detach(), before[k])
    for k, p in params.items():
        assert torch.equal(p.detach(), before[k]) and p.dtype == before[k].dtype
        assert p.data_ptr() == ptrs[k] and p.requires_grad
    assert torch.equal(params["w"].grad, torch.ones(8, 4))


def test_swap_into_restores_when_the_body_raises() -> None:
    params = _params([1.0, 2.0])
    ema = EMA(params, decay=0.0, warmup=False)
    _set(params, [7.0, 8.0])
    with pytest.raises(RuntimeError, match="boom"), ema.swap_into(params):
        assert params["p0"].tolist() == [1.0, 2.0]
        raise RuntimeError("boom")
    assert params["p0"].tolist() == [7.0, 8.0]


def test_copy_to_casts_into_the_live_dtype() -> None:
    params = _params([1.0, 3.0], dtype=torch.bfloat16)
    ema = EMA(params, decay=0.5, warmup=False)
    _set(params, [3.0, 5.0])
    ema.update(params)
    ema.copy_to(params)
    assert params["p0"].dtype == torch.bfloat16 and params["p0"].tolist() == [2.0, 4.0]


def test_state_dict_round_trip_continues_identically() -> None:
    g = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(3, 3, generator=g, requires_grad=True)}
    a = EMA(params, decay=0.99)
    for _ in range(3):
        _set(params, torch.randn(3, 3, generator=g).tolist())
        a.update(params)
    state = a.state_dict()
    assert set(state) == {"shadow", "num_updates"} and state["num_updates"] == 3
    b = EMA({"w": torch.zeros(3, 3)}, decay=0.99)
    b.load_state_dict(
        {"shadow": {k: v.clone() for k, v in state["shadow"].items()}, "num_updates": 3}
    )
    for _ in range(2):
        _set(params, torch.randn(3, 3, generator=g).tolist())
        a.update(params)
        b.update(params)
    assert torch.equal(a.shadow["w"], b.shadow["w"]) and b.num_updates == 5


def test_mismatches_fail_loudly() -> None:
    ema = EMA({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(EMAStateError, match=r"missing \['b'\], unexpected \['c'\]") as info:
        ema.update({"a": torch.zeros(2), "c": torch.zeros(3)})
    assert isinstance(info.value, WadiError)
    with pytest.raises(EMAStateError, match="shapes differ"):
        ema.load_state_dict(
            {"shadow": {"a": torch.zeros(2), "b": torch.zeros(4)}, "num_updates": 1}
        )
    with pytest.raises(EMAStateError, match="floating-point"):
        EMA({"i": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        EMA({"a": torch.zeros(2)}, decay=1.5)
