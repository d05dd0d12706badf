"""Keys from someone else's config never move results away from the reference: every way a config arrives
(constructor, from_config, from_pretrained, the pipelines' _internal_dict replacement, InvokeAI's from_config with
``_backup``), the consistency-boundary mode against LCMScheduler, the flow scheduler's stochastic_sampling, configs of
the other family, and the CLI's two ways of building a scheduler."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from diffusers.configuration_utils import FrozenDict

from helpers import lcm_loops, run_loop
from tcd_sampler import FlowMatchTCDScheduler, TCDScheduler
from tcd_sampler.cli import main
from tcd_sampler.integrations import diffusers as integration
from tcd_sampler.integrations.pipelines import scheduler_for
from test_config import SDXL_EULER_CONFIG

#: The scheduler_config.json of runwayml/stable-diffusion-v1-5 (a PNDMScheduler; written out: tests never download).
SD15_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

#: The scheduler_config.json of black-forest-labs/FLUX.1-schnell, with diffusers' stochastic sampling switched on.
FLUX_STOCHASTIC_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "stochastic_sampling": True,
}

TCD_GRID_4 = [999, 759, 499, 259]
CLASSES = [TCDScheduler, integration.TCDScheduler]


def timesteps_of(scheduler: TCDScheduler, steps: int = 4) -> list[int]:
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


@pytest.mark.parametrize("cls", CLASSES)
def test_sdxl_stock_config_gives_the_tcd_grid(cls: type[TCDScheduler]) -> None:
    assert timesteps_of(cls.from_config(SDXL_EULER_CONFIG)) == TCD_GRID_4
    assert timesteps_of(cls.from_config(diffusers.EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG).config)) == (
        TCD_GRID_4
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_from_pretrained_of_foreign_folders(cls: type[TCDScheduler], tmp_path: Path) -> None:
    """A folder saved by diffusers' Euler or by diffusers' own TCDScheduler (same class name as ours) is foreign."""
    diffusers.EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG).save_pretrained(tmp_path / "euler")
    diffusers.TCDScheduler(steps_offset=1, timestep_spacing="trailing").save_pretrained(tmp_path / "tcd")
    assert timesteps_of(cls.from_pretrained(tmp_path / "euler")) == TCD_GRID_4
    assert timesteps_of(cls.from_pretrained(tmp_path / "tcd")) == TCD_GRID_4
    assert timesteps_of(cls.from_pretrained(tmp_path / "tcd", steps_offset=1)) == [999, 760, 500, 260]


def test_our_saved_config_keeps_what_was_applied(tmp_path: Path) -> None:
    """A config this package wrote is marked: what was applied stays applied, what was not stays not applied."""
    TCDScheduler(steps_offset=1).save_pretrained(tmp_path / "explicit")
    TCDScheduler.from_config(SDXL_EULER_CONFIG).save_pretrained(tmp_path / "foreign")
    data = json.loads((tmp_path / "foreign" / "scheduler_config.json").read_text())
    assert data["_tcd_sampler_version"] and data["_tcd_sampler_unapplied"] == ["set_alpha_to_one", "steps_offset"]
    assert data["steps_offset"] == 1 and data["use_karras_sigmas"] is False  # kept for converting back
    assert timesteps_of(TCDScheduler.from_pretrained(tmp_path / "explicit")) == [999, 760, 500, 260]
    assert timesteps_of(TCDScheduler.from_pretrained(tmp_path / "foreign")) == TCD_GRID_4
    assert timesteps_of(TCDScheduler.from_config(TCDScheduler(steps_offset=1).config)) == [999, 760, 500, 260]
    # and back to the scheduler the config came from, nothing lost
    euler = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path / "foreign")
    assert euler.config.steps_offset == 1 and euler.config.set_alpha_to_one is False


def test_diffusers_tcd_reads_our_saved_config(tmp_path: Path) -> None:
    """The mark is a private key: diffusers' TCDScheduler loads our file and gives the same numbers as ours."""
    TCDScheduler.from_config(SDXL_EULER_CONFIG).save_pretrained(tmp_path)
    ref = diffusers.TCDScheduler.from_pretrained(tmp_path)
    ours = TCDScheduler.from_pretrained(tmp_path)
    ref.set_timesteps(4)
    ours.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run_loop(ours, x, 0.3), run_loop(ref, x, 0.3))


@pytest.mark.parametrize("cls", CLASSES)
def test_invokeai_style_from_config_with_backup(cls: type[TCDScheduler]) -> None:
    config = dict(FrozenDict(SDXL_EULER_CONFIG))
    sched = cls.from_config({**config, "_backup": config, "prediction_type": "epsilon"})
    assert timesteps_of(sched) == TCD_GRID_4
    assert sched.config["_backup"] == config


