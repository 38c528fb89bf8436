"""Factorisation methods and what acts on their factors: decompose, materialise, update."""
