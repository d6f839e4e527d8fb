"""Importance scores and pruning."""
