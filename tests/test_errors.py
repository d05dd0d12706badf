"""Bad input gets a ValueError/TypeError that names the parameter; never an assert, never a silent wrong answer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import toy_model
from tcd_sampler import TCDScheduler


def ready(steps: int = 4, **config: object) -> TCDScheduler:
    sched = TCDScheduler(**config)
    sched.set_timesteps(steps)
    return sched


X = torch.randn(1, 4, 8, 8)


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_eta_out_of_range(eta: float) -> None:
    with pytest.raises(ValueError, match=r"eta must be in \[0.0, 1.0\]"):
        ready().step(X, 999, X, eta=eta)


@pytest.mark.parametrize(
    "setting",
    ["timestep_scaling", "clip_sample_range", "sample_max_value", "eta", "beta_end", "dynamic_thresholding_ratio"],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_float_settings_must_be_finite(setting: str, value: float) -> None:
    """No float setting takes inf or NaN (an infinite upper bound is an open end): the message names the setting."""
    with pytest.raises(ValueError, match=rf"^{setting} must be (a finite number )?in [\[(]"):
        TCDScheduler(**{setting: value})


def test_eta_wrong_type() -> None:
    with pytest.raises(TypeError, match="eta must be a number"):
        ready().step(X, 999, X, eta="0.3")  # type: ignore[arg-type]


def test_eta_none_means_default() -> None:
    a = ready().step(toy_model(X, 999), 999, X, eta=None, generator=torch.Generator().manual_seed(0))
    b = ready().step(toy_model(X, 999), 999, X, eta=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.prev_sample, b.prev_sample)


def test_validation_survives_python_O() -> None:
    """diffusers uses `assert` for eta, which `python -O` strips: eta = 1.5 then indexes alphas_cumprod[-380]."""
    code = (
        "import torch; from tcd_sampler import TCDScheduler\n"
        "s = TCDScheduler(); s.set_timesteps(4); x = torch.zeros(1, 1, 2, 2)\n"
        "try:\n    s.step(x, 999, x, eta=1.5)\nexcept ValueError as e:\n    print('ValueError', e)\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ValueError eta must be in")


def test_step_before_set_timesteps() -> None:
    with pytest.raises(ValueError, match="set_timesteps"):
        TCDScheduler().step(X, 999, X)


@pytest.mark.parametrize("timestep", [500, 999.5, torch.tensor(1), torch.tensor([999, 999])])
def test_timestep_not_in_schedule(timestep: object) -> None:
    with pytest.raises(ValueError, match="timestep"):
        ready().step(X, timestep, X)  # type: ignore[arg-type]


def test_timestep_tensor_in_schedule_is_found() -> None:
    sched = ready()
    sched.step(toy_model(X, 759), torch.tensor(759), X, eta=0.0)
    assert sched.step_index == 2


def test_too_many_steps() -> None:
    sched = ready(1)
    sched.step(X, 999, X, eta=0.0)
    with pytest.raises(ValueError, match="call set_timesteps again"):
        sched.step(X, 999, X, eta=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_inference_steps": 1001}, "num_inference_steps"),
        ({"num_inference_steps": 51}, "num_inference_steps=51 cannot exceed original_inference_steps=50"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 30, "strength": 0.5}, "num_inference_steps=30 exceeds the 25 points"),
        ({"num_inference_steps": 4, "original_inference_steps": 0}, "original_inference_steps"),
        ({"num_inference_steps": 4, "original_inference_steps": 2000}, "original_inference_steps"),
    ],
)
def test_num_inference_steps_larger_than_grid(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TCDScheduler().set_timesteps(**kwargs)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, float("nan")])
def test_strength_out_of_range(strength: float) -> None:
    with pytest.raises(ValueError, match=r"strength must be in \(0.0, 1.0\]"):
        TCDScheduler().set_timesteps(4, strength=strength)


def test_strength_keeping_no_custom_timestep() -> None:
    with pytest.raises(ValueError, match=r"strength=0\.1 keeps no timestep"):
        TCDScheduler().set_timesteps(timesteps=[999, 500], strength=0.1)


@pytest.mark.parametrize(
    ("timesteps", "match"),
    [
        ([999, 999, 500], "strictly descending"),
        ([500, 999], "strictly descending"),
        ([1000, 500], r"\[0, 999\]"),
        ([500, -1], r"\[0, 999\]"),
        ([], "non-empty"),
        ([999.5, 500], "integers"),
    ],
)
def test_bad_custom_timesteps(timesteps: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TCDScheduler().set_timesteps(timesteps=timesteps)


def test_custom_timesteps_wrong_type() -> None:
    with pytest.raises(TypeError, match="timesteps must be integers"):
        TCDScheduler().set_timesteps(timesteps=["999", "500"])  # type: ignore[list-item]


@pytest.mark.parametrize("kwargs", [{}, {"num_inference_steps": 4, "timesteps": [999, 500]}])
def test_both_or_neither(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of num_inference_steps or timesteps"):
        TCDScheduler().set_timesteps(**kwargs)


def test_num_inference_steps_wrong_type() -> None:
    with pytest.raises(TypeError, match="num_inference_steps must be an integer"):
        TCDScheduler().set_timesteps(4.0)  # type: ignore[arg-type]


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"model_output and sample must have the same shape, got \(1, 4, 8, 4\)"):
        ready().step(X[..., :4], 999, X)


@pytest.mark.parametrize("which", ["model_output", "sample"])
def test_integer_tensors(which: str) -> None:
    ints = torch.zeros(1, 4, 8, 8, dtype=torch.long)
    args = {"model_output": X, "sample": X, which: ints}
    with pytest.raises(TypeError, match=f"{which} must be a floating-point tensor"):
        ready().step(args["model_output"], 999, args["sample"])


def test_non_tensor_sample() -> None:
    with pytest.raises(TypeError, match=r"sample must be a torch\.Tensor"):
        ready().step(X, 999, X.numpy())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"prediction_type": "flow"}, r"prediction_type must be one of \('epsilon', 'sample', 'v_prediction'\)"),
        (
            {"beta_schedule": "cosine"},
            r"beta_schedule must be one of \('linear', 'scaled_linear', 'squaredcos_cap_v2'\)",
        ),
        ({"timestep_spacing": "even"}, r"timestep_spacing must be one of \('leading', 'trailing', 'linspace'\)"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"original_inference_steps": 2000}, r"original_inference_steps must be an integer in \[1, 1000\]"),
        ({"steps_offset": -1}, r"steps_offset must be an integer in \[0, 999\]"),
        ({"clip_sample_range": 0.0}, "clip_sample_range"),
        ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
        ({"sample_max_value": 0.0}, "sample_max_value"),
        ({"timestep_scaling": -1.0}, "timestep_scaling"),
        ({"beta_end": 2.0}, "beta_end"),
        ({"trained_betas": [0.01] * 10}, "trained_betas must have length num_train_timesteps=1000"),
        ({"trained_betas": [1.5] * 1000}, r"trained_betas must all lie in \[0, 1\]"),
    ],
)
def test_bad_constructor_arguments(config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TCDScheduler(**config)


def test_bad_type_in_constructor() -> None:
    with pytest.raises(TypeError, match="steps_offset must be an integer"):
        TCDScheduler(steps_offset=1.5)  # type: ignore[arg-type]


def test_epsilon_with_zero_terminal_snr() -> None:
    sched = TCDScheduler(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match=r"prediction_type='epsilon' cannot recover x0 .*timestep 999"):
        sched.set_timesteps(4)
    sched.set_timesteps(timesteps=[998, 500])  # fine below the zero-SNR point


def test_add_noise_timesteps() -> None:
    sched = TCDScheduler()
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        sched.add_noise(X, X, torch.tensor([1000]))
    with pytest.raises(TypeError, match="timesteps must be integers"):
        sched.add_noise(X, X, torch.tensor([0.5]))
    with pytest.raises(TypeError, match="original_samples must be a floating-point tensor"):
        sched.add_noise(X.long(), X, torch.tensor([5]))


def test_set_begin_index_negative() -> None:
    with pytest.raises(ValueError, match="begin_index"):
        ready().set_begin_index(-1)


def test_begin_index_past_the_end() -> None:
    sched = ready()
    sched.set_begin_index(4)
    with pytest.raises(ValueError, match="schedule has 4 steps"):
        sched.step(X, 999, X)


def test_bool_parameters_must_be_bools() -> None:
    with pytest.raises(TypeError, match="clip_sample must be a bool"):
        TCDScheduler(clip_sample="yes")  # type: ignore[arg-type]


def test_partial_internal_dict_takes_defaults() -> None:
    sched = TCDScheduler(prediction_type="v_prediction")
    sched._internal_dict = {"timestep_spacing": "linspace"}
    assert sched.config.prediction_type == "epsilon" and sched.config.timestep_spacing == "linspace"


def test_generator_arguments() -> None:
    sched = ready()
    with pytest.raises(ValueError, match=r"one per batch item \(1\), got 2"):
        sched.step(X, 999, X, eta=0.3, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        ready().step(X, 999, X, eta=0.3, generator=0)  # type: ignore[arg-type]


def test_bool_timesteps_and_fused_flag() -> None:
    with pytest.raises(TypeError, match="timesteps must be integers, not bools"):
        TCDScheduler().set_timesteps(timesteps=[999, True])
    with pytest.raises(TypeError, match="fused_step must be a bool"):
        TCDScheduler(fused_step="yes")  # type: ignore[arg-type]


def test_add_noise_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="noise must have the shape of original_samples"):
        TCDScheduler().add_noise(X, X[:, :1], torch.tensor([5]))
