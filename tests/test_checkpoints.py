"""Checkpoints in one process: a LoRA's and a full student's state (weights, EMA target, AdamW, fp16's scaler, the
learning-rate schedule) restored without pickle continue to the bit as an uninterrupted run; a folder that is not a
checkpoint, another run's, or a damaged file (found by its size or sha256 in the manifest) is a clear ValueError, and
``--resume latest`` falls back past a damaged one with a warning; nested optimizer state round-trips; format 2 is
read; a full or read-only disk (simulated, and a real small tmpfs where mounting one is permitted) is one clear
OSError that leaves the checkpoints before intact."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tcd_sampler.distill.checkpoints import (
    CheckpointWarning,
    DamagedCheckpointError,
    check_checkpoint,
    checkpoint_tensors,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
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
    files, checksum = meta.pop("files"), meta.pop("checksum")
    assert meta == {"step": 1, **json.loads(json.dumps(cfg.fingerprint()))}
    assert files == {
        name: {
            "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
            "bytes": (folder / name).stat().st_size,
        }
        for name in ("state.json", "tensors.safetensors")
    }
    canonical = json.dumps({**meta, "files": files}, sort_keys=True, separators=(",", ":"))
    assert checksum == hashlib.sha256(canonical.encode()).hexdigest()
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
    with pytest.raises(ValueError, match=r"from another run \(lora_rank: 4 → 8\)"):
        load_checkpoint(folder, *args, run_config(tmp_path, lora=True, lora_rank=8))
    assert load_checkpoint(None, *args, cfg) == (0, [])

    tensors = folder / "tensors.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    for read in (lambda: load_checkpoint(folder, *args, cfg), lambda: checkpoint_tensors(folder)):
        with pytest.raises(DamagedCheckpointError, match=re.escape(str(tensors)) + " is truncated or damaged"):
            read()
    tensors.unlink()
    with pytest.raises(DamagedCheckpointError, match=re.escape(str(tensors)) + " is missing"):
        load_checkpoint(folder, *args, cfg)

    # an earlier release's pickled checkpoint (format 1: no manifest, state.pt)
    meta = json.loads((folder / "checkpoint.json").read_text())
    (folder / "checkpoint.json").write_text(
        json.dumps({k: v for k, v in meta.items() if k not in ("files", "checksum")})
    )
    (folder / "state.json").unlink()
    (folder / "state.pt").write_bytes(b"an old pickle")
    with pytest.raises(ValueError, match=r"no state.json \(a pickled state.pt"):
        load_checkpoint(folder, *args, cfg)


# --------------------------------------------------------------------------- checksums, fall-back, a full disk


class Small:
    """A two-layer student, its EMA target and AdamW after one step: a checkpoint of a few kB, written at once."""

    def __init__(self, seed: int = 0, width: int = 8) -> None:
        torch.manual_seed(seed)
        self.student = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
        self.target = copy.deepcopy(self.student).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-3)
        self.student(torch.randn(3, 4)).square().mean().backward()
        self.optimizer.step()

    def save(self, cfg: TrainConfig, step: int, losses: list[float | None] | None = None, **kw: Any) -> Path:
        save_checkpoint(self.student, self.target, self.optimizer, cfg, step, losses or [0.5] * step, **kw)
        return Path(cfg.output) / "checkpoints" / f"step-{step:08d}"

    def load(self, folder: Path | None, cfg: TrainConfig) -> tuple[int, list[float | None]]:
        return load_checkpoint(folder, self.student, self.target, self.optimizer, cfg)


def flip(path: Path, at: int) -> None:
    """Flip one bit of the byte at ``at`` (from the end where negative) in place: the size stays."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def latest(cfg: TrainConfig) -> TrainConfig:
    return TrainConfig(**{**cfg.__dict__, "resume": "latest"})


