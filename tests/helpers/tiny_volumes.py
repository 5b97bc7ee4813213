"""The tiny NIfTI volumes of tests/volumes: their grid and voxel size (the generator's anisotropic default)."""
SHAPE = (24, 20, 12)
SPACING = (1.0, 1.2, 2.5)