def test_pipeline_replacement_of_internal_dict_is_foreign() -> None:
    """An SD pipeline's legacy patch (steps_offset=1) into a scheduler built with defaults changes nothing."""
    from tiny_pipelines import FACTORIES

    pipe = FACTORIES["sd"](integration.TCDScheduler())
    assert timesteps_of(pipe.scheduler) == TCD_GRID_4


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_boundary_mode_from_the_sd15_stock_config_is_lcm(eta: float) -> None:
    """SD1.5's set_alpha_to_one=False is not applied: the consistency-boundary mode at eta 1 is LCMScheduler, bit for
    bit (below 1, its clean endpoint is still LCM's ᾱ = 1)."""
    ours = TCDScheduler.from_config(SD15_PNDM_CONFIG, consistency_boundary=True)
    assert torch.equal(ours.final_alpha_cumprod, torch.tensor(1.0))
    ref = diffusers.LCMScheduler.from_config(SD15_PNDM_CONFIG)
    mine, lcm = lcm_loops(ours, ref, steps=4, eta=eta)
    assert ours.timesteps.tolist() == ref.timesteps.tolist() == TCD_GRID_4
    if eta == 1.0:
        assert torch.equal(mine, lcm)
    explicit = TCDScheduler.from_config(SD15_PNDM_CONFIG, consistency_boundary=True, set_alpha_to_one=False)
    assert torch.equal(explicit.final_alpha_cumprod, explicit.alphas_cumprod[0])  # the caller's word applies


def test_one_info_line_names_what_was_not_applied(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="tcd_sampler"):
        TCDScheduler.from_config(SDXL_EULER_CONFIG)
    above_debug = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert [r.levelno for r in above_debug] == [logging.INFO]
    message = above_debug[0].getMessage()
    assert "set_alpha_to_one=False, steps_offset=1" in message and "from_config(config," in message
    # the Euler keys that simply do not apply are kept quietly
    debug = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "use_karras_sigmas" in debug and "interpolation_type" in debug


def test_trailing_from_a_foreign_config_is_not_applied() -> None:
    """SDXL-Turbo-style configs carry timestep_spacing="trailing", which diffusers' TCD ignores."""
    config = {**SDXL_EULER_CONFIG, "timestep_spacing": "trailing", "_class_name": "EulerAncestralDiscreteScheduler"}
    assert timesteps_of(TCDScheduler.from_config(config)) == TCD_GRID_4
    assert timesteps_of(TCDScheduler.from_config(config, timestep_spacing="trailing")) == [999, 749, 499, 249]


def test_flow_stochastic_sampling_from_a_foreign_config(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tcd_sampler"):
        sched = FlowMatchTCDScheduler.from_config(FLUX_STOCHASTIC_CONFIG, gamma=0.3)
    assert sched.gamma == 0.3 and sched.config.stochastic_sampling is True  # kept, not applied
    assert "not applying stochastic_sampling=True" in caplog.text
    assert FlowMatchTCDScheduler.from_config(FLUX_STOCHASTIC_CONFIG).gamma == 0.3
    assert FlowMatchTCDScheduler.from_config(FLUX_STOCHASTIC_CONFIG, stochastic_sampling=True).gamma == 1.0
    own = FlowMatchTCDScheduler(stochastic_sampling=True)
    assert own.gamma == 1.0 and FlowMatchTCDScheduler.from_config(own.config).gamma == 1.0
    assert FlowMatchTCDScheduler.from_config(own.config, gamma=0.4).gamma == 0.4  # the explicit gamma wins
    with pytest.raises(ValueError, match="stochastic_sampling=True means gamma=1"):
        FlowMatchTCDScheduler(stochastic_sampling=True, gamma=0.3)


def test_flow_stochastic_sampling_at_gamma_one_is_diffusers() -> None:
    ours = FlowMatchTCDScheduler.from_config(FLUX_STOCHASTIC_CONFIG, stochastic_sampling=True)
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_STOCHASTIC_CONFIG)
    for s in (ours, ref):
        s.set_timesteps(4)
    x0 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = []
    for sched in (ours, ref):
        x, g = x0.clone(), torch.Generator().manual_seed(3)
        for t in sched.timesteps:
            x = sched.step(0.5 * x, t, x, generator=g).prev_sample
        out.append(x)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize(
    ("cls", "config", "names"),
    [
        (TCDScheduler, FLUX_STOCHASTIC_CONFIG, "FlowMatchTCDScheduler"),
        (TCDScheduler, {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True}, "FlowMatchTCDScheduler"),
        (FlowMatchTCDScheduler, SDXL_EULER_CONFIG, "TCDScheduler"),
        (FlowMatchTCDScheduler, TCDScheduler().config, "TCDScheduler"),
    ],
)
def test_a_config_of_the_other_family_is_a_clear_error(cls: type, config: dict, names: str) -> None:
    with pytest.raises(ValueError, match=f"use {names}.from_config"):
        cls.from_config(config)