def test_a_flipped_bit_is_named_and_latest_falls_back(tmp_path: Path) -> None:
    """One bit flipped in a tensor's data, in state.json or in checkpoint.json: loading that checkpoint names the
    file; ``--resume latest`` skips it, with a warning naming it and one naming the checkpoint used; all damaged is
    an error listing them."""
    cfg, run = run_config(tmp_path, lora=False), Small()
    one, two = run.save(cfg, 1), run.save(cfg, 2)
    flip(two / "tensors.safetensors", -3)  # in the last tensor's data: the header still reads
    with pytest.raises(
        DamagedCheckpointError, match=re.escape(f"{two / 'tensors.safetensors'} is damaged: its sha256")
    ):
        Small(1).load(two, cfg)
    with pytest.warns(CheckpointWarning) as warned:
        assert find_checkpoint(latest(cfg)) == one
    assert [str(w.message) for w in warned if w.category is CheckpointWarning] == [
        f"resume: skipping the damaged checkpoint {two} (checkpoint file {two / 'tensors.safetensors'} is damaged: "
        "its sha256 differs from the manifest's)",
        f"resume: resuming from {one}, the newest undamaged checkpoint",
    ]
    restored = Small(1)
    assert restored.load(one, cfg) == (1, [0.5])
    assert all(torch.equal(a, b) for a, b in zip(restored.student.parameters(), run.student.parameters(), strict=True))

    state = one / "state.json"
    text = state.read_text()
    state.write_text(text.replace('"lr": 0.001', '"lr": 0.003', 1))  # still JSON, the same size: only the hash sees it
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"{state} is damaged: its sha256")):
        Small(1).load(one, cfg)
    all_damaged = r"every checkpoint under .* is damaged \(step-00000002: .*; step-00000001: .*state.json"
    with pytest.warns(CheckpointWarning), pytest.raises(ValueError, match=all_damaged):
        find_checkpoint(latest(cfg))
    state.write_text(text)
    meta = one / "checkpoint.json"
    meta.write_text(meta.read_text().replace('"step": 1', '"step": 7'))
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"{meta} is damaged: its checksum differs")):
        Small(1).load(one, cfg)


def test_missing_unlisted_and_another_runs_files(tmp_path: Path) -> None:
    """A file of the manifest missing, a tensor file it does not list: damaged. A newest checkpoint of another run
    is an error, not passed over for an older one of this run; a named --resume folder that is damaged is an error
    too (no fall-back)."""
    cfg, run = run_config(tmp_path, lora=False), Small()
    one, two = run.save(cfg, 1), run.save(cfg, 2)
    (two / "extra.safetensors").write_bytes((two / "tensors.safetensors").read_bytes())
    with pytest.raises(DamagedCheckpointError, match=r"tensor files its manifest does not list \(extra.safetensors\)"):
        check_checkpoint(two, cfg)
    (two / "extra.safetensors").unlink()
    (two / "state.json").unlink()
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"{two / 'state.json'} is missing")):
        check_checkpoint(two, cfg)
    named = TrainConfig(**{**cfg.__dict__, "resume": str(two)})
    assert find_checkpoint(named) == two  # checked by the load, which refuses it
    with pytest.raises(DamagedCheckpointError, match="is missing"):
        Small(1).load(find_checkpoint(named), named)

    other = run_config(tmp_path, lora=False, seed=1)
    run.save(other, 3)
    with pytest.raises(ValueError, match=r"checkpoint .*step-00000003 is from another run \(seed: 1 → 0\)") as err:
        find_checkpoint(latest(cfg))
    assert not isinstance(err.value, DamagedCheckpointError) and one.is_dir()


