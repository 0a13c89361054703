"""Token sampling for the hf rollout: the `Sampler`, stop strings, and a lean KV-cache decode loop.

`decode` is the hf rollout's path for plain text models (`logprobs.plain_head`): it runs the decoder's steps
itself and applies the LM head itself, so it skips what transformers' `generate` does per step for features
rlcore does not use. It prefills each distinct prompt once (a group's n samples share one prompt), computes the
LM head only at the last position, drops finished rows from the batch and the cache, and runs the decode steps'
GEMMs in the way `linears` measured fastest on this machine. A Llama-family decoder's decode steps are written
out (`step`) over a cache that keeps each distinct prompt's keys and values once (`shared_cache`); other
decoders run transformers' forward over a `DynamicCache` whose layers write each step in place
(`ReservedLayer`). Other models (vision-language ones) go through `generate` with the same `Sampler`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import DynamicCache, LogitsProcessor
from transformers.cache_utils import DynamicLayer

from rlcore_backends.rollout.engine import Completion
from rlcore_backends.common.logprobs import distinct_rows, position_ids
from rlcore_backends.rollout.hf import step
from rlcore_backends.rollout.hf.linears import decode_linears
from rlcore_backends.rollout.hf.shared_cache import SharedPromptCache


class Sampler(LogitsProcessor):
    """Samples each step's token and records its logprob; as a logits processor `generate` then runs greedily
    on the result.

    `torch.multinomial` (what `generate(do_sample=True)` calls) draws one exponential variate per vocabulary
    entry on the CPU: with a 150k vocabulary that costs more than the model's forward pass for a small model.
    This draws one uniform per row and inverts the float64 CDF of softmax(logits / temperature) (after top-p
    truncation, with transformers' `TopPLogitsWarper` rule), which is the same distribution. While fewer than
    `min_new_tokens` tokens were sampled, `eos_ids` cannot be drawn. The logprob is log_softmax(logits /
    temperature) at the token, before top-p and the EOS ban, as the trainer computes it. It keeps one [rows]
    tensor per step instead of `output_logits`' [rows, vocab].

    `pick` takes the logits vocabulary-major ([vocab, rows], what `linears.HEAD` computes) and works in
    place, so sampling allocates nothing of the vocabulary's size.
    """

    def __init__(self, temperature: float, top_p: float, eos_ids: Sequence[int] = (), min_new_tokens: int = 0
                 ) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.eos_ids, self.min_new_tokens = torch.tensor(list(eos_ids), dtype=torch.long), min_new_tokens
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """`generate`'s logits-processor call: scores that are -inf except at the sampled token."""
        token = self.pick(scores.float().T.contiguous())
        return scores.fill_(float("-inf")).scatter_(-1, token[:, None], 0.0)

    def pick(self, logits: Tensor, uniforms: Tensor | None = None) -> Tensor:
        """One token per column of `logits` [vocab, rows] (float32, contiguous; overwritten), and its logprob
        appended to `logprobs`. `uniforms` [rows, 1] (float64 in [0, 1)) are drawn here when not given."""
        eos = self.eos_ids.to(logits.device)
        banned = len(self.logprobs) < self.min_new_tokens and len(eos) > 0
        if self.temperature <= 0:  # greedy; logprobs at temperature 1
            token = (logits.index_fill(0, eos, float("-inf")) if banned else logits).argmax(0)
            self.logprobs.append(logits.gather(0, token[None]).squeeze(0) - torch.logsumexp(logits, 0))
            return token
        if self.temperature != 1.0:
            logits.div_(self.temperature)
        weights = logits.sub_(column_max(logits)).exp_()  # exp(logits - max): the unnormalised softmax
        log_total = None
        if self.top_p < 1.0 or banned:  # the logprob's normaliser is taken before truncation
            log_total = torch.log(weights.sum(0))
        if self.top_p < 1.0:
            weights.masked_fill_(self._outside_top_p(weights.index_fill(0, eos, 0.0) if banned else weights), 0.0)
        if banned:
            weights.index_fill_(0, eos, 0.0)
        token, total = self._inverse_cdf(weights, uniforms)
        if log_total is None:  # no truncation: the sampling total is the softmax normaliser
            log_total = torch.log(total).float()
        self.logprobs.append(torch.log(weights.gather(0, token[None]).squeeze(0)) - log_total)
        return token

    BLOCK = 1024

    @classmethod
    def _inverse_cdf(cls, weights: Tensor, uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One token per column with probability proportional to `weights` [V, rows] (>= 0, a positive sum),
        and the float64 sum of each column's weights.

        Two levels, so that nothing sequential runs over the whole vocabulary: the float64 CDF of block sums
        picks a block, then the float64 CDF inside that block picks the token.
        """
        vocab, rows = weights.shape
        full = vocab // cls.BLOCK * cls.BLOCK
        sums = weights[:full].reshape(-1, cls.BLOCK, rows).sum(1)
        if full < vocab:
            sums = torch.cat([sums, weights[full:].sum(0, keepdim=True)], dim=0)
        sums = sums.T.double()  # [rows, blocks]
        block_cdf = sums.cumsum(-1)
        if uniforms is None:
            uniforms = torch.rand((rows, 1), dtype=torch.float64, device=weights.device)
        u = uniforms.to(weights.device) * block_cdf[:, -1:]
        block = torch.searchsorted(block_cdf, u, right=True).clamp(max=sums.shape[1] - 1)
        # the block's last non-empty one when rounding put u at or past the end
        block = torch.where(sums.gather(1, block) > 0, block, (block_cdf < block_cdf[:, -1:]).sum(-1, keepdim=True))
        u = u - (block_cdf.gather(1, block) - sums.gather(1, block))
        index = block * cls.BLOCK + torch.arange(cls.BLOCK, device=weights.device)  # [rows, BLOCK]
        inside = index < vocab
        inner = weights.gather(0, index.clamp(max=vocab - 1).T).T
        cdf = inner.masked_fill(~inside, 0.0).cumsum(-1, dtype=torch.float64)
        total = cdf[:, -1:]
        u = torch.minimum(u.clamp(min=0.0), torch.nextafter(total, torch.zeros_like(total)))
        offset = torch.searchsorted(cdf, u, right=True).clamp(max=cls.BLOCK - 1)
        return (block * cls.BLOCK + offset).squeeze(-1), block_cdf[:, -1]

    def _outside_top_p(self, weights: Tensor) -> Tensor:
        """Tokens outside the top-p nucleus of each column of unnormalised probabilities [V, rows]
        (transformers' `TopPLogitsWarper`: at least one token is kept)."""
        sorted_w, order = torch.sort(weights, dim=0)
        remove = (sorted_w / sorted_w.sum(0)).cumsum(0) <= (1 - self.top_p)
        remove[-1:] = False
        return remove.scatter(0, order, remove)


def column_max(values: Tensor) -> Tensor:
    """`values.amax(0)` for [V, rows]: as the maximum of 64 slabs' maxima, which reduces over whole rows where
    `amax(0)` strides through one column at a time (35x faster at [49152, 16] on a CPU; a maximum is exact in
    any order)."""
    whole = values.shape[0] // 64 * 64
    if whole == 0:
        return values.amax(0)
    top = values[:whole].view(64, -1, values.shape[1]).amax(0).amax(0)
    return top if whole == values.shape[0] else torch.maximum(top, values[whole:].amax(0))


class StopStrings:
    """Which rows' generated text contains a stop string (only the last few tokens are decoded per check)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.window = max(len(s) for s in stops) + 4
        """Tokens decoded per check: a stop string spans at most one token per character (plus partial bytes)."""

    def hit(self, generated: Tensor, rows: Sequence[int]) -> list[int]:
        """The `rows` of `generated` [rows, tokens] whose last tokens now contain a stop string."""
        return [row for row in rows
                if any(s in self.tokenizer.decode(generated[row, -self.window:]) for s in self.stops)]


class StopCriteria:
    """transformers `StoppingCriteria` over `StopStrings`; records how many tokens each stopped row had."""

    def __init__(self, stops: StopStrings, prompt_width: int, rows: int) -> None:
        self.stops, self.prompt_width = stops, prompt_width
        self.stopped_at = torch.zeros(rows, dtype=torch.long)

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        generated = input_ids[:, self.prompt_width:]
        for row in self.stops.hit(generated, (self.stopped_at == 0).nonzero().flatten().tolist()):
            self.stopped_at[row] = generated.shape[1]
        return (self.stopped_at > 0).to(input_ids.device)


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a buffer with room for the whole completion:
    a decode step writes its token's key and value in place, where `DynamicLayer` concatenates, which
    copies the layer's whole cache every step (45% of a SmolLM2 decode on a CPU). Attention sees the same
    values in the same shapes, so sampling is unchanged."""

    @classmethod
    def of(cls, layer: DynamicLayer, room: int) -> ReservedLayer:
        """`layer`'s cached keys and values, moved into buffers with `room` more positions."""
        reserved = cls()
        b, h, t, d = layer.keys.shape
        reserved.device, reserved.is_initialized, reserved.length = layer.device, True, t
        reserved.key_buffer = layer.keys.new_empty(b, h, t + room, d)
        reserved.value_buffer = layer.values.new_empty(b, h, t + room, layer.values.shape[-1])
        reserved.key_buffer[:, :, :t] = layer.keys
        reserved.value_buffer[:, :, :t] = layer.values
        reserved._expose()
        return reserved

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        new = key_states.shape[-2]
        if self.length + new > self.key_buffer.shape[-2]:
            raise RuntimeError("ReservedLayer: more positions than reserved")
        self.key_buffer[:, :, self.length:self.length + new] = key_states
        self.value_buffer[:, :, self.length:self.length + new] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._expose()


def reserve(cache: DynamicCache, room: int) -> None:
    """Give every plain layer of a prefilled `cache` room for `room` more positions (`ReservedLayer`);
    other layer kinds (sliding windows) keep growing by concatenation."""
    cache.layers = [ReservedLayer.of(layer, room) if type(layer) is DynamicLayer and layer.is_initialized else layer
                    for layer in cache.layers]


@torch.no_grad()
def decode(model: Any, head: torch.nn.Linear, input_ids: Tensor, mask: Tensor, sampler: Sampler,
           max_new_tokens: int, eos_ids: Sequence[int], stops: StopStrings | None) -> list[Completion]:
    """One completion of up to `max_new_tokens` tokens per left-padded row of `input_ids` (`mask` marks
    the real tokens), ending at its first EOS (kept) or stop string. Identical prompt rows are prefilled once;
    a finished row leaves the batch and the cache; decode steps run their `Linear` layers and LM head in the
    way `linears.decode_linears` measured fastest here, and for a Llama-family decoder through
    `step.DecodeStep` over a cache that holds each distinct prompt once (transformers' forward over the
    prompt's cache copied to each row for others)."""
    decoder = model.get_decoder()
    lean = step.supported(decoder)
    with decode_linears(model, head, max_new_tokens, step.groups(decoder) if lean else ()) as linears:
        def start(cache: DynamicCache, prompt_mask: Tensor, prompt_of: Tensor) -> Stepper:
            if lean:
                shared = SharedPromptCache([(layer.keys, layer.values) for layer in cache.layers], prompt_mask,
                                           prompt_of, max_new_tokens, step.attention_dtype(decoder))
                return step.DecodeStep(decoder, linears.groups, shared)
            return TransformersStep(decoder, cache, prompt_of, max_new_tokens)

        return _decode(decoder, start, head.weight.shape[0], linears.head_logits, input_ids, mask, sampler,
                       max_new_tokens, eos_ids, stops)


class Stepper(Protocol):
    """A decode step over the cache it holds: hidden [rows, H] for one new token per row at `position`
    (`mask` [rows, L]: the positions each row attends to, this token's included); `select` drops rows."""

    def __call__(self, token: Tensor, position: Tensor, mask: Tensor) -> Tensor: ...

    def select(self, keep: Tensor) -> None: ...


class TransformersStep:
    """transformers' decoder forward over the prefill `cache` copied to each row (`prompt_of`: the row's
    prefilled prompt), its layers given room for `room` more positions (`ReservedLayer`)."""

    def __init__(self, decoder: Any, cache: DynamicCache, prompt_of: Tensor, room: int) -> None:
        if not torch.equal(prompt_of, torch.arange(len(prompt_of), device=prompt_of.device)):
            cache.batch_select_indices(prompt_of)
        reserve(cache, room)
        self.decoder, self.cache = decoder, cache

    def select(self, keep: Tensor) -> None:
        self.cache.batch_select_indices(keep)

    def __call__(self, token: Tensor, position: Tensor, mask: Tensor) -> Tensor:
        return self.decoder(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                            past_key_values=self.cache, use_cache=True).last_hidden_state[:, -1]


def _decode(decoder: Any, start: Callable[[DynamicCache, Tensor, Tensor], Stepper], vocab: int,
            head_logits: Callable[[Tensor, Tensor], Tensor], input_ids: Tensor, mask: Tensor, sampler: Sampler,
            max_new_tokens: int, eos_ids: Sequence[int], stops: StopStrings | None) -> list[Completion]:
    rows = input_ids.shape[0]
    cache = DynamicCache(config=decoder.config)
    first, inverse = distinct_rows(input_ids, mask)
    positions = position_ids(mask)
    hidden = decoder(input_ids=input_ids[first], attention_mask=mask[first], position_ids=positions[first],
                     past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    forward = start(cache, mask[first], inverse)  # the cache is in `unique`'s order
    del cache  # the step holds what it needs of it
    hidden = hidden[inverse]
    tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long)
    logprobs = torch.zeros(rows, max_new_tokens)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long)
    reasons = ["length"] * rows
    eos = torch.tensor(list(eos_ids), dtype=torch.long)
    active = torch.arange(rows)  # the original rows still generating, in cache order
    position = positions[:, -1]
    buffer = torch.empty(vocab * rows, device=hidden.device)
    for step in range(max_new_tokens):
        # every row's uniform is drawn, finished or not, so the random stream is `generate`'s
        uniforms = torch.rand((rows, 1), dtype=torch.float64)[active] if sampler.temperature > 0 else None
        token = sampler.pick(head_logits(hidden, buffer), uniforms).cpu()
        tokens[active, step] = token
        logprobs[active, step] = sampler.logprobs[-1].cpu()
        done = torch.isin(token, eos)
        for row in active[done].tolist():
            reasons[row] = "eos"
        if stops is not None:
            hits = stops.hit(tokens[active, :step + 1], (~done).nonzero().flatten().tolist())
            for row in active[hits].tolist():
                reasons[row] = "stop"
            done[hits] = True
        lengths[active[done]] = step + 1
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            forward.select(keep.to(mask.device))
            active, token, mask, position = active[keep], token[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        position = position + 1
        hidden = forward(token.to(mask.device), position, mask)
    return [Completion(tokens[i, :lengths[i]].tolist(), logprobs[i, :lengths[i]].tolist(), reasons[i])
            for i in range(rows)]
