"""Readers for checkpoints of other diffusion code bases, loaded without executing code from the file."""
