"""One TCD distillation training step against its floor, in time and in peak memory (weights included), and, for a
LoRA student, against diffusers' LCM-LoRA arrangement of the same models.

The step is what ``tcd_sampler.distill.train.train`` does per optimizer step, minus accelerate's one-process
wrappers and the data loading: ``zero_grad`` → ``batch_loss`` under autocast (noising, the teacher's two CFG passes
and DDIM step, the target's consistency function, the student's) → ``backward`` → grad-norm clip (1.0) → AdamW step
→ the EMA update of the target (full students only). The models come from the trainer's own ``build_models``, built
on the CPU and then moved to the device as the trainer's ``place`` does: a LoRA student (rank 8 on the default
targets, diffusers' LCM-LoRA list) is one UNet whose frozen base is the teacher (adapters disabled for its passes)
and the target (its own, without gradients), the base in the run's precision and the adapters float32; a full
student is a float32 copy of the teacher with a float32 EMA copy as its target, the teacher in the run's precision.

``--precision fp32`` (default) builds everything float32; ``--precision bf16`` builds the frozen weights bfloat16
(``build_models``' ``weight_dtype``, the trainer's under ``--mixed_precision bf16``) and runs the passes under
``torch.autocast(device_type, dtype=torch.bfloat16)`` (on the CPU too), backward and optimizer outside it.

The floor is the model work that no implementation of the objective can skip, on the same models and inputs: the
teacher's conditional and unconditional forward passes (no grad), the target's forward pass (no grad), the student's
forward + backward with a plain loss (the mean of its output), and the optimizer step, gradients set to None first
(as the step). Its models are the minimal arrangement: one shared UNet for a LoRA student (one copy of the frozen
base in the run's precision, the adapters and their AdamW state float32); for a full student the teacher in the
run's precision, the float32 student and its float32 EMA target (the EMA is part of what a full student must hold:
the loss's target and the run's result) — that is, the same models ``build_models`` builds. Time: step/floor is the
objective's overhead (goal ≤ 1.15×); step and floor calls alternate, so load on the machine hits both alike;
warm-up calls are excluded; times are medians. A second table splits both into their parts (each call is timed in
segments, synchronising the device at each boundary on CUDA).

diffusers' LCM-LoRA arrangement (``examples/consistency_distillation/train_lcm_distill_lora_*``), measured for
memory in the same run, written here from its description (:func:`setup_diffusers`): one UNet with its base weights
cast to the weight dtype, peft's LoRA added and its parameters cast to float32 (diffusers' ``cast_training_params``;
its scripts cast under fp16 only, under bf16 peft leaves the LoRA in the base's dtype: here float32 always, like the
trainer's), AdamW over the LoRA parameters; per step, in its order: the student's forward (graph kept), the
teacher's conditional and unconditional passes on the same UNet between ``disable_adapters()`` and
``enable_adapters()`` without gradients and one DDIM step on their CFG output, the target = the same UNet with its
adapters under no_grad, LCM's consistency boundary on both (the arithmetic is this package's, negligible: the memory
is the point), pseudo-Huber loss (c = 0.001), backward, clip, AdamW step, ``zero_grad(set_to_none=True)``.

Peak memory, weights included: on CUDA ``torch.cuda.max_memory_allocated`` with the peak reset and the allocation
read before the models are built (they are built on the CPU and moved, as in the trainer, so the float32 copy a
bf16 base is cast from never reaches the device); on the CPU the rise of peak RSS (``resource.getrusage(...)
.ru_maxrss``) in a child process per variant (forked before this process computes anything) above the RSS before
the models are built, its high-water mark reset through ``/proc/self/clear_refs`` where Linux allows it, once
before the build and again after it (with glibc's free memory returned first), so the build's float32 transient
does not count but the built weights do. Both cover the first calls on freshly built models, so they include
AdamW's state (allocated at the first optimizer step); RSS also counts what the allocator keeps cached and the
libraries' first-call buffers, so it is an upper bound on what torch holds. Goals (issue 18, item 8): a LoRA step
≤ 1.1× its floor and ≤ diffusers' arrangement.

Changed (issue 18, item 8): memory was the rise above what was allocated before the calls (weights excluded); it is
now measured from before the models are built (weights included), against the floor's real run on the minimal
arrangement and, for LoRA, against diffusers' arrangement; ``--precision``; the floor sets gradients to None first,
as the step does; the models are built by ``build_models(config, pipe, weight_dtype)``.

Run: .venv/bin/python benchmarks/bench_train.py [--threads N] [--quick] [--device cpu|cuda] [--precision fp32|bf16]
[--no-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
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

from tcd_sampler.distill.losses import ConsistencyFunction, distance, ema_update
from tcd_sampler.distill.models import LORA_TARGETS, build_models, run_dtype
from tcd_sampler.distill.objective import Objective, batch_loss, draw
from tcd_sampler.distill.teachers import Conditioning, teacher_path
from tcd_sampler.distill.train import TrainConfig

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
LORA_RANK = 8
MAX_GRAD_NORM = 1.0
EMA_DECAY = 0.95
HUBER_C = 0.001
GOAL = 1.15  # step/floor on time (issue 12)
MEMORY_GOAL = 1.1  # a LoRA step's peak / its floor's (issue 18, item 8)
FLOOR_PARTS = ("teacher", "target", "student", "optimizer")
STEP_PARTS = ("loss", "backward", "clip", "optimizer", "ema")
PRECISIONS = ("fp32", "bf16")


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


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The passes' context: bf16 autocast with ``precision="bf16"``, a disabled one otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def inputs(spec: Spec, device: torch.device) -> SimpleNamespace:
    """The batch of every arrangement: the path, latents, conditions, draws and the noisy input ``x`` at ``t``."""
    path, prediction_type = teacher_path(SD_CONFIG)
    objective = Objective()
    g = torch.Generator().manual_seed(0)
    shape = (spec.batch, 4, spec.side, spec.side)
    latents = torch.randn(shape, generator=g).to(device)
    text = torch.randn(spec.batch, spec.tokens, spec.text_dim, generator=g).to(device)
    draws = draw(objective, int(path.num_train_timesteps), shape, torch.Generator().manual_seed(1))
    t = draws.t.to(device)
    alpha, sigma = path.alpha_sigma(t, dtype=torch.float32)
    x = alpha.reshape(-1, 1, 1, 1) * latents + sigma.reshape(-1, 1, 1, 1) * draws.noise.to(device)
    return SimpleNamespace(path=path, prediction_type=prediction_type, objective=objective, shape=shape,
                           latents=latents, cond=Conditioning(text), uncond=Conditioning(torch.zeros_like(text)),
                           draws=draws, t=t, x=x)  # fmt: skip


def held_bytes(models: list[Any], trainable: list[torch.nn.Parameter]) -> int:
    """What the models hold between steps: the distinct models' parameters and buffers, plus the trainable
    parameters' gradients and AdamW's two moments (their dtype)."""
    unique = {id(m): m for m in models}.values()
    tensors = {id(v): v for m in unique for v in (*m.parameters(), *m.buffers())}.values()
    return sum(v.numel() * v.element_size() for v in tensors) + 3 * sum(p.numel() * p.element_size() for p in trainable)


def setup(spec: Spec, lora: bool, device: torch.device, precision: str = "fp32") -> SimpleNamespace:
    """Teacher, student, target and AdamW as the trainer builds them (on the CPU, then moved), a batch, its draws,
    and the two closures (the floor and the step)."""
    teacher = build_unet(spec)  # float32 on the CPU, as load_pipeline leaves the pipeline's UNet
    config = TrainConfig(teacher="bench", data="bench", output="bench", lora_rank=LORA_RANK if lora else 0,
                         lr=1e-4 if lora else 1e-6, ema_decay=EMA_DECAY, max_grad_norm=MAX_GRAD_NORM)  # fmt: skip
    run = build_models(config, SimpleNamespace(unet=teacher), run_dtype(precision))
    for model in (teacher, run.student, run.target):  # as place(): parameters moved in place, the optimizer's own
        model.to(device)
    student, target, optimizer, trainable = run.student, run.target, run.optimizer, run.trainable
    b = inputs(spec, device)
    x, t, text, empty = b.x, b.t, b.cond.encoder_hidden_states, b.uncond.encoder_hidden_states
    passes = autocast(device, precision)
    clock = Clock(device)

    def floor() -> dict[str, float]:
        clock.start()
        optimizer.zero_grad()  # first, as the step: no stale gradients through the passes
        with torch.no_grad(), passes:
            run.teacher(x, t, encoder_hidden_states=text, return_dict=False)
            run.teacher(x, t, encoder_hidden_states=empty, return_dict=False)
        clock.mark("teacher")
        with torch.no_grad(), passes:
            target(x, t, encoder_hidden_states=text, return_dict=False)
        clock.mark("target")
        with passes:
            out = student(x, t, encoder_hidden_states=text, return_dict=False)[0]
        out.float().mean().backward()
        clock.mark("student")
        optimizer.step()
        clock.mark("optimizer")
        return clock.parts

    def step() -> dict[str, float]:  # train._step's body, without accelerate's one-process wrappers
        clock.start()
        optimizer.zero_grad()  # first, as the trainer's _step: no stale gradients through the forward passes
        with passes:
            loss = batch_loss(b.objective, b.path, b.prediction_type, student, target, run.teacher, b.latents,
                              b.cond, b.uncond, b.draws)  # fmt: skip
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
        return draw(b.objective, int(b.path.num_train_timesteps), b.shape, torch.Generator().manual_seed(2))

    return SimpleNamespace(floor=floor, step=step, draw=drawing, trainable=sum(p.numel() for p in trainable),
                           params=sum(p.numel() for p in teacher.parameters() if not p.requires_grad),
                           held=held_bytes([teacher, student, target], trainable))  # fmt: skip


def setup_diffusers(spec: Spec, device: torch.device, precision: str = "fp32") -> SimpleNamespace:
    """diffusers' LCM-LoRA arrangement of the same UNet (see the module's docstring): ``step`` is its training step."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = build_unet(spec).requires_grad_(False)
    weight_dtype = run_dtype(precision)
    if weight_dtype is not None:
        unet.to(weight_dtype)  # the base in the weight dtype
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))  # fmt: skip
    cast_training_params(unet, dtype=torch.float32)  # the LoRA float32
    unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    b = inputs(spec, device)
    f = ConsistencyFunction(b.path, "lcm", prediction_type=b.prediction_type)  # LCM's boundary, the jump to 0
    omega = b.draws.omega.to(device, torch.float32).reshape(-1, 1, 1, 1)
    t_n, t_m = b.draws.t_n.to(device), b.draws.t_m.to(device)
    passes = autocast(device, precision)

    def net(cond: Conditioning) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda x, t: unet(x, t, encoder_hidden_states=cond.encoder_hidden_states, return_dict=False)[0]

    def teacher(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the base: adapters off for both passes
        unet.disable_adapters()
        m_c, m_u = net(b.cond)(x, t).float(), net(b.uncond)(x, t).float()
        unet.enable_adapters()
        return m_u + omega * (m_c - m_u)

    def step() -> None:
        with passes:
            prediction = f(net(b.cond), b.x, b.t, t_m)  # the student first: its graph lives through the rest
            x_prev = f.teacher_step(teacher, b.x, b.t, t_n)  # without gradients
            with torch.no_grad():
                goal = f(net(b.cond), x_prev, t_n, t_m)  # the target: the same UNet, adapters on
        loss = distance(prediction, goal, "huber", HUBER_C)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return SimpleNamespace(step=step, model=unet, trainable=sum(p.numel() for p in params),
                           held=held_bytes([unet], params))  # fmt: skip


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

#: What the memory table measures: (the arrangement's setup, the closure called).
MEASURED = {"floor": "floor", "step": "step", "diffusers": "step"}


def build(spec: Spec, lora: bool, which: str, device: torch.device, precision: str) -> SimpleNamespace:
    """The models and closures of one memory measurement: ``which`` is a key of :data:`MEASURED`."""
    return setup_diffusers(spec, device, precision) if which == "diffusers" else setup(spec, lora, device, precision)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (ru_maxrss reads it)
        return True
    except OSError:
        return False


def _trim() -> None:
    """Return the C allocator's free memory to the system (glibc's ``malloc_trim``), where there is one."""
    gc.collect()
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _memory_child(spec: Spec, lora: bool, which: str, calls: int, threads: int, precision: str, conn: Any) -> None:
    torch.set_num_threads(threads)
    exact = _reset_peak()
    base = _maxrss_mib()  # before the models are built: their weights count
    env = build(spec, lora, which, torch.device("cpu"), precision)
    _trim()
    exact = _reset_peak() and exact  # the build's transients (a bf16 base is cast from float32) do not count
    for _ in range(calls):
        getattr(env, MEASURED[which])()
    conn.send((_maxrss_mib() - base, exact))
    conn.close()


def cpu_peak_mib(spec: Spec, lora: bool, which: str, calls: int, threads: int, precision: str) -> tuple[float, bool]:
    """The peak-RSS rise of building ``which``'s models and ``calls`` calls of it, in a child process."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child, args=(spec, lora, which, calls, threads, precision, child))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


def cuda_peak_mib(spec: Spec, lora: bool, which: str, calls: int, device: torch.device,
                  precision: str) -> tuple[float, bool]:  # fmt: skip
    """The peak allocation above the allocation before ``which``'s models are built, over ``calls`` calls."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    env = build(spec, lora, which, device, precision)
    for _ in range(calls):
        getattr(env, MEASURED[which])()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del env
    gc.collect()
    torch.cuda.empty_cache()
    return peak / 2**20, True


def cuda_warm(device: torch.device) -> None:
    """Allocate the libraries' persistent workspaces (cuBLAS) before any baseline, so no variant is charged them."""
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones(64, 64, device=device, dtype=dtype)
        (a @ a).sum().item()
    torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- main


def med(rows: list[dict[str, float]], part: str | None = None) -> float:
    """Median ms of one part (or of the whole call) over the rows."""
    return statistics.median(row[part] if part else sum(row.values()) for row in rows) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier numbers)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32, or bf16: frozen weights bfloat16 and the passes under bf16 autocast")  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    diffusers.utils.logging.set_verbosity_error()  # its warning at each cast of a model with .to(dtype)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    how = "float32" if precision == "fp32" else "frozen weights bfloat16, trained float32, passes under bf16 autocast"
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, {where}, "
        f"{torch.get_num_threads()} threads, {how}; median ms of one call, warm-up excluded\n"
    )
    variants = [(spec, lora) for spec in SPECS for lora in (True, False)]
    mem_calls = 2 if args.quick else 3  # from the 2nd call on, the previous step's gradients exist
    memory: dict[tuple[str, bool], dict[str, tuple[float, bool]]] = {}
    if not args.no_memory:  # first: the CPU children fork before this process has computed anything
        if device.type == "cuda":
            cuda_warm(device)
        for spec, lora in variants:
            memory[(spec.name, lora)] = {
                which: (
                    cuda_peak_mib(spec, lora, which, mem_calls, device, precision)
                    if device.type == "cuda"
                    else cpu_peak_mib(spec, lora, which, mem_calls, args.threads, precision)
                )
                for which in ("floor", "step", "diffusers")
                if lora or which != "diffusers"
            }

    results = []
    for spec, lora in variants:
        small = spec.channels[0] < 16
        if device.type == "cuda":
            reps, warmup = (10, 3) if args.quick else (50, 10)
        elif args.quick:
            reps, warmup = (5, 1) if small else (3, 1)
        else:
            reps, warmup = (41, 5) if small else (21, 2)
        env = setup(spec, lora, device, precision)
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
        print_memory(memory, results, device, mem_calls)


