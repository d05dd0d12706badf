"""Checkpoints of a training run: the student's trainable weights, the EMA target, the optimizer and the step,
written to a temporary folder, checked for space first, flushed to disk and renamed (never half-written), with the
sha256 of every file and the run's fingerprint, so that a damaged checkpoint or another run's is a clear error (and
``--resume latest`` falls back past a damaged one). One format for plain runs (one process, or DDP) and sharded ones
(:mod:`tcd_sampler.distill.sharding`), read without pickle.

A checkpoint folder ``<output>/checkpoints/step-<step>`` holds:

- ``checkpoint.json``, written last: ``{"step": …, **config.fingerprint(), **extra, "files": …, "checksum": …}``,
  the run it belongs to (``extra``: what the trainer records beside it); ``files``, the manifest, gives the
  ``sha256`` and the size in ``bytes`` of every other file by its name in the folder (every process's shards of a
  sharded run included); ``checksum``, the sha256 of the rest of ``checkpoint.json`` (canonical JSON, sorted keys);
- ``state.json``: ``format``, ``losses`` (one a step so far; null for a skipped step), ``optimizer``
  (``param_groups``, their ``params`` by parameter name, and ``state``: each parameter's state as JSON, where a
  tensor stands as ``{"__tensor__": <its name>}`` and a tuple as ``{"__tuple__": [...]}``, so nested dicts of
  tensors, such as an 8-bit optimizer's quantisation state, round-trip), ``scaler`` (fp16's) and ``lr_scheduler``
  state dicts;
- safetensors files of the tensors, by name: ``student.<parameter>`` (the trainable parameters only: a LoRA's
  adapters, a full student's all), ``target.<key>`` (the EMA target's state dict; none for a LoRA) and
  ``optimizer.<parameter>/<entry>[/<key or index>…]`` (AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``; each part
  with ``%`` and ``/`` escaped as ``%25`` and ``%2F``, so that no two parameters' names meet). A plain run's main
  process writes them whole into ``tensors.safetensors``; in a sharded run every process writes its shards with
  ``torch.distributed.checkpoint``'s HuggingFace writer (``shard-<rank>-model-00001-of-00001.safetensors``, each
  shard's offsets in its file's header). torch.distributed.checkpoint's HuggingFace reader assembles either, so a
  checkpoint loads into a plain or a sharded run of any size, and :func:`checkpoint_tensors` reads it whole.

:data:`FORMAT` 3 is this layout; format 2 (the previous release: no manifest, optimizer tensors named
``optimizer.<parameter>.<entry>``, non-tensor entries as plain JSON) is still read, with a
:class:`CheckpointWarning` that its files cannot be verified.

Every process calls :func:`save_checkpoint` and :func:`load_checkpoint`; only a sharded run's have collectives: a
plain run's main process writes alone, and each process reads alone. A save that fails (a full disk, caught before
writing where the estimate shows it, a read-only one) removes its temporary folder and raises one OSError naming
the file and the cause, on every process of a sharded run, on the main process of a plain one (the trainer passes
it on to the others); the checkpoints already written stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .._checksums import file_sha256 as _sha256
from .._files import replace_folder, space_problem, storage_problem
from .sharding import is_sharded, local_tensor
from .train_config import TrainConfig, resume_differences

__all__ = [
    "CHECKPOINTS",
    "CheckpointWarning",
    "DamagedCheckpointError",
    "check_checkpoint",
    "checkpoint_folders",
    "checkpoint_tensors",
    "find_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

CHECKPOINTS = "checkpoints"
_STEP_NAME = re.compile(r"step-\d{8,}")
#: The version of the layout above (1: the pickled ``state.pt`` of earlier releases, no longer read; 2: read).
FORMAT = 3
READABLE = (2, 3)
META, STATE, TENSORS = "checkpoint.json", "state.json", "tensors.safetensors"
_TENSOR, _TUPLE = "__tensor__", "__tuple__"
#: The margin of a checkpoint's size estimate (the tensors' bytes and the JSON) in the check for free space.
SPACE_MARGIN = 1.05


class CheckpointWarning(UserWarning):
    """A checkpoint skipped as damaged by ``--resume latest`` (and the one used instead), or one read without
    verifying its files (format 2)."""


class DamagedCheckpointError(ValueError):
    """A checkpoint folder whose files are missing, truncated, altered or unreadable: unlike one of another run or
    format, ``--resume latest`` skips it for an older one."""


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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


# ---------------------------------------------------------------------------------------------- optimizer state


def _tensor_name(path: tuple[str, ...]) -> str:
    """The tensor name of the entry at ``path`` (parameter name, entry, keys or indices): its parts, ``%`` and ``/``
    escaped, joined by ``/`` (one name a path: parameter names may hold dots, and even ``/``)."""
    return "/".join(part.replace("%", "%25").replace("/", "%2F") for part in path)


def _encoded(value: Any, path: tuple[str, ...], tensors: dict[str, Any]) -> Any:
    """``value`` as JSON, each tensor in it moved to ``tensors`` (by :func:`_tensor_name`) and replaced by
    ``{"__tensor__": name}``, each tuple by ``{"__tuple__": [...]}``; other values as they are (JSON's check
    comes later)."""
    if isinstance(value, torch.Tensor):
        tensors[_tensor_name(path)] = value
        return {_TENSOR: _tensor_name(path)}
    if isinstance(value, tuple | list):
        items = [_encoded(item, (*path, str(i)), tensors) for i, item in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        bad = [key for key in value if not isinstance(key, str) or key in (_TENSOR, _TUPLE)]
        if bad:
            raise ValueError(f"checkpoint: the optimizer state of {path[0]} has keys that cannot be saved ({bad[:3]})")
        return {key: _encoded(item, (*path, key), tensors) for key, item in value.items()}
    return value


def _decoded(value: Any, tensors: dict[str, Any]) -> Any:
    """The inverse of :func:`_encoded`: ``value`` with its tensors taken from ``tensors`` by name."""
    if isinstance(value, list):
        return [_decoded(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if value.keys() == {_TENSOR}:
        if value[_TENSOR] not in tensors:
            raise DamagedCheckpointError(f"resume: the checkpoint lacks the optimizer tensor {value[_TENSOR]}")
        return tensors[value[_TENSOR]]
    if value.keys() == {_TUPLE}:
        return tuple(_decoded(item, tensors) for item in value[_TUPLE])
    return {key: _decoded(item, tensors) for key, item in value.items()}


def _split_optimizer(state: dict[str, Any], form: int = FORMAT) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer state dict keyed by parameter name → its tensors (by :func:`_tensor_name`; format 2:
    ``<name>.<entry>``, top-level tensors only) and the rest (JSON)."""
    tensors: dict[str, Any] = {}
    if form == 2:
        rest: dict[str, dict[str, Any]] = {}
        for name, entries in state["state"].items():
            for entry, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}.{entry}"] = value
                else:
                    rest.setdefault(name, {})[entry] = value
        return tensors, {"param_groups": state["param_groups"], "state": rest}
    encoded = {name: _encoded(entries, (name,), tensors) for name, entries in state["state"].items()}
    return tensors, {"param_groups": state["param_groups"], "state": encoded}


