"""GPU checks for machines with CUDA; exits 0 with a message where there is none.

1. Full sampling loops (TCDScheduler exact and fused, consistency-boundary mode, FlowMatchTCDScheduler, sample_tcd)
   run under ``torch.cuda.set_sync_debug_mode("error")``: any host–device synchronisation raises.
2. A whole 4-step loop (model call included, noise pre-drawn) is captured in a CUDA graph and replayed; the replay
   must equal eager.
3. Timings with CUDA events, ours against diffusers (if installed) on the GPU: one step and full loops.

Run: python benchmarks/gpu_check.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tcd_sampler import FlowMatchTCDScheduler, TCDScheduler, sample_tcd
from tcd_sampler.core.step import tcd_step

DEVICE = "cuda"


def model(x: torch.Tensor, t: Any) -> torch.Tensor:
    return 0.9 * x


def sync_free_loops() -> dict[str, str]:
    """Run each loop with syncs turned into errors; returns name → 'ok' (or raises)."""
    results = {}
    shape = (1, 4, 128, 128)
    for name, sched in (
        ("TCDScheduler", TCDScheduler()),
        ("TCDScheduler fused_step", TCDScheduler(fused_step=True)),
        ("TCDScheduler consistency_boundary", TCDScheduler(consistency_boundary=True)),
    ):
        sched.set_timesteps(4, device=DEVICE)
        generator = torch.Generator(DEVICE).manual_seed(0)
        x = torch.randn(shape, device=DEVICE, generator=generator)
        sched.step_table(0.3)  # schedule setup: tables are built on the host, before the loop
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in sched.timesteps:
                x = sched.step(model(x, t), t, x, eta=0.3, generator=generator).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        results[name] = "ok"

    flow = FlowMatchTCDScheduler(shift=3.0, gamma=0.3)
    flow.set_timesteps(4, device=DEVICE)
    flow.generator = torch.Generator(DEVICE).manual_seed(0)
    flow.step_table()
    x = torch.randn(1, 16, 128, 128, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in flow.timesteps:
            x = flow.step(model(x, t), t, x, return_dict=False)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    results["FlowMatchTCDScheduler"] = "ok"

    sigmas = torch.tensor([14.6, 4.3, 1.6, 0.7, 0.0])  # the schedule lives on the host, as k-diffusion passes it
    x = torch.randn(shape, device=DEVICE) * 14.6
    generator = torch.Generator(DEVICE).manual_seed(0)

    def noise(sigma: Any, sigma_next: Any) -> torch.Tensor:
        return torch.randn(shape, device=DEVICE, generator=generator)

    def denoiser(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return 0.5 * y

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_tcd(denoiser, x, sigmas, gamma=0.3, noise_sampler=noise, disable=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    results["sample_tcd"] = "ok"

    # a time map whose tables live on the GPU (as a k-diffusion model's do) is called there, once
    from tcd_sampler import DiscreteVPTime

    time_map = DiscreteVPTime(TCDScheduler().alphas_cumprod.to(DEVICE))
    sched = TCDScheduler()
    sched.set_timesteps(4)
    gpu_sigmas = time_map.sigmas_for(sched.timesteps.to(DEVICE))
    sample_tcd(time_map.denoiser(model), x, gpu_sigmas, gamma=0.3, time=time_map, seed=0, disable=True)
    results["sample_tcd with a GPU time map"] = "ok"
    return results


def cuda_graph_loop() -> dict[str, Any]:
    """Capture a 4-step TCD loop with a small conv net in one CUDA graph; replay; compare with eager."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 4, 3, padding=1)
    ).to(DEVICE)
    sched = TCDScheduler()
    sched.set_timesteps(4)
    rows = sched.step_table(0.3).rows
    x_in = torch.randn(1, 4, 128, 128, device=DEVICE)
    noises = [torch.randn(1, 4, 128, 128, device=DEVICE) for _ in rows]

    def loop(x: torch.Tensor) -> torch.Tensor:
        for i, row in enumerate(rows):
            x = tcd_step(net(x) * (row.t / 1000.0), x, row, "epsilon", noises[i])[0]
        return x

    with torch.no_grad():
        eager = loop(x_in)
        static_x = x_in.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up outside the graph
                loop(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = loop(static_x)
        static_x.copy_(x_in)
        graph.replay()
        torch.cuda.synchronize()
        diff = float((static_out - eager).abs().max() / eager.abs().max())
        replay_ms = time_cuda(graph.replay, reps=200)
        eager_ms = time_cuda(lambda: loop(static_x), reps=200)
    return {"max_rel_diff": diff, "graph_replay_ms": replay_ms, "eager_loop_ms": eager_ms}


def time_cuda(fn: Callable[[], Any], reps: int = 500, warmup: int = 50) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_timings() -> list[dict[str, Any]]:
    rows = []
    try:
        import diffusers
    except ImportError:
        diffusers = None
    for shape in ((1, 4, 128, 128), (4, 4, 128, 128)):
        for eta in (0.0, 0.3):
            entry: dict[str, Any] = {"shape": "×".join(map(str, shape)), "eta": eta}
            candidates: list[tuple[str, Any]] = [
                ("exact", TCDScheduler()),
                ("fused", TCDScheduler(fused_step=True)),
            ]
            if diffusers is not None:
                candidates.append(("diffusers", diffusers.TCDScheduler()))
            for name, sched in candidates:
                sched.set_timesteps(4, device=DEVICE)
                generator = torch.Generator(DEVICE).manual_seed(0)
                x = torch.randn(shape, device=DEVICE)
                m = torch.randn(shape, device=DEVICE)
                t = sched.timesteps[1]

                def call(s: Any = sched, t: Any = t, x: Any = x, m: Any = m, g: Any = generator, e: float = eta) -> Any:
                    s._step_index = 1
                    return s.step(m, t, x, eta=e, generator=g)

                entry[name] = time_cuda(call) * 1000  # µs
            rows.append(entry)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (this script needs a GPU)")
        return 0
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "sync_free_loops": sync_free_loops(),
        "cuda_graph": cuda_graph_loop(),
        "step_us": step_timings(),
    }
    print(f"device: {report['device']}, torch {report['torch']}")
    for name, status in report["sync_free_loops"].items():
        print(f"sync-free loop under set_sync_debug_mode('error'): {name}: {status}")
    graph = report["cuda_graph"]
    print(
        f"CUDA graph of a 4-step loop (conv net included): replay {graph['graph_replay_ms']:.3f} ms, eager "
        f"{graph['eager_loop_ms']:.3f} ms, max rel diff {graph['max_rel_diff']:.1e}"
    )
    print("\n| latent | eta | exact µs | fused µs | diffusers µs | diffusers/exact | diffusers/fused |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in report["step_us"]:
        ref = row.get("diffusers")
        ratios = f"{ref / row['exact']:.2f} | {ref / row['fused']:.2f}" if ref else "– | –"
        print(f"| {row['shape']} | {row['eta']} | {row['exact']:.1f} | {row['fused']:.1f} | "
              f"{ref if ref is None else round(ref, 1)} | {ratios} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = graph["max_rel_diff"] <= 1e-6 and all(v == "ok" for v in report["sync_free_loops"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
