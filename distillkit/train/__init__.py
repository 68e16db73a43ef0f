"""Training: the Accelerate loop and run checkpoints."""
