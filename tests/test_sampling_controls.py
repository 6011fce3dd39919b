"""Sampling controls as a diffusers pipeline has them, for `sample` and validation images: negative prompt, guidance
scale, width/height, steps, any compatible scheduler by class or UI name (with Karras sigmas), and kohya's per-line
prompt options (`--n --w --h --l --s --d --ss`)."""

import json

import numpy as np
import pytest
import torch
from conftest import one_error_line
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline,
                       UniPCMultistepScheduler)
from PIL import Image
from typer.testing import CliRunner

from restune_sd.cli.main import app
from restune_sd.schedulers import scheduler_spec

runner = CliRunner()


def cli(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def stock(tiny, scheduler, prompt="a red bus", seed=3, **call) -> np.ndarray:
    """A stock pipeline's image with `scheduler` (class, extra config) made from the model's scheduler config."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    cls, extra = scheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(seed), **call).images[0]).astype(int)


@pytest.mark.parametrize("flags, scheduler", [
    (["--scheduler", "DPM++ 2M Karras", "--guidance-scale", "6"], (DPMSolverMultistepScheduler, {"use_karras_sigmas": True})),
    (["--scheduler", "unipc", "--karras-sigmas", "--guidance", "6"], (UniPCMultistepScheduler, {"use_karras_sigmas": True})),
    (["--scheduler", "EulerAncestralDiscreteScheduler", "--guidance-scale", "6"], (EulerAncestralDiscreteScheduler, {})),
])
def test_sample_equals_a_stock_pipeline_with_the_same_scheduler_and_arguments(tiny, tmp_path, flags, scheduler):
    out = tmp_path / "out"
    cli("sample", "--model", tiny, "--out", str(out), "--prompt", "a red bus", "--negative-prompt", "a blue dog",
        "--width", "64", "--height", "48", "--steps", "4", "--seed", "3", "--no-fp16", *flags)
    expected = stock(tiny, scheduler, negative_prompt="a blue dog", width=64, height=48, num_inference_steps=4,
                     guidance_scale=6)
    assert expected.shape == (48, 64, 3)
    assert np.array_equal(pixels(out / "00000.png"), expected)
    assert not np.array_equal(expected, stock(tiny, scheduler, width=64, height=48, num_inference_steps=4, guidance_scale=6))
    record = json.loads((out / "samples.jsonl").read_text())
    assert {k: record[k] for k in ("width", "height", "guidance", "steps", "negative_prompt", "scheduler")} == {
        "width": 64, "height": 48, "guidance": 6, "steps": 4, "negative_prompt": "a blue dog", "scheduler": flags[1]}
    settings = json.loads((out / "sample_config.json").read_text())["settings"]
    assert (settings["width"], settings["height"], settings["karras_sigmas"]) == (64, 48, "--karras-sigmas" in flags)


def test_ui_names_pick_the_scheduler_they_name():
    assert scheduler_spec("Euler a") == ("EulerAncestralDiscreteScheduler", {})
    assert scheduler_spec("euler_a") == scheduler_spec("k_euler_a") == ("EulerAncestralDiscreteScheduler", {})
    assert scheduler_spec("DPM++ 2M Karras") == ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})
    assert scheduler_spec("dpm++_2m", karras_sigmas=True) == ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})
    for name, cls in [("ddim", "DDIMScheduler"), ("pndm", "PNDMScheduler"), ("lms", "LMSDiscreteScheduler"),
                      ("heun", "HeunDiscreteScheduler"), ("unipc", "UniPCMultistepScheduler"), ("euler", "EulerDiscreteScheduler"),
                      ("dpm", "DPMSolverMultistepScheduler"), ("deis", "DEISMultistepScheduler")]:
        assert scheduler_spec(name)[0] == cls


def test_prompts_file_lines_take_kohyas_options(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment line, skipped as kohya skips it\n"
                       "a red bus --n a blue dog --w 48 --h 64 --l 4.5 --s 3 --d 77 --ss euler_a\n"
                       "a green bird\n")
    out = tmp_path / "out"
    cli("sample", "--model", tiny, "--out", str(out), "--prompts-file", str(prompts), "--steps", "2", "--seed", "5",
        "--batch-size", "2", "--no-fp16")
    first = stock(tiny, (EulerAncestralDiscreteScheduler, {}), seed=77, negative_prompt="a blue dog", width=48, height=64,
                  guidance_scale=4.5, num_inference_steps=3)
    assert np.array_equal(pixels(out / "00000.png"), first)
    second = stock(tiny, (DDIMScheduler, {}), prompt="a green bird", seed=6, num_inference_steps=2)
    assert np.array_equal(pixels(out / "00001.png"), second)  # image 1: --seed + 1, the command's settings
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"], r["width"], r["scheduler"]) for r in records] == [
        ("a red bus", 77, 48, "euler_a"), ("a green bird", 6, None, "ddim")]


@pytest.mark.parametrize("line, expected", [
    ("a cat --x 3", "unknown option --x"), ("a cat --w abc", "--w must be a whole number, not 'abc'"),
    ("a cat --w 60", "--w must be a multiple of 8"), ("a cat --l nan", "--l must be a number, not nan"),
    ("a cat --s 0", "--s must be >= 1"), ("a cat --ss magic", "--ss 'magic': use one of"),
    ("a cat --d", "--d needs a value"), ("a cat --d -4", "--d must be >= 0"),
])
def test_a_bad_option_on_a_line_is_one_line_naming_the_file_and_line(tiny, tmp_path, line, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a fine prompt --w 64\n{line}\n")
    message = one_error_line(["sample", "--model", tiny, "--out", str(tmp_path / "out"), "--prompts-file", str(prompts)])
    assert f"{prompts} line 2" in message and expected in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--scheduler", "magic"], "unknown --scheduler 'magic': use one of ddim"),
    (["--scheduler", "ddim", "--karras-sigmas"], "has no Karras sigmas"),
    (["--resolution", "64", "--width", "64"], "not both"),
    (["--width", "60"], "--width must be a multiple of 8"),
    (["--height", "8192"], "--height must be"),
    (["--guidance-scale", "nan"], "--guidance"),
])
def test_bad_sampling_controls_are_one_line(tiny, tmp_path, flags, expected):
    message = one_error_line(["sample", "--model", tiny, "--out", str(tmp_path / "out"), "--prompt", "x", *flags])
    assert expected in message, message
    if "magic" in flags:
        assert "euler_a" in message and "dpm++_2m_karras" in message and "UniPCMultistepScheduler" in message


def test_validation_images_take_the_sampling_controls_and_kohya_lines(tiny, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bus --w 48 --h 64 --ss DPM++ 2M Karras --d 9 --l 3\n")
    run = tmp_path / "run"
    cli("train", "--model", tiny, "--data", data, "--tuner", "res-tuning", "--output", str(run), "--max-steps", "1",
        "--report-to", "none", "--validation-prompt", "a green bird", "--validation-prompts-file", str(prompts),
        "--validation-steps", "3", "--validation-scheduler", "euler_a", "--validation-negative-prompt", "a blue dog",
        "--validation-guidance-scale", "4", "--validation-width", "64", "--validation-height", "48")
    config = json.loads((run / "config.json").read_text())
    assert (config["validation_scheduler"], config["validation_negative_prompt"], config["validation_guidance_scale"],
            config["validation_width"], config["validation_height"]) == ("euler_a", "a blue dog", 4, 64, 48)
    folder = next((run / "validation").glob("step-*"))
    assert (folder / "prompts.txt").read_text().splitlines()[1] == "a red bus --w 48 --h 64 --ss DPM++ 2M Karras --d 9 --l 3"
    for row, sampled in [(0, ["--prompt", "a green bird", "--seed", "0", "--scheduler", "euler_a", "--guidance-scale", "4",
                               "--width", "64", "--height", "48"]),
                         (1, ["--prompt", "a red bus", "--seed", "9", "--scheduler", "DPM++ 2M Karras", "--guidance-scale", "3",
                              "--width", "48", "--height", "64"])]:
        out = tmp_path / f"sample{row}"
        cli("sample", "--model", tiny, "--tuner", str(run / "tuner"), "--out", str(out), "--steps", "3",
            "--negative-prompt", "a blue dog", "--no-fp16", *sampled)
        assert np.array_equal(pixels(folder / f"prompt-{row:03d}-image-00.png"), pixels(out / "00000.png")), row


def test_a_bad_validation_prompt_line_is_one_line_before_anything_is_written(tiny, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bus\na cat --w 64 --h 30\n")
    message = one_error_line(["train", "--model", tiny, "--data", data, "--output", str(tmp_path / "run"), "--max-steps", "1",
                              "--report-to", "none", "--validation-prompts-file", str(prompts)])
    assert f"--validation-prompts-file {prompts} line 2: --h must be a multiple of 8" in message, message
    assert not (tmp_path / "run").exists()
    message = one_error_line(["train", "--model", tiny, "--data", data, "--output", str(tmp_path / "run"), "--max-steps", "1",
                              "--report-to", "none", "--validation-prompt", "x", "--validation-scheduler", "magic"])
    assert "unknown --validation-scheduler 'magic'" in message, message
