"""The pure core: paths, schedules, noise, the functional step; and that the core needs no diffusers."""

from __future__ import annotations

import json
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from helpers import toy_model
from tcd_sampler import TCDScheduler
from tcd_sampler.cli import main
from tcd_sampler.core.paths import VPDiscretePath, target_timesteps
from tcd_sampler.core.schedules import distillation_grid, make_betas, rescale_zero_terminal_snr, tcd_schedule
from tcd_sampler.core.step import draw_noise, tcd_step
from tcd_sampler.core.table import build_vp_table


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"beta_schedule": "linear"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"rescale_betas_zero_snr": True},
        {"beta_schedule": "linear", "rescale_betas_zero_snr": True, "num_train_timesteps": 500},
        {"trained_betas": list(np.linspace(1e-4, 2e-2, 1000))},
    ],
)
def test_alphas_cumprod_bit_identical(config: dict) -> None:
    ours, ref = TCDScheduler(**config), diffusers.TCDScheduler(**config)
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)


def test_zero_snr_reaches_zero() -> None:
    acp = VPDiscretePath.from_betas(rescale_zero_terminal_snr(make_betas(1000, 0.00085, 0.012, "scaled_linear")))
    assert acp.alphas_cumprod[-1].item() == 0.0
    alpha, sigma = acp.alpha_sigma()
    assert alpha.dtype == torch.float64 and sigma[-1].item() == 1.0


def test_target_timesteps_float32_floor() -> None:
    assert target_timesteps(np.array([90]), 0.3).tolist() == [63]  # float64 would give 62
    assert target_timesteps(np.array([759, 0]), 0.0).tolist() == [759, 0]
    assert target_timesteps(np.array([759]), 1.0).tolist() == [0]


def test_distillation_grid_and_selection() -> None:
    grid = distillation_grid(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    assert tcd_schedule(grid, 4).tolist() == [999, 759, 499, 259]
    assert distillation_grid(1000, 50, full_grid=True).tolist() == list(range(1000))


@pytest.mark.parametrize("generator", ["one", "list", "list-of-one", "none"])
def test_draw_noise_is_randn_tensor(generator: str) -> None:
    def make() -> object:
        return {
            "one": torch.Generator().manual_seed(3),
            "list": [torch.Generator().manual_seed(i) for i in range(3)],
            "list-of-one": [torch.Generator().manual_seed(3)],
            "none": None,
        }[generator]

    shape = (3, 4, 8, 8) if generator != "list-of-one" else (1, 4, 8, 8)
    torch.manual_seed(0)
    ours = draw_noise(shape, make(), torch.device("cpu"), torch.float32)  # type: ignore[arg-type]
    torch.manual_seed(0)
    ref = randn_tensor(shape, generator=make(), device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(ours, ref)


def test_table_rows_and_functional_step() -> None:
    sched = TCDScheduler()
    sched.set_timesteps(4)
    table = build_vp_table(sched.alphas_cumprod, [999, 759, 499, 259], 0.3)
    assert [r.s for r in table.rows] == [531, 349, 181, 0]
    assert [r.draws_noise for r in table.rows] == [True, True, True, False]
    assert table.rows == sched.step_table(0.3).rows
    # σ_t'² − renoise²·σ_s² = noise² (the forward transition s → t' of the VP path), in float64
    t64 = build_vp_table(sched.alphas_cumprod.double(), [999, 759, 499, 259], 0.3)
    for r in t64.rows[:-1]:
        a_p = np.sqrt(sched.alphas_cumprod.double()[r.t_prev].item())
        assert r.renoise == pytest.approx(a_p / r.alpha_s, rel=1e-12)
        assert r.noise**2 == pytest.approx((1 - a_p**2) - r.renoise**2 * r.sigma_s**2, rel=1e-9)
    x = torch.randn(1, 4, 8, 8)
    z = torch.randn_like(x)
    prev, x_s, x0 = tcd_step(toy_model(x, 999), x, table.rows[0], "epsilon", z)
    r = table.rows[0]
    eps = toy_model(x, 999)
    torch.testing.assert_close(x0, (x - r.sigma_t * eps) / r.alpha_t)
    torch.testing.assert_close(x_s, r.alpha_s * x0 + r.sigma_s * eps)
    torch.testing.assert_close(prev, r.renoise * x_s + r.noise * z)


def test_output_tuple_form() -> None:
    sched = TCDScheduler()
    sched.set_timesteps(2)
    x = torch.randn(1, 4, 8, 8)
    out = sched.step(toy_model(x, 999), 999, x, eta=0.0)
    prev, noised = out.to_tuple()
    assert prev is out.prev_sample and noised is out.pred_noised_sample
    assert out[0] is out.prev_sample and out["pred_noised_sample"] is out.pred_noised_sample
    assert list(out) == list(out.keys()) == ["prev_sample", "pred_noised_sample"] and len(out) == 2
    assert "pred_original_sample" not in out and out.pred_original_sample.shape == x.shape


def test_previous_timestep_and_state() -> None:
    sched = TCDScheduler()
    assert sched.previous_timestep(500).item() == 499
    sched.set_timesteps(4)
    assert sched.previous_timestep(torch.tensor(759)).item() == 499
    assert sched.previous_timestep(259).item() == -1
    assert sched.step_index is None and sched.begin_index is None
    sched.set_begin_index(2)
    assert sched.begin_index == 2
    assert sched.scale_model_input(torch.ones(1), 999).item() == 1.0


def test_assigning_timesteps_like_a_pipeline() -> None:
    sched = TCDScheduler()
    sched.set_timesteps(8)
    sched.timesteps = sched.timesteps[2:]
    assert sched.num_inference_steps == 6
    x = torch.randn(1, 4, 8, 8)
    for t in sched.timesteps:
        x = sched.step(toy_model(x, t), t, x, eta=0.0).prev_sample
    assert torch.isfinite(x).all()


def test_core_imports_and_samples_without_diffusers() -> None:
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import torch; from tcd_sampler import TCDScheduler\n"
        "s = TCDScheduler(); s.set_timesteps(4); x = torch.randn(1, 4, 8, 8)\n"
        "for t in s.timesteps: x = s.step(0.9 * x, t, x, generator=torch.Generator().manual_seed(0)).prev_sample\n"
        "assert 'diffusers' not in sys.modules or sys.modules['diffusers'] is None\n"
        "print('ok', bool(torch.isfinite(x).all()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok True"


def test_cli_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--steps", "1", "4", "--gamma", "0.3"]) == 0
    text = capsys.readouterr().out
    assert "4 step(s), gamma = 0.3" in text and " 999    759  531 " in text
    assert main(["schedule", "--steps", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["schedules"]["2"]
    assert [(r["t"], r["t_prev"], r["s"]) for r in rows] == [(999, 499, 349), (499, 0, 0)]
    assert main(["schedule", "--steps", "100"]) == 2
    assert "num_inference_steps=100" in capsys.readouterr().err
