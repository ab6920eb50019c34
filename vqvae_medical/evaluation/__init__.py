"""Evaluation of trained models: one sample-quality yardstick shared by every generative bundle."""
