"""Images for vision-language models (the Qwen2-VL / Qwen2.5-VL family): rendering a prompt's chat messages
and images into token ids plus the model's vision inputs, and the extra forward-pass arguments that carry
those inputs through generation and the trainer's logprob / loss passes.

A prompt's vision inputs are kept per sample (`RolloutBatch.multimodal[i]`: `pixel_values` [patches, dim]
and `image_grid_thw` [images, 3]); a forward pass over several samples concatenates them in row order,
which is how Qwen2.5-VL matches image features to the `<|image_pad|>` tokens of its input ids. Position
ids are not passed for such a pass: the model computes its 3-D (mrope) positions from the ids, the image
grids, the attention mask (left and right padding skipped) and `mm_token_type_ids`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlcore import Prompt
from rlcore.errors import RLCoreError

VISION_KEYS = ("pixel_values", "image_grid_thw")
"""The processor outputs kept per sample and passed to the model."""


class ImageTextProcessor:
    """What `AutoProcessor` does for Qwen2-VL-style models, from the image processor and the tokenizer alone:
    used when the full processor cannot be built (transformers' Qwen2-VL processor also wants a video
    processor, which needs torchvision). Each `image_token` in the rendered text becomes one token per
    merged patch of its image (`image_grid_thw.prod() // merge_size**2`)."""

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None,
                 image_token: str = "<|image_pad|>") -> None:
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.image_token = getattr(tokenizer, "image_token", None) or image_token

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def __call__(self, text: list[str], images: list[Any], return_tensors: str = "pt") -> dict[str, Tensor]:
        vision = dict(self.image_processor(images=images, return_tensors=return_tensors))
        merge = getattr(self.image_processor, "merge_size", 2) ** 2
        counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
        parts = text[0].split(self.image_token)
        expanded = parts[0] + "".join(self.image_token * next(counts) + part for part in parts[1:])
        ids = self.tokenizer(expanded, add_special_tokens=False, return_tensors=return_tensors)["input_ids"]
        return {"input_ids": ids, **vision}


def load_processor(path: str, tokenizer: Any) -> Any:
    """The model directory's `AutoProcessor`, or an `ImageTextProcessor` over its image processor and
    `tokenizer` when the full processor cannot be loaded here."""
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
        if getattr(processor, "image_processor", None) is not None:
            return processor
    except (ImportError, OSError, ValueError, TypeError, AttributeError):
        pass  # no full processor here: build one from the image processor and the tokenizer
    try:
        images = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RLCoreError(f"model {path!r} has no image processor, so it cannot read images: use a "
                          f"vision-language model (e.g. Qwen2.5-VL) with this task ({e})") from None
    template = tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        file = Path(path) / name
        if template is None and file.exists():
            text = file.read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
    return ImageTextProcessor(images, tokenizer, template)


def open_image(image: Any) -> Any:
    """A PIL image in RGB from a PIL image, a path, raw bytes or a `{"bytes"|"path": ...}` mapping."""
    import io

    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, Path)):
        image = Image.open(image)
    return image.convert("RGB")


def render_with_images(processor: Any, prompt: Prompt,
                       tools: Sequence[dict[str, Any]] | None = None) -> tuple[list[int], dict[str, Tensor]]:
    """A prompt's token ids (each image expanded to its patch tokens, `tools` offered by the chat template)
    and its vision inputs."""
    kwargs = {"tools": list(tools)} if tools else {}
    text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False, **kwargs)
    images = [open_image(i) for i in prompt.images or []]
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    if text.count(image_token) != len(images):
        raise RLCoreError(f"prompt {prompt.id!r} has {len(images)} images but its chat messages render "
                          f"{text.count(image_token)} image placeholders: give one {{'type': 'image'}} content "
                          "entry per image")
    out = processor(text=[text], images=images, return_tensors="pt")
    return out["input_ids"][0].tolist(), {k: out[k] for k in VISION_KEYS if k in out}


def vision_inputs(model: Any, ids: Tensor, multimodal: Sequence[dict[str, Tensor]] | None) -> dict[str, Tensor]:
    """Extra forward / generate arguments for the rows of `ids` (whose vision inputs are `multimodal`, one
    dict per row, `{}` for a row without images): their vision tensors concatenated in row order and
    `mm_token_type_ids` (1 at image tokens). Empty when no row has images (a text-only pass)."""
    present = [m for m in multimodal or [] if m]
    if not present:
        return {}
    out = {key: torch.cat([m[key] for m in present]).to(ids.device) for key in VISION_KEYS if key in present[0]}
    config = model.config
    types = torch.zeros_like(ids, dtype=torch.int)
    types[ids == config.image_token_id] = 1
    video = getattr(config, "video_token_id", None)
    if video is not None:
        types[ids == video] = 2
    out["mm_token_type_ids"] = types
    return out



def cut_at_placeholders(model: Any, completions: list[Any]) -> list[Any]:
    """Completions ended (finish reason "stop") before their first image or video placeholder token: such a
    token has no image features, so no forward pass could take it as input. A trained model never writes
    one; a random one can. The kept tokens' logprobs are unchanged, so trainer and rollout still agree."""
    config = model.config
    banned = {t for t in (config.image_token_id, getattr(config, "video_token_id", None)) if t is not None}
    out = []
    for c in completions:
        cut = next((i for i, t in enumerate(c.token_ids) if t in banned), None)
        out.append(c if cut is None else type(c)(c.token_ids[:cut], c.logprobs[:cut], "stop"))
    return out
