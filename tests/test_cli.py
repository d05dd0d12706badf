"""The ``tcd-sampler`` command: it fails early (every bad input is refused before a model is loaded or slow work
starts, with exit code 2 and one line ``tcd-sampler: error: <message>`` on stderr) and loses nothing (outputs are
written atomically: a failed run leaves no partial or temporary file). Also the generate runs end to end on the
tiny pipelines of ``tiny_pipelines.py``, LoRAs included, and the absence of misleading third-party warnings."""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import tcd_sampler
from tcd_sampler import cli
from tcd_sampler._files import atomic_paths, folder_problem
from tcd_sampler.cli import main
from tcd_sampler.distill import DistillConfig, distill, save_student
from tcd_sampler.integrations import pipelines
from tcd_sampler.integrations.diffusers import TCDScheduler
from tiny_pipelines import FACTORIES, FLUX_SCHEDULER_CONFIG, init_image, mask_image

FLUX_CONFIG = FLUX_SCHEDULER_CONFIG


class Reached(Exception):
    """Raised by a stand-in for slow work: the checks before it passed."""


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models saved as diffusers folders (with their stock schedulers), plus an input image and a mask."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for kind, scheduler in (
        ("sd", diffusers.EulerDiscreteScheduler(steps_offset=1)),
        ("sd_inpaint", diffusers.PNDMScheduler(steps_offset=1)),
        ("lcm", diffusers.LCMScheduler()),
        ("flux", diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)),
    ):
        FACTORIES[kind](scheduler).save_pretrained(root / kind)
        dirs[kind] = root / kind
    Image.fromarray(np.asarray(init_image())).save(root / "input.png")
    mask_image().save(root / "mask.png")
    dirs["input"], dirs["mask"] = root / "input.png", root / "mask.png"
    return dirs


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LoRA (rank 2, attention projections) on the tiny SD UNet, saved by diffusers' own
    ``save_lora_weights`` as ``pytorch_lora_weights.safetensors``."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = FACTORIES["sd"](diffusers.EulerDiscreteScheduler(steps_offset=1)).unet
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet.add_adapter(config)  # init_lora_weights=False: both factors random, so the LoRA changes the output
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    folder = tmp_path_factory.mktemp("lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state)
    return folder


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if generate gets as far as loading a model."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_pipeline was called: the bad input was not caught before loading the model")

    monkeypatch.setattr(pipelines, "load_pipeline", refuse)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An empty output folder."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str, loaded: bool = False) -> str:
    """Run the command; assert exit code 2, exactly one stderr line `tcd-sampler: error: …` containing every
    fragment, and no traceback. With ``loaded`` (the error came after the model loaded) diffusers' progress bars
    may come first; the error must still be one line, the last. Returns the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    if loaded:
        assert [line for line in lines if line.startswith("tcd-sampler:")] == lines[-1:], err
        lines = lines[-1:]
    assert len(lines) == 1, err
    assert lines[0].startswith("tcd-sampler: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def generate_argv(model: Path | str, output: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "a photo of a cat", "--output", str(output), *extra]


def run_generate(model: Path, output: Path, *extra: str) -> Image.Image:
    assert main(["generate", "--model", str(model), "--prompt", "a photo of a cat", "--steps", "4", "--output",
                 str(output), *extra]) == 0  # fmt: skip
    return Image.open(output)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    init_image().save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- version and help


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tcd-sampler {importlib.metadata.version('tcd-sampler')}\n"


def test_version_falls_back_to_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == tcd_sampler.__version__


def test_help_says_what_the_tool_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "Few-step TCD" in text and "diffusion and flow-matching models" in text
    for command in ("schedule", "generate", "distill", "train", "demo", "demo-2d", "digits"):
        assert any(line.strip().startswith(f"{command} ") for line in text.splitlines()), command


@pytest.mark.parametrize("command", ["schedule", "generate", "distill", "train", "demo", "demo-2d", "digits"])
def test_command_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: tcd-sampler {command}" in capsys.readouterr().out


# ------------------------------------------------------------------------------- argparse errors: one line, 2


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        ([], ["the following arguments are required: COMMAND", "tcd-sampler --help"]),
        (["paint"], ["invalid choice: 'paint'", "'generate'"]),
        (["generate", "--prompt", "x"], ["the following arguments are required: --model"]),
        (["generate", "--model", "m", "--prompt", "x", "--colour"], ["unrecognized arguments: --colour"]),
        (["generate", "--model", "m", "--prompt", "x", "--gamma", "2"], ["argument --gamma", "[0.0, 1.0]", "got 2"]),
        (["generate", "--model", "m", "--prompt", "x", "--gamma", "abc"], ["argument --gamma", "a number, got 'abc'"]),
        (["generate", "--model", "m", "--prompt", "x", "--strength", "0"], ["argument --strength", "(0.0, 1.0]"]),
        (["generate", "--model", "m", "--prompt", "x", "--strength", "1.5"], ["argument --strength", "got 1.5"]),
        (["generate", "--model", "m", "--prompt", "x", "--steps", "0"], ["argument --steps", "[1, ∞]", "got 0"]),
        (["generate", "--model", "m", "--prompt", "x", "--steps", "-1"], ["argument --steps", "got -1"]),
        (["generate", "--model", "m", "--prompt", "x", "--steps", "2.5"], ["argument --steps", "an integer"]),
        (["generate", "--model", "m", "--prompt", "x", "--width", "30"], ["argument --width", "multiple of 8"]),
        (["generate", "--model", "m", "--prompt", "x", "--height", "0"], ["argument --height", "got 0"]),
        (["generate", "--model", "m", "--prompt", "x", "--guidance", "-1"], ["argument --guidance", "got -1"]),
        (["generate", "--model", "m", "--prompt", "x", "--guidance", "nan"], ["argument --guidance", "got nan"]),
        (["generate", "--model", "m", "--prompt", "x", "--guidance", "inf"], ["argument --guidance", "finite"]),
        (["generate", "--model", "m", "--prompt", "x", "--seed", "-1"], ["argument --seed", "got -1"]),
        (["generate", "--model", "m", "--prompt", "x", "--gamma", "inf"], ["argument --gamma", "finite", "got inf"]),
        (["distill", "--output", "d", "--steps", "0"], ["argument --steps", "[1, ∞]", "tcd-sampler distill --help"]),
        (["distill", "--output", "d", "--steps", "-5"], ["argument --steps", "got -5"]),
        (["distill", "--output", "d", "--warmup-steps", "-1"], ["argument --warmup-steps", "[0, ∞]", "got -1"]),
        (["distill", "--output", "d", "--batch-size", "0"], ["argument --batch-size"]),
        (["distill", "--output", "d", "--method", "cm"], ["argument --method", "invalid choice: 'cm'"]),
        (["distill"], ["required: --output"]),
        (["demo", "--samples", "0"], ["argument --samples"]),
        (["demo", "--seeds", "-1"], ["argument --seeds"]),
        (["demo-2d", "--samples", "0"], ["argument --samples"]),
        (["digits", "paint", "--output", "d"], ["argument what", "invalid choice: 'paint'"]),
        (["schedule", "--steps", "0"], ["argument --steps"]),
        (["schedule", "--gamma", "-0.1"], ["argument --gamma"]),
    ],
)
def test_argument_errors(argv: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    fails(argv, capsys, *fragments)
    assert capsys.readouterr().out == ""  # no usage block either


def test_unit_float_types_state_their_own_ranges() -> None:
    """``unit_float`` takes [0, 1] (--gamma, --caption-dropout, --ema-decay), ``positive_unit_float`` (0, 1] (a
    learning rate): each error states the range that option really accepts."""
    import argparse

    from tcd_sampler.cli.arguments import positive_unit_float, unit_float

    assert unit_float("0") == 0.0 and positive_unit_float("1e-4") == 1e-4 and positive_unit_float("1") == 1.0
    for text in ("0", "-1", "2", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"^must be (a finite number )?in \(0.0, 1.0\], got"):
            positive_unit_float(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be in \[0.0, 1.0\], got 2.0"):
        unit_float("2")


# --------------------------------------------------------------------- generate: refused before the model loads


@pytest.mark.usefixtures("no_load")
def test_image_problems(model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = out / "x.png"
    sd = model_dirs["sd"]
    fails(generate_argv(sd, target, "--image", str(out / "none.png")), capsys, "--image", "none.png does not exist")
    text = out.parent / "notes.png"
    text.write_text("not an image")
    fails(generate_argv(sd, target, "--image", str(text)), capsys, "--image", "is not a readable image", "Pillow")
    truncated = out.parent / "truncated.png"
    truncated.write_bytes(png_bytes()[:200])
    fails(generate_argv(sd, target, "--image", str(truncated)), capsys, "--image", "is not a readable image")
    fails(generate_argv(sd, target, "--image", str(out.parent)), capsys, "--image", "is not a file")
    odd = out.parent / "odd.png"
    init_image().resize((33, 30)).save(odd)
    fails(generate_argv(sd, target, "--image", str(odd)), capsys, "33x30", "multiple of 8", "--width and --height")
    assert list(out.iterdir()) == []


@pytest.mark.usefixtures("no_load")
def test_mask_problems(model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = out / "x.png"
    sd, image = model_dirs["sd_inpaint"], ["--image", str(model_dirs["input"])]
    fails(generate_argv(sd, target, "--mask", str(model_dirs["mask"])), capsys, "--mask needs --image")
    fails(generate_argv(sd, target, *image, "--mask", str(out / "none.png")), capsys, "--mask", "does not exist")
    bad = out.parent / "mask.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    fails(generate_argv(sd, target, *image, "--mask", str(bad)), capsys, "--mask", "is not a readable image")
    small = out.parent / "small_mask.png"
    mask_image().resize((16, 16)).save(small)
    fails(generate_argv(sd, target, *image, "--mask", str(small)), capsys, "--mask", "is 16x16", "is 32x32", "size")
    assert list(out.iterdir()) == []


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("x.xyz", ["--output", "Pillow cannot write '.xyz' files", ".png"]),
        ("noextension", ["--output", "has no file extension", ".png"]),
        ("x.xbm", ["--output", "cannot write an RGB image as XBM"]),
    ],
)
def test_output_extension(
    name: str, fragments: list[str], model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fails(generate_argv(model_dirs["sd"], out / name), capsys, *fragments)
    assert list(out.iterdir()) == []


@pytest.mark.usefixtures("no_load")
def test_output_folder_problems(model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(generate_argv(model_dirs["sd"], out), capsys, "--output", "is a folder", "tcd.png")
    blocker = out / "file"
    blocker.write_text("a regular file")
    fails(
        generate_argv(model_dirs["sd"], blocker / "sub" / "x.png"), capsys, "--output", "file is a file, not a folder"
    )
    assert [p.name for p in out.iterdir()] == ["file"]


@pytest.mark.usefixtures("no_load")
def test_output_in_unwritable_folder(
    model_dirs: dict[str, Path], out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any user: the probe that folder_problem makes is refused (as a read-only folder or mount refuses it)."""
    import tempfile

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    fails(generate_argv(model_dirs["sd"], out / "x.png"), capsys, "--output", "is not writable", "Permission denied")


