"""Tests for dpm_solver.wrapper: model_wrapper's time input, learned-variance slicing, parametrisations, guidance."""
import pytest
import torch
from gaussian_reference import F64, Gaussian, noise

from dpm_solver import model_wrapper


def test_model_wrapper_discrete_time_input(discrete_ns):
    seen = []

    def model(x, t_input, **kw):
        seen.append(t_input.clone())
        assert kw == {"cond": "image"}
        return torch.zeros_like(x)

    fn = model_wrapper(model, discrete_ns, model_type="noise", model_kwargs={"cond": "image"})
    x = torch.zeros(3, 2, dtype=F64)
    fn(x, torch.full((3,), 1.0 / 1000, dtype=F64))
    fn(x, torch.full((3,), 1.0, dtype=F64))
    fn(x, torch.tensor(0.5005, dtype=F64))  # scalar t is expanded to the batch
    assert torch.allclose(seen[0], torch.zeros(3, dtype=F64), atol=1e-12)
    assert torch.allclose(seen[1], torch.full((3,), 999.0, dtype=F64), atol=1e-10)
    assert seen[2].shape == (3,) and torch.allclose(seen[2], torch.full((3,), 499.5, dtype=F64), atol=1e-9)


def test_model_wrapper_continuous_time_input(linear_ns):
    seen = []
    fn = model_wrapper(lambda x, t: (seen.append(t), torch.zeros_like(x))[1], linear_ns)
    fn(torch.zeros(2, 1), torch.tensor([0.25, 0.25]))
    assert torch.equal(seen[0], torch.tensor([0.25, 0.25]))


def test_model_wrapper_learned_variance_slicing(discrete_ns):
    g = Gaussian(discrete_ns)

    def model(x, t_input):
        t = (t_input + 1.0) / 1000
        return torch.cat([g.eps(x, t), 100.0 + torch.randn_like(x)], dim=1)  # [eps, var_values]

    fn = model_wrapper(model, discrete_ns)
    x = noise((5, 4))
    t = torch.full((5,), 0.37, dtype=F64)
    out = fn(x, t)
    assert out.shape == x.shape
    assert torch.allclose(out, g.eps(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_type", ["x_start", "v", "score"])
def test_model_wrapper_parametrisations(discrete_ns, model_type):
    g = Gaussian(discrete_ns)

    def model(x, t_input):
        t = (t_input + 1.0) / 1000  # the inverse of the documented time map
        a = discrete_ns.marginal_alpha(t).reshape(-1, 1)
        sg = discrete_ns.marginal_std(t).reshape(-1, 1)
        eps, x0 = g.eps(x, t), g.x0_mean(x, t)
        out = {"x_start": x0, "v": a * eps - sg * x0, "score": -eps / sg}[model_type]
        return torch.cat([out, out], dim=1)  # learned-variance layout on top

    fn = model_wrapper(model, discrete_ns, model_type=model_type)
    x = noise((6, 4), seed=1)
    for tv in (0.002, 0.3, 0.97):
        t = torch.full((6,), tv, dtype=F64)
        assert torch.allclose(fn(x, t), g.eps(x, t), rtol=1e-9, atol=1e-10), (model_type, tv)


def test_model_wrapper_classifier_free(linear_ns):
    def model(x, t, cond):
        return x * cond.reshape(-1, 1)

    fn = model_wrapper(model, linear_ns, guidance_type="classifier-free", condition=torch.full((2,), 3.0),
                       unconditional_condition=torch.full((2,), 1.0), guidance_scale=2.0)
    x = torch.ones(2, 3)
    assert torch.allclose(fn(x, torch.tensor([0.5, 0.5])), torch.full((2, 3), 1.0 + 2.0 * (3.0 - 1.0)))
