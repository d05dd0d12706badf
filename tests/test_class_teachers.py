"""Class-conditional pixel-space teachers (a diffusers ``UNet2DModel`` with class embeddings and a null class) in the
trainer: the diffusion objective that trains a teacher equals a float64 reference written here; a run trains one
from an image folder whose captions are class labels and writes a pipeline folder that loads and teaches the next
run (TCD and LCM, full students); grey images follow the teacher's channels; bad labels stop before any model loads;
the UNet sampling loop is diffusers' own loop with guidance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tcd_sampler.cli import main
from tcd_sampler.distill.data import DataOptions, ImageCaptionDataset
from tcd_sampler.distill.objective import Objective, batch_loss, draw
from tcd_sampler.distill.teachers import Conditioning, check_class_captions, class_labels, teacher_path
from tcd_sampler.distill.train import TrainConfig, train
from tcd_sampler.distill.unet_sampling import sample_unet

pytest.importorskip("diffusers")

CLASSES = 3


def class_unet(channels: int = 1, seed: int = 0):  # type: ignore[no-untyped-def]
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=CLASSES + 1,
    )  # fmt: skip


def class_teacher(tmp: Path, prediction_type: str = "epsilon") -> str:
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False)  # fmt: skip
    folder = tmp / f"teacher-{prediction_type}"
    DDPMPipeline(unet=class_unet(), scheduler=scheduler).save_pretrained(folder)
    return str(folder)


def labelled_images(tmp: Path, n: int = 12, labels: list[str] | None = None) -> str:
    """An HF image folder of grey 8x8 images whose ``text`` is a class label (a bar at the class's row)."""
    from PIL import Image

    folder = tmp / "labelled"
    folder.mkdir()
    lines = []
    for i in range(n):
        label = labels[i] if labels else str(i % CLASSES)
        pixels = torch.zeros(8, 8, dtype=torch.uint8)
        pixels[2 * (i % CLASSES) + 1] = 255
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": label}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_diffusion_loss_equals_a_float64_reference(prediction_type: str) -> None:
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type":
              prediction_type}  # fmt: skip
    path, prediction = teacher_path(config)
    unet = class_unet().double()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1])
    objective = Objective(method="diffusion")
    draws = draw(objective, 1000, tuple(z.shape), torch.Generator().manual_seed(4))
    assert draws.t.min() >= 0 and draws.t.max() < 1000
    loss = batch_loss(objective, path, prediction, unet, None, None, z, Conditioning(class_labels=labels), None,
                      draws)  # fmt: skip
    # the reference: DDPM's objective from the betas, by hand
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)[draws.t].reshape(-1, 1, 1, 1)
    eps = draws.noise.double()
    x = acp.sqrt() * z + (1 - acp).sqrt() * eps
    out = unet(x, draws.t, class_labels=labels).sample
    goal = {"epsilon": eps, "v_prediction": acp.sqrt() * eps - (1 - acp).sqrt() * z, "sample": z}[prediction_type]
    # the package's alpha-bar is diffusers' float32 cumulative product: agreement to float32's rounding of it
    torch.testing.assert_close(loss, ((out - goal) ** 2).mean(), rtol=1e-7, atol=0)


def test_class_labels_and_their_checks() -> None:
    assert class_labels(["2", "", " 0"], 3).tolist() == [2, 3, 0]
    check_class_captions(["0", "1", "2"], 3)
    for bad in ("3", "cat", "-1", "1.0"):
        with pytest.raises(ValueError, match=r"class label in \[0, 2\]"):
            check_class_captions(["0", bad], 3)


def test_grey_images_have_one_channel(tmp_path: Path) -> None:
    data = labelled_images(tmp_path)
    grey = ImageCaptionDataset(data, DataOptions(resolution=8, channels=1))[1]
    assert grey["pixel_values"].shape == (1, 8, 8) and grey["caption"] == "1"
    assert grey["pixel_values"][0, 3].eq(1).all() and grey["pixel_values"][0, 0].eq(-1).all()
    assert ImageCaptionDataset(data, DataOptions(resolution=8))[1]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="channels must be 1"):
        DataOptions(channels=2)


def test_integer_labels_in_metadata_are_captions(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "ints"
    folder.mkdir()
    Image.fromarray(torch.zeros(8, 8, dtype=torch.uint8).numpy()).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "label": 2}) + "\n")
    dataset = ImageCaptionDataset(folder, DataOptions(resolution=8, caption_column="label"))
    assert dataset.records[0].caption == "2"


