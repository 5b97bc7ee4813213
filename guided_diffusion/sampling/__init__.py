"""Sampling: the samplers (DDPM, DDIM, DPM-Solver(++), ADDPM), ensembles and their fusion, the pipeline that writes prediction folders."""
