"""The trainer on a CUDA device: a tiny SD-shaped teacher distilled in bf16, LoRA and full, with validation grids, a
kill and a resume, and the export; prints each run's peak memory and steps/s. Exits 0 with a message where CUDA is
absent (``--allow-cpu`` runs the same checks on the CPU, under bf16 autocast, to check the script itself).

For each student (LoRA rank 8, full):
1. an uninterrupted run of ``--steps`` steps (checkpoints every 5, a validation grid every 10, bf16, gradient
   checkpointing), through the ``tcd-sampler train`` command in a subprocess;
2. the same run killed (SIGKILL) in step 12, then resumed with ``--resume latest``; its final weights against the
   uninterrupted run's (bit-identical on the CPU; on a GPU the kernels' summation order may differ between
   processes, so the largest difference is printed, and must stay within 1e-2 of the update, as the tests' rule);
3. the export loads: the LoRA into the teacher's pipeline, the full student's ``unet/`` folder, and a 4-step image
   from each is finite.

Run: python benchmarks/gpu_train_check.py [--steps 20] [--allow-cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]
from test_train import images as tiny_images  # noqa: E402 (the trainer tests' tiny SD teacher and image folder)
from test_train import teacher as tiny_teacher  # noqa: E402

KILL_AT = 12  # the step whose loss is the kill point (1-based call of batch_loss)
KILLER = """
import os, signal, sys
import tcd_sampler.distill.train as train_module
from tcd_sampler.cli import main
calls = {"n": 0}
real = train_module.batch_loss
def wrapped(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
train_module.batch_loss = wrapped
sys.exit(main(sys.argv[1:]))
"""


def train_args(teacher: str, data: str, output: Path, lora_rank: int, steps: int) -> list[str]:
    return ["train", "--teacher", teacher, "--data", data, "--output", str(output), "--lora-rank", str(lora_rank),
            "--resolution", "32", "--batch-size", "4", "--steps", str(steps), "--lr", "1e-3", "--checkpoint-every",
            "5", "--validation-every", "10", "--mixed-precision", "bf16", "--gradient-checkpointing",
            "--guidance-min", "2", "--guidance-max", "4", "--no-progress"]  # fmt: skip


def run(args: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if kill_at is None:
        cmd = [sys.executable, "-m", "tcd_sampler.cli", *args]
    else:
        cmd = [sys.executable, "-c", KILLER.replace("AT", str(kill_at)), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


def last_weights(output: Path) -> dict[str, torch.Tensor]:
    last = sorted((output / "checkpoints").glob("step-*"))[-1]
    from tcd_sampler.distill.checkpoints import checkpoint_tensors

    return checkpoint_tensors(last)


def sample_export(teacher: str, output: Path, lora: bool, device: str) -> bool:
    """Whether a 4-step image of the exported student (in the teacher's pipeline, the card's scheduler) is finite."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from tcd_sampler.distill.export import scheduler_from_card, verify_card_files

    verify_card_files(output)  # the exported files are the ones its card records
    pipe = DiffusionPipeline.from_pretrained(teacher)
    if lora:
        pipe.load_lora_weights(str(output))
    else:
        pipe.unet = UNet2DConditionModel.from_pretrained(output / "unet")
    pipe.scheduler = scheduler_from_card(str(output))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a picture", num_inference_steps=4, guidance_scale=1.0, output_type="pt", eta=0.3,
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    return bool(torch.isfinite(image).all())


def check(root: Path, teacher: str, data: str, lora_rank: int, steps: int, device: str) -> dict[str, Any]:
    name = "lora" if lora_rank else "full"
    whole, cut = root / f"{name}-whole", root / f"{name}-cut"
    done = run(train_args(teacher, data, whole, lora_rank, steps))
    if done.returncode:
        return {"student": name, "ok": False, "error": done.stderr[-2000:]}
    card = json.loads((whole / "card.json").read_text())
    killed = run(train_args(teacher, data, cut, lora_rank, steps), kill_at=KILL_AT)
    resumed = run([*train_args(teacher, data, cut, lora_rank, steps), "--resume", "latest"])
    result: dict[str, Any] = {
        "student": name,
        "steps_per_second": round(steps / card["this_run"]["seconds"], 2),
        "peak_memory_gib": card["this_run"].get("peak_memory_gib"),
        "device": card["this_run"]["device"],
        "validation_grids": sorted(p.name for p in (whole / "validation").glob("*.png")),
        "killed": killed.returncode == -signal.SIGKILL,
        "resumed_ok": resumed.returncode == 0,
    }
    if resumed.returncode:
        result["error"] = resumed.stderr[-2000:]
    else:
        a, b = last_weights(whole), last_weights(cut)
        result["resume_max_abs_difference"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        result["resume_bit_identical"] = all(torch.equal(a[k], b[k]) for k in a)
    result["export_samples_finite"] = sample_export(teacher, whole, bool(lora_rank), device)
    result["ok"] = bool(result["killed"] and result["resumed_ok"] and result["export_samples_finite"]
                        and len(result["validation_grids"]) >= 2)  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU where CUDA is absent")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_train_check: CUDA is not available here; nothing to check (pass --allow-cpu to run on the CPU)")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}; {args.steps} steps, bf16, kill in step {KILL_AT}, resume")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, data = tiny_teacher(root), tiny_images(root, 16)  # the trainer tests' own
        for lora_rank in (8, 0):
            results.append(check(root, teacher, data, lora_rank, args.steps, device))
            print(json.dumps(results[-1], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