@pytest.mark.usefixtures("no_load")
def test_output_in_read_only_folder(model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out.chmod(0o555)
    try:
        try:
            (out / "probe").touch()
        except PermissionError:
            pass
        else:
            (out / "probe").unlink()
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): a read-only mode does not stop writes")
        fails(generate_argv(model_dirs["sd"], out / "x.png"), capsys, "--output", "is not writable")
        fails(generate_argv(model_dirs["sd"], out / "new" / "x.png"), capsys, "--output", "is not writable")
    finally:
        out.chmod(0o755)
    assert list(out.iterdir()) == []


@pytest.mark.usefixtures("no_load")
def test_device_problems(
    model_dirs: dict[str, Path], out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = generate_argv(model_dirs["sd"], out / "x.png")
    fails([*argv, "--device", "bogus"], capsys, "--device 'bogus' is not a torch device", "cpu, cuda")
    fails([*argv, "--device", "meta"], capsys, "--device meta", "cannot run a model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails([*argv, "--device", "cuda"], capsys, "--device cuda: CUDA is not available here", "--device cpu")
    fails([*argv, "--device", "cuda:0"], capsys, "--device cuda:0: CUDA is not available here")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    fails([*argv, "--device", "mps"], capsys, "--device mps: MPS is not available here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fails([*argv, "--device", "cuda:3"], capsys, "--device cuda:3", "1 CUDA device(s)")
    assert list(out.iterdir()) == []


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize("kind", ["sd", "sd_inpaint", "lcm"])
def test_img2img_steps_times_strength_must_reach_one(
    kind: str, model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """diffusers' VP img2img / inpainting pipelines run int(steps × strength) steps: 0 is refused up front."""
    extra = ["--image", str(model_dirs["input"]), "--steps", "4", "--strength", "0.2"]
    if kind == "sd_inpaint":
        extra += ["--mask", str(model_dirs["mask"])]
    fails(generate_argv(model_dirs[kind], out / "x.png", *extra), capsys, "--strength 0.2", "--steps 4", "≥ 1/4 ≈ 0.25")
    assert list(out.iterdir()) == []


def test_flow_img2img_runs_a_step_for_any_strength(
    model_dirs: dict[str, Path], out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUX / SD3 img2img round the step count up: a small strength passes the checks."""

    def reached(*args: Any, **kwargs: Any) -> None:
        raise Reached

    monkeypatch.setattr(pipelines, "load_pipeline", reached)
    extra = ["--image", str(model_dirs["input"]), "--steps", "4", "--strength", "0.2"]
    with pytest.raises(Reached):
        main(generate_argv(model_dirs["flux"], out / "x.png", *extra))


def test_minimum_strength() -> None:
    with pytest.raises(ValueError, match=r"1/49 ≈ 0\.02041 .* at least 50 for --strength 0\.02"):
        pipelines._check_steps_and_strength(49, 0.02, 1000)
    for steps in range(1, 300):  # the stated minimum is enough, and no smaller float is
        minimum = pipelines.minimum_strength(steps)
        assert int(steps * minimum) == 1 and int(steps * math.nextafter(minimum, 0.0)) == 0
        pipelines._check_steps_and_strength(steps, minimum, 1000)
        with pytest.raises(ValueError, match=f"1/{steps} ≈"):
            pipelines._check_steps_and_strength(steps, math.nextafter(minimum, 0.0), 1000)
    for tiny in (1e-300, 5e-324):  # no hang, no overflow: no step count on the grid can help
        with pytest.raises(ValueError, match="no step count up to 50 helps"):
            pipelines._check_steps_and_strength(4, tiny, 50)
    with pytest.raises(ValueError, match=r"--steps 51: .*50-point distillation grid"):
        pipelines._check_steps_and_strength(51, None, 50)
    assert pipelines.minimum_strength(49) > 1 / 49  # 49 · (1/49) rounds down


@pytest.mark.usefixtures("no_load")
def test_lora_problems(
    model_dirs: dict[str, Path], out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tcd_sampler.integrations.request

    argv = generate_argv(model_dirs["sd"], out / "x.png")
    fails([*argv, "--lora", str(out.parent / "nowhere.safetensors")], capsys, "--lora", "does not exist")
    fails([*argv, "--lora", "loras/tcd.safetensors"], capsys, "--lora", "does not exist")
    real_find_spec = tcd_sampler.integrations.request.importlib.util.find_spec
    monkeypatch.setattr(
        tcd_sampler.integrations.request.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "peft" else real_find_spec(name, *a),
    )
    fails([*argv, "--lora", "h1t/TCD-SDXL-LoRA"], capsys, "--lora needs peft", "pip install")
    assert list(out.iterdir()) == []


def test_local_checks_come_before_any_hub_lookup(
    out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_hub(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the Hub was asked before the local checks ran")

    monkeypatch.setattr(pipelines, "load_config_file", no_hub)
    monkeypatch.setattr(pipelines, "load_pipeline", no_hub)
    fails(generate_argv("org/model", out / "x.xyz"), capsys, "--output")
    fails(generate_argv("org/model", out / "x.png", "--image", str(out / "none.png")), capsys, "--image")


def test_library_generate_checks_too(model_dirs: dict[str, Path], out: Path, no_load: None) -> None:
    request = pipelines.GenerationRequest(model=str(model_dirs["sd"]), prompt="x", output=out / "x.png", device="??")
    with pytest.raises(ValueError, match="is not a torch device"):
        pipelines.generate(request)


# --------------------------------------------------------------------------------- Hub errors and other errors


def _fake_error(name: str, base: type[BaseException] = OSError) -> BaseException:
    return type(name, (base,), {})("boom")


@pytest.mark.parametrize(
    ("error", "offline", "fragments"),
    [
        (_fake_error("LocalEntryNotFoundError", FileNotFoundError), False, ["unreachable", "HF_HUB_OFFLINE=1", "HINT"]),
        (_fake_error("ConnectError"), False, ["unreachable", "set HF_HUB_OFFLINE=1", "HINT"]),
        (_fake_error("LocalEntryNotFoundError", FileNotFoundError), True, ["HF_HUB_OFFLINE is set", "HINT"]),
        (_fake_error("RepositoryNotFoundError"), False, ["no such repo", "hf auth login", "HINT"]),
        (_fake_error("GatedRepoError"), False, ["private or gated", "HINT"]),
        (_fake_error("RemoteEntryNotFoundError"), False, ["has no such file", "HINT"]),
    ],
)
def test_hub_error_messages(
    error: BaseException, offline: bool, fragments: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    message = pipelines.hub_error_message("org/model", "model_index.json", error, "HINT")
    assert "'org/model'" in message and "model_index.json" in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_generate_hub_unreachable(
    out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise _fake_error("LocalEntryNotFoundError", FileNotFoundError)

    monkeypatch.setattr(pipelines, "load_config_file", unreachable)
    fails(generate_argv("org/model", out / "x.png"), capsys, "'org/model'", "set HF_HUB_OFFLINE=1", "--model a local")
    assert list(out.iterdir()) == []


def test_schedule_config_hub_unreachable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise _fake_error("LocalEntryNotFoundError", FileNotFoundError)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    fails(["schedule", "--config", "org/scheduler"], capsys, "HF_HUB_OFFLINE=1", "--config a local")


def test_model_errors(model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--prompt", "x", "--output", str(out / "x.png")]
    fails([*base, "--model", str(out / "nowhere")], capsys, "is not a folder")
    fails([*base, "--model", str(out)], capsys, "model_index.json is missing")
    fails([*base, "--model", str(model_dirs["sd"]), "--image", str(out / "none.png")], capsys, "does not exist")
    assert list(out.iterdir()) == []


def test_hub_id_offline(tmp_path: Path) -> None:
    """A Hub id on a machine without the weights: a clear error naming the model (in a fresh process, since
    huggingface_hub reads HF_HUB_OFFLINE when it is imported)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    argv = ["generate", "--model", "h1t/not-downloaded", "--prompt", "x", "--output", str(tmp_path / "x.png")]
    code = "import sys; from tcd_sampler.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("tcd-sampler: error: ")
    assert "h1t/not-downloaded" in done.stderr and "HF_HUB_OFFLINE is set" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_expected_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: Any) -> int:
        raise OSError("first line\n  second line\n")

    monkeypatch.setattr(cli, "_cmd_schedule", broken)
    assert fails(["schedule"], capsys) == "tcd-sampler: error: first line second line"


def test_interrupt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_schedule", interrupted)
    assert main(["schedule"]) == 130
    assert capsys.readouterr().err == "tcd-sampler: interrupted\n"


def test_unexpected_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(args: Any) -> int:
        raise ZeroDivisionError

    monkeypatch.setattr(cli, "_cmd_schedule", bug)
    with pytest.raises(ZeroDivisionError):
        main(["schedule"])


# ---------------------------------------------------------------------------------------- distill and demo


def test_distill_output_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tcd_sampler.distill.trainer

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("distillation started although --output is unusable")

    monkeypatch.setattr(tcd_sampler.distill.trainer, "distill", no_training)
    taken = tmp_path / "taken"
    taken.write_text("a regular file")
    fails(["distill", "--output", str(taken)], capsys, "--output", "taken is a file, not a folder")
    fails(["distill", "--output", str(taken / "student")], capsys, "--output", "taken is a file, not a folder")
    assert taken.read_text() == "a regular file"


def test_demo_output_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tcd_sampler.evaluation.demo

    real_run_demo = tcd_sampler.evaluation.demo.run_demo

    def no_demo(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the demo started although --output-dir is unusable")

    monkeypatch.setattr(tcd_sampler.evaluation.demo, "run_demo", no_demo)
    taken = tmp_path / "taken"
    taken.write_text("a regular file")
    fails(["demo-2d", "--output-dir", str(taken)], capsys, "--output-dir", "is a file, not a folder")
    fails(["demo", "--output-dir", str(taken)], capsys, "--output-dir", "is a file, not a folder")
    monkeypatch.setattr(tcd_sampler.evaluation.demo, "load_student", no_demo)  # the library function checks first, too
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        real_run_demo(taken, samples=8, progress=False)
    assert taken.read_text() == "a regular file"


def test_missing_extras(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real_find_spec = cli.commands.importlib.util.find_spec
    monkeypatch.setattr(
        cli.commands.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a),
    )
    fails(["demo", "--output-dir", str(tmp_path / "d")], capsys, "needs matplotlib (or pass --no-figure)", "[eval]")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------- atomic writes


def _partial_then(error: BaseException) -> Callable[..., None]:
    """A writer that writes half a file at the path it is given, then fails."""

    def write(obj: Any, path: Any = None, *args: Any, **kwargs: Any) -> None:
        target = path if isinstance(path, str | os.PathLike) else obj
        Path(target).write_bytes(b"half a file")
        raise error

    return write


def test_generate_write_fails_midway(
    model_dirs: dict[str, Path], out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old = out / "keep.png"
    old.write_bytes(b"the previous image")
    real_save = Image.Image.save

    def save(image: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(fp, str | os.PathLike):  # the format probe of the output checks
            return real_save(image, fp, *args, **kwargs)
        Path(fp).write_bytes(b"half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)
    argv = generate_argv(model_dirs["sd"], old, "--steps", "1", "--width", "32", "--height", "32")
    fails(argv, capsys, f"cannot write {old}: no space left on device", loaded=True)
    argv = generate_argv(model_dirs["sd"], out / "new.png", "--steps", "1", "--width", "32", "--height", "32")
    fails(argv, capsys, f"cannot write {out / 'new.png'}: no space left on device", loaded=True)
    assert [p.name for p in out.iterdir()] == ["keep.png"]  # no new file, no temporary file
    assert old.read_bytes() == b"the previous image"


def test_save_student_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    model, card = distill(DistillConfig(steps=1, warmup_steps=1, batch_size=8), progress=False)
    folder = tmp_path / "student"
    with pytest.raises(TypeError):  # the card fails after the weights were written: neither appears
        save_student(model, {**card, "bad": object()}, folder)
    assert list(folder.iterdir()) == []
    save_student(model, card, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(before) == {"student.safetensors", "card.json"}
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_then(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_student(model, {**card, "loss": []}, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old student, untouched


def test_save_student_refuses_a_file(tmp_path: Path) -> None:
    model, card = distill(DistillConfig(steps=1, warmup_steps=0, batch_size=8), progress=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_student(model, card, tmp_path / "f")


@pytest.mark.parametrize("fail_in", ["figure", "json"])
def test_demo_write_fails_midway(fail_in: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tcd_sampler.evaluation.demo

    if fail_in == "figure":
        monkeypatch.setattr(
            tcd_sampler.evaluation.demo, "draw_figure", lambda *a: _partial_then(RuntimeError("plot"))(a[-1])
        )
    else:
        monkeypatch.setattr(tcd_sampler.evaluation.demo, "draw_figure", lambda *a: Path(a[-1]).write_bytes(b"a figure"))

        def dumps(*args: Any, **kwargs: Any) -> str:
            raise RuntimeError("json")

        monkeypatch.setattr(tcd_sampler.evaluation.demo.json, "dumps", dumps)
    with pytest.raises(RuntimeError):
        tcd_sampler.evaluation.demo.run_demo(tmp_path, samples=16, nfes=(1,), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_atomic_paths_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        with atomic_paths(tmp_path / "a.json") as (temp,):
            assert temp.parent == tmp_path and temp.name.endswith(".json") and temp.name.startswith(".")
            temp.write_text("{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
        (tmp_path / "a.json").chmod(0o604)
        with atomic_paths(tmp_path / "a.json") as (temp,):
            temp.write_text("[]")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o604  # an existing file keeps its mode
        assert (tmp_path / "a.json").read_text() == "[]"
    finally:
        os.umask(umask)
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_folder_problem(tmp_path: Path) -> None:
    assert folder_problem(tmp_path / "new" / "deeper") is None
    assert not (tmp_path / "new").exists()  # nothing created
    (tmp_path / "f").write_text("x")
    assert folder_problem(tmp_path / "f") == f"{tmp_path / 'f'} is a file, not a folder"
    assert folder_problem(tmp_path / "f" / "g") == f"{tmp_path / 'f'} is a file, not a folder"
    assert list(tmp_path.iterdir()) == [tmp_path / "f"]


# ------------------------------------------------------------------------------------------ generate end to end


@pytest.mark.parametrize("kind", ["sd", "lcm", "flux"])
def test_text_to_image(kind: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    first = run_generate(model_dirs[kind], tmp_path / "a.png", "--width", "32", "--height", "32", "--seed", "3")
    second = run_generate(model_dirs[kind], tmp_path / "b.png", "--width", "32", "--height", "32", "--seed", "3")
    assert first.size == (32, 32)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    other = run_generate(model_dirs[kind], tmp_path / "c.png", "--width", "32", "--height", "32", "--seed", "4")
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]  # no temporary files


def test_matches_the_pipeline_it_builds(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The CLI's image is the pipeline's image with our scheduler (steps_offset 0, eta = gamma) and the same seed."""
    image = run_generate(model_dirs["sd"], tmp_path / "cli.png", "--width", "32", "--height", "32", "--gamma", "0.5")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dirs["sd"])
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config, steps_offset=0, eta=0.5)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(
        "a photo of a cat", num_inference_steps=4, guidance_scale=0.0, width=32, height=32, eta=0.5,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(image), np.asarray(direct))


def test_image_to_image_and_inpainting(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    img2img = run_generate(
        model_dirs["sd"], tmp_path / "i2i.png", "--image", str(model_dirs["input"]), "--strength", "0.5"
    )
    assert img2img.size == (32, 32)
    args = ["--image", str(model_dirs["input"]), "--mask", str(model_dirs["mask"])]
    inpaint = run_generate(model_dirs["sd_inpaint"], tmp_path / "inpaint.png", *args)
    assert inpaint.size == (32, 32)
    jpeg = run_generate(model_dirs["sd"], tmp_path / "out.jpg", "--image", str(model_dirs["input"]))
    assert jpeg.format == "JPEG"


def test_gives_lcm_pipelines_lcm_endpoint(tmp_path: Path) -> None:
    diffusers.LCMScheduler(set_alpha_to_one=False, steps_offset=1).save_pretrained(tmp_path / "scheduler")
    sched = pipelines.scheduler_for(str(tmp_path), "LatentConsistencyModelPipeline", 0.5)
    assert sched.config.consistency_boundary and sched.config.eta == 0.5
    assert sched.config["_tcd_sampler_unapplied"] == ["set_alpha_to_one", "steps_offset"]  # kept, not applied
    assert torch.equal(sched.final_alpha_cumprod, torch.tensor(1.0))  # LCM's clean endpoint
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]


def test_lora_end_to_end(model_dirs: dict[str, Path], lora_dir: Path, tmp_path: Path) -> None:
    size = ["--width", "32", "--height", "32"]
    plain = np.asarray(run_generate(model_dirs["sd"], tmp_path / "plain.png", *size))
    folder = np.asarray(run_generate(model_dirs["sd"], tmp_path / "folder.png", *size, "--lora", str(lora_dir)))
    file = lora_dir / "pytorch_lora_weights.safetensors"
    single = np.asarray(run_generate(model_dirs["sd"], tmp_path / "file.png", *size, "--lora", str(file)))
    assert np.array_equal(folder, single)
    assert not np.array_equal(plain, folder)  # the LoRA was loaded and fused


def test_lora_load_failure(model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = out.parent / "broken.safetensors"
    garbage.write_text("not a LoRA")
    argv = generate_argv(model_dirs["sd"], out / "x.png", "--steps", "1", "--lora", str(garbage))
    fails(argv, capsys, "could not load the LoRA", "broken.safetensors", loaded=True)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- warnings


def _future_warnings(run: Callable[[], Any]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)]


def test_no_misleading_warnings_on_a_normal_run(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The SD model's scheduler config says steps_offset=1, which our scheduler keeps (not applied): the
    pipeline's legacy-config check stays quiet, and so does the torch_dtype deprecation."""
    filters = list(warnings.filters)
    argv = generate_argv(model_dirs["sd"], tmp_path / "x.png", "--steps", "2", "--width", "32", "--height", "32")
    assert _future_warnings(lambda: main(argv)) == []
    assert warnings.filters == filters  # nothing filtered globally


@pytest.mark.parametrize(("kind", "key", "value"), [("sd", "steps_offset", 0), ("sd_inpaint", "skip_prk_steps", False)])
def test_legacy_scheduler_warnings_filtered_around_construction(
    kind: str, key: str, value: Any, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A config with steps_offset=0 (or PNDM's skip_prk_steps=False) makes the SD pipelines warn that it "should
    be set to" 1 (True), then force that in, which our scheduler keeps without applying: wrong advice here, so
    generate filters exactly those while it builds the pipeline."""
    model = tmp_path / f"{kind}_{key}"
    shutil.copytree(model_dirs[kind], model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = {**json.loads(config_file.read_text()), key: value}
    config_file.write_text(json.dumps(config))
    pipeline = diffusers.AutoPipelineForText2Image if kind == "sd" else diffusers.AutoPipelineForInpainting
    direct = _future_warnings(lambda: pipeline.from_pretrained(model, scheduler=TCDScheduler.from_config(config)))
    assert any(f"`{key}` should be set to" in w for w in direct)  # what diffusers does on its own
    argv = generate_argv(model, tmp_path / "x.png", "--steps", "2", "--width", "32", "--height", "32")
    if kind == "sd_inpaint":
        argv += ["--image", str(model_dirs["input"]), "--mask", str(model_dirs["mask"])]
    assert _future_warnings(lambda: main(argv)) == []


@pytest.mark.usefixtures("no_load")
def test_more_steps_than_the_grid_stop_before_loading(
    model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(generate_argv(model_dirs["sd"], out / "x.png", "--steps", "51"))
    assert code == 2 and "--steps 51" in capsys.readouterr().err and list(out.iterdir()) == []


def test_output_with_a_trailing_slash_names_a_folder(
    model_dirs: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(model_dirs["sd"]), "--prompt", "a cat", "--output", f"{out}/x.png/"]
    assert main(argv) == 2
    assert "names a folder" in capsys.readouterr().err and list(out.iterdir()) == []


def test_atomic_paths_refuses_a_folder_target_before_writing(tmp_path: Path) -> None:
    (tmp_path / "card.json").mkdir()
    (tmp_path / "student.safetensors").write_text("old")
    targets = (tmp_path / "student.safetensors", tmp_path / "card.json")
    with pytest.raises(IsADirectoryError, match=r"card\.json is a folder"), atomic_paths(*targets) as temps:
        for t in temps:
            t.write_text("new")
    assert (tmp_path / "student.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json", "student.safetensors"]


@pytest.mark.parametrize("content", [b"{bad", b"", b"\xff\xfe\x00"])
def test_schedule_config_errors_name_the_file(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    assert main(["schedule", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not a valid JSON file" in err and err.count("\n") == 1


@pytest.mark.parametrize("missing", ["/nonexistent/sched", "./missing", "missing.json"])
def test_schedule_config_missing_local_path(missing: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--config", missing]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "dtype"), [("sd", torch.float16), ("flux", torch.bfloat16)])
def test_half_precision_on_cuda_is_bfloat16_for_flow_models(
    kind: str, dtype: torch.dtype, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUX overflows in float16: on CUDA flow transformers load in bfloat16, UNets in float16 (checked without a GPU
    by stopping at the load call)."""
    seen: dict[str, object] = {}

    def stop(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise OSError("stopped before loading")

    monkeypatch.setattr(pipelines, "check_device", lambda device, option="--device": "cuda")
    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", stop)
    with pytest.raises(pipelines.MissingModelError, match="stopped before loading"):
        pipelines.load_pipeline(str(model_dirs[kind]), device="cuda")
    assert dtype in seen.values()
