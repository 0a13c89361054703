"""`--backend fsdp`: FSDP2 over torch.distributed worker processes."""
