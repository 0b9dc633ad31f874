"""One contract battery: the same pair in every format and naming gives identical statistics."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from ldm_names import diffusers_to_ldm
from safetensors.torch import save_file

import weightlens

STAT_COLUMNS = ["name", "rows", "norm_rel_mean", "dir_mean", "dir_std", "angle_max_deg", "rel_delta", "rotation_explained", "theta_rank_90", "theta_energy_30", "resid_energy_30", "lorad_rank"]
Writer = Callable[[dict[str, torch.Tensor], Path, torch.nn.Module], Path]


def _safetensors(sd, d, model):  # type: ignore[no-untyped-def]
    save_file(sd, d / "model.safetensors")
    return d / "model.safetensors"


def _sharded(sd, d, model):  # type: ignore[no-untyped-def]
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, d / name)
        weight_map.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d / "model.safetensors.index.json"


def _diffusers_folder(sd, d, model):  # type: ignore[no-untyped-def]
    model = copy.deepcopy(model)
    model.load_state_dict(sd)
    model.save_pretrained(d / "unet")
    return d / "unet"


def _pipeline_folder(sd, d, model):  # type: ignore[no-untyped-def]
    _diffusers_folder(sd, d, model)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (d / "vae").mkdir()
    return d


def _ldm_ckpt(sd, d, model):  # type: ignore[no-untyped-def]
    names = diffusers_to_ldm(list(sd), layers_per_block=1)
    state = {f"model.diffusion_model.{names[k]}": v for k, v in sd.items()}
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)  # other components are ignored
    torch.save({"state_dict": state, "global_step": 10}, d / "sd.ckpt")
    return d / "sd.ckpt"


def _ldm_safetensors(sd, d, model):  # type: ignore[no-untyped-def]
    names = diffusers_to_ldm(list(sd), layers_per_block=1)
    save_file({f"model.diffusion_model.{names[k]}": v for k, v in sd.items()}, d / "sd.safetensors")
    return d / "sd.safetensors"


def _prefixed_pt(sd, d, model):  # type: ignore[no-untyped-def]
    torch.save({f"module.{k}": v for k, v in sd.items()}, d / "model.pt")
    return d / "model.pt"


FORMATS: dict[str, Writer] = {
    "safetensors": _safetensors, "sharded": _sharded, "diffusers-folder": _diffusers_folder,
    "pipeline-folder": _pipeline_folder, "ldm-ckpt": _ldm_ckpt, "ldm-safetensors": _ldm_safetensors,
    "module-prefixed-pt": _prefixed_pt,
}


def _stats(teacher: Path, student: Path) -> pd.DataFrame:
    a = weightlens.compare(teacher, student, weightlens.CompareOptions(timestamps=False, workers=1))
    return a.layers.to_pandas()[STAT_COLUMNS].sort_values("name").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(unet_pair, tmp_path_factory) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    t_dir, s_dir = tmp_path_factory.mktemp("ref_t"), tmp_path_factory.mktemp("ref_s")
    return _stats(_safetensors(unet_pair.teacher, t_dir, None), _safetensors(unet_pair.student, s_dir, None))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_gives_identical_statistics(fmt: str, unet_pair, reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths = []
    for side, sd in (("t", unet_pair.teacher), ("s", unet_pair.student)):
        (tmp_path / side).mkdir()
        paths.append(FORMATS[fmt](sd, tmp_path / side, unet_pair.model))
    pd.testing.assert_frame_equal(_stats(*paths), reference)


def test_mixed_formats_and_naming(unet_pair, reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An LDM-named .ckpt teacher against a diffusers-folder student aligns fully."""
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    t = _ldm_ckpt(unet_pair.teacher, tmp_path / "t", unet_pair.model)
    s = _pipeline_folder(unet_pair.student, tmp_path / "s", unet_pair.model)
    pd.testing.assert_frame_equal(_stats(t, s), reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_read_exactly_in_float32(dtype: torch.dtype, unet_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """fp16/bf16 files give the statistics of their values computed in float32."""
    half_t = {k: v.to(dtype) for k, v in unet_pair.teacher.items()}
    half_s = {k: v.to(dtype) for k, v in unet_pair.student.items()}
    save_file(half_t, tmp_path / "t16.safetensors")
    save_file(half_s, tmp_path / "s16.safetensors")
    save_file({k: v.float() for k, v in half_t.items()}, tmp_path / "t32.safetensors")
    save_file({k: v.float() for k, v in half_s.items()}, tmp_path / "s32.safetensors")
    got = _stats(tmp_path / "t16.safetensors", tmp_path / "s16.safetensors")
    pd.testing.assert_frame_equal(got, _stats(tmp_path / "t32.safetensors", tmp_path / "s32.safetensors"))
    mixed = weightlens.compare(tmp_path / "t32.safetensors", tmp_path / "s16.safetensors")
    assert any(a.code == "dtype_diff" for a in mixed.alerts)


def test_fp8_when_torch_has_it(unet_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in unet_pair.teacher.items()}, tmp_path / "t.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in unet_pair.student.items()}, tmp_path / "s.safetensors")
    a = weightlens.compare(tmp_path / "t.safetensors", tmp_path / "s.safetensors")
    assert len(a.layers) > 0 and all(r.teacher_dtype == "float8_e4m3fn" for r in a.layers)


def test_pipeline_component_option(unet_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for side, sd in (("t", unet_pair.teacher), ("s", unet_pair.student)):
        (tmp_path / side).mkdir()
        _pipeline_folder(sd, tmp_path / side, unet_pair.model)
        shutil.move(tmp_path / side / "unet", tmp_path / side / "transformer")
    a = weightlens.compare(tmp_path / "t", tmp_path / "s", weightlens.CompareOptions(component="transformer"))
    assert len(a.layers) > 0
