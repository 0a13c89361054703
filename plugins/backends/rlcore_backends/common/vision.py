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
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlcore import Prompt
from rlcore.errors import RLCoreError

log = logging.getLogger("rlcore")

VISION_KEYS = ("pixel_values", "image_grid_thw")
"""The processor outputs kept per sample and passed to the model."""
ENGINE_IMAGES = "images"
"""Key of the images themselves (PIL, already at the processor's size) in the inputs `render_with_images(...,
for_engine=True)` returns: for engines that process images on their own (vLLM, SGLang); the trainer's forward
passes never see them (`trainer_inputs`)."""


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
    `tokenizer` when the full processor cannot be loaded here; that fallback is logged (a warning naming why),
    never silent."""
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
        if getattr(processor, "image_processor", None) is not None:
            return processor
        reason = f"its AutoProcessor is a {type(processor).__name__} without an image processor"
    except (ImportError, OSError, ValueError, TypeError, AttributeError) as e:
        reason = f"transformers' AutoProcessor cannot be built here ({type(e).__name__}: {str(e)[:200]})"
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
    log.warning("model %s: %s; using rlcore's ImageTextProcessor, built from its image processor (%s) and "
                "tokenizer, which renders the same token ids and pixel values for Qwen2-VL-style models (install "
                "torchvision for transformers' own processor)", path, reason, type(images).__name__)
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


def render_with_images(processor: Any, prompt: Prompt, tools: Sequence[dict[str, Any]] | None = None,
                       for_engine: bool = False) -> tuple[list[int], dict[str, Any]]:
    """A prompt's token ids (each image expanded to its patch tokens, `tools` offered by the chat template)
    and its vision inputs. `for_engine`: each image is first resized to the size the processor gives it
    (`fit_images`), and the resized images are kept under `ENGINE_IMAGES` for an engine that runs its own image
    processor: it then leaves them as they are and computes the pixel values the trainer gets."""
    kwargs = {"tools": list(tools)} if tools else {}
    text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False, **kwargs)
    images = [open_image(i) for i in prompt.images or []]
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    if text.count(image_token) != len(images):
        raise RLCoreError(f"prompt {prompt.id!r} has {len(images)} images but its chat messages render "
                          f"{text.count(image_token)} image placeholders: give one {{'type': 'image'}} content "
                          "entry per image")
    if for_engine:
        images = fit_images(processor, images)
    out = processor(text=[text], images=images, return_tensors="pt")
    inputs: dict[str, Any] = {k: out[k] for k in VISION_KEYS if k in out}
    if for_engine:
        inputs[ENGINE_IMAGES] = images
    return out["input_ids"][0].tolist(), inputs


def fit_images(processor: Any, images: Sequence[Any]) -> list[Any]:
    """Each image resized (with the processor's resampling filter) to the size the processor would give it: a
    multiple of its patch size within its pixel budget (read from the patch grid it computes), so any Qwen2-VL
    image processor, PIL or torchvision, keeps it as it is."""
    from PIL import Image

    if not images:
        return []
    grids = processor.image_processor(images=list(images), return_tensors="pt")["image_grid_thw"]
    patch = processor.image_processor.patch_size
    fitted = []
    for image, (_, h, w) in zip(images, grids.tolist()):
        size = (int(w) * patch, int(h) * patch)
        resample = getattr(processor.image_processor, "resample", Image.Resampling.BICUBIC)
        fitted.append(image if image.size == size else image.resize(size, resample))
    return fitted


def png_data_url(image: Any) -> str:
    """A PIL image as a PNG data URL (lossless, so a server decodes exactly these pixels)."""
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def trainer_inputs(inputs: dict[str, Any]) -> dict[str, Tensor]:
    """A sample's vision inputs without the engine's copy of its images (what `RolloutBatch.multimodal` keeps)."""
    return {k: v for k, v in inputs.items() if k != ENGINE_IMAGES}


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



def cut_at_placeholders(config: Any, completions: list[Any]) -> list[Any]:
    """Completions ended (finish reason "stop") before their first image or video placeholder token (ids from
    the model's `config`): such a token has no image features, so no forward pass could take it as input. A
    trained model never writes one; a random one can. The kept tokens' logprobs are unchanged, so trainer and
    rollout still agree."""
    banned = {t for t in (config.image_token_id, getattr(config, "video_token_id", None)) if t is not None}
    out = []
    for c in completions:
        cut = next((i for i, t in enumerate(c.token_ids) if t in banned), None)
        out.append(c if cut is None else type(c)(c.token_ids[:cut], c.logprobs[:cut], "stop"))
    return out


class ImageEngine:
    """An `Engine` that takes images (`multimodal=`, from `render_with_images(..., for_engine=True)`) whose
    completions end before any image placeholder token they sample (`cut_at_placeholders`)."""

    def __init__(self, engine: Any, config: Any) -> None:
        self.engine, self.config = engine, config

    def generate(self, prompts: list[list[int]], params: Any, multimodal: list[dict[str, Any]] | None = None) -> list[Any]:
        return cut_at_placeholders(self.config, self.engine.generate(prompts, params, multimodal=multimodal))
