"""rlcore: reinforcement learning for LLM post-training as a tiny core loop plus plugins."""

from rlcore.hookspecs import hookimpl
from rlcore.types import (Interaction, InteractionTurn, LossInputs, LossNorm, ModelSpec, PolicyLoss, Prompt,
                          RolloutBatch, SamplingParams, Scores, Tool, ToolCall, ToolFormat, ToolResult, UpdatePlan,
                          Weights)

__version__ = "0.1.0"

__all__ = ["hookimpl", "Interaction", "InteractionTurn", "LossInputs", "LossNorm", "ModelSpec", "PolicyLoss", "Prompt",
           "RolloutBatch", "SamplingParams", "Scores", "Tool", "ToolCall", "ToolFormat", "ToolResult", "UpdatePlan",
           "Weights", "__version__"]