def test_verified_folders_are_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder verified by this process is not hashed again while its files stand as they were, unless they were
    written less than 2 s before (a change within the file system's time resolution would go unseen)."""
    import tcd_sampler.distill.checkpoints as checkpoints

    cfg, run = run_config(tmp_path, lora=False), Small()
    folder = run.save(cfg, 1)
    hashed: list[str] = []
    real = checkpoints._sha256
    monkeypatch.setattr(checkpoints, "_sha256", lambda path: hashed.append(path.name) or real(path))
    check_checkpoint(folder, cfg)
    check_checkpoint(folder, cfg)
    assert hashed == ["state.json", "tensors.safetensors"] * 2  # just written: hashed each time
    monkeypatch.setattr(checkpoints, "_SETTLED_NS", -(10**18))  # as if written long ago
    hashed.clear()
    check_checkpoint(folder, cfg)
    check_checkpoint(folder, cfg)
    assert hashed == ["state.json", "tensors.safetensors"]
    time.sleep(0.05)  # past the clock tick of the file's last change
    flip(folder / "tensors.safetensors", -3)
    with pytest.raises(DamagedCheckpointError, match="sha256 differs"):  # its change time moved: hashed again
        check_checkpoint(folder, cfg)


def test_sizes_only_where_another_process_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hashes=False`` (the other processes of a machine whose first process verifies) reads no file's bytes: a
    flipped bit goes unseen there, a truncated file does not; the verifying call still names the flip."""
    import tcd_sampler.distill.checkpoints as checkpoints

    cfg, run = run_config(tmp_path, lora=False), Small()
    folder = run.save(cfg, 1)
    flip(folder / "tensors.safetensors", -3)
    monkeypatch.setattr(checkpoints, "_sha256", lambda path: pytest.fail(f"{path.name} was hashed"))
    check_checkpoint(folder, cfg, hashes=False)
    monkeypatch.undo()
    with pytest.raises(DamagedCheckpointError, match="sha256 differs"):
        check_checkpoint(folder, cfg)
    tensors = folder / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-1])
    with pytest.raises(DamagedCheckpointError, match="truncated"):
        check_checkpoint(folder, cfg, hashes=False)


def test_format_2_is_read_unverified(tmp_path: Path) -> None:
    """A checkpoint of the previous release (format 2: no manifest, optimizer tensors ``<name>.<entry>``) loads to
    the bit, with a warning that its files are not verified."""
    import safetensors.torch

    cfg, run = run_config(tmp_path, lora=False), Small()
    folder = run.save(cfg, 1)
    tensors = safetensors.torch.load_file(str(folder / "tensors.safetensors"))
    old = {key.replace("/", "."): value for key, value in tensors.items()}  # optimizer.0.weight/exp_avg → .exp_avg
    assert len(old) == len(tensors) and "optimizer.0.weight.exp_avg" in old
    safetensors.torch.save_file(old, str(folder / "tensors.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    state["format"], state["optimizer"]["state"] = 2, {}  # AdamW's entries are all tensors
    (folder / "state.json").write_text(json.dumps(state))
    meta = json.loads((folder / "checkpoint.json").read_text())
    (folder / "checkpoint.json").write_text(
        json.dumps({k: v for k, v in meta.items() if k not in ("files", "checksum")})
    )

    restored = Small(1)
    with pytest.warns(CheckpointWarning, match=r"format 2 \(no checksums\): its files are not verified"):
        assert restored.load(folder, cfg) == (1, [0.5])
    assert_same(restored.optimizer.state_dict(), run.optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.target.parameters(), run.target.parameters(), strict=True))


def assert_same(a: Any, b: Any) -> None:
    """``a`` and ``b`` equal to the bit, of the same types (tuples stay tuples), recursively."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)


class Quantised(torch.optim.AdamW):
    """AdamW whose state also holds what an 8-bit optimizer's does: nested dicts of tensors, a tuple with a tensor,
    lists and scalars; and keys with ``/`` and ``%``."""

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for p in self.param_groups[0]["params"]:
            state = self.state[p]
            state["quant"] = {"state1": torch.randint(0, 256, p.shape, dtype=torch.uint8), "blocksize": 256,
                              "absmax": state["exp_avg"].abs().amax().reshape(1),
                              "code": {"map": torch.linspace(-1, 1, 5), "signed": True}}  # fmt: skip
            state["pair"] = (state["exp_avg_sq"].sum(), 0.5, None, float("inf"))
            state["flags"] = [True, 3, [torch.arange(3)]]
            state["q/r"] = torch.full((1,), 1.0)  # with a parameter "p" this meets "p/q" + "r" unless escaped
            state["r%2F"] = torch.full((1,), 2.0)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Without torch's cast of every tensor to its parameter's dtype (bitsandbytes' keep their uint8 states)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entries in state_dict["state"].items():
            self.state[params[index]] = dict(entries)


def test_nested_optimizer_state_round_trips(tmp_path: Path) -> None:
    """Nested dicts of tensors, tuples and lists in an optimizer's state (bitsandbytes' 8-bit AdamW keeps its
    quantisation state so) are saved as tensors plus JSON and restored to the bit, tuples as tuples; parameter
    names with ``/`` do not meet another's entries."""
    cfg = run_config(tmp_path, lora=False)

    def make_run() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        module = torch.nn.Module()
        module.register_parameter("p", torch.nn.Parameter(torch.randn(3)))
        module.register_parameter("p/q", torch.nn.Parameter(torch.randn(2)))
        return module, Quantised(module.parameters(), lr=1e-2)

    torch.manual_seed(0)
    module, optimizer = make_run()
    (module.p.sum() + module.get_parameter("p/q").square().sum()).backward()
    optimizer.step()
    save_checkpoint(module, None, optimizer, cfg, 1, [None])
    folder = Path(cfg.output) / "checkpoints" / "step-00000001"
    saved = checkpoint_tensors(folder)
    assert saved.keys() == {"p", "p/q"}

    fresh, fresh_optimizer = make_run()
    assert load_checkpoint(folder, fresh, None, fresh_optimizer, cfg) == (1, [None])
    assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert torch.equal(fresh.get_parameter("p/q"), module.get_parameter("p/q"))


def test_extra_record_and_skipped_losses(tmp_path: Path) -> None:
    """``extra`` is kept in checkpoint.json (not a fingerprint key), and a skipped step's loss (None) round-trips."""
    cfg, run = run_config(tmp_path, lora=False), Small()
    changes = [{"step": 1, "setting": "lr", "change": "0.001 → 0.002"}]
    folder = run.save(cfg, 2, [0.25, None], extra={"changes": changes})
    meta, _ = check_checkpoint(folder, cfg)
    assert meta["changes"] == changes
    assert Small(1).load(folder, cfg) == (2, [0.25, None])
    with pytest.raises(ValueError, match="extra must not set seed, step"):
        run.save(cfg, 3, extra={"seed": 3, "step": 1})


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"),
     RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
     OSError(30, "Read-only file system")],
)  # fmt: skip
def test_a_failed_save_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """A writer failing for a full disk (an OSError, or safetensors' own error) or a read-only one: one OSError
    naming the file and the cause; the temporary folder is removed, the checkpoint before stays good."""
    import safetensors.torch

    cfg, run = run_config(tmp_path, lora=False), Small()
    one = run.save(cfg, 1)

    def failing(tensors: Any, path: str, *args: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"half a file")
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    tensors = Path(cfg.output) / "checkpoints" / ".tmp-step-00000002" / "tensors.safetensors"
    cause = "the file system is read-only" if "Read-only" in str(error) else r"no space left on device \(need ~"
    with pytest.raises(OSError, match=rf"^checkpoint: cannot write {re.escape(str(tensors))}: {cause}"):
        run.save(cfg, 2)
    assert sorted(p.name for p in one.parent.iterdir()) == ["step-00000001"]
    assert Small(1).load(one, cfg) == (1, [0.5])


