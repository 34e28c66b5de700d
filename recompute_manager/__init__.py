"""Recompute Manager service (see issue: Recompute Manager)."""
