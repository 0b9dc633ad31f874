"""Conditioning data: prompt files for text models, class labels for class-conditional ones.

Prompt files: `.txt` (one prompt a line), `.jsonl` (a `prompt_column` field per line),
`.csv` / `.tsv` / `.parquet` (a column), `.json` (COCO caption annotations). Text embeddings
are computed once with the pipeline's text encoder and cached; a batch is then an index draw
from a seeded generator.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wadi_train.errors import ConfigError
from wadi_train.models import Cond, Teacher

__all__ = ["PROMPT_COLUMNS", "ClassSampler", "ConditionSampler", "TextSampler", "encode_prompts", "load_embeddings", "read_prompts"]

log = logging.getLogger(__name__)


PROMPT_COLUMNS = ("text", "caption", "prompt", "captions")  # tried in order when no column is given


def read_prompts(path: str | Path, column: str | None = "text") -> list[str]:
    """All prompts of a prompt file, stripped, empty ones dropped, in file order.

    Formats: `.txt` (one prompt a line), `.jsonl` (a `column` field per line), `.csv` / `.tsv`
    / `.parquet` (a column), `.json` (COCO caption annotations such as
    `captions_val2014.json`: `{"annotations": [{"caption": ...}, ...]}`, or a list of strings).
    `column=None` picks the first of `PROMPT_COLUMNS` the file has.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".txt":
            prompts = p.read_text().splitlines()
        elif suffix == ".jsonl":
            rows = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
            prompts = [str(r[_pick_column(p, column, r.keys())]) for r in rows]
        elif suffix == ".json":
            prompts = _json_prompts(p, json.loads(p.read_text()))
        elif suffix in (".csv", ".tsv", ".parquet"):
            import pandas as pd

            df = pd.read_parquet(p) if suffix == ".parquet" else pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False)
            prompts = [str(x) for x in df[_pick_column(p, column, df.columns)].tolist()]
        else:
            raise ConfigError(f"{p}: prompt files are .txt, .jsonl, .json (COCO captions), .csv, .tsv or .parquet")
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{p}: cannot read prompts ({type(exc).__name__}: {exc})") from None
    prompts = [x.strip() for x in prompts if x.strip()]
    if not prompts:
        raise ConfigError(f"{p}: no prompts found")
    return prompts


def _pick_column(path: Path, column: str | None, available: Any) -> str:
    names = [str(c) for c in available]
    if column is not None and column in names:
        return column
    found = next((c for c in PROMPT_COLUMNS if c in names), None) if column is None else None
    if found is None:
        wanted = f"column {column!r}" if column else f"a column named one of {list(PROMPT_COLUMNS)}"
        raise ConfigError(f"{path}: no {wanted}; its columns are {names[:20]}: name the prompt column (--prompt-column / data.prompt_column)")
    return found


def _json_prompts(path: Path, data: Any) -> list[str]:
    """COCO caption annotations (`annotations[*].caption`) or a plain list of strings."""
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return [str(a["caption"]) for a in data["annotations"]]
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return data
    raise ConfigError(f"{path}: a .json prompt file is COCO caption annotations ({{\"annotations\": [{{\"caption\": ...}}]}}) or a list of strings")


class ConditionSampler:
    """Draws a conditioning batch and gives the matching unconditional one."""

    def sample(self, batch: int, generator: torch.Generator) -> Cond:  # pragma: no cover - protocol
        raise NotImplementedError

    def uncond(self, batch: int) -> Cond:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass
class ClassSampler(ConditionSampler):
    """Class labels drawn uniformly from `classes`; the null class is `num_classes`."""

    num_classes: int
    classes: list[int] | None = None

    def sample(self, batch: int, generator: torch.Generator) -> Cond:
        pool = torch.tensor(self.classes if self.classes else list(range(self.num_classes)))
        return Cond(class_labels=pool[torch.randint(len(pool), (batch,), generator=generator)])

    def uncond(self, batch: int) -> Cond:
        return Cond(class_labels=torch.full((batch,), self.num_classes, dtype=torch.long))

    def labels(self, labels: list[int]) -> Cond:
        return Cond(class_labels=torch.tensor(labels, dtype=torch.long))


