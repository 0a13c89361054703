"""`--rollout vllm`: the vLLM offline engine or an OpenAI-compatible vLLM server."""
