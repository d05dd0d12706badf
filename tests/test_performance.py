"""The per-step path has no host syncs, and a whole TCD loop (model call included) compiles with fullgraph=True.
Speed itself is measured by benchmarks/bench_step.py, never asserted here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tcd_sampler import FlowMatchTCDScheduler, TCDScheduler, sample_tcd
from tcd_sampler.core.fused import linear_step
from tcd_sampler.core.step import tcd_step

SYNC_OPS = ("aten::_local_scalar_dense",)  # what .item(), int(t), bool(t) … all end in


def host_reads(fn: Callable[[], Any]) -> int:
    """How many times `fn` reads a tensor's value back to the host (what blocks on a GPU)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key in SYNC_OPS)


def model(x: torch.Tensor, t: Any) -> torch.Tensor:
    return 0.9 * x


def test_the_counter_sees_a_sync() -> None:
    assert host_reads(lambda: torch.ones(3).sum().item()) == 1


@pytest.mark.parametrize("config", [{}, {"fused_step": True}, {"consistency_boundary": True}])
def test_tcd_scheduler_loop_reads_nothing_back(config: dict[str, Any]) -> None:
    sched = TCDScheduler(**config)
    sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)

    def loop() -> None:
        y = x
        for t in sched.timesteps:
            y = sched.step(model(y, t), t, y, eta=0.3, generator=generator).prev_sample

    assert host_reads(loop) == 0


def test_img2img_style_loop_reads_nothing_back() -> None:
    """Pipelines slice the schedule and may or may not call set_begin_index."""
    sched = TCDScheduler()
    sched.set_timesteps(8)
    x = torch.randn(1, 4, 8, 8)

    def loop() -> None:
        y = x
        for t in sched.timesteps[3:]:
            y = sched.step(model(y, t), t, y, eta=0.3, generator=torch.Generator().manual_seed(1)).prev_sample

    assert host_reads(loop) == 0
    assert sched.step_index == 8


def test_flow_scheduler_loop_reads_nothing_back() -> None:
    sched = FlowMatchTCDScheduler(shift=3.0, gamma=0.3)
    sched.set_timesteps(4)
    sched.generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8)

    def loop() -> None:
        y = x
        for t in sched.timesteps:
            y = sched.step(model(y, t), t, y, return_dict=False)[0]

    assert host_reads(loop) == 0


def test_sample_tcd_reads_its_sigmas_once() -> None:
    sigmas = torch.tensor([14.6, 4.3, 1.6, 0.7, 0.0])
    x = torch.randn(1, 4, 8, 8) * sigmas[0]
    reads = host_reads(lambda: sample_tcd(lambda y, s: 0.5 * y, x, sigmas, gamma=0.3, seed=0, disable=True))
    assert reads == 0  # the sigmas are copied to the host once, as an array; nothing is read per step


def compiled_loop(rows: Any, prediction_type: str, fused: Any = None) -> Callable[..., torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1))

    def loop(x: torch.Tensor, noises: list[torch.Tensor]) -> torch.Tensor:
        for i, row in enumerate(rows):
            m = net(x) * (row.t / 1000.0)  # the model call is part of the graph
            if fused is None:
                x = tcd_step(m, x, row, prediction_type, noises[i])[0]
            else:
                x = linear_step(m, x, row, fused[i], noises[i].clone())[0]
        return x

    return loop


def loop_inputs(sched: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    return x, [torch.randn(x.shape, generator=g) for _ in range(len(sched.timesteps))]


def check_compiles(
    loop: Callable[..., torch.Tensor], x: torch.Tensor, noises: list[torch.Tensor], backend: str
) -> None:
    torch._dynamo.reset()
    with torch.no_grad():
        eager = loop(x, noises)
        compiled = torch.compile(loop, fullgraph=True, backend=backend)(x, noises)  # raises on any graph break
    assert float((compiled - eager).abs().max() / eager.abs().max()) <= 1e-6


@pytest.mark.parametrize("fused", [False, True])
def test_whole_loop_compiles_fullgraph(fused: bool) -> None:
    sched = TCDScheduler()
    sched.set_timesteps(4)
    rows = sched.step_table(0.3).rows
    from tcd_sampler.core.fused import fold_row

    folded = [fold_row(row, "epsilon") for row in rows] if fused else None
    check_compiles(compiled_loop(rows, "epsilon", folded), *loop_inputs(sched), backend="aot_eager")


def test_flow_loop_compiles_fullgraph() -> None:
    sched = FlowMatchTCDScheduler(shift=3.0)
    sched.set_timesteps(4)
    check_compiles(compiled_loop(sched.step_table(0.3).rows, "flow"), *loop_inputs(sched), backend="aot_eager")


@pytest.mark.slow
def test_whole_loop_compiles_with_inductor() -> None:
    """The real compiler (C++ codegen on CPU, about 20 s): no graph break, eager's numbers within 1e-6."""
    sched = TCDScheduler()
    sched.set_timesteps(4)
    check_compiles(compiled_loop(sched.step_table(0.3).rows, "epsilon"), *loop_inputs(sched), backend="inductor")