def _joined_optimizer(tensors: dict[str, Any], saved: dict[str, Any], form: int = FORMAT) -> dict[str, Any]:
    """The inverse of :func:`_split_optimizer`."""
    if form == 2:
        state: dict[str, dict[str, Any]] = {name: dict(entries) for name, entries in saved["state"].items()}
        for key, value in tensors.items():
            name, entry = key.rsplit(".", 1)
            state.setdefault(name, {})[entry] = value
        return {"state": state, "param_groups": saved["param_groups"]}
    joined = {name: _decoded(entries, tensors) for name, entries in saved["state"].items()}
    return {"state": joined, "param_groups": saved["param_groups"]}


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


# -------------------------------------------------------------------------------------------------------- saving


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, indent=1)
    except TypeError as error:
        raise ValueError(f"checkpoint: the {what} is not JSON-serialisable ({error})") from None


def _checksum(meta: dict[str, Any]) -> str:
    """The sha256 of ``meta`` less its ``checksum``, as canonical JSON (sorted keys, no spaces)."""
    rest = {key: value for key, value in meta.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The sha256 and size of every file under ``folder`` but its ``checkpoint.json``, by name in the folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != META)
    return {p.relative_to(folder).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}


def _local_bytes(value: Any) -> int:
    """The bytes this process writes of ``value`` (a tensor, or a DTensor's local shard)."""
    local = local_tensor(value)
    return int(local.numel() * local.element_size())


