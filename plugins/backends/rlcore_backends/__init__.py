"""rlcore rollout engines and update backends: `hf` (transformers generate) and `torch` (single-process AdamW)."""
