"""Checkpoints of a training run: the student's trainable weights, the EMA target, the optimizer and the step,
written to a temporary folder and renamed (never half-written), with the run's fingerprint so that resuming another
run's checkpoint is a clear error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .._files import replace_folder
from .train_config import TrainConfig

__all__ = ["CHECKPOINTS", "load_checkpoint", "save_checkpoint"]

CHECKPOINTS = "checkpoints"


def save_checkpoint(
    student: Any, target: Any | None, optimizer: Any, config: TrainConfig, step: int, losses: list[float],
    scaler: Any = None,
) -> None:  # fmt: skip
    """Write the state after ``step`` steps to ``<output>/checkpoints/step-<step>`` (a temporary folder, renamed).

    Args:
        student: the (unwrapped) student; its trainable parameters are saved.
        target: the EMA target, or None where the student is its own target (LoRA).
        optimizer: the optimizer, whose state is saved.
        config: the run (its output folder and fingerprint).
        step: the steps taken.
        losses: the loss of every step so far.
        scaler: fp16's gradient scaler, whose state is saved; None (default) where there is none.
    """
    root = Path(config.output) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {"student": {n: p.detach().cpu() for n, p in student.named_parameters() if p.requires_grad},
             "optimizer": optimizer.state_dict(), "step": step, "losses": losses}  # fmt: skip
    if target is not None:
        state["target"] = {k: v.detach().cpu() for k, v in target.state_dict().items()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    torch.save(state, tmp / "state.pt")
    (tmp / "checkpoint.json").write_text(json.dumps({"step": step, **config.fingerprint()}, indent=2))
    replace_folder(tmp, final)


def load_checkpoint(
    student: Any, target: Any | None, optimizer: Any, config: TrainConfig, scaler: Any = None
) -> tuple[int, list[float]]:
    """Load the checkpoint ``config.resume`` names (``"latest"``: the newest, or none yet: start) into ``student``,
    ``target`` and ``optimizer``; returns the step it was taken at and the losses so far. ValueError where the
    folder is not a checkpoint or is from another run (its fingerprint differs)."""
    if config.resume is None:
        return 0, []
    root = Path(config.output) / CHECKPOINTS
    if config.resume == "latest":
        found = sorted(root.glob("step-*")) if root.is_dir() else []
        if not found:
            return 0, []  # nothing written yet: start from the beginning
        folder = found[-1]
    else:
        folder = Path(config.resume)
    meta_path = folder / "checkpoint.json"
    if not meta_path.is_file():
        raise ValueError(f"resume: {folder} is not a checkpoint folder (no checkpoint.json)")
    meta = json.loads(meta_path.read_text())
    expected = json.loads(json.dumps(config.fingerprint()))
    changed = sorted(k for k in expected if meta.get(k) != expected[k])
    if changed:
        raise ValueError(f"resume: checkpoint {folder} is from another run (its {', '.join(changed)} differ)")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, value in state["student"].items():
            params[name].copy_(value)
        if "target" in state and target is not None:
            target.load_state_dict(state["target"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"]), list(state["losses"])
