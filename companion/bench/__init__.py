"""Benchmarks that print the figures README cites: speed, quality, modes, assign."""
