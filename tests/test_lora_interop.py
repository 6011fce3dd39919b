"""LoRA files cross over: a saved LoRA tuner loads with diffusers' own `load_lora_weights`, and `restune-sd sample`
takes LoRA files that diffusers or kohya-style tools wrote."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RunsCode
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from restune_sd import TuningConfig, attach, load_tuner, save_tuner
from restune_sd.cli.main import app


def image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


def trained_lora(tiny, folder, alpha=None) -> Path:
    """A lora r=4 tuner on the tiny pipeline, moved away from its zero initialisation, saved to `folder`."""
    tuned = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    attach(tuned, TuningConfig(name="lora", lora={"rank": 4, "alpha": alpha}))
    with torch.no_grad():
        for p in tuned.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    return save_tuner(tuned.unet, folder)


def stock_image_equals_ours(tiny, tuner, lora_file) -> None:
    """A stock pipeline's `load_lora_weights(lora_file)` gives load_tuner's image, and that image is not the plain one."""
    ours = image(load_tuner(StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None), tuner))
    stock = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    plain = image(stock)
    stock.load_lora_weights(lora_file)
    assert np.abs(image(stock) - ours).max() < 1e-5
    assert np.abs(plain - ours).max() > 1e-3  # the LoRA changes the image: the equality above is not vacuous


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_stock_load_lora_weights_gives_the_same_image_as_load_tuner(tiny, tmp_path, alpha):
    tuner = trained_lora(tiny, tmp_path / "tuner", alpha)
    assert (tuner / "pytorch_lora_weights.safetensors").is_file()
    stock_image_equals_ours(tiny, tuner, tuner)


# `restune-sd sample --tuner` also takes LoRA files other tools wrote.

runner = CliRunner()
SAMPLE = ["--prompt", "a red circle", "--steps", "3", "--seed", "5"]


def sample(tiny, tuner, out):
    return runner.invoke(app, ["sample", "--model", tiny, "--tuner", str(tuner), "--out", str(out), *SAMPLE])


def reference(pipe) -> np.ndarray:
    """What `sample` gives for SAMPLE with this pipeline: DDIM, guidance 7.5, image 0 seeded with 5."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe("a red circle", num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(5)).images[0], dtype=int)


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def test_sample_takes_a_kohya_file_made_elsewhere(tiny, tmp_path):
    merged = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    modules = {f"lora_unet_{name.replace('.', '_')}": m for name, m in merged.unet.named_modules()
               if name.endswith(("attn1.to_q", "attn2.to_v"))}
    attention = merged.text_encoder.encoder.layers[0].self_attn  # kohya names it by transformers 4's text_model path
    modules |= {f"lora_te_text_model_encoder_layers_0_self_attn_{n}": getattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    g, state = torch.Generator().manual_seed(0), {}
    with torch.no_grad():
        for key, linear in modules.items():  # rank 4, alpha 2: kohya's readers scale by 2 / 4
            down, up = torch.randn(4, linear.in_features, generator=g) * 0.3, torch.randn(linear.out_features, 4, generator=g) * 0.3
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
            linear.weight += 0.5 * up @ down  # the LoRA merged by hand: the reference
    save_file(state, tmp_path / "style.safetensors")

    result = sample(tiny, tmp_path / "style.safetensors", tmp_path / "out")
    assert result.exit_code == 0, result.output
    got, expected = png(tmp_path / "out" / "00000.png"), reference(merged)
    assert np.abs(got - expected).max() <= 2  # merged and unmerged weights differ only by float rounding
    assert np.abs(got - reference(StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None))).max() > 20
    settings = json.loads((tmp_path / "out" / "sample_config.json").read_text())["settings"]
    assert settings["tuner_sha256"] == hashlib.sha256((tmp_path / "style.safetensors").read_bytes()).hexdigest()

    assert sample(tiny, tmp_path / "style.safetensors", tmp_path / "out").exit_code == 0  # the same job: resumed
    save_file({**state, next(iter(state)): state[next(iter(state))] * 2}, tmp_path / "style.safetensors")
    result = sample(tiny, tmp_path / "style.safetensors", tmp_path / "out")
    assert result.exit_code == 2 and "another job" in result.output  # another file's content is another job


def test_sample_takes_a_folder_diffusers_save_lora_weights_wrote(tiny, tmp_path):
    trained = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    trained.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_out.0"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    # as diffusers' train_text_to_image_lora.py saves its result
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(trained.unet)), safe_serialization=True)

    result = sample(tiny, tmp_path / "lora", tmp_path / "out")
    assert result.exit_code == 0, result.output
    expected = reference(trained)
    assert np.abs(png(tmp_path / "out" / "00000.png") - expected).max() <= 1
    assert np.abs(expected - reference(StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None))).max() > 20


def write_pickle(path, marker):
    path.parent.mkdir(exist_ok=True)
    torch.save({"state": RunsCode(marker)}, path)


@pytest.mark.parametrize("name, write, expected", [
    ("style.ckpt", write_pickle, "is a pickle (.ckpt)"),
    ("lora/pytorch_lora_weights.bin", write_pickle, "is a pickle (.bin)"),
    ("style.safetensors", lambda path, _: save_file({"conv.weight": torch.ones(2)}, path), "holds no LoRA weights"),
    ("style.safetensors", lambda path, _: path.write_bytes(b"not a safetensors file"), "not a readable .safetensors"),
    ("style.txt", lambda path, _: path.write_text("lora"), "neither a restune-sd tuner"),
])
def test_a_file_that_is_no_usable_lora_is_one_line_and_never_unpickled(tiny, tmp_path, name, write, expected):
    write(tmp_path / name, tmp_path / "marker")
    tuner = tmp_path / name.split("/")[0]
    result = sample(tiny, tuner, tmp_path / "out")
    assert result.exit_code == 2 and expected in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()


def test_a_lora_for_another_model_is_one_line(tiny, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.ones(2, 7), f"{name}.lora_up.weight": torch.ones(16, 2)}, tmp_path / "x.safetensors")
    result = sample(tiny, tmp_path / "x.safetensors", tmp_path / "out")
    assert result.exit_code == 2 and "is not a LoRA diffusers can apply to this model: " in result.output
    assert "size mismatch" in result.output and result.output.count("\n") == 1
    assert not list((tmp_path / "out").glob("*.png"))
