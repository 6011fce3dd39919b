"""`--model` also takes a single-file SD v1.x checkpoint (.safetensors, or .ckpt read with weights_only) with the
configs of a local pipeline folder: train and sample from it equal train and sample from the pipeline folder."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import RunsCode
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic
from restune_sd.models import single_file_pipeline
from restune_sd.original_layout import original_layout
from restune_sd.tiny import write_tiny_sd
from restune_sd.train import TrainConfig, train

runner = CliRunner()

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """The tiny pipeline as one .safetensors and one .ckpt, and a config folder: its configs without any weights."""
    root = tmp_path_factory.mktemp("single")
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    state = original_layout(pipe.unet, pipe.vae, pipe.text_encoder)
    save_file(state, root / "tiny.safetensors")
    torch.save({"state_dict": state}, root / "tiny.ckpt")
    shutil.copytree(tiny, root / "configs", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return root


def test_the_single_file_is_the_pipeline_in_the_original_layout(tiny, files):
    assert {k.split(".")[0] for k in load_file(files / "tiny.safetensors")} == {"model", "first_stage_model", "cond_stage_model"}
    ours = single_file_pipeline(str(files / "tiny.safetensors"), str(files / "configs"))
    reference = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        expected, got = getattr(reference, part).state_dict(), getattr(ours, part).state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), part


def sample(model, out, *extra):
    return runner.invoke(app, ["sample", "--model", str(model), "--out", str(out), "--prompt", "a red circle",
                               "--steps", "3", *map(str, extra)])


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.ckpt"])
def test_sample_from_a_single_file_equals_sample_from_the_folder(tiny, files, tmp_path, name):
    assert sample(tiny, tmp_path / "folder").exit_code == 0
    result = sample(files / name, tmp_path / "single", "--model-config", files / "configs")
    assert result.exit_code == 0, result.output
    folder, single = (np.asarray(Image.open(tmp_path / out / "00000.png")) for out in ("folder", "single"))
    assert np.array_equal(folder, single) and folder.std() > 0


def test_train_from_a_single_file_equals_train_from_the_folder(tiny, files, tmp_path):
    data = f"folder:{make_synthetic('folder', tmp_path / 'data', num_classes=2, images_per_class=2)}"
    runs = {}
    for name, model, config in [("folder", tiny, None), ("single", files / "tiny.safetensors", files / "configs")]:
        train(TrainConfig(model=str(model), model_config=config and str(config), data=data, tuner="res-tuning",
                          output=str(tmp_path / name), max_steps=2, batch_size=2, learning_rate=1e-3))
        runs[name] = load_file(tmp_path / name / "tuner" / "tuner.safetensors")
    assert json.loads((tmp_path / "single" / "config.json").read_text())["model_config"] == str(files / "configs")
    assert runs["folder"].keys() == runs["single"].keys()
    assert all(torch.equal(runs["folder"][k], runs["single"][k]) for k in runs["folder"])


def test_without_configs_offline_is_one_line_before_anything_is_written(files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # SD v1.5's configs not cached
    result = sample(files / "tiny.safetensors", tmp_path / "out")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "single-file checkpoint" in result.output and "--model-config DIR" in result.output
    data = f"folder:{make_synthetic('folder', tmp_path / 'data', num_classes=2, images_per_class=2)}"
    result = runner.invoke(app, ["train", "--model", str(files / "tiny.safetensors"), "--data", data,
                                 "--output", str(tmp_path / "run"), "--max-steps", "1"])
    assert result.exit_code == 2 and "--model-config DIR" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_ckpt_that_would_run_code_is_refused_unexecuted(files, tmp_path):
    torch.save({"state_dict": RunsCode(tmp_path / "marker")}, tmp_path / "evil.ckpt")
    result = sample(tmp_path / "evil.ckpt", tmp_path / "out", "--model-config", files / "configs")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "weights_only" in result.output, result.output
    assert not (tmp_path / "marker").exists()


def test_bad_single_file_input_is_one_line(tiny, files, tmp_path):
    shutil.copytree(files / "configs", tmp_path / "partial", ignore=shutil.ignore_patterns("vocab.json", "tokenizer.json"))
    cases = [
        ((tmp_path / "missing.safetensors", "--model-config", files / "configs"), "checkpoint file"),
        ((files / "tiny.safetensors", "--model-config", tmp_path / "nowhere"), "does not exist"),
        ((files / "tiny.safetensors", "--model-config", tmp_path / "partial"), "its tokenizer/ cannot be loaded"),
        ((files / "tiny.safetensors", "--model-config", tiny / "unet"), "no model_index.json"),
        ((tiny, "--model-config", files / "configs"), "goes with a single-file --model"),
    ]
    for (model, *extra), expected in cases:
        result = sample(model, tmp_path / "out", *extra)
        assert result.exit_code == 2 and expected in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()
