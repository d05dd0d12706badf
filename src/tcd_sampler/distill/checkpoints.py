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

__all__ = ["CHECKPOINTS", "find_checkpoint", "load_checkpoint", "prune_checkpoints", "save_checkpoint"]

CHECKPOINTS = "checkpoints"


def save_checkpoint(
    student: Any, target: Any | None, optimizer: Any, config: TrainConfig, step: int, losses: list[float],
    scaler: Any = None, lr_scheduler: Any = None,
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
        lr_scheduler: the learning-rate schedule, whose state is saved; None (default) where there is none.
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
    if lr_scheduler is not None:
        state["lr_scheduler"] = lr_scheduler.state_dict()
    torch.save(state, tmp / "state.pt")
    (tmp / "checkpoint.json").write_text(json.dumps({"step": step, **config.fingerprint()}, indent=2))
    replace_folder(tmp, final)


def find_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint folder ``config.resume`` names (``"latest"``: the newest under ``<output>/checkpoints``), or
    None where there is nothing to resume (no ``resume``, or ``"latest"`` and none written yet)."""
    if config.resume is None:
        return None
    if config.resume != "latest":
        return Path(config.resume)
    root = Path(config.output) / CHECKPOINTS
    found = sorted(root.glob("step-*")) if root.is_dir() else []
    return found[-1] if found else None


def prune_checkpoints(config: TrainConfig, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest checkpoints under ``<output>/checkpoints`` (``keep`` 0: none removed);
    returns the folders removed."""
    root = Path(config.output) / CHECKPOINTS
    found = sorted(root.glob("step-*")) if keep and root.is_dir() else []
    old = found[: max(0, len(found) - keep)]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def load_checkpoint(
    folder: Path | None, student: Any, target: Any | None, optimizer: Any, config: TrainConfig, scaler: Any = None,
    lr_scheduler: Any = None,
) -> tuple[int, list[float]]:  # fmt: skip
    """Load the checkpoint in ``folder`` (:func:`find_checkpoint`; None: start, step 0) into ``student``, ``target``,
    ``optimizer`` (and fp16's ``scaler`` and the ``lr_scheduler``, where given and saved); returns the step it was
    taken at and the losses so far. ValueError where the folder is not a checkpoint or is from another run (its
    fingerprint differs)."""
    if folder is None:
        return 0, []
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
    if lr_scheduler is not None and "lr_scheduler" in state:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    return int(state["step"]), list(state["losses"])
