"""Data sets: listing image/mask pairs in each layout, splits, loading and joint augmentation, the built-in synthetic set."""
