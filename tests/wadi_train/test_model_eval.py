"""`wadi-train eval`: FID and CLIP score of exports, with random local Inception and CLIP weights.

Everything is built in-process and seeded: a full-size FID Inception-v3 with random
(variance-preserving) weights saved to a temp file, a tiny random CLIP saved as a transformers
folder, a tiny random Stable Diffusion pipeline export and a tiny class-conditional export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny import TINY_UNET
from typer.testing import CliRunner, Result

from wadi_train.cli import app
from wadi_train.data import read_prompts
from wadi_train.evaluation.fid import (
    StatsAccumulator,
    feature_stats,
    frechet_distance,
    load_stats,
    save_stats,
)
from wadi_train.evaluation.inception import FIDInceptionV3, load_inception, tf1_resize_bilinear
from wadi_train.evaluation.model_eval import reference_stats_of, select_prompts

runner = CliRunner()
N = 4
CAPTIONS = ["a red bus on a street", "two cats on a sofa", "a plate of pasta", "a man riding a wave", "a clock tower", "a dog with a frisbee"]


def _invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def _error(res: Result) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "error:" in res.output, res.output
    return " ".join(res.output.split())


def _alphas() -> list[float]:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.tolist()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_eval")


@pytest.fixture(scope="module")
def inception_file(root: Path) -> Path:
    """Random weights that keep activations O(1) through 94 conv layers (He init, BN near identity)."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("conv.weight"):
            value = torch.randn(value.shape, generator=gen) * math.sqrt(2 / value[0].numel())
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.endswith(("running_mean", "bn.bias")):
            value = 0.1 * torch.randn(value.shape, generator=gen)
        state[key] = value
    path = root / "pt_inception-random.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def clip_dir(root: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from wadi_train.random_pipeline import byte_level_clip_tokenizer

    tok = byte_level_clip_tokenizer(32)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**small, **ids, "vocab_size": len(tok), "max_position_embeddings": 32},
        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16,
    )
    torch.manual_seed(0)
    folder = root / "clip"
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_export(root: Path) -> Path:
    """A tiny random SD pipeline (32 px) laid out as `wadi-train export` writes it."""
    from wadi_train.random_pipeline import random_sd_pipeline

    folder = root / "text_export"
    random_sd_pipeline("tiny", seed=0).save_pretrained(folder)
    info = {"family": "unet2d_condition", "prediction_type": "epsilon", "conditioning": "text", "alphas_cumprod": _alphas(), "generator_timestep": None, "method": "lorad", "step": 2, "dtype": "float32"}
    (folder / "wadi_export.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def class_export(root: Path) -> Path:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    folder = root / "class_export"
    UNet2DConditionModel.from_config(TINY_UNET).save_pretrained(folder / "model")
    info = {"family": "unet2d_condition", "prediction_type": "epsilon", "conditioning": "class", "num_classes": 10, "alphas_cumprod": _alphas()}
    (folder / "wadi_export.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def captions(root: Path) -> Path:
    """COCO-style caption annotations, as in captions_val2014.json."""
    path = root / "captions_val2014.json"
    anns = [{"image_id": 10 + i // 2, "id": i, "caption": c + "\n"} for i, c in enumerate(CAPTIONS)]
    path.write_text(json.dumps({"info": {}, "images": [], "annotations": anns}))
    return path


@pytest.fixture(scope="module")
def reference_dir(root: Path) -> Path:
    rng = np.random.default_rng(1)
    folder = root / "reference"
    (folder / "sub").mkdir(parents=True)
    for i in range(N):  # not square: centre-cropped then resized to the generated size
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / ("sub" if i % 2 else "") / f"{i}.jpg")
    return folder


@pytest.fixture(scope="module")
def text_run(root: Path, text_export: Path, captions: Path, reference_dir: Path, inception_file: Path, clip_dir: Path) -> Path:
    out = root / "eval_text"
    res = _invoke("eval", text_export, "--prompts", captions, "--reference", reference_dir, "-n", N, "--batch-size", 3,
                  "--inception-weights", inception_file, "--clip", clip_dir, "--save-images", "--save-reference-stats", root / "ref.npz", "-o", out, "--seed", 5)
    assert res.exit_code == 0, res.output
    assert "FID" in res.output and "CLIP score" in res.output
    return out


# ---------------------------------------------------------------------------- pieces


def test_tf1_resize_has_no_half_pixel_centres() -> None:
    x = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2)
    out = tf1_resize_bilinear(x, 4)  # source columns 0, 0.5, 1, 1.5 (clamped to the edge)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    y = torch.rand(2, 3, 7, 7)
    torch.testing.assert_close(tf1_resize_bilinear(y, 7), y)


def test_inception_matches_torch_fidelity(inception_file: Path) -> None:
    tf = pytest.importorskip("torch_fidelity")
    theirs = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file))
    x = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    torch.testing.assert_close(load_inception(inception_file)(x), theirs(x)[0], rtol=1e-5, atol=1e-5)


