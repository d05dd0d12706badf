"""benchmarks/bench_train.py runs (a smoke test on the tiny spec; its numbers are never asserted): the trainer's
models as built for the step and the floor, diffusers' LCM-LoRA arrangement, both precisions, and the CPU memory
measurement from before the build."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    yield module
    torch.set_num_threads(threads)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lora", [True, False])
def test_step_and_floor_run_on_the_trainers_models(bench: ModuleType, lora: bool, precision: str) -> None:
    env = bench.setup(bench.SPECS[0], lora, CPU, precision)
    assert set(env.floor()) == set(bench.FLOOR_PARTS)
    assert set(env.step()) == set(bench.STEP_PARTS)
    base = 2 if precision == "bf16" else 4  # bytes per frozen weight
    # LoRA: one base + float32 adapters, their gradients and 2 moments; full: + the float32 EMA target
    assert env.held == env.params * base + (16 if lora else 20) * env.trainable


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_diffusers_arrangement_trains_only_float32_adapters(bench: ModuleType, precision: str) -> None:
    env = bench.setup_diffusers(bench.SPECS[0], CPU, precision)
    named = dict(env.model.named_parameters())
    lora = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert all(p.dtype == want for p in base.values())
    env.step()
    env.step()
    assert all(named[n].requires_grad for n in lora)  # the adapters are on again after the teacher's passes
    assert any(not torch.equal(named[n], p) for n, p in lora.items())
    assert all(torch.equal(named[n], p) for n, p in base.items())


def test_cpu_peak_counts_the_weights(bench: ModuleType) -> None:
    mib, _ = bench.cpu_peak_mib(bench.SPECS[0], True, "diffusers", 1, 1, "fp32")
    env = bench.setup_diffusers(bench.SPECS[0], CPU)
    assert mib >= env.held / 2**20
