"""Parity with diffusers' TCDScheduler over full sampling loops: same inputs, same torch.Generator stream.

Every comparison checks identical timesteps, identical integer targets s at every step, and
max|ours − ref| ≤ 1e-6·max|ref| (float32) for prev_sample and pred_noised_sample at every step.
"""

from __future__ import annotations

import itertools
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_generator, rel_err, run_loop, toy_model
from tcd_sampler import TCDScheduler

TOL = 1e-6


def pair(**config: Any) -> tuple[TCDScheduler, Any]:
    return TCDScheduler(**config), diffusers.TCDScheduler(**config)


def reference_targets(config: dict[str, Any], schedule: dict[str, Any], eta: float) -> list[int]:
    """The s that diffusers uses at each step, measured from its output rather than recomputed.

    With prediction_type='sample', model output 1 and x_t = α_t, diffusers' ε̂ is exactly 0 and it returns
    x_s = α_s; with model output 0 and x_t = σ_t, ε̂ = 1 and it returns σ_s. The pair (α_s, σ_s) identifies s on the
    grid (α separates high timesteps where σ rounds to 1 in float32, σ separates low ones where α rounds to 1)."""
    measured = []
    for output, field in ((1.0, "alpha"), (0.0, "sigma")):
        ref = diffusers.TCDScheduler(**{**config, "prediction_type": "sample"})
        ref.set_timesteps(**schedule)
        values = []
        for t in ref.timesteps:
            acp = ref.alphas_cumprod[int(t)]
            x = (acp**0.5 if field == "alpha" else (1 - acp) ** 0.5) * torch.ones(1, 1, 2, 2)
            out = ref.step(torch.full_like(x, output), t, x, eta=eta, generator=torch.Generator().manual_seed(0))
            values.append(out.pred_noised_sample.double().mean().item())
        measured.append(values)
    acp = diffusers.TCDScheduler(**config).alphas_cumprod.double()
    alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    targets = []
    for a_s, s_s in zip(*measured, strict=True):
        distance = (alpha - a_s).abs() / max(a_s, 1e-30) + (sigma - s_s).abs() / max(s_s, 1e-30)
        targets.append(int(distance.argmin()))
    return targets


def assert_parity(
    config: dict[str, Any],
    schedule: dict[str, Any],
    eta: float,
    seed: Any = 0,
    shape: tuple[int, ...] = (2, 4, 8, 8),
    begin_index: int | None = None,
    check_targets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    ours, ref = pair(**config)
    ours.set_timesteps(**schedule)
    ref.set_timesteps(**schedule)
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    if check_targets:
        ours_s = [row.s for row in ours.step_table(eta).rows]
        assert ours_s == reference_targets(config, schedule, eta)
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(123))
    x, steps = run_loop(ours, sample, eta, seed, begin_index=begin_index, record=True)
    y, ref_steps = run_loop(ref, sample, eta, seed, begin_index=begin_index, record=True)
    for a, b in zip(steps, ref_steps, strict=True):
        assert rel_err(a.prev_sample, b.prev_sample) <= TOL
        assert rel_err(a.pred_noised_sample, b.pred_noised_sample) <= TOL
    assert torch.isfinite(x).all()
    return x, y


# ---------------------------------------------------------------- quick subset


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_default_config_loops(steps: int, eta: float) -> None:
    x, y = assert_parity({}, {"num_inference_steps": steps}, eta)
    assert torch.equal(x, y), "the default configuration is documented as bit-identical in float32"


