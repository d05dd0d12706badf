"""diffusers pipelines on tiny local random-weight models: our schedulers give the reference's images, run where the
reference crashes, and survive pipe.save_pretrained → DiffusionPipeline.from_pretrained."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from tcd_sampler.cli import main
from tcd_sampler.integrations.diffusers import FlowMatchTCDScheduler, TCDScheduler
from tiny_pipelines import FACTORIES, call_kwargs, init_image, mask_image

STEPS = 4
TOL = 1e-5
VP_KINDS = ["sd", "sd_img2img", "sd_inpaint", "sdxl", "sdxl_img2img", "sdxl_inpaint"]
FLOW_CONFIGS = {
    "sd3": {"shift": 3.0},
    "flux": {
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "shift": 3.0,
    },
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


# ------------------------------------------------------------------------------------------- tcd-sampler generate


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for kind, scheduler in (
        ("sd", diffusers.EulerDiscreteScheduler(steps_offset=1)),
        ("sd_inpaint", diffusers.PNDMScheduler(steps_offset=1)),
        ("lcm", diffusers.LCMScheduler()),
        ("flux", diffusers.FlowMatchEulerDiscreteScheduler(**FLOW_CONFIGS["flux"])),
    ):
        FACTORIES[kind](scheduler).save_pretrained(root / kind)
        dirs[kind] = root / kind
    Image.fromarray(np.asarray(init_image())).save(root / "input.png")
    mask_image().save(root / "mask.png")
    dirs["input"], dirs["mask"] = root / "input.png", root / "mask.png"
    return dirs


def generate(model: Path, out: Path, *extra: str) -> Image.Image:
    argv = ["generate", "--model", str(model), "--prompt", "a photo of a cat", "--steps", "4", "--output", str(out)]
    assert main([*argv, *extra]) == 0
    return Image.open(out)


@pytest.mark.parametrize("kind", ["sd", "lcm", "flux"])
def test_cli_text_to_image(kind: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    first = generate(model_dirs[kind], tmp_path / "a.png", "--width", "32", "--height", "32", "--seed", "3")
    second = generate(model_dirs[kind], tmp_path / "b.png", "--width", "32", "--height", "32", "--seed", "3")
    assert first.size == (32, 32)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    other = generate(model_dirs[kind], tmp_path / "c.png", "--width", "32", "--height", "32", "--seed", "4")
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_cli_matches_the_pipeline_it_builds(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The CLI's image is the pipeline's image with our scheduler (steps_offset 0, eta = gamma) and the same seed."""
    image = generate(model_dirs["sd"], tmp_path / "cli.png", "--width", "32", "--height", "32", "--gamma", "0.5")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dirs["sd"])
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config, steps_offset=0, eta=0.5)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(
        "a photo of a cat", num_inference_steps=4, guidance_scale=0.0, width=32, height=32, eta=0.5,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(image), np.asarray(direct))


def test_cli_image_to_image_and_inpainting(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    img2img = generate(model_dirs["sd"], tmp_path / "i2i.png", "--image", str(model_dirs["input"]), "--strength", "0.5")
    assert img2img.size == (32, 32)
    args = ["--image", str(model_dirs["input"]), "--mask", str(model_dirs["mask"])]
    inpaint = generate(model_dirs["sd_inpaint"], tmp_path / "inpaint.png", *args)
    assert inpaint.size == (32, 32)


def test_cli_errors(model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--prompt", "x", "--output", str(tmp_path / "x.png")]
    assert main([*base, "--model", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path)]) == 2  # a folder, but no model in it
    assert "model_index.json is missing" in capsys.readouterr().err
    assert main([*base, "--model", str(model_dirs["sd"]), "--mask", str(model_dirs["mask"])]) == 2
    assert "--mask needs --image" in capsys.readouterr().err
    assert main([*base, "--model", str(model_dirs["sd"]), "--image", str(tmp_path / "none.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_hub_id_offline(tmp_path: Path) -> None:
    """A Hub id on a machine without the weights: a clear error naming the model (in a fresh process, since
    huggingface_hub reads HF_HUB_OFFLINE when it is imported)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    argv = ["generate", "--model", "h1t/not-downloaded", "--prompt", "x", "--output", str(tmp_path / "x.png")]
    code = "import sys; from tcd_sampler.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "h1t/not-downloaded" in done.stderr and "HF_HUB_OFFLINE is set" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_gives_lcm_pipelines_lcm_endpoint(tmp_path: Path) -> None:
    from tcd_sampler.integrations.pipelines import scheduler_for

    diffusers.LCMScheduler(set_alpha_to_one=False, steps_offset=1).save_pretrained(tmp_path / "scheduler")
    sched = scheduler_for(str(tmp_path), "LatentConsistencyModelPipeline", 0.5)
    assert sched.config.consistency_boundary and sched.config.eta == 0.5
    assert sched.config["_tcd_sampler_unapplied"] == ["set_alpha_to_one", "steps_offset"]  # kept, not applied
    assert torch.equal(sched.final_alpha_cumprod, torch.tensor(1.0))  # LCM's clean endpoint
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]
