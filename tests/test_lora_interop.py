"""A saved LoRA tuner works in the tool users already have: diffusers' own `load_lora_weights`."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from restune_sd import TuningConfig, attach, load_tuner, save_tuner
from restune_sd.tiny import write_tiny_sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd"))


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
