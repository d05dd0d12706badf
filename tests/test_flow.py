"""FlowMatchTCDScheduler: gamma = 0 is diffusers' FlowMatchEulerDiscreteScheduler, gamma = 1 is its
stochastic_sampling=True and diffusers' FlowMatchLCMScheduler; in between it follows the TCD step on the flow path
(float64 reference)."""

from __future__ import annotations

import math
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from helpers import rel_err
from tcd_sampler import FlowMatchTCDScheduler

TOL = 1e-6
SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def velocity_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    """A deterministic stand-in for a flow transformer: u ≈ ε − x0 for data near 0.5, plus a fixed pattern."""
    g = torch.Generator().manual_seed(int(float(t) * 7) + 11)
    pattern = torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float64)
    return (0.9 * x.double() - 0.5 + 0.3 * pattern).to(x.dtype)


def schedule_kwargs(config: dict[str, Any], steps: int) -> dict[str, Any]:
    """What the SD3 / FLUX pipelines pass to set_timesteps (FLUX: sigmas linspace(1, 1/N, N), mu from 1024²)."""
    if config.get("use_dynamic_shifting"):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        slope = (ref.config.max_shift - ref.config.base_shift) / (
            ref.config.max_image_seq_len - ref.config.base_image_seq_len
        )
        mu = 4096 * slope + ref.config.base_shift - slope * ref.config.base_image_seq_len
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}
    return {"num_inference_steps": steps}


def run(sched: Any, x: torch.Tensor, generator: torch.Generator | None, **step_kwargs: Any) -> torch.Tensor:
    for t in sched.timesteps:
        x = sched.step(velocity_model(x, t), t, x, generator=generator, return_dict=False, **step_kwargs)[0]
    return x


@pytest.mark.parametrize("config", [SD3, FLUX], ids=["sd3", "flux"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 28])
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_endpoints_match_diffusers(config: dict[str, Any], steps: int, gamma: float) -> None:
    ours = FlowMatchTCDScheduler(**config, gamma=gamma)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**config, stochastic_sampling=gamma == 1.0)
    kwargs = schedule_kwargs(config, steps)
    ours.set_timesteps(**kwargs)
    ref.set_timesteps(**kwargs)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    a = run(ours, x, torch.Generator().manual_seed(1))
    b = run(ref, x, torch.Generator().manual_seed(1))
    assert rel_err(a, b) <= TOL
    assert torch.equal(a, b)  # bit-identical in float32


@pytest.mark.parametrize("config", [SD3, FLUX], ids=["sd3", "flux"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 28])
def test_gamma_one_is_diffusers_flow_lcm_scheduler(config: dict[str, Any], steps: int) -> None:
    """γ = 1 is diffusers' FlowMatchLCMScheduler (its consistency sampler for flow models), bit for bit: the same
    timesteps and sigmas, the same images from the same generator."""
    ours = FlowMatchTCDScheduler(**config, gamma=1.0)
    ref = diffusers.FlowMatchLCMScheduler(**config)
    kwargs = schedule_kwargs(config, steps)
    ours.set_timesteps(**kwargs)
    ref.set_timesteps(**kwargs)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(ours, x, torch.Generator().manual_seed(1)), run(ref, x, torch.Generator().manual_seed(1)))


def test_stochastic_sampling_flag_means_gamma_one() -> None:
    sched = FlowMatchTCDScheduler(**SD3, stochastic_sampling=True)
    assert sched.gamma == 1.0
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**SD3, stochastic_sampling=True)
    sched.set_timesteps(4)
    ref.set_timesteps(4)
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(run(sched, x, torch.Generator().manual_seed(3)), run(ref, x, torch.Generator().manual_seed(3)))