def _failure(error: BaseException, writing: Path, root: Path, need: int) -> BaseException:
    """The exception to raise for ``error`` while writing ``writing``: one OSError naming the file and the cause
    for a full disk, an exceeded quota, a read-only file system or any other OSError; ``error`` itself otherwise."""
    import torch.distributed.checkpoint as dcp

    if isinstance(error, dcp.CheckpointException) and error.failures:  # the first process's own error
        error = next(iter(error.failures.values()))[0]
    problem = storage_problem(error, root, need)
    if problem is None:
        if not isinstance(error, OSError):
            return error
        problem = error.strerror or str(error)
    failure = OSError(f"checkpoint: cannot write {writing}: {problem}")
    failure.__cause__ = error
    return failure


def _settle(failure: BaseException | None, tmp: Path, main: bool, sharded: bool) -> None:
    """Stop where ``failure`` (or, in a sharded run, another process's) is: the temporary folder ``tmp`` removed,
    ``failure`` raised, or an OSError naming the process that failed. A sharded run's collective (every process
    calls it, also where all went well)."""
    failed = [None if failure is None else str(failure)]
    if sharded:
        failed = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(failed, None if failure is None else str(failure))
    if not any(failed):
        return
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is not None:
        raise failure
    rank, message = next((rank, message) for rank, message in enumerate(failed) if message)
    raise OSError(f"checkpoint: process {rank} failed: {message}")


