"""`--backend torch`: single-process PyTorch training."""
