"""weightlens on every model family, through the real loading code.

Each family (SD1.5, SD2.1, SDXL U-Nets; PixArt-alpha, SD3, Flux transformers) is built by
diffusers from a scaled-down published config (family_configs.py), with seeded random
weights. The teacher is written as a diffusers pipeline folder; the student, an exact rank-3
LoRaD rotation of a few Linear layers with every other tensor copied, is written in each
format users have: a diffusers pipeline folder, and for the U-Nets an original whole-pipeline
single file (`.ckpt` with an EMA copy, `.safetensors`) whose VAE and text-encoder keys must be
skipped. weightlens must align every tensor (unplanted layers then read back *exactly*
unchanged, which proves each LDM name was mapped to the right diffusers tensor), read the
plant back, and group layers into the blocks users think in, in forward order.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from family_configs import FAMILIES, RANK, Family, FamilyPair, planted_pair
from ldm_names import diffusers_to_ldm
from safetensors.torch import save_file
from typer.testing import CliRunner

import weightlens
from weightlens.align import Alignment, AlignOptions, align_keys
from weightlens.blocks import block_of, depth_key
from weightlens.cli import app
from weightlens.errors import AlignmentError, OptionError
from weightlens.io import open_checkpoint
from weightlens.verdict import block_table

State = dict[str, torch.Tensor]
OPTIONS = weightlens.CompareOptions(timestamps=False, workers=1)


# ---------------------------------------------------------------------------- writers


def _other_components(family: Family) -> State:
    """Stand-ins for what a whole-pipeline single file holds besides the U-Net."""
    parts: State = {
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
        "first_stage_model.decoder.mid.attn_1.q.weight": torch.randn(8, 8, 1, 1),
        "first_stage_model.quant_conv.weight": torch.randn(8, 8, 1, 1),
        "betas": torch.linspace(1e-4, 2e-2, 1000),
        "alphas_cumprod": torch.linspace(1.0, 0.0, 1000),
    }
    if family.name == "sdxl":  # sgm's GeneralConditioner: CLIP-L and OpenCLIP bigG
        parts["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(64, 12)
        parts["conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.randn(12, 12)
        parts["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(36, 12)
        parts["conditioner.embedders.1.model.text_projection"] = torch.randn(12, 12)
    else:  # LDM: CLIP (SD1.x) or OpenCLIP (SD2.x) as cond_stage_model
        parts["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.randn(12, 12)
        parts["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(36, 12)
    return parts


def _ldm_state(sd: State, family: Family, ema: State | None = None) -> State:
    assert family.layers_per_block is not None
    names = diffusers_to_ldm(list(sd), layers_per_block=family.layers_per_block)
    state = {f"model.diffusion_model.{names[k]}": v for k, v in sd.items()}
    state.update(_other_components(family))
    if ema is not None:  # LDM's LitEma: model_ema.<path after "model." without dots>
        state.update({"model_ema." + "".join(f"diffusion_model.{names[k]}".split(".")): v for k, v in ema.items()})
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return state


def write_pipeline(sd: State, d: Path, pair: FamilyPair) -> Path:
    model = copy.deepcopy(pair.model)
    model.load_state_dict(sd)
    model.save_pretrained(d / pair.family.component)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "Pipeline", pair.family.component: ["diffusers", pair.family.model_class], "vae": ["diffusers", "AutoencoderKL"]}))
    (d / "vae").mkdir()
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, d / "vae" / "diffusion_pytorch_model.safetensors")
    return d


def write_ldm_ckpt(sd: State, d: Path, pair: FamilyPair, ema: State | None = None) -> Path:
    torch.save({"state_dict": _ldm_state(sd, pair.family, ema if ema is not None else sd), "global_step": 1000}, d / "model.ckpt")
    return d / "model.ckpt"


def write_ldm_safetensors(sd: State, d: Path, pair: FamilyPair) -> Path:
    save_file(_ldm_state(sd, pair.family), d / "model.safetensors")
    return d / "model.safetensors"


WRITERS: dict[str, Callable[[State, Path, FamilyPair], Path]] = {
    "pipeline": write_pipeline, "ldm-ckpt": write_ldm_ckpt, "ldm-safetensors": write_ldm_safetensors,
}
CASES = [
    ("sd15", "pipeline"), ("sd15", "ldm-ckpt"), ("sd15", "ldm-safetensors"),
    ("sd21", "pipeline"), ("sd21", "ldm-ckpt"), ("sd21", "ldm-safetensors"),
    ("sdxl", "pipeline"), ("sdxl", "ldm-safetensors"),
    ("pixart_alpha", "pipeline"), ("sd3", "pipeline"), ("flux", "pipeline"),
]
LDM_CASES = [c for c in CASES if c[1] != "pipeline"]


# ---------------------------------------------------------------------------- fixtures


class Workspace:
    """Per family: the pair, the teacher folder and student files, built once and cached."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pairs: dict[str, FamilyPair] = {}
        self.paths: dict[tuple[str, str, str], Path] = {}
        self.analyses: dict[tuple[str, str], weightlens.Analysis] = {}

    def pair(self, family: str) -> FamilyPair:
        if family not in self.pairs:
            self.pairs[family] = planted_pair(FAMILIES[family])
        return self.pairs[family]

    def path(self, family: str, side: str, fmt: str) -> Path:
        key = (family, side, fmt)
        if key not in self.paths:
            pair = self.pair(family)
            d = self.root / family / side / fmt
            d.mkdir(parents=True)
            self.paths[key] = WRITERS[fmt](pair.teacher if side == "teacher" else pair.student, d, pair)
        return self.paths[key]

    def analysis(self, family: str, fmt: str) -> weightlens.Analysis:
        """Teacher pipeline folder vs planted student in `fmt`."""
        if (family, fmt) not in self.analyses:
            self.analyses[family, fmt] = weightlens.compare(self.path(family, "teacher", "pipeline"), self.path(family, "student", fmt), OPTIONS)
        return self.analyses[family, fmt]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("families"))


