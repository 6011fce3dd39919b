"""`restune-sd export`: LoRA tuners as kohya and diffusers files that a stock diffusers loader applies exactly; a tuned
backbone's save_pretrained refuses to drop its tuner, and a LoRA merges into a plain model."""

import json

import pytest
import torch
from conftest import perturb, run, tiny_unet, tiny_vit, unet_inputs
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from typer.testing import CliRunner

from restune_sd import TuningConfig, UserError, attach, load_tuner, save_tuner
from restune_sd.cli.main import app
from restune_sd.export import merge_lora
from test_lora_interop import stock_image_equals_ours, trained_lora

runner = CliRunner()


def export(*args):
    return runner.invoke(app, ["export", *map(str, args)])


def test_kohya_export_loads_in_stock_diffusers_with_the_same_image(tiny, tmp_path):
    tuner = trained_lora(tiny, tmp_path / "tuner", alpha=8.0)  # alpha != rank: the scale must travel in .alpha
    result = export(tuner, "--format", "kohya", "--output", tmp_path / "style.safetensors")
    assert result.exit_code == 0, result.output
    with safe_open(tuner / "tuner.safetensors", "pt") as f:
        modules = sum(".lora_A." in k for k in f.keys())
    assert json.loads(result.output)["lora_modules"] == modules == 80  # to_q/k/v/out.0 of the tiny UNet's 20 attentions
    with safe_open(tmp_path / "style.safetensors", "pt") as f:
        keys = set(f.keys())
        assert len(keys) == 3 * modules
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
        assert f.get_tensor(f"{name}.alpha").item() == 8.0
        assert f.metadata()["ss_network_dim"] == "4"
    stock_image_equals_ours(tiny, tuner, tmp_path / "style.safetensors")


def test_diffusers_export_into_a_folder_loads_with_no_other_argument(tiny, tmp_path):
    tuner = trained_lora(tiny, tmp_path / "run" / "tuner", alpha=2.0)
    (tmp_path / "out").mkdir()
    result = export(tmp_path / "run", "--format", "diffusers", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pytorch_lora_weights.safetensors"]
    stock_image_equals_ours(tiny, tuner, tmp_path / "out")


def test_an_existing_output_is_replaced_only_with_overwrite(tiny, tmp_path):
    tuner = trained_lora(tiny, tmp_path / "tuner")
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"keep me")
    result = export(tuner, "--output", target)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert target.read_bytes() == b"keep me"
    assert export(tuner, "--output", target, "--overwrite").exit_code == 0
    with safe_open(target, "pt") as f:
        assert any(k.endswith(".lora_down.weight") for k in f.keys())


def test_tuners_without_a_foreign_format_are_refused_in_one_line(tmp_path):
    unet = tiny_unet()
    attach(unet, TuningConfig(name="res-tuning", tuners=[{"kind": "res-adapter", "site": "ffn", "dim": 4}]))
    save_tuner(unet, tmp_path / "tuner")
    result = export(tmp_path / "tuner", "--output", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no foreign format" in result.output and "sample --tuner" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_format_and_output_name_are_one_line_each(tiny, tmp_path):
    tuner = trained_lora(tiny, tmp_path / "tuner")
    result = export(tuner, "--format", "a1111", "--output", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "unknown --format 'a1111'" in result.output
    result = export(tuner, "--output", tmp_path / "x.ckpt")
    assert result.exit_code == 2 and "must end in .safetensors" in result.output
    assert list(tmp_path.iterdir()) == [tuner]


# Saving a tuned backbone with save_pretrained would drop the tuner: it refuses; a LoRA can be merged first.

def tuned_unet(tmp_path, config):
    unet = tiny_unet()
    attach(unet, config)
    perturb(unet, std=0.2)
    save_tuner(unet, tmp_path / "tuner")
    return load_tuner(tiny_unet(), tmp_path / "tuner")


def test_save_pretrained_after_load_tuner_refuses_and_says_how_to_keep_the_tuner(tiny, tmp_path):
    unet = tuned_unet(tmp_path, TuningConfig(tuners=[{"kind": "res-adapter", "site": "ffn", "dim": 4}]))
    with pytest.raises(UserError, match=r"save_pretrained would drop .*restune_sd.save_tuner") as refused:
        unet.save_pretrained(tmp_path / "unet")
    assert "\n" not in str(refused.value) and not (tmp_path / "unet").exists()
    assert isinstance(unet, UNet2DConditionModel) and json.loads(
        (save_tuner(unet, tmp_path / "again") / "tuner_config.json").read_text())["backbone"]["class"] == "UNet2DConditionModel"

    pipe = load_tuner(StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None), tmp_path / "tuner")
    with pytest.raises(UserError, match="StableDiffusionPipeline carries a restune-sd tuner"):
        pipe.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()  # refused before any part is written


def test_save_pretrained_of_a_tuned_vit_refuses(tmp_path):
    vit = tiny_vit()
    attach(vit, TuningConfig(lora={"rank": 2}))
    save_tuner(vit, tmp_path / "tuner")
    with pytest.raises(UserError, match="ViTForImageClassification carries a restune-sd tuner.*merge_lora"):
        load_tuner(tiny_vit(), tmp_path / "tuner").save_pretrained(tmp_path / "vit")


def test_a_merged_lora_saves_as_a_plain_unet_that_gives_the_tuned_output(tmp_path):
    unet = tuned_unet(tmp_path, TuningConfig(lora={"rank": 4, "alpha": 8.0}))
    with torch.no_grad():
        tuned = run(unet, unet_inputs())
        assert (tuned - run(tiny_unet(), unet_inputs())).abs().max() > 1e-2  # the LoRA matters
    merge_lora(unet)
    unet.save_pretrained(tmp_path / "merged")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "merged")
    assert type(reloaded) is UNet2DConditionModel and not any("lora" in k for k in reloaded.state_dict())
    with torch.no_grad():
        assert (run(reloaded, unet_inputs()) - tuned).abs().max() < 1e-4


def test_only_lora_tuners_merge(tmp_path):
    unet = tuned_unet(tmp_path, TuningConfig(tuners=[{"kind": "res-adapter", "site": "ffn", "dim": 4}]))
    with pytest.raises(UserError, match="other tuners, which cannot be merged"):
        merge_lora(unet)
    with pytest.raises(UserError, match="no restune-sd tuner"):
        merge_lora(tiny_unet())
