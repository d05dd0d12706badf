"""Step, schedule and loop timings: tcd-sampler against diffusers, measured in the same run.

Prints markdown tables: the median wall time of one ``step`` (a middle step of a 4-step schedule) for each latent
shape and eta, ours (exact default and ``fused_step``) against diffusers' ``TCDScheduler``, with the ratio and the
floor (``torch.randn`` of the shape when noise is drawn, plus one fused pass ``torch.add(x * a, m, alpha=b)``); the
flow scheduler against ``FlowMatchEulerDiscreteScheduler``; ``set_timesteps``; and full 4- and 8-step loops with a
trivial model. Warm-up calls are excluded; the thread count is printed.

Run: .venv/bin/python benchmarks/bench_step.py [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import diffusers
import torch

from tcd_sampler import FlowMatchTCDScheduler, TCDScheduler

SHAPES = [(1, 4, 8, 8), (1, 4, 128, 128), (4, 4, 128, 128)]
FLOW_SHAPE = (1, 16, 128, 128)


def median_us(fn: Callable[[], Any], reps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in microseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def reps_for(shape: tuple[int, ...], quick: bool) -> tuple[int, int]:
    numel = 1
    for n in shape:
        numel *= n
    reps = 3000 if numel < 10_000 else 300 if numel < 500_000 else 100
    return (max(reps // 5, 20), 10) if quick else (reps, reps // 10)


def one_step(
    sched: Any, shape: tuple[int, ...], eta: float | None, flow: bool = False, return_dict: bool = True
) -> Callable[[], Any]:
    """A closure timing one middle step (index 1) of a 4-step schedule."""
    sched.set_timesteps(4)
    x, m = torch.randn(shape), torch.randn(shape)
    t = sched.timesteps[1]
    generator = torch.Generator().manual_seed(0)
    kwargs: dict[str, Any] = {"generator": generator, "return_dict": return_dict}
    if not flow:
        kwargs["eta"] = eta

    def call() -> Any:
        sched._step_index = 1
        return sched.step(m, t, x, **kwargs)

    return call


def floor(shape: tuple[int, ...], noise: bool) -> Callable[[], Any]:
    x, m = torch.randn(shape), torch.randn(shape)
    generator = torch.Generator().manual_seed(0)

    def call() -> Any:
        if noise:
            torch.randn(shape, generator=generator)
        return torch.add(x * 0.9, m, alpha=0.1)

    return call


def loop(sched: Any, steps: int, shape: tuple[int, ...], eta: float) -> Callable[[], Any]:
    x = torch.randn(shape)

    def call() -> Any:
        sched.set_timesteps(steps)
        generator = torch.Generator().manual_seed(0)
        y = x
        for t in sched.timesteps:
            y = sched.step(0.9 * y, t, y, eta=eta, generator=generator).prev_sample
        return y

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier numbers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; median µs of one call, warm-up excluded\n"
    )

    print("| latent | eta | exact | fused | diffusers | diffusers/exact | diffusers/fused | floor | fused/floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        reps, warm = reps_for(shape, args.quick)
        for eta in (0.0, 0.3):
            exact = median_us(one_step(TCDScheduler(), shape, eta), reps, warm)
            fused = median_us(one_step(TCDScheduler(fused_step=True), shape, eta), reps, warm)
            ref = median_us(one_step(diffusers.TCDScheduler(), shape, eta), reps, warm)
            low = median_us(floor(shape, noise=eta > 0), reps, warm)
            name = "×".join(map(str, shape))
            print(
                f"| {name} | {eta} | {exact:.1f} | {fused:.1f} | {ref:.1f} | {ref / exact:.2f} | {ref / fused:.2f} "
                f"| {low:.1f} | {fused / low:.2f} |"
            )

    print("\nFlow latents: FlowMatchTCDScheduler against FlowMatchEulerDiscreteScheduler (stochastic for gamma > 0)")
    print("(return_dict=False is how the flow pipelines call it; the output object also carries x̂0, which diffusers'")
    print("flow output does not have)")
    print("| latent | gamma | return_dict | ours | diffusers | ratio | floor | ours/floor |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    reps, warm = reps_for(FLOW_SHAPE, args.quick)
    for gamma in (0.0, 0.3):
        for as_dict in (False, True):
            ours_sched = FlowMatchTCDScheduler(shift=3.0, gamma=gamma)
            ours = median_us(one_step(ours_sched, FLOW_SHAPE, None, True, as_dict), reps, warm)
            ref_sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=gamma > 0)
            ref = median_us(one_step(ref_sched, FLOW_SHAPE, None, True, as_dict), reps, warm)
            low = median_us(floor(FLOW_SHAPE, noise=gamma > 0), reps, warm)
            name = "×".join(map(str, FLOW_SHAPE))
            print(
                f"| {name} | {gamma} | {as_dict} | {ours:.1f} | {ref:.1f} | {ref / ours:.2f} | {low:.1f} "
                f"| {ours / low:.2f} |"
            )

    print("\n| operation | ours | diffusers | diffusers/ours |")
    print("|---|---:|---:|---:|")
    reps, warm = (300, 30) if not args.quick else (50, 5)
    for steps in (4, 8):
        ours = median_us(lambda s=steps: TCDScheduler().set_timesteps(s), reps, warm)  # type: ignore[misc]
        ref = median_us(lambda s=steps: diffusers.TCDScheduler().set_timesteps(s), reps, warm)  # type: ignore[misc]
        print(f"| construct + set_timesteps({steps}) | {ours:.1f} | {ref:.1f} | {ref / ours:.2f} |")
    shared_ours, shared_ref = TCDScheduler(), diffusers.TCDScheduler()
    ours = median_us(lambda: shared_ours.set_timesteps(4), reps, warm)
    ref = median_us(lambda: shared_ref.set_timesteps(4), reps, warm)
    print(f"| set_timesteps(4) | {ours:.1f} | {ref:.1f} | {ref / ours:.2f} |")
    for steps in (4, 8):
        for shape in ((1, 4, 8, 8), (1, 4, 128, 128)):
            r, w = reps_for(shape, args.quick)
            r, w = max(r // steps, 10), max(w // steps, 2)
            name = f"{steps}-step loop, {'×'.join(map(str, shape))}, eta 0.3"
            exact = median_us(loop(TCDScheduler(), steps, shape, 0.3), r, w)
            fused = median_us(loop(TCDScheduler(fused_step=True), steps, shape, 0.3), r, w)
            ref = median_us(loop(diffusers.TCDScheduler(), steps, shape, 0.3), r, w)
            print(f"| {name} (exact) | {exact:.1f} | {ref:.1f} | {ref / exact:.2f} |")
            print(f"| {name} (fused) | {fused:.1f} | {ref:.1f} | {ref / fused:.2f} |")


if __name__ == "__main__":
    main()