def test_step_outputs_match_field_by_field() -> None:
    ours, ref = pair()
    ours.set_timesteps(4)
    ref.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    m = toy_model(x, 999)
    a = ours.step(m, 999, x, eta=0.3, generator=torch.Generator().manual_seed(5))
    b = ref.step(m, 999, x, eta=0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert torch.equal(a.pred_noised_sample, b.pred_noised_sample)
    ta = ours.step(m, 759, x, eta=0.0, return_dict=False)
    tb = ref.step(m, 759, x, eta=0.0, return_dict=False)
    assert len(ta) == len(tb) == 2
    assert all(torch.equal(p, q) for p, q in zip(ta, tb, strict=True))


def test_generator_stream_consumed_identically() -> None:
    """N−1 draws for N steps when eta > 0, none when eta = 0: the generators end in the same state."""
    for eta in (0.0, 0.3):
        ours, ref = pair()
        ours.set_timesteps(4)
        ref.set_timesteps(4)
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        x = torch.randn(1, 4, 8, 8)
        for t in ours.timesteps:
            ours.step(toy_model(x, t), t, x, eta=eta, generator=g1)
            ref.step(toy_model(x, t), t, x, eta=eta, generator=g2)
        assert torch.equal(g1.get_state(), g2.get_state())
    assert not torch.equal(g1.get_state(), torch.Generator().manual_seed(7).get_state())


def test_list_of_generators() -> None:
    assert_parity({}, {"num_inference_steps": 4}, 0.3, seed=[1, 2, 3], shape=(3, 4, 8, 8))
    # one generator per item: an item's noise does not depend on its batch
    ours = TCDScheduler()
    ours.set_timesteps(4)
    batch = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    full = run_loop(ours, batch, 0.3, [1, 2, 3])
    ours.set_timesteps(4)
    single = run_loop(ours, batch[1:2], 0.3, [2])
    assert torch.equal(full[1:2], single)


def test_set_begin_index_mid_schedule() -> None:
    assert_parity({}, {"num_inference_steps": 8}, 0.3, begin_index=3)


def test_first_step_found_by_timestep_mid_schedule() -> None:
    """Without set_begin_index the first step's position comes from its timestep (diffusers' img2img style)."""
    ours, ref = pair()
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    x = torch.randn(1, 4, 8, 8)
    for sched in (ours, ref):
        y = x
        for t in sched.timesteps[2:]:
            y = sched.step(toy_model(y, t), t, y, eta=0.3, generator=torch.Generator().manual_seed(int(t))).prev_sample
        sched.result = y  # type: ignore[attr-defined]
    assert rel_err(ours.result, ref.result) <= TOL  # type: ignore[attr-defined]


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.3])
def test_strength(strength: float) -> None:
    assert_parity({}, {"num_inference_steps": 4, "strength": strength}, 0.3)


def test_explicit_original_inference_steps() -> None:
    assert_parity({}, {"num_inference_steps": 4, "original_inference_steps": 50}, 0.3)
    sched = TCDScheduler()
    sched.set_timesteps(4, original_inference_steps=50)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize(
    "timesteps",
    [[999, 759, 499, 259], [999, 700, 400, 90], [800, 90, 3], [999, 0]],
    ids=["on-grid", "off-grid", "float32-floor", "ends-at-0"],
)
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7])
def test_custom_timesteps(timesteps: list[int], eta: float) -> None:
    assert_parity({}, {"timesteps": timesteps}, eta)


def test_float32_floor_quirk_reproduced() -> None:
    """γ = 0.3, t' = 90 targets s = 63 (float32), not 62 (float64)."""
    sched = TCDScheduler()
    sched.set_timesteps(timesteps=[800, 90, 3])
    assert sched.step_table(0.3).rows[0].s == 63


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_zero_snr(prediction_type: str) -> None:
    config = {"rescale_betas_zero_snr": True, "prediction_type": prediction_type}
    assert_parity(config, {"num_inference_steps": 4}, 0.3)


def test_trained_betas() -> None:
    betas = np.linspace(0.0001, 0.02, 1000) ** 1.1
    assert_parity({"trained_betas": betas.tolist()}, {"num_inference_steps": 4}, 0.3)
    assert_parity({"trained_betas": betas.astype(np.float32)}, {"num_inference_steps": 8}, 0.7)


def test_add_noise_and_get_velocity() -> None:
    ours, ref = pair()
    x = torch.randn(4, 3, 8, 8)
    noise = torch.randn_like(x)
    for t in (torch.tensor([0, 10, 500, 999]), torch.tensor([259, 259, 259, 259]), torch.tensor(499)):
        assert torch.equal(ours.add_noise(x, noise, t), ref.add_noise(x, noise, t))
        assert torch.equal(ours.get_velocity(x, noise, t), ref.get_velocity(x, noise, t))


def test_half_precision_runs_like_reference() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        ours, ref = pair()
        ours.set_timesteps(4)
        ref.set_timesteps(4)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
        a = run_loop(ours, x, 0.3, 0)
        b = run_loop(ref, x, 0.3, 0)
        assert a.dtype == b.dtype == dtype
        assert rel_err(a, b) < 2e-2  # half-precision rounding; see test_precision for which is closer to float64


# ------------------------------------------------------------ the full sweep

