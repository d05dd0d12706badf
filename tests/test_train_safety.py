"""A run that never saves garbage or silently changes (the trainer's side): a non-finite loss or gradient stops the
run naming the step (nothing of it saved) or is skipped and counted; a resume refuses changed settings unless
allowed, then applies them (the learning rate included) and records them; the output folder is checked, locked and
never mixes two runs; the last validation grid comes back on resume; Ctrl-C names ``--resume latest``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import tcd_sampler.distill.train as train_module
from tcd_sampler.distill.objective import Objective
from tcd_sampler.distill.train import NonFiniteError, TrainConfig, train
from test_train import config, images, teacher, weights


@pytest.fixture
def made(tmp_path: Path) -> tuple[str, str]:
    """A tiny SD teacher and an image folder."""
    return teacher(tmp_path), images(tmp_path)


def steps_of(output: str) -> list[str]:
    return [p.name for p in sorted((Path(output) / "checkpoints").glob("step-*"))]


class _BadGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (a finite loss whose gradient is not)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def inject(monkeypatch: pytest.MonkeyPatch, at: int, kind: str) -> None:
    """Make the ``at``-th call of the loss (the step ``at``, one micro-batch a step) non-finite: ``"loss"`` (NaN),
    ``"inf"`` (one element: the loss infinite) or ``"gradient"`` (a finite loss with NaN gradients)."""
    real, calls = train_module.batch_loss, [0]

    def faulty(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        loss = real(*args, **kwargs)
        if calls[0] != at:
            return loss
        if kind == "gradient":
            return _BadGradient.apply(loss)
        return loss * float("nan") if kind == "loss" else loss + float("inf")

    monkeypatch.setattr(train_module, "batch_loss", faulty)


@pytest.mark.parametrize(("kind", "lora_rank"), [("loss", 4), ("inf", 0), ("gradient", 4)])
def test_a_nonfinite_step_stops_the_run_naming_it_and_saves_nothing_of_it(
    tmp_path: Path, made: tuple[str, str], monkeypatch: pytest.MonkeyPatch, kind: str, lora_rank: int
) -> None:
    cfg = config(tmp_path, *made, steps=6, checkpoint_every=2, lora_rank=lora_rank)
    original = train_module.batch_loss
    inject(monkeypatch, 4, kind)
    what = "gradient of .*lora" if kind == "gradient" else "loss is not finite"
    with pytest.raises(NonFiniteError, match=rf"step 4: the {what}.*last checkpoint is step 2.*--resume latest"):
        train(cfg, progress=False)
    assert steps_of(cfg.output) == ["step-00000002"]
    assert not (Path(cfg.output) / "card.json").exists()
    assert not list(Path(cfg.output).glob("*.safetensors")) and not (Path(cfg.output) / "unet").exists()
    # the last good checkpoint resumes (the fault was passing) and finishes with finite weights
    monkeypatch.setattr(train_module, "batch_loss", original)
    card = train(dataclasses.replace(cfg, resume="latest"), progress=False)
    assert len(card["losses"]) == 6 and card["skipped_steps"] == []
    assert all(torch.isfinite(w).all() for w in weights(cfg.output).values())


def test_a_nonfinite_step_on_the_last_step_saves_nothing(
    tmp_path: Path, made: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, *made, steps=3, checkpoint_every=0)
    inject(monkeypatch, 3, "loss")
    with pytest.raises(NonFiniteError, match=r"step 3: .*no checkpoint holds it"):
        train(cfg, progress=False)
    assert steps_of(cfg.output) == [] and not (Path(cfg.output) / "card.json").exists()


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skip_drops_the_step_and_counts_it(
    tmp_path: Path, made: tuple[str, str], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """With ``on_nonfinite="skip"`` the faulty step's update is not applied: a 3-step run whose last step is skipped
    ends with the weights of a 2-step run, to the bit; the card lists the step, its loss is None; the exported LoRA
    is finite."""
    t, data = made
    two = config(tmp_path, t, data, output=str(tmp_path / "two"), steps=2)
    train(two, progress=False)
    cfg = config(tmp_path, t, data, steps=3, on_nonfinite="skip")
    inject(monkeypatch, 3, kind)
    card = train(cfg, progress=False)
    assert card["skipped_steps"] == [3] and card["losses"][2] is None
    assert all(loss is not None and loss > 0 for loss in card["losses"][:2])
    assert json.loads((Path(cfg.output) / "card.json").read_text())["skipped_steps"] == [3]
    a, b = weights(two.output), weights(cfg.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    lora = Path(cfg.output) / "pytorch_lora_weights.safetensors"
    assert all(torch.isfinite(w).all() for w in load_file(str(lora)).values())


def test_a_resume_refuses_changed_settings_unless_allowed_then_applies_and_records_them(
    tmp_path: Path, made: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, *made, steps=3, checkpoint_every=3)
    train(cfg, progress=False)
    again = dataclasses.replace(cfg, resume="latest", steps=5, lr=2e-3, max_grad_norm=0.5)
    with pytest.raises(ValueError, match=r"settings differ.*lr: 0.001 → 0.002.*steps: 3 → 5.*--allow-change") as err:
        train(again, progress=False)
    assert "max_grad_norm: 1.0 → 0.5" in str(err.value)
    capsys.readouterr()
    card = train(dataclasses.replace(again, allow_changes=("lr", "steps", "max_grad_norm")), progress=False)
    assert f"resumed from {Path(cfg.output) / 'checkpoints' / 'step-00000003'} at step 3" in capsys.readouterr().err
    assert {c["setting"] for c in card["changes"]} == {"lr", "steps", "max_grad_norm"}
    assert all(c["step"] == 3 for c in card["changes"]) and len(card["losses"]) == 5
    state = json.loads((Path(cfg.output) / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["lr"] == 2e-3  # the new learning rate took effect
    # the changes travel with later checkpoints: a further resume keeps them in its card
    more = train(dataclasses.replace(again, steps=6, allow_changes=("steps",)), progress=False)
    assert [c["setting"] for c in more["changes"]].count("steps") == 2
    # a setting that defines the run never changes; steps below the checkpoint's is an error
    with pytest.raises(ValueError, match=r"from another run \(seed: 0 → 1\)"):
        train(dataclasses.replace(again, seed=1, steps=6), progress=False)
    with pytest.raises(ValueError, match="at step 6, beyond steps=4"):
        train(dataclasses.replace(again, steps=4, allow_changes=("steps",)), progress=False)


def test_the_same_teacher_by_another_path_resumes(tmp_path: Path, made: tuple[str, str]) -> None:
    t, data = made
    cfg = config(tmp_path, t, data, steps=2, checkpoint_every=1)
    train(cfg, progress=False)
    link = tmp_path / "same-teacher"
    link.symlink_to(t)
    card = train(dataclasses.replace(cfg, teacher=str(link), resume="latest", steps=2), progress=False)
    assert card["this_run"]["first_step"] == 2


def test_one_run_per_output_folder(tmp_path: Path, made: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run's checkpoints are refused without --resume (or removed with overwrite); a live run's lock
    refuses a second; processes launched as several that run alone are stopped — all before the teacher loads."""
    cfg = config(tmp_path, *made, steps=2, checkpoint_every=1)
    train(cfg, progress=False)
    real_load = train_module.load_pipeline

    def no_loading(teacher: str) -> Any:
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(train_module, "load_pipeline", no_loading)
    with pytest.raises(ValueError, match=r"holds another run's checkpoints \(up to step-00000002\).*--overwrite"):
        train(cfg, progress=False)
    import fcntl

    with (Path(cfg.output) / train_module.LOCK).open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="in use by another run"):
            train(dataclasses.replace(cfg, resume="latest"), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launched as one of 2"):
        train(dataclasses.replace(cfg, resume="latest"), progress=False)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(train_module, "load_pipeline", real_load)
    card = train(dataclasses.replace(cfg, overwrite=True, steps=1), progress=False)
    assert card["this_run"]["first_step"] == 0 and steps_of(cfg.output) == ["step-00000001"]


def test_an_unwritable_output_stops_before_the_teacher_loads(
    tmp_path: Path, made: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(train_module, "load_pipeline", lambda teacher: pytest.fail("the teacher was loaded"))
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(config(tmp_path, *made, output=str(tmp_path / "a-file" / "run")), progress=False)
    with pytest.raises(ValueError, match="is the teacher folder"):
        train(config(tmp_path, *made, output=made[0], overwrite=True), progress=False)


def test_the_last_validation_grid_comes_back_on_resume(tmp_path: Path, made: tuple[str, str]) -> None:
    cfg = config(tmp_path, *made, steps=2, checkpoint_every=1, validation_every=2)
    train(cfg, progress=False)
    grid = Path(cfg.output) / "validation" / "step-00000002.png"
    grid.unlink()  # as a kill after the last checkpoint leaves it
    train(dataclasses.replace(cfg, resume="latest"), progress=False)
    assert grid.is_file()


def test_ctrl_c_names_resume_latest(
    tmp_path: Path, made: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tcd_sampler.cli import main
    from test_train import cli_args

    cfg = config(tmp_path, *made, steps=4, checkpoint_every=2)
    real, calls = train_module.batch_loss, [0]

    def interrupted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "batch_loss", interrupted)
    assert main(cli_args(cfg)) != 0
    err = capsys.readouterr().err
    assert "interrupted during step 3; the last checkpoint is step 2" in err and "--resume latest" in err


def test_an_ema_in_host_memory_for_the_diffusion_objective(tmp_path: Path, made: tuple[str, str]) -> None:
    """``ema_device="cpu"`` keeps the diffusion objective's EMA on the CPU and trains as the default (on a CPU run
    the same device: the same losses); refused where the target runs in every step (TCD, LCM) and with FSDP."""
    diffusion = {"lora_rank": 0, "objective": Objective(method="diffusion")}
    here = train(config(tmp_path, *made, output=str(tmp_path / "a"), **diffusion), progress=False)
    host = train(config(tmp_path, *made, output=str(tmp_path / "b"), ema_device="cpu", **diffusion), progress=False)
    assert here["losses"] == host["losses"]
    for kw in ({"lora_rank": 0}, {"fsdp": True, **diffusion}):
        with pytest.raises(ValueError, match="ema_device"):
            TrainConfig(teacher="t", data="d", output="o", ema_device="cpu", **kw)


def test_a_checkpoint_of_the_previous_release_compares_what_it_recorded() -> None:
    """A format-2 checkpoint.json held fewer settings and the teacher as a path and a digest: only what it recorded
    is compared, its teacher by digest; a setting it did record still differs."""
    from tcd_sampler.distill.train_config import resume_differences

    cfg = TrainConfig(teacher="hub/teacher", data="d", output="o", lora_rank=4)
    old = {"step": 2, "teacher": "hub/teacher", "teacher_unet": None, "objective": cfg.fingerprint()["objective"],
           "lora_rank": 4, "lora_alpha": None, "lora_targets": "default", "batch_size": 4, "seed": 0}  # fmt: skip
    assert resume_differences(old, cfg) == ({}, {})
    assert resume_differences({**old, "seed": 1}, cfg) == ({"seed": "1 → 0"}, {})
    local = TrainConfig(teacher="/nowhere/teacher", data="d", output="o", lora_rank=4)
    assert resume_differences({**old, "teacher": "/elsewhere"}, local)[0] == {
        "teacher": "/elsewhere → /nowhere/teacher"
    }


def test_a_changed_lr_follows_the_schedule_from_the_resume_point(tmp_path: Path, made: tuple[str, str]) -> None:
    """Under a linear decay, a resume with another --lr continues the schedule at its step with the new base: the
    learning rate after step 4 is new_lr · λ(4), where the first run had old_lr · λ(4)."""
    cfg = config(tmp_path, *made, steps=6, checkpoint_every=1, lr_scheduler="linear", lr_warmup_steps=1)
    train(cfg, progress=False)
    root = Path(cfg.output) / "checkpoints"
    first = json.loads((root / "step-00000004" / "state.json").read_text())
    for step in (4, 5, 6):
        (root / f"step-{step:08d}").rename(tmp_path / f"old-{step}")
    train(dataclasses.replace(cfg, resume="latest", lr=2e-3, allow_changes=("lr",)), progress=False)
    again = json.loads((root / "step-00000004" / "state.json").read_text())
    factor = (6 - 4) / (6 - 1)  # diffusers' linear decay after one warm-up step
    assert first["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * factor)
    assert again["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-3 * factor)
    assert again["lr_scheduler"]["base_lrs"] == [2e-3]


def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_one(
    tmp_path: Path, made: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """One flipped byte in the newest checkpoint's tensors: ``--resume latest`` says so, names the one it uses
    instead, and ends as an uninterrupted run would (bit-identical)."""
    t, data = made
    whole = config(tmp_path, t, data, output=str(tmp_path / "whole"), steps=3)
    train(whole, progress=False)
    cfg = config(tmp_path, t, data, steps=2, checkpoint_every=1)
    train(cfg, progress=False)
    tensors = Path(cfg.output) / "checkpoints" / "step-00000002" / "tensors.safetensors"
    data_bytes = bytearray(tensors.read_bytes())
    data_bytes[-3] ^= 0x10
    tensors.write_bytes(bytes(data_bytes))
    capsys.readouterr()
    card = train(dataclasses.replace(cfg, resume="latest", steps=3, allow_changes=("steps",)), progress=False)
    err = capsys.readouterr().err
    assert "step-00000002" in err and "step-00000001" in err and card["this_run"]["first_step"] == 1
    a, b = weights(whole.output), weights(cfg.output)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_flow_transformer_teacher_is_refused_before_it_loads(
    tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SD3 and FLUX pipelines (tiny, saved here): exit 2, one line naming the transformer and what is supported,
    before the teacher loads."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    import tiny_pipelines
    from tcd_sampler.cli import main

    folder = tmp_path / family
    getattr(tiny_pipelines, family)(FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(folder)
    monkeypatch.setattr(train_module, "load_pipeline", lambda teacher: pytest.fail("the teacher was loaded"))
    capsys.readouterr()
    argv = ["train", "--teacher", str(folder), "--data", images(tmp_path), "--output", str(tmp_path / "out")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    name = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}[family]
    assert len(err.splitlines()) == 1 and name in err and "UNet2DConditionModel pipelines" in err, err


def test_a_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(
    tmp_path: Path, made: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Resuming step 1 of a run that reached step 3: steps 2 and 3 are renamed ``*.superseded`` (kept, but never
    taken by ``--resume latest`` again), and the resumed run writes its own."""
    cfg = config(tmp_path, *made, steps=3, checkpoint_every=1)
    train(cfg, progress=False)
    root = Path(cfg.output) / "checkpoints"
    capsys.readouterr()
    card = train(dataclasses.replace(cfg, resume=str(root / "step-00000001"), steps=2, allow_changes=("steps",)),
                 progress=False)  # fmt: skip
    assert card["this_run"]["first_step"] == 1
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-00000001", "step-00000002", "step-00000002.superseded", "step-00000003.superseded"]
    assert "renamed step-00000003.superseded" in capsys.readouterr().err


def test_a_teacher_with_another_schedule_is_another_run(tmp_path: Path, made: tuple[str, str]) -> None:
    """The teacher's noise schedule is part of the run: the same UNet with another prediction type in its scheduler
    config is refused on resume, naming teacher_schedule."""
    t, data = made
    cfg = config(tmp_path, t, data, steps=1, checkpoint_every=1)
    train(cfg, progress=False)
    settings = Path(t) / "scheduler" / "scheduler_config.json"
    settings.write_text(settings.read_text().replace('"epsilon"', '"v_prediction"'))
    with pytest.raises(ValueError, match=r"from another run \(teacher_schedule: "):
        train(dataclasses.replace(cfg, resume="latest"), progress=False)


def test_skip_in_the_middle_of_a_run(tmp_path: Path, made: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A skipped step between good ones: the card lists it, the steps after it train on (finite losses and
    weights), and a checkpoint written after it resumes."""
    cfg = config(tmp_path, *made, steps=4, checkpoint_every=3, on_nonfinite="skip")
    inject(monkeypatch, 2, "gradient")
    card = train(cfg, progress=False)
    assert card["skipped_steps"] == [2] and card["losses"][1] is None
    assert all(loss is not None and loss > 0 for i, loss in enumerate(card["losses"]) if i != 1)
    assert all(torch.isfinite(w).all() for w in weights(cfg.output).values())
    state = json.loads((Path(cfg.output) / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["losses"][1] is None
