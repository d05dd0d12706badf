"""Configs: attribute/key access, read-only, diffusers' JSON format, round trips with diffusers both ways."""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from diffusers.configuration_utils import FrozenDict

from tcd_sampler import TCDScheduler

# The scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0 (written out: tests never download).
SDXL_EULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

PARAMS = [
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "original_inference_steps",
    "clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset", "prediction_type", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value", "timestep_spacing", "timestep_scaling",
    "rescale_betas_zero_snr", "consistency_boundary", "eta", "fused_step",
]  # fmt: skip

#: Parameters of ours that diffusers' TCDScheduler does not have.
OURS_ONLY = {"consistency_boundary", "eta", "fused_step"}

NON_DEFAULT = {
    "num_train_timesteps": 500,
    "beta_schedule": "linear",
    "beta_start": 0.0002,
    "original_inference_steps": 25,
    "clip_sample": True,
    "clip_sample_range": 2.0,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
    "consistency_boundary": True,
}


def public(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def shared(config: Any) -> dict[str, Any]:
    """The public keys that diffusers' TCDScheduler has too."""
    return {k: v for k, v in public(config).items() if k not in OURS_ONLY}


def test_constructor_defaults_and_signature_match_diffusers() -> None:
    assert shared(TCDScheduler().config) == public(diffusers.TCDScheduler().config)
    assert list(public(TCDScheduler().config)) == PARAMS
    positional = TCDScheduler(500, 0.001, 0.02, "linear")
    assert positional.config.num_train_timesteps == 500 and positional.config.beta_schedule == "linear"


def test_use_default_values_tracks_what_was_passed() -> None:
    ours = TCDScheduler(beta_schedule="scaled_linear", steps_offset=1)
    ref = diffusers.TCDScheduler(beta_schedule="scaled_linear", steps_offset=1)
    assert sorted(ours.config["_use_default_values"]) == sorted([*ref.config["_use_default_values"], *OURS_ONLY])
    assert "beta_schedule" not in ours.config["_use_default_values"]


def test_attribute_and_key_access_read_only() -> None:
    config = TCDScheduler(steps_offset=1).config
    assert config.steps_offset == config["steps_offset"] == 1
    assert isinstance(config, dict)
    with pytest.raises(TypeError, match="read-only"):
        config["steps_offset"] = 2  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        config.steps_offset = 2
    with pytest.raises(TypeError, match="read-only"):
        config.update(steps_offset=2)
    with pytest.raises(AttributeError, match="no_such_key"):
        _ = config.no_such_key


def test_sd_pipeline_style_internal_dict_replacement(caplog: pytest.LogCaptureFixture) -> None:
    """Stable Diffusion pipelines rewrite `scheduler._internal_dict` to force steps_offset=1 and clip_sample=False.
    A replacement is someone else's config: the caller's clip_sample=True is kept, steps_offset=1 is kept in the
    config but not applied (the schedule stays diffusers' TCD schedule); every other key is taken."""
    sched = TCDScheduler(clip_sample=True)
    new_config = dict(sched.config)
    new_config.update(steps_offset=1, clip_sample=False, prediction_type="v_prediction")
    with caplog.at_level(logging.INFO, logger="tcd_sampler"):
        sched._internal_dict = FrozenDict(new_config)
    assert "steps_offset" in caplog.text and "clip_sample" in caplog.text
    assert sched.config.steps_offset == 1 and sched.config.clip_sample is True
    assert sched.config["_tcd_sampler_unapplied"] == ["steps_offset"]
    assert sched.config.prediction_type == "v_prediction"
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]
    sched.register_to_config(steps_offset=1)  # a deliberate change goes through
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 760, 500, 260]
    assert "_tcd_sampler_unapplied" not in sched.config


def test_foreign_steps_offset_is_kept_but_not_applied(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tcd_sampler"):
        sched = TCDScheduler.from_config(SDXL_EULER_CONFIG)
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "not applying set_alpha_to_one=False, steps_offset=1 from the EulerDiscreteScheduler config" in caplog.text
    assert "from_config(config, set_alpha_to_one=False, steps_offset=1)" in caplog.text  # how to apply them
    assert sched.config.steps_offset == 1  # kept, so converting back loses nothing
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tcd_sampler"):
        sched = TCDScheduler.from_config(SDXL_EULER_CONFIG, steps_offset=1)
    assert "not applying set_alpha_to_one=False from" in caplog.text and "steps_offset" not in caplog.text
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 760, 500, 260]