def _align(teacher: Path, student: Path, options: AlignOptions | None = None) -> Alignment:
    t, s = open_checkpoint(teacher), open_checkpoint(student)
    try:
        return align_keys(t.infos, s.infos, options or AlignOptions())
    finally:
        t.close()
        s.close()


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("family,fmt", CASES)
def test_every_tensor_aligns(ws: Workspace, family: str, fmt: str) -> None:
    a = ws.analysis(family, fmt)
    teacher = ws.pair(family).teacher
    assert (a.only_in_teacher, a.only_in_student, a.shape_mismatch) == ((), (), ())
    assert sorted(r.name for r in a.layers) == sorted(k for k, v in teacher.items() if v.ndim >= 2)
    assert sorted(v.name for v in a.vectors) == sorted(k for k, v in teacher.items() if v.ndim < 2)
    assert a.backbone_params == sum(v.numel() for v in teacher.values())


@pytest.mark.parametrize("family,fmt", LDM_CASES)
def test_ldm_self_pair_aligns_under_diffusers_names(ws: Workspace, family: str, fmt: str) -> None:
    """Both sides original single files: every U-Net tensor pairs under its diffusers name."""
    al = _align(ws.path(family, "teacher", fmt), ws.path(family, "student", fmt))
    assert (al.only_in_teacher, al.only_in_student, al.shape_mismatch) == ((), (), ())
    assert sorted(p.name for p in al.pairs) == sorted(ws.pair(family).teacher)


@pytest.mark.parametrize("family,fmt", LDM_CASES)
def test_pipeline_file_reports_the_rest_as_skipped(ws: Workspace, family: str, fmt: str) -> None:
    """VAE, text encoders, EMA copy and schedule buffers are skipped and said so, not unaligned."""
    al = _align(ws.path(family, "teacher", "pipeline"), ws.path(family, "student", fmt))
    stored = open_checkpoint(ws.path(family, "student", fmt)).infos
    expected = {k for k in stored if not k.startswith("model.diffusion_model.")}
    assert set(al.skipped_student) == expected and al.skipped_teacher == ()
    note = next(n for n in al.notes if n.startswith("student: kept"))
    assert f"skipped {len(expected)} other keys" in note
    assert "first_stage_model.* (VAE)" in note and "top-level buffers" in note
    assert ("conditioner.embedders.* (text encoders)" if family == "sdxl" else "cond_stage_model.* (text encoder)") in note
    assert ("model_ema.* (EMA copy)" in note) == (fmt == "ldm-ckpt")