def test_generator_set_on_the_scheduler() -> None:
    """Pipelines call step without a generator: the scheduler's own is used."""
    sched = FlowMatchTCDScheduler(**SD3)
    sched.set_timesteps(4)
    x = torch.randn(1, 16, 8, 8)
    sched.generator = torch.Generator().manual_seed(5)
    a = run(sched, x, None)
    sched.set_timesteps(4)
    b = run(sched, x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def reference_flow64(sigmas: list[float], x: torch.Tensor, gamma: float, noises: list[torch.Tensor]) -> torch.Tensor:
    """The TCD step on the flow path, naively in float64: α = 1 − σ, model output u = ε − x0."""
    x = x.double()
    n = len(sigmas) - 1
    for i in range(n):
        sig, nxt = sigmas[i], sigmas[i + 1]
        u = velocity_model(x, sig * 1000).double()
        x0, eps = x - sig * u, x + (1 - sig) * u
        s = (1 - gamma) * nxt
        x_s = (1 - s) * x0 + s * eps
        if gamma > 0 and i < n - 1:
            r = (1 - nxt) / (1 - s)
            x = r * x_s + (nxt**2 - r**2 * s**2) ** 0.5 * noises[i].double()
        else:
            x = x_s
    return x


@pytest.mark.parametrize("gamma", [0.2, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("config", [SD3, FLUX], ids=["sd3", "flux"])
def test_intermediate_gamma_against_float64(gamma: float, config: dict[str, Any]) -> None:
    sched = FlowMatchTCDScheduler(**config, gamma=gamma)
    sched.set_timesteps(**schedule_kwargs(config, 6))
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = run(sched, x, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(x.shape, generator=g) for _ in range(5)]
    # the model sees our float32 state in our loop; evaluate the reference on the same footing
    ref = reference_flow64(sched.sigmas.double().tolist(), x, gamma, noises)
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        {**SD3, "shift_terminal": 0.1},
        {**SD3, "use_karras_sigmas": True},
        {**SD3, "use_exponential_sigmas": True},
        {**SD3, "use_beta_sigmas": True},
        {**FLUX, "time_shift_type": "linear"},
        {**SD3, "invert_sigmas": True},
        {"num_train_timesteps": 1000},
    ],
    ids=["shift_terminal", "karras", "exponential", "beta", "linear-shift", "invert", "plain"],
)
def test_schedule_variants_match_and_gamma0_is_euler(config: dict[str, Any]) -> None:
    ours, ref = FlowMatchTCDScheduler(**config, gamma=0.0), diffusers.FlowMatchEulerDiscreteScheduler(**config)
    kwargs = schedule_kwargs(config, 8)
    if config.get("time_shift_type") == "linear":
        kwargs["mu"] = 2.0
    ours.set_timesteps(**kwargs)
    ref.set_timesteps(**kwargs)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(ours, x, None), run(ref, x, None))


def test_custom_sigmas_and_timesteps_match() -> None:
    for kwargs in (
        {"sigmas": [1.0, 0.75, 0.5, 0.25]},
        {"timesteps": [1000.0, 800.0, 400.0, 100.0]},
        {"sigmas": [1.0, 0.6, 0.2], "timesteps": [999.0, 600.0, 200.0]},
    ):
        ours, ref = FlowMatchTCDScheduler(**SD3), diffusers.FlowMatchEulerDiscreteScheduler(**SD3)
        ours.set_timesteps(**kwargs)
        ref.set_timesteps(**kwargs)
        assert torch.equal(ours.timesteps, ref.timesteps)
        assert torch.equal(ours.sigmas, ref.sigmas)


def test_scale_noise_matches() -> None:
    ours, ref = FlowMatchTCDScheduler(**SD3), diffusers.FlowMatchEulerDiscreteScheduler(**SD3)
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    x, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    t = ours.timesteps[2:4]
    assert torch.equal(ours.scale_noise(x, t, noise), ref.scale_noise(x, t, noise))
    ours.set_begin_index(3)
    ref.set_begin_index(3)
    t = ours.timesteps[3:4].repeat(2)
    assert torch.equal(ours.scale_noise(x, t, noise), ref.scale_noise(x, t, noise))


