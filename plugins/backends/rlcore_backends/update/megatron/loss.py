"""Per-token logprobs and entropy from tensor-parallel (vocabulary-sharded) logits, without gathering them.

Each tensor-parallel rank holds the logits of a contiguous slice of the vocabulary. The log-partition
function, the logit of the sampled token and the entropy's sum over the vocabulary are each a sum of
per-shard terms, combined with one all-reduce (max, then sums). The sums use Megatron's
`reduce_from_tensor_model_parallel_region` (all-reduce forward, identity backward), the right gradient
because every rank then computes the same loss from the reduced values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def vocab_parallel_logprobs(logits: Tensor, tokens: Tensor, vocab_start: int, group: dist.ProcessGroup | None,
                            entropy_grad: bool = True) -> tuple[Tensor, Tensor]:
    """(logprob of `tokens`, entropy), each [..], from this rank's logits [.., V_shard] over vocabulary ids
    [vocab_start, vocab_start + V_shard); equal to the full-vocabulary log_softmax and entropy. The entropy
    carries a gradient only with `entropy_grad`."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region as reduce

    shift = logits.detach().max(-1).values
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    z = logits - shift.unsqueeze(-1)
    exp = z.exp()
    partition = reduce(exp.sum(-1), group)
    local = tokens - vocab_start
    here = (local >= 0) & (local < logits.shape[-1])
    picked = z.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * here
    log_partition = partition.log()
    logprobs = reduce(picked, group) - log_partition
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = log_partition - reduce((exp * z).sum(-1), group) / partition
    return logprobs, entropy
