"""How the hf rollout's decode steps compute the decoder's float32 `Linear` layers and the LM head on a CPU.

A decode step multiplies a few rows by every weight, and which GEMM does that fastest depends on the
machine. Three ways compute the same product (to float32 rounding): `Linear`'s own x @ W.T; W @ x.T, rows
padded to a multiple of 8 (`skinny`); and oneDNN's linear over weights reordered once into its blocked
layout (`packed`, what inductor's CPU freezing uses), which costs a copy of the weights per `decode` call.
`timing` measures each over all of the model's layers in turn, as a decode step streams their weights from
memory, once per process and model shape; `Timing.fastest` picks one for a decode of a given length.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DECODE_ROWS = 32
"""Calls of at most this many rows (tokens) take the chosen way, as decode steps are (and a prefill that
short); larger ones take `Linear`'s."""
PROBE_ROWS = (4, 13, 16)
"""Decode row counts at which `timing` times the ways (13 rows: an odd count, which some GEMM kernels handle
much worse than a multiple of 8)."""
PACK_ROWS = 16
"""The row count oneDNN's reorder tunes the packed layout for (any count computes correctly)."""
GAIN = 1.1
"""How much faster than the baseline another way must be to be chosen."""


def _linear(layer: torch.nn.Linear, packed: Tensor | None, x: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, layer.weight, layer.bias)