def test_load_inception_explains_bad_files(tmp_path: Path) -> None:
    from wadi_train.evaluation import EvaluationError

    with pytest.raises(EvaluationError, match="--inception-weights"):
        load_inception(None)
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    with pytest.raises(EvaluationError, match="not FID Inception-v3 weights .*--inception-weights"):
        load_inception(tmp_path / "partial.pth")


def test_stats_accumulator_equals_feature_stats() -> None:
    x = np.random.default_rng(0).normal(loc=50.0, size=(37, 5))
    acc = StatsAccumulator()
    for i in range(0, 37, 8):
        acc.update(torch.from_numpy(x[i : i + 8]) if i % 16 else x[i : i + 8])  # tensors or arrays
    got, want = acc.stats(), feature_stats(x)
    assert got.n == 37
    np.testing.assert_allclose(got.mu, want.mu, rtol=1e-12)
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-9, atol=1e-12)


def test_stats_from_other_tools_have_no_count(tmp_path: Path) -> None:
    stats = feature_stats(np.random.default_rng(1).normal(size=(10, 3)))
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma.astype(np.float32))
    loaded = load_stats(tmp_path / "pytorch_fid.npz")
    assert loaded.n is None and frechet_distance(loaded, stats) < 1e-5
    assert load_stats(save_stats(loaded, tmp_path / "again.npz")).n is None


def test_caption_files(tmp_path: Path, captions: Path) -> None:
    (tmp_path / "c.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "c.csv").write_text('image_id,caption\n1,"a cat, sleeping"\n2,a dog\n')
    (tmp_path / "c.tsv").write_text("file_name\tcaption\tsplit\nx.jpg\ta cat\tval\ny.jpg\ta dog\tval\n")
    assert read_prompts(tmp_path / "c.txt", None) == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "c.csv", None) == ["a cat, sleeping", "a dog"]
    assert read_prompts(tmp_path / "c.tsv", None) == ["a cat", "a dog"]
    assert read_prompts(captions, None) == CAPTIONS
    from wadi_train.errors import ConfigError

    with pytest.raises(ConfigError, match="prompt-column"):
        read_prompts(tmp_path / "c.tsv", "prompt")


def test_select_prompts_subset_and_cycle() -> None:
    chosen, how = select_prompts(CAPTIONS, 4, seed=5)
    assert len(chosen) == 4 and len(set(chosen)) == 4 and "random subset" in how
    assert chosen == sorted(chosen, key=CAPTIONS.index) and chosen == select_prompts(CAPTIONS, 4, 5)[0]
    assert select_prompts(["a", "b"], 5, 0)[0] == ["a", "b", "a", "b", "a"]


# ---------------------------------------------------------------------------- end to end


def test_text_eval_writes_results(text_run: Path, captions: Path, inception_file: Path, clip_dir: Path) -> None:
    from wadi_train.evaluation.model_eval import _sha256

    res = json.loads((text_run / "results.json").read_text())
    assert res["n"] == N and res["resolution"] == 32 and res["seed"] == 5
    assert math.isfinite(res["fid"]) and res["fid"] > 0
    assert res["prompts"]["sha256"] == _sha256(captions) and res["prompts"]["captions_in_file"] == len(CAPTIONS)
    assert res["weights"]["inception"]["sha256"] == _sha256(inception_file)
    assert res["weights"]["clip"]["sha256"]["model.safetensors"] == _sha256(clip_dir / "model.safetensors")
    assert "unet/diffusion_pytorch_model.safetensors" in res["weights"]["model"]
    assert {"torch", "diffusers", "transformers", "wadi_train"} <= res["versions"].keys()
    assert res["reference"]["kind"] == "images" and res["reference"]["n"] == N
    assert res["sampler"]["conditioning"] == "text"
    assert sorted(p.name for p in (text_run / "images").iterdir()) == [f"{i:05d}.png" for i in range(N)]
    assert (text_run / "samples.png").is_file()


