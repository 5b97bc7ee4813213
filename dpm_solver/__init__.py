"""Our DPM-Solver / DPM-Solver++ (Lu et al. 2022, arXiv:2206.00927 and arXiv:2211.01095).

Public interface (same names as the widely used reference interface)::

    ns = NoiseScheduleVP('discrete', betas=betas)
    model_fn = model_wrapper(model, ns, model_type='noise', model_kwargs={...})
    solver = DPM_Solver(model_fn, ns, algorithm_type='dpmsolver++')
    x0 = solver.sample(x_T, steps=20, order=2, skip_type='time_uniform', method='multistep')
    solver.nfe  # network evaluations used
"""

from .dpm_solver import DPM_Solver, phi
from .schedule import NoiseScheduleVP
from .wrapper import model_wrapper

__all__ = ["NoiseScheduleVP", "model_wrapper", "DPM_Solver", "phi"]
