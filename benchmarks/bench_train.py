"""One TCD distillation training step against its floor: the same model passes, timed alone in the same run.

The step is what ``tcd_sampler.distill.train.train`` does per optimizer step, minus accelerate's one-process
wrappers and the data loading: ``zero_grad`` → ``batch_loss`` (noising, the teacher's two CFG passes and DDIM step,
the target's consistency function, the student's) → ``backward`` → grad-norm clip (1.0) → AdamW step → the EMA
update of the target (full students only). The models come from the trainer's own ``build_models`` (LoRA rank 8 on the
attention projections through peft's ``add_adapter``, or a full student with an EMA copy as its target).

The floor is the model work that no implementation of the objective can skip, on the same models and inputs, timed
alone: the teacher's conditional and unconditional forward passes (no grad), the target's forward pass (no grad),
the student's forward + backward with a plain loss (the mean of its output, after ``zero_grad``, as the step), and
the optimizer step. The ratio step/floor is the objective's overhead (goal ≤ 1.15×). Step and floor calls
alternate, so load on the machine hits both alike; warm-up calls are excluded; times are medians. A second table
splits both into their parts (each call is timed in segments, synchronising the device at each boundary on CUDA).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the calls; on the CPU the
rise of the process's peak RSS (``resource.getrusage(...).ru_maxrss``, its high-water mark reset through
``/proc/self/clear_refs`` where Linux allows it) in a child process per variant, forked before this process computes
anything. Both cover the first calls on freshly built models, so they include AdamW's state (allocated at the first
optimizer step, alike in step and floor); RSS also counts what the allocator keeps cached, so it is an upper bound on
what torch holds.

Run: .venv/bin/python benchmarks/bench_train.py [--threads N] [--quick] [--device cpu|cuda] [--no-memory]
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import diffusers
import peft
import torch
from diffusers import UNet2DConditionModel

from tcd_sampler.distill.losses import ema_update
from tcd_sampler.distill.models import build_models
from tcd_sampler.distill.objective import Objective, batch_loss, draw
from tcd_sampler.distill.teachers import Conditioning, teacher_path
from tcd_sampler.distill.train import TrainConfig

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
LORA_RANK = 8
MAX_GRAD_NORM = 1.0
EMA_DECAY = 0.95
GOAL = 1.15  # step/floor on time (issue 12)
FLOOR_PARTS = ("teacher", "target", "student", "optimizer")
STEP_PARTS = ("loss", "backward", "clip", "optimizer", "ema")


@dataclass(frozen=True)
class Spec:
    """A two-level SD-layout ``UNet2DConditionModel`` and its batch (``tests/tiny_pipelines._unet``'s layout)."""

    name: str
    channels: tuple[int, int]
    groups: int
    head_dim: int
    text_dim: int
    side: int
    batch: int = 4
    tokens: int = 8


SPECS = (
    Spec("tiny SD (8, 16)", (8, 16), groups=4, head_dim=2, text_dim=16, side=16),  # the tests' _unet(16)
    Spec("larger (32, 64)", (32, 64), groups=8, head_dim=8, text_dim=32, side=32),
)


def build_unet(spec: Spec) -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=spec.side,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=spec.channels,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=spec.groups,
            attention_head_dim=spec.head_dim,
            cross_attention_dim=spec.text_dim,
        ).eval()


class Clock:
    """Segment timer: ``start()``, then ``mark(name)`` after each part (device synchronised at each boundary)."""

    def __init__(self, device: torch.device) -> None:
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        self.parts: dict[str, float] = {}
        self.last = 0.0

    def start(self) -> None:
        self.sync()
        self.parts = {}
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.parts[name] = now - self.last
        self.last = now


