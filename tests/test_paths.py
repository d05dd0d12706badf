"""Paths are one class each: the EDM path (Karras et al. 2022; Playground v2.5, SVD, ComfyUI's continuous EDM model
sampling) runs ``sample_tcd`` with a TCD time in which ``s ≤ t'`` always holds, γ = 0 is the Euler sampler and γ = 1
LCM's sampler on it, and its denoiser reads an EDM network as ComfyUI and diffusers do."""

from __future__ import annotations

import math

import pytest
import torch

from tcd_sampler import EDM, VE, sample_tcd
from tcd_sampler.core.table import build_table

SIGMA_DATA = 0.5


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al.'s schedule (Playground v2.5's range), ending at 0, as k-diffusion's get_sigmas_karras."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).float()


def edm_network() -> torch.nn.Module:
    """A tiny random EDM network F(c_in·x, c_noise) (the time enters as a bias)."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.conv(x) + c_noise.reshape(-1, 1, 1, 1))

    return Net()


def euler(denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """k-diffusion's / ComfyUI's sample_euler without churn: d = (x − D)/σ, x ← x + d·(σ' − σ)."""
    for i in range(len(sigmas) - 1):
        d = (x - denoiser(x, sigmas[i] * x.new_ones(x.shape[0]))) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def lcm(denoiser, x: torch.Tensor, sigmas: torch.Tensor, noises: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """ComfyUI's sample_lcm on a VE path: x ← D, then x ← D + σ'·z while σ' > 0."""
    for i in range(len(sigmas) - 1):
        x = denoiser(x, sigmas[i] * x.new_ones(x.shape[0]))
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noises[i]
    return x


@torch.no_grad()
def test_gamma_0_is_euler_and_gamma_1_is_lcm_on_an_edm_model() -> None:
    denoiser = EDM(sigma_data=SIGMA_DATA).denoiser(edm_network())
    sigmas = karras_sigmas(6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    ours = sample_tcd(denoiser, x, sigmas, gamma=0.0, path=EDM(), disable=True)
    torch.testing.assert_close(ours, euler(denoiser, x, sigmas), rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(x.shape, generator=g) for _ in range(len(sigmas) - 1)]
    replay = iter(noises)
    ours = sample_tcd(denoiser, x, sigmas, gamma=1.0, path=EDM(), disable=True, noise_sampler=lambda s, n: next(replay))
    torch.testing.assert_close(ours, lcm(denoiser, x, sigmas, noises), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_the_edm_target_never_lies_above_the_next_sigma(gamma: float) -> None:
    """s = (1 − γ)·σ' ≤ σ' at every step, so the renoising variance σ'² − σ_s² is never negative."""
    sigmas = karras_sigmas(8).double().numpy()
    table = build_table(EDM(), sigmas, gamma)
    for row in table.rows:
        assert 0.0 <= row.s <= row.t_prev
        assert row.noise**2 == pytest.approx(max(row.t_prev**2 - row.s**2, 0.0), rel=1e-9, abs=1e-12)


@torch.no_grad()
def test_mid_gamma_on_an_edm_model_stays_finite_and_seeded() -> None:
    denoiser = EDM(sigma_data=SIGMA_DATA).denoiser(edm_network())
    sigmas = karras_sigmas(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    a = sample_tcd(denoiser, x, sigmas, gamma=0.3, path=EDM(), seed=7, disable=True)
    b = sample_tcd(denoiser, x, sigmas, gamma=0.3, path=EDM(), seed=7, disable=True)
    assert torch.isfinite(a).all() and torch.equal(a, b)


class LogSigmaTime:
    """An EDM network's own time c_noise = ¼·ln σ, which is negative below σ = 1."""

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.clamp(min=1e-30).log() / 4

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return (4 * t).exp()


def test_a_log_sigma_time_is_refused_not_turned_into_nan() -> None:
    """The bug of sigma-space ports: with a negative time (1 − γ)·t' lies above t'; we refuse it, naming the fix."""
    sigmas = karras_sigmas(6)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"lies above its next time.*path=EDM"):
        sample_tcd(lambda y, s: y, x, sigmas, gamma=0.3, time=LogSigmaTime(), disable=True)
    with pytest.raises(ValueError, match="time or path, not both"):
        sample_tcd(lambda y, s: y, x, sigmas, gamma=0.3, time=LogSigmaTime(), path=VE(), disable=True)


@pytest.mark.parametrize(("prediction_type", "sign"), [("edm", 1.0), ("v_prediction", -1.0)])
def test_the_edm_denoiser_reads_the_network_as_comfyui_and_diffusers(prediction_type: str, sign: float) -> None:
    """D = c_skip·x ± c_out·F(c_in·x, ¼·ln σ) with c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ² + σ_d²) (ComfyUI's
    EDM / V_PREDICTION, diffusers' EDMEulerScheduler 'epsilon' / 'v_prediction'); 'epsilon' is D = x − σ·F."""
    net = edm_network()
    sigma = torch.tensor([80.0, 1.0, 0.01], dtype=torch.float64)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s = sigma.reshape(-1, 1, 1, 1)
    c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
    c_skip, c_out = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2), s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
    with torch.no_grad():
        f = net.double()(x * c_in, sigma.log() / 4)
        got = EDM(sigma_data=SIGMA_DATA).denoiser(net, prediction_type)(x, sigma)
        torch.testing.assert_close(got, c_skip * x + sign * c_out * f, rtol=1e-10, atol=1e-10)
        eps = EDM(sigma_data=SIGMA_DATA).denoiser(net, "epsilon")(x, sigma)
        torch.testing.assert_close(eps, x - s * f, rtol=1e-10, atol=1e-10)


def test_an_exact_edm_denoiser_recovers_the_data_at_every_sigma() -> None:
    """A network that outputs the 'edm' target of known (x0, ε) gives back x0 through the wrapper."""
    x0 = torch.randn(2, 3, dtype=torch.float64) * SIGMA_DATA
    eps = torch.randn(2, 3, dtype=torch.float64)
    for sigma in (0.002, 0.5, 3.0, 80.0):
        x = x0 + sigma * eps
        norm = math.sqrt(sigma**2 + SIGMA_DATA**2)
        a, s = SIGMA_DATA / norm, sigma / norm  # the unit-variance path of x·c_in, in units of σ_d

        def network(x_in: torch.Tensor, c_noise: torch.Tensor, a: float = a, s: float = s) -> torch.Tensor:
            return s * (x0 / SIGMA_DATA) - a * eps  # Karras' F target: (x0/σ_d − a·x_in)/s

        got = EDM(sigma_data=SIGMA_DATA).denoiser(network)(x, torch.full((2,), sigma, dtype=torch.float64))
        torch.testing.assert_close(got, x0, rtol=1e-9, atol=1e-9)


def test_the_former_names_keep_their_signatures() -> None:
    """VPDiscretePath(betas, alphas_cumprod), alpha_sigma(dtype) and build_vp_table's (final, scaling) boundary."""
    from tcd_sampler import TCDScheduler, VPDiscretePath, build_vp_table
    from tcd_sampler.core.schedules import make_betas
    from tcd_sampler.core.table import Boundary

    betas = make_betas(1000, 0.00085, 0.012, "scaled_linear")
    acp = torch.cumprod(1.0 - betas, dim=0)
    old = VPDiscretePath(betas, acp)
    assert torch.equal(old.alphas_cumprod, acp) and torch.equal(VPDiscretePath.from_betas(betas).alphas_cumprod, acp)
    alpha, _ = old.alpha_sigma(torch.float32)
    assert alpha.dtype == torch.float32 and alpha.shape == (1000,)
    sched = TCDScheduler(consistency_boundary=True)
    sched.set_timesteps(4)
    t = [999, 759, 499, 259]
    assert (
        build_vp_table(acp, t, 1.0, (torch.tensor(1.0), 10.0)).rows == build_vp_table(acp, t, 1.0, Boundary(10.0)).rows
    )
    assert build_vp_table(acp, t, 1.0, (torch.tensor(1.0), 10.0)).rows == sched.step_table(1.0).rows


def test_a_sampler_refuses_a_path_of_the_other_kind() -> None:
    from tcd_sampler import DiscreteVPTime, RectifiedFlow, TCDScheduler, sample_tcd_rf

    sigmas = karras_sigmas(3)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="discrete path"):
        sample_tcd(lambda y, s: y, x, sigmas, path=DiscreteVPTime(TCDScheduler().alphas_cumprod), disable=True)
    with pytest.raises(ValueError, match="path of sample_tcd_rf"):
        sample_tcd(lambda y, s: y, x, sigmas, path=RectifiedFlow(), disable=True)
    with pytest.raises(ValueError, match="path of sample_tcd"):
        sample_tcd_rf(lambda y, s: y, x, torch.tensor([1.0, 0.5, 0.0]), path=EDM(), disable=True)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        sample_tcd(lambda y, s: y, [0.0], sigmas, path=EDM(), disable=True)  # type: ignore[arg-type]


def test_the_edm_denoiser_does_not_overflow_in_half_precision() -> None:
    """σ² at SVD's σ_max (700) overflows float16: the preconditioning is computed in float32."""
    net = edm_network()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([700.0])
    with torch.no_grad():
        full = EDM(sigma_data=1.0).denoiser(net, "v_prediction")(x * 700, sigma)
        half = EDM(sigma_data=1.0).denoiser(net.half(), "v_prediction")((x * 700).half(), sigma.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, rtol=2e-2, atol=2e-2)


def test_the_path_form_in_half_precision_computes_in_float32() -> None:
    from tcd_sampler import TCDScheduler, VPDiscrete, consistency_jump

    path = VPDiscrete(TCDScheduler().alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    m, x = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    t, s = torch.tensor([999, 759, 259, 19]), torch.tensor([531, 349, 13, 0])
    full = consistency_jump(m, x, t, s, path)
    half = consistency_jump(m.bfloat16(), x.bfloat16(), t, s, path)
    assert half.dtype == torch.bfloat16
    expected = consistency_jump(m.bfloat16().float(), x.bfloat16().float(), t, s, path).bfloat16()
    assert torch.equal(half, expected)  # rounded once, from float32
    torch.testing.assert_close(half.float(), full, rtol=2e-2, atol=5e-2)
    with pytest.raises(ValueError, match=r"EDM\.denoiser"):
        consistency_jump(m, x, t, s, path, "edm")
