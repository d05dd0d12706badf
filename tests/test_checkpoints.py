"""Checkpoints in one process: a LoRA's and a full student's state (weights, EMA target, AdamW, fp16's scaler, the
learning-rate schedule) restored without pickle continue to the bit as an uninterrupted run; a folder that is not a
checkpoint, another run's, or a damaged tensor file is a clear ValueError."""

from __future__ import annotations

import copy
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tcd_sampler.distill.checkpoints import checkpoint_tensors, find_checkpoint, load_checkpoint, save_checkpoint
from tcd_sampler.distill.losses import ema_update
from tcd_sampler.distill.train_config import TrainConfig

pytest.importorskip("diffusers")


def tiny_unet() -> Any:
    """benchmarks/bench_train.py's "tiny SD (8, 16)" UNet, seeded."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                attention_head_dim=2, cross_attention_dim=16)  # fmt: skip


@dataclass
class Run:
    student: Any
    target: Any
    optimizer: Any
    schedule: Any
    scaler: Any
    losses: list[float]


def make(lora: bool, lora_seed: int = 0) -> Run:
    """A LoRA student (its own target) or a full student with an EMA target, AdamW, a linear warm-up and decay,
    and a gradient scaler (its state only: the run is float32)."""
    from diffusers.optimization import get_scheduler

    student = tiny_unet()
    if lora:
        peft = pytest.importorskip("peft")
        student.requires_grad_(False)
        torch.manual_seed(lora_seed)
        adapter = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
        student.add_adapter(adapter)
        target = None
    else:
        target = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10 if lora_seed == 0 else 2.0**16)
    return Run(student, target, optimizer, schedule, scaler, [])


def train(run: Run, steps: range) -> None:
    for k in steps:
        g = torch.Generator().manual_seed(k)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g)
        text = torch.randn(2, 3, 16, generator=g)
        run.optimizer.zero_grad()
        out = run.student(x, t, encoder_hidden_states=text).sample
        loss = (out - x).pow(2).mean()
        loss.backward()
        run.optimizer.step()
        run.schedule.step()
        if run.target is not None:
            ema_update(run.target, run.student, 0.9)
        run.losses.append(loss.item())


def state(run: Run) -> dict[str, torch.Tensor]:
    """Every tensor a run's continuation depends on, copied."""
    out = {f"student.{n}": p.detach().clone() for n, p in run.student.named_parameters()}
    if run.target is not None:
        out |= {f"target.{k}": v.clone() for k, v in run.target.state_dict().items()}
    for i, entries in run.optimizer.state_dict()["state"].items():
        out |= {f"optimizer.{i}.{k}": v.clone() for k, v in entries.items()}
    return out


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def run_config(tmp_path: Path, lora: bool, **kw: Any) -> TrainConfig:
    return TrainConfig(teacher=str(tmp_path / "teacher"), data=str(tmp_path / "data"), output=str(tmp_path / "run"),
                       **{"lora_rank": 4 if lora else 0, **kw})  # fmt: skip


def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a checkpoint was unpickled")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(owner, name, refused)


def save(run: Run, cfg: TrainConfig, step: int) -> Path:
    save_checkpoint(run.student, run.target, run.optimizer, cfg, step, run.losses, run.scaler, run.schedule)
    folder = find_checkpoint(TrainConfig(**{**cfg.__dict__, "resume": "latest"}))
    assert folder is not None and folder.name == f"step-{step:08d}"
    return folder


@pytest.mark.parametrize("lora", [True, False])
def test_a_restored_run_continues_bit_identical(tmp_path: Path, lora: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two steps, a checkpoint, two more; a fresh run (another LoRA initialisation, another scaler) restored from the
    checkpoint holds the same tensors and ends, two steps later, with the same weights, target, AdamW moments and
    learning rate to the bit. The checkpoint's tensors are the trainable ones only (a LoRA's adapters)."""
    cfg = run_config(tmp_path, lora)
    whole = make(lora)
    train(whole, range(2))
    at_two = state(whole)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", None)  # nothing pickled on the way out either
        folder = save(whole, cfg, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "state.json", "tensors.safetensors"]
    assert not list(folder.parent.glob(".tmp-*"))
    train(whole, range(2, 4))

    resumed = make(lora, lora_seed=1)
    with monkeypatch.context() as patch:
        no_unpickling(patch)
        step, losses = load_checkpoint(folder, resumed.student, resumed.target, resumed.optimizer, cfg, resumed.scaler,
                                       resumed.schedule)  # fmt: skip
    assert step == 2 and losses == whole.losses[:2]
    assert_equal(state(resumed), at_two)
    assert resumed.scaler.state_dict() == make(lora).scaler.state_dict()
    resumed.losses = losses
    train(resumed, range(2, 4))
    assert_equal(state(resumed), state(whole))
    assert resumed.losses == whole.losses
    assert resumed.schedule.state_dict() == whole.schedule.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]
    assert resumed.optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again, as AdamW's own

    saved = checkpoint_tensors(folder)
    trainable = {n for n, p in whole.student.named_parameters() if p.requires_grad}
    assert saved.keys() == trainable and (all("lora" in n for n in saved) if lora else len(saved) > 50)
    assert all(torch.equal(saved[n], at_two[f"student.{n}"]) for n in saved)


def test_the_state_files_are_json(tmp_path: Path) -> None:
    """checkpoint.json: the step and the run's fingerprint; state.json: the losses, AdamW's groups (parameters by
    name), the scaler's and the schedule's state."""
    cfg = run_config(tmp_path, lora=False)
    run = make(lora=False)
    train(run, range(1))
    folder = save(run, cfg, 1)
    meta = json.loads((folder / "checkpoint.json").read_text())
    assert meta == {"step": 1, **json.loads(json.dumps(cfg.fingerprint()))}
    saved = json.loads((folder / "state.json").read_text())
    assert saved["losses"] == run.losses and saved["lr_scheduler"]["last_epoch"] == 1
    assert saved["scaler"]["scale"] == 2.0**10
    group = saved["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(5e-4) and group["params"][0] == "conv_in.weight"


def test_bad_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, lora=True)
    run = make(lora=True)
    train(run, range(1))
    folder = save(run, cfg, 1)
    fresh = make(lora=True)
    args = (fresh.student, None, fresh.optimizer)
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        load_checkpoint(tmp_path, *args, cfg)
    with pytest.raises(ValueError, match=r"from another run \(its lora_rank differ\)"):
        load_checkpoint(folder, *args, run_config(tmp_path, lora=True, lora_rank=8))
    assert load_checkpoint(None, *args, cfg) == (0, [])

    tensors = folder / "tensors.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    for read in (lambda: load_checkpoint(folder, *args, cfg), lambda: checkpoint_tensors(folder)):
        with pytest.raises(ValueError, match=re.escape(str(tensors)) + " is truncated or damaged"):
            read()
    tensors.unlink()
    with pytest.raises(ValueError, match="no tensor files"):
        load_checkpoint(folder, *args, cfg)

    (folder / "state.json").unlink()
    (folder / "state.pt").write_bytes(b"an old pickle")
    with pytest.raises(ValueError, match=r"no state.json \(a pickled state.pt"):
        load_checkpoint(folder, *args, cfg)
