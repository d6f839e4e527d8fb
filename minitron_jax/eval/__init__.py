"""Evaluation: held-out loss, multiple choice, parity with transformers."""
