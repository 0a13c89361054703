"""What every task whose prompts carry images declares before a run: its modality, and that the model must
be a vision-language model (a text model has no image processor or vision tower to read them)."""

from __future__ import annotations

from typing import Any


def needs_vision_model(task: str, model_config: Any) -> list[str]:
    """The `check_run` answer of an image task: a problem line when the model's config is readable and has no
    vision tower (`vision_config`), else nothing."""
    if model_config is None or getattr(model_config, "vision_config", None) is not None:
        return []
    kind = getattr(model_config, "model_type", "?")
    return [f"task {task}: its prompts carry images, but the model (model_type {kind!r}) is text-only: use a "
            "vision-language model such as Qwen2.5-VL (--model Qwen/Qwen2.5-VL-3B-Instruct, or "
            "--model embedded:qwen2.5-vl on a CPU)"]
