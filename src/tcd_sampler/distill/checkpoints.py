"""Checkpoints of a training run: the student's trainable weights, the EMA target, the optimizer and the step,
written to a temporary folder and renamed (never half-written), with the run's fingerprint so that resuming another
run's checkpoint is a clear error. One format for plain runs (one process, or DDP) and sharded ones
(:mod:`tcd_sampler.distill.sharding`), read without pickle.

A checkpoint folder ``<output>/checkpoints/step-<step>`` holds:

- ``checkpoint.json``: ``{"step": …, **config.fingerprint()}``, the run it belongs to;
- ``state.json``: ``format``, ``losses`` (one a step so far), ``optimizer`` (``param_groups``, their ``params`` by
  parameter name, and any state entry that is not a tensor), ``scaler`` (fp16's) and ``lr_scheduler`` state dicts;
- safetensors files of the tensors, by name: ``student.<parameter>`` (the trainable parameters only: a LoRA's
  adapters, a full student's all), ``target.<key>`` (the EMA target's state dict; none for a LoRA) and
  ``optimizer.<parameter>.<entry>`` (AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``). A plain run's main process
  writes them whole into ``tensors.safetensors``; in a sharded run every process writes its shards with
  ``torch.distributed.checkpoint``'s HuggingFace writer (``shard-<rank>-model-00001-of-00001.safetensors``, each
  shard's offsets in its file's header). torch.distributed.checkpoint's HuggingFace reader assembles either, so a
  checkpoint loads into a plain or a sharded run of any size, and :func:`checkpoint_tensors` reads it whole.

Every process calls :func:`save_checkpoint` and :func:`load_checkpoint`; only a sharded run's have collectives (and
barriers): a plain run's main process writes alone, and each process reads alone.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .._files import replace_folder
from .sharding import is_sharded
from .train_config import TrainConfig

__all__ = [
    "CHECKPOINTS",
    "checkpoint_tensors",
    "find_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

CHECKPOINTS = "checkpoints"
#: The version of the layout above (1: the pickled ``state.pt`` of earlier releases, no longer read).
FORMAT = 2
TENSORS = "tensors.safetensors"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``optimizer`` itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _sharded(student: Any, target: Any | None) -> bool:
    sharded = is_sharded(student)
    if target is not None and is_sharded(target) != sharded:
        raise ValueError("checkpoint: the student and its EMA target must both be sharded or both plain")
    return sharded


def _prefixed(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{key}": value for key, value in tensors.items()}


def _taken(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def _trainable(student: Any) -> set[str]:
    return {name for name, p in student.named_parameters() if p.requires_grad}


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict keyed by parameter name → its tensors (``<name>.<entry>``) and the rest (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict[str, Any]] = {}
    for name, entries in state["state"].items():
        for entry, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{entry}"] = value
            else:
                rest.setdefault(name, {})[entry] = value
    return tensors, {"param_groups": state["param_groups"], "state": rest}


def _joined_optimizer(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_split_optimizer`."""
    state: dict[str, dict[str, Any]] = {name: dict(entries) for name, entries in saved["state"].items()}
    for key, value in tensors.items():
        name, entry = key.rsplit(".", 1)
        state.setdefault(name, {})[entry] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def _with_types(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A parameter group read from JSON with the tuples (AdamW's ``betas``) the optimizer's own group has."""
    return {key: tuple(value) if isinstance(current.get(key), tuple) else value for key, value in saved.items()}


def _names_by_index(student: Any, optimizer: Any) -> dict[int, str]:
    """The parameter name of each index of ``optimizer.state_dict()``."""
    names = {id(p): name for name, p in student.named_parameters()}
    indices = [i for group in optimizer.state_dict()["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(id(p) not in names for p in params):
        raise ValueError("checkpoint: the optimizer trains a parameter that is not the student's")
    return {i: names[id(p)] for i, p in zip(indices, params, strict=True)}


def _named_optimizer_state(student: Any, optimizer: Any) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameters by name (``get_optimizer_state_dict``'s form)."""
    own, names = optimizer.state_dict(), _names_by_index(student, optimizer)
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in own["param_groups"]]
    return {"state": {names[i]: entries for i, entries in own["state"].items()}, "param_groups": groups}


def _load_named_optimizer_state(student: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a state dict with parameters by name (:func:`_named_optimizer_state`) into ``optimizer``."""
    indices = {name: i for i, name in _names_by_index(student, optimizer).items()}
    unknown = sorted({n for g in state["param_groups"] for n in g["params"]} - indices.keys())
    if unknown:
        raise ValueError(f"resume: the checkpoint's optimizer trains parameters the student lacks ({unknown[:3]})")
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(state["param_groups"]):
        raise ValueError("resume: the checkpoint's optimizer has another number of parameter groups")
    groups = [{**_with_types(saved, now), "params": [indices[n] for n in saved["params"]]}
              for saved, now in zip(state["param_groups"], current, strict=True)]  # fmt: skip
    optimizer.load_state_dict({"state": {indices[n]: e for n, e in state["state"].items()}, "param_groups": groups})


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, indent=1)
    except TypeError as error:
        raise ValueError(f"checkpoint: the {what} is not JSON-serialisable ({error})") from None


def save_checkpoint(
    student: Any, target: Any | None, optimizer: Any, config: TrainConfig, step: int, losses: list[float],
    scaler: Any = None, lr_scheduler: Any = None,
) -> None:  # fmt: skip
    """Write the state after ``step`` steps to ``<output>/checkpoints/step-<step>`` (a temporary folder, renamed when
    complete). Every process calls this: a plain run's main process writes it all and the others return at once (no
    collective: a call on the main process alone does the same); a sharded run's processes each write their shards,
    the main process renames the folder after a barrier, and all return after another.

    Args:
        student: the (unwrapped) student, plain or sharded; its trainable parameters are saved.
        target: the EMA target (sharded where the student is), or None where the student is its own target (LoRA).
        optimizer: the optimizer (accelerate's wrapper or torch's), whose state is saved.
        config: the run (its output folder and fingerprint).
        step: the steps taken.
        losses: the loss of every step so far.
        scaler: fp16's gradient scaler, whose state is saved; None (default) where there is none.
        lr_scheduler: the learning-rate schedule, whose state is saved; None (default) where there is none.
    """
    sharded, main = _sharded(student, target), not _distributed() or torch.distributed.get_rank() == 0
    if not (main or sharded):
        return
    root = Path(config.output) / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's
        tmp.mkdir()
    optimizer = _unwrapped(optimizer)
    if sharded:
        _barrier()  # the folder exists
        saved_optimizer = _save_sharded(tmp, student, target, optimizer)
    else:
        saved_optimizer = _save_plain(tmp, student, target, optimizer)
    if main:
        state: dict[str, Any] = {"format": FORMAT, "losses": [float(x) for x in losses], "optimizer": saved_optimizer}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if lr_scheduler is not None:
            state["lr_scheduler"] = lr_scheduler.state_dict()
        (tmp / "state.json").write_text(_json(state, "training state"))
        (tmp / "checkpoint.json").write_text(json.dumps({"step": step, **config.fingerprint()}, indent=2))
    if sharded:
        _barrier()  # every process has written its shards
    if main:
        replace_folder(tmp, final)
    if sharded:
        _barrier()


def _save_plain(tmp: Path, student: Any, target: Any | None, optimizer: Any) -> dict[str, Any]:
    """Write a plain run's tensors whole; returns the optimizer's JSON part."""
    import safetensors.torch

    optimizer_tensors, rest = _split_optimizer(_named_optimizer_state(student, optimizer))
    trainable = _trainable(student)
    tensors = _prefixed("student.", {n: p for n, p in student.named_parameters() if n in trainable})
    tensors |= _prefixed("target.", {} if target is None else target.state_dict())
    tensors |= _prefixed("optimizer.", optimizer_tensors)
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    return rest


def _sharded_tensors(student: Any, target: Any | None, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sharded run's tensors (this process's DTensor shards, named as in a plain checkpoint) and the optimizer's
    JSON part."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trainable = _trainable(student)
    optimizer_tensors, rest = _split_optimizer(get_optimizer_state_dict(student, optimizer))
    tensors = _prefixed("student.", {k: v for k, v in get_model_state_dict(student).items() if k in trainable})
    tensors |= _prefixed("target.", {} if target is None else get_model_state_dict(target))
    return tensors | _prefixed("optimizer.", optimizer_tensors), rest


def _save_sharded(tmp: Path, student: Any, target: Any | None, optimizer: Any) -> dict[str, Any]:
    """Write this process's shards (a collective); returns the optimizer's JSON part."""
    import torch.distributed.checkpoint as dcp

    tensors, rest = _sharded_tensors(student, target, optimizer)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    return rest


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


def check_checkpoint(folder: Path, config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checks of the checkpoint in ``folder`` that read only local files (``checkpoint.json`` and the run's
    fingerprint, ``state.json``, the tensor files' headers), no collective: a run with several processes runs them
    on every process first, so that one that cannot read the folder stops all before the sharded load's
    collectives. Returns ``checkpoint.json`` and ``state.json``; ValueError as :func:`load_checkpoint`."""
    meta_path = folder / "checkpoint.json"
    if not meta_path.is_file():
        raise ValueError(f"resume: {folder} is not a checkpoint folder (no checkpoint.json)")
    meta = json.loads(meta_path.read_text())
    expected = json.loads(json.dumps(config.fingerprint()))
    changed = sorted(k for k in expected if meta.get(k) != expected[k])
    if changed:
        raise ValueError(f"resume: checkpoint {folder} is from another run (its {', '.join(changed)} differ)")
    state = _state(folder)
    _tensor_files(folder)
    return meta, state


def load_checkpoint(
    folder: Path | None, student: Any, target: Any | None, optimizer: Any, config: TrainConfig, scaler: Any = None,
    lr_scheduler: Any = None,
) -> tuple[int, list[float]]:  # fmt: skip
    """Load the checkpoint in ``folder`` (:func:`find_checkpoint`; None: start, step 0) into ``student``, ``target``,
    ``optimizer`` (and fp16's ``scaler`` and the ``lr_scheduler``, where given and saved), plain or sharded, from a
    checkpoint of a plain or a sharded run; returns the step it was taken at and the losses so far. Every process
    calls this (a sharded student's load is a collective). ValueError where the folder is not a checkpoint, is from
    another run (its fingerprint differs) or a file is damaged — raised by every process alike, before any
    collective, where the processes see the same files."""
    if folder is None:
        return 0, []
    folder = Path(folder)
    meta, state = check_checkpoint(folder, config)
    optimizer = _unwrapped(optimizer)
    if _sharded(student, target):
        _load_sharded(folder, state, student, target, optimizer)
    else:
        _load_plain(folder, state, student, target, optimizer)
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if lr_scheduler is not None and "lr_scheduler" in state:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    return int(meta["step"]), [float(x) for x in state["losses"]]


def _state(folder: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint in ``folder``, checked to be of this :data:`FORMAT`."""
    path = folder / "state.json"
    if not path.is_file():
        old = " (a pickled state.pt of an earlier release, no longer read)" if (folder / "state.pt").exists() else ""
        raise ValueError(f"resume: checkpoint {folder} has no state.json{old}")
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"resume: {path} is damaged ({error})") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"resume: checkpoint {folder} is of format {state.get('format')!r}, not {FORMAT}")
    return state


def _tensor_files(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint in ``folder``; ValueError naming one that is truncated or damaged."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {folder} has no tensor files (*.safetensors)")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as opened:
                opened.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(f"checkpoint tensor file {file} is truncated or damaged ({error})") from None
    return files


def _read(folder: Path, template: dict[str, Any], no_dist: bool) -> None:
    """Fill ``template`` (tensors or DTensors, by checkpoint name) from the checkpoint in ``folder`` in place;
    ``no_dist``: this process alone (else a collective of the default group)."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # dcp.load warns of a load in one process, even where asked for one
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(template, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=no_dist)
    except dcp.CheckpointException as error:
        cause = next(iter(error.failures.values()))[0]
        raise ValueError(f"checkpoint {folder} cannot be read ({type(cause).__name__}: {cause})") from None


def _read_whole(folder: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix`` of the checkpoint in ``folder``, whole, on the CPU (assembled
    from a sharded run's shards), read by this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = dcp.HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    tensors = {name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in stored.items()
               if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}  # fmt: skip
    _read(folder, tensors, no_dist=True)
    return tensors


def checkpoint_tensors(folder: Path | str) -> dict[str, torch.Tensor]:
    """The student's saved (trainable) tensors of the checkpoint in ``folder``, by parameter name, whole (a sharded
    run's assembled), on the CPU; ValueError naming a truncated or damaged tensor file."""
    _tensor_files(Path(folder))
    return _taken("student.", _read_whole(Path(folder), "student."))


def _load_plain(folder: Path, state: dict[str, Any], student: Any, target: Any | None, optimizer: Any) -> None:
    tensors = _read_whole(folder)
    saved, params = _taken("student.", tensors), dict(student.named_parameters())
    if saved.keys() != _trainable(student):
        missing = sorted(saved.keys() ^ _trainable(student))
        raise ValueError(f"resume: checkpoint {folder} holds other trainable parameters than the student's "
                         f"({missing[:3]})")  # fmt: skip
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
        if target is not None and any(key.startswith("target.") for key in tensors):
            target.load_state_dict(_taken("target.", tensors))
    named = _joined_optimizer(_taken("optimizer.", tensors), state["optimizer"])
    _load_named_optimizer_state(student, optimizer, named)


def _load_sharded(folder: Path, state: dict[str, Any], student: Any, target: Any | None, optimizer: Any) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    tensors, _ = _sharded_tensors(student, target, optimizer)  # this process's shards, as templates
    _read(folder, tensors, no_dist=False)
    set_model_state_dict(student, _taken("student.", tensors), options=StateDictOptions(strict=False))
    if target is not None:
        set_model_state_dict(target, _taken("target.", tensors))
    named = _joined_optimizer(_taken("optimizer.", tensors), state["optimizer"])
    current = optimizer.state_dict()["param_groups"]
    named["param_groups"] = [_with_types(g, now) for g, now in zip(named["param_groups"], current, strict=True)]
    set_optimizer_state_dict(student, optimizer, named)