def save_checkpoint(
    student: Any, target: Any | None, optimizer: Any, config: TrainConfig, step: int, losses: list[float | None],
    scaler: Any = None, lr_scheduler: Any = None, extra: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Write the state after ``step`` steps to ``<output>/checkpoints/step-<step>`` (a temporary folder, flushed to
    disk and renamed when complete, with the manifest of its files). Every process calls this: a plain run's main
    process writes it all and the others return at once (no collective: a call on the main process alone does the
    same); a sharded run's processes each write their shards, the main process the rest, and all return once the
    folder is in place.

    Before anything is written the free space is checked against the checkpoint's size (its tensors and JSON, with
    a 5% margin; in a sharded run the main process's part times the processes). Any failure to write (a full disk,
    a read-only one) raises one OSError naming the file and the cause (``"no space left on device (need ~X, Y free
    in FOLDER)"``) after the temporary folder is removed — on every process of a sharded run, on the main process of
    a plain one (whose other processes return at once; the caller tells them) —: the checkpoints already written
    stay as they were.

    Args:
        student: the (unwrapped) student, plain or sharded; its trainable parameters are saved.
        target: the EMA target (sharded where the student is), or None where the student is its own target (LoRA).
        optimizer: the optimizer (accelerate's wrapper or torch's), whose state is saved.
        config: the run (its output folder and fingerprint).
        step: the steps taken.
        losses: the loss of every step so far (None: a step skipped).
        scaler: fp16's gradient scaler, whose state is saved; None (default) where there is none.
        lr_scheduler: the learning-rate schedule, whose state is saved; None (default) where there is none.
        extra: JSON values to record in ``checkpoint.json`` beside the fingerprint (such as the settings changed
            on resumes); its keys must not be the fingerprint's, ``step``, ``files`` or ``checksum``.
    """
    sharded, main = _sharded(student, target), not _distributed() or torch.distributed.get_rank() == 0
    if not (main or sharded):
        return
    root = Path(config.output) / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    fingerprint = config.fingerprint()
    clash = sorted((extra or {}).keys() & {*fingerprint, "step", "files", "checksum"})
    if clash:
        raise ValueError(f"checkpoint: extra must not set {', '.join(clash)}")
    optimizer = _unwrapped(optimizer)
    tensors, rest = (_sharded_tensors if sharded else _plain_tensors)(student, target, optimizer)
    state: dict[str, Any] = {"format": FORMAT, "losses": [None if x is None else float(x) for x in losses],
                             "optimizer": rest}  # fmt: skip
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if lr_scheduler is not None:
        state["lr_scheduler"] = lr_scheduler.state_dict()
    state_text = _json(state, "training state")
    meta = json.loads(_json({"step": step, **fingerprint, **(extra or {})}, "checkpoint's record"))
    processes = torch.distributed.get_world_size() if sharded else 1
    written = sum(_local_bytes(t) + len(k) + 128 for k, t in tensors.items())  # with the header's entries
    need = int(SPACE_MARGIN * (written * processes + len(state_text) + 2 * len(json.dumps(meta)) + 200 * processes))

    failure: BaseException | None = None
    writing = tmp
    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a killed run's
            problem = space_problem(root, need)
            if problem:
                failure = OSError(f"checkpoint: not writing {final}: {problem}")
            else:
                tmp.mkdir()
        except OSError as error:
            failure = _failure(error, writing, root, need)
    _settle(failure, tmp, main, sharded)  # sharded: every process knows the folder exists

    writing = tmp if sharded else tmp / TENSORS
    try:
        _write_tensors(tmp, tensors, sharded)
    except BaseException as error:
        from torch.distributed.checkpoint import CheckpointException  # not an Exception

        if not isinstance(error, Exception | CheckpointException):
            raise
        failure = _failure(error, writing, root, need)
    _settle(failure, tmp, main, sharded)  # every process has written its shards

    if main:
        try:
            writing = tmp / STATE
            writing.write_text(state_text)
            writing = tmp / META
            meta["files"] = _manifest(tmp)
            meta["checksum"] = _checksum(meta)
            writing.write_text(json.dumps(meta, indent=1))
            writing = final
            replace_folder(tmp, final)
        except Exception as error:
            failure = _failure(error, writing, root, need)
    _settle(failure, tmp, main, sharded)


def _plain_tensors(student: Any, target: Any | None, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A plain run's tensors, by checkpoint name, and the optimizer's JSON part."""
    optimizer_tensors, rest = _split_optimizer(_named_optimizer_state(student, optimizer))
    trainable = _trainable(student)
    tensors = _prefixed("student.", {n: p for n, p in student.named_parameters() if n in trainable})
    tensors |= _prefixed("target.", {} if target is None else target.state_dict())
    return tensors | _prefixed("optimizer.", optimizer_tensors), rest


