"""Gaussian diffusion over masks: noise schedules, the forward process, posteriors, losses and reverse steps."""