def print_memory(memory: dict[tuple[str, bool], dict[str, tuple[float, bool]]], results: list[Any],
                 device: torch.device, calls: int) -> None:  # fmt: skip
    if device.type == "cuda":
        note = "torch.cuda.max_memory_allocated above the allocation before the models are built"
    else:
        exact = all(m[1] for row in memory.values() for m in row.values())
        how = "high-water mark reset before and after the build" if exact else "high-water mark NOT resettable here"
        note = f"rise of peak RSS (ru_maxrss) in a forked child per arrangement above the RSS before the build, {how}"
    print(f"\nPeak memory including weights, over the first {calls} call(s) on fresh models, MiB ({note}).")
    print("Floor: the floor's passes on the minimal arrangement (LoRA: one shared UNet; full: teacher in the run's")
    print("precision + float32 student + float32 EMA target). diffusers': its LCM-LoRA arrangement of the same UNet.")
    print(f"held = weights + gradients + AdamW moments, counted. Goals: LoRA ≤ {MEMORY_GOAL}× floor and ≤ diffusers'.")
    print("| model | student | step MiB | floor MiB | diffusers' MiB (LoRA) | step/floor | step/diffusers | goals "
          "| held MiB |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for spec, lora, env, *_ in results:
        row = {which: mib for which, (mib, _) in memory[(spec.name, lora)].items()}
        step, floor = row["step"], row["floor"]
        ratio = step / floor if floor > 0 else float("nan")
        if lora:
            ours = row["diffusers"]
            versus = f"{ours:.1f} | {ratio:.2f} | {step / ours:.2f}" if ours > 0 else f"{ours:.1f} | {ratio:.2f} | —"
            met = [f"≤ {MEMORY_GOAL}× floor {'met' if ratio <= MEMORY_GOAL else 'NOT met'}",
                   f"≤ diffusers' {'met' if step <= ours else 'NOT met'}"]  # fmt: skip
            goals = "; ".join(met)
        else:
            versus, goals = f"— | {ratio:.2f} | —", "— (none set)"
        print(f"| {spec.name} | {'LoRA' if lora else 'full'} | {step:.1f} | {floor:.1f} | {versus} | {goals} "
              f"| {env.held / 2**20:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
