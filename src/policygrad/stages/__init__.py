"""Stages around RL, each a small module reusing the trainer's run folder, checkpoints, logging and
resume: reward models from preference pairs, and the pairs themselves."""
