"""CLIP score of images against their prompts, with a CLIP model from a local folder.

The score is torchmetrics' `CLIPScore` definition (Hessel et al. 2021 without their 2.5
weight): 100 * max(cos(image embedding, text embedding), 0) per image-prompt pair, averaged.
The model and its preprocessing (resize, crop, normalisation; tokenizer) come from a local
transformers CLIP folder, e.g. a saved `openai/clip-vit-large-patch14`, loaded with
`local_files_only=True`: nothing downloads. Prompts longer than the text encoder's context
(77 tokens for OpenAI's CLIP) are truncated, as torchmetrics does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wadi_train.evaluation.errors import EvaluationError

__all__ = ["ClipScorer", "load_clip"]

log = logging.getLogger(__name__)

FLAG = "--clip"


@dataclass
class ClipScorer:
    """A CLIP model and its processor; `pair_scores` gives per-pair scores."""

    model: Any  # transformers.CLIPModel
    processor: Any  # transformers.CLIPProcessor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def pair_scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """100 * max(cos, 0) for each (image, prompt) pair: (B,) float64 on CPU.

        Args:
            images: (B, 3, H, W) uint8 RGB.
            prompts: B strings, prompt i belongs to image i.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8 or len(prompts) != images.shape[0]:
            raise EvaluationError(f"CLIP score takes (B, 3, H, W) uint8 images and B prompts, got {tuple(images.shape)} {images.dtype} and {len(prompts)} prompts")
        from PIL import Image

        max_len = int(self.model.config.text_config.max_position_embeddings)
        pil = [Image.fromarray(im) for im in images.permute(0, 2, 3, 1).cpu().numpy()]  # HWC uint8
        batch = self.processor(
            text=list(prompts), images=pil, return_tensors="pt", padding=True,
            truncation=True, max_length=max_len,
        )
        dev = self.device
        # The projections of CLIPModel.forward, spelled out: get_*_features return tensors in
        # transformers 4 but output records in 5.
        vision = self.model.vision_model(pixel_values=batch["pixel_values"].to(dev, self.model.dtype))
        text = self.model.text_model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
        img = self.model.visual_projection(vision.pooler_output).double()  # (B, P)
        txt = self.model.text_projection(text.pooler_output).double()  # (B, P)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)  # (B,)
        return (100 * cos.clamp_min(0)).cpu()


def load_clip(folder: str | Path | None, device: torch.device | str = "cpu") -> ClipScorer:
    """A `ClipScorer` from a local transformers CLIP folder (model + processor files).

    Raises:
        EvaluationError: no folder given, a missing folder, or one that is not a CLIP model
            with its tokenizer and image processor; the message names `--clip`.
    """
    if folder is None:
        raise EvaluationError(f"CLIP score needs a CLIP model: pass {FLAG} FOLDER (a local transformers CLIP folder, e.g. openai/clip-vit-large-patch14 saved with save_pretrained), set clip in --config, or pass --no-clip-score")
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise EvaluationError(f"{root}: not a transformers CLIP folder (no config.json); pass {FLAG} FOLDER with the model, tokenizer and preprocessor files")
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(root, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EvaluationError(f"{root}: could not load a CLIP model and processor ({first}); pass {FLAG} FOLDER with config.json, the weights, tokenizer and preprocessor_config.json") from None
    log.info("loaded CLIP from %s", root)
    return ClipScorer(model.eval().requires_grad_(False).to(device), processor)