def _skinny(layer: torch.nn.Linear, packed: Tensor | None, x: Tensor) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    padded = -(-count // 8) * 8  # whole blocks of 8 rows: odd counts hit slow kernels
    if padded != count:
        rows = torch.cat([rows, rows.new_zeros(padded - count, rows.shape[1])])
    out = torch.mm(layer.weight, rows.T)[:, :count].T.contiguous()
    if layer.bias is not None:
        out += layer.bias
    return out.view(*x.shape[:-1], out.shape[-1])


def _packed(layer: torch.nn.Linear, packed: Tensor | None, x: Tensor) -> Tensor:
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, layer.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


BODY: dict[str, Callable[[torch.nn.Linear, Tensor | None, Tensor], Tensor]] = {
    "linear": _linear, "skinny": _skinny, "packed": _packed}
"""The decoder layers' ways: (layer, its packed weight or None, x [..., in]) -> [..., out]."""


def _head_skinny(head: torch.nn.Linear, packed: Tensor | None, hidden: Tensor, out: Tensor) -> Tensor:
    vocab = head.weight.shape[0]
    logits = torch.mm(head.weight, hidden.T, out=out[:vocab * len(hidden)].view(vocab, -1))
    return logits if head.bias is None else logits.add_(head.bias[:, None])


def _head_packed(head: torch.nn.Linear, packed: Tensor | None, hidden: Tensor, out: Tensor) -> Tensor:
    logits = torch.ops.mkldnn._linear_pointwise(hidden, packed, head.bias, "none", [], "")  # a fresh [rows, V]
    return out[:logits.numel()].view(logits.shape[1], -1).copy_(logits.T)


def _head_other(head: torch.nn.Linear, hidden: Tensor, out: Tensor) -> Tensor:
    if head.weight.dtype == torch.float32:  # a GPU's float32 head: W @ h.T into `out` as well
        return _head_skinny(head, None, hidden, out)
    logits = torch.mm(head.weight, hidden.to(head.weight.dtype).T).float()
    return logits if head.bias is None else logits.add_(head.bias.float()[:, None])


HEAD: dict[str, Callable[[torch.nn.Linear, Tensor | None, Tensor, Tensor], Tensor]] = {
    "skinny": _head_skinny, "packed": _head_packed}
"""The LM head's ways: (head, its packed weight or None, hidden [rows, H], out) -> logits [V, rows] in `out`,
vocabulary-major as the `Sampler` takes them (W @ h.T ran ~1.4x faster than h @ W.T there, so it is the
head's baseline)."""


def pack(weight: Tensor) -> Tensor | None:
    """`weight` reordered into oneDNN's blocked layout for `packed`, or None where this torch cannot."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
    except (AttributeError, RuntimeError):
        return None


@dataclass(frozen=True)
class Timing:
    """Seconds of one decode step's pass over a set of layers in each way, and of packing their weights."""

    step: dict[str, float]
    pack: float

    def fastest(self, steps: int, baseline: str, packable: bool = True) -> str:
        """The way of least time over `steps` decode steps, packing counted once (and left out unless
        `packable`); `baseline` unless another saves `GAIN`."""
        total = {way: seconds * steps + (self.pack if way == "packed" else 0.0) for way, seconds in self.step.items()
                 if packable or way != "packed"}
        best = min(total, key=total.__getitem__)
        return best if total[baseline] >= GAIN * total[best] else baseline


_TIMINGS: dict[tuple[Any, ...], Timing] = {}


def timing(layers: Sequence[torch.nn.Linear], head: bool = False) -> Timing:
    """Each way's seconds per decode step over all of `layers` in turn (the LM head's ways with `head`), the
    best of 2 runs after a warm-up at each of `PROBE_ROWS`; measured once per process and set of layers'
    shapes and thread count. `packed` is left out where oneDNN cannot run here or memory is short
    (`room_to_pack`; timed again once there is room)."""
    room = room_to_pack(layers)
    key = (head, tuple(sorted(tuple(layer.weight.shape) for layer in layers)), torch.get_num_threads(), room)
    if key in _TIMINGS:
        return _TIMINGS[key]
    generator = torch.Generator().manual_seed(0)
    inputs = {(layer.weight.shape[1], rows): torch.randn(rows, layer.weight.shape[1], generator=generator)
              for layer in layers for rows in PROBE_ROWS}
    start = time.perf_counter()
    packed = [pack(layer.weight) if room else None for layer in layers]
    pack_seconds = time.perf_counter() - start
    ways: dict[str, Callable[..., Tensor]] = dict(HEAD if head else BODY)
    out = (torch.empty(max(layer.weight.shape[0] for layer in layers) * max(PROBE_ROWS)),) if head else ()

    def seconds(forward: Callable[..., Tensor]) -> float:
        runs = []
        for _ in range(3):  # the first is a warm-up
            start = time.perf_counter()
            for rows in PROBE_ROWS:
                for layer, weight in zip(layers, packed):
                    forward(layer, weight, inputs[layer.weight.shape[1], rows], *out)
            runs.append(time.perf_counter() - start)
        return min(runs[1:]) / len(PROBE_ROWS)

    step = {}
    with torch.no_grad():
        for way, forward in ways.items():
            if way == "packed" and any(weight is None for weight in packed):
                continue
            try:
                step[way] = seconds(forward)
            except RuntimeError:  # a oneDNN build that reorders but cannot run this linear
                if way != "packed":
                    raise
    _TIMINGS[key] = Timing(step, pack_seconds)
    return _TIMINGS[key]


def available_bytes() -> int | None:
    """Memory this process can still take: Linux's MemAvailable, or less where the container's memory cgroup
    (v2 or v1, as mounted at /sys/fs/cgroup) leaves less; None where none of them can be read."""
    free = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free += [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    root = Path("/sys/fs/cgroup")
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            free.append(int((root / limit).read_text()) - int((root / usage).read_text()))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return min(free) if free else None


def room_to_pack(layers: Sequence[torch.nn.Linear]) -> bool:
    """Whether a packed copy of `layers`' weights takes at most half the memory still available."""
    free = available_bytes()
    return free is None or 2 * sum(layer.weight.nbytes for layer in layers) <= free


def choose(layers: Sequence[torch.nn.Linear], steps: int, head: bool = False, packable: bool = True) -> str:
    """The way `layers` (the LM head with `head`) compute a decode of `steps` steps here (packed weights only
    where `packable`)."""
    return timing(layers, head).fastest(steps, "skinny" if head else "linear", packable)


def _decode_call(forward: Callable[..., Tensor], layer: torch.nn.Linear, packed: Tensor | None, x: Tensor
                 ) -> Tensor:
    if x.numel() > DECODE_ROWS * x.shape[-1]:
        return _linear(layer, packed, x)
    return forward(layer, packed, x)


def _head_call(forward: Callable[..., Tensor], head: torch.nn.Linear, packed: Tensor | None, hidden: Tensor,
               out: Tensor) -> Tensor:
    return forward(head, packed, hidden, out) if len(hidden) <= DECODE_ROWS else _head_skinny(head, None, hidden, out)


def _plain_cpu(layer: Any) -> bool:
    """A float32 CPU `Linear` with its class's own forward (one set on the instance, a hook's, is left alone)."""
    return (type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
            and layer.weight.device.type == "cpu" and "forward" not in vars(layer))


def ways(model: Any, head: torch.nn.Linear, steps: int) -> tuple[list[torch.nn.Linear], str, str | None]:
    """The decoder's float32 CPU `Linear` layers, the way `choose` picks for them over `steps` steps, and the
    LM head's (None where the head is not a float32 CPU `Linear`); packed weights only where the layers' and
    the head's copies together leave `room_to_pack`."""
    layers = [layer for layer in model.get_decoder().modules() if _plain_cpu(layer)]
    plain_head = _plain_cpu(head)
    packable = room_to_pack(layers + [head] if plain_head else layers)
    return (layers, choose(layers, steps, packable=packable) if layers else "linear",
            choose([head], steps, head=True, packable=packable) if plain_head else None)


def _group_call(layers: Sequence[torch.nn.Linear], packed: Tensor | None, bias: Tensor | None, x: Tensor
                ) -> tuple[Tensor, ...]:
    if packed is None or x.numel() > DECODE_ROWS * x.shape[-1]:
        return tuple(layer(x) for layer in layers)
    out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out.split([layer.weight.shape[0] for layer in layers], -1)


def _pack_group(layers: Sequence[torch.nn.Linear]) -> tuple[Tensor | None, Tensor | None]:
    """The group's weights packed as one (None where packing fails), and their biases as one (zeros for a layer
    without; None where none has one)."""
    try:
        packed = pack(torch.cat([layer.weight for layer in layers]))
    except RuntimeError:  # no memory for the concatenation
        return None, None
    if all(layer.bias is None for layer in layers):
        return packed, None
    return packed, torch.cat([layer.weight.new_zeros(layer.weight.shape[0]) if layer.bias is None else layer.bias
                              for layer in layers])


@dataclass(frozen=True)
class DecodeLinears:
    """What `decode_linears` yields: the LM head's function (hidden [rows, H], out) -> logits [V, rows], and
    one function per group given, x [rows, in] -> each of the group's layers' outputs."""

    head_logits: Callable[[Tensor, Tensor], Tensor]
    groups: list[Callable[[Tensor], tuple[Tensor, ...]]]


@contextlib.contextmanager
def decode_linears(model: Any, head: torch.nn.Linear, steps: int,
                   groups: Sequence[Sequence[torch.nn.Linear]] = ()) -> Iterator[DecodeLinears]:
    """While inside, the decoder's float32 CPU `Linear` layers compute calls of at most `DECODE_ROWS` rows in
    the way `ways` picks for `steps` steps (weights packed on entry where that is `packed`). `groups` are sets
    of layers that take the same input (a decoder layer's q, k and v projections): where the way is `packed`
    and all of a set are float32 CPU `Linear`s, their weights are packed together and a decode-sized call is
    one wider GEMM instead of several; otherwise its layers compute one by one. The LM head's function writes
    its float32 logits into `out` when the head is a float32 `Linear`. Other calls and layer kinds
    (`MatchedLinear`) compute as before; leaving restores every layer."""
    layers, way, head_way = ways(model, head, steps)
    fused = [way == "packed" and all(_plain_cpu(layer) and not (layer._forward_hooks or layer._forward_pre_hooks)
                                     for layer in group) for group in groups]  # a fused GEMM runs no hooks
    members = {id(layer) for group, together in zip(groups, fused) if together for layer in group}
    alone = [layer for layer in layers if id(layer) not in members]
    weights = [pack(layer.weight) if way == "packed" else None for layer in alone]
    group_weights = [_pack_group(group) if together else (None, None) for group, together in zip(groups, fused)]
    if way == "packed" and (any(weight is None for weight in weights) or any(
            together and weight is None for together, (weight, _) in zip(fused, group_weights))):
        way, weights, group_weights = "linear", [], [(None, None)] * len(groups)  # packing failed (memory)
    head_weight = pack(head.weight) if head_way == "packed" else None
    if head_way == "packed" and head_weight is None:
        head_way = "skinny"
    patched = [] if way == "linear" else alone
    try:
        for layer, weight in zip(patched, weights):
            layer.forward = functools.partial(_decode_call, BODY[way], layer, weight)
        head_logits = (functools.partial(_head_other, head) if head_way is None
                       else functools.partial(_head_call, HEAD[head_way], head, head_weight))
        yield DecodeLinears(head_logits, [functools.partial(_group_call, group, weight, bias)
                                          for group, (weight, bias) in zip(groups, group_weights)])
    finally:
        for layer in patched:
            vars(layer).pop("forward", None)
