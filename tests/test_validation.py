"""Validation you can watch (issue 10): several prompts and images per validation with a grid, the same images on
resume, a held-out loss at fixed draws, and a loadable tuner folder with every checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import restune_sd.train as training
from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic
from restune_sd.train import TrainConfig, train
from restune_sd.validation import VALIDATION_DRAW, held_out_split

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train_set = make_synthetic("folder", root / "train", num_classes=2, images_per_class=2)
    held_out = make_synthetic("folder", root / "held-out", num_classes=2, images_per_class=2, seed=1)
    return f"folder:{train_set}", f"folder:{held_out}"


def config(tiny, data, output, **overrides):
    settings = {"tuner": "res-tuning", "batch_size": 2, "learning_rate": 1e-3, "report_to": "none", **overrides}
    return TrainConfig(model=tiny, data=data, output=str(output), **settings)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_validation_images_grid_and_the_same_images_after_a_resume(tiny, data, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a blue dog\n\n")
    settings = dict(max_steps=4, checkpoint_every=2, validation_every=2, validation_steps=2, validation_images=2,
                    validation_prompts="a red circle", validation_prompts_file=str(prompts_file))
    train(config(tiny, data[0], tmp_path / "straight", **settings))
    train(config(tiny, data[0], tmp_path / "resumed", **{**settings, "max_steps": 2}))
    train(config(tiny, data[0], tmp_path / "resumed", resume="latest", **settings))

    shown = tmp_path / "straight" / "validation" / "step-00000004"
    assert (shown / "prompts.txt").read_text() == "a red circle\na blue dog\n"
    cells = [[pixels(shown / f"prompt-{p:03d}-image-{i:02d}.png") for i in range(2)] for p in range(2)]
    grid = pixels(shown / "grid.png")
    assert grid.shape == (128, 128, 3)  # rows = prompts, columns = images, each 64 px
    for p in range(2):
        for i in range(2):
            assert np.array_equal(grid[p * 64:(p + 1) * 64, i * 64:(i + 1) * 64], cells[p][i])
    assert not np.array_equal(cells[0][0], cells[0][1])  # each column has a seed of its own
    assert sorted(p.name for p in (tmp_path / "straight" / "validation").iterdir()) == ["step-00000002", "step-00000004"]
    again = tmp_path / "resumed" / "validation" / "step-00000004"
    assert all(np.array_equal(pixels(shown / f.name), pixels(again / f.name)) for f in shown.glob("*.png"))


def test_validation_at_the_end_and_a_held_out_loss_at_fixed_draws(tiny, data, tmp_path, monkeypatch):
    seen = []
    real_loss = training.diffusion_loss

    def counting(unet, encoders, batch, cfg, step, device):
        if step == VALIDATION_DRAW:
            seen.append(batch["index"].tolist())
        return real_loss(unet, encoders, batch, cfg, step, device)

    monkeypatch.setattr(training, "diffusion_loss", counting)
    # A learning rate too small to move the weights: a loss drawn at fixed noise and timesteps must not move either.
    train(config(tiny, data[0], tmp_path / "run", max_steps=3, learning_rate=1e-12, validation_every=1,
                 validation_data=data[1], validation_samples=2, validation_prompts=["a red circle"]))
    logged = metrics(tmp_path / "run")
    losses = [entry["validation_loss"] for entry in logged]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
    assert seen == [[0, 2]] * 3  # two samples spread over the four held-out images, at each validation
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == [f"step-0000000{s}" for s in (1, 2, 3)]

    train(config(tiny, data[0], tmp_path / "end", max_steps=2, validation_prompts=["a red circle"]))
    assert [p.name for p in (tmp_path / "end" / "validation").iterdir()] == ["step-00000002"]  # at the end only
    assert all("validation_loss" not in entry for entry in metrics(tmp_path / "end"))


def test_every_checkpoint_has_a_tuner_that_sample_loads_and_pruning_removes_it(tiny, data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny, data[0], run, max_steps=3, checkpoint_every=1, keep_checkpoints=2))
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-00000002-tuner", "step-00000002.pt", "step-00000002.pt.sha256", "step-00000003-tuner", "step-00000003.pt",
        "step-00000003.pt.sha256"]
    middle = load_file(str(folder / "step-00000002-tuner" / "tuner.safetensors"))
    last = load_file(str(folder / "step-00000003-tuner" / "tuner.safetensors"))
    final = load_file(str(run / "tuner" / "tuner.safetensors"))
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert any(not torch.equal(middle[k], last[k]) for k in last)
    assert json.loads((folder / "step-00000002-tuner" / "tuner_config.json").read_text())["trained_steps"] == 2

    result = runner.invoke(app, ["sample", "--model", tiny, "--tuner", str(folder / "step-00000002-tuner"), "--prompt",
                                 "a red circle", "--steps", "2", "--out", str(tmp_path / "samples"), "--no-fp16"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples" / "00000.png").is_file()

    train(config(tiny, data[0], run, max_steps=4, checkpoint_every=1, keep_checkpoints=2, resume="latest"))
    assert [entry["step"] for entry in metrics(run)] == [1, 2, 3, 4]  # resumed from step-3.pt, not from a tuner folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-00000003-tuner", "step-00000003.pt", "step-00000003.pt.sha256", "step-00000004-tuner", "step-00000004.pt",
        "step-00000004.pt.sha256"]


def test_bad_validation_settings_are_one_line_and_write_nothing(tiny, data, tmp_path):
    base = ["train", "--model", tiny, "--data", data[0], "--output", str(tmp_path / "run"), "--max-steps", "1"]
    cases = [
        (["--validation-every", "2"], "--validation-every needs something to validate"),
        (["--validation-prompts-file", str(tmp_path / "nowhere.txt")], "--validation-prompts-file"),
        (["--validation-data", f"folder:{tmp_path / 'nowhere'}"], "does not exist"),
        (["--validation-data", data[1], "--validation-split", "val"], "has no split 'val'"),
        (["--validation-prompt", "a cat", "--validation-images", "0"], "--validation-images must be >= 1"),
        (["--validation-data", data[1], "--validation-samples", "0"], "--validation-samples must be >= 1"),
    ]
    (tmp_path / "empty.txt").write_text("\n \n")
    cases.append((["--validation-prompts-file", str(tmp_path / "empty.txt")], "holds no prompt"))
    for flags, expected in cases:
        assert expected in one_error_line([*base, *flags]), flags
        assert not (tmp_path / "run").exists()


def test_the_held_out_split_defaults_to_val_where_the_layout_has_one():
    def split(spec, given=None):
        return held_out_split(TrainConfig(model="m", data="d", tuner="t", output="o", validation_data=spec,
                                          validation_split=given))

    assert split("coco:/x") == "val" and split("cub:/x") == "val" and split("folder:/x") == "train"
    assert split("coco:/x", "train") == "train"
    one = TrainConfig(model="m", data="d", tuner="t", output="o", validation_prompts="a cat")
    assert one.validation_prompts == ["a cat"]  # one prompt is accepted as a string
