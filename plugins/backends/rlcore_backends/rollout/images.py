"""Sampling prompts with images on an engine that runs its own image processor (vLLM, SGLang).

The prompts are rendered by the model's processor here, as for the trainer, with each image first resized to
the size that processor gives it, so the engine's processor keeps it as it is and computes the pixel values the
trainer gets; the engine receives the token ids (image placeholders expanded) and the images themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlcore import Interaction, Prompt, RolloutBatch, SamplingParams, Tool
from rlcore_backends.common.vision import ImageEngine, render_with_images, trainer_inputs
from rlcore_backends.rollout.engine import TurnOptions, run_turns


def sample_with_images(engine: Any, model_config: Any, processor: Any, tokenizer: Any, prompts: Sequence[Prompt],
                       params: SamplingParams, tools: Sequence[Tool], options: TurnOptions,
                       interaction: Interaction | None = None) -> RolloutBatch:
    """`params.n` samples per prompt through `run_turns` (the tool loop too); every `engine.generate` call gets
    its rows' images as `multimodal=` (key `ENGINE_IMAGES`), and the batch keeps each sample's pixel values and
    image grids for the trainer. Responses end before any image placeholder token they sample."""
    schemas = [t.schema() for t in tools]
    rendered = [render_with_images(processor, p, p.tools or schemas, for_engine=True) for p in prompts]
    batch = run_turns(ImageEngine(engine, model_config), tokenizer, prompts, params, tools, options, interaction,
                      rendered=[ids for ids, _ in rendered],
                      multimodal=[inputs for _, inputs in rendered])
    batch.multimodal = [trainer_inputs(m) for m in batch.multimodal or []]
    return batch