# ---------------------------------------------------------------------------- planted read-back


@pytest.mark.parametrize("family,fmt", CASES)
def test_planted_rotation_is_read_back(ws: Workspace, family: str, fmt: str) -> None:
    a = ws.analysis(family, fmt)
    fam = FAMILIES[family]
    for name in fam.rotate:
        row = a.layers.by_name(name)
        assert row.norm_rel_mean < 1e-6, name
        assert row.rotation_explained == pytest.approx(1.0, abs=1e-5), name
        assert row.theta_rank_90 == RANK and row.lorad_rank == RANK, name
        e = a.theta_spectra[name]
        assert e[RANK:].sum() / e.sum() < 1e-6, name
    for name, factor in fam.scale.items():
        row = a.layers.by_name(name)
        assert row.dir_mean < 1e-6 and row.norm_rel_mean == pytest.approx(abs(factor - 1), rel=1e-5)
    # Everything else is bit-identical: a name mapped to the wrong tensor would differ.
    untouched = [r for r in a.layers if r.name not in fam.rotate and r.name not in fam.scale]
    assert untouched and all(r.rel_delta == 0 for r in untouched)
    assert all(v.rel_delta == 0 or v.max_abs_diff == 0 for v in a.vectors)


# ---------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blocks_in_forward_order(ws: Workspace, family: str) -> None:
    fmt = "ldm-safetensors" if family == "sdxl" else "pipeline"  # SDXL: input_blocks -> down_blocks
    a = ws.analysis(family, fmt)
    assert tuple(b.block for b in block_table(a)) == FAMILIES[family].blocks
    depths = [r.depth for r in a.layers]
    assert depths == sorted(depths)  # layers.csv rows follow the forward order too


def test_block_names_and_order_for_original_and_deep_layouts() -> None:
    assert block_of("single_transformer_blocks.12.attn.to_q.weight") == "single_transformer_blocks.12"
    assert block_of("transformer_blocks.3.attn.to_q.weight") == "transformer_blocks.3"
    assert block_of("double_blocks.0.img_attn.qkv.weight") == "double_blocks.0"
    assert block_of("joint_blocks.7.x_block.attn.qkv.weight") == "joint_blocks.7"
    assert block_of("middle_block.1.proj_in.weight") == "middle_block"
    order = [
        ["transformer_blocks.10", "proj_out", "single_transformer_blocks.0", "transformer_blocks.2", "x_embedder", "time_text_embed"],
        ["final_layer", "single_blocks.1", "double_blocks.18", "img_in", "single_blocks.0", "txt_in"],
        ["final_layer", "joint_blocks.11", "joint_blocks.9", "context_embedder", "x_embedder"],
        ["final_layer", "blocks.27", "blocks.3", "t_block", "x_embedder", "y_embedder"],
        ["out", "output_blocks.11", "output_blocks.2", "middle_block", "input_blocks.10", "input_blocks.2", "label_emb", "time_embed", "conv_in"],
    ]
    expected = [
        ["x_embedder", "time_text_embed", "transformer_blocks.2", "transformer_blocks.10", "single_transformer_blocks.0", "proj_out"],
        ["img_in", "txt_in", "double_blocks.18", "single_blocks.0", "single_blocks.1", "final_layer"],
        ["x_embedder", "context_embedder", "joint_blocks.9", "joint_blocks.11", "final_layer"],
        ["x_embedder", "t_block", "y_embedder", "blocks.3", "blocks.27", "final_layer"],
        ["conv_in", "label_emb", "time_embed", "input_blocks.2", "input_blocks.10", "middle_block", "output_blocks.2", "output_blocks.11", "out"],
    ]
    assert [sorted(blocks, key=depth_key) for blocks in order] == expected


# ---------------------------------------------------------------------------- EMA


