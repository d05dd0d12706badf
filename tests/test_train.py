"""The trainer on tiny local teachers: a run lowers nothing it should not and writes its card; two gloo processes
through `accelerate launch` end with the weights of one process with the whole batch; a run killed between
checkpoints and resumed ends bit-identical to an uninterrupted one; an incompatible checkpoint is a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import tiny_pipelines
from tcd_sampler.distill.checkpoints import checkpoint_tensors
from tcd_sampler.distill.data import DataOptions
from tcd_sampler.distill.objective import Objective
from tcd_sampler.distill.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def teacher(tmp: Path, sdxl: bool = False) -> str:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = (tiny_pipelines.sdxl if sdxl else tiny_pipelines.sd)(scheduler)
    folder = tmp / ("sdxl" if sdxl else "sd")
    pipe.save_pretrained(folder)
    return str(folder)


def images(tmp: Path, n: int = 8) -> str:
    from PIL import Image

    folder = tmp / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture number {i}")
    return str(folder)


def config(tmp: Path, teacher_dir: str, data: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"teacher": teacher_dir, "data": data, "output": str(tmp / "run"), "lora_rank": 4,
                            "resolution": 32, "batch_size": 4, "steps": 3, "lr": 1e-3, "checkpoint_every": 0,
                            "objective": Objective(guidance_min=2.0, guidance_max=4.0),
                            "data_options": DataOptions(min_size=16)}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def weights(output: str) -> dict[str, torch.Tensor]:
    """The trainable weights of a run's last checkpoint."""
    last = sorted((Path(output) / "checkpoints").glob("step-*"))[-1]
    return checkpoint_tensors(last)


#: How far apart two runs that compute the same update in another float32 summation order may end, as the norm of
#: the weights' difference over the norm of the update itself, over all trained tensors. Derivation: reordering a
#: float32 sum moves a gradient element by about u·Σ|terms| (u = 2⁻²⁴), a relative change of ~1e-6 for most elements;
#: but AdamW divides each element by its own √v, so an element whose gradient is within that rounding of zero can
#: move by up to 2·lr a step. Such elements are few, so the difference stays a small fraction of the update: 7e-4
#: measured between one process on 1 and on 2 threads (max abs 7e-6 at lr 1e-3), the same between 1 and 2
#: micro-batches; 4e-3 between a sharded and a plain full student. Per tensor it is not bounded so: a small tensor of
#: a full student whose gradients are all near zero moved 6 % of its own (tiny) update between those two runs on one
#: machine, under 1 % on another. A real difference (one micro-batch's gradient dropped) gives 0.85
#: (:func:`test_a_real_difference_exceeds_the_tolerance`).
SAME_UPDATE = 1e-2


def initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The trainable weights a run of ``cfg`` starts from (the LoRA's seeded initialisation, or the teacher's)."""
    from tcd_sampler.distill.models import build_models, load_pipeline

    student = build_models(cfg, load_pipeline(cfg.teacher)).student
    return {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}


def update_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """``‖b − a‖ / ‖a − start‖`` over all tensors: how far two runs' weights are apart relative to the update the
    first made."""
    assert a.keys() == b.keys()
    apart = sum(float((b[k].double() - a[k].double()).square().sum()) for k in a)
    update = sum(float((a[k].double() - start[k].double()).square().sum()) for k in a)
    return (apart / max(update, 1e-60)) ** 0.5


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("lora_rank", [4, 0])
def test_a_run_writes_its_card_and_checkpoint(tmp_path: Path, sdxl: bool, lora_rank: int) -> None:
    cfg = config(tmp_path, teacher(tmp_path, sdxl), images(tmp_path), lora_rank=lora_rank)
    card = train(cfg, progress=False)
    assert card["processes"] == 1 and len(card["losses"]) == 3 and all(loss > 0 for loss in card["losses"])
    assert json.loads((Path(cfg.output) / "card.json").read_text())["steps"] == 3
    saved = weights(cfg.output)
    assert saved and (all("lora" in k for k in saved) if lora_rank else not any("lora" in k for k in saved))
    # the result samples with nothing but the card: the LoRA (or the full UNet) in the teacher's pipeline
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from tcd_sampler.distill.export import scheduler_from_card

    pipe = DiffusionPipeline.from_pretrained(cfg.teacher)
    if lora_rank:
        pipe.load_lora_weights(cfg.output)
    else:
        pipe.unet = UNet2DConditionModel.from_pretrained(Path(cfg.output) / "unet")
    pipe.scheduler = scheduler_from_card(cfg.output)
    assert pipe.scheduler.config.original_inference_steps == 50
    image = pipe("a picture", num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert torch.isfinite(image).all()


def cli_args(cfg: TrainConfig) -> list[str]:
    return ["train", "--teacher", cfg.teacher, "--data", cfg.data, "--output", cfg.output, "--lora-rank",
            str(cfg.lora_rank), "--resolution", str(cfg.resolution), "--batch-size", str(cfg.batch_size), "--steps",
            str(cfg.steps), "--lr", str(cfg.lr), "--checkpoint-every", str(cfg.checkpoint_every), "--guidance-min",
            "2", "--guidance-max", "4", "--caption-dropout", "0", "--no-progress"]  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one(tmp_path: Path) -> None:
    """`accelerate launch` with two gloo processes on the CPU, half the batch each, ends where one process with the
    whole batch ends (within 1e-5), and the card says two processes ran."""
    t, data = teacher(tmp_path), images(tmp_path)
    one = config(tmp_path, t, data, output=str(tmp_path / "one"), steps=3)
    train(
        TrainConfig(**{**one.__dict__, "data_options": DataOptions(min_size=16, caption_dropout=0.0)}), progress=False
    )
    two = config(tmp_path, t, data, output=str(tmp_path / "two"), steps=3)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "tcd_sampler.cli", *cli_args(two)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((Path(two.output) / "card.json").read_text())["processes"] == 2
    a, b = weights(one.output), weights(two.output)
    assert update_difference(a, b, initial_weights(one)) < SAME_UPDATE


KILLER = """
import os, signal, sys
import safetensors.torch
import tcd_sampler.distill.train as train_module
from tcd_sampler.cli import main
calls = {"n": 0}
real = {target}
def wrapped(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == {at}:
        {action}
    return real(*args, **kwargs)
{target} = wrapped
sys.exit(main(sys.argv[1:]))
"""


def run_killed(cfg: TrainConfig, target: str, at: int, action: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with ``target`` (``train_module.<name>`` or ``safetensors.torch.<name>``) wrapped to run
    ``action`` at its ``at``-th call."""
    script = KILLER.replace("{target}", target).replace("{at}", str(at)).replace("{action}", action)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = cli_args(cfg) + (["--resume", cfg.resume] if cfg.resume else [])
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.slow
def test_a_killed_run_resumes_bit_identical(tmp_path: Path) -> None:
    """SIGKILL in step 6 (checkpoints every 2 steps), then --resume latest: the same weights, to the bit, as a run
    that was never interrupted; a kill while a checkpoint is written leaves no half-written checkpoint behind."""
    t, data = teacher(tmp_path), images(tmp_path)
    whole = config(tmp_path, t, data, output=str(tmp_path / "whole"), steps=8, checkpoint_every=2)
    assert run_killed(whole, "train_module.batch_loss", 10**9, "pass").returncode == 0
    cut = config(tmp_path, t, data, output=str(tmp_path / "cut"), steps=8, checkpoint_every=2)
    killed = run_killed(cut, "train_module.batch_loss", 6, "os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in sorted((Path(cut.output) / "checkpoints").glob("step-*"))][-1] == "step-00000004"
    assert not (Path(cut.output) / "card.json").exists()
    # resumed, then killed halfway through writing the checkpoint of step 6: that checkpoint never appears
    half = 'open(args[1], "wb").write(b"half a checkpoint"); os.kill(os.getpid(), signal.SIGKILL)'
    again = run_killed(TrainConfig(**{**cut.__dict__, "resume": "latest"}), "safetensors.torch.save_file", 1, half)
    assert again.returncode == -signal.SIGKILL
    complete = sorted((Path(cut.output) / "checkpoints").glob("step-*"))
    assert [p.name for p in complete][-1] == "step-00000004" and all(
        (p / "checkpoint.json").is_file() for p in complete
    )
    from tcd_sampler.cli import main

    assert main([*cli_args(cut), "--resume", "latest"]) == 0
    a, b = weights(whole.output), weights(cut.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((Path(cut.output) / "card.json").read_text())["losses"]
        == json.loads((Path(whole.output) / "card.json").read_text())["losses"]
    )


def test_resuming_another_runs_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    t, data = teacher(tmp_path), images(tmp_path)
    cfg = config(tmp_path, t, data, steps=2, checkpoint_every=1)
    train(cfg, progress=False)
    other = TrainConfig(**{**cfg.__dict__, "lora_rank": 8, "resume": "latest"})
    with pytest.raises(ValueError, match=r"from another run.*lora_rank"):
        train(other, progress=False)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        train(TrainConfig(**{**cfg.__dict__, "resume": str(tmp_path)}), progress=False)


def test_bad_arguments_and_bad_data_stop_before_a_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 2 and one line on stderr, before the teacher pipeline is loaded."""
    import tcd_sampler.distill.train as train_module
    from tcd_sampler.cli import main

    def no_loading(teacher: str) -> Any:
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(train_module, "load_pipeline", no_loading)
    data, pipeline = images(tmp_path), teacher(tmp_path)
    (tmp_path / "empty").mkdir()
    not_a_pipeline = tmp_path / "not-a-pipeline"
    not_a_pipeline.mkdir()
    base = ["train", "--teacher", pipeline, "--output", str(tmp_path / "out"), "--no-progress"]
    capsys.readouterr()  # what building the tiny teacher printed
    cases = [
        ([*base, "--data", data, "--batch-size", "0"], "--batch-size"),
        ([*base, "--data", data, "--guidance-min", "5", "--guidance-max", "2"], "guidance_max"),
        ([*base, "--data", data, "--resolution", "30"], "multiple of 8"),
        ([*base, "--data", str(tmp_path / "missing")], "does not exist"),
        ([*base, "--data", str(tmp_path / "empty")], "no samples found"),
        ([*base, "--data", data, "--teacher", str(not_a_pipeline)], "not a diffusers pipeline folder"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)


def test_gradient_accumulation_and_validation_grids(tmp_path: Path) -> None:
    """Two micro-batches a step make the same update as one, within float32 summation (:data:`SAME_UPDATE`, here with
    another thread count too); the validation grid is a PNG with a row a prompt and a column for each of 1, 2, 4 and
    8 steps."""
    from PIL import Image

    t, data = teacher(tmp_path), images(tmp_path)
    one = config(tmp_path, t, data, output=str(tmp_path / "one"), steps=2)
    train(one, progress=False)
    two = config(tmp_path, t, data, output=str(tmp_path / "two"), steps=2, gradient_accumulation=2,
                 validation_every=2, validation_prompts=("a cat", "a dog"))  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # another summation order than the first run's
    try:
        train(two, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert update_difference(weights(one.output), weights(two.output), initial_weights(one)) < SAME_UPDATE
    grid = Image.open(Path(two.output) / "validation" / "step-00000002.png")
    assert grid.size == (4 * 32, 2 * 32)
    with pytest.raises(ValueError, match="equal micro-batches"):
        train(config(tmp_path, t, data, output=str(tmp_path / "three"), gradient_accumulation=3), progress=False)


def test_a_real_difference_exceeds_the_tolerance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tolerance of the equality tests still catches a real difference: two micro-batches with the first one's
    loss (so its gradient) dropped end far outside :data:`SAME_UPDATE` of one micro-batch."""
    import tcd_sampler.distill.train as train_module

    t, data = teacher(tmp_path), images(tmp_path)
    one = config(tmp_path, t, data, output=str(tmp_path / "one"), steps=2)
    train(one, progress=False)
    real, calls = train_module.batch_loss, [0]

    def first_dropped(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * 0 if calls[0] % 2 else loss

    monkeypatch.setattr(train_module, "batch_loss", first_dropped)
    two = config(tmp_path, t, data, output=str(tmp_path / "two"), steps=2, gradient_accumulation=2)
    train(two, progress=False)
    assert update_difference(weights(one.output), weights(two.output), initial_weights(one)) > 10 * SAME_UPDATE


def pixel_teacher(tmp: Path) -> str:
    """A tiny unconditional pixel-space DDPMPipeline (UNet2DModel): the next issue's kind of image teacher."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    folder = tmp / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    return str(folder)


def test_an_unconditional_pixel_teacher_trains_without_captions(tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "pictures"
    data.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(4):  # no caption files
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(data / f"{i}.png")
    t = pixel_teacher(tmp_path)
    cfg = config(tmp_path, t, str(data), lora_rank=0, steps=2, validation_every=2)
    card = train(cfg, progress=False)
    assert len(card["losses"]) == 2 and all(loss > 0 for loss in card["losses"])
    assert (Path(cfg.output) / "unet" / "config.json").is_file()
    assert (Path(cfg.output) / "validation" / "step-00000002.png").is_file()
    with pytest.raises(ValueError, match="needs a UNet2DConditionModel"):
        train(config(tmp_path, t, str(data), output=str(tmp_path / "lora"), lora_rank=4), progress=False)


@pytest.mark.parametrize("sdxl", [False, True])
def test_cached_encodings_train_as_uncached_ones_with_fewer_encodings(tmp_path: Path, sdxl: bool) -> None:
    """Each image's latents and each caption's embeddings (the empty prompt included) are computed once; the run
    ends where an uncached one does (up to encoding in batches of another composition)."""
    import transformers

    t, data = teacher(tmp_path, sdxl), images(tmp_path, 4)
    calls = {"text": 0}
    real_forward = transformers.CLIPTextModel.forward

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["text"] += 1
        return real_forward(self, *args, **kwargs)

    options = DataOptions(min_size=16, caption_dropout=0.5)
    ends = {}
    for cached in (False, True):
        calls["text"] = 0
        cfg = config(tmp_path, t, data, output=str(tmp_path / f"cached-{cached}"), steps=4, cache_encodings=cached,
                     data_options=options, checkpoint_every=4)  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(transformers.CLIPTextModel, "forward", counted)
            card = train(cfg, progress=False)
        ends[cached] = (weights(cfg.output), card["losses"], calls["text"])
    assert ends[True][1] == pytest.approx(ends[False][1], rel=1e-5)  # the same losses, step by step
    # Adam turns rounding noise in near-zero gradients into steps of up to lr (1e-3): the weights agree to that
    for key, value in ends[False][0].items():
        torch.testing.assert_close(ends[True][0][key], value, rtol=0, atol=1e-3)
    # uncached: the captions and the empty prompt every step; cached: each distinct text once
    assert ends[True][2] < ends[False][2] and ends[True][2] <= 2 * 5
    with pytest.raises(ValueError, match="cache_encodings needs fixed crops"):
        config(tmp_path, t, data, cache_encodings=True, data_options=DataOptions(random_flip=True))
