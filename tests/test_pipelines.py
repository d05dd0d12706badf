"""diffusers pipelines on tiny local random-weight models: our schedulers give the reference's images, run where the
reference crashes, and survive pipe.save_pretrained → DiffusionPipeline.from_pretrained. (The ``tcd-sampler generate``
command on these pipelines is tested in test_cli.py.)"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from tcd_sampler.integrations.diffusers import FlowMatchTCDScheduler, TCDScheduler
from tiny_pipelines import FACTORIES, FLUX_SCHEDULER_CONFIG, call_kwargs

STEPS = 4
TOL = 1e-5
VP_KINDS = ["sd", "sd_img2img", "sd_inpaint", "sdxl", "sdxl_img2img", "sdxl_inpaint"]
FLOW_CONFIGS = {
    "sd3": {"shift": 3.0},
    "flux": FLUX_SCHEDULER_CONFIG,
}


def run(kind: str, scheduler: Any, eta: float | None = None, seed: int = 0, pipe: Any = None) -> np.ndarray:
    """Build the tiny pipeline `kind` around `scheduler` (so its constructor sees it) and call it."""
    pipe = pipe if pipe is not None else FACTORIES[kind](scheduler)
    kwargs = {**call_kwargs(kind), "num_inference_steps": STEPS, "generator": torch.Generator().manual_seed(seed)}
    if eta is not None and "eta" in inspect.signature(pipe.__call__).parameters:
        kwargs["eta"] = eta
    images = pipe(**kwargs).images
    assert np.isfinite(images).all()
    return np.asarray(images)


@pytest.mark.parametrize("kind", VP_KINDS)
@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_vp_pipelines_match_diffusers_tcd(kind: str, eta: float) -> None:
    ours = run(kind, TCDScheduler(), eta)
    ref = run(kind, diffusers.TCDScheduler(), eta)
    assert np.abs(ours - ref).max() <= TOL


def test_sd_pipeline_patch_is_declined() -> None:
    """StableDiffusionPipeline forces steps_offset=1 into its scheduler; the TCD schedule must not move."""
    pipe = FACTORIES["sd"](TCDScheduler())
    assert pipe.scheduler.config.steps_offset == 1  # kept, so the pipeline's check passes, but not applied
    assert pipe.scheduler.config["_tcd_sampler_unapplied"] == ["steps_offset"]
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize("kind", ["lcm", "lcm_img2img"])
def test_lcm_pipelines(kind: str) -> None:
    """The LCM pipelines pass eta=None (diffusers' TCDScheduler crashes there): the config's eta decides, and
    eta = 1 in consistency-boundary mode reproduces LCMScheduler's images."""
    ours = run(kind, TCDScheduler(consistency_boundary=True, eta=1.0))
    ref = run(kind, diffusers.LCMScheduler())
    assert np.abs(ours - ref).max() <= TOL
    gamma = run(kind, TCDScheduler(consistency_boundary=True))  # the default eta, 0.3
    assert np.abs(gamma - ref).max() > TOL


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_pipelines(kind: str) -> None:
    config = FLOW_CONFIGS[kind]
    ours = run(kind, FlowMatchTCDScheduler(**config, gamma=0.0))
    ref = run(kind, diffusers.FlowMatchEulerDiscreteScheduler(**config))
    assert np.abs(ours - ref).max() <= TOL
    stochastic = run(kind, FlowMatchTCDScheduler(**config, stochastic_sampling=True))
    ref_stochastic = run(kind, diffusers.FlowMatchEulerDiscreteScheduler(**config, stochastic_sampling=True))
    assert stochastic.shape == ref_stochastic.shape  # different generators here: the pipeline passes none


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_pipeline_gamma_uses_the_schedulers_generator(kind: str) -> None:
    images = []
    for _ in range(2):
        scheduler = FlowMatchTCDScheduler(**FLOW_CONFIGS[kind], gamma=0.3)
        scheduler.generator = torch.Generator().manual_seed(7)
        images.append(run(kind, scheduler))
    assert np.array_equal(images[0], images[1])
    euler = run(kind, FlowMatchTCDScheduler(**FLOW_CONFIGS[kind], gamma=0.0))
    assert np.abs(images[0] - euler).max() > TOL


@pytest.mark.parametrize(
    ("kind", "scheduler"),
    [
        ("sd", lambda: TCDScheduler(eta=0.5, steps_offset=2)),
        ("sdxl", lambda: TCDScheduler(prediction_type="v_prediction")),
        ("lcm", lambda: TCDScheduler(consistency_boundary=True, eta=0.7)),
        ("sd3", lambda: FlowMatchTCDScheduler(shift=3.0, gamma=0.4)),
        ("flux", lambda: FlowMatchTCDScheduler(**FLOW_CONFIGS["flux"], gamma=0.2)),
    ],
)
def test_save_and_load_round_trip(kind: str, scheduler: Any, tmp_path: Path) -> None:
    pipe = FACTORIES[kind](scheduler())
    if isinstance(pipe.scheduler, FlowMatchTCDScheduler):  # flow pipelines pass no generator to step
        pipe.scheduler.generator = torch.Generator().manual_seed(1)
    before = run(kind, pipe.scheduler, eta=None, pipe=pipe)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    assert loaded.scheduler.config["_class_name"] == type(pipe.scheduler).__name__
    loaded.set_progress_bar_config(disable=True)
    if isinstance(loaded.scheduler, FlowMatchTCDScheduler):
        loaded.scheduler.generator = torch.Generator().manual_seed(1)
    after = run(kind, loaded.scheduler, eta=None, pipe=loaded)
    assert np.array_equal(before, after)


def _public(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def test_core_class_is_not_saved_but_the_diffusers_one_is(tmp_path: Path) -> None:
    """Why the integration classes exist: diffusers drops components that are not its own mixins' subclasses."""
    import tcd_sampler

    pipe = FACTORIES["sd"](tcd_sampler.TCDScheduler())
    pipe.save_pretrained(tmp_path / "core")
    assert not (tmp_path / "core" / "scheduler" / "scheduler_config.json").exists()
    pipe.scheduler = TCDScheduler()
    pipe.save_pretrained(tmp_path / "integration")
    assert (tmp_path / "integration" / "scheduler" / "scheduler_config.json").exists()