def run_config(tmp: Path, teacher: str, data: str, name: str, **kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    base = {"teacher": teacher, "data": data, "output": str(tmp / name), "lora_rank": 0, "resolution": 8,
            "batch_size": 6, "steps": 4, "lr": 3e-3, "checkpoint_every": 0,
            "data_options": DataOptions(caption_dropout=0.2)}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_a_teacher_trained_here_teaches_tcd_and_lcm_students(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, UNet2DModel

    teacher, data = class_teacher(tmp_path), labelled_images(tmp_path)
    cfg = run_config(tmp_path, teacher, data, "trained", objective=Objective(method="diffusion"), steps=30,
                     ema_decay=0.5, validation_every=30)  # fmt: skip
    card = train(cfg, progress=False)
    losses = card["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    assert card["scheduler"]["eta"] == 0.0 and card["this_run"]["first_step"] == 0
    # the card records the settings the run used: grey images, a validation row per class
    assert card["config"]["data_options"]["channels"] == 1
    assert card["config"]["validation_prompts"] == ["0", "1", "2"]
    pipe = DiffusionPipeline.from_pretrained(cfg.output)  # the output folder is a pipeline
    assert type(pipe.unet).__name__ == "UNet2DModel" and pipe.unet.config.num_class_embeds == CLASSES + 1
    assert (Path(cfg.output) / "validation" / "step-00000030.png").is_file()
    from PIL import Image

    with Image.open(Path(cfg.output) / "validation" / "step-00000030.png") as grid:  # a row per class, 1/2/4/8 steps
        assert grid.size == (4 * 32, CLASSES * 32)  # 8-pixel cells enlarged 4x
    for method in ("tcd", "lcm"):
        student_cfg = run_config(tmp_path, cfg.output, data, method, objective=Objective(method=method, guidance_min=2,
                                 guidance_max=2))  # fmt: skip
        student_card = train(student_cfg, progress=False)
        assert len(student_card["losses"]) == 4 and all(loss > 0 for loss in student_card["losses"])
        unet = UNet2DModel.from_pretrained(Path(student_cfg.output) / "unet")
        assert unet.config.num_class_embeds == CLASSES + 1
        index = json.loads((Path(student_cfg.output) / "model_index.json").read_text())
        own = {"tcd": "TCDScheduler", "lcm": "LCMScheduler"}[method]  # the student's sampler, not DDPM's
        assert index["scheduler"] == ["diffusers", own]
        assert type(DiffusionPipeline.from_pretrained(student_cfg.output).scheduler).__name__ == own
    lcm = json.loads((tmp_path / "lcm" / "card.json").read_text())
    assert lcm["scheduler"]["config"]["consistency_boundary"] is True


def test_bad_labels_and_a_lora_diffusion_run_stop_before_a_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tcd_sampler.distill.train as train_module

    def no_loading(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(train_module, "load_pipeline", no_loading)
    teacher = class_teacher(tmp_path)
    data = labelled_images(tmp_path, 6, ["0", "1", "dog", "2", "0", "1"])
    with pytest.raises(ValueError, match="sample 2's is 'dog'"):
        train(run_config(tmp_path, teacher, data, "bad"), progress=False)
    args = ["train", "--teacher", teacher, "--data", data, "--output", str(tmp_path / "cli"), "--lora-rank", "0",
            "--resolution", "8"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class label in [0, 2]" in err[0]
    (tmp_path / "more").mkdir()
    good = labelled_images(tmp_path / "more", 6)
    with pytest.raises(ValueError, match="diffusion objective trains the whole UNet"):
        train(run_config(tmp_path, teacher, good, "lora", lora_rank=4, objective=Objective(method="diffusion")),
              progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="validation prompt 0's is 'a cat'"):
        train(run_config(tmp_path, teacher, good, "prompts", validation_prompts=("a cat",)), progress=False)


def test_sample_unet_is_the_scheduler_loop_with_guidance() -> None:
    from diffusers import DDIMScheduler

    unet = class_unet().eval()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    null = torch.full_like(labels, CLASSES)
    out = sample_unet(unet, DDIMScheduler(), noise, 3, Conditioning(class_labels=labels),
                      Conditioning(class_labels=null), 2.5)  # fmt: skip
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(3)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            c, u = unet(x, t, class_labels=labels).sample, unet(x, t, class_labels=null).sample
            x = scheduler.step(u + 2.5 * (c - u), t, x).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs uncond"):
        sample_unet(unet, DDIMScheduler(), noise, 1, Conditioning(class_labels=labels), None, 2.0)


def test_a_run_logs_to_tensorboard_and_a_missing_tracker_is_named(tmp_path: Path) -> None:
    import importlib.util

    teacher, data = class_teacher(tmp_path), labelled_images(tmp_path)
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match="needs the wandb package"):
            train(run_config(tmp_path, teacher, data, "wandb", log_with="wandb"), progress=False)
    with pytest.raises(ValueError, match="log_with must be one of"):
        run_config(tmp_path, teacher, data, "x", log_with="paper")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = run_config(tmp_path, teacher, data, "logged", objective=Objective(method="diffusion"), steps=3,
                     log_with="tensorboard")  # fmt: skip
    card = train(cfg, progress=False)
    events = sorted((Path(cfg.output) / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    runs = [EventAccumulator(str(folder)).Reload() for folder in sorted({e.parent for e in events})]
    logged = [run for run in runs if "loss" in run.Tags()["scalars"]]  # (the settings are a run of their own)
    assert len(logged) == 1
    losses = [event.value for event in logged[0].Scalars("loss")]
    assert losses == pytest.approx(card["losses"], rel=1e-6)
    assert [event.step for event in logged[0].Scalars("loss")] == [1, 2, 3]


def test_a_caption_after_dropout_is_known_without_the_image(tmp_path: Path) -> None:
    dataset = ImageCaptionDataset(labelled_images(tmp_path, 12), DataOptions(resolution=8, caption_dropout=0.5))
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        assert [dataset.caption(i, epoch) for i in range(12)] == [dataset[i]["caption"] for i in range(12)]
    assert "" in [dataset.caption(i, 0) for i in range(12)]  # dropout happens, and differs between epochs
    assert [dataset.caption(i, 0) for i in range(12)] != [dataset.caption(i, 3) for i in range(12)]


def labelled_shards(tmp: Path, shards: int = 2, per_shard: int = 5, bad: str | None = None) -> str:
    """Webdataset shards of grey 8x8 images whose ``.txt`` is a class label (``bad`` replaces the last label)."""
    import io
    import tarfile

    from PIL import Image

    folder = tmp / "shards"
    folder.mkdir()
    for s in range(shards):
        with tarfile.open(folder / f"part-{s:03d}.tar", "w") as archive:
            for i in range(per_shard):
                n = s * per_shard + i
                pixels = torch.zeros(8, 8, dtype=torch.uint8)
                pixels[2 * (n % CLASSES) + 1] = 255
                png = io.BytesIO()
                Image.fromarray(pixels.numpy()).save(png, format="PNG")
                label = bad if bad is not None and n == shards * per_shard - 1 else str(n % CLASSES)
                for name, data in ((f"{n:05d}.png", png.getvalue()), (f"{n:05d}.txt", label.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(folder)


def test_a_streamed_run_trains_and_resumes_bit_identical(tmp_path: Path) -> None:
    teacher, shards = class_teacher(tmp_path), labelled_shards(tmp_path)
    whole = run_config(tmp_path, teacher, shards, "whole", objective=Objective(method="diffusion"), steps=4)
    card = train(whole, progress=False)
    assert len(card["losses"]) == 4 and all(loss > 0 for loss in card["losses"])
    first = run_config(tmp_path, teacher, shards, "cut", objective=Objective(method="diffusion"), steps=2,
                       checkpoint_every=2)  # fmt: skip
    train(first, progress=False)
    resumed = TrainConfig(**{**first.__dict__, "steps": 4, "resume": "latest", "allow_changes": ("steps",)})
    again = train(resumed, progress=False)
    assert again["this_run"]["first_step"] == 2 and again["losses"] == card["losses"]
    from tcd_sampler.distill.checkpoints import checkpoint_tensors

    ends = [checkpoint_tensors(Path(c.output) / "checkpoints" / "step-00000004") for c in (whole, resumed)]
    assert ends[0].keys() == ends[1].keys() and all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    with pytest.raises(ValueError, match="cache_encodings needs a folder source"):
        train(run_config(tmp_path, teacher, shards, "cached", cache_encodings=True), progress=False)


def test_a_streamed_bad_label_is_one_clear_error(tmp_path: Path) -> None:
    teacher, shards = class_teacher(tmp_path), labelled_shards(tmp_path, bad="seven")
    cfg = run_config(tmp_path, teacher, shards, "bad", objective=Objective(method="diffusion"), steps=3,
                     batch_size=5)  # fmt: skip
    with pytest.raises(ValueError, match=r"streamed sample \d+'s is 'seven'"):
        train(cfg, progress=False)


def test_a_checkpoint_is_not_resumed_against_a_retrained_teacher(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    teacher, data = class_teacher(tmp_path), labelled_images(tmp_path)
    first = run_config(tmp_path, teacher, data, "run", steps=2, checkpoint_every=2)
    train(first, progress=False)
    class_unet(seed=5).save_pretrained(Path(teacher) / "unet")  # the same path, other weights
    assert isinstance(UNet2DModel.from_pretrained(Path(teacher) / "unet"), UNet2DModel)
    with pytest.raises(ValueError, match=r"from another run \(teacher: "):
        train(TrainConfig(**{**first.__dict__, "steps": 4, "resume": "latest", "allow_changes": ("steps",)}),
              progress=False)  # fmt: skip
