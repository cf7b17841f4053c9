"""Training: configuration, optimiser, the shared train/eval step, jit/pmap placement, checkpoints."""