SWEEP = list(
    itertools.product(
        ["epsilon", "sample", "v_prediction"],
        ["scaled_linear", "linear", "squaredcos_cap_v2"],
        [1, 2, 3, 4, 8, 16, 50],
        [0.0, 0.3, 0.7, 1.0],
    )
)


@pytest.mark.slow
@pytest.mark.parametrize(("prediction_type", "beta_schedule", "steps", "eta"), SWEEP)
def test_sweep(prediction_type: str, beta_schedule: str, steps: int, eta: float) -> None:
    config = {"prediction_type": prediction_type, "beta_schedule": beta_schedule}
    x, y = assert_parity(config, {"num_inference_steps": steps}, eta, shape=(1, 4, 8, 8))
    assert torch.equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("strength", [0.5, 0.3])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_sweep_strength_and_full_grid(steps: int, strength: float, eta: float) -> None:
    if int(50 * strength) >= steps:
        assert_parity({}, {"num_inference_steps": steps, "strength": strength}, eta, shape=(1, 4, 8, 8))
    assert_parity(
        {}, {"num_inference_steps": steps, "original_inference_steps": 50, "strength": strength}, eta, shape=(1, 4, 4)
    )


# ------------------------------------------------------------- property test


@st.composite
def configurations(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], float, int]:
    prediction_type = draw(st.sampled_from(["epsilon", "sample", "v_prediction"]))
    zero_snr = prediction_type != "epsilon" and draw(st.booleans())
    config = {
        "num_train_timesteps": draw(st.sampled_from([1000, 500, 200])),
        "beta_schedule": draw(st.sampled_from(["scaled_linear", "linear", "squaredcos_cap_v2"])),
        "beta_start": draw(st.floats(0.0001, 0.001)),
        "beta_end": draw(st.floats(0.01, 0.03)),
        "prediction_type": prediction_type,
        "rescale_betas_zero_snr": zero_snr,
    }
    T = config["num_train_timesteps"]
    config["original_inference_steps"] = draw(st.sampled_from([n for n in (10, 25, 50, 100) if n <= T]))
    kind = draw(st.sampled_from(["steps", "full", "custom"]))
    strength = draw(st.sampled_from([1.0, 1.0, 0.7, 0.5]))
    if kind == "custom":
        ts = sorted(draw(st.sets(st.integers(0, T - 1), min_size=1, max_size=12)), reverse=True)
        schedule: dict[str, Any] = {"timesteps": ts}
        if len(ts) * strength < 1:
            strength = 1.0
    else:
        limit = (
            int(config["original_inference_steps"] * strength)
            if kind == "steps"
            else config["original_inference_steps"]
        )
        schedule = {"num_inference_steps": draw(st.integers(1, max(1, min(limit, 30))))}
        if kind == "full":
            schedule["original_inference_steps"] = config["original_inference_steps"]
    schedule["strength"] = strength
    eta = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0))
    return config, schedule, eta, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configurations())
def test_random_configurations(case: tuple[dict[str, Any], dict[str, Any], float, int]) -> None:
    config, schedule, eta, seed = case
    assert_parity(config, schedule, eta, seed=seed, shape=(1, 2, 4, 4))


def test_custom_timesteps_with_strength_skips_useless_final_draw() -> None:
    """Deliberate deviation: with custom timesteps and strength < 1 the reference keeps num_inference_steps at the
    unsliced length, so it does not see its last step and draws noise there (scaled by 0, so the output is
    unchanged). Ours draws N−1 times like every other schedule; outputs are identical."""
    ours, ref = pair()
    ours.set_timesteps(timesteps=[999, 759, 499, 259], strength=0.5)
    ref.set_timesteps(timesteps=[999, 759, 499, 259], strength=0.5)
    assert ours.timesteps.tolist() == ref.timesteps.tolist() == [499, 259]
    x = torch.randn(1, 4, 8, 8)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in ours.timesteps:
        a = ours.step(toy_model(x, t), t, x, eta=0.3, generator=g1)
        b = ref.step(toy_model(x, t), t, x, eta=0.3, generator=g2)
        assert torch.equal(a.prev_sample, b.prev_sample)
    expected = torch.Generator().manual_seed(0)
    torch.randn(x.shape, generator=expected)  # one draw: N − 1 for N = 2
    assert torch.equal(g1.get_state(), expected.get_state())
    assert not torch.equal(g2.get_state(), expected.get_state())


def test_generators_helper_sanity() -> None:
    assert make_generator(None) is None
    assert len(make_generator([1, 2])) == 2  # type: ignore[arg-type]
