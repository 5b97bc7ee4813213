"""MedSegDiff-style conditional diffusion for medical image segmentation."""