def test_free_space_is_checked_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Less space free than the checkpoint's estimate: an error naming the folder, the need and what is free, and
    nothing written."""
    import shutil

    cfg, run = run_config(tmp_path, lora=False), Small()
    one = run.save(cfg, 1)
    size = sum(p.stat().st_size for p in one.iterdir())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size // 2))
    with pytest.raises(OSError, match=rf"not writing .*step-00000002: no space left on device \(need ~.*B, .*B "
                                      rf"free in {re.escape(str(one.parent))}\)"):  # fmt: skip
        run.save(cfg, 2)
    assert sorted(p.name for p in one.parent.iterdir()) == ["step-00000001"]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * size))
    run.save(cfg, 2)


ON_TMPFS = """
import sys
from pathlib import Path
import torch
import tcd_sampler.distill.checkpoints as checkpoints
from tcd_sampler.distill.train_config import TrainConfig

disk = Path(sys.argv[1])
cfg = TrainConfig(teacher=str(disk / "teacher"), data=str(disk / "data"), output=str(disk / "run"))
torch.manual_seed(0)
student = torch.nn.Linear(64, 64)
student(torch.randn(2, 64)).sum().backward()
optimizer = torch.optim.AdamW(student.parameters())
optimizer.step()
checkpoints.save_checkpoint(student, None, optimizer, cfg, 1, [0.5])  # about 50 kB
one = disk / "run" / "checkpoints" / "step-00000001"
for case in ("estimate", "write"):
    if case == "write":  # the estimate passes: the writer meets the full disk
        checkpoints.space_problem = lambda folder, need: None
    try:
        checkpoints.save_checkpoint(student, None, optimizer, cfg, 2, [0.5, 0.5])
    except OSError as error:
        print(case, error)
    print(case, sorted(p.name for p in one.parent.iterdir()))
