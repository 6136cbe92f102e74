"""Fused in-place ops over seeded random directions (ZO-RNG v1, docs/rng.md)."""

from .perturb import flat_offsets, perturb_, sample

__all__ = ["flat_offsets", "perturb_", "sample"]
