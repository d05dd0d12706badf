"""sample_tcd / sample_tcd_rf: k-diffusion's convention; with DiscreteVPTime they reproduce a TCDScheduler loop."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import rel_err, toy_model
from tcd_sampler import DiscreteVPTime, FlowMatchTCDScheduler, TCDScheduler, sample_tcd, sample_tcd_rf


class RecordedNoise:
    """A noise sampler that replays the noise a TCDScheduler loop drew, in order."""

    def __init__(self, noises: list[torch.Tensor]) -> None:
        self.noises = list(noises)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return self.noises.pop(0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_discrete_vp_reproduces_tcd_scheduler(prediction_type: str, steps: int, gamma: float) -> None:
    sched = TCDScheduler(prediction_type=prediction_type)
    sched.set_timesteps(steps)
    x_vp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    noises = [torch.randn(x_vp.shape, generator=g) for _ in range(steps - 1)] if gamma > 0 else []
    replay = iter(noises)
    ref = x_vp
    for t in sched.timesteps:
        out = sched.step(toy_model(ref, t), t, ref, eta=gamma, generator=_fixed(replay))
        ref = out.prev_sample

    time = DiscreteVPTime(sched.alphas_cumprod)
    sigmas = time.sigmas_for(sched.timesteps)
    alpha0 = (sigmas[0].double() ** 2 + 1).rsqrt()
    x = (x_vp.double() / alpha0).float()  # the same start in VE form
    denoiser = time.denoiser(toy_model, prediction_type)
    ours = sample_tcd(denoiser, x, sigmas, gamma=gamma, noise_sampler=RecordedNoise(noises), time=time, disable=True)
    final_alpha = sched.alphas_cumprod[0].double().sqrt()  # the loop ends at t = 0, not at σ = 0
    assert rel_err(ours.double() * final_alpha, ref) <= 1e-5


class _Fixed(torch.Generator):
    """A generator whose draws the patched draw_noise below replaces by recorded tensors, in order."""

    replay: Any


def _fixed(replay: Any) -> _Fixed:
    generator = _Fixed()
    generator.replay = replay
    return generator


@pytest.fixture(autouse=True)
def _replay_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let TCDScheduler take its z from a _Fixed generator's list, so both loops see identical noise."""
    import tcd_sampler.schedulers.base as scheduler_module

    real = scheduler_module.draw_noise

    def draw(shape: Any, generator: Any, device: Any, dtype: Any) -> torch.Tensor:
        if isinstance(generator, _Fixed):
            return next(generator.replay).to(device, dtype)
        return real(shape, generator, device, dtype)

    monkeypatch.setattr(scheduler_module, "draw_noise", draw)


def test_default_time_is_sigma_gamma_endpoints_are_euler_and_lcm() -> None:
    """time = σ: gamma = 0 is the deterministic (Euler/DDIM) step, gamma = 1 is k-diffusion's sample_lcm."""
    sigmas = torch.tensor([14.6, 4.0, 1.0, 0.3, 0.0])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(x) / (1 + sigma.reshape(-1, 1, 1, 1))

    euler = x.clone()
    lcm = x.clone()
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (euler - denoiser(euler, s * torch.ones(1))) / s
        euler = euler + (s_next - s) * d
        lcm = denoiser(lcm, s * torch.ones(1)) + (s_next * torch.randn(x.shape, generator=g) if s_next > 0 else 0)
    assert rel_err(sample_tcd(denoiser, x, sigmas, gamma=0.0, disable=True), euler) < 1e-5
    assert rel_err(sample_tcd(denoiser, x, sigmas, gamma=1.0, seed=None, disable=True,
                              noise_sampler=_seeded(x, 3)), lcm) < 1e-5  # fmt: skip


def _seeded(x: torch.Tensor, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=g)