print("loads", checkpoints.load_checkpoint(one, student, None, optimizer, cfg))
"""


def test_a_real_full_disk(tmp_path: Path) -> None:
    """On a tmpfs that holds one checkpoint but not two (in a mount namespace of its own: skipped where that is not
    permitted): the estimate refuses the second before writing; with the estimate passed, the writer's full disk is
    one clear error; either way nothing is left and the first checkpoint loads."""
    import shutil
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = f"mount -t tmpfs -o size=80k tmpfs {disk}"
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a small tmpfs in a namespace of its own")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", mount], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({probe.stderr.strip()[-200:]})")
    command = f'{mount} && exec "{sys.executable}" -c "$0" {disk}'
    done = subprocess.run(["unshare", "--mount", "sh", "-c", command, ON_TMPFS], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"estimate checkpoint: not writing .*step-00000002: no space left on device \(need ~.* kB, "
                        r".* kB free in .*checkpoints\)", lines[0]), lines  # fmt: skip
    assert lines[1] == "estimate ['step-00000001']", lines
    assert re.fullmatch(r"write checkpoint: cannot write .*/\.tmp-step-00000002/tensors.safetensors: no space left on "
                        r"device \(need ~.* kB, .* free in .*checkpoints\)", lines[2]), lines  # fmt: skip
    assert lines[3:] == ["write ['step-00000001']", "loads (1, [0.5])"], lines


def test_only_step_folders_are_checkpoints(tmp_path: Path) -> None:
    """A user's ``step-best`` or ``step-00000500-backup`` (or a file) is no checkpoint: not resumed as the latest,
    never pruned."""
    from tcd_sampler.distill.checkpoints import checkpoint_folders

    root = tmp_path / "checkpoints"
    for name in ("step-00000002", "step-00000010", "step-best", "step-00000500-backup", "step-1"):
        (root / name).mkdir(parents=True)
    (root / "step-00000020").write_text("a file")
    assert [p.name for p in checkpoint_folders(root)] == ["step-00000002", "step-00000010"]
    assert checkpoint_folders(tmp_path / "missing") == []
