"""rlcore's rollout engines, update backends and placements, one package per engine or role.

    rollout/            the engine-agnostic `Engine` protocol and multi-turn tool driver
      hf/ vllm/ sglang/ one package per rollout engine (`--rollout NAME`)
    update/
      torch/ fsdp/ lora/ megatron/   one package per update backend (`--backend NAME`)
    placement/          where plugins run: `local` (this process) and `ray/` (Ray actors)
    common/             pieces every trainer or engine shares: logprobs, micro-batches, weights,
                        training options, export, LoRA adapters, images, worker processes
"""
