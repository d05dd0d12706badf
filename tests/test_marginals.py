"""The diffusion sub-step is the exact forward transition s → t' on every path: Gaussian data noised to t, stepped
with an oracle model (x̂0 and ε̂ exact, so x_s is the data noised to s), lands on the data noised to t'.
Mean and covariance are checked within 4 standard errors over 200k samples."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tcd_sampler import FlowMatchTCDScheduler, TCDScheduler, sample_tcd

N = 200_000
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.3], [0.3, 1.0]], dtype=torch.float64)


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = MU + torch.randn(N, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV).T
    return x0, torch.randn(N, 2, generator=g, dtype=torch.float64)


def assert_marginal(x: torch.Tensor, alpha: float, sigma: float) -> None:
    """x ~ N(α·μ, α²·Σ + σ²·I) within 4 standard errors, entry by entry."""
    mean, cov = alpha * MU, alpha**2 * COV + sigma**2 * torch.eye(2, dtype=torch.float64)
    got_mean, got_cov = x.mean(0), torch.cov(x.T)
    se_mean = (cov.diagonal() / N).sqrt()
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / N).sqrt()
    assert ((got_mean - mean).abs() <= 4 * se_mean).all(), (got_mean, mean)
    assert ((got_cov - cov).abs() <= 4 * se_cov).all(), (got_cov, cov)


@pytest.mark.parametrize(("t", "t_next"), [(999, 759), (759, 259), (499, 90), (259, 139)])
@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.0])
def test_vp_discrete(t: int, t_next: int, gamma: float) -> None:
    sched = TCDScheduler()
    sched.set_timesteps(timesteps=[t, t_next, 0])
    acp = sched.alphas_cumprod.double()
    x0, eps = data(t + t_next)
    x_t = acp[t].sqrt() * x0 + (1 - acp[t]).sqrt() * eps
    out = sched.step(eps, t, x_t, eta=gamma, generator=torch.Generator().manual_seed(1))
    s = sched.step_table(gamma, torch.float64).rows[0].s
    assert_marginal(out.pred_noised_sample, acp[s].sqrt().item(), (1 - acp[s]).sqrt().item())
    assert_marginal(out.prev_sample, acp[t_next].sqrt().item(), (1 - acp[t_next]).sqrt().item())


def oracle(x0: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, sigma: x0


@pytest.mark.parametrize(("sigma", "sigma_next"), [(14.6, 3.0), (3.0, 0.5), (1.0, 0.9), (0.5, 0.05)])
@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.0])
def test_ve(sigma: float, sigma_next: float, gamma: float) -> None:
    x0, eps = data(int(sigma * 100))
    sigmas = torch.tensor([sigma, sigma_next], dtype=torch.float64)
    out = sample_tcd(oracle(x0), x0 + sigma * eps, sigmas, gamma=gamma, seed=2, disable=True)
    assert_marginal(out, 1.0, sigma_next)


@pytest.mark.parametrize(("sigma", "sigma_next"), [(1.0, 0.7), (0.9, 0.5), (0.5, 0.2), (0.3, 0.05)])
@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.0])
def test_flow(sigma: float, sigma_next: float, gamma: float) -> None:
    sched = FlowMatchTCDScheduler(gamma=gamma)
    sched.set_timesteps(sigmas=[sigma, sigma_next, 0.01])
    x0, eps = data(int(sigma * 1000))
    x_t = (1 - sigma) * x0 + sigma * eps
    out = sched.step(eps - x0, sched.timesteps[0], x_t, generator=torch.Generator().manual_seed(3))
    assert_marginal(out.prev_sample, 1 - sigma_next, sigma_next)
    s = (1 - gamma) * sigma_next
    assert_marginal(out.pred_noised_sample, 1 - s, s)


def test_the_check_can_fail() -> None:
    """Sanity: the same check rejects a wrong noise scale (here, the sub-step without the α ratio)."""
    x0, eps = data(0)
    wrong = 0.9 * x0 + 0.5 * eps
    with pytest.raises(AssertionError):
        assert_marginal(wrong, 0.9, 0.45)
