"""`--rollout hf`: Hugging Face transformers models with the KV cache (the CPU default)."""
