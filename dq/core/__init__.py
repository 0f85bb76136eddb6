"""Shared machinery of every step: errors, atomic io, data paths, registries, runtime, checkpoints, torchrun, figures."""
