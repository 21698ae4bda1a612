"""Trains the deep restoration networks (its own issue; not yet built)."""