def _sharded_tensors(
    student: Any, target: Any | None, optimizer: Any, form: int = FORMAT
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """A sharded run's tensors (this process's DTensor shards, named as in a plain checkpoint of format ``form``)
    and the optimizer's JSON part."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trainable = _trainable(student)
    optimizer_tensors, rest = _split_optimizer(get_optimizer_state_dict(student, optimizer), form)
    tensors = _prefixed("student.", {k: v for k, v in get_model_state_dict(student).items() if k in trainable})
    tensors |= _prefixed("target.", {} if target is None else get_model_state_dict(target))
    return tensors | _prefixed("optimizer.", optimizer_tensors), rest


def _write_tensors(tmp: Path, tensors: dict[str, Any], sharded: bool) -> None:
    """Write a plain run's tensors whole into ``tensors.safetensors`` (the main process alone), or this process's
    shards (a collective)."""
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    else:
        import safetensors.torch

        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))


# ------------------------------------------------------------------------------------------- finding and checking


def checkpoint_folders(root: Path) -> list[Path]:
    """The checkpoint folders under ``root`` (``<output>/checkpoints``), oldest first: folders named exactly
    ``step-<8 or more digits>`` (a user's ``step-best`` or ``step-00000500-backup`` is none of them)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def find_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint folder to resume from: the one ``config.resume`` names (not checked here: a damaged one is
    refused by :func:`check_checkpoint`, with no fall-back), or for ``"latest"`` the newest good one under
    ``<output>/checkpoints`` (None where none is written yet).

    ``"latest"`` checks the ``step-*`` folders newest first (:func:`check_checkpoint`, which hashes their files
    once a process): each damaged one (:class:`DamagedCheckpointError`) is skipped with a
    :class:`CheckpointWarning` naming it and why, and a last warning names the one used. ValueError where every one
    is damaged (each listed), and the error of :func:`check_checkpoint` where the newest undamaged one is another
    run's or of a format no longer read: that is never passed over for an older one."""
    if config.resume is None:
        return None
    if config.resume != "latest":
        return Path(config.resume)
    root = Path(config.output) / CHECKPOINTS
    found = checkpoint_folders(root)[::-1]
    skipped: list[str] = []
    for folder in found:
        try:
            check_checkpoint(folder, config)
        except DamagedCheckpointError as error:
            reason = str(error).removeprefix("resume: ")
            skipped.append(f"{folder.name}: {reason}")
            warnings.warn(f"resume: skipping the damaged checkpoint {folder} ({reason})", CheckpointWarning,
                          stacklevel=2)  # fmt: skip
            continue
        if skipped:
            warnings.warn(f"resume: resuming from {folder}, the newest undamaged checkpoint", CheckpointWarning,
                          stacklevel=2)  # fmt: skip
        return folder
    if skipped:
        raise ValueError(f"resume: every checkpoint under {root} is damaged ({'; '.join(skipped)})")
    return None


def prune_checkpoints(config: TrainConfig, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest checkpoints under ``<output>/checkpoints`` (``keep`` 0: none removed);
    returns the folders removed."""
    root = Path(config.output) / CHECKPOINTS
    found = checkpoint_folders(root) if keep else []
    old = found[: max(0, len(found) - keep)]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def check_checkpoint(folder: Path, config: TrainConfig, hashes: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checks of the checkpoint in ``folder`` that read only local files, no collective: ``checkpoint.json``
    (its checksum), that it is this run's (ValueError where a setting that defines the run differs; those
    ``allow_changes`` may change are the caller's to compare, with
    :func:`~tcd_sampler.distill.train_config.resume_differences`), every file of its manifest (size and sha256,
    and no unlisted tensor file), ``state.json``'s format. A run with several processes runs them on every
    process first, so that one that cannot read the folder stops all before the sharded load's collectives.

    The files are hashed once a process: a folder verified before is not hashed again while its files' sizes,
    inodes and change times stay as they were (files changed within 2 s of the verification are hashed every
    time). A format-2 checkpoint (no manifest) is read with a :class:`CheckpointWarning` that its files are not
    verified (their headers are read). Returns ``checkpoint.json`` and ``state.json``; ValueError as
    :func:`load_checkpoint` (:class:`DamagedCheckpointError` where a file is missing, truncated or altered).
    ``hashes`` False (default True) checks the files' sizes only: for the processes of a run whose files another
    process of the same machine verifies.
    """
    folder = Path(folder)
    meta = _meta(folder)
    other, _ = resume_differences(meta, config)
    if other:
        listed = "; ".join(f"{key}: {change}" for key, change in other.items())
        raise ValueError(f"resume: checkpoint {folder} is from another run ({listed}); pass another --output, or "
                         "--overwrite without --resume to start over there")  # fmt: skip
    if "files" in meta:
        _verify(folder, meta, hashes)
        state = _state(folder)
    else:
        state = _state(folder)
        if state["format"] != 2:
            raise DamagedCheckpointError(f"resume: {folder / META} is damaged (it has no manifest of the files)")
        warnings.warn(f"resume: checkpoint {folder} is of format 2 (no checksums): its files are not verified",
                      CheckpointWarning, stacklevel=2)  # fmt: skip
        _tensor_files(folder)
    return meta, state


def _meta(folder: Path) -> dict[str, Any]:
    """``checkpoint.json`` of the checkpoint in ``folder``, its checksum checked where it has one."""
    path = folder / META
    if not path.is_file():
        raise DamagedCheckpointError(f"resume: {folder} is not a checkpoint folder (no {META})")
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise DamagedCheckpointError(f"resume: {path} is damaged ({error})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise DamagedCheckpointError(f"resume: {path} is damaged (no step)")
    if ("files" in meta or "checksum" in meta) and meta.get("checksum") != _checksum(meta):
        raise DamagedCheckpointError(f"resume: {path} is damaged: its checksum differs from its content")
    return meta


# a folder verified by this process → (the manifest's checksum, each file's name, size, inode and change time)
_VERIFIED: dict[Path, tuple[str, tuple[tuple[str, int, int, int], ...]]] = {}
_SETTLED_NS = 2_000_000_000  # files changed this long before a verification are not hashed again while unchanged


def _verify(folder: Path, meta: dict[str, Any], hashes: bool = True) -> None:
    """Check every file of the manifest of the checkpoint in ``folder`` (its size and, with ``hashes``, its sha256)
    and that no tensor file is missing from it; DamagedCheckpointError naming the file and what is wrong."""
    files = meta["files"]
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"sha256", "bytes"} <= e.keys()
                                              for e in files.values()):  # fmt: skip
        raise DamagedCheckpointError(f"resume: {folder / META} is damaged (its manifest of the files)")
    unlisted = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in files)
    if unlisted:
        raise DamagedCheckpointError(f"resume: checkpoint {folder} holds tensor files its manifest does not list "
                                     f"({', '.join(unlisted)})")  # fmt: skip
    began = time.time_ns()
    seen = []
    for name, entry in sorted(files.items()):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DamagedCheckpointError(f"resume: {folder / META} is damaged (it lists {name})")
        if not path.is_file():
            raise DamagedCheckpointError(f"resume: checkpoint file {path} is missing")
        stat = path.stat()
        if stat.st_size != entry["bytes"]:
            raise DamagedCheckpointError(f"resume: checkpoint file {path} is truncated or damaged: it has "
                                         f"{stat.st_size} bytes, the manifest says {entry['bytes']}")  # fmt: skip
        seen.append((name, stat.st_size, stat.st_ino, stat.st_ctime_ns))
    key, signature = folder.resolve(), (meta["checksum"], tuple(seen))
    if not hashes or _VERIFIED.get(key) == signature:
        return
    for name, entry in sorted(files.items()):
        try:
            digest = _sha256(folder / name)
        except OSError as error:
            raise DamagedCheckpointError(f"resume: checkpoint file {folder / name} cannot be read ({error})") from None
        if digest != entry["sha256"]:
            raise DamagedCheckpointError(f"resume: checkpoint file {folder / name} is damaged: its sha256 differs "
                                         "from the manifest's")  # fmt: skip
    if all(changed < began - _SETTLED_NS for *_, changed in seen):
        _VERIFIED[key] = signature


