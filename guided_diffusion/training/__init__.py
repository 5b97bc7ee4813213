"""Training: the one training core (loop, checkpoints, resume, budgets) and the tasks it trains (diffusion model, auxiliary networks)."""
