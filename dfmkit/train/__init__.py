"""Training: the loop, optimizer and schedule, EMA, checkpoints, logging and validation."""
