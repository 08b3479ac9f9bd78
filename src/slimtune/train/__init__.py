"""Training: the loop, optimizers, schedules and checkpoints of `slimtune train`."""
