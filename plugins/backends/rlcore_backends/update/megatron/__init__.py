"""`--backend megatron`: Megatron-core tensor and pipeline parallelism."""
