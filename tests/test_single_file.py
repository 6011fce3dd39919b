"""`--model` also takes a single-file SD v1.x checkpoint (.safetensors, or .ckpt read with weights_only) with the
configs of a local pipeline folder: train and sample from it equal train and sample from the pipeline folder."""

import json
import shutil
from pathlib import Path

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
from restune_sd.tiny import write_tiny_sd
from restune_sd.train import TrainConfig, train

runner = CliRunner()

# A diffusers pipeline folder written as an original-layout (LDM) single file: the reverse of diffusers' single-file
# conversion, as its scripts/convert_diffusers_to_original_stable_diffusion.py does it, for any layers_per_block.
RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def unet_prefixes(config) -> list[tuple[str, str, list]]:
    """(diffusers prefix, LDM prefix, inner renames), as scripts/convert_diffusers_to_original_stable_diffusion.py
    builds them, for any layers_per_block and block count."""
    n, blocks = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0.", []), ("time_embedding.linear_2.", "time_embed.2.", []),
             ("conv_in.", "input_blocks.0.0.", []), ("conv_norm_out.", "out.0.", []), ("conv_out.", "out.2.", []),
             ("mid_block.attentions.0.", "middle_block.1.", [])]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", RESNET) for j in range(2)]
    for i in range(blocks):
        for j in range(n):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.0.", RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.1.", [])]
        for j in range(n + 1):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(n + 1) * i + j}.0.", RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(n + 1) * i + j}.1.", [])]
        has_attention = "CrossAttn" in config["up_block_types"][i]
        pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(n + 1) * (i + 1)}.0.op.", []),
                  (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(n + 1) * i + n}.{2 if has_attention else 1}.", [])]
    return pairs


def vae_prefixes(config) -> list[tuple[str, str, list]]:
    n, blocks = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [(f"{part}.conv_norm_out.", f"{part}.norm_out.", []) for part in ("encoder", "decoder")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", [("conv_shortcut", "nin_shortcut")]) for j in range(2)]
    for i in range(blocks):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", [("conv_shortcut", "nin_shortcut")]) for j in range(n)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{blocks - 1 - i}.block.{j}.", [("conv_shortcut", "nin_shortcut")]) for j in range(n + 1)]
        pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", []),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.", [])]
    return pairs


def rename(key: str, pairs) -> str:
    """A diffusers key in the original layout: its first matching prefix swapped, then the inner renames."""
    for hf, sd, inner in pairs:
        if key.startswith(hf):
            rest = key[len(hf):]
            for a, b in inner:
                rest = rest.replace(a, b)
            return sd + rest
    return key


def read_part(folder: Path, part: str) -> tuple[dict, dict]:
    return load_file(next((folder / part).glob("*.safetensors"))), json.loads((folder / part / "config.json").read_text())


def original_layout(folder) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline folder under the keys an SD v1.x single-file checkpoint uses."""
    unet, unet_config = read_part(Path(folder), "unet")
    vae, vae_config = read_part(Path(folder), "vae")
    text, _ = read_part(Path(folder), "text_encoder")
    state = {"model.diffusion_model." + rename(k, unet_prefixes(unet_config)): v for k, v in unet.items()}
    for k, v in vae.items():
        key = rename(k, vae_prefixes(vae_config))
        if ".attn_1." in key and v.ndim == 2:
            v = v[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        state["first_stage_model." + key] = v
    state |= {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in text.items()}
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """The tiny pipeline as one .safetensors and one .ckpt, and a config folder: its configs without any weights."""
    root = tmp_path_factory.mktemp("single")
    state = {k: v.contiguous() for k, v in original_layout(tiny).items()}
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
