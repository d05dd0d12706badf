"""A full student sharded with FSDP2 across two gloo processes on the CPU (:mod:`tcd_sampler.distill.sharding`):
three steps with two micro-batches each and a sharded EMA target, a checkpoint written by both processes, a fresh
pair that resumes it for a fourth step, and the gathered export — against one plain process taking the whole batch,
each resuming the other's checkpoint.
Also, in one process: the EMA update is the former loop's, to the bit.

Run as a script (``python tests/test_fsdp.py <phase> <output>``, under RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), this
file is one of the two processes.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tcd_sampler.distill.losses import ema_update
from tcd_sampler.distill.sharding import full_state_dict, gradient_sync, is_sharded

REPO = Path(__file__).resolve().parents[1]
STEPS, FIRST, ROWS, MICRO, DECAY = 4, 3, 4, 2, 0.9
#: How far the sharded run may end from the plain one: the norm of the weights' difference over the norm of the plain
#: run's update, per tensor (tests/test_train.py's measure). The runs sum the same gradients in another order (a
#: reduce-scatter of two processes' micro-batches), which AdamW turns into small steps in the elements whose gradient
#: is within rounding of zero: measured 1.1e-4, as between two plain runs on 1 and 2 threads with other micro-batches.
#: Tighter than tests/test_train.py's 1e-2, since AdamW hides a gradient's scale: a gradient halved (the processes'
#: mean taken twice) ends only 1.3e-2 away.
SAME_UPDATE = 3e-3


def test_ema_update_is_the_former_loop_to_the_bit() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (3, 5), (4, 2, 3, 3), ()]
    for decay in (0.0, 0.5, 0.9, 0.95, 0.999, 1.0):
        source = torch.nn.ParameterList([torch.randn(s, generator=g) for s in shapes])
        target = torch.nn.ParameterList([torch.randn(s, generator=g) for s in shapes]).requires_grad_(False)
        former = copy.deepcopy(target)
        with torch.no_grad():
            for p_target, p in zip(former.parameters(), source.parameters(), strict=True):
                p_target.lerp_(p, 1 - decay)
        ema_update(target, source, decay)
        assert all(torch.equal(a, b) for a, b in zip(target.parameters(), former.parameters(), strict=True))
    with pytest.raises(ValueError, match="the target has 4 parameters, the source 3"):
        ema_update(target, torch.nn.ParameterList(list(source)[:3]), 0.9)


def test_a_plain_module_is_not_sharded() -> None:
    linear = torch.nn.Linear(3, 2)
    assert not is_sharded(linear)
    with gradient_sync(linear, False):  # a module of one process: nothing to skip
        linear(torch.ones(1, 3)).sum().backward()
    assert full_state_dict(linear).keys() == {"weight", "bias"}


def batch(step: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 + step)
    x, t = torch.randn(ROWS, 4, 8, 8, generator=g), torch.randint(0, 1000, (ROWS,), generator=g)
    return x, t, torch.randn(ROWS, 3, 16, generator=g), torch.randn(ROWS, 4, 8, 8, generator=g)


def models(shard_them: bool) -> tuple[Any, Any, Any]:
    from tcd_sampler.distill.sharding import shard
    from test_checkpoints import tiny_unet

    student = tiny_unet().requires_grad_(True)
    target = copy.deepcopy(student).requires_grad_(False)
    if shard_them:
        shard(student)
        shard(target, reshard_after_forward=True)
    return student, target, torch.optim.AdamW(student.parameters(), lr=1e-3)


def step(student: Any, target: Any, optimizer: Any, k: int, rows: slice) -> None:
    """One step on ``rows`` of the step's batch in :data:`MICRO` micro-batches (gradients reduced on the last, and
    averaged over the processes, as DDP does: the mean loss of all rows), then the EMA."""
    x, t, text, y = (v[rows] for v in batch(k))
    size = x.shape[0] // MICRO
    optimizer.zero_grad()
    for j in range(MICRO):
        part = slice(j * size, (j + 1) * size)
        with gradient_sync(student, j == MICRO - 1):
            out = student(x[part], t[part], encoder_hidden_states=text[part]).sample
            with torch.no_grad():
                aim = target(x[part], t[part], encoder_hidden_states=text[part]).sample
            loss = (out - y[part]).pow(2).mean() + 0.1 * (out - aim).pow(2).mean()
            (loss / MICRO).backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    ema_update(target, student, DECAY)


def run_config(output: str) -> Any:
    from tcd_sampler.distill.train_config import TrainConfig

    return TrainConfig(teacher="tiny", data="none", output=output, lora_rank=0, resume="latest")


def gathered(student: Any, target: Any) -> dict[str, torch.Tensor]:
    """The whole student and target (:func:`full_state_dict`, a collective): on the first process; ``{}`` elsewhere."""
    out = {f"student.{k}": v for k, v in full_state_dict(student).items()}
    return out | {f"target.{k}": v for k, v in full_state_dict(target).items()}


def pixel_unet_shards(rank: int) -> None:
    """A UNet2DModel (a pixel-space teacher's network) shards as well: its sharded forward is the plain one's (in
    bfloat16 under a mixed-precision policy, its parameters still float32), and its gathered state loads strictly
    into a plain copy."""
    from diffusers import UNet2DModel

    from tcd_sampler.distill.sharding import shard

    torch.manual_seed(0)
    pixel = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), norm_num_groups=4,
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)  # fmt: skip
    plain, half = copy.deepcopy(pixel), copy.deepcopy(pixel)
    shard(pixel)
    shard(half, mixed_precision=torch.bfloat16)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(rank)), torch.tensor([10, 500])
    with torch.no_grad():
        expected = plain(x, t).sample
        torch.testing.assert_close(pixel(x, t).sample, expected)
        out = half(x, t).sample
    half.reshard()  # the root stays gathered (in bfloat16) after a forward without gradients, unless resharded
    assert out.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in half.parameters())
    assert float((out.float() - expected).norm() / expected.norm()) < 2e-2  # bfloat16's 8 bits of mantissa
    whole = full_state_dict(pixel)
    if rank == 0:
        plain.load_state_dict(whole, strict=True)


def worker(phase: str, output: str) -> None:
    """One of two processes. ``first``: :data:`FIRST` steps, a checkpoint, the other steps (the first process writes
    the gathered student and target to ``uninterrupted.safetensors``). ``second``: resume the plain run's checkpoint
    (``<output>/plain``), the other steps (``from_plain.safetensors``); then resume the checkpoint of ``first``, the
    other steps (``resumed.safetensors``)."""
    import safetensors.torch
    import torch.distributed as dist

    from tcd_sampler.distill.checkpoints import find_checkpoint, load_checkpoint, save_checkpoint

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows, cfg = slice(rank * ROWS // world, (rank + 1) * ROWS // world), run_config(output)
    student, target, optimizer = models(shard_them=True)
    assert is_sharded(student) and is_sharded(target)
    if phase == "first":
        for k in range(FIRST):
            step(student, target, optimizer, k, rows)
        save_checkpoint(student, target, optimizer, cfg, FIRST, [0.5] * FIRST)
        pixel_unet_shards(rank)
    runs = {"first": [("uninterrupted", None)], "second": [("from_plain", f"{output}/plain"), ("resumed", output)]}
    for name, source in runs[phase]:
        done = FIRST
        if source is not None:
            done, losses = load_checkpoint(find_checkpoint(run_config(source)), student, target, optimizer, cfg)
            assert done == FIRST and losses == [0.5] * FIRST
        for k in range(done, STEPS):
            step(student, target, optimizer, k, rows)
        whole = gathered(student, target)
        assert (len(whole) > 0) == (rank == 0)
        if rank == 0:
            safetensors.torch.save_file(whole, str(Path(output) / f"{name}.safetensors"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(phase: str, output: Path, timeout: float) -> None:
    """This file as two gloo processes of ``phase``; fails with their stderr where one fails."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, __file__, phase, str(output)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, f"{phase}: {err[-3000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def update_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """The largest, over tensors, of ``‖b − a‖ / ‖a − start‖``."""
    assert a.keys() == b.keys()
    return max(float((b[k] - a[k]).norm() / (a[k] - start[k]).norm().clamp_min(1e-30)) for k in a)


@pytest.mark.slow
def test_two_sharded_processes_resume_and_end_as_one_plain_process(tmp_path: Path) -> None:
    """FSDP2 on two gloo processes, half the batch each in two micro-batches, with a checkpoint after 3 steps that
    a new pair resumes for the 4th: the same student and EMA target, to the bit, as the pair that went on, and where
    one plain process with the whole batch ends (:data:`SAME_UPDATE`); the export loads strictly into a plain UNet.
    The checkpoints cross over: the sharded one (a safetensors file of shards per process, no pickle) resumed by one
    plain process, the plain one by the pair, each continues as the run that wrote it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    import safetensors.torch

    from tcd_sampler.distill.checkpoints import checkpoint_tensors, load_checkpoint, save_checkpoint
    from test_checkpoints import tiny_unet

    launch("first", tmp_path, timeout=60)
    folder = tmp_path / "checkpoints" / f"step-{FIRST:08d}"
    shards = [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", *shards, "state.json"]
    start = tiny_unet().state_dict()
    student, target, optimizer = models(shard_them=False)
    rows, cfg = slice(0, ROWS), run_config(str(tmp_path))
    for k in range(FIRST):
        step(student, target, optimizer, k, rows)
    save_checkpoint(student, target, optimizer, run_config(str(tmp_path / "plain")), FIRST, [0.5] * FIRST)
    at_first = {k: v.detach().clone() for k, v in student.state_dict().items()}
    assert update_difference(at_first, checkpoint_tensors(folder), start) < SAME_UPDATE
    launch("second", tmp_path, timeout=60)
    for k in range(FIRST, STEPS):
        step(student, target, optimizer, k, rows)

    ends = {name: safetensors.torch.load_file(str(tmp_path / f"{name}.safetensors"))
            for name in ("uninterrupted", "resumed", "from_plain")}  # fmt: skip
    assert ends["resumed"].keys() == ends["uninterrupted"].keys()
    assert all(torch.equal(ends["resumed"][k], v) for k, v in ends["uninterrupted"].items())
    for end in ("resumed", "from_plain"):
        for name, plain in (("student.", student), ("target.", target)):
            sharded = {k[len(name) :]: v for k, v in ends[end].items() if k.startswith(name)}
            assert update_difference(plain.state_dict(), sharded, start) < SAME_UPDATE, (end, name)
            tiny_unet().load_state_dict(sharded, strict=True)

    # the sharded run's checkpoint, resumed by one plain process: the plain run's 4th step again
    resumed, resumed_target, resumed_optimizer = models(shard_them=False)
    done, _ = load_checkpoint(folder, resumed, resumed_target, resumed_optimizer, cfg)
    assert json.loads((folder / "state.json").read_text())["optimizer"]["param_groups"][0]["params"][0] == (
        "conv_in.weight"
    )
    step(resumed, resumed_target, resumed_optimizer, done, rows)
    assert update_difference(student.state_dict(), resumed.state_dict(), start) < SAME_UPDATE
    assert update_difference(target.state_dict(), resumed_target.state_dict(), start) < SAME_UPDATE


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
