"""The trainer's arrangement at scale, on tiny local teachers: a LoRA student shares one frozen base with its teacher
(held in the run's precision, the adapters in float32), runs under bf16 autocast on the CPU with validation and
export, LoRA and full; the launcher's precision is taken; gradient checkpointing changes the memory, not the update;
learning-rate schedules resume; old checkpoints are pruned; DeepSpeed and a missing 8-bit optimizer are refused before
a model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tcd_sampler.distill.models import ATTENTION_TARGETS, AdaptersOff, build_models, load_pipeline
from tcd_sampler.distill.teachers import Conditioning, network
from tcd_sampler.distill.train import train
from test_train import SAME_UPDATE, config, images, initial_weights, teacher, update_difference, weights


def _inputs(unet: Any, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    return x.to(dtype), torch.tensor([999, 499]), Conditioning(text.to(dtype))


def test_a_lora_student_and_its_teacher_share_one_base(tmp_path: Path) -> None:
    """One UNet: the teacher's pass is the student's with the adapters off, so it equals the untouched teacher's
    output exactly, even after the adapters moved away from zero; under bf16 the base is bf16 and only the adapters
    (what the optimizer holds) are float32."""
    t = teacher(tmp_path)
    cfg = config(tmp_path, t, images(tmp_path))
    run = build_models(cfg, load_pipeline(t))
    assert isinstance(run.teacher, AdaptersOff) and run.teacher.module is run.student is run.target
    with torch.no_grad():
        for name, p in run.student.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained LoRA: the student's output differs from the teacher's
    plain = load_pipeline(t).unet.eval()
    x, steps, cond = _inputs(plain)
    with torch.no_grad():
        expected = network(plain, cond)(x, steps)
        assert torch.equal(network(run.teacher, cond)(x, steps), expected)
        assert not torch.allclose(network(run.student, cond)(x, steps), expected)
        assert torch.equal(network(run.teacher, cond)(x, steps), expected)  # the adapters are back on after it
    assert all(p.requires_grad for p in run.trainable)

    half = build_models(cfg, load_pipeline(t), torch.bfloat16)
    dtypes = {(p.requires_grad, p.dtype) for p in half.student.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    assert {id(p) for g in half.optimizer.param_groups for p in g["params"]} == {id(p) for p in half.trainable}


def test_lora_targets_and_parameter_counts(tmp_path: Path) -> None:
    """The default targets adapt the convolutions and feed-forward layers too (LCM-LoRA's list); ``"attention"`` and
    an explicit list adapt only what they name; the card records them."""
    t = teacher(tmp_path)
    counts = {}
    for targets in ("default", "attention", ("to_q",)):
        run = build_models(config(tmp_path, t, "unused", lora_targets=targets), load_pipeline(t))
        names = [n for n, p in run.student.named_parameters() if p.requires_grad]
        counts[targets] = sum(p.numel() for p in run.trainable)
        if targets == "attention":
            assert all(any(f".{m}.lora_" in n for m in ATTENTION_TARGETS) for n in names)
        if targets == ("to_q",):
            assert names and all(".to_q.lora_" in n for n in names)
    assert counts["default"] > counts["attention"] > counts[("to_q",)] > 0
    with pytest.raises(ValueError, match="lora_targets must be one of"):
        config(tmp_path, t, "x", lora_targets="everything")
    with pytest.raises(ValueError, match="lora_targets must be"):
        config(tmp_path, t, "x", lora_targets=("to_q", ""))


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [4, 0])
def test_bf16_runs_validate_and_export(tmp_path: Path, lora_rank: int) -> None:
    """Under bf16 autocast on the CPU a LoRA and a full student train, write a validation grid (the full student's
    float32 EMA in a pipeline of bf16 encoders), checkpoint and export finite float32 weights; the card records
    the precision."""
    t, data = teacher(tmp_path), images(tmp_path)
    cfg = config(tmp_path, t, data, lora_rank=lora_rank, mixed_precision="bf16", steps=2, validation_every=2,
                 gradient_checkpointing=True)  # fmt: skip
    card = train(cfg, progress=False)
    assert card["config"]["mixed_precision"] == "bf16"
    assert (Path(cfg.output) / "validation" / "step-00000002.png").is_file()
    saved = weights(cfg.output)
    assert saved and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    from safetensors.torch import load_file

    out = Path(cfg.output)
    file = (
        out / "pytorch_lora_weights.safetensors" if lora_rank else out / "unet" / "diffusion_pytorch_model.safetensors"
    )
    exported = load_file(str(file))
    assert exported and all(torch.isfinite(v).all() for v in exported.values())


def test_the_launchers_precision_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerate launch --mixed_precision bf16`` (its environment variable) sets the run's precision when the
    config leaves it unset; an explicit setting wins."""
    t, data = teacher(tmp_path), images(tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    card = train(config(tmp_path, t, data, steps=1, output=str(tmp_path / "a")), progress=False)
    assert card["config"]["mixed_precision"] == "bf16"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # a new process
    card = train(config(tmp_path, t, data, steps=1, output=str(tmp_path / "b"), mixed_precision="no"), progress=False)
    assert card["config"]["mixed_precision"] == "no"


def test_gradient_checkpointing_makes_the_same_update(tmp_path: Path) -> None:
    t, data = teacher(tmp_path), images(tmp_path)
    plain = config(tmp_path, t, data, steps=2, output=str(tmp_path / "plain"))
    train(plain, progress=False)
    checkpointed = config(tmp_path, t, data, steps=2, output=str(tmp_path / "ckpt"), gradient_checkpointing=True)
    train(checkpointed, progress=False)
    assert update_difference(weights(plain.output), weights(checkpointed.output), initial_weights(plain)) < SAME_UPDATE


def test_lr_schedule_resumes_and_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    """A linear warm-up then decay: a run resumed from step 2 ends as an uninterrupted one (the schedule's state is
    in the checkpoint) with the learning rate the schedule gives; only the newest ``checkpoints_total_limit``
    checkpoints remain."""
    t, data = teacher(tmp_path), images(tmp_path)
    kw: dict[str, Any] = {"steps": 4, "checkpoint_every": 1, "lr_scheduler": "linear", "lr_warmup_steps": 2}
    whole = config(tmp_path, t, data, output=str(tmp_path / "whole"), **kw)
    train(whole, progress=False)
    # the first part ran a 2-step schedule; resume the 4-step one's state from the whole run's step-2 checkpoint
    step2 = Path(whole.output) / "checkpoints" / "step-00000002"
    resumed = config(tmp_path, t, data, output=str(tmp_path / "cut"), resume=str(step2), checkpoints_total_limit=2,
                     **kw)  # fmt: skip
    train(resumed, progress=False)
    a, b = weights(whole.output), weights(resumed.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(p.name for p in (Path(resumed.output) / "checkpoints").glob("step-*"))
    assert kept == ["step-00000003", "step-00000004"]
    state = json.loads((Path(whole.output) / "checkpoints" / "step-00000001" / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(whole.lr / 2)  # half-way up the warm-up


def test_warm_up_with_the_default_constant_schedule(tmp_path: Path) -> None:
    """``lr_warmup_steps`` warms up the default ``"constant"`` schedule too (diffusers' ``"constant"`` ignores it)."""
    t, data = teacher(tmp_path), images(tmp_path)
    cfg = config(tmp_path, t, data, steps=2, checkpoint_every=1, lr_warmup_steps=2)
    train(cfg, progress=False)
    state = json.loads((Path(cfg.output) / "checkpoints" / "step-00000001" / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr / 2)


def test_deepspeed_and_missing_optimizer_are_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import importlib.util

    import tcd_sampler.distill.train as train_module
    from tcd_sampler.cli import main

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model loaded")

    monkeypatch.setattr(train_module, "load_pipeline", no_load)
    t, data = teacher(tmp_path), images(tmp_path)
    base = ["train", "--teacher", t, "--data", data, "--output", str(tmp_path / "run"), "--resolution", "32"]
    capsys.readouterr()  # what making the teacher printed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DeepSpeed is not supported" in err and "FSDP" in err
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate's plugin: --fsdp is the way
    assert main(base) == 2
    assert "--fsdp" in capsys.readouterr().err
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    if importlib.util.find_spec("bitsandbytes") is None:
        assert main([*base, "--optimizer", "adamw8bit"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "bitsandbytes" in err
    assert main([*base, "--lora-targets", "to_q,,to_k"]) == 2
    assert "--lora-targets" in capsys.readouterr().err


def test_a_card_records_the_run_settings(tmp_path: Path) -> None:
    t, data = teacher(tmp_path), images(tmp_path)
    cfg = config(tmp_path, t, data, steps=1, lora_targets="attention", lr_scheduler="cosine", lr_warmup_steps=1)
    train(cfg, progress=False)
    card = json.loads((Path(cfg.output) / "card.json").read_text())
    assert card["config"]["lora_targets"] == "attention" and card["config"]["lr_scheduler"] == "cosine"


def test_the_vae_encodes_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most ``VAE_PIXELS`` pixels a VAE call (one image at least), with the latents of one call."""
    import tcd_sampler.distill.teachers as teachers

    pipe = load_pipeline(teacher(tmp_path))
    pixels = torch.rand(5, 3, 32, 32) * 2 - 1
    whole = teachers.encode_latents(pipe, pixels)
    sizes: list[int] = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x: sizes.append(x.shape[0]) or encode(x))
    monkeypatch.setattr(teachers, "VAE_PIXELS", 2 * 32 * 32)
    torch.testing.assert_close(teachers.encode_latents(pipe, pixels), whole, rtol=1e-5, atol=1e-6)
    assert sizes == [2, 2, 1]
    monkeypatch.setattr(teachers, "VAE_PIXELS", 100)  # smaller than one image: one a call
    sizes.clear()
    teachers.encode_latents(pipe, pixels)
    assert sizes == [1] * 5


RANK_FAILS = """
import os, sys
import tcd_sampler.distill.train as train_module
from tcd_sampler.cli import main
real = train_module.check_checkpoint
def wrapped(folder, *args, **kwargs):
    if os.environ.get("RANK") == "1":
        raise OSError(f"[Errno 2] No such file or directory: '{folder}/checkpoint.json' (node-local output)")
    return real(folder, *args, **kwargs)
train_module.check_checkpoint = wrapped
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_a_process_that_cannot_read_the_checkpoint_stops_all(tmp_path: Path, fsdp: bool) -> None:
    """Two gloo processes resume ``latest``: the main process picks the checkpoint, and when the other cannot read
    it (node-local output on another machine) both stop with an error naming that process; none hangs — sharded
    too, where the load itself is a collective (the local checks run on every process first)."""
    import os
    import subprocess
    import sys

    from test_train import REPO, cli_args, free_port

    t, data = teacher(tmp_path), images(tmp_path)
    rank = {"lora_rank": 0} if fsdp else {}
    cfg = config(tmp_path, t, data, steps=2, checkpoint_every=1, **rank)
    train(cfg, progress=False)
    longer = config(tmp_path, t, data, steps=3, checkpoint_every=1, **rank)
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    # more steps, and the CLI's data options (the in-process run's min_size is not the CLI's default)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(script), *cli_args(longer), "--resume", "latest", "--allow-change",
           "steps,data_options"]  # fmt: skip
    cmd += ["--fsdp"] if fsdp else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "resume: reading checkpoint" in done.stderr and "failed on process 1" in done.stderr, done.stderr[-2000:]
    assert "step-00000002" in done.stderr


@pytest.mark.slow
def test_a_full_student_sharded_over_two_processes(tmp_path: Path) -> None:
    """``--fsdp`` with two gloo processes: the full student, its EMA target and AdamW's state sharded by FSDP2; the
    same update as one unsharded process (within float32 summation), a validation grid sampled by both processes
    and written by one, sharded checkpoints that resume, and one plain ``unet/`` exported."""
    import os
    import subprocess
    import sys

    from diffusers import UNet2DConditionModel

    from tcd_sampler.distill.data import DataOptions
    from tcd_sampler.distill.train import TrainConfig
    from test_train import REPO, cli_args, free_port

    t, data = teacher(tmp_path), images(tmp_path)
    kw: dict[str, Any] = {"lora_rank": 0, "steps": 3, "checkpoint_every": 2}
    one = config(tmp_path, t, data, output=str(tmp_path / "one"), **kw)
    train(TrainConfig(**{**one.__dict__, "data_options": DataOptions(min_size=16, caption_dropout=0.0)}),
          progress=False)  # fmt: skip
    two = config(tmp_path, t, data, output=str(tmp_path / "two"), **kw)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
    ]
    args = [*cli_args(two), "--fsdp", "--validation-every", "3", "--data-workers", "0"]  # fmt: skip
    done = subprocess.run([*launch, str(free_port()), "-m", "tcd_sampler.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert update_difference(weights(one.output), weights(two.output), initial_weights(one)) < SAME_UPDATE
    out = Path(two.output)
    assert (out / "validation" / "step-00000003.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000002").glob("shard-*.safetensors"))
    exported = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    plain = UNet2DConditionModel.from_pretrained(Path(one.output) / "unet").state_dict()
    start = UNet2DConditionModel.from_pretrained(Path(t) / "unet").state_dict()  # the EMA target starts as the teacher
    assert update_difference(plain, exported, start) < SAME_UPDATE
    # resumed by two processes from the sharded step-2 checkpoint: the same end
    (out / "card.json").unlink()
    resumed = subprocess.run([*launch, str(free_port()), "-m", "tcd_sampler.cli", *args, "--resume",
                              str(out / "checkpoints" / "step-00000002")], env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "card.json").read_text())["this_run"]["first_step"] == 2


DISK_FULL_ON_MAIN = """
import errno, os, sys
import safetensors.torch
from tcd_sampler.cli import main
real = safetensors.torch.save_file
def full(*args, **kwargs):
    if os.environ.get("RANK") == "0":
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(*args, **kwargs)
safetensors.torch.save_file = full
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_full_disk_on_the_main_process_stops_both(tmp_path: Path) -> None:
    """Two gloo processes (DDP): the main process cannot write its checkpoint (a full disk); it says so in one line
    naming the file, the other process stops too naming process 0, and neither waits forever."""
    import os
    import subprocess
    import sys

    from test_train import REPO, cli_args, free_port

    t, data = teacher(tmp_path), images(tmp_path)
    cfg = config(tmp_path, t, data, steps=2, checkpoint_every=1)
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_ON_MAIN)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(script), *cli_args(cfg)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "tensors.safetensors: no space left on device" in done.stderr, done.stderr[-2000:]
    assert "writing the checkpoint of step 1 failed on process 0" in done.stderr, done.stderr[-2000:]
    assert not list((Path(cfg.output) / "checkpoints").iterdir())
