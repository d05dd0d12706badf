"""A guidance-conditioned full student (LCM's w-embedding, optional in TCD's trainer): the embedding is the one
diffusers' pipelines compute from their guidance_scale; the student starts as the teacher (its new projection is
zero) and learns from the guidance scale; a run writes a UNet with time_cond_proj_dim whose card samples it in its
pipeline without CFG; the settings that cannot work are clear errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from tcd_sampler.cli import main
from tcd_sampler.distill.data import DataOptions
from tcd_sampler.distill.models import _guidance_conditioned
from tcd_sampler.distill.objective import Objective, batch_loss, draw
from tcd_sampler.distill.teachers import guidance_embedding, teacher_path
from tcd_sampler.distill.train import TrainConfig, train
from test_objective import SD_CONFIG, sd_batch
from test_train import images, teacher
from tiny_pipelines import _unet

pytest.importorskip("diffusers")


@pytest.mark.parametrize("dim", [256, 7])
def test_the_embedding_is_the_pipelines(dim: int) -> None:
    from diffusers import StableDiffusionPipeline

    omega = torch.tensor([1.0, 1.5, 4.0, 15.0], dtype=torch.float64)
    ours = guidance_embedding(omega, dim)
    # the pipeline embeds guidance_scale - 1 for a UNet with time_cond_proj_dim (self is not used)
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, (omega - 1).float(), embedding_dim=dim)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_student_starts_as_the_teacher_and_learns_the_scale() -> None:
    path, _ = teacher_path(SD_CONFIG)
    plain = _unet(cross_attention_dim=16).double()
    conditioned = _guidance_conditioned(plain, 8).double()
    assert conditioned.config.time_cond_proj_dim == 8 and plain.config.time_cond_proj_dim is None
    z, cond, uncond = sd_batch(torch.float64)
    with_w, without = Objective(guidance_embedding_dim=8), Objective()
    d = draw(with_w, 1000, tuple(z.shape), torch.Generator().manual_seed(3))
    teacher_unet = copy.deepcopy(plain).requires_grad_(False)
    a = batch_loss(without, path, "epsilon", plain, copy.deepcopy(plain), teacher_unet, z, cond, uncond, d)
    b = batch_loss(with_w, path, "epsilon", conditioned, copy.deepcopy(conditioned), teacher_unet, z, cond, uncond,
                   d)  # fmt: skip
    assert math.isclose(a.item(), b.item(), rel_tol=1e-12)  # a zero projection: the same network
    b.backward()
    grad = conditioned.time_embedding.cond_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the scale reaches the student
    with pytest.raises(ValueError, match="already takes a guidance embedding"):
        _guidance_conditioned(conditioned, 8)


def test_a_run_samples_from_its_card_without_cfg(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from tcd_sampler.distill.export import pipeline_kwargs, scheduler_from_card

    t, data = teacher(tmp_path), images(tmp_path, 4)
    cfg = TrainConfig(teacher=t, data=data, output=str(tmp_path / "w"), lora_rank=0, resolution=32, batch_size=2,
                      steps=2, lr=1e-3, checkpoint_every=0, validation_every=2,
                      objective=Objective(guidance_min=2.0, guidance_max=4.0, guidance_embedding_dim=8),
                      data_options=DataOptions(min_size=16))  # fmt: skip
    card = train(cfg, progress=False)
    assert card["scheduler"]["guidance_scale"] == 3.0
    unet = UNet2DConditionModel.from_pretrained(Path(cfg.output) / "unet")
    assert unet.config.time_cond_proj_dim == 8
    assert (Path(cfg.output) / "validation" / "step-00000002.png").is_file()
    pipe = DiffusionPipeline.from_pretrained(t)
    pipe.unet, pipe.scheduler = unet, scheduler_from_card(cfg.output)
    kwargs = pipeline_kwargs(cfg.output)
    assert kwargs["guidance_scale"] == 3.0
    out = pipe("a picture", height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.isfinite(out.images).all()
    assert not pipe.do_classifier_free_guidance  # the scale went in as the student's embedding, not as CFG


def test_settings_that_cannot_work_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="needs a full student"):
        TrainConfig(teacher="t", data="d", output="o", objective=Objective(guidance_embedding_dim=8))
    with pytest.raises(ValueError, match="at least 2"):
        Objective(guidance_embedding_dim=1)
    with pytest.raises(ValueError, match="0 for the diffusion objective"):
        Objective(method="diffusion", guidance_embedding_dim=8)
    argv = ["train", "--teacher", "t", "--data", "d", "--output", str(tmp_path / "o"), "--guidance-embedding", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a full student" in err[0]