def test_ema_copy_is_skipped_by_default_and_selectable(ws: Workspace, tmp_path: Path) -> None:
    """An SD .ckpt holding training weights (the plant) and an EMA copy (norms scaled 1.1)."""
    pair = ws.pair("sd15")
    ema = {k: v * 1.1 if v.ndim >= 2 else v for k, v in pair.teacher.items()}
    student = write_ldm_ckpt(pair.student, tmp_path, pair, ema=ema)
    teacher = ws.path("sd15", "teacher", "pipeline")
    plain = weightlens.compare(teacher, student, OPTIONS)
    assert plain.layers.by_name(FAMILIES["sd15"].rotate[0]).rotation_explained == pytest.approx(1.0, abs=1e-5)
    assert any("pass --ema" in al.message for al in plain.alerts)
    ema_opts = weightlens.CompareOptions(align=AlignOptions(ema=True), timestamps=False, workers=1)
    used = weightlens.compare(teacher, student, ema_opts)
    assert (used.only_in_teacher, used.only_in_student, used.shape_mismatch) == ((), (), ())
    assert all(r.dir_mean < 1e-6 and r.norm_rel_mean == pytest.approx(0.1, rel=1e-5) for r in used.layers)
    assert any("read the EMA copy" in al.message for al in used.alerts)


def test_ema_errors_teach(ws: Workspace, tmp_path: Path) -> None:
    pair = ws.pair("sd15")
    teacher = ws.path("sd15", "teacher", "pipeline")
    with pytest.raises(OptionError, match="neither checkpoint holds EMA"):
        _align(teacher, ws.path("sd15", "student", "ldm-safetensors"), AlignOptions(ema=True))
    partial = {k: v for k, v in pair.student.items() if not k.startswith("up_blocks.3.")}
    state = _ldm_state(pair.student, pair.family, ema=partial)
    torch.save({"state_dict": state}, tmp_path / "partial.ckpt")
    with pytest.raises(AlignmentError, match="no EMA copy"):
        _align(teacher, tmp_path / "partial.ckpt", AlignOptions(ema=True))


# ---------------------------------------------------------------------------- CLI


def test_cli_on_whole_sdxl_file(ws: Workspace, tmp_path: Path) -> None:
    teacher = ws.path("sdxl", "teacher", "pipeline")
    student = ws.path("sdxl", "student", "ldm-safetensors")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", str(teacher), str(student), "-o", str(out), "--no-report", "--no-timestamp", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["only_in_teacher"] == summary["only_in_student"] == summary["shape_mismatch"] == []
    messages = " ".join(a["message"] for a in summary["alerts"])
    assert "conditioner.embedders.* (text encoders)" in messages and "first_stage_model.* (VAE)" in messages
    ranks = json.loads((out / "ranks.json").read_text())
    assert {m: r for m, r in ranks["rank_pattern"].items() if r} == {k.removesuffix(".weight"): RANK for k in FAMILIES["sdxl"].rotate}


def test_cli_ema_flag(ws: Workspace, tmp_path: Path) -> None:
    teacher = ws.path("sd15", "teacher", "pipeline")
    runner = CliRunner()
    args = ["compare", str(teacher), "-o", str(tmp_path / "out"), "--ema", "--no-report", "--no-timestamp", "-q"]
    result = runner.invoke(app, [*args[:2], str(ws.path("sd15", "student", "ldm-ckpt")), *args[2:]])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any("read the EMA copy" in a["message"] for a in summary["alerts"])
    result = runner.invoke(app, [*args[:2], str(ws.path("sd15", "student", "ldm-safetensors")), *args[2:], "--overwrite"])
    assert result.exit_code == 1 and "neither checkpoint holds EMA" in result.output


def test_rank_figure_block_labels_do_not_overlap() -> None:
    """SDXL-like spans: two 2-module embeddings and a 2-module down block before wide blocks."""
    from weightlens.report.figures import _spaced_labels

    spans = [("add_embedding", 0, 1), ("time_embedding", 2, 3), ("down_blocks.0", 4, 5), ("down_blocks.1", 6, 105), ("single_transformer_blocks.37", 106, 299)]
    ticks = _spaced_labels(spans, total=300)
    assert [label for _, label in ticks] == ["add_embedding", "down_blocks.1", "single_transformer_blocks.37"]
    assert all(b - a >= 300 / 28 for (a, _), (b, _) in itertools.pairwise(ticks))
