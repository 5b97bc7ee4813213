"""Schedules shared by the dpm_solver tests (session-scoped: immutable, and cheap to share)."""
import numpy as np
import pytest
import torch

from dpm_solver import NoiseScheduleVP


@pytest.fixture(scope="session")
def linear_ns():
    return NoiseScheduleVP("linear", continuous_beta_0=0.1, continuous_beta_1=20.0)


@pytest.fixture(scope="session")
def betas():
    return np.linspace(1e-4, 0.02, 1000, dtype=np.float64)


@pytest.fixture(scope="session")
def discrete_ns(betas):
    return NoiseScheduleVP("discrete", betas=torch.tensor(betas))