def test_clip_score_matches_an_independent_computation(text_run: Path, captions: Path, clip_dir: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    prompts = select_prompts(read_prompts(captions, None), N, 5)[0]
    images = [Image.open(text_run / "images" / f"{i:05d}.png").convert("RGB") for i in range(N)]
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        outputs = model(**proc(text=prompts, images=images, return_tensors="pt", padding=True))
    cos = (outputs.image_embeds * outputs.text_embeds).sum(-1)  # both unit-norm
    want = float((100 * cos.clamp_min(0)).mean())
    got = json.loads((text_run / "results.json").read_text())["clip_score"]
    assert want > 0 and got == pytest.approx(want, abs=1e-3)


def test_fid_of_same_images_is_zero_and_of_shifted_ones_larger(text_run: Path, root: Path, text_export: Path, captions: Path, inception_file: Path) -> None:
    # Regenerate (other batch size: noise is per sample) against the first run's saved images.
    out = root / "eval_same"
    res = _invoke("eval", text_export, "--prompts", captions, "--reference", text_run / "images", "-n", N, "--batch-size", 4, "--seed", 5,
                  "--inception-weights", inception_file, "--no-clip-score", "--save-reference-stats", root / "same.npz", "-o", out)
    assert res.exit_code == 0, res.output
    same = json.loads((out / "results.json").read_text())
    assert same["clip_score"] is None and same["weights"]["clip"] is None
    generated = load_stats(root / "same.npz")
    scale = float(np.trace(generated.sigma))
    assert same["fid"] < 1e-6 * scale
    shifted = root / "shifted"
    shifted.mkdir()
    for png in (text_run / "images").iterdir():
        arr = np.asarray(Image.open(png), dtype=np.int16)
        Image.fromarray(np.clip(arr + 60, 0, 255).astype(np.uint8)).save(shifted / png.name)
    far = frechet_distance(generated, reference_stats_of(shifted, load_inception(inception_file), 32))
    assert far > 0.01 * scale and far > 1e3 * same["fid"]


def test_class_export_with_config_file_and_foreign_stats(root: Path, text_run: Path, class_export: Path, inception_file: Path) -> None:
    stats = load_stats(root / "ref.npz")  # torch-fidelity / pytorch-fid style: mu and sigma only
    np.savez(root / "fidelity.npz", mu=stats.mu, sigma=stats.sigma)
    (root / "labels.txt").write_text("\n".join(str(i) for i in range(10)))
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({"inception_weights": str(inception_file), "clip_score": False, "n": 3, "batch_size": 2}))
    out = root / "eval_class"
    res = _invoke("eval", class_export, "--config", config, "--prompts", root / "labels.txt", "--reference", root / "fidelity.npz", "--resolution", 16, "-o", out)
    assert res.exit_code == 0, res.output
    got = json.loads((out / "results.json").read_text())
    assert got["n"] == 3 and got["resolution"] == 16 and got["sampler"]["conditioning"] == "class"
    assert got["reference"]["kind"] == "stats" and got["reference"]["n"] is None and math.isfinite(got["fid"])


def test_missing_weights_name_the_flag(root: Path, class_export: Path, captions: Path, reference_dir: Path, inception_file: Path) -> None:
    base = ("eval", class_export, "--prompts", captions, "--reference", reference_dir, "-o", root / "unused")
    text = _error(_invoke(*base, "--inception-weights", root / "absent.pth", "--no-clip-score"))
    assert "--inception-weights" in text and "absent.pth" in text
    text = _error(_invoke(*base, "--inception-weights", inception_file))
    assert "--clip" in text and "--no-clip-score" in text
    text = _error(_invoke(*base, "--clip", root / "no_clip"))
    assert "2 problems" in text and "--inception-weights" in text and "--clip" in text
    labels = root / "words.txt"
    labels.write_text("a cat\n")
    text = _error(_invoke("eval", class_export, "--prompts", labels, "--reference", reference_dir, "--inception-weights", inception_file, "--no-clip-score", "-n", 2, "-o", root / "unused"))
    assert "class label" in text
