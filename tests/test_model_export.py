"""`restune-sd export --format diffusers-unet | single-file`: a UNet trained whole, or a LoRA merged into the frozen
weights, leaves as a diffusers UNet folder that `UNet2DConditionModel.from_pretrained` loads and as an original-layout
SD v1.x file that stock `StableDiffusionPipeline.from_single_file` loads to the image our tuner gives."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_error_line, tiny_unet
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from typer.testing import CliRunner

from restune_sd import TuningConfig, attach, load_tuner, save_tuner
from restune_sd.cli.main import app
from restune_sd.models import load_unet
from restune_sd.train import TrainConfig, train
from test_lora_interop import image, trained_lora

runner = CliRunner()


def export(*args):
    return runner.invoke(app, ["export", *map(str, args)])


def pipeline(tiny, **parts):
    return StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None, **parts)


def single_file(path, tiny):
    """The file as stock diffusers reads it: its weights, with the configs, tokenizer and scheduler of `tiny`."""
    return StableDiffusionPipeline.from_single_file(str(path), config=str(tiny), safety_checker=None,
                                                    requires_safety_checker=False)


@pytest.fixture(scope="module")
def full_run(tiny, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    train(TrainConfig(model=tiny, data=data, tuner="full", output=str(run), max_steps=2, batch_size=2,
                      learning_rate=1e-2, report_to="none"))
    return run


def test_a_full_run_leaves_as_a_unet_folder_and_a_single_file_stock_diffusers_load(tiny, full_run, tmp_path):
    result = export(full_run, "--format", "diffusers-unet", "--output", tmp_path / "unet")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"] == tiny  # the base pipeline named by the run's own config.json
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    trained, base = dict(load_tuner(load_unet(tiny), full_run).named_parameters()), dict(load_unet(tiny).named_parameters())
    assert all(torch.equal(tensor, trained[name]) for name, tensor in exported.named_parameters())
    assert any(not torch.equal(trained[name], base[name]) for name in base)  # training moved the weights

    result = export(full_run, "--format", "single-file", "--output", tmp_path / "tuned.safetensors")
    assert result.exit_code == 0, result.output
    with safe_open(tmp_path / "tuned.safetensors", "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"model", "first_stage_model", "cond_stage_model"}
        assert f.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]  # 1x1 convs
        assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.") for k in f.keys())
    ours = image(load_tuner(pipeline(tiny), full_run))
    assert np.abs(image(single_file(tmp_path / "tuned.safetensors", tiny)) - ours).max() < 1e-5
    assert np.abs(image(pipeline(tiny)) - ours).max() > 1e-3  # the tuned image is not the base one


def test_a_lora_leaves_merged_as_a_unet_folder_and_a_single_file(tiny, tmp_path):
    # A tuner folder outside any run (--model names the base). Alpha 2, not more: the tiny model, pushed that far by
    # trained_lora's large random LoRA, amplifies float rounding (merged weights, memory alignment) past 1e-5.
    tuner = trained_lora(tiny, tmp_path / "lora", alpha=2.0)
    ours = image(load_tuner(pipeline(tiny), tuner))
    result = export(tuner, "--format", "diffusers-unet", "--output", tmp_path / "unet", "--model", tiny)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["merged_lora"] is True
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert not any("lora" in k for k in unet.state_dict())
    assert np.abs(image(pipeline(tiny, unet=unet)) - ours).max() < 1e-5
    result = export(tuner, "--format", "single-file", "--output", tmp_path / "merged.safetensors", "--model", tiny)
    assert result.exit_code == 0, result.output
    assert np.abs(image(single_file(tmp_path / "merged.safetensors", tiny)) - ours).max() < 1e-5
    assert np.abs(image(pipeline(tiny)) - ours).max() > 1e-3


def test_tuners_without_a_standard_form_and_bad_outputs_are_one_line(tiny, full_run, tmp_path):
    unet = tiny_unet()
    attach(unet, TuningConfig(name="res-tuning", tuners=[{"kind": "res-adapter", "site": "ffn", "dim": 4}]))
    save_tuner(unet, tmp_path / "res")
    for fmt, output in (("diffusers-unet", "unet"), ("single-file", "x.safetensors")):
        message = one_error_line(["export", str(tmp_path / "res"), "--format", fmt, "--output", str(tmp_path / output),
                                  "--model", tiny])
        assert "no standard model has" in message and "sample --tuner" in message, message
        assert not (tmp_path / output).exists()
    message = one_error_line(["export", str(full_run), "--format", "single-file", "--output", str(tmp_path / "x.ckpt")])
    assert "must end in .safetensors" in message
    message = one_error_line(["export", str(full_run), "--format", "single-file", "--output", f"{tiny}/unet/x.safetensors"])
    assert "pipeline folder export reads" in message and not (Path(tiny) / "unet" / "x.safetensors").exists()
    message = one_error_line(["export", str(full_run), "--format", "diffusers-unet", "--output", f"{tiny}/unet",
                              "--overwrite"])  # the base's own UNet folder, a model folder: never replaced
    assert "pipeline folder export reads" in message
    before = sorted(p.relative_to(full_run) for p in full_run.rglob("*"))
    message = one_error_line(["export", str(full_run), "--format", "diffusers-unet", "--output", str(full_run),
                              "--overwrite"])  # the run folder holds the tuner (and a config.json): never replaced
    assert "tuner folder" in message and sorted(p.relative_to(full_run) for p in full_run.rglob("*")) == before
    message = one_error_line(["export", str(full_run), "--output", str(tmp_path / "x.safetensors"), "--model", tiny])
    assert "--model goes with" in message
    v2 = tiny_unet(cross_attention_dim=1024)
    attach(v2, TuningConfig(name="lora", lora={"rank": 2}))
    save_tuner(v2, tmp_path / "v2")
    message = one_error_line(["export", str(tmp_path / "v2"), "--format", "single-file", "--output",
                              str(tmp_path / "x.safetensors"), "--model", tiny])
    assert "sd_v2" in message and "SD v1.x" in message


def test_an_existing_output_is_replaced_only_with_overwrite_and_only_a_model(tiny, full_run, tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"keep me")
    assert "--overwrite" in one_error_line(["export", str(full_run), "--format", "single-file", "--output", str(target)])
    assert target.read_bytes() == b"keep me"
    result = export(full_run, "--format", "single-file", "--output", target, "--overwrite")
    assert result.exit_code == 0, result.output
    with safe_open(target, "pt") as f:
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):  # a folder that is no model folder: never replaced
        message = one_error_line(["export", str(full_run), "--format", "diffusers-unet", "--output",
                                  str(tmp_path / "notes"), *extra])
        assert "already exists" in message
    assert (tmp_path / "notes" / "notes.txt").read_text() == "keep"
    assert export(full_run, "--format", "diffusers-unet", "--output", tmp_path / "unet").exit_code == 0
    assert "already exists" in one_error_line(["export", str(full_run), "--format", "diffusers-unet", "--output",
                                               str(tmp_path / "unet")])
    again = export(full_run, "--format", "diffusers-unet", "--output", tmp_path / "unet", "--overwrite")
    assert again.exit_code == 0, again.output  # a UNet folder exported before is replaced on request
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def test_a_text_encoder_lora_merges_into_the_single_file_and_a_unet_folder_refuses_it(tiny, data, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model=tiny, data=data, tuner="lora-r4", text_encoder_lora=4, output=str(run), max_steps=2,
                      batch_size=2, learning_rate=1e-2, report_to="none"))
    result = export(run, "--format", "single-file", "--output", tmp_path / "both.safetensors")
    assert result.exit_code == 0, result.output
    stock = single_file(tmp_path / "both.safetensors", tiny)
    base = pipeline(tiny).text_encoder.state_dict()
    assert any(not torch.equal(tensor, base[name]) for name, tensor in stock.text_encoder.state_dict().items())
    assert np.abs(image(stock) - image(load_tuner(pipeline(tiny), run))).max() < 1e-5
    message = one_error_line(["export", str(run), "--format", "diffusers-unet", "--output", str(tmp_path / "unet")])
    assert "text-encoder LoRA" in message and "single-file" in message and not (tmp_path / "unet").exists()
