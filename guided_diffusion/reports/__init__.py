"""Reports: the sampling and training benchmarks, the quickstart and the figures they draw."""
