"""The reference problem of the dpm_solver tests: Gaussian data x0 ~ N(mu, diag(s^2)), float64 throughout.

The exact noise prediction is
    eps*(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)
and the exact probability-flow map from time T to t is
    x_t = alpha_t mu + sqrt(v_t / v_T) (x_T - alpha_T mu),  v = alpha^2 s^2 + sigma^2.
"""
import torch


F64 = torch.float64


class Gaussian:
    """x0 ~ N(mu, diag(s^2)) under a given VP schedule."""

    def __init__(self, ns, mu=(1.0, -0.5, 0.3, 2.0), s=(0.1, 0.5, 1.0, 2.0)):
        self.ns = ns
        self.mu = torch.tensor(mu, dtype=F64)
        self.s = torch.tensor(s, dtype=F64)

    def _coefs(self, t, like):
        t = torch.as_tensor(t, dtype=F64)
        a = self.ns.marginal_alpha(t).reshape(-1, 1).to(like)
        sg = self.ns.marginal_std(t).reshape(-1, 1).to(like)
        return a, sg

    def eps(self, x, t):
        a, sg = self._coefs(t, x)
        mu, s = self.mu.to(x), self.s.to(x)
        return sg * (x - a * mu) / (a**2 * s**2 + sg**2)

    def x0_mean(self, x, t):  # E[x0 | x_t]
        a, sg = self._coefs(t, x)
        return (x - sg * self.eps(x, t)) / a

    def exact(self, x_T, t_T, t):
        a_T, s_T = self._coefs(torch.tensor([t_T], dtype=F64), x_T)
        a, sg = self._coefs(torch.tensor([t], dtype=F64), x_T)
        v_T = a_T**2 * self.s**2 + s_T**2
        v = a**2 * self.s**2 + sg**2
        return a * self.mu + torch.sqrt(v / v_T) * (x_T - a_T * self.mu)


def noise(shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)
