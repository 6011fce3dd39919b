"""`restune-sd export`: LoRA tuners as kohya and diffusers files that a stock diffusers loader applies exactly."""

import json

from safetensors import safe_open
from typer.testing import CliRunner

from conftest import tiny_unet
from restune_sd import TuningConfig, attach, save_tuner
from restune_sd.cli.main import app
from test_lora_interop import stock_image_equals_ours, tiny, trained_lora  # noqa: F401 (tiny is a fixture)

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