def setup(spec: Spec, lora: bool, device: torch.device) -> SimpleNamespace:
    """Teacher, student, target and AdamW as the trainer builds them, a batch, its draws, and the two closures."""
    teacher = build_unet(spec).to(device)
    config = TrainConfig(teacher="bench", data="bench", output="bench", lora_rank=LORA_RANK if lora else 0,
                         lr=1e-4 if lora else 1e-6, ema_decay=EMA_DECAY, max_grad_norm=MAX_GRAD_NORM)  # fmt: skip
    run = build_models(config, SimpleNamespace(unet=teacher))
    student, target, optimizer, trainable = run.student, run.target, run.optimizer, run.trainable
    path, prediction_type = teacher_path(SD_CONFIG)
    objective = Objective()
    g = torch.Generator().manual_seed(0)
    shape = (spec.batch, 4, spec.side, spec.side)
    latents = torch.randn(shape, generator=g).to(device)
    text = torch.randn(spec.batch, spec.tokens, spec.text_dim, generator=g).to(device)
    cond, uncond = Conditioning(text), Conditioning(torch.zeros_like(text))
    draws = draw(objective, int(path.num_train_timesteps), shape, torch.Generator().manual_seed(1))
    t = draws.t.to(device)
    alpha, sigma = path.alpha_sigma(t, dtype=torch.float32)
    x = alpha.reshape(-1, 1, 1, 1) * latents + sigma.reshape(-1, 1, 1, 1) * draws.noise.to(device)
    clock = Clock(device)

    def floor() -> dict[str, float]:
        clock.start()
        with torch.no_grad():
            run.teacher(x, t, encoder_hidden_states=cond.encoder_hidden_states, return_dict=False)
            run.teacher(x, t, encoder_hidden_states=uncond.encoder_hidden_states, return_dict=False)
        clock.mark("teacher")
        with torch.no_grad():
            target(x, t, encoder_hidden_states=cond.encoder_hidden_states, return_dict=False)
        clock.mark("target")
        optimizer.zero_grad()
        student(x, t, encoder_hidden_states=cond.encoder_hidden_states, return_dict=False)[0].mean().backward()
        clock.mark("student")
        optimizer.step()
        clock.mark("optimizer")
        return clock.parts

    def step() -> dict[str, float]:  # train.train's loop body, without accelerate's one-process wrappers
        clock.start()
        optimizer.zero_grad()  # first, as the trainer's _step: no stale gradients through the forward passes
        loss = batch_loss(objective, path, prediction_type, student, target, run.teacher, latents, cond, uncond,
                          draws)  # fmt: skip
        clock.mark("loss")
        loss.backward()
        clock.mark("backward")
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        clock.mark("clip")
        optimizer.step()
        clock.mark("optimizer")
        if not lora:
            ema_update(target, student, EMA_DECAY)
        clock.mark("ema")
        return clock.parts

    def drawing() -> Any:
        return draw(objective, int(path.num_train_timesteps), shape, torch.Generator().manual_seed(2))

    return SimpleNamespace(floor=floor, step=step, draw=drawing, trainable=sum(p.numel() for p in trainable),
                           params=sum(p.numel() for p in teacher.parameters()))  # fmt: skip


def timed(env: SimpleNamespace, reps: int, warmup: int) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """``reps`` timed calls of the floor and of the step, alternating (and alternating which goes first)."""
    for _ in range(warmup):
        env.floor()
        env.step()
    floors, steps = [], []
    for i in range(reps):
        if i % 2:
            steps.append(dict(env.step()))
            floors.append(dict(env.floor()))
        else:
            floors.append(dict(env.floor()))
            steps.append(dict(env.step()))
    return floors, steps


def draw_us(env: SimpleNamespace, reps: int = 50) -> float:
    for _ in range(5):
        env.draw()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        env.draw()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


# ---------------------------------------------------------------------------------------------------- memory


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (ru_maxrss reads it)
        return True
    except OSError:
        return False


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _memory_child(spec: Spec, lora: bool, which: str, calls: int, threads: int, conn: Any) -> None:
    torch.set_num_threads(threads)
    env = setup(spec, lora, torch.device("cpu"))
    exact = _reset_peak()
    base = _maxrss_mib()
    for _ in range(calls):
        getattr(env, which)()
    conn.send((_maxrss_mib() - base, exact))
    conn.close()


