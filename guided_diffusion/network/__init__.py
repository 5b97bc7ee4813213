"""The networks: the MedSegDiff-style conditional UNet, its building blocks, and ADDPM's two auxiliary UNets."""