def test_config_round_trip_with_diffusers() -> None:
    ours = FlowMatchTCDScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(**FLUX).config)
    assert ours.config.use_dynamic_shifting and ours.config.shift == 3.0 and ours.config.gamma == 0.3
    back = diffusers.FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX)
    assert {k: v for k, v in back.config.items() if not k.startswith("_") and k in ref.config} == {
        k: v for k, v in ref.config.items() if not k.startswith("_")
    }
    assert FlowMatchTCDScheduler(**FLUX).mu_for(4096) == pytest.approx(1.15)
    assert FlowMatchTCDScheduler(**FLUX).mu_for(256) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.set_timesteps(4), "mu must be passed"),
        (lambda s: s.set_timesteps(mu=1.0), "pass num_inference_steps, sigmas or timesteps"),
        (lambda s: s.set_timesteps(3, sigmas=[1.0, 0.5], mu=1.0), "sigmas must have num_inference_steps=3"),
        (lambda s: s.set_timesteps(sigmas=[0.5, 1.0], mu=1.0), "strictly descending"),
        (lambda s: s.set_timesteps(sigmas=[1.5, 0.5], mu=1.0), r"sigmas must lie in \[0.0, 1.0\]"),
        (lambda s: s.step(torch.zeros(1), 1.0, torch.zeros(1)), "set_timesteps must be called"),
    ],
)
def test_errors(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(FlowMatchTCDScheduler(**FLUX))


def test_bad_config() -> None:
    with pytest.raises(ValueError, match=r"gamma must be in \[0.0, 1.0\]"):
        FlowMatchTCDScheduler(gamma=1.5)
    with pytest.raises(ValueError, match="at most one of"):
        FlowMatchTCDScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="time_shift_type"):
        FlowMatchTCDScheduler(time_shift_type="cubic")
    sched = FlowMatchTCDScheduler(**SD3)
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="gamma must be in"):
        sched.step(torch.zeros(1, 2), sched.timesteps[0], torch.zeros(1, 2), gamma=2.0)


def test_schedule_does_not_alias_the_callers_array() -> None:
    arr = np.array([1000.0, 750.0, 500.0, 250.0], dtype=np.float32)
    sched = FlowMatchTCDScheduler()
    sched.set_timesteps(timesteps=arr)
    arr[:] = [900.0, 600.0, 300.0, 100.0]
    assert sched.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]


def test_a_timestep_from_another_schedule_is_looked_up_by_value() -> None:
    a = FlowMatchTCDScheduler(**SD3)
    a.set_timesteps(8)
    b = FlowMatchTCDScheduler(**SD3)
    b.set_timesteps(timesteps=a.timesteps.numpy()[::2].copy())
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="is not in the schedule"):
        b.step(x, a.timesteps[1], x)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"shift": math.inf}, r"shift must be a finite number in \(0.0, ∞\), got inf"),
        ({"shift": math.nan}, r"shift must be in \(0.0, ∞\), got nan"),
        ({"shift": 0.0}, r"shift must be in \(0.0, ∞\), got 0.0"),
        ({"base_shift": math.inf}, r"base_shift must be a finite number in \(-∞, ∞\)"),
        ({"max_shift": math.nan}, r"max_shift must be in \(-∞, ∞\), got nan"),
        ({"max_shift": -math.inf}, "max_shift must be a finite number"),
        ({"max_image_seq_len": 0}, r"max_image_seq_len must be an integer in \[1, ∞\]"),
    ],
)
def test_non_finite_settings_are_refused(config: dict[str, Any], match: str) -> None:
    """``shift=inf`` used to be accepted and sample NaN; every float setting must be finite and in its range."""
    with pytest.raises(ValueError, match=match):
        FlowMatchTCDScheduler(**config)
    with pytest.raises(ValueError, match=match):
        FlowMatchTCDScheduler.from_config(config)  # a scheduler_config.json with it
    sched = FlowMatchTCDScheduler()
    with pytest.raises(ValueError, match="shift must be a finite number"):
        sched.set_shift(math.inf)
    assert FlowMatchTCDScheduler(base_shift=None).config["base_shift"] is None  # None, as diffusers allows
    with pytest.raises(ValueError, match="mu_for needs base_shift"):
        FlowMatchTCDScheduler(base_shift=None).mu_for(512)


def test_more_bad_configs() -> None:
    with pytest.raises(ValueError, match=r"shift_terminal must be in \(0, 1\)"):
        FlowMatchTCDScheduler(shift_terminal=1.0)
    with pytest.raises(ValueError, match="max_image_seq_len != base_image_seq_len"):
        FlowMatchTCDScheduler(base_image_seq_len=256, max_image_seq_len=256).mu_for(512)