def cpu_peak_mib(spec: Spec, lora: bool, which: str, calls: int, threads: int) -> tuple[float, bool]:
    """The peak-RSS rise of ``calls`` calls of ``which`` in a child process on fresh models."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child, args=(spec, lora, which, calls, threads, child))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


def cuda_peak_mib(spec: Spec, lora: bool, which: str, calls: int, device: torch.device) -> tuple[float, bool]:
    env = setup(spec, lora, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    for _ in range(calls):
        getattr(env, which)()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del env
    torch.cuda.empty_cache()
    return peak / 2**20, True


# ---------------------------------------------------------------------------------------------------- main


def med(rows: list[dict[str, float]], part: str | None = None) -> float:
    """Median ms of one part (or of the whole call) over the rows."""
    return statistics.median(row[part] if part else sum(row.values()) for row in rows) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier numbers)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, {where}, "
        f"{torch.get_num_threads()} threads, float32; median ms of one call, warm-up excluded\n"
    )
    variants = [(spec, lora) for spec in SPECS for lora in (True, False)]
    mem_calls = 2 if args.quick else 3  # from the 2nd call on, the previous step's gradients exist
    memory: dict[tuple[str, bool], tuple[tuple[float, bool], tuple[float, bool]]] = {}
    if not args.no_memory:  # first: the CPU children fork before this process has computed anything
        for spec, lora in variants:
            if device.type == "cuda":
                pair = tuple(cuda_peak_mib(spec, lora, w, mem_calls, device) for w in ("floor", "step"))
            else:
                pair = tuple(cpu_peak_mib(spec, lora, w, mem_calls, args.threads) for w in ("floor", "step"))
            memory[(spec.name, lora)] = pair  # type: ignore[assignment]

    results = []
    for spec, lora in variants:
        small = spec.channels[0] < 16
        if device.type == "cuda":
            reps, warmup = (10, 3) if args.quick else (50, 10)
        elif args.quick:
            reps, warmup = (5, 1) if small else (3, 1)
        else:
            reps, warmup = (41, 5) if small else (21, 2)
        env = setup(spec, lora, device)
        floors, steps = timed(env, reps, warmup)
        results.append((spec, lora, env, floors, steps, draw_us(env, 10 if args.quick else 50)))

    print(f"| model | latents | student | trainable | step | floor | step/floor | per-pair range | ≤ {GOAL}× |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for spec, lora, env, floors, steps, _ in results:
        pairs = sorted(sum(s.values()) / sum(f.values()) for f, s in zip(floors, steps, strict=True))
        kind = f"LoRA r{LORA_RANK}" if lora else "full + EMA"
        latents = f"{spec.batch}×4×{spec.side}×{spec.side}"
        print(
            f"| {spec.name}, {env.params / 1e6:.2f} M | {latents} | {kind} | {env.trainable / 1e6:.3f} M "
            f"| {med(steps):.1f} | {med(floors):.1f} | {med(steps) / med(floors):.3f} "
            f"| {pairs[0]:.3f}–{pairs[-1]:.3f} | {'met' if med(steps) <= GOAL * med(floors) else 'NOT met'} |"
        )

    print("\nThe parts (median ms). Floor: teacher = cond + uncond forward, target = forward, student = forward +")
    print("backward of mean(output), opt = AdamW step. Step: loss = batch_loss (the same four forward passes and the")
    print("objective's arithmetic), bwd = backward, then clip, AdamW step, EMA; extra = (loss + bwd) − (teacher +")
    print("target + student), the objective's own cost in the passes. draw = objective.draw, outside the step.")
    print("| model | student | teacher | target | student | opt | loss | bwd | clip | opt | EMA | extra | draw µs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec, lora, _, floors, steps, d_us in results:
        f = {p: med(floors, p) for p in FLOOR_PARTS}
        s = {p: med(steps, p) for p in STEP_PARTS}
        extra = s["loss"] + s["backward"] - f["teacher"] - f["target"] - f["student"]
        print(
            f"| {spec.name} | {'LoRA' if lora else 'full'} | {f['teacher']:.1f} | {f['target']:.1f} "
            f"| {f['student']:.1f} | {f['optimizer']:.2f} | {s['loss']:.1f} | {s['backward']:.1f} | {s['clip']:.2f} "
            f"| {s['optimizer']:.2f} | {s['ema']:.2f} | {extra:+.1f} | {d_us:.0f} |"
        )

    if memory:
        if device.type == "cuda":
            note = "torch.cuda.max_memory_allocated above the allocation before the calls"
        else:
            exact = all(m[1] for pair in memory.values() for m in pair)
            how = "high-water mark reset first" if exact else "high-water mark NOT resettable here: a lower bound"
            note = f"rise of peak RSS (ru_maxrss) in a forked child per variant, {how}"
        print(f"\nPeak memory over the first {mem_calls} call(s) on fresh models, MiB ({note}):")
        print("| model | student | step | floor | step/floor |")
        print("|---|---|---:|---:|---:|")
        for spec, lora in variants:
            (floor_mib, _), (step_mib, _) = memory[(spec.name, lora)]
            ratio = step_mib / floor_mib if floor_mib > 0 else float("nan")
            print(f"| {spec.name} | {'LoRA' if lora else 'full'} | {step_mib:.1f} | {floor_mib:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
