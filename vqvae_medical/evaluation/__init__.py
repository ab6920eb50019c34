"""Evaluation and its outputs: losses, metrics, sample diversity and quality, figures, writers."""