def load_checkpoint(
    folder: Path | None, student: Any, target: Any | None, optimizer: Any, config: TrainConfig, scaler: Any = None,
    lr_scheduler: Any = None, hashes: bool = True,
) -> tuple[int, list[float | None]]:  # fmt: skip
    """Load the checkpoint in ``folder`` (:func:`find_checkpoint`; None: start, step 0) into ``student``, ``target``,
    ``optimizer`` (and fp16's ``scaler`` and the ``lr_scheduler``, where given and saved), plain or sharded, from a
    checkpoint of a plain or a sharded run; returns the step it was taken at and the losses so far (None: a step
    skipped). Every process calls this (a sharded student's load is a collective). ValueError where the folder is
    not a checkpoint, is from another run (a setting that defines the run differs), is of a format no longer read,
    or a file is missing or damaged (:class:`DamagedCheckpointError`, naming it) — raised by every process alike,
    before any collective, where the processes see the same files (:func:`check_checkpoint`; ``hashes`` as there).
    """
    if folder is None:
        return 0, []
    folder = Path(folder)
    meta, state = check_checkpoint(folder, config, hashes)
    optimizer = _unwrapped(optimizer)
    if _sharded(student, target):
        _load_sharded(folder, state, student, target, optimizer)
    else:
        _load_plain(folder, state, student, target, optimizer)
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if lr_scheduler is not None and "lr_scheduler" in state:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    return int(meta["step"]), [None if x is None else float(x) for x in state["losses"]]