def test_rf_gamma0_is_euler_and_matches_flow_scheduler() -> None:
    sched = FlowMatchTCDScheduler(shift=3.0, gamma=0.3)
    sched.set_timesteps(6)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def velocity(x: torch.Tensor, t: Any) -> torch.Tensor:
        return 0.9 * x - 0.5

    ref = x
    g = torch.Generator().manual_seed(4)
    for t in sched.timesteps:
        ref = sched.step(velocity(ref, t), t, ref, generator=g).prev_sample

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # ComfyUI CONST: denoised = x − σ·v
        return x - sigma.reshape(-1, 1, 1, 1) * velocity(x, sigma)

    ours = sample_tcd_rf(denoiser, x, sched.sigmas, gamma=0.3, noise_sampler=_seeded(x, 4), disable=True)
    assert rel_err(ours, ref) < 1e-5


def test_callback_seed_and_extra_args() -> None:
    seen: list[dict[str, Any]] = []
    sigmas = torch.tensor([10.0, 2.0, 0.5, 0.0])
    x = torch.randn(2, 3, 4, 4) * 10

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        assert sigma.shape == (2,)
        return scale * torch.tanh(x)

    a = sample_tcd(denoiser, x, sigmas, extra_args={"scale": 0.5}, callback=seen.append, seed=7, disable=True)
    b = sample_tcd(denoiser, x, sigmas, extra_args={"scale": 0.5}, seed=7, disable=True)
    assert torch.equal(a, b)
    assert [d["i"] for d in seen] == [0, 1, 2]
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert torch.equal(seen[0]["sigma"], sigmas[0]) and torch.equal(seen[0]["sigma_hat"], sigmas[0])


def test_sigmas_not_ending_at_zero_leave_noise_for_a_next_stage() -> None:
    """Split sigmas (two-stage workflows): the last step re-noises to its final sigma."""
    sigmas = torch.tensor([10.0, 2.0, 0.5])
    x = torch.randn(20000, 1) * 10

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)  # data = 0: x at σ is N(0, σ²)

    out = sample_tcd(denoiser, x, sigmas, gamma=0.5, seed=0, disable=True)
    assert abs(out.std().item() - 0.5) < 0.02


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigmas": torch.tensor([1.0, 2.0, 0.0])}, "strictly descending"),
        ({"sigmas": torch.tensor([1.0])}, "length ≥ 2"),
        ({"gamma": 1.5}, r"gamma must be in \[0.0, 1.0\]"),
    ],
)
def test_errors(kwargs: dict[str, Any], match: str) -> None:
    args = {"sigmas": torch.tensor([1.0, 0.5, 0.0]), **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_tcd(lambda x, s: x, torch.zeros(1, 2), disable=True, **args)


def test_rf_sigmas_above_one() -> None:
    with pytest.raises(ValueError, match=r"rectified-flow sigmas must lie in \[0, 1\]"):
        sample_tcd_rf(lambda x, s: x, torch.zeros(1, 2), torch.tensor([2.0, 0.0]), disable=True)


def test_discrete_time_maps() -> None:
    time = DiscreteVPTime(TCDScheduler().alphas_cumprod)
    ts = torch.tensor([999, 759, 0])
    assert torch.equal(time.sigma_to_t(time.t_to_sigma(ts)), ts)
    assert time.sigma_to_t(torch.tensor(0.0)).item() == 0
    assert time.target([90], 0.3).tolist() == [63]


def test_non_finite_sigmas_rejected() -> None:
    for sigmas in (torch.tensor([10.0, float("nan"), 0.0]), torch.tensor([float("inf"), 1.0, 0.0])):
        with pytest.raises(ValueError, match="sigmas must be"):
            sample_tcd(lambda x, s: x, torch.zeros(1, 2), sigmas, disable=True)
    with pytest.raises(ValueError, match="sigmas must be"):
        sample_tcd_rf(lambda x, s: x, torch.zeros(1, 2), torch.tensor([float("nan"), 0.5, 0.0]), disable=True)
