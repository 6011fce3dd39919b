"""Images that are what they claim to be (issue 15): `sample` and validation draw with one scheduler (the tuner's
prediction type, the model's clip_sample), validation image i is what `sample --seed` gives, and a NaN image or a
number too large to sample with is one line, never a black PNG or a traceback."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_error_line
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from typer.testing import CliRunner

import restune_sd
from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic
from restune_sd.errors import UserError
from restune_sd.train import TrainConfig, train

runner = CliRunner()
PROMPT = "a red bus"
SEED = 5


def cli(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def validation_pngs(run: Path) -> list[Path]:
    return sorted((run / "validation").glob("step-*/prompt-000-image-*.png"))


def stock_image(model: str, tuner: str, prediction_type: str, seed: int, steps: int) -> np.ndarray:
    """A stock pipeline with the tuner loaded and a DDIM scheduler of the given prediction type."""
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    restune_sd.load_tuner(pipe, tuner)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    image = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image).astype(int)


def test_validation_image_i_is_what_sample_seed_draws_on_the_readme_tiny_model(tmp_path):
    model, run = str(tmp_path / "tiny-sd"), tmp_path / "run"
    cli("init-tiny", model, "--kind", "sd")
    scheduler = json.loads((tmp_path / "tiny-sd" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is False  # as SD v1.5's own scheduler config says
    data = make_synthetic("folder", tmp_path / "data", num_classes=2, images_per_class=2)
    cli("train", "--model", model, "--data", f"folder:{data}", "--tuner", "res-tuning", "--output", str(run),
        "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--seed", str(SEED), "--report-to", "none",
        "--validation-prompt", PROMPT, "--validation-images", "2", "--validation-steps", "3")
    cli("sample", "--model", model, "--tuner", str(run / "tuner"), "--prompt", PROMPT, "--num-images", "2",
        "--seed", str(SEED), "--steps", "3", "--out", str(tmp_path / "samples"), "--no-fp16")
    shown = validation_pngs(run)
    assert [p.parent.name for p in shown] == ["step-00000002"] * 2
    for i, png in enumerate(shown):
        # Validation draws its images in one batch, sample one at a time: batched attention rounds differently.
        assert np.abs(pixels(png) - pixels(tmp_path / "samples" / f"{i:05d}.png")).max() <= 1


def test_a_v_prediction_tuner_is_sampled_and_validated_as_v_prediction(tiny, data, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model=tiny, data=data, tuner="res-tuning", output=str(run), max_steps=2, batch_size=2,
                      learning_rate=1e-3, seed=SEED, report_to="none", prediction_type="v_prediction",
                      validation_prompts=[PROMPT], validation_images=1, validation_steps=3))
    assert json.loads((run / "tuner" / "tuner_config.json").read_text())["prediction_type"] == "v_prediction"
    checkpoint_tuners = list((run / "checkpoints").glob("step-*-tuner"))
    assert all(json.loads((t / "tuner_config.json").read_text())["prediction_type"] == "v_prediction"
               for t in checkpoint_tuners)
    cli("sample", "--model", tiny, "--tuner", str(run), "--prompt", PROMPT, "--seed", str(SEED), "--steps", "3",
        "--out", str(tmp_path / "samples"), "--no-fp16")
    sampled = pixels(tmp_path / "samples" / "00000.png")
    as_v = stock_image(tiny, str(run), "v_prediction", SEED, 3)
    assert np.array_equal(sampled, as_v)
    assert np.abs(as_v - stock_image(tiny, str(run), "epsilon", SEED, 3)).max() > 10  # the type does matter
    [validation] = validation_pngs(run)
    assert np.abs(pixels(validation) - as_v).max() <= 1


def test_an_epsilon_run_records_its_prediction_type_and_a_tuner_without_one_keeps_the_models(tiny, data, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model=tiny, data=data, tuner="bypass", output=str(run), max_steps=1, report_to="none"))
    assert json.loads((run / "tuner" / "tuner_config.json").read_text())["prediction_type"] == "epsilon"

    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    restune_sd.attach(pipe, restune_sd.preset("res-tuning", "unet"))
    older = str(restune_sd.save_tuner(pipe, tmp_path / "older"))  # saved outside a run: no prediction_type
    cli("sample", "--model", tiny, "--tuner", older, "--prompt", PROMPT, "--seed", str(SEED), "--steps", "2",
        "--out", str(tmp_path / "samples"), "--no-fp16")
    assert np.array_equal(pixels(tmp_path / "samples" / "00000.png"), stock_image(tiny, older, "epsilon", SEED, 2))


def diverged_tuner(tiny, folder) -> str:
    """A tuner whose weights blew up, as a run at a huge learning rate leaves them: finite, but the images are NaN."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    restune_sd.attach(pipe, restune_sd.preset("res-tuning", "unet"))
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.fill_(1e30)
    return str(restune_sd.save_tuner(pipe, folder))


def test_a_nan_image_is_one_line_and_the_finished_images_stay(tiny, tmp_path):
    good = tmp_path / "tuners" / "good"
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    restune_sd.attach(pipe, restune_sd.preset("res-tuning", "unet"))
    restune_sd.save_tuner(pipe, good)
    bad = diverged_tuner(tiny, tmp_path / "tuners" / "bad")
    out = tmp_path / "out"
    result = runner.invoke(app, ["sample", "--model", tiny, "--tuner", str(good), "--tuner", bad, "--prompt", PROMPT,
                                 "--num-images", "2", "--steps", "2", "--out", str(out), "--no-fp16"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line]  # after the good tuner's progress bars
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    message = errors[0]
    assert "NaN" in message and bad in message
    assert sorted(p.name for p in (out / "good").glob("0*.png")) == ["00000.png", "00001.png"]
    assert not list((out / "bad").glob("*.png"))  # no black PNG


def test_a_nan_validation_image_is_one_line_not_a_black_png(tiny, data, tmp_path, monkeypatch):
    def nan_decode(self, latents, *args, **kwargs):  # training only encodes: this reaches the validation images alone
        return (torch.full((len(latents), 3, 64, 64), float("nan")),)  # as the pipeline asks, return_dict=False

    monkeypatch.setattr(AutoencoderKL, "decode", nan_decode)
    run = tmp_path / "run"
    with pytest.raises(UserError, match="validation image .* NaN"):
        train(TrainConfig(model=tiny, data=data, tuner="bypass", output=str(run), max_steps=1, report_to="none",
                          validation_prompts=[PROMPT], validation_steps=2))
    assert not list(run.glob("validation/**/*.png"))


@pytest.mark.parametrize("flags, expected", [
    (["--guidance", "1e308"], "--guidance must be >= 0 and <= 100"),
    (["--seed", str(2**64)], "--seed must be >= 0 and <= 9223372036854775807"),
    (["--seed", str(2**63 - 1), "--num-images", "2"], "image 1 would have seed 9223372036854775808"),
    (["--num-images", str(10**12)], "--num-images must be >= 1 and <= 1000000"),
    (["--batch-size", str(10**12)], "--batch-size must be >= 1 and <= 1024"),
])
def test_numbers_too_large_to_sample_with_are_one_line(tiny, tmp_path, flags, expected):
    out = tmp_path / "out"
    assert expected in one_error_line(["sample", "--model", tiny, "--out", str(out), "--prompt", "x", "--steps", "2", *flags])
    assert not out.exists()


def test_an_out_that_is_a_file_is_one_line_and_left_alone(tiny, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert "is a file" in one_error_line(["sample", "--model", tiny, "--out", str(out), "--prompt", "x"])
    assert out.read_text() == "mine"