def test_saved_json_format(tmp_path: Path) -> None:
    TCDScheduler(steps_offset=1).save_pretrained(tmp_path)
    text = (tmp_path / "scheduler_config.json").read_text()
    data = json.loads(text)
    assert data["_class_name"] == "TCDScheduler"
    assert data["_diffusers_version"] == diffusers.__version__
    assert "_use_default_values" not in data
    assert list(data) == sorted(data)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("config", [{}, NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_round_trip_files_both_ways(tmp_path: Path, config: dict[str, Any]) -> None:
    ours = TCDScheduler(**config)
    ours.save_pretrained(tmp_path / "ours")
    ref = diffusers.TCDScheduler.from_pretrained(tmp_path / "ours")
    assert public(ref.config) == public(ours.config)
    ref.save_pretrained(tmp_path / "ref")
    back = TCDScheduler.from_pretrained(tmp_path / "ref")
    assert public(back.config) == public(ours.config)
    assert json.loads((tmp_path / "ours/scheduler_config.json").read_text()) == json.loads(
        (tmp_path / "ref/scheduler_config.json").read_text()
    )


@pytest.mark.parametrize("config", [{}, NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_round_trip_in_memory_both_ways(config: dict[str, Any]) -> None:
    ours = TCDScheduler(**config)
    ref = diffusers.TCDScheduler.from_config(ours.config)
    assert shared(ref.config) == shared(ours.config)
    back = TCDScheduler.from_config(ref.config)
    assert public(back.config) == public(ours.config)
    assert set(back.config["_use_default_values"]) - OURS_ONLY == set(ref.config["_use_default_values"])


def test_from_sdxl_euler_config_and_back(tmp_path: Path) -> None:
    ours = TCDScheduler.from_config(SDXL_EULER_CONFIG)
    ref = diffusers.TCDScheduler.from_config(SDXL_EULER_CONFIG)
    assert shared(ours.config) == public(ref.config)  # same keys kept, same values
    for key in PARAMS:
        if key in SDXL_EULER_CONFIG:
            assert ours.config[key] == SDXL_EULER_CONFIG[key]
    assert ours.config["_class_name"] == "TCDScheduler"
    euler = diffusers.EulerDiscreteScheduler.from_config(ours.config)
    original = public(diffusers.EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG).config)
    assert {k: v for k, v in public(euler.config).items() if k in original} == original
    # the trip through ours leaves exactly what the trip through diffusers' TCDScheduler leaves
    via_ref = public(diffusers.EulerDiscreteScheduler.from_config(ref.config).config)
    assert {k: v for k, v in public(euler.config).items() if k not in OURS_ONLY} == via_ref
    # through files too
    path = tmp_path / "sdxl"
    path.mkdir()
    (path / "scheduler_config.json").write_text(json.dumps(SDXL_EULER_CONFIG))
    loaded = TCDScheduler.from_pretrained(path)
    assert public(loaded.config) == public(ours.config)
    loaded.save_pretrained(tmp_path / "as_tcd")
    back = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path / "as_tcd")
    assert {k: v for k, v in public(back.config).items() if k in original} == original


def test_use_default_values_honoured_from_other_schedulers() -> None:
    """A default-constructed diffusers scheduler's values are defaults, so ours keep our own defaults."""
    euler = diffusers.EulerDiscreteScheduler()  # linear betas, beta_start 1e-4: its defaults, not choices
    ours = TCDScheduler.from_config(euler.config)
    assert ours.config.beta_schedule == "scaled_linear"
    assert ours.config.beta_start == 0.00085
    chosen = diffusers.EulerDiscreteScheduler(beta_schedule="linear")
    assert TCDScheduler.from_config(chosen.config).config.beta_schedule == "linear"


def test_subfolder_and_overrides(tmp_path: Path) -> None:
    TCDScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")
    sched = TCDScheduler.from_pretrained(tmp_path, subfolder="scheduler", steps_offset=1)
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.steps_offset == 1
    over = TCDScheduler.from_config(sched.config, prediction_type="epsilon")
    assert over.config.prediction_type == "epsilon"


def test_unknown_keys_warned_and_kept(caplog: pytest.LogCaptureFixture) -> None:
    config = {**TCDScheduler().config, "bogus_key": 3}
    with caplog.at_level(logging.WARNING, logger="tcd_sampler"):
        sched = TCDScheduler.from_config(config)
    assert "bogus_key" in caplog.text
    assert sched.config["bogus_key"] == 3
    with caplog.at_level(logging.WARNING, logger="tcd_sampler"):
        caplog.clear()
        TCDScheduler.from_config(SDXL_EULER_CONFIG, steps_offset=0)  # another scheduler's keys are expected there
    assert caplog.text == ""


def test_unknown_override_rejected_unless_returned() -> None:
    with pytest.raises(TypeError, match="not_a_param"):
        TCDScheduler.from_config({}, not_a_param=1)
    sched, unused = TCDScheduler.from_config({}, return_unused_kwargs=True, not_a_param=1)
    assert unused == {"not_a_param": 1}
    assert isinstance(sched, TCDScheduler)


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"scheduler_config\.json"):
        TCDScheduler.from_pretrained(tmp_path)


def test_copy_pickle_repr_compatibles() -> None:
    sched = TCDScheduler(steps_offset=1)
    sched.set_timesteps(4)
    for clone in (copy.deepcopy(sched), pickle.loads(pickle.dumps(sched))):
        assert clone.config == sched.config
        assert torch.equal(clone.timesteps, sched.timesteps)
    assert repr(sched).startswith("TCDScheduler {")
    assert sched.compatibles == [TCDScheduler]
    assert len(sched) == 1000
    assert TCDScheduler.order == 1 and sched.init_noise_sigma == 1.0
