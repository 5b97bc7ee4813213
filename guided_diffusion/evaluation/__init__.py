"""Evaluation: per-image segmentation metrics and the scoring of a prediction folder against ground truth."""
