"""`bfloat16_matched`: bfloat16 matmuls that give the hf rollout and the torch trainer the same bits.

With bfloat16 activations, any difference between two ways of computing the same forward (a cached decode
of one token against a full forward of the sequence) grows to bfloat16's own noise within a few layers:
a last-bit difference flips an element's bf16 rounding, and the next matmul spreads that flip over every
output. Today's `bfloat16` (autocast) therefore puts the rollout's logprobs ~0.035 nats from the trainer's.
The two sides differ in two places only, measured on SmolLM2: SDPA's blocking depends on the sequence
length, and a bf16 GEMM's reduction order over a long inner dimension depends on the number of rows.

Here every decoder `Linear` casts its input and weight to bfloat16 and runs the GEMM in chunks of the inner
dimension short enough that the result of a row does not depend on the other rows (`invariant_chunk`
finds the chunk on this machine, at the model's shapes), adding the chunks in float32; attention runs in
float64 (rounding-order differences of 1e-16 never reach a bf16 rounding); the residual stream, norms,
LM head and log-softmax stay float32. A decode step then computes what the full forward computes, bit for
bit, and the two sides' logprobs agree as float32's do.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import torch
from torch import Tensor

ATTENTION = "rlcore_matched"
CHUNKS = (1024, 512, 256, 128, 64)
"""Inner-dimension chunks tried after the whole dimension, longest first."""
PROBE_ROWS = (*range(2, 65), 100, 257, 1000, 4096)
"""Row counts of the calls whose rows must equal the same rows computed one per call: a decode step's few
rows to a trainer pass's many (which rows of a call differ depends on the kernel, so every count to 64)."""


class MatchedLinear(torch.nn.Linear):
    """A `Linear` whose GEMM runs in bfloat16, in chunks of `chunk` inner columns added in float32; the output
    is float32. The bf16 weight is cached while the weight does not take a gradient (the rollout, no-grad
    passes) and recast whenever it changes (a weight sync or an optimizer step bumps its version)."""

    chunk: int = 512
    _cached: tuple[tuple[int, int], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        weight = self._bf16_weight()
        x = x.to(torch.bfloat16)
        out = None
        for start in range(0, x.shape[-1], self.chunk):
            part = torch.nn.functional.linear(x[..., start:start + self.chunk],
                                              weight[:, start:start + self.chunk]).float()
            out = part if out is None else out + part
        return out if self.bias is None else out + self.bias.float()

    def _bf16_weight(self) -> Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self._cached = None
            return self.weight.to(torch.bfloat16)
        version = (self.weight.data_ptr(), self.weight._version)  # in-place writes bump the version
        if self._cached is None or self._cached[0] != version:
            self._cached = (version, self.weight.detach().to(torch.bfloat16))
        return self._cached[1]


def matched_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' SDPA attention run in float64 and returned in float32."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, query.double(), key.double(), value.double(), attention_mask, **kwargs)
    return out.float(), None


def linear_counts(model: Any) -> dict[tuple[int, int], int]:
    """The (inner, outer) dimensions of the decoder's `Linear` layers (of a loaded or meta-device transformers
    model) and how many layers have each."""
    return dict(Counter((m.in_features, m.out_features) for m in model.get_decoder().modules()
                        if isinstance(m, torch.nn.Linear)))


def linear_shapes(model: Any) -> list[tuple[int, int]]:
    """The distinct (inner, outer) dimensions of the decoder's `Linear` layers."""
    return sorted(linear_counts(model))


@functools.lru_cache(maxsize=None)
def invariant_chunk(shapes: tuple[tuple[int, int], ...]) -> int | None:
    """The longest inner-dimension chunk (the whole dimension first, then `CHUNKS`) for which a bf16 GEMM of
    every (inner, outer) shape gives each row the same bits alone as in a call of `PROBE_ROWS` rows or of
    rows at an offset, on this machine's kernels; None when no chunk does. Measured once per process and
    set of shapes (~0.1 s per shape and chunk for a 135M model)."""
    generator = torch.Generator().manual_seed(0)
    for chunk in (max(k for k, _ in shapes), *CHUNKS):
        invariant = True
        for inner, outer in shapes:
            layer = MatchedLinear(inner, outer, bias=False).requires_grad_(False)
            layer.chunk = chunk
            layer.weight.copy_(torch.randn(outer, inner, generator=generator))
            rows = torch.randn(max(PROBE_ROWS), inner, generator=generator)
            with torch.no_grad():
                alone = torch.cat([layer(rows[i:i + 1]) for i in range(64)])
                invariant = (all(torch.equal(layer(rows[:n])[:64], alone[:n]) for n in PROBE_ROWS)
                             and torch.equal(layer(rows[5:21]), alone[5:21]))
            if not invariant:
                break
        if invariant:
            return chunk
    return None


def match(model: Any) -> int:
    """Make `model` (a transformers causal LM, float32) compute in `bfloat16_matched`, in place: its decoder's
    `Linear` layers become `MatchedLinear` and its attention `matched_attention`. Returns the chunk.
    Raises `ValueError` when no chunk keeps this machine's bf16 GEMMs row-invariant."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    chunk = invariant_chunk(tuple(linear_shapes(model)))
    if chunk is None:
        raise ValueError("this machine's bfloat16 GEMMs give a row different bits depending on the rows beside it "
                         f"at every inner-dimension chunk down to {CHUNKS[-1]}")
    AttentionInterface.register(ATTENTION, matched_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    for module in model.get_decoder().modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = MatchedLinear
            module.chunk = chunk
    model.set_attn_implementation(ATTENTION)
    return chunk
