"""Torch-free pieces every stage shares: option values, safe writing, scoring, seed statistics."""
