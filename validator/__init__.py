"""Validator service (see issue: Validator)."""
