"""Small, seeded inputs for testing one hook alone on a CPU: batches, prompts and a tiny model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from rlcore.types import Prompt, RolloutBatch


def make_prompts(count: int = 2, answer: str = "7") -> list[Prompt]:
    """`count` simple prompts whose expected answer is `answer`."""
    return [Prompt(messages=[{"role": "user", "content": f"3+{i}="}], answer=answer, id=str(i)) for i in range(count)]


def make_batch(
    groups: int = 2,
    n: int = 4,
    prompt_len: int = 5,
    response_len: int = 6,
    vocab: int = 16,
    rewards: Sequence[float] | torch.Tensor | None = None,
    lengths: Sequence[int] | None = None,
    seed: int = 0,
    with_advantages: bool = False,
) -> RolloutBatch:
    """A random but well-formed RolloutBatch: `groups` prompts x `n` responses of varied length.

    Response i has `lengths[i]` real tokens (default: random in 1..response_len); padding follows
    the layout documented on RolloutBatch (prompts left-padded, responses right-padded).
    """
    g = torch.Generator().manual_seed(seed)
    B = groups * n
    if lengths is None:
        lengths = torch.randint(1, response_len + 1, (B,), generator=g).tolist()
    lens = torch.as_tensor(lengths, dtype=torch.long)
    cols = torch.arange(response_len)
    attn = (cols[None, :] < lens[:, None]).long()
    plens = torch.randint(1, prompt_len + 1, (B,), generator=g)
    pmask = (torch.arange(prompt_len)[None, :] >= (prompt_len - plens)[:, None]).long()
    prompt_ids = torch.randint(3, vocab, (B, prompt_len), generator=g) * pmask
    response_ids = torch.randint(3, vocab, (B, response_len), generator=g) * attn
    logp = -torch.rand(B, response_len, generator=g) * 3 * attn
    if rewards is None:
        rewards = torch.randint(0, 2, (B,), generator=g).float()
    prompts = [Prompt(messages=[{"role": "user", "content": f"q{i // n}"}], answer="1", id=str(i // n)) for i in range(B)]
    batch = RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=pmask, response_ids=response_ids, response_mask=attn.float(),
        attention_mask=attn, rollout_logprobs=logp, group_ids=torch.arange(groups).repeat_interleave(n),
        prompts=prompts, texts=["x" * int(x) for x in lens], truncated=lens >= response_len,
        rewards=torch.as_tensor(rewards, dtype=torch.float32), info=[{} for _ in range(B)],
    )
    if with_advantages:
        batch.advantages = torch.randn(B, response_len, generator=g) * attn
    return batch


def tiny_model_dir(directory: Path, seed: int = 0) -> Path:
    """Build the embedded tiny Qwen2 model + character tokenizer into `directory` (offline, seeded)."""
    from rlcore.models import build_tiny_model

    return build_tiny_model(directory, seed=seed)