def test_cli_schedule_and_generate_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`schedule --config` (from_pretrained) and `generate` (scheduler_for) build the same schedule from a model."""
    model = tmp_path / "model"
    diffusers.EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG).save_pretrained(model / "scheduler")
    assert main(["schedule", "--config", str(model / "scheduler"), "--steps", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cli_timesteps = [row["t"] for row in printed["schedules"]["4"]]
    generate_scheduler = scheduler_for(str(model), "StableDiffusionXLPipeline", 0.3)
    assert cli_timesteps == timesteps_of(generate_scheduler) == TCD_GRID_4


def test_our_mark_does_not_vouch_for_values_changed_elsewhere() -> None:
    """A config of ours that went through another scheduler keeps our private keys; a guarded value changed there is
    foreign again (the mark records the values we applied)."""
    ours = TCDScheduler.from_config(SDXL_EULER_CONFIG)
    euler = diffusers.EulerDiscreteScheduler.from_config(ours.config, timestep_spacing="trailing")
    assert timesteps_of(TCDScheduler.from_config(euler.config)) == TCD_GRID_4
    explicit = TCDScheduler(steps_offset=1)
    through = diffusers.EulerDiscreteScheduler.from_config(explicit.config)
    assert timesteps_of(TCDScheduler.from_config(through.config)) == [999, 760, 500, 260]  # still our value
    flow = FlowMatchTCDScheduler.from_config(FlowMatchTCDScheduler().config)
    stochastic = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flow.config, stochastic_sampling=True)
    assert FlowMatchTCDScheduler.from_config(stochastic.config).gamma == 0.3


def test_a_saved_stochastic_flow_scheduler_loads(tmp_path: Path) -> None:
    FlowMatchTCDScheduler(stochastic_sampling=True).save_pretrained(tmp_path)
    assert FlowMatchTCDScheduler.from_pretrained(tmp_path).gamma == 1.0
    assert FlowMatchTCDScheduler.from_pretrained(tmp_path, gamma=0.5).gamma == 0.5
    with pytest.raises(ValueError, match="means gamma=1"):
        FlowMatchTCDScheduler.from_pretrained(tmp_path, gamma=0.5, stochastic_sampling=True)


def test_register_to_config_survives_a_copy() -> None:
    sched = TCDScheduler()
    sched.register_to_config(timestep_spacing="trailing", steps_offset=1)
    assert timesteps_of(sched) == timesteps_of(TCDScheduler.from_config(sched.config)) == [999, 749, 499, 249]
    flow = FlowMatchTCDScheduler(gamma=0.5)
    flow.register_to_config(stochastic_sampling=True)
    assert flow.gamma == FlowMatchTCDScheduler.from_config(flow.config).gamma == 1.0


def test_partial_internal_dict_keeps_the_callers_guarded_values() -> None:
    sched = TCDScheduler(steps_offset=2)
    sched._internal_dict = {"prediction_type": "v_prediction"}
    assert sched.config.prediction_type == "v_prediction" and timesteps_of(sched) == [999, 761, 501, 261]


def test_an_in_memory_flow_config_is_recognised() -> None:
    with pytest.raises(ValueError, match=r"use FlowMatchTCDScheduler\.from_config"):
        TCDScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)


def test_from_pretrained_takes_diffusers_loader_arguments(tmp_path: Path) -> None:
    TCDScheduler(steps_offset=1).save_pretrained(tmp_path / "scheduler")
    sched = integration.TCDScheduler.from_pretrained(
        tmp_path, subfolder="scheduler", variant=None, torch_dtype=torch.float16, user_agent={"x": "y"}
    )
    assert timesteps_of(sched) == [999, 760, 500, 260]


def test_a_scheduler_built_inside_a_constructor_does_not_take_the_outer_config() -> None:
    """What from_config hands over belongs to the instance it builds, not to a scheduler built meanwhile."""
    helpers: list[TCDScheduler] = []

    class Wrapped(TCDScheduler):
        @functools.wraps(TCDScheduler.__init__)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            helpers.append(TCDScheduler())  # another scheduler built before this one is configured
            super().__init__(*args, **kwargs)

    outer = Wrapped.from_config(SDXL_EULER_CONFIG)
    assert outer.config.steps_offset == 1
    assert outer.config["_tcd_sampler_unapplied"] == ["set_alpha_to_one", "steps_offset"]
    assert all(h.config.steps_offset == 0 and "_tcd_sampler_unapplied" not in h.config for h in helpers)


def test_boundary_mode_takes_lcms_clipping_from_its_config() -> None:
    """LCMScheduler clips: in the consistency-boundary mode a config's clip_sample applies, as in the reference."""
    lcm_config = dict(diffusers.LCMScheduler(clip_sample=True, clip_sample_range=0.5).config)
    ours = TCDScheduler.from_config(lcm_config, consistency_boundary=True)
    mine, ref = lcm_loops(ours, diffusers.LCMScheduler.from_config(lcm_config), steps=4, eta=1.0, scale=3.0)
    assert torch.equal(mine, ref)
    assert "_tcd_sampler_unapplied" not in TCDScheduler.from_config(lcm_config, consistency_boundary=True).config
    assert TCDScheduler.from_config(lcm_config).config["_tcd_sampler_unapplied"] == ["clip_sample"]