@dataclass
class TextSampler(ConditionSampler):
    """Rows of precomputed text embeddings; the last row is the empty prompt.

    With `pooled` (SDXL-style added conditioning) each batch also carries `text_embeds` and
    `time_ids` (original size, crop 0, target size = `resolution`); with `mask` (PixArt's T5
    padding mask, 1 = token) it carries `encoder_attention_mask`, as the pipelines pass it.
    """

    embeddings: Tensor  # (N + 1, L, D): prompts then the empty prompt
    pooled: Tensor | None = None  # (N + 1, D)
    resolution: int | None = None
    mask: Tensor | None = None  # (N + 1, L)

    def _cond(self, idx: Tensor) -> Cond:
        extra: dict[str, Tensor] = {}
        if self.pooled is not None:
            res = self.resolution or 1024
            extra = {"text_embeds": self.pooled[idx], "time_ids": torch.tensor([res, res, 0, 0, res, res], dtype=torch.float32).expand(len(idx), -1)}
        if self.mask is not None:
            extra["encoder_attention_mask"] = self.mask[idx]
        return Cond(encoder_hidden_states=self.embeddings[idx], extra=extra)

    def sample(self, batch: int, generator: torch.Generator) -> Cond:
        return self._cond(torch.randint(self.embeddings.shape[0] - 1, (batch,), generator=generator))

    def uncond(self, batch: int) -> Cond:
        return self._cond(torch.full((batch,), self.embeddings.shape[0] - 1, dtype=torch.long))


def load_embeddings(path: str | Path, resolution: int | None = None) -> TextSampler:
    """A TextSampler from a precomputed-embeddings safetensors file (see DataConfig)."""
    from safetensors.torch import load_file

    try:
        data = load_file(str(path))
        emb = data["embeddings"].float()
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(f"{path}: not a precomputed-embeddings file (safetensors with an 'embeddings' tensor of shape (N+1, L, D)): {str(exc).splitlines()[0][:160]}") from None
    if emb.ndim != 3 or emb.shape[0] < 2:
        raise ConfigError(f"{path}: 'embeddings' has shape {tuple(emb.shape)}; expected (N+1, L, D) with the empty prompt last")
    pooled, mask = data.get("text_embeds"), data.get("attention_mask")
    for key, value, want in (("text_embeds", pooled, (emb.shape[0], None)), ("attention_mask", mask, emb.shape[:2])):
        if value is not None and (value.ndim != 2 or value.shape[0] != want[0] or want[1] not in (None, value.shape[1])):
            raise ConfigError(f"{path}: {key!r} has shape {tuple(value.shape)}; expected ({want[0]}, {want[1] or 'D'}), one row per 'embeddings' row")
    return TextSampler(emb, None if pooled is None else pooled.float(), resolution, None if mask is None else mask.float())


@torch.no_grad()
def encode_prompts(teacher: Teacher, prompts: list[str], cache: Path | None = None, batch: int = 32) -> Tensor:
    """Embed prompts (+ the empty prompt last) with the pipeline's CLIP text encoder, cached."""
    from safetensors.torch import load_file, save_file

    if cache is not None and cache.is_file():
        emb = load_file(cache)["embeddings"]
        if emb.shape[0] == len(prompts) + 1:
            return emb
    if teacher.pipeline_dir is None:
        raise ConfigError("text conditioning needs a pipeline folder (model.pretrained) with text_encoder/ and tokenizer/")
    from transformers import AutoTokenizer, CLIPTextModel

    root = teacher.pipeline_dir
    tok = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    enc = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval()
    texts = list(prompts) + [""]
    out = []
    for i in range(0, len(texts), batch):
        ids = tok(texts[i : i + batch], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        out.append(enc(ids)[0].float())
    emb = torch.cat(out)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": emb.contiguous()}, cache)
    return emb
