"""Precision names, as options spell them, mapped to torch dtypes: one map for every engine and trainer."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