def _state(folder: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint in ``folder``, checked to be of a :data:`READABLE` format."""
    path = folder / STATE
    if not path.is_file():
        if (folder / "state.pt").exists():
            raise ValueError(f"resume: checkpoint {folder} has no state.json (a pickled state.pt of an earlier "
                             "release, no longer read)")  # fmt: skip
        raise DamagedCheckpointError(f"resume: checkpoint {folder} has no state.json")
    try:
        state: dict[str, Any] = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedCheckpointError(f"resume: {path} is damaged ({error})") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE:
        found = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"resume: checkpoint {folder} is of format {found!r}, not one of {READABLE}")
    return state


def _tensor_files(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint in ``folder``; DamagedCheckpointError naming one that is truncated or
    damaged (where its header shows it)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DamagedCheckpointError(f"checkpoint {folder} has no tensor files (*.safetensors)")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as opened:
                opened.keys()
        except (SafetensorError, OSError) as error:
            raise DamagedCheckpointError(f"checkpoint tensor file {file} is truncated or damaged ({error})") from None
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
    run's assembled), on the CPU; its files verified against its manifest first (a format-2 checkpoint's tensor
    headers read); ValueError naming a missing, truncated or damaged file."""
    folder = Path(folder)
    meta = _meta(folder) if (folder / META).is_file() else {}
    if "files" in meta:
        _verify(folder, meta)
    else:
        _tensor_files(folder)
    return _taken("student.", _read_whole(folder, "student."))


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
    named = _joined_optimizer(_taken("optimizer.", tensors), state["optimizer"], state["format"])
    _load_named_optimizer_state(student, optimizer, named)


def _load_sharded(folder: Path, state: dict[str, Any], student: Any, target: Any | None, optimizer: Any) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    tensors, _ = _sharded_tensors(student, target, optimizer, state["format"])  # this process's shards, as templates
    _read(folder, tensors, no_dist=False)
    set_model_state_dict(student, _taken("student.", tensors), options=StateDictOptions(strict=False))
    if target is not None:
        set_model_state_dict(target, _taken("target.", tensors))
    named = _joined_optimizer(_taken("optimizer.", tensors), state["optimizer"], state["format"])
    current = optimizer.state_dict()["param_groups"]
    named["param_groups"] = [_with_types(g, now) for g, now in zip(named["param_groups"], current, strict=True)]
    set_optimizer_state_dict(student, optimizer, named)
